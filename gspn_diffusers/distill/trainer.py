"""The accelerate loop of GSPN distillation (one process, many GPUs, many nodes).

Teacher and student are one denoiser: the frozen base weights are shared and
only the self-attention processors differ (see ``teacher.teacher_mode``), so
distillation needs one copy of the model. Each step runs the teacher once
(recording every attention output) and the student once (recording every
GSPN output) on the same noisy latents.

Never lose progress: checkpoints are written to a temporary folder and renamed
when complete, hold only the GSPN weights plus optimizer, scheduler, EMA and
RNG state, and ``--resume_from_checkpoint latest`` continues bit-exactly
(batches are a function of the step, not of a data iterator's state). A
non-finite loss stops the run before anything is saved from that step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import losses
from .config import describe, gspn_options, parse_args
from .data import cache_key, load_cache, sample_batch, save_cache
from .teacher import FeatureRecorder, build_training_data, family_of, teacher_latents_per_bucket, teacher_mode

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "complete"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


def check_model(args) -> None:
    """Fail before loading weights if the checkpoint has nothing GSPN can replace."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    from ..integration import UnsupportedModelError, find_self_attentions

    try:
        index = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    except Exception as exc:
        raise SystemExit(f"distill: cannot read the pipeline at {args.pretrained_model_name_or_path}: {exc}") from exc
    folder = next((k for k in ("unet", "transformer") if k in index), None)
    if folder is None:
        raise SystemExit(f"distill: {args.pretrained_model_name_or_path} has no unet or transformer to distil")
    cls = getattr(diffusers, index[folder][1])
    config = cls.load_config(args.pretrained_model_name_or_path, subfolder=folder, revision=args.revision)
    with init_empty_weights():
        model = cls.from_config(config)
    try:
        found = find_self_attentions(model, args.layers)
    except UnsupportedModelError as exc:
        raise SystemExit(f"distill: {exc}") from exc
    if not found:
        raise SystemExit(f"distill: {cls.__name__} has no self-attention matching --layers {args.layers}")


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, if any."""
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _image_grid(rows: List[list]):
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


def train(args) -> Path:
    """Run distillation; returns the adapter folder (``--output_dir``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..compat import from_pretrained_dtype
    from ..integration import apply_gspn, gspn_layers, save_gspn_adapter

    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("distill: --report_to tensorboard needs `pip install tensorboard` (or pass --report_to none)")
    accelerator = Accelerator(
        # Without an accelerator, cpu=True is what makes accelerate join a
        # multi-process CPU launch (torchrun) instead of running each alone.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    main = accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.print(f"distill: {describe(args)}")

    # ---- models -------------------------------------------------------------
    index = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    pipe = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, **from_pretrained_dtype(weight_dtype), **extra
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    family = family_of(pipe)

    # ---- data (built once by the main process, cached for the rest and for resumes)
    key = cache_key(args, f"{args.pretrained_model_name_or_path}@{args.revision}")
    cache = output_dir / "cache"
    with accelerator.main_process_first():
        data = load_cache(cache, key)
        if data is None:
            generating = args.train_data_dir is None and args.data_free_latents == "trajectory"
            total = teacher_latents_per_bucket(args) * len(args.resolutions) if generating else None
            bar = tqdm(desc="preparing latents", total=total, disable=not main)
            data = build_training_data(pipe, family, args, progress=bar.update)
            bar.close()
            if main:
                save_cache(cache, key, data)
    if args.max_train_steps is None:
        per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        args.max_train_steps = args.num_train_epochs * math.ceil(data.num_samples / per_step)

    # ---- student ------------------------------------------------------------
    torch.manual_seed(args.seed)  # identical fresh layers on every process
    apply_gspn(pipe, **gspn_options(args))
    layers = gspn_layers(pipe)
    for layer in layers.values():
        layer.float().requires_grad_(True).train()
    params = [p for layer in layers.values() for p in layer.parameters()]
    denoiser = family.denoiser
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    recorder = FeatureRecorder(pipe)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay)
        ema.to(device)
    model, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # Checkpoints hold the GSPN weights only, as an adapter, not the frozen base.
    def save_hook(models, weights, folder):
        if main:
            save_gspn_adapter(pipe, Path(folder) / "gspn")
        weights.clear()

    def load_hook(models, folder):
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / "gspn" / "gspn_adapter.safetensors"))
        for name, layer in layers.items():
            prefix = f"{name}."
            layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    checkpoints = output_dir / "checkpoints"
    global_step = 0
    if args.resume_from_checkpoint:
        path = latest_checkpoint(checkpoints) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if path is None:
            accelerator.print("distill: no complete checkpoint to resume from; starting from step 0")
        else:
            if not (path / COMPLETE_MARKER).exists():
                raise SystemExit(f"distill: {path} is not a complete checkpoint")
            accelerator.load_state(str(path))
            global_step = int(path.name[len(CHECKPOINT_PREFIX):])
            accelerator.print(f"distill: resumed from {path} at step {global_step}")

    def save_checkpoint(step: int) -> None:
        final = checkpoints / f"{CHECKPOINT_PREFIX}{step}"
        partial = checkpoints / f".partial-{CHECKPOINT_PREFIX}{step}"
        if main and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if main:
            (partial / COMPLETE_MARKER).write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            done = sorted((p for p in checkpoints.glob(f"{CHECKPOINT_PREFIX}*")),
                          key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
            for old in done[: max(0, len(done) - args.checkpoints_total_limit)]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    teacher_images = None

    def run_validation(step: int) -> None:
        nonlocal teacher_images
        prompts = args.validation_prompts or data.prompts[:4]
        width, height = args.resolutions[0]

        def images():
            gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
            with torch.no_grad(), accelerator.autocast():
                return pipe(prompt=prompts, width=width, height=height, generator=gens,
                            num_inference_steps=args.validation_inference_steps,
                            **family.extra_sampling_kwargs()).images

        for layer in layers.values():
            layer.eval()
        if teacher_images is None:
            with teacher_mode(pipe):
                teacher_images = images()
        student_images = images()
        for layer in layers.values():
            layer.train()
        folder = output_dir / "validation"
        folder.mkdir(exist_ok=True)
        _image_grid([teacher_images, student_images]).save(folder / f"step-{step:06d}.png")

    # ---- loop ---------------------------------------------------------------
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    weights = {"noise": args.noise_loss_weight, "output": args.output_loss_weight, "feature": args.feature_loss_weight}
    if report_to:
        accelerator.init_trackers("gspn-distill", config={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))})
    log_file = None
    if main:
        (output_dir / args.logging_dir).mkdir(parents=True, exist_ok=True)
        log_file = open(output_dir / args.logging_dir / "losses.jsonl", "a")
    seen = hashlib.sha256()
    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    bar = tqdm(total=args.max_train_steps, initial=global_step, desc="distill", disable=not main)
    unwrapped = accelerator.unwrap_model(model)
    try:
        while global_step < args.max_train_steps:
            started = time.perf_counter()
            for micro in range(args.gradient_accumulation_steps):
                batch = sample_batch(data, args.train_batch_size, family.latent_shape, num_timesteps, args.seed,
                                     global_step, micro, accelerator.process_index, args.uncond_prob)
                seen.update(batch.prompt_rows.numpy().tobytes() + batch.timesteps.numpy().tobytes())
                noise = batch.noise.to(device, weight_dtype)
                timesteps = batch.timesteps.to(device)
                target = None
                if batch.latents is not None:
                    clean = batch.latents.to(device, weight_dtype)
                    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                    if data.has_images:
                        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                            noise_scheduler.get_velocity(clean, noise, timesteps)
                else:
                    noisy = noise
                cond = {k: v[batch.prompt_rows].to(device, weight_dtype if v.is_floating_point() else v.dtype)
                        for k, v in data.embeds.items()}
                size = (batch.bucket.width, batch.bucket.height)
                with accelerator.accumulate(model):
                    with torch.no_grad(), teacher_mode(pipe), accelerator.autocast():
                        recorder.take()
                        teacher_out = family.forward(unwrapped, noisy, timesteps, cond, *size)
                        teacher_features = recorder.take()
                    student_out = family.forward(model, noisy, timesteps, cond, *size)
                    terms = losses.distillation_loss(
                        student_out, teacher_out, recorder.take(), teacher_features, weights,
                        noise_pred=family.noise_prediction(student_out) if target is not None else None, target=target,
                    )
                    bad = torch.tensor(0.0 if torch.isfinite(terms["loss"]) else 1.0, device=device)
                    if accelerator.num_processes > 1:
                        bad = accelerator.reduce(bad, "sum")
                    if bad.item() > 0:
                        raise NonFiniteLoss(
                            f"the loss became {terms['loss'].item()} at step {global_step + 1} "
                            f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())})"
                        )
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if ema is not None:
                ema.step(params)
            record = {"step": global_step, "lr": lr_scheduler.get_last_lr()[0],
                      **{k: round(v.item(), 8) for k, v in terms.items()}}
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{record['loss']:.4g}", feature=f"{record['feature']:.4g}",
                            samples_s=f"{samples_per_step / elapsed:.1f}")
            bar.update(1)
            if report_to:
                accelerator.log({f"loss/{k}" if k != "lr" else k: v for k, v in record.items() if k != "step"},
                                step=global_step)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                save_checkpoint(global_step)
            if args.validation_steps and global_step % args.validation_steps == 0:
                if main:
                    run_validation(global_step)
                accelerator.wait_for_everyone()
    except NonFiniteLoss as exc:
        last = latest_checkpoint(checkpoints)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise SystemExit(
            f"distill: stopped: {exc}. Nothing from this step was saved; {kept} "
            f"(resume with --resume_from_checkpoint latest). Try a lower --learning_rate, "
            f"--mixed_precision bf16 instead of fp16, or a smaller --max_grad_norm."
        ) from exc
    finally:
        bar.close()
        if log_file:
            log_file.close()

    # ---- result: the output folder is the adapter --------------------------
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    print(f"distill: rank {accelerator.process_index}: data {seen.hexdigest()[:16]} weights {_digest(params)}",
          flush=True)
    if main:
        save_gspn_adapter(pipe, output_dir)
        (output_dir / "training_args.json").write_text(describe(args) + "\n")
        print(f"distill: adapter written to {output_dir} (load with apply_gspn(pipe, adapter='{output_dir}'))")
    if ema is not None:
        ema.restore(params)
    recorder.close()
    accelerator.end_training()
    return output_dir


def main(argv: Optional[Sequence[str]] = None, prog: str = "distill.py") -> int:
    """Entry point of ``distill/distill.py`` and ``gspn-diffusers distill``."""
    from accelerate.state import AcceleratorState

    args = parse_args(argv, prog)
    check_model(args)
    try:
        train(args)
    finally:
        # accelerate keeps one state per process; clear it so a later run in
        # the same interpreter (a notebook, a test) may use other settings.
        AcceleratorState._reset_state()
    return 0
