"""Small measured ablation of the GSPN layer's options on the shapes-world
teacher: each variant is distilled the same way, then scored by its final
per-layer distillation loss and by the student's prompt adherence on
held-out prompts. Not a test.

    python benchmarks/ablation.py --steps 600 --prompts 48

Variants: global vs local (chunk 4, the published text-to-image setting)
scans, and the proxy width (1/8 vs 1/4 of each layer's channels).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save_json  # noqa: E402
from fidelity import generate  # noqa: E402
from gspn_diffusers import apply_gspn  # noqa: E402
from gspn_diffusers.compat import from_pretrained_dtype  # noqa: E402
from gspn_diffusers.distill import main as distill  # noqa: E402
from gspn_diffusers.shapes import adherence, held_out_scenes  # noqa: E402
from gspn_diffusers.shapes.assets import TEACHER_DIR  # noqa: E402
from gspn_diffusers.shapes.prompts import training_prompts  # noqa: E402

VARIANTS = {
    "global, proxy 1/8": [],
    "chunk 4, proxy 1/8": ["--chunk", "4"],
    "global, proxy 1/4": ["--proxy_dim", "0.25"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=TEACHER_DIR)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts for adherence")
    parser.add_argument("--json", type=Path, default=Path("bench_results/ablation.json"))
    args = parser.parse_args(argv)
    from diffusers import DiffusionPipeline

    results = {"teacher": str(args.teacher), "steps": args.steps, "variants": {}}
    scenes = held_out_scenes(args.prompts)
    captions = [s.caption for s in scenes]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(training_prompts(256)) + "\n")
        for name, extra in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "_").replace(",", "").replace("/", "-")
            distill(["--pretrained_model_name_or_path", str(args.teacher), "--output_dir", str(out),
                     "--prompts_file", str(prompts), "--resolution", "64", "--max_train_steps", str(args.steps),
                     "--train_batch_size", "16", "--learning_rate", "1e-3", "--lr_warmup_steps", "50",
                     "--teacher_steps", "20", "--teacher_guidance_scale", "5", "--report_to", "none",
                     "--checkpointing_steps", str(args.steps + 1), "--seed", "0", *extra])
            log = [json.loads(line) for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]
            pipe = DiffusionPipeline.from_pretrained(args.teacher, **from_pretrained_dtype(torch.float32))
            pipe.set_progress_bar_config(disable=True)
            apply_gspn(pipe, adapter=out)
            images = generate(pipe, captions, list(range(len(captions))), pipe.unet.config.sample_size * 4, 25, 5.0)
            results["variants"][name] = {
                "final_feature_loss": float(np.mean([r["feature"] for r in log[-20:]])),
                "final_output_loss": float(np.mean([r["output"] for r in log[-20:]])),
                "adherence": adherence(images, captions),
            }
            r = results["variants"][name]
            print(f"{name:>22}: feature {r['final_feature_loss']:.4f}  output {r['final_output_loss']:.4f}  "
                  f"adherence {r['adherence']['correct']:.2f}", flush=True)
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
