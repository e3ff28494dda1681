#!/usr/bin/env bash
# The main job on generated data: CT phantoms -> train -> evaluate -> infer the BTCV bundle on CPU.
# Everything goes to ./quickstart (data, weights, metrics, predictions); rerunning starts afresh.
# `bash ci/quickstart.sh [SEED]` draws other phantoms (default seed 0); the recipe stays the same.
set -euo pipefail
cd "$(dirname "$0")/.."
seed="${1:-0}"
source ci/setup_env.sh
set -euo pipefail
started=$(date +%s)
out=quickstart
rm -rf "$out"
mkdir -p "$out"
configs=bundles/swin_unetr_btcv/configs
# glibc hands large freed buffers back to the OS and PyTorch then page-faults them in again every step; keeping
# them roughly halves a CPU training step here, for a few GB more resident memory.
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000

echo "== 1/4 anatomical CT phantoms (10 labelled: 8 to train, 2 held out to validate; 2 to segment) -> $out/data"
python ci/phantom_ct.py --out_dir "$out/data" --num_train 10 --num_test 2 --seed "$seed" --fov_scale 0.6 >/dev/null

# The short-budget recipe of docs/learning_curves.md: a tiny network at 3 x 3 x 4 mm, where one 64^3 patch holds the
# whole abdomen, no loader processes (they would compete with the step for 2 cores), a higher learning rate and no
# side-swapping augmentation. Drop these settings for the paper's recipe.
tiny=(--dataset_dir "$out/data" --ckpt_dir "$out/models" --feature_size 12 --roi_size "[64,64,64]"
      --pixdim "[3.0,3.0,4.0]" --use_checkpoint False --num_workers 0 --sw_batch_size 2)
step() {  # step NAME COMMAND...: runs quietly into $out/NAME.log, shows its tail on failure
  local log="$out/$1.log"; shift
  "$@" > "$log" 2>&1 || { tail -30 "$log"; echo "failed: see $log"; exit 1; }
}

epochs=40  # 8 cases x 40 epochs = 320 steps of one 64^3 patch
echo "== 2/4 training, $epochs epochs (log: $out/training.log)"
step training python -m monai.bundle run training --config_file "$configs/train.json" "${tiny[@]}" \
  --output_dir "$out/eval" --max_epochs $epochs --val_interval 8 --warmup_epochs 2 --num_samples 1 \
  --learning_rate 0.008 --augment_left_right False
grep -E "Iter: ([0-9]+)/\1 |Metrics" "$out/training.log" | sed -E 's/^.* - INFO - //' | awk 'NR % 4 == 0 || /Metrics/'

echo "== 3/4 evaluation in each image's original space (log: $out/evaluate.log)"
step evaluate python -m monai.bundle run --config_file "['$configs/train.json','$configs/evaluate.json']" "${tiny[@]}" \
  --output_dir "$out/eval"

echo "== 4/4 inference on $out/data/imagesTs (log: $out/inference.log)"
step inference python -m monai.bundle run --config_file "$configs/inference.json" "${tiny[@]}" \
  --output_dir "$out/predictions"

python - "$out" "$seed" "$(( $(date +%s) - started ))" <<'PY'
import csv, glob, json, os, sys
out, seed, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = json.load(open("bundles/swin_unetr_btcv/configs/metadata.json"))["network_data_format"]["outputs"]["pred"]["channel_def"]
summary = dict(csv.reader(open(os.path.join(out, "eval", "metrics.csv"))))
rows = [r for r in csv.DictReader(open(os.path.join(out, "eval", "val_mean_dice_summary.csv"))) if r["class"].startswith("class")]
print(f"\nmean Dice over the 13 organs (2 held-out phantoms of seed {seed}, original spacing): "
      f"{float(summary['val_mean_dice']):.3f}"
      f"   HD95 {float(summary['val_hd95']):.1f} mm   NSD {float(summary['val_nsd']):.3f}")
print("per organ: " + ", ".join(f"{names[str(i + 1)]} {float(r['mean']):.2f}" for i, r in enumerate(rows)))
print(f"weights:      {out}/models/model.pt")
print(f"metrics:      {out}/eval/metrics.csv and per case x organ: {out}/eval/val_mean_dice_raw.csv, val_hd95_raw.csv, val_nsd_raw.csv")
print("predictions:  " + ", ".join(sorted(glob.glob(os.path.join(out, "predictions", "*.nii.gz")))))
print(f"pictures:     {out}/eval/training_curves.png, " + ", ".join(sorted(glob.glob(os.path.join(out, "eval", "pictures", "*.png")))))
print(f"TensorBoard:  tensorboard --logdir {out}/eval")
print(f"took {seconds // 60} min {seconds % 60:02d} s")
PY
