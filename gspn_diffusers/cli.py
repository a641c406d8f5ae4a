"""Command line: ``gspn-diffusers <command>``.

``build``    builds the compiled GSPN kernels now (instead of at first use) and
             prints which backend serves each device.
``distill``  distils GSPN layers from a checkpoint's attention (one process;
             ``accelerate launch distill/distill.py`` for several GPUs).
``generate`` makes one ultra-high-resolution image with the staged
             GSPNHighResPipeline and writes it as a PNG with its settings.
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
    print(f"cpu backend:  {status.cpu}" + (" (the CUDA kernels, in the CPU simulator)" if status.cuda_sim else ""))
    print(f"cuda backend: {status.cuda}")
    if status.build_dir is not None:
        print(f"build folder: {status.build_dir}")
    if status.reason:
        print(f"note: {status.reason}")
    return 0 if status.cpu == "compiled" or args.allow_reference else 1


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from . import __version__
    from .compat import from_pretrained_dtype
    from .cpu_allocator import keep_freed_cpu_memory
    from .pipelines import GSPNHighResPipeline, save_png

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        keep_freed_cpu_memory()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.float16 if device == "cuda" else torch.float32)
    started = time.perf_counter()
    pipe = GSPNHighResPipeline.from_pretrained(args.model, adapter=args.adapter, **from_pretrained_dtype(dtype)).to(device)
    print(f"loaded {args.model} ({'adapter ' + args.adapter if args.adapter else 'no adapter'}) on {device} "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    out = pipe(
        args.prompt, width=args.width, height=args.height, negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        generator=torch.Generator(device).manual_seed(args.seed), stage_strengths=args.strengths,
        stage_steps=args.stage_steps, stage_growth=args.stage_growth, skip_residual=not args.no_skip_residual,
        upscale_mode=args.upscale_mode, color_fix=args.color_fix,
        dilated_sampling=args.dilated_sampling, dilated_sampling_size=args.dilated_sampling_size,
        vae_tile_size=args.vae_tile, offload_vae_while_denoising=args.offload_vae,
        return_stage_images=args.save_stages is not None,
    )
    stages = []
    for report in out.stages:
        peak = f"{report.peak_memory_gib:.1f} GiB" if report.peak_memory_gib is not None else "n/a (CPU)"
        print(f"stage {report.index + 1}: {report.width}x{report.height}  strength {report.strength:.2f}  "
              f"{report.steps} steps  {report.seconds:.1f} s  peak {peak}")
        stages.append({"width": report.width, "height": report.height, "strength": report.strength,
                       "steps": report.steps, "seconds": round(report.seconds, 3)})
    metadata = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "model": args.model,
        "adapter": args.adapter, "guidance_scale": args.guidance_scale, "num_inference_steps": args.steps,
        "skip_residual": not args.no_skip_residual, "upscale_mode": args.upscale_mode,
        "color_fix": args.color_fix, "dilated_sampling": args.dilated_sampling, "stages": stages,
        "software": f"gspn-diffusers {__version__}",
    }
    if args.save_stages is not None:
        for k, image in enumerate(out.stage_images):
            save_png(image[0], args.save_stages / f"stage-{k + 1}.png", {**metadata, "stage": k + 1})
    path = save_png(out.images[0], args.out, metadata)
    print(f"wrote {path} ({args.width}x{args.height}) in {time.perf_counter() - started:.1f} s total")
    return 0


def _add_generate(sub) -> None:
    from pathlib import Path

    gen = sub.add_parser("generate", help="one ultra-high-resolution image (staged GSPN pipeline)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--model", required=True, help="base SD-1.x/2.x or SDXL pipeline: folder or Hub repo id")
    gen.add_argument("--adapter", default=None, help="GSPN adapter folder or Hub repo id (without: slow attention)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--width", type=int, required=True, help="pixels (rounded to the latent factor)")
    gen.add_argument("--height", type=int, required=True)
    gen.add_argument("--out", type=Path, default=Path("gspn.png"), help="PNG with the settings in text chunks")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=30, help="nominal steps per stage (a stage runs strength x steps)")
    gen.add_argument("--guidance_scale", type=float, default=7.5)
    gen.add_argument("--strengths", type=float, nargs="+", default=None, help="per-stage re-noising strength")
    gen.add_argument("--stage_steps", type=int, nargs="+", default=None, help="per-stage nominal steps")
    gen.add_argument("--stage_growth", type=float, default=2.0,
                     help="side growth per stage (larger: fewer stages, fewer VAE round trips with pixel upscaling)")
    gen.add_argument("--no_skip_residual", action="store_true", help="plain re-noising, no DemoFusion skip residual")
    gen.add_argument("--upscale_mode", choices=["latent", "pixel"], default="latent")
    gen.add_argument("--color_fix", action="store_true",
                     help="each upscaling stage keeps its input's colours and adds only finer detail")
    gen.add_argument("--dilated_sampling", action="store_true",
                     help="DemoFusion's dilated sampling in large stages (up to 2x the UNet work there)")
    gen.add_argument("--dilated_sampling_size", type=int, default=None,
                     help="sub-latent side for --dilated_sampling (default: the UNet's native latent side)")
    gen.add_argument("--vae_tile", type=int, default=128, help="VAE tile in latent cells")
    gen.add_argument("--offload_vae", action="store_true", help="keep the VAE on the CPU while denoising")
    gen.add_argument("--save_stages", type=Path, default=None, help="also save each stage's image in this folder")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    gen.set_defaults(func=_cmd_generate)


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
    _add_generate(sub)
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
