"""The teacher side of distillation: how each pipeline family is conditioned,
the teacher's own forward pass (the same denoiser with its original attention
processors swapped back in, so teacher and student share one copy of the
frozen weights), the hooks that record every self-attention output, and the
one-off preparation of latents and text embeddings.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..integration import denoiser_of, gspn_state
from .data import Bucket, TrainingData, fit_image, nearest_bucket, read_captioned_images


class Family:
    """Conditioning of one pipeline family (SD-1.x/2.x here; subclasses below)."""

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def denoiser(self) -> nn.Module:
        return denoiser_of(self.pipe)

    @property
    def latent_shape(self):
        """(latent channels, VAE downsampling factor)."""
        return self.denoiser.config.in_channels, self.pipe.vae_scale_factor

    def extra_sampling_kwargs(self) -> dict:
        return {}

    def encode(self, prompts: List[str], device) -> Dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def forward(self, denoiser, latents, timesteps, cond, width: int, height: int) -> torch.Tensor:
        return denoiser(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def noise_prediction(self, output: torch.Tensor) -> torch.Tensor:
        return output


class SDXLFamily(Family):
    def encode(self, prompts, device):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def forward(self, denoiser, latents, timesteps, cond, width, height):
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=latents.device, dtype=latents.dtype)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids.expand(latents.shape[0], -1)}
        return denoiser(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                        added_cond_kwargs=added).sample


class PixArtFamily(Family):
    def extra_sampling_kwargs(self):
        return {"use_resolution_binning": False, "clean_caption": False}

    def encode(self, prompts, device):
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=device, clean_caption=False
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def forward(self, denoiser, latents, timesteps, cond, width, height):
        batch = latents.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(denoiser, "use_additional_conditions", False):
            added = {
                "resolution": torch.tensor([[height, width]], device=latents.device, dtype=latents.dtype).expand(batch, -1),
                "aspect_ratio": torch.tensor([[height / width]], device=latents.device, dtype=latents.dtype).expand(batch, -1),
            }
        return denoiser(latents, encoder_hidden_states=cond["encoder_hidden_states"],
                        encoder_attention_mask=cond["encoder_attention_mask"], timestep=timesteps,
                        added_cond_kwargs=added).sample

    def noise_prediction(self, output):
        # PixArt predicts the noise and a learned variance: the first half is the noise.
        return output[:, : self.latent_shape[0]]


def family_of(pipe) -> Family:
    """The conditioning family of a loaded pipeline."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    denoiser = denoiser_of(pipe)
    if isinstance(denoiser, PixArtTransformer2DModel):
        return PixArtFamily(pipe)
    if isinstance(denoiser, UNet2DConditionModel):
        return SDXLFamily(pipe) if denoiser.config.addition_embed_type == "text_time" else Family(pipe)
    raise SystemExit(f"distillation supports SD-1.x/2.x, SDXL and PixArt pipelines, not {type(denoiser).__name__}")


@contextlib.contextmanager
def teacher_mode(pipe_or_model):
    """Run the denoiser with its original attention processors (the teacher)."""
    state = gspn_state(pipe_or_model)
    student = [t.attention.processor for t in state.targets]
    for t in state.targets:
        t.attention.set_processor(t.original_processor)
    try:
        yield
    finally:
        for t, processor in zip(state.targets, student):
            t.attention.set_processor(processor)


class FeatureRecorder:
    """Records the output of every replaced self-attention in model order:
    attention outputs in teacher mode, GSPN outputs otherwise."""

    def __init__(self, pipe_or_model):
        self.outputs: List[torch.Tensor] = []
        self.handles = [
            t.attention.register_forward_hook(lambda m, args, out: self.outputs.append(out))
            for t in gspn_state(pipe_or_model).targets
        ]

    def take(self) -> List[torch.Tensor]:
        """The recorded outputs since the last take(), and a fresh start."""
        outputs, self.outputs = self.outputs, []
        return outputs

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _encode_all(family: Family, prompts: List[str], device, batch: int = 64) -> Dict[str, torch.Tensor]:
    parts: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(prompts), batch):
        with torch.no_grad():
            for key, value in family.encode(prompts[start:start + batch], device).items():
                parts.setdefault(key, []).append(value.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _vae_encode(pipe, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    vae = pipe.vae
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
    latents = dist.mean + dist.std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float().cpu()


def teacher_latents_per_bucket(args) -> int:
    """How many latents data-free distillation generates per resolution bucket."""
    return args.num_teacher_latents or min(len(args.prompts), 1024)


def build_training_data(pipe, family: Family, args, progress=None) -> TrainingData:
    """Text embeddings for every prompt (plus the empty prompt), and the
    latents of every bucket, from the source the arguments name. Call before
    apply_gspn: the teacher generates with its own attention."""
    device = family.denoiser.device
    sizes = args.resolutions
    factor = family.latent_shape[1]
    for width, height in sizes:
        if width % factor or height % factor:
            raise SystemExit(f"--resolution {width}x{height}: sides must be multiples of the VAE factor {factor}")
    gen = torch.Generator().manual_seed(args.seed)
    if args.train_data_dir is not None:
        items = read_captioned_images(Path(args.train_data_dir), args.image_column, args.caption_column)
        prompts = sorted({caption for _, caption in items})
        row = {p: i for i, p in enumerate(prompts)}
        per_bucket: Dict[int, list] = {}
        for image, caption in items:
            per_bucket.setdefault(nearest_bucket(image, sizes), []).append((image, row[caption]))
        buckets = []
        for b, members in sorted(per_bucket.items()):
            width, height = sizes[b]
            latents = []
            for start in range(0, len(members), 8):
                chunk = members[start:start + 8]
                pixels = torch.stack([fit_image(image, width, height) for image, _ in chunk])
                with torch.no_grad():
                    latents.append(_vae_encode(pipe, pixels, gen))
                if progress:
                    progress(len(chunk))
            buckets.append(Bucket(width, height, torch.tensor([r for _, r in members]), torch.cat(latents)))
        has_images = True
    else:
        prompts = list(args.prompts)
        count = teacher_latents_per_bucket(args)
        buckets = []
        for b, (width, height) in enumerate(sizes):
            ids = torch.arange(count) % len(prompts)
            latents = None
            if args.data_free_latents == "trajectory":
                parts = []
                for start in range(0, count, 8):
                    chunk = ids[start:start + 8].tolist()
                    gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + b * 100_003 + start + i)
                            for i in range(len(chunk))]
                    with torch.no_grad():
                        out = pipe(prompt=[prompts[i] for i in chunk], width=width, height=height,
                                   num_inference_steps=args.teacher_steps, guidance_scale=args.teacher_guidance_scale,
                                   generator=gens, output_type="latent", **family.extra_sampling_kwargs())
                    parts.append(out.images.float().cpu())
                    if progress:
                        progress(len(chunk))
                latents = torch.cat(parts)
            buckets.append(Bucket(width, height, ids, latents))
        has_images = False
    embeds = _encode_all(family, prompts + [""], device)
    return TrainingData(prompts, embeds, buckets, has_images)

