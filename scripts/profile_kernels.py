"""Runs a few representative CUDA scan calls once each, for a profiler.

Meant to run under Nsight Compute (`scripts/gpu_check.sh profile` does, with
--no-warmup: the profiler replays each kernel on its own, so a first call's
build and planning do not reach its figures): each case launches one forward
and one backward scan kernel, in an NVTX range named after it. The cases
are the `bench_op` rows whose time the bandwidth alone does not explain
(BENCHMARKS.md, session 19): per-channel and shared gates at 320 channels,
32 channels, the same scan with plain gates (no fused normalisation),
32 channels with lines split across clusters (GSPN_CUDA_SPLIT=auto: the
cluster barriers' stalls), and shared gates with two channels per block
(GSPN_CUDA_CHANNELS=2: the backward's atomic adds halved).

  ncu --clock-control none --nvtx -k regex:scan_ ... python3 scripts/profile_kernels.py --no-warmup
  python3 scripts/profile_kernels.py --list      # the cases, without a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gspn_diffusers.ops import gspn_scan  # noqa: E402

# (name, channels, gate groups, side, normalize, environment: a way of running the kernels)
CASES = [
    ("c320_g320_1024_norm", 320, 320, 1024, True, {}),
    ("c320_g1_1024_norm", 320, 1, 1024, True, {}),
    ("c32_g32_1024_norm", 32, 32, 1024, True, {}),
    ("c320_g320_1024_plain", 320, 320, 1024, False, {}),
    ("c32_g32_1024_norm_split", 32, 32, 1024, True, {"GSPN_CUDA_SPLIT": "auto"}),
    ("c320_g1_1024_norm_pairs", 320, 1, 1024, True, {"GSPN_CUDA_CHANNELS": "2"}),
]


def run_case(channels: int, groups: int, side: int, normalize: bool, device: str, dtype: torch.dtype) -> None:
    """One forward and one backward of a top-to-bottom scan of that shape."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, channels, side, side)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    lam = torch.rand(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    gates = torch.randn((1, groups, 3, side, side), device=device, dtype=dtype, generator=gen)
    if not normalize:
        gates = torch.softmax(gates.float(), dim=2).to(dtype) * 0.9
    gates.requires_grad_()
    h = gspn_scan(x, gates, lam, "tb", None, normalize)
    torch.autograd.grad(h, (x, gates, lam), torch.randn_like(h))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--side", type=int, default=None, help="override every case's side (a quick check)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--no-warmup", action="store_true", help="no unlabelled call before each case's")
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES:
            print(*case)
        return 0
    dtype = getattr(torch, args.dtype)
    for name, channels, groups, side, normalize, environment in CASES:
        side = args.side or side
        with mock.patch.dict(os.environ, environment):
            if not args.no_warmup:  # build, plan, allocator: out of a timeline's range
                run_case(channels, groups, side, normalize, args.device, dtype)
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_push(name)
            run_case(channels, groups, side, normalize, args.device, dtype)
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
        print(f"ran {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
