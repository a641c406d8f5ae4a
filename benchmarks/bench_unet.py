"""One UNet denoising step: SDPA attention vs GSPN vs self-attention skipped
(the floor no replacement can beat), measured in the same run, with peak
memory. SD-1.5 and SDXL architectures from their public configs with random
weights (timing does not depend on the weights). Not a test.

    python benchmarks/bench_unet.py                           # GPU: fp16, 1024-8192 px (16384 for SD-1.5)
    python benchmarks/bench_unet.py --device cpu --quick      # smoke run of the script itself

Writes JSON and, when matplotlib is installed, a PNG plot (latency against
resolution, log scale). Targets (issue 3, H100): GSPN within 1.10x of the
floor from 2048 px, peak memory within 1.10x of the floor's, 16384 px SD-1.5
fitting in 80 GB.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gspn_diffusers import apply_gspn, remove_gspn  # noqa: E402
from common import median_ms, save_json  # noqa: E402

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
TINY = dict(  # --quick: the script's own smoke test on a CPU
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=8,
)


class SkipSelfAttention:
    """Attention processor that contributes nothing: the floor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return hidden_states.new_zeros(())


def unet_inputs(config, latent, device, dtype):
    sample = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, config["cross_attention_dim"], device=device, dtype=dtype)}
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], device=device, dtype=dtype),
        }
    return sample, torch.tensor([500], device=device), kwargs


def timed(device, fn, repeats):
    """(median ms, peak GiB) of fn()."""
    if device.type == "cuda":
        fn()  # warm-up outside the peak measurement: kernels, allocator, cuDNN plans
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(device, fn, repeats, warmup=0 if device.type == "cuda" else 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return ms, peak


def set_self_attention(unet, processor_factory):
    from diffusers.models.attention import BasicTransformerBlock

    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock) and not module.attn1.is_cross_attention:
            module.attn1.set_processor(processor_factory())


def run_model(name, config, sizes, args, device, dtype, results):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    for px in sizes:
        latent = px // 8
        sample, t, kwargs = unet_inputs(config, latent, device, dtype)
        row = {"model": name, "px": px, "latent": latent}
        repeats = args.repeats if px <= 4096 else max(1, args.repeats // 2)
        variants = [("floor", lambda: set_self_attention(unet, SkipSelfAttention))]
        variants.append(("gspn", lambda: apply_gspn(unet, **args.gspn_options)))
        if px <= args.sdpa_max_px:
            variants.append(("sdpa", lambda: set_self_attention(unet, AttnProcessor2_0)))
        for variant, prepare in variants:
            prepare()
            try:
                with torch.inference_mode():
                    ms, peak = timed(device, lambda: unet(sample, t, **kwargs), repeats)
                row[f"{variant}_ms"], row[f"{variant}_peak_GiB"] = ms, peak
            except torch.cuda.OutOfMemoryError:
                row[f"{variant}_ms"], row[f"{variant}_peak_GiB"] = None, "OOM"
            finally:
                remove_gspn(unet)
                set_self_attention(unet, AttnProcessor2_0)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if row.get("floor_ms") and row.get("gspn_ms"):
            row["gspn_over_floor"] = row["gspn_ms"] / row["floor_ms"]
        results["rows"].append(row)
        print(
            f"{name:>6} {px:>6} px  floor {row.get('floor_ms') or float('nan'):>10.1f} ms  "
            f"gspn {row.get('gspn_ms') or float('nan'):>10.1f} ms  sdpa {row.get('sdpa_ms') or float('nan'):>10.1f} ms  "
            f"gspn/floor {row.get('gspn_over_floor', float('nan')):.2f}  "
            f"peak floor/gspn {row.get('floor_peak_GiB')}/{row.get('gspn_peak_GiB')} GiB",
            flush=True,
        )
    del unet


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, model in zip(axes, ("sd15", "sdxl")):
        rows = [r for r in results["rows"] if r["model"] == model]
        for variant in ("sdpa", "gspn", "floor"):
            pts = [(r["px"], r[f"{variant}_ms"]) for r in rows if r.get(f"{variant}_ms")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set(xscale="log", yscale="log", xlabel="image side (px)", ylabel="ms per UNet step", title=model)
        ax.legend()
    fig.suptitle(f"{results['device']}, {results['dtype']}, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--sd15-extra", type=int, nargs="*", default=[16384], help="sizes for SD-1.5 only")
    parser.add_argument("--sdpa-max-px", type=int, default=4096, help="SDPA above this takes minutes per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--proxy-dim", type=float, default=None, help="fraction of the width (default 1/8)")
    parser.add_argument("--quick", action="store_true", help="tiny UNet, small sizes: checks the script runs")
    parser.add_argument("--json", type=Path, default=Path("bench_results/bench_unet.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    args.gspn_options = {"chunk": args.chunk, "init": "scratch"}
    if args.proxy_dim is not None:
        args.gspn_options["proxy_dim"] = args.proxy_dim
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "dtype": str(dtype), "torch": torch.__version__, "options": args.gspn_options, "rows": []}
    if args.quick:
        run_model("sd15", TINY, [64, 128], args, device, dtype, results)
    else:
        configs = {"sd15": SD15, "sdxl": SDXL}
        for model in args.models:
            sizes = args.sizes + (args.sd15_extra if model == "sd15" else [])
            run_model(model, configs[model], sizes, args, device, dtype, results)
    save_json(args.json, results)
    plot(results, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
