"""The small text-to-image teacher of the shapes world, and its training.

A Stable-Diffusion-shaped pipeline small enough to train on a CPU: an
AutoencoderKL (factor 4: 64x64 images, 16x16 latents), a CLIP text encoder
over the world's words (in-memory word-level tokenizer), and a UNet with
self-attention at 16x16, 8x8 and 4x4. Training (accelerate: one CPU, one GPU or
several) first fits the VAE to world images, then the UNet and text encoder
with a v-prediction loss on a zero-terminal-SNR schedule and 10% caption
dropout for classifier-free guidance. Batches are a function of the step, so a run is
reproducible from its seed. A last stage teaches larger objects (what the
high-resolution pipeline asks of it): the VAE encoder on scenes rendered at
64-512 pixels, the denoiser on whole scenes at 64, 128 and 256 pixels.

    python -m gspn_diffusers.shapes.teacher --output_dir shapes-teacher
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..tokenizer import word_level_tokenizer
from .world import WORDS, sample_scene, render

IMAGE_SIZE = 64
MAX_TOKENS = 32  # the longest caption (three objects) has 24 words plus [BOS]/[EOS]
# Classifier-free guidance the shipped teacher samples best at. The shipped
# teacher on 200 validation prompts (held-out seeds 200-399, not the
# benchmark's 0-199), 25 steps, fully correct by the box-fill checker of the
# time: 0.66 at 1.0, 0.69 at 1.25, 0.715 at 1.5, 0.72 at 1.75, 0.725 at 2.0.
# An earlier teacher (96 prompts, 20 steps): 0.79 at 2.0, 0.65 at 3.0, 0.47
# at 5.0 -- strong guidance distorts objects a few latent pixels wide.
GUIDANCE_SCALE = 2.0


def build_teacher(prediction_type: str = "v_prediction", zero_terminal_snr: bool = True):
    """A freshly initialised teacher pipeline (random weights).

    The default noise schedule reaches zero SNR at the last timestep, which
    needs v-prediction (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed"). On 16x16 latents this matters: SD's schedule
    leaves ~7% of the image in the noisiest training input, enough for a small
    model to read the layout from that leak instead of the caption, so at
    sampling time (pure noise) objects land in random cells.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_level_tokenizer(WORDS, max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
        sample_size=IMAGE_SIZE, mid_block_add_attention=False)
    # Three levels (16x16, 8x8, 4x4 latents): the UNet has no positional
    # embedding, and the 4x4 level is where "top left" becomes easy to place.
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96, 128), down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=64, attention_head_dim=16,
        norm_num_groups=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                              rescale_betas_zero_snr=zero_terminal_snr,
                              timestep_spacing="trailing" if zero_terminal_snr else "leading")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def world_batch(step: int, batch_size: int, rank: int = 0, stream: int = 0, size: int = IMAGE_SIZE):
    """Images in [-1, 1] (B, 3, size, size) and captions of one training step."""
    seeds = [((stream * 1_000_003 + step) * 64 + rank) * batch_size + i for i in range(batch_size)]
    scenes = [sample_scene(s % 10**9) for s in seeds]
    images = np.stack([render(s, size) for s in scenes]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(images).permute(0, 3, 1, 2), [s.caption for s in scenes]


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    """``"64:16,128:4"`` -> [(64, 16), (128, 4)]: image side and scenes per step."""
    try:
        sizes = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or s[0] % 4 or s[0] <= 0 or s[1] <= 0 for s in sizes):
        raise ValueError(f"sizes {text!r}: expected SIDE:BATCH pairs separated by commas, sides multiples of 4 "
                         "(e.g. 64:16,128:4,256:2)")
    return sizes


