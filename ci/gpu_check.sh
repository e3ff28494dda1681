#!/usr/bin/env bash
# The checks that need a CUDA GPU (CI has none), for a machine whose python3 has a CUDA build of PyTorch and this
# project's requirements (on a machine without package access, carry monai, nibabel, pytorch-ignite, fire,
# termcolor and pydicom as wheels). Logs go to $OUT (default ./gpu_check).
#   bash ci/gpu_check.sh                      # all four parts, about 12 minutes on one H100
#   bash ci/gpu_check.sh benchmark torchrun   # some of them: benchmark, torchrun, tests, trt
# - benchmark: ci/benchmark.py, reference recipe against the bundles as shipped (AMP on both), 2 rounds
# - torchrun:  multi_gpu_train.json on every GPU of the machine, NCCL
# - tests:     the bundle tests on CUDA (the bundles pick the GPU and MONAI's float16 AMP by themselves)
# - trt:       inference_trt.json against inference.json (both float16) on two CTs of BTCV's size: agreement of the
#              label maps and the time of a second run (the first builds the TensorRT engine); needs tensorrt,
#              polygraphy and onnx
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
parts=(${*:-benchmark torchrun tests trt})
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name(0))" || exit 1

for part in "${parts[@]}"; do
  case $part in
  benchmark)
    echo "== benchmark (log: $out/benchmark.log)"
    timeout 400 $py ci/benchmark.py --variants reference shipped --rounds 2 --iterations 6 2>&1 | tee "$out/benchmark.log"
    ;;
  torchrun)
    echo "== multi_gpu_train.json under torchrun, NCCL (log: $out/torchrun.log)"
    data=$(mktemp -d)
    $py ci/synthetic_ct.py --out_dir "$data/btcv" --num_train 4 --num_test 1 --shape "[120,110,36]" --seed 0 >/dev/null
    configs=bundles/swin_unetr_btcv/configs
    timeout 120 $py -m torch.distributed.run --nproc_per_node="$($py -c 'import torch; print(torch.cuda.device_count())')" \
      -m monai.bundle run training --config_file "['$configs/train.json','$configs/multi_gpu_train.json']" \
      --dataset_dir "$data/btcv" --ckpt_dir "$data/models" --output_dir "$data/eval" --feature_size 12 \
      --roi_size "[64,64,64]" --use_checkpoint False --num_samples 1 --num_workers 2 --max_epochs 4 --val_interval 2 \
      --warmup_epochs 1 --learning_rate 0.003 > "$out/torchrun.log" 2>&1
    echo "torchrun exit $?"; grep -E "Metrics|Error" "$out/torchrun.log" | tail -4
    ;;
  tests)
    echo "== bundle tests on CUDA (log: $out/tests.log)"
    # multi_gpu tests start two ranks, which need two GPUs; an interrupt still prints the failures so far
    timeout -s INT 300 $py -m pytest -q -n 8 -p no:cacheprovider -rf --tb=line -k "not multi_gpu" \
      tests/test_btcv_bundle.py tests/test_pretrain_bundle.py tests/test_msd_bundle.py \
      tests/test_inference_equivalence.py tests/test_btcv_scripts.py tests/test_pretrain_scripts.py 2>&1 \
      | tee "$out/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed"
    ;;
  trt)
    echo "== inference_trt.json against inference.json (log: $out/trt.log)"
    data=$(mktemp -d)
    mkdir -p "$data/models"
    $py ci/synthetic_ct.py --out_dir "$data/btcv" --num_train 0 --num_test 2 --shape "[512,512,140]" \
      --spacing "[0.75,0.75,2.5]" --seed 0 >/dev/null
    # random weights: the weights do not change the time, and nothing outside the machine can be downloaded
    $py -c "import torch; from monai.networks.nets import SwinUNETR; torch.manual_seed(0); \
torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=48).state_dict(), '$data/models/model.pt')"
    configs=bundles/swin_unetr_btcv/configs
    for variant in inference inference_trt; do
      files="['$configs/inference.json']"
      [ $variant = inference_trt ] && files="['$configs/inference.json','$configs/inference_trt.json']"
      for attempt in 1 2; do  # the second run reuses the TensorRT engine the first one built
        start=$(date +%s.%N)
        timeout 400 $py -m monai.bundle run --config_file "$files" --dataset_dir "$data/btcv/imagesTs" \
          --ckpt_dir "$data/models" --output_dir "$data/$variant" >> "$out/trt.log" 2>&1
        echo "$variant run $attempt: exit $?, $(echo "$(date +%s.%N) - $start" | bc) s for 2 CTs"
      done
    done
    $py - "$data" <<'PY'
import sys, nibabel as nib, numpy as np
from pathlib import Path
data = Path(sys.argv[1])
for torch_seg in sorted((data / "inference").glob("*_seg.nii.gz")):
    a = np.asarray(nib.load(torch_seg).dataobj)
    b = np.asarray(nib.load(data / "inference_trt" / torch_seg.name).dataobj)
    print(f"{torch_seg.name}: voxels with the same label {np.mean(a == b):.5f} (PyTorch float16 AMP vs TensorRT fp16)")
PY
    ;;
  *) echo "unknown part $part (benchmark, torchrun, tests, trt)"; exit 2 ;;
  esac
done
