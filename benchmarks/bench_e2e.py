"""End-to-end high-resolution generation: time and peak memory of the whole
staged pipeline (prompt to decoded image) for the SD-1.5 and SDXL
architectures with random weights, GSPN vs SDPA attention in the same run
(SDPA only up to --sdpa-max-px, above which it takes far too long). Not a test.

    python benchmarks/bench_e2e.py                             # GPU, fp16: 2K, 4K, 8K, 16K (SD-1.5)
    python benchmarks/bench_e2e.py --device cpu --quick        # smoke run of the script

Targets (issue 5, H100): SD-1.5 to 4K in <= 20 s, to 16K in <= 4 minutes, 16K
peak memory < 80 GB.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_unet import SD15, SDXL, TINY  # noqa: E402
from gspn_diffusers import GSPNHighResPipeline, apply_gspn, remove_gspn  # noqa: E402
from gspn_diffusers.compat import from_pretrained_dtype  # noqa: E402
from common import save_json  # noqa: E402


def random_pipeline(unet_config, folder: Path, device, dtype):
    """A pipeline of the architecture with random weights (saved and loaded
    like a real checkpoint)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gspn_diffusers.tokenizer import word_level_tokenizer

    tiny = unet_config is TINY
    width = unet_config["cross_attention_dim"]
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    tokenizer = word_level_tokenizer("a photo of an astronaut riding a horse".split())
    text = dict(vocab_size=len(tokenizer), intermediate_size=4 * 32, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    components = {"tokenizer": tokenizer, "scheduler": DDIMScheduler(steps_offset=1, clip_sample=False)}
    if sdxl:
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(hidden_size=768, **text))
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, projection_dim=1280, **text))
        components["tokenizer_2"] = tokenizer
    else:
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(hidden_size=width, **text))
    vae_channels = (16, 32) if tiny else (128, 256, 512, 512)
    components["vae"] = AutoencoderKL(
        block_out_channels=vae_channels, latent_channels=4, norm_num_groups=8 if tiny else 32,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels), up_block_types=("UpDecoderBlock2D",) * len(vae_channels))
    components["unet"] = UNet2DConditionModel(**unet_config)
    pipe = GSPNHighResPipeline(**components)
    pipe.save_pretrained(folder)
    return GSPNHighResPipeline.from_pretrained(folder, **from_pretrained_dtype(dtype)).to(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--sd15-extra", type=int, nargs="*", default=[16384])
    parser.add_argument("--sdpa-max-px", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny architecture, 128-256 px")
    parser.add_argument("--json", type=Path, default=Path("bench_results/bench_e2e.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "dtype": str(dtype), "rows": []}
    plans = {"sd15": (SD15, args.sizes + args.sd15_extra), "sdxl": (SDXL, args.sizes)}
    if args.quick:
        plans = {"tiny": (TINY, [128, 256])}
        args.steps = min(args.steps, 4)
    for model, (config, sizes) in plans.items():
        if not args.quick and model not in args.models:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            pipe = random_pipeline(config, Path(tmp), device, dtype)
            pipe.set_progress_bar_config(disable=True)
            for px in sizes:
                for variant in ("gspn", "sdpa"):
                    if variant == "sdpa" and px > args.sdpa_max_px:
                        continue
                    if variant == "gspn":
                        apply_gspn(pipe, init="scratch")
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    started = time.perf_counter()
                    try:
                        out = pipe("a photo of an astronaut riding a horse", width=px, height=px,
                                   num_inference_steps=args.steps, generator=torch.Generator(device).manual_seed(0),
                                   output_type="np")
                        seconds = time.perf_counter() - started
                        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                        stages = [dataclass_row(s) for s in out.stages]
                        del out
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                        seconds, peak, stages = None, f"failed: {str(exc).splitlines()[0]}", []
                    remove_gspn(pipe)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    row = {"model": model, "px": px, "variant": variant, "seconds": seconds, "peak_GiB": peak,
                           "stages": stages}
                    results["rows"].append(row)
                    print(f"{model:>5} {px:>6} px {variant:>5}: "
                          f"{'%.1f s' % seconds if seconds is not None else peak}  peak {peak}", flush=True)
            del pipe
    save_json(args.json, results)
    return 0


def dataclass_row(stage) -> dict:
    return {"width": stage.width, "height": stage.height, "steps": stage.steps, "seconds": stage.seconds,
            "peak_GiB": stage.peak_memory_gib}


if __name__ == "__main__":
    sys.exit(main())