def generate(pipe, prompts, seeds, size: int = IMAGE_SIZE, steps: int = 20, guidance_scale: float = GUIDANCE_SCALE,
             batch: int = 16, **kwargs):
    """uint8 (size, size, 3) images of ``prompts``, one seed each."""
    out = []
    for start in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch]]
        images = pipe(prompts[start:start + batch], width=size, height=size, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=gens, output_type="np", **kwargs).images
        out.extend((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return out


def evaluate_teacher(pipe, prompts: int = 64, steps: int = 20, guidance_scale: float = GUIDANCE_SCALE):
    """Held-out prompt adherence of a teacher pipeline (see :func:`~.checker.adherence`)."""
    from .checker import adherence
    from .world import held_out_scenes

    captions = [s.caption for s in held_out_scenes(prompts)]
    return adherence(generate(pipe, captions, list(range(prompts)), IMAGE_SIZE, steps, guidance_scale), captions)


def train_teacher(output_dir: Path, vae_steps: int = 3000, unet_steps: int = 30000, batch_size: int = 32,
                  vae_lr: float = 1e-3, unet_lr: float = 3e-4, seed: int = 0, log_every: int = 100,
                  mixed_precision: Optional[str] = None, ema_decay: float = 0.999, save_every: int = 0,
                  eval_prompts: int = 64, min_snr_gamma: Optional[float] = None,
                  warmup_steps: int = 500, vae_from: Optional[Path] = None,
                  prediction_type: str = "v_prediction", zero_terminal_snr: bool = True,
                  init_from: Optional[Path] = None, sizes: Optional[Sequence[Tuple[int, int]]] = None,
                  vae_multiscale_steps: int = 0, data_workers: Optional[int] = None) -> Path:
    """Train the teacher and save it as a diffusers pipeline in ``output_dir``.

    With ``save_every`` the pipeline (averaged weights) is also saved every so
    many UNet steps, so an interrupted run leaves a usable teacher behind; the
    held-out adherence of each save is printed when ``eval_prompts`` > 0.
    ``vae_from`` takes the VAE of a saved teacher (stage 1 skipped, the rest
    fresh). ``min_snr_gamma`` weights the loss so that its clean-image weight
    is min(SNR, gamma) (Min-SNR, Hang et al. 2023). ``prediction_type`` and
    ``zero_terminal_snr`` choose the noise schedule (see :func:`build_teacher`).

    Several object scales (what the high-resolution pipeline needs: a model
    that only ever saw objects 3-4 latent pixels wide repaints enlarged ones):
    ``init_from`` continues from a saved teacher (every module; stage 1
    skipped), ``vae_multiscale_steps`` first fine-tunes the VAE encoder on
    scenes rendered at 64-512 pixels (see :func:`finetune_vae_encoder`), and
    ``sizes`` [(side, scenes per step), ...] trains the denoiser on whole
    scenes rendered at each side (default: ``[(64, batch_size)]``).
    ``data_workers`` processes render the denoiser's scenes ahead (default: up
    to 8 on a GPU, none on a CPU).
    """
    from accelerate import Accelerator

    from ..compat import from_pretrained_dtype

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    torch.manual_seed(seed)
    pipe = build_teacher(prediction_type, zero_terminal_snr)
    if init_from is not None:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(init_from, **from_pretrained_dtype(torch.float32),
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
        vae_steps = 0
    elif vae_from is not None:
        from diffusers import AutoencoderKL

        pipe.register_modules(vae=AutoencoderKL.from_pretrained(vae_from, subfolder="vae",
                                                                    **from_pretrained_dtype(torch.float32)))
        vae_steps = 0
    vae = pipe.vae
    main = accelerator.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)

    sizes = list(sizes) if sizes else [(IMAGE_SIZE, batch_size)]

    # ---- 1. the autoencoder -------------------------------------------------
    if vae_steps:
        vae = _train_vae(vae, accelerator, vae_steps, batch_size, vae_lr, log_every, log)
    if vae_multiscale_steps:
        vae = finetune_vae_encoder(vae, accelerator, vae_multiscale_steps, log_every=log_every)
    pipe.register_modules(vae=vae)
    if unet_steps == 0:  # the autoencoder only: a pipeline whose VAE later runs reuse with vae_from
        if main:
            pipe.save_pretrained(output_dir)
        return output_dir
    # ---- 2. the denoiser ----------------------------------------------------
    return _train_denoiser(pipe, accelerator, output_dir, unet_steps, sizes, unet_lr, seed, log_every,
                           ema_decay, save_every, eval_prompts, min_snr_gamma, warmup_steps, data_workers)


def _train_vae(vae, accelerator, steps: int, batch_size: int, lr: float, log_every: int, log):
    """Stage 1: the autoencoder on reconstruction (and a light KL) over 64 px
    scenes; returns it frozen, its scaling factor set to unit latent std."""
    from tqdm.auto import tqdm

    device = accelerator.device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    bar = tqdm(range(steps), desc="vae", disable=not accelerator.is_main_process)
    for step in bar:
        images, _ = world_batch(step, batch_size, accelerator.process_index, stream=1)
        images = images.to(device)
        with accelerator.autocast():
            posterior = accelerator.unwrap_model(vae).encode(images).latent_dist
            recon = accelerator.unwrap_model(vae).decode(posterior.sample()).sample
            loss = F.mse_loss(recon.float(), images) + 1e-6 * posterior.kl().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False)
    with torch.no_grad():
        images, _ = world_batch(0, 256, stream=2)
        latents = vae.encode(images.to(device)).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"vae: final loss {loss.item():.4f}, scaling factor {vae.config.scaling_factor:.4f}")
    return vae


