"""Command line: ``gspn-diffusers <command>``.

``build``    builds the compiled GSPN kernels now (instead of at first use) and
             prints which backend serves each device.
``distill``  distils GSPN layers from a checkpoint's attention (one process;
             ``accelerate launch distill/distill.py`` for several GPUs).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_build(args: argparse.Namespace) -> int:
    import torch

    from .ops import load_backend

    status = load_backend()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"cpu backend:  {status.cpu}")
    print(f"cuda backend: {status.cuda}")
    if status.build_dir is not None:
        print(f"build folder: {status.build_dir}")
    if status.reason:
        print(f"note: {status.reason}")
    return 0 if status.cpu == "compiled" or args.allow_reference else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gspn-diffusers``."""
    parser = argparse.ArgumentParser(prog="gspn-diffusers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="prebuild the compiled kernels and print the active backends")
    build.add_argument(
        "--allow-reference",
        action="store_true",
        help="exit 0 even when only the pure-PyTorch reference is available",
    )
    build.set_defaults(func=_cmd_build)
    sub.add_parser("distill", help="distil GSPN layers from a checkpoint (see `gspn-diffusers distill --help`)",
                   add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gspn-diffusers`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["distill"]:  # its options are the distillation script's own
        from .distill import main as distill_main

        return distill_main(argv[1:], prog="gspn-diffusers distill")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
