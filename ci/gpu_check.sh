#!/usr/bin/env bash
# The checks that need a CUDA GPU (CI has none), for a machine whose python3 has a CUDA build of PyTorch and this
# project's requirements (on a machine without package access, carry monai, nibabel, pytorch-ignite, fire,
# termcolor and pydicom as wheels). Logs go to $OUT (default ./gpu_check).
#   bash ci/gpu_check.sh                      # all three parts, about 10 minutes on one H100
#   bash ci/gpu_check.sh benchmark torchrun   # some of them: benchmark, torchrun, tests
# - benchmark: ci/benchmark.py, reference recipe against the bundles as shipped (AMP on both), 2 rounds
# - torchrun:  multi_gpu_train.json on every GPU of the machine, NCCL
# - tests:     the bundle tests on CUDA (the bundles pick the GPU and MONAI's float16 AMP by themselves)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
parts=(${*:-benchmark torchrun tests})
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
  *) echo "unknown part $part (benchmark, torchrun, tests)"; exit 2 ;;
  esac
done
