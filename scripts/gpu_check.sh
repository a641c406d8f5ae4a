#!/usr/bin/env bash
# The prepared GPU check: one call on a GPU machine builds the CUDA extension,
# runs every CUDA test and the benchmarks, each stage under its own time limit
# so that a hang or a slow stage still leaves the others' results.
#
#   bash scripts/gpu_check.sh                  # every stage, full sizes (~15 min)
#   bash scripts/gpu_check.sh build tests op   # some: build tests op op-widest profile unet unet-split unet-pairs distill distill-pairs e2e fidelity shapes
#   bash scripts/gpu_check.sh quick            # every stage, sizes that fit ~4 min of a lease
#   bash scripts/gpu_check.sh quick build op   # those stages at the quick sizes
#
# A/B of kernel changes in the same call: put the commit to compare against
# in .baseline/ (git-ignored; carry it with the call), e.g.
#   rm -rf .baseline && mkdir .baseline && git archive HEAD csrc gspn_diffusers benchmarks | tar -x -C .baseline
# The build stage then builds it too (in parallel) and the operator benchmark
# runs once for each tree, on the same card (bench_op_cuda_baseline.json).
#
# The operator benchmark also times each way of running column scans in the
# same build (the default: staged in place for small calls, else transposed
# copies; each forced, GSPN_CUDA_COLUMNS=staged / =transposed; the strided
# kernel; the route's row and
# column launches one after the other, GSPN_CUDA_STREAMS=1, instead of side by
# side on two streams) and ends with their times over the default's
# ("# column scans, time over the default").
#
# Everything printed goes to $OUT/gpu_check.log (the device tool's output
# folder; bench_results/ elsewhere), each benchmark's JSON beside it.
# The device machines have no diffusers: wheels in .whl/ (see the device
# tool's README) are installed into /tmp/site first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
stages="${*:-build tests op unet distill e2e}"
op_sides="256 512 1024 2048 4096" unet_args="--sizes 1024 2048 4096 8192 --sd15-extra 16384 --repeats 3"
e2e_args="" distill_args=""
if [[ " $stages " == *" quick "* ]]; then  # quick sizes; of the stages named with it, else all
    stages="${stages/quick/}"
    [[ -z "${stages// /}" ]] && stages="build tests op unet e2e distill"
    op_sides="256 1024 2048 4096" unet_args="--sizes 1024 2048 4096 8192 --sd15-extra 16384 --repeats 2"
    e2e_args="--models sd15 --sizes 4096 --sd15-extra --sdpa-max-px 2048" distill_args="--repeats 3"
