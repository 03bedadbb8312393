#!/usr/bin/env bash
# GPU checks in one run (what the development machines, which have no GPU, cannot exercise):
#   1. the CUDA tests (AMP fp16 + GradScaler training, GPU batch backends, provider choice);
#   2. training throughput, fp32 vs fp16 autocast, at 224²;
#   3. `cxr-deploy batch` throughput on the GPU vs the naive loop (benchmarks/batch_throughput.py);
#   4. with KERMANY=DIR (a copy of ../shared/data/kermany224 carried into the repository, ~42 MiB):
#      one training epoch augmented on the device vs in the workers (issue 13), then the real-data
#      quality benchmark (benchmarks/kermany_quality.py, issue 12) with the time that is left.
# Usage: [KERMANY=DIR] bash benchmarks/cuda_check.sh OUT_DIR [N]   (logs in OUT_DIR; N images per format)
# It expects cxr_deploy importable as an installed package (not from the source tree: the tests
# run from a copy so the repository's cxr_deploy/ folder does not shadow the installed one).
set -u
out=${1:?OUT_DIR}; n=${2:-256}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, onnxruntime as o, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "| onnxruntime", o.__version__, o.get_available_providers())'
  nproc
} 2>&1 | tee "$out/env.txt"

work=$(mktemp -d)
cp -r "$here/tests" "$here/samples" "$work/"
(cd "$work" && timeout 150 python3 -m pytest -q -rs -p no:cacheprovider \
    tests/training/test_training_cuda.py tests/batch/test_batch_cuda.py \
    "tests/export/test_export_units.py::test_cam_wrapper_keeps_head_and_map_in_float32_under_autocast") 2>&1 \
  | tee "$out/cuda_tests.txt"

timeout 60 python3 "$here/benchmarks/train_throughput.py" --size 224 --batch 64 --iters 10 --warmup 3 2>&1 \
  | tee "$out/train_throughput.txt"

timeout 200 python3 "$here/benchmarks/batch_throughput.py" --n "$n" --backends torch,onnx \
    --batch-size 64 --skip-memory --workdir "$work/bench" 2>&1 | tee "$out/batch_throughput.txt"

if [ -n "${KERMANY:-}" ]; then
  # The epoch's own img/s line (training images only) for each place the augmentation runs; the
  # cache is filled by the first run, so the second order is run again to compare warm against warm.
  for where in device workers device; do
    timeout 150 python3 -m cxr_deploy.cli train --data "$KERMANY/manifest.csv" --weights none \
        --epochs-stage1 0 --epochs-stage2 1 --batch-size 64 --num-workers 14 --cache-dir "$work/cache" \
        --augment-on "$where" --no-calibrate --out "$work/train-$where-$RANDOM" 2>&1 \
      | grep -E "^(device|epoch)" | sed "s/^/[$where] /" | tee -a "$out/train_augment_on.txt"
  done
  timeout 420 python3 "$here/benchmarks/kermany_quality.py" --data "$KERMANY" --work "$work/quality" \
      --input-size 224 --epochs 30 --batch-size 64 --num-workers 14 --cache-dir "$work/cache" 2>&1 \
    | tee "$out/kermany_quality.txt"
  cp "$work/quality/quality.json" "$out/" 2>/dev/null || true
fi
