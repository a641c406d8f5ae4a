"""Throughput and peak memory of one distillation step (teacher forward +
student forward/backward + AdamW on the GSPN weights), for the SD-1.5
architecture at 512 px and SDXL at 1024 px, random weights. Not a test.

    python benchmarks/bench_distill.py                      # GPU, bf16
    python benchmarks/bench_distill.py --device cpu --quick # smoke run of the script

Prints samples/s, peak GiB and what one GPU-day buys (steps x batch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_unet import SD15, SDXL, TINY, unet_inputs  # noqa: E402
from gspn_diffusers import apply_gspn, gspn_layers  # noqa: E402
from gspn_diffusers.distill.losses import distillation_loss  # noqa: E402
from gspn_diffusers.distill.teacher import FeatureRecorder, teacher_mode  # noqa: E402
from common import median_ms, save_json  # noqa: E402

CASES = {"sd15": (SD15, 512, [8]), "sdxl": (SDXL, 1024, [1, 2])}


def bench(name, config, px, batch, args, device, results):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    apply_gspn(unet, init="scratch")
    params = [p for layer in gspn_layers(unet).values() for p in layer.float().requires_grad_(True).parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    recorder = FeatureRecorder(unet)
    sample, t, kwargs = unet_inputs(config, px // 8, device, dtype)
    sample = sample.expand(batch, -1, -1, -1).contiguous()
    kwargs = {k: (v.expand(batch, *v.shape[1:]) if torch.is_tensor(v) else
                  {kk: vv.expand(batch, *vv.shape[1:]) for kk, vv in v.items()}) for k, v in kwargs.items()}
    weights = {"output": 0.5, "feature": 0.5}

    def step():
        with torch.no_grad(), teacher_mode(unet), torch.autocast(device.type, dtype=dtype):
            teacher = unet(sample, t, **kwargs).sample
            teacher_features = recorder.take()
        with torch.autocast(device.type, dtype=dtype):
            student = unet(sample, t, **kwargs).sample
        loss = distillation_loss(student, teacher, recorder.take(), teacher_features, weights)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(device, step, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    row = {"model": name, "px": px, "batch": batch, "ms": ms, "samples_per_s": batch / ms * 1e3, "peak_GiB": peak,
           "trainable_params": sum(p.numel() for p in params),
           "gpu_day_steps": int(86400e3 / ms), "gpu_day_samples": int(86400e3 / ms) * batch}
    results["rows"].append(row)
    print(f"{name:>5} {px:>5} px batch {batch}: {ms:8.1f} ms/step  {row['samples_per_s']:7.2f} samples/s  "
          f"peak {peak:.1f} GiB  one GPU-day: {row['gpu_day_steps']} steps x {batch} = {row['gpu_day_samples']} samples",
          flush=True)
    recorder.close()
    del unet, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny UNet at 128 px: checks the script runs")
    parser.add_argument("--json", type=Path, default=Path("bench_results/bench_distill.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "rows": []}
    if args.quick:
        bench("tiny", TINY, 128, 2, args, device, results)
    else:
        for model in args.models:
            config, px, batches = CASES[model]
            for batch in batches:
                bench(model, config, px, batch, args, device, results)
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