def finetune_vae_encoder(vae, accelerator, steps: int, lr: float = 2e-4, sides: Sequence[int] = (64, 128, 256, 512),
                         crop: int = 128, log_every: int = 100):
    """Fine-tune the VAE encoder on scenes rendered at several sizes.

    A VAE trained on 64-pixel scenes loses objects when it encodes them much
    larger (fully correct round trips 0.94 / 0.84 / 0.62 at 64 / 128 / 256
    pixels), which breaks pixel-space upscaling between high-res stages. Steps
    cycle through ``sides`` (32 scenes at 64 pixels, 8 random ``crop``-pixel
    crops above); only the encoder learns, so the decoder and the latent space
    the UNet was trained on stay, and at 64 pixels its latents are anchored to
    the original encoder's.
    """
    import copy

    from tqdm.auto import tqdm

    device = accelerator.device
    anchor = copy.deepcopy(vae).eval().requires_grad_(False)
    vae.requires_grad_(False)
    vae.encoder.requires_grad_(True)
    vae.quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    bar = tqdm(range(steps), desc="vae multi-scale", disable=not accelerator.is_main_process)
    for step in bar:
        side = sides[step % len(sides)]
        count = 32 if side <= IMAGE_SIZE else 8
        images, _ = world_batch(step, count, accelerator.process_index, stream=3, size=side)
        if side > crop:
            rng = np.random.default_rng(step)
            y, x = (int(v) for v in rng.integers(0, side - crop + 1, 2))
            images = images[:, :, y:y + crop, x:x + crop]
        images = images.to(device)
        posterior = vae.encode(images).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, images)
        if side <= IMAGE_SIZE:
            loss = loss + F.mse_loss(posterior.mean, anchor.encode(images).latent_dist.mean)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval().requires_grad_(False)


