"""Benchmark of the GSPN scan operator (not a test).

For B=1, each channel count and side, times the forward and the backward
of each backend and direction, the four-direction launch against four
single-direction calls, and a plain copy of the same bytes. Prints ms, the
achieved GB/s against the minimal bytes (each input read once, each output
written once) and the percentage of the copy bandwidth measured in the same
run; writes everything as JSON.

    python benchmarks/bench_op.py                      # CPU, quick sizes
    python benchmarks/bench_op.py --device cuda --dtype float16 --sides 256 512 1024 2048 4096

Targets (issue 2): on an H100, forward >= 85% and backward >= 60% of copy
bandwidth in every direction; on the CPU at 1x32x256x256, forward <= 3x the
time of copying its inputs once and >= 5x faster than the reference. The
run ends with which rows meet them (also the JSON's ``targets``).

On the CPU, glibc's malloc is tuned as the command line tunes it for
generation (``gspn_diffusers.cpu_allocator``): otherwise every output of 32 MB
or more is a fresh ``mmap`` whose page faults are timed with the kernel (at
1x32x1024x1024 they took 60% of a row scan), while the copy it is compared
with writes into buffers allocated once. ``--no-keep-freed`` times glibc's
default behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gspn_diffusers import ops  # noqa: E402
from gspn_diffusers.cpu_allocator import keep_freed_cpu_memory  # noqa: E402
from gspn_diffusers.ops import DIRECTIONS, gspn_scan, gspn_scan_4dir, load_backend, scan_reference  # noqa: E402
from common import median_ms, save_json  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def scan_bytes(channels: int, groups: int, side: int, itemsize: int, backward: bool) -> int:
    """Minimal bytes: forward reads x, lam, gates and writes h; backward also
    reads grad_h and h and writes grad_x, grad_lam, grad_gates."""
    plane = side * side * itemsize
    forward = (3 * channels + 3 * groups) * plane
    return forward + (4 * channels + 6 * groups) * plane if backward else forward


@contextlib.contextmanager
def columns_as_rows(device: torch.device, threshold):
    """Temporarily set the plane size from which column scans run as transposed row scans."""
    saved = ops.COLUMNS_AS_ROWS_MIN_PIXELS.get(device.type)
    ops.COLUMNS_AS_ROWS_MIN_PIXELS[device.type] = threshold
    try:
        yield
    finally:
        ops.COLUMNS_AS_ROWS_MIN_PIXELS[device.type] = saved


def columns_way(way: str):
    """Temporarily run the route's column scans one way (GSPN_CUDA_COLUMNS):
    "transposed" copies always, or "staged" in place wherever the planes
    align, instead of the default (staged for small calls only)."""
    return mock.patch.dict(os.environ, {"GSPN_CUDA_COLUMNS": way})


# Ways of running the CUDA kernels not yet timed on a GPU, which bench_op
# times beside the default, forward and backward, by row suffix: lines split
# across clusters of blocks where that evens out the SMs' work
# (GSPN_CUDA_SPLIT=auto; sm_90), and pairs of channels of a shared gate group
# per block (GSPN_CUDA_CHANNELS=2; rows with G < C only).
TRIAL_WAYS = {", split": {"GSPN_CUDA_SPLIT": "auto"}, ", channel pairs": {"GSPN_CUDA_CHANNELS": "2"}}
# Where bench_op times them (the CUDA kernels; a test adds "cpu", where the
# CPU kernels ignore the settings).
TRIAL_WAYS_DEVICES = {"cuda"}


def trial_ways(device, channels: int, groups: int):
    """(suffix, context manager setting that way) of the trial ways that
    apply to a size on this device."""
    if device.type not in TRIAL_WAYS_DEVICES:
        return []
    return [(suffix, mock.patch.dict(os.environ, settings)) for suffix, settings in TRIAL_WAYS.items()
            if suffix != ", channel pairs" or groups < channels]


@contextlib.contextmanager
def untimed_if_failing(what: str):
    """Rows of a way not yet run on a GPU: an error there is printed and the
    benchmark goes on (a short GPU lease keeps the other rows)."""
    try:
        yield
    except RuntimeError as error:
        print(f"# {what}: failed, not timed: {str(error).splitlines()[0]}")


def one_stream():
    """Temporarily run the route's row and column launches one after the other
    on one CUDA stream (GSPN_CUDA_STREAMS=1) instead of side by side on two."""
    return mock.patch.dict(os.environ, {"GSPN_CUDA_STREAMS": "1"})


def measure_size(args, device, dtype, gen, results, channels, groups, side, itemsize) -> None:
    """Times every backend/direction row of one (C, G, side) and appends them to results."""
    shape = (1, channels, side, side)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    lam = torch.rand(shape, device=device, dtype=dtype, generator=gen)
    logits = torch.randn((1, 4, groups, 3, side, side), device=device, dtype=dtype, generator=gen)
    fwd_bytes = scan_bytes(channels, groups, side, itemsize, False)
    bwd_bytes = scan_bytes(channels, groups, side, itemsize, True)
    def timed(fn) -> float:
        return median_ms(device, fn, args.repeats, args.warmup)

    # Copy bandwidth on the same bytes: read + write of the forward inputs.
    src = torch.empty(fwd_bytes // 2 // itemsize * 2, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * itemsize / copy_ms / 1e6
    inputs_copy = torch.empty((3 * channels + 3 * groups) * side * side, device=device, dtype=dtype)
    inputs_dst = torch.empty_like(inputs_copy)
    inputs_copy_ms = timed(lambda: inputs_dst.copy_(inputs_copy))

    def row(what, ms, nbytes, **extra):
        gbs = nbytes / ms / 1e6
        entry = {"C": channels, "G": groups, "side": side, "what": what, "ms": ms,
                 "GBps": gbs, "pct_copy": 100 * gbs / copy_gbs, **extra}
        results["rows"].append(entry)
        print(f"{channels:>4} {groups:>4} {side:>5} {what:<24} {ms:>10.3f} {gbs:>8.1f} {entry['pct_copy']:>5.0f}%")

    row("copy (read+write)", copy_ms, 2 * src.numel() * itemsize, copy_GBps=copy_gbs)
    row("copy inputs once", inputs_copy_ms, 2 * inputs_copy.numel() * itemsize)
    for d, direction in enumerate(DIRECTIONS):
        g = logits[:, d].contiguous()
        fwd = timed(lambda: gspn_scan(x, g, lam, direction, args.chunk, True))
        row(f"fwd {direction}", fwd, fwd_bytes, x_inputs_copy=fwd / inputs_copy_ms)
        # On CUDA large planes' column scans take the route (the row above):
        # staged in place for small calls where they align, else transposed
        # copies; each way forced, and the plain strided kernel.
        variants = direction == "lr" and ops.COLUMNS_AS_ROWS_MIN_PIXELS.get(device.type) is not None
        if variants:
            with columns_as_rows(device, None):
                strided = timed(lambda: gspn_scan(x, g, lam, direction, args.chunk, True))
            row("fwd lr, strided kernel", strided, fwd_bytes)
            for way in ("transposed", "staged"):
                with columns_way(way):
                    row(f"fwd lr, {way}", timed(lambda: gspn_scan(x, g, lam, direction, args.chunk, True)), fwd_bytes)
        xr, gr, lr = (t.detach().clone().requires_grad_() for t in (x, g, lam))
        grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)

        # The backward alone, on one retained graph: timing forward+backward
        # and subtracting the forward can go negative on small, noisy sizes.
        out = gspn_scan(xr, gr, lr, direction, args.chunk, True)
        bwd = timed(lambda: torch.autograd.grad(out, (xr, gr, lr), grad, retain_graph=True))
        row(f"bwd {direction}", bwd, bwd_bytes - fwd_bytes)
        for suffix, way in trial_ways(device, channels, groups) if direction == "tb" else []:
            with way, untimed_if_failing(f"tb{suffix}"):
                row(f"fwd tb{suffix}", timed(lambda: gspn_scan(x, g, lam, direction, args.chunk, True)), fwd_bytes)
                row(f"bwd tb{suffix}", timed(lambda: torch.autograd.grad(out, (xr, gr, lr), grad, retain_graph=True)),
                    bwd_bytes - fwd_bytes)
        if direction == "tb":
            # The same scan with the gates given as they are (normalize=False,
            # the API): the same bytes, without the normalisation's
            # arithmetic (its exps and reciprocals, forward; its chain rule,
            # backward), so the pair says how much of the time is instructions.
            gp = torch.softmax(g.float(), dim=2).to(dtype) * 0.9
            row("fwd tb, plain gates", timed(lambda: gspn_scan(x, gp, lam, direction, args.chunk)), fwd_bytes)
            xp, gpr, lp = (t.detach().clone().requires_grad_() for t in (x, gp, lam))
            plain = gspn_scan(xp, gpr, lp, direction, args.chunk)
            row("bwd tb, plain gates",
                timed(lambda: torch.autograd.grad(plain, (xp, gpr, lp), grad, retain_graph=True)),
                bwd_bytes - fwd_bytes)
            del plain
        if variants:
            for way in ("transposed", "staged"):
                with columns_way(way):
                    forced = timed(lambda: torch.autograd.grad(out, (xr, gr, lr), grad, retain_graph=True))
                row(f"bwd lr, {way}", forced, bwd_bytes - fwd_bytes)
        del out
        if args.reference and side <= args.reference_max_side:
            ref = median_ms(device, lambda: scan_reference(x, g, lam, direction, args.chunk, True), 1)
            row(f"reference fwd {direction}", ref, fwd_bytes, kernel_speedup=ref / fwd)
    four_bytes = 4 * fwd_bytes - 3 * 2 * channels * side * side * itemsize  # x and lam read once
    # Its backward alone, counted as the single directions' ("bwd"): grad_h and
    # h of four directions, grad_x and grad_lam written once (shared x and
    # lam), the gates read and their gradients written.
    four_bwd_bytes = (10 * channels + 24 * groups) * side * side * itemsize
    xr, gr, lr = (t.detach().clone().requires_grad_() for t in (x, logits, lam))
    grad = torch.randn((1, 4, *shape[1:]), device=device, dtype=dtype, generator=gen)

    def four_directions(suffix: str) -> None:
        four = timed(lambda: gspn_scan_4dir(x, logits, lam, args.chunk, True))
        row(f"fwd 4dir{suffix}", four, four_bytes)
        out = gspn_scan_4dir(xr, gr, lr, args.chunk, True)
        four_bwd = timed(lambda: torch.autograd.grad(out, (xr, gr, lr), grad, retain_graph=True))
        row(f"bwd 4dir{suffix}", four_bwd, four_bwd_bytes)

    four_directions(" (one call)")
    # A GSPN layer's call: the gates decayed by per-position decay logits
    # (read once forward; read and their gradient written backward).
    decay = torch.randn((1, 4, groups, side, side), device=device, dtype=dtype, generator=gen)
    decay_bytes = 4 * groups * side * side * itemsize
    row("fwd 4dir, decay", timed(lambda: gspn_scan_4dir(x, logits, lam, args.chunk, True, decay=decay)),
        four_bytes + decay_bytes)
    xd, gd, ld, dd = (t.detach().clone().requires_grad_() for t in (x, logits, lam, decay))
    out = gspn_scan_4dir(xd, gd, ld, args.chunk, True, decay=dd)
    row("bwd 4dir, decay", timed(lambda: torch.autograd.grad(out, (xd, gd, ld, dd), grad, retain_graph=True)),
        four_bwd_bytes + 2 * decay_bytes)
    del out
    for suffix, way in trial_ways(device, channels, groups):
        with way, untimed_if_failing(f"4dir{suffix}"):
            four_directions(suffix)
            row(f"fwd 4dir, decay{suffix}",
                timed(lambda: gspn_scan_4dir(x, logits, lam, args.chunk, True, decay=decay)), four_bytes + decay_bytes)
    if ops.COLUMNS_AS_ROWS_MIN_PIXELS.get(device.type) is not None:
        for way in ("transposed", "staged"):
            with columns_way(way):
                four_directions(f", {way}")
        with one_stream():
            four_directions(", one stream")
        # All four directions in one launch of the strided kernel.
        with columns_as_rows(device, None):
            four_directions(", strided kernel")
    gates = [logits[:, d].contiguous() for d in range(4)]
    separate = timed(
        lambda: torch.stack([gspn_scan(x, gates[d], lam, dn, args.chunk, True) for d, dn in enumerate(DIRECTIONS)], 1)
    )
    row("fwd 4 calls + stack", separate, 4 * fwd_bytes)


# Issue 2's targets: on a GPU, % of the copy bandwidth; on the CPU (at
# 1x32x256x256 in the issue, checked here at every size measured) forward time
# over one copy of its inputs, and speed-up over the reference.
GPU_TARGETS = {"fwd": ("pct_copy", ">=", 85.0), "bwd": ("pct_copy", ">=", 60.0)}
CPU_TARGETS = {"fwd": ("x_inputs_copy", "<=", 3.0), "reference fwd": ("kernel_speedup", ">=", 5.0)}


def check_targets(results: dict, device_type: str) -> list:
    """One verdict per measured row that a target applies to, printed as a summary."""
    targets = GPU_TARGETS if device_type == "cuda" else CPU_TARGETS
    verdicts = []
    for r in results["rows"]:
        kind, _, direction = r["what"].rpartition(" ")
        if kind not in targets or direction not in DIRECTIONS or targets[kind][0] not in r:
            continue
        key, op, bound = targets[kind]
        met = r[key] >= bound if op == ">=" else r[key] <= bound
        verdicts.append({"C": r["C"], "G": r["G"], "side": r["side"], "what": r["what"], "metric": key,
                         "value": r[key], "target": f"{op} {bound:g}", "met": met})
    if verdicts:
        print(f"# targets ({'GPU, set for an H100' if device_type == 'cuda' else 'CPU'}): "
              f"{sum(v['met'] for v in verdicts)} of {len(verdicts)} met")
        for v in verdicts:
            if not v["met"]:
                print(f"  missed: C={v['C']} G={v['G']} side={v['side']} {v['what']}: "
                      f"{v['metric']} {v['value']:.2f}, target {v['target']}")
    return verdicts


# The ways of running scans that bench_op times on CUDA, by the row suffix
# that names them ("" is the default: columns staged in place for small
# calls where the planes align, else transposed copies, the row launch beside
# the column launch on a second stream, lines not split; "one stream": one
# after the other; the TRIAL_WAYS: "split": lines split across clusters,
# "channel pairs": two channels of a shared gate group per block).
COLUMN_WAYS = {"": "default", ", transposed": "transposed", ", staged": "staged", ", strided kernel": "strided",
               ", one stream": "one_stream", ", split": "split", ", channel pairs": "channel_pairs"}


def compare_column_ways(results: dict) -> list:
    """Per size and pass (fwd/bwd of 'tb', of 'lr' and of the four
    directions), the time of each way of running the scans over the
    default's; printed, so a GPU run says at a glance which way should be
    the default."""
    times = {}
    for r in results["rows"]:
        for suffix, way in COLUMN_WAYS.items():
            for what in ("fwd tb", "bwd tb", "fwd lr", "bwd lr", "fwd 4dir", "bwd 4dir"):
                name = what + (" (one call)" if "4dir" in what and not suffix else suffix)
                if r["what"] == name:
                    times.setdefault((r["C"], r["G"], r["side"], what), {})[way] = r["ms"]
    table = [{"C": c, "G": g, "side": side, "what": what, "ms": ways,
              **{f"x_{way}": ms / ways["default"] for way, ms in ways.items() if way != "default"}}
             for (c, g, side, what), ways in times.items() if "default" in ways and len(ways) > 1]
    if table:
        print("# ways of running scans, time over the default (columns staged in place for small calls, else "
              "transposed copies; lines not split; one channel per block):")
        for t in table:
            others = "  ".join(f"{way} {t[f'x_{way}']:.2f}x" for way in list(COLUMN_WAYS.values())[1:]
                               if f"x_{way}" in t)
            print(f"  C={t['C']} G={t['G']} side={t['side']} {t['what']}: {others}")
    return table


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    status = load_backend()
    keep_freed = device.type == "cpu" and args.keep_freed and keep_freed_cpu_memory()
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "backend": {"cpu": status.cpu, "cuda": status.cuda},
        "keep_freed_cpu_memory": keep_freed,
        # CUDA launch planning: blocks packed several per SM, or the widest blocks (GSPN_CUDA_PACK=0)
        "cuda_pack_blocks": os.environ.get("GSPN_CUDA_PACK", "1") != "0",
        "rows": [],
    }
    print(f"# {results['device']}  torch {torch.__version__}  {args.dtype}  threads={results['threads']}"
          + ("  malloc: keep freed memory" if keep_freed else "")
          + ("  CUDA blocks: widest (GSPN_CUDA_PACK=0)" if device.type == "cuda" and not results["cuda_pack_blocks"]
             else ""))
    print(f"{'C':>4} {'G':>4} {'side':>5} {'what':<24} {'ms':>10} {'GB/s':>8} {'%copy':>6}")
    gen = torch.Generator(device=device).manual_seed(0)
    for channels in args.channels:
        for groups in sorted({1 if g == "1" else channels if g == "C" else int(g) for g in args.groups}):
            for side in args.sides:
                itemsize = torch.empty((), dtype=dtype).element_size()
                need = scan_bytes(channels, groups, side, itemsize, True) * 2.5 / 2**30
                if need > args.max_gib:
                    print(f"{channels:>4} {groups:>4} {side:>5} skipped: needs ~{need:.1f} GiB > --max-gib")
                    continue
                try:
                    measure_size(args, device, dtype, gen, results, channels, groups, side, itemsize)
                except torch.OutOfMemoryError:
                    # the estimate above is rough (the backward's temporaries grow with G)
                    print(f"{channels:>4} {groups:>4} {side:>5} skipped: out of device memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save_json(args.json, results)  # after every size: a crash or time limit keeps what ran
    results["targets"] = check_targets(results, device.type)
    results["column_ways"] = compare_column_ways(results)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 320])
    parser.add_argument("--groups", nargs="+", default=["1", "C"], help="gate groups: numbers, 1 or C")
    parser.add_argument("--sides", type=int, nargs="+", default=None, help="H = W values")
    parser.add_argument("--chunk", type=int, default=None, help="lines per chunk (default: global scan)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls first (on the CPU, malloc's heap grows over the first few calls "
                             "at large sizes, faulting in fresh pages)")
    parser.add_argument("--max-gib", type=float, default=8.0, help="skip sizes needing more memory")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the pure-PyTorch reference (small sides only)")
    parser.add_argument("--reference-max-side", type=int, default=256)
    parser.add_argument("--keep-freed", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: keep freed memory in the process, as the command line does (see above)")
    parser.add_argument("--json", type=Path, default=Path("bench_results/bench_op.json"))
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.sides is None:
        args.sides = [256, 512, 1024, 2048, 4096] if args.device == "cuda" else [256, 512]
    results = run(args)
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
