"""Distillation on tiny pipelines: data-free and image modes, resumability,
two processes, and the failure modes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_pipelines
from gspn_diffusers import apply_gspn, gspn_layers
from gspn_diffusers.distill import main as distill_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "distill" / "distill.py"
PROMPTS = [
    "a red circle at the top left", "a blue square at the bottom right", "a green triangle at the top",
    "a yellow circle at the left", "a red square at the bottom", "a blue triangle at the right",
]


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    return tiny_pipelines.build_sd(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def base_args(model, out, prompts=None, steps=30, *extra):
    args = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--resolution", "32", "48x32",
            "--max_train_steps", str(steps), "--train_batch_size", "2", "--teacher_steps", "3",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "7"]
    if prompts is not None:
        args += ["--prompts_file", str(prompts)]
    return args + list(extra)


def losses(out):
    return [json.loads(line) for line in (Path(out) / "logs" / "losses.jsonl").read_text().splitlines()]


def assert_loadable(model, out):
    pipe = tiny_pipelines.load("sd", model)
    apply_gspn(pipe, adapter=out)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert np.isfinite(image).all()
    return pipe


def test_data_free_distillation_learns_and_writes_an_adapter(sd_model, prompts_file, tmp_path):
    out = tmp_path / "adapter"
    assert distill_main(base_args(sd_model, out, prompts_file, 40, "--validation_steps", "20",
                                  "--validation_inference_steps", "2", "--use_ema", "--ema_decay", "0.5")) == 0
    log = losses(out)
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = (np.mean([r["feature"] for r in log[s]]) for s in (slice(0, 10), slice(-10, None)))
    assert last < 0.7 * first, f"per-layer loss did not fall: {first:.4g} -> {last:.4g}"
    assert "noise" not in log[0], "no noise-prediction loss without images"
    assert (out / "validation" / "step-000020.png").exists() and (out / "validation" / "step-000040.png").exists()
    assert (out / "cache" / "data.safetensors").exists()
    assert_loadable(sd_model, out)


def make_image_folder(folder: Path, metadata: bool) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir()
    rows = []
    for i, caption in enumerate(PROMPTS):
        image = Image.new("RGB", (40 + 8 * (i % 2), 40), "white")
        colour = caption.split()[1]
        ImageDraw.Draw(image).ellipse((5 + 3 * i, 5, 25 + 3 * i, 25), fill=colour)
        image.save(folder / f"img{i}.png")
        if metadata:
            rows.append(json.dumps({"file_name": f"img{i}.png", "text": caption}))
        else:
            (folder / f"img{i}.txt").write_text(caption)
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("layout", ["txt", "metadata", "datasets"])
def test_image_distillation(sd_model, tmp_path, layout):
    folder = make_image_folder(tmp_path / "images", metadata=layout == "metadata")
    if layout == "datasets":
        datasets = pytest.importorskip("datasets")
        from PIL import Image

        items = [{"image": Image.open(p), "text": p.with_suffix(".txt").read_text()} for p in sorted(folder.glob("*.png"))]
        folder = tmp_path / "ds"
        datasets.Dataset.from_list(items).cast_column("image", datasets.Image()).save_to_disk(str(folder))
    out = tmp_path / "adapter"
    steps = 30 if layout == "txt" else 6
    # The random teacher cannot predict the true noise; a full-weight noise term
    # would swamp the distillation terms this test watches fall.
    assert distill_main(base_args(sd_model, out, None, steps, "--train_data_dir", str(folder),
                                  "--noise_loss_weight", "0.05")) == 0
    log = losses(out)
    assert len(log) == steps and all(r["noise"] > 0 for r in log), "image data adds the noise-prediction loss"
    if layout == "txt":
        first, last = (np.mean([r["feature"] for r in log[s]]) for s in (slice(0, 10), slice(-10, None)))
        assert last < 0.7 * first, f"per-layer loss did not fall: {first:.4g} -> {last:.4g}"
    assert_loadable(sd_model, out)


def test_epochs_set_the_step_count(sd_model, prompts_file, tmp_path):
    """--num_train_epochs without --max_train_steps: passes over the cached latents."""
    out = tmp_path / "adapter"
    argv = base_args(sd_model, out, prompts_file, 1)
    i = argv.index("--max_train_steps")
    del argv[i:i + 2]
    assert distill_main(argv + ["--num_train_epochs", "2"]) == 0
    # 6 prompts x 2 buckets = 12 latents; 2 per step -> 6 steps per epoch
    assert [r["step"] for r in losses(out)] == list(range(1, 13))


def test_bad_arguments_fail_before_any_model_loads(sd_model, prompts_file, tmp_path, monkeypatch):
    import diffusers

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", forbidden)
    unreadable = tmp_path / "bad.txt"
    unreadable.write_bytes(b"\xff\xfe\x00bad")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (base_args(tmp_path / "nope", tmp_path / "o", prompts_file), "no such folder"),
        (base_args(sd_model, tmp_path / "o", tmp_path / "missing.txt"), "cannot read it"),
        (base_args(sd_model, tmp_path / "o", unreadable), "cannot read it"),
        (base_args(sd_model, tmp_path / "o", empty), "no prompts in it"),
        (base_args(sd_model, tmp_path / "o", prompts_file, 0), "--max_train_steps must be positive"),
        (base_args(sd_model, tmp_path / "o"), "give --prompts_file"),
        (base_args(sd_model, tmp_path / "o", prompts_file, 5, "--train_data_dir", str(tmp_path / "none")), "no such folder"),
        (base_args(sd_model, tmp_path / "o", prompts_file, 5, "--resolution", "0x3"), "--resolution '0x3'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            distill_main(argv)


def test_model_without_self_attention_fails_before_weights_load(tmp_path, prompts_file, monkeypatch):
    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, text_encoder = tiny_pipelines._clip_text()
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, mid_block_type=None)
    StableDiffusionPipeline(vae=tiny_pipelines._vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "noattn")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the model was checked"))
    with pytest.raises(SystemExit, match="has no self-attention"):
        distill_main(base_args(tmp_path / "noattn", tmp_path / "o", prompts_file))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(sd_model, prompts_file, tmp_path, monkeypatch):
    from gspn_diffusers.distill import losses as loss_module

    real = loss_module.distillation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(loss_module, "distillation_loss", poisoned)
    out = tmp_path / "adapter"
    with pytest.raises(SystemExit, match=r"loss became nan at step 5.*checkpoint-4"):
        distill_main(base_args(sd_model, out, prompts_file, 10, "--checkpointing_steps", "2"))
    assert (out / "checkpoints" / "checkpoint-4" / "complete").exists()
    assert not (out / "gspn_adapter.safetensors").exists(), "no adapter from a failed run"


def run_script(*argv, env=None, **popen):
    cmd = [sys.executable, str(SCRIPT), *map(str, argv)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, **popen)


def test_sigkill_and_resume_is_bit_exact(sd_model, prompts_file, tmp_path):
    steps, every = 60, 10
    args = lambda out, *extra: base_args(sd_model, out, prompts_file, steps, "--checkpointing_steps", str(every), *extra)
    reference = run_script(*args(tmp_path / "whole"))
    out_ref, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out_ref[-3000:]

    out = tmp_path / "killed"
    victim = run_script(*args(out))
    deadline = time.time() + 600
    while not (out / "checkpoints" / f"checkpoint-{every}" / "complete").exists():
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    steps_before = max(r["step"] for r in losses(out))
    assert steps_before < steps, "the run finished before it could be killed"

    resumed = run_script(*args(out, "--resume_from_checkpoint", "latest"))
    text, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, text[-3000:]
    start = int(re.search(r"resumed from .*checkpoint-(\d+) at step", text).group(1))
    assert steps_before - start <= every, "more than one checkpoint interval was lost"
    a, b = load_file(str(tmp_path / "whole" / "gspn_adapter.safetensors")), load_file(str(out / "gspn_adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def test_two_processes_see_different_data_and_end_identical(sd_model, prompts_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(SCRIPT), *base_args(sd_model, out, prompts_file, 8)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # The ranks print at once, so a report may run into the next line's text.
    found = re.findall(r"rank (\d): data ([0-9a-f]{16}) weights ([0-9a-f]{16})", proc.stdout + proc.stderr)
    data = {rank: d for rank, d, _ in found}
    weights = {rank: w for rank, _, w in found}
    assert set(data) == {"0", "1"}
    assert data["0"] != data["1"], "each process must see different data"
    assert weights["0"] == weights["1"], "processes must end with identical weights"
    assert (out / "gspn_adapter.safetensors").exists()


def test_cli_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "gspn_diffusers.cli", "distill", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0
    for option in ("--pretrained_model_name_or_path", "--output_dir", "--prompts_file", "--train_data_dir",
                   "--resolution", "--train_batch_size", "--max_train_steps", "--learning_rate",
                   "--checkpointing_steps", "--resume_from_checkpoint", "--mixed_precision", "--seed",
                   "--gradient_checkpointing", "--use_ema", "--feature_loss_weight", "--validation_steps"):
        assert option in proc.stdout, option
    assert proc.stdout.startswith("usage: gspn-diffusers distill")


def test_bf16_checkpointing_accumulation_and_tensorboard(sd_model, prompts_file, tmp_path):
    out = tmp_path / "adapter"
    argv = base_args(sd_model, out, prompts_file, 4, "--mixed_precision", "bf16", "--gradient_checkpointing",
                     "--gradient_accumulation_steps", "2")
    argv[argv.index("--report_to") + 1] = "tensorboard"
    assert distill_main(argv) == 0
    assert len(losses(out)) == 4
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    config = json.loads((out / "gspn_adapter.json").read_text())
    assert config["base_model"] == "UNet2DConditionModel"


def test_buckets_match_aspect_then_size():
    from PIL import Image

    from gspn_diffusers.distill.data import nearest_bucket

    squares = [(64, 64), (128, 128)]
    assert nearest_bucket(Image.new("RGB", (64, 64)), squares) == 0
    assert nearest_bucket(Image.new("RGB", (120, 120)), squares) == 1
    sizes = [(64, 64), (128, 64), (256, 128)]
    assert nearest_bucket(Image.new("RGB", (100, 50)), sizes) == 1  # aspect 2, nearer 128x64 in area
    assert nearest_bucket(Image.new("RGB", (300, 150)), sizes) == 2
    assert nearest_bucket(Image.new("RGB", (90, 100)), sizes) == 0  # the square is the nearest aspect