def _train_denoiser(pipe, accelerator, output_dir, unet_steps, sizes, unet_lr, seed, log_every, ema_decay,
                    save_every, eval_prompts, min_snr_gamma, warmup_steps, data_workers) -> Path:
    """Stage 2: UNet and text encoder on the noise-prediction loss (VAE frozen),
    over whole scenes at each (side, scenes per step) of ``sizes``."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    vae.eval().requires_grad_(False)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    device = accelerator.device
    main = accelerator.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=unet_lr, weight_decay=1e-2)
    lr_lambda = lambda s: (min(1.0, (s + 1) / max(1, warmup_steps))
                           * 0.5 * (1 + math.cos(math.pi * min(s, unet_steps) / unet_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    unet, text_encoder, optimizer, scheduler = accelerator.prepare(unet, text_encoder, optimizer, scheduler)
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=ema_decay)  # the same warm-up as distill's --use_ema

    def save(step):
        if not main:
            return
        ema.store(params)
        ema.copy_to(params)  # sample and save with the averaged weights
        pipe.unet = accelerator.unwrap_model(unet).eval()
        pipe.text_encoder = accelerator.unwrap_model(text_encoder).eval()
        pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder, vae=vae)
        output_dir.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(output_dir)
        if eval_prompts:
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad():
                scores = evaluate_teacher(pipe.to(device), eval_prompts)
            log(f"step {step}: held-out adherence " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        pipe.unet.train()
        pipe.text_encoder.train()
        ema.restore(params)
        log(f"teacher (step {step}) saved to {output_dir}")
    gen = torch.Generator().manual_seed(seed)
    loader = _step_batches(unet_steps, sizes, accelerator.process_index, data_workers, device)
    bar = tqdm(loader, desc="unet", disable=not main)
    started, running = time.perf_counter(), None
    total = sum(count for _, count in sizes)
    for step, batches in enumerate(bar):
        loss = 0.0
        for (side, count), (images, captions) in zip(sizes, batches):
            # one backward per size (latents of different sizes cannot share a batch);
            # each size's loss weighs by its share of the step's scenes
            part = _denoiser_loss(vae, unet, text_encoder, tokenizer, noise_scheduler, alphas_cumprod, accelerator,
                                  gen, min_snr_gamma, images, captions)
            accelerator.backward(part * (count / total))
            loss += part.item() * count / total
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        running = loss if running is None else 0.99 * running + 0.01 * loss
        if step % log_every == 0:
            bar.set_postfix(loss=f"{running:.4f}",
                            samples_s=f"{(step + 1) * total / (time.perf_counter() - started):.0f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < unet_steps:
            save(step + 1)
    accelerator.wait_for_everyone()
    save(unet_steps)
    log(f"final training loss {running:.4f}")
    return output_dir


class _WorldSteps(torch.utils.data.Dataset):
    """Item ``step``: the denoiser's (images, captions) of that step at each
    (side, count) of ``sizes`` -- a function of the step, so loader workers can
    render steps ahead without changing what a seed trains on."""

    def __init__(self, steps: int, sizes: Sequence[Tuple[int, int]], rank: int):
        self.steps, self.sizes, self.rank = steps, list(sizes), rank

    def __len__(self):
        return self.steps

    def __getitem__(self, step):
        return [world_batch(step, count, self.rank, stream=0 if index == 0 else 10 + index, size=side)
                for index, (side, count) in enumerate(self.sizes)]


def _step_batches(steps, sizes, rank, workers: Optional[int], device):
    """The denoiser's batches in step order. Rendering a step (~25 ms for 32
    scenes at 64 px) takes about as long as a GPU training step, so on a GPU
    worker processes render ahead; on a CPU they would take the cores the
    training needs (``workers=None`` picks accordingly)."""
    on_gpu = torch.device(device).type == "cuda"
    if workers is None:
        workers = min(8, (os.cpu_count() or 1) - 1) if on_gpu else 0
    return torch.utils.data.DataLoader(_WorldSteps(steps, sizes, rank), batch_size=None, shuffle=False,
                                       num_workers=workers, prefetch_factor=4 if workers else None,
                                       pin_memory=on_gpu)


def _denoiser_loss(vae, unet, text_encoder, tokenizer, noise_scheduler, alphas_cumprod, accelerator, gen,
                   min_snr_gamma, images, captions):
    """The v (or eps) prediction loss of one batch, with 10% caption dropout."""
    device = accelerator.device
    captions = ["" if torch.rand((), generator=gen) < 0.1 else c for c in captions]
    with torch.no_grad():
        clean = vae.encode(images.to(device)).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn(clean.shape, generator=gen).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=gen).to(device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with accelerator.autocast():
        cond = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, encoder_hidden_states=cond).sample
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(clean, noise, timesteps)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma:
            snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
            # the eps (v) loss weighs the clean-image error by SNR (SNR + 1)
            implied = snr if noise_scheduler.config.prediction_type == "epsilon" else snr + 1
            per_sample = per_sample * torch.clamp(snr, max=min_snr_gamma) / implied.clamp(min=1e-8)
        return per_sample.mean()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of the teacher recipe."""
    p = argparse.ArgumentParser(description="Train the shapes-world teacher (a tiny SD-like pipeline).")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--unet_steps", type=int, default=30000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--unet_lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--save_every", type=int, default=0, help="also save (and score) every N UNet steps")
    p.add_argument("--eval_prompts", type=int, default=64, help="held-out prompts scored at each save (0: none)")
    p.add_argument("--min_snr_gamma", type=float, default=None, help="Min-SNR loss weighting (e.g. 5)")
    p.add_argument("--vae_from", type=Path, default=None, help="reuse the VAE of a saved teacher (skips stage 1)")
    p.add_argument("--init_from", type=Path, default=None,
                   help="continue from a saved teacher (every module; skips stage 1)")
    p.add_argument("--sizes", type=str, default=None,
                   help="denoiser scenes per step at each side, e.g. 64:16,128:4,256:2 (default 64:batch_size)")
    p.add_argument("--vae_multiscale_steps", type=int, default=0,
                   help="fine-tune the VAE encoder on scenes rendered at 64-512 pixels first")
    p.add_argument("--warmup_steps", type=int, default=500)
    p.add_argument("--data_workers", type=int, default=None,
                   help="processes rendering training scenes ahead (default: up to 8 on a GPU, 0 on a CPU)")
    p.add_argument("--prediction_type", choices=["v_prediction", "epsilon"], default="v_prediction")
    p.add_argument("--zero_terminal_snr", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale the schedule to zero SNR at the last step (needs v_prediction)")
    args = p.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes) if args.sizes else None
    except ValueError as exc:
        p.error(str(exc))
    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        p.error("--zero_terminal_snr needs --prediction_type v_prediction (epsilon is undefined at zero SNR); "
                "add --no-zero_terminal_snr")
    train_teacher(args.output_dir, args.vae_steps, args.unet_steps, args.batch_size, args.vae_lr, args.unet_lr,
                  args.seed, mixed_precision=args.mixed_precision, ema_decay=args.ema_decay,
                  save_every=args.save_every, eval_prompts=args.eval_prompts,
                  min_snr_gamma=args.min_snr_gamma, warmup_steps=args.warmup_steps, vae_from=args.vae_from,
                  prediction_type=args.prediction_type, zero_terminal_snr=args.zero_terminal_snr,
                  init_from=args.init_from, sizes=sizes, vae_multiscale_steps=args.vae_multiscale_steps,
                  data_workers=args.data_workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
