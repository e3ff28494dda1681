#!/usr/bin/env bash
# The main job on generated data: CT phantoms -> train -> evaluate -> infer the BTCV bundle on CPU.
# Everything goes to ./quickstart (data, weights, metrics, predictions); rerunning starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup_env.sh
set -euo pipefail
out=quickstart
rm -rf "$out"
mkdir -p "$out"
configs=bundles/swin_unetr_btcv/configs
# glibc hands large freed buffers back to the OS and PyTorch then page-faults them in again every step; keeping
# them roughly halves a CPU training step here, for a few GB more resident memory.
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000

echo "== 1/4 anatomical CT phantoms (10 labelled: 8 to train, 2 held out to validate; 2 to segment) -> $out/data"
python ci/phantom_ct.py --out_dir "$out/data" --num_train 10 --num_test 2 --seed 0 --fov_scale 0.6 >/dev/null

# A tiny network and a short schedule so it finishes in minutes on 2 CPU cores; drop these for the paper recipe.
tiny=(--dataset_dir "$out/data" --ckpt_dir "$out/models" --feature_size 12 --roi_size "[64,64,64]"
      --use_checkpoint False --num_workers 2 --sw_batch_size 2)
step() {  # step NAME COMMAND...: runs quietly into $out/NAME.log, shows its tail on failure
  local log="$out/$1.log"; shift
  "$@" > "$log" 2>&1 || { tail -30 "$log"; echo "failed: see $log"; exit 1; }
}

epochs=20  # 8 cases x 20 epochs = 160 steps of one 64^3 patch
echo "== 2/4 training, $epochs epochs (log: $out/training.log)"
step training python -m monai.bundle run training --config_file "$configs/train.json" "${tiny[@]}" \
  --output_dir "$out/eval" --max_epochs $epochs --val_interval 10 --warmup_epochs 2 --num_samples 1 --learning_rate 0.002
grep -E "Iter: ([0-9]+)/\1 |Metrics" "$out/training.log" | sed -E 's/^.* - INFO - //' | awk 'NR % 4 == 0 || /Metrics/'

echo "== 3/4 evaluation in each image's original space (log: $out/evaluate.log)"
step evaluate python -m monai.bundle run --config_file "['$configs/train.json','$configs/evaluate.json']" "${tiny[@]}" \
  --output_dir "$out/eval"

echo "== 4/4 inference on $out/data/imagesTs (log: $out/inference.log)"
step inference python -m monai.bundle run --config_file "$configs/inference.json" "${tiny[@]}" \
  --output_dir "$out/predictions"

python - "$out" <<'PY'
import csv, glob, json, os, sys
out = sys.argv[1]
names = json.load(open("bundles/swin_unetr_btcv/configs/metadata.json"))["network_data_format"]["outputs"]["pred"]["channel_def"]
summary = dict(csv.reader(open(os.path.join(out, "eval", "metrics.csv"))))
rows = [r for r in csv.DictReader(open(os.path.join(out, "eval", "val_mean_dice_summary.csv"))) if r["class"].startswith("class")]
print(f"\nmean Dice over the 13 organs (2 held-out phantoms, original spacing): {float(summary['val_mean_dice']):.3f}"
      f"   HD95 {float(summary['val_hd95']):.1f} mm   NSD {float(summary['val_nsd']):.3f}")
print("per organ: " + ", ".join(f"{names[str(i + 1)]} {float(r['mean']):.2f}" for i, r in enumerate(rows)))
print(f"weights:      {out}/models/model.pt")
print(f"metrics:      {out}/eval/metrics.csv and per case x organ: {out}/eval/val_mean_dice_raw.csv, val_hd95_raw.csv, val_nsd_raw.csv")
print("predictions:  " + ", ".join(sorted(glob.glob(os.path.join(out, "predictions", "*.nii.gz")))))
print(f"pictures:     {out}/eval/training_curves.png, " + ", ".join(sorted(glob.glob(os.path.join(out, "eval", "pictures", "*.png")))))
print(f"TensorBoard:  tensorboard --logdir {out}/eval")
PY
