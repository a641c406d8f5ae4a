#!/usr/bin/env bash
# The prepared GPU check: one call on a GPU machine builds the CUDA extension,
# runs every CUDA test, the operator benchmark and the UNet-step benchmark.
# Logs and JSON go to $OUT (the device tool's output folder) or bench_results/.
#
#   bash scripts/gpu_check.sh            # torch with CUDA must be importable
#
# The device machines have no diffusers: carry its wheel (see the device
# tool's README) and put it on PYTHONPATH before calling this script.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export GSPN_CACHE_DIR="${GSPN_CACHE_DIR:-/tmp/gspn_cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== build"
start=$(date +%s)
GSPN_BACKEND=compiled python3 -m gspn_diffusers.cli build 2>&1 | tee "$out/build.log" | tail -6
echo "build took $(( $(date +%s) - start )) s"

echo "== CUDA tests"
python3 -m pytest -q -p no:cacheprovider -n 8 -k cuda tests/test_ops_kernels.py 2>&1 | tee "$out/cuda_tests.log" | tail -20

echo "== operator benchmark"
python3 benchmarks/bench_op.py --device cuda --dtype float16 --channels 32 320 --groups 1 C \
    --sides 256 1024 2048 4096 --max-gib 60 --no-reference --json "$out/bench_op_cuda.json" 2>&1 \
    | tee "$out/bench_op.log" | grep -E "copy \(|fwd|bwd|skipped|#"

echo "== UNet step benchmark"
python3 benchmarks/bench_unet.py --repeats 3 --json "$out/bench_unet.json" 2>&1 | tee "$out/bench_unet.log" | grep -E "px|wrote|Error"

echo "== distillation step benchmark"
python3 benchmarks/bench_distill.py --json "$out/bench_distill.json" 2>&1 | tee "$out/bench_distill.log" | grep -E "px|wrote|Error"

echo "== end-to-end high-resolution benchmark"
python3 benchmarks/bench_e2e.py --json "$out/bench_e2e.json" 2>&1 | tee "$out/bench_e2e.log" | grep -E "px|wrote|Error"