fi
want() { [[ " $stages " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export GSPN_CACHE_DIR="${GSPN_CACHE_DIR:-/tmp/gspn_cache}" GSPN_BACKEND=compiled
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, report time and exit status
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s$( ((rc == 124)) && echo ' (TIMED OUT)')"
}

baseline=""
[[ -d .baseline/csrc && -d .baseline/gspn_diffusers ]] && baseline=$PWD/.baseline
baseline_build=""
if want build && [[ -n $baseline ]]; then  # in the background, beside the main build, with its own cache
    export MAX_JOBS=8
    (cd "$baseline" && timeout 300 env GSPN_CACHE_DIR=/tmp/gspn_cache_baseline PYTHONPATH="$baseline:${PYTHONPATH#*:}" \
        python3 -m gspn_diffusers.cli build > "$out/build_baseline.log" 2>&1) &
    baseline_build=$!
fi
want build && stage build 300 python3 -m gspn_diffusers.cli build
if [[ -n $baseline_build ]]; then
    wait "$baseline_build"
    echo "== baseline build: exit $? ($(tail -1 "$out/build_baseline.log"))"
fi
want tests && stage "CUDA tests" 240 python3 -m pytest -q -rfE -p no:cacheprovider -n 8 -k cuda \
    tests/test_ops_kernels.py tests/test_layer.py
op_args="--device cuda --dtype float16 --channels 32 320 --groups 1 C --sides $op_sides --max-gib 60 --repeats 5 --no-reference"
want op && stage "operator benchmark" 240 python3 benchmarks/bench_op.py $op_args --json "$out/bench_op_cuda.json"
if want op && [[ -n $baseline ]]; then
    GSPN_CACHE_DIR=/tmp/gspn_cache_baseline PYTHONPATH="$baseline:${PYTHONPATH#*:}" \
        stage "operator benchmark, baseline tree" 240 python3 "$baseline/benchmarks/bench_op.py" $op_args \
        --json "$out/bench_op_cuda_baseline.json"
fi
# Not in the default set: the operator benchmark again with the widest CUDA
# blocks (GSPN_CUDA_PACK=0, the launch plan before blocks were packed several
# per SM; csrc/README.md), the same build: A/B of the launch planning alone.
want op-widest && GSPN_CUDA_PACK=0 stage "operator benchmark, widest blocks" 240 python3 benchmarks/bench_op.py \
    $op_args --json "$out/bench_op_cuda_widest.json"
# Not in the default set: Nsight Compute on the scan kernels of a few
# bench_op cases (scripts/profile_kernels.py: one forward and one backward
# each, in NVTX ranges named after the case): throughput, occupancy,
# the schedulers' issue rate, the busiest pipes (XU: the exps and
# reciprocals of the fused normalisation), where warps stall, memory traffic. The
# report goes to $out/ncu.txt; the lines that say most are printed after.
if want profile; then
    ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
    echo "# profiled in this order, a forward and a backward kernel each:" $(python3 scripts/profile_kernels.py --list | cut -d' ' -f1)
    stage "kernel profile (ncu)" 240 "${ncu_bin:-ncu}" --clock-control none --nvtx -k regex:scan_ \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --log-file "$out/ncu.txt" \
        python3 scripts/profile_kernels.py --no-warmup
    grep -iE "scan_(forward|backward)_kernel|Duration|Memory Throughput|DRAM Throughput|Issue Slots Busy|No Eligible|Achieved Occupancy|Registers Per|stall|Warp Cycles Per Issued|Ipc|pipe" \
        "$out/ncu.txt" | cut -c1-160 | head -150
fi
want unet && stage "UNet step benchmark" 300 python3 benchmarks/bench_unet.py --models sd15 sdxl \
    $unet_args --json "$out/bench_unet.json"
# Not in the default set: the same with the scans' lines split across
# clusters where that evens out the SMs (GSPN_CUDA_SPLIT=auto; csrc/README.md,
# split lines), against the stage above in the same call.
want unet-split && GSPN_CUDA_SPLIT=auto stage "UNet step benchmark, split lines" 300 python3 benchmarks/bench_unet.py \
    --models sd15 sdxl $unet_args --json "$out/bench_unet_split.json"
# And with two channels of a gate group per block (GSPN_CUDA_CHANNELS=2;
# csrc/README.md, channel pairs): the layer's scans share 4 gate groups.
want unet-pairs && GSPN_CUDA_CHANNELS=2 stage "UNet step benchmark, channel pairs" 300 \
    python3 benchmarks/bench_unet.py --models sd15 sdxl $unet_args --json "$out/bench_unet_pairs.json"
want e2e && stage "end-to-end high-resolution benchmark" 300 python3 benchmarks/bench_e2e.py \
    $e2e_args --json "$out/bench_e2e.json"
want distill && stage "distillation step benchmark" 150 python3 benchmarks/bench_distill.py \
    $distill_args --json "$out/bench_distill.json"
# Not in the default set: the training step with channel pairs (the
# backward's atomic adds into the shared groups' gradients halved).
want distill-pairs && GSPN_CUDA_CHANNELS=2 stage "distillation step benchmark, channel pairs" 150 \
    python3 benchmarks/bench_distill.py $distill_args --json "$out/bench_distill_pairs.json"
# Not in the default set: the shapes-world fidelity run of issue 6 at full
# size (200 prompts, 25 steps, 4x and 8x, with ablations), hours on a CPU.
want fidelity && stage "fidelity benchmark (full)" 420 python3 benchmarks/fidelity.py --device cuda \
    --json "$out/fidelity.json"
# Not in the default set either: re-train the shapes-world teacher and its
# adapter with the GPU recipe (scripts/reproduce_shapes.sh --gpu: a teacher
# trained longer than the CPU allows). What it made comes back as
# $out/shapes.tar: the exported assets (fp16, ~14 MB) and the quick fidelity
# JSON and grid, or, when a stage ran out of time, the last saved teacher
# (fp16) so the run is not lost.
if want shapes; then
    export SHAPES_WORK=/tmp/shapes_work SHAPES_ASSETS=/tmp/shapes_assets
    stage "shapes-world teacher and adapter (GPU recipe)" "${SHAPES_LIMIT:-480}" \
        bash scripts/reproduce_shapes.sh --gpu --no-setup
    if [[ ! -f $SHAPES_ASSETS/gspn_adapter/gspn_adapter.safetensors ]]; then
        for stage_dir in teacher teacher-64; do
            if [[ -f $SHAPES_WORK/$stage_dir/model_index.json ]]; then
                python3 -m gspn_diffusers.shapes.export "$SHAPES_WORK/$stage_dir" - "$SHAPES_ASSETS" && break
            fi
        done
    fi
    cp "$SHAPES_WORK"/fidelity_quick.{json,png} "$SHAPES_ASSETS"/ 2>/dev/null
    tar -cf "$out/shapes.tar" -C "$SHAPES_ASSETS" . && echo "== shapes: $(tar -tf "$out/shapes.tar" | wc -l) entries in shapes.tar"
fi
echo "== done"
