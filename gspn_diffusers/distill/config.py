"""Command-line options of the distillation script, and their checks.

Names follow the diffusers training scripts. Everything that can be checked
without loading a model is checked here, so bad arguments fail in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..integration import INITS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DATA_FREE_LATENTS = ("trajectory", "noise")


def build_parser(prog: str = "distill.py") -> argparse.ArgumentParser:
    """The full option set of ``distill/distill.py`` and ``gspn-diffusers distill``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Distil GSPN layers from the self-attention of a pretrained diffusers checkpoint. "
        "Only the GSPN layers train; the result in --output_dir is an adapter that "
        "apply_gspn(pipe, adapter=OUTPUT_DIR) loads. Run with `accelerate launch` for several GPUs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and output")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="diffusers pipeline folder or Hub repo id (SD-1.x/2.x, SDXL, PixArt)")
    g.add_argument("--revision", default=None, help="Hub revision of the pretrained model")
    g.add_argument("--output_dir", required=True,
                   help="becomes the adapter folder; checkpoints, logs, caches and validation images go in subfolders")
    g.add_argument("--layers", default="all", help="'all', 'highres', or comma-separated attention name patterns")
    g.add_argument("--proxy_dim", type=float, default=None,
                   help="scan channels per layer: an int, or a fraction (<1) of the layer width; default width/8")
    g.add_argument("--gate_groups", type=int, default=4, help="gate sets per layer")
    g.add_argument("--chunk", type=int, default=None, help="lines per chunk (local scan); default global")
    g.add_argument("--bottleneck", type=int, default=64, help="width of the gate-prediction path")
    g.add_argument("--init", choices=INITS, default="attention", help="start from the attention's projections or random")

    g = p.add_argument_group("data (data-free from --prompts_file is the cheap default)")
    g.add_argument("--prompts_file", default=None, help="text file, one prompt per line (data-free distillation)")
    g.add_argument("--train_data_dir", default=None,
                   help="images with captions (same-name .txt or metadata.jsonl with file_name/text), or a "
                   "datasets folder saved with save_to_disk")
    g.add_argument("--image_column", default="image", help="image column of a datasets folder")
    g.add_argument("--caption_column", default="text", help="caption column of a datasets folder / metadata.jsonl")
    g.add_argument("--resolution", nargs="+", default=["512"],
                   help="training size(s) in px: N for NxN or WxH; several give aspect/resolution buckets")
    g.add_argument("--data_free_latents", choices=DATA_FREE_LATENTS, default="trajectory",
                   help="'trajectory': re-noise latents the teacher generates from the prompts; 'noise': pure noise at random timesteps")
    g.add_argument("--teacher_steps", type=int, default=20, help="teacher sampling steps per data-free latent")
    g.add_argument("--teacher_guidance_scale", type=float, default=5.0, help="CFG scale of the teacher's samples")
    g.add_argument("--num_teacher_latents", type=int, default=None,
                   help="data-free latents to generate per bucket (default: one per prompt, at most 1024)")
    g.add_argument("--uncond_prob", type=float, default=0.1, help="share of samples trained with the empty prompt")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4, help="per device")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (overrides --num_train_epochs)")
    g.add_argument("--num_train_epochs", type=int, default=None, help="passes over the latents (if no --max_train_steps)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="constant_with_warmup",
                   help="diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...")
    g.add_argument("--lr_warmup_steps", type=int, default=100)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate's config (no on CPU)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute the UNet blocks in backward")
    g.add_argument("--use_ema", action="store_true", help="keep an EMA of the GSPN weights and save it")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("loss weights (published defaults)")
    g.add_argument("--noise_loss_weight", type=float, default=1.0, help="noise-prediction MSE (image data only)")
    g.add_argument("--output_loss_weight", type=float, default=0.5, help="student vs teacher prediction MSE")
    g.add_argument("--feature_loss_weight", type=float, default=0.5,
                   help="mean over layers of GSPN output vs replaced attention output MSE")

    g = p.add_argument_group("checkpoints, logs, validation")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=3, help="keep at most this many checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--validation_steps", type=int, default=0, help="teacher-vs-student image grid every N steps (0: off)")
    g.add_argument("--validation_prompts", nargs="*", default=None, help="default: the first 4 training prompts")
    g.add_argument("--validation_inference_steps", type=int, default=20)
    g.add_argument("--report_to", default="tensorboard", help="accelerate tracker, or 'none'")
    g.add_argument("--logging_dir", default="logs", help="under --output_dir")
    return p


def parse_resolution(text: str) -> Tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (width 768, height 512)."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise ValueError(f"--resolution {text!r}: use N or WxH with positive integers")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _looks_local(name: str) -> bool:
    """A path rather than a Hub repo id ('owner/name')."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Check what can be checked before any model loads; normalise fields."""
    errors: List[str] = []
    model = args.pretrained_model_name_or_path
    if (_looks_local(model) or Path(model).expanduser().exists()) and not Path(model).expanduser().is_dir():
        errors.append(f"--pretrained_model_name_or_path {model}: no such folder")
    if args.prompts_file is None and args.train_data_dir is None:
        errors.append("give --prompts_file (data-free) or --train_data_dir (images with captions)")
    if args.prompts_file is not None:
        try:
            prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"--prompts_file {args.prompts_file}: cannot read it ({exc})")
        else:
            if not prompts:
                errors.append(f"--prompts_file {args.prompts_file}: no prompts in it")
            args.prompts = prompts
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        errors.append(f"--train_data_dir {args.train_data_dir}: no such folder")
    try:
        args.resolutions = [parse_resolution(r) for r in args.resolution]
    except ValueError as exc:
        errors.append(str(exc))
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = 1000
    for name in ("max_train_steps", "num_train_epochs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            errors.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "teacher_steps"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name} must be positive, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        errors.append(f"--learning_rate must be positive, got {args.learning_rate}")
    if not 0 <= args.uncond_prob < 1:
        errors.append(f"--uncond_prob must be in [0, 1), got {args.uncond_prob}")
    if args.proxy_dim is not None:
        args.proxy_dim = int(args.proxy_dim) if args.proxy_dim >= 1 else float(args.proxy_dim)
    args.layers = args.layers if args.layers in ("all", "highres") else [s for s in args.layers.split(",") if s]
    if errors:
        raise SystemExit("distill: " + "\n  ".join(["invalid arguments:"] + errors))
    return args


def gspn_options(args: argparse.Namespace) -> dict:
    """The apply_gspn options the arguments ask for."""
    return {"layers": args.layers, "proxy_dim": args.proxy_dim, "gate_groups": args.gate_groups,
            "chunk": args.chunk, "bottleneck": args.bottleneck, "init": args.init}


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "distill.py") -> argparse.Namespace:
    """Parse and validate; exits with a message naming every bad argument."""
    return validate(build_parser(prog).parse_args(argv))


def describe(args: argparse.Namespace) -> str:
    """One JSON line of the run's settings (logged at start)."""
    skip = {"prompts"}
    return json.dumps({k: v for k, v in vars(args).items() if k not in skip}, default=str)
