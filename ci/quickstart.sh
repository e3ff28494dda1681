#!/usr/bin/env bash
# The main job on the embedded default: synthetic CT -> train -> evaluate -> infer the BTCV bundle on CPU.
# Everything goes to ./quickstart (data, weights, metrics, predictions); rerunning starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup_env.sh
set -euo pipefail
out=quickstart
rm -rf "$out"
configs=bundles/swin_unetr_btcv/configs

echo "== 1/4 synthetic CT data set (8 labelled + 2 test volumes) -> $out/data"
python ci/synthetic_ct.py --out_dir "$out/data" --num_train 8 --num_test 2 --seed 0 >/dev/null

# A tiny network and short schedule so it finishes in minutes on 2 CPU cores; drop these for the paper recipe.
tiny=(--dataset_dir "$out/data" --ckpt_dir "$out/models" --feature_size 12 --roi_size "[64,64,64]"
      --use_checkpoint false --num_workers 2 --sw_batch_size 2)

echo "== 2/4 training (log: $out/training.log)"
python -m monai.bundle run training --config_file "$configs/train.json" "${tiny[@]}" --output_dir "$out/eval" \
  --max_epochs 12 --val_interval 4 --warmup_epochs 1 --num_samples 2 --learning_rate 0.001 > "$out/training.log" 2>&1 \
  || { tail -30 "$out/training.log"; exit 1; }
grep -E "train_loss|val_mean_dice" "$out/training.log" | grep -E "Iter: 6/6|Metrics" || true

echo "== 3/4 evaluation in the original image space (log: $out/evaluate.log)"
python -m monai.bundle run --config_file "['$configs/train.json','$configs/evaluate.json']" "${tiny[@]}" \
  --output_dir "$out/eval" > "$out/evaluate.log" 2>&1 || { tail -30 "$out/evaluate.log"; exit 1; }

echo "== 4/4 inference on $out/data/imagesTs (log: $out/inference.log)"
python -m monai.bundle run --config_file "$configs/inference.json" "${tiny[@]}" --output_dir "$out/predictions" \
  > "$out/inference.log" 2>&1 || { tail -30 "$out/inference.log"; exit 1; }

python - "$out" <<'PY'
import csv, glob, os, sys
out = sys.argv[1]
summary = dict(csv.reader(open(os.path.join(out, "eval", "metrics.csv"))))
print(f"\nmean Dice over the 13 organs (validation cases, original spacing): {float(summary['val_mean_dice']):.3f}")
print(f"  HD95 {float(summary['val_hd95']):.1f} mm, NSD {float(summary['val_nsd']):.3f}")
print(f"weights:      {out}/models/model.pt")
print(f"metrics:      {out}/eval/*.csv (per case and organ: val_mean_dice_raw.csv, val_hd95_raw.csv, val_nsd_raw.csv)")
print(f"predictions:  " + ", ".join(sorted(glob.glob(os.path.join(out, "predictions", "*.nii.gz")))))
print(f"TensorBoard:  tensorboard --logdir {out}/eval")
PY
