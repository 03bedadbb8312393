#!/usr/bin/env bash
# GPU checks in one run (what the development machines, which have no GPU, cannot exercise):
#   1. the CUDA tests (AMP fp16 + GradScaler training, GPU batch backends, provider choice);
#   2. training throughput, fp32 vs fp16 autocast, at 224²;
#   3. `cxr-deploy batch` throughput on the GPU vs the naive loop (benchmarks/batch_throughput.py).
# Usage: bash benchmarks/cuda_check.sh OUT_DIR [N]   (logs go to OUT_DIR; N images per format)
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
