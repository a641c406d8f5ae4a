"""GSPNHighResPipeline: 4K-16K images from SD-1.x/2.x and SDXL bases.

``__call__`` reads top to bottom: encode the prompt, plan the stages, then per
stage upscale the previous result, re-noise it to the stage's strength and
denoise the whole latent (GSPN keeps each step linear in the pixel count),
and finally decode with a tiled VAE. Global coherence at large sizes comes
from the skip residual (DemoFusion): during each upscaling stage the latent is
pulled towards the re-noised upscaled previous stage with a weight that
decays from 1 to 0 over the stage, so early steps keep the layout and late
steps add detail. Optionally (``dilated_sampling``, DemoFusion's global path)
the UNet also denoises the interleaved sub-latents of a large stage, each
about the native size, where objects have the scale the model knows; their
prediction is blended in with a weight that decays the same way. With
``color_fix`` an upscaling stage keeps its input's low frequencies and adds
only finer detail (``color_fix.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention import BasicTransformerBlock
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..integration import apply_gspn, gspn_state
from .color_fix import wavelet_color_fix
from .stages import Stage, plan_stages, round_to_multiple
from .vae_tiling import vae_decode, vae_encode


@dataclasses.dataclass
class StageReport:
    """What one stage did: size, strength, denoising steps, wall time, peak GPU memory."""

    index: int
    width: int
    height: int
    strength: float
    steps: int
    seconds: float
    peak_memory_gib: Optional[float]


@dataclasses.dataclass
class GSPNHighResPipelineOutput(BaseOutput):
    """``images`` as requested by ``output_type``; ``stages`` per-stage reports;
    ``stage_images`` each stage's decoded result when ``return_stage_images`` (the
    last is ``images`` itself: each stage is decoded once)."""

    images: Any
    stages: List[StageReport]
    stage_images: Optional[List[Any]] = None


class _ChunkedFeedForward(nn.Module):
    """Runs a transformer block's feed-forward over at most ``tokens`` tokens at a time:
    its 4x-wide hidden activation is the largest tensor of a step at 8K-16K."""

    def __init__(self, ff: nn.Module, tokens: int):
        super().__init__()
        self.ff = ff
        self.tokens = tokens

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.shape[1] <= self.tokens:
            return self.ff(hidden_states, *args, **kwargs)
        return torch.cat([self.ff(part, *args, **kwargs) for part in hidden_states.split(self.tokens, dim=1)], dim=1)


@contextlib.contextmanager
def chunked_feed_forward(model: nn.Module, tokens: Optional[int]):
    """Temporarily chunk every transformer block's feed-forward (None: no-op)."""
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)] if tokens else []
    for block in blocks:
        block.ff = _ChunkedFeedForward(block.ff, tokens)
    try:
        yield
    finally:
        for block in blocks:
            block.ff = block.ff.ff


def dilation_factor(latent_height: int, latent_width: int, target: int) -> int:
    """The largest step s >= 2 that divides both latent sides and leaves
    sub-latents of at least ``target`` cells a side; 1 when there is none."""
    for s in range(min(latent_height, latent_width) // max(1, target), 1, -1):
        if latent_height % s == 0 and latent_width % s == 0:
            return s
    return 1


def to_dilated(latents: torch.Tensor, s: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*s*s, C, H/s, W/s): sub-latent (i, j) holds cells (i::s, j::s)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).reshape(b * s * s, c, h // s, w // s)


def from_dilated(sub: torch.Tensor, s: int) -> torch.Tensor:
    """Inverse of :func:`to_dilated`."""
    n, c, h, w = sub.shape
    b = n // (s * s)
    return sub.reshape(b, s, s, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c, h * s, w * s)


class GSPNHighResPipeline(DiffusionPipeline):
    """Text-to-image at many times the base model's native size, in stages.

    Load with ``GSPNHighResPipeline.from_pretrained(base, adapter=...)``,
    ``GSPNHighResPipeline.from_pipe(pipe)`` or
    ``DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/gspn_highres")``
    followed by ``pipe.load_gspn_adapter(...)``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler,
                 text_encoder_2=None, tokenizer_2=None):
        # vae and unet carry type hints: from_pipe only carries over diffusers
        # models whose class matches the hint.
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.gspn_adapter: Optional[str] = None
        self.stage_index = 0

    # ---- loading ------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter=None, **kwargs):
        """Load a base SD-1.x/2.x or SDXL pipeline and (optionally) a GSPN adapter.
        Components the pipeline does not use (e.g. a safety checker) are not loaded."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if adapter is not None:
            pipe.load_gspn_adapter(adapter)
        return pipe

    def load_gspn_adapter(self, adapter, **options) -> "GSPNHighResPipeline":
        """Replace the UNet's self-attention with the adapter's GSPN layers."""
        apply_gspn(self, adapter=adapter, **options)
        self.gspn_adapter = str(adapter)
        return self

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def native_size(self) -> int:
        """The base model's training side in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # ---- conditioning -------------------------------------------------------

    def _base_pipeline(self):
        """The diffusers pipeline of the base family over the same modules, for
        its prompt encoding (nothing is copied)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.is_sdxl:
            return StableDiffusionXLPipeline(self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer,
                                             self.tokenizer_2, self.unet, self.scheduler)
        return StableDiffusionPipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def encode_prompt(self, prompt, negative_prompt, do_cfg: bool, device) -> Tuple[dict, Optional[dict]]:
        """(conditional, unconditional) UNet keyword inputs without the size-dependent parts."""
        base = self._base_pipeline()
        if self.is_sdxl:
            embeds, neg, pooled, neg_pooled = base.encode_prompt(
                prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                negative_prompt=negative_prompt)
            return ({"encoder_hidden_states": embeds, "text_embeds": pooled},
                    {"encoder_hidden_states": neg, "text_embeds": neg_pooled} if do_cfg else None)
        embeds, neg = base.encode_prompt(prompt, device, 1, do_cfg, negative_prompt)
        return {"encoder_hidden_states": embeds}, ({"encoder_hidden_states": neg} if do_cfg else None)

    def _unet_kwargs(self, cond: dict, width: int, height: int) -> dict:
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        if self.is_sdxl:
            embeds = cond["encoder_hidden_states"]
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=embeds.device, dtype=embeds.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"],
                                           "time_ids": time_ids.expand(embeds.shape[0], -1)}
        return kwargs

    def predict_noise(self, latents, t, cond, uncond, guidance_scale, width, height, sequential: bool):
        """Classifier-free guided prediction; the two halves run one after the
        other when ``sequential`` (half the activation memory), else batched."""
        if uncond is None:
            return self.unet(latents, t, **self._unet_kwargs(cond, width, height)).sample
        if sequential:
            e_uncond = self.unet(latents, t, **self._unet_kwargs(uncond, width, height)).sample
            e_cond = self.unet(latents, t, **self._unet_kwargs(cond, width, height)).sample
        else:
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            e_uncond, e_cond = self.unet(torch.cat([latents, latents]), t,
                                         **self._unet_kwargs(both, width, height)).sample.chunk(2)
        return e_uncond + guidance_scale * (e_cond - e_uncond)

    def predict_noise_dilated(self, latents, t, cond, uncond, guidance_scale, s: int, sequential: bool):
        """The same prediction made on the s x s interleaved sub-latents: one
        batch, or (``sequential``, large stages) s batches of s sub-latents, so
        that activations stay about 1/s of a full-size pass."""
        sub = to_dilated(latents, s)
        height, width = sub.shape[-2] * self.vae_scale_factor, sub.shape[-1] * self.vae_scale_factor
        group = s if sequential else s * s
        parts = []
        for start in range(0, sub.shape[0], group):
            rows = torch.arange(start, min(start + group, sub.shape[0]), device=sub.device) // (s * s)
            pick = lambda kwargs: None if kwargs is None else {k: v[rows] for k, v in kwargs.items()}  # noqa: E731
            parts.append(self.predict_noise(sub[start:start + group], t, pick(cond), pick(uncond), guidance_scale,
                                            width, height, sequential))
        return from_dilated(torch.cat(parts), s)

    # ---- latents <-> images -------------------------------------------------

    def decode(self, latents: torch.Tensor, tile: Optional[int], overlap: int,
               color_reference: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latents to images in [-1, 1] (tiled above ``tile`` latent cells), on
        the CPU; with the low band of ``color_reference`` (a smaller image of the
        same scene) when given (:mod:`~gspn_diffusers.pipelines.color_fix`)."""
        images = vae_decode(self.vae, latents / self.vae.config.scaling_factor, tile, overlap, torch.device("cpu"))
        if color_reference is not None:
            images = wavelet_color_fix(images, color_reference).clamp(-1, 1)
        return images

    def upscale(self, latents: torch.Tensor, width: int, height: int, mode: str, tile: Optional[int],
                overlap: int, color_reference: Optional[torch.Tensor] = None, keep_image: bool = False,
                decoded: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The previous stage's latents at the next stage's size: bicubic in latent
        space, or (``mode="pixel"``) decode (colour-fixed against
        ``color_reference``), bicubic in pixels, encode again. Also returns the
        previous stage's decoded image when ``keep_image`` (the next colour
        reference; in latent mode that costs a decode), else None. ``decoded``:
        that image when the caller already has it (it is not decoded again)."""
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if decoded is None and (keep_image or mode == "pixel"):
            decoded = self.decode(latents, tile, overlap, color_reference)
        kept = decoded if keep_image else None
        if mode == "latent":
            upscaled = F.interpolate(latents.float(), size=size, mode="bicubic", align_corners=False)
            return upscaled.to(latents.dtype), kept
        upscaled = F.interpolate(decoded, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
        encoded = vae_encode(self.vae, upscaled, tile * self.vae_scale_factor if tile else None,
                             overlap * self.vae_scale_factor, latents.device)
        return (encoded * self.vae.config.scaling_factor).to(latents.dtype), kept

    # ---- checks ---------------------------------------------------------------

    def _valid_size(self, value: int, name: str) -> int:
        multiple = self.vae_scale_factor
        if value % multiple:
            rounded = round_to_multiple(value, multiple)
            warnings.warn(f"{name}={value} is not a multiple of the latent factor {multiple}; using {rounded}",
                          stacklevel=3)
            return rounded
        return value

    def _warn_without_gspn(self, width: int, height: int) -> None:
        if gspn_state(self.unet) is not None:
            return
        tokens = (width // self.vae_scale_factor) * (height // self.vae_scale_factor)
        if tokens > 4 * (self.native_size // self.vae_scale_factor) ** 2:
            warnings.warn(
                f"no GSPN adapter loaded: the base self-attention runs at {width}x{height}, over {tokens:,} tokens "
                f"per layer, and its cost grows with the square of that ({tokens ** 2 / 1e12:.1f}e12 scores per head "
                "per step): expect very slow steps or running out of memory. Load one with "
                "GSPNHighResPipeline.from_pretrained(base, adapter=...) or pipe.load_gspn_adapter(...)",
                stacklevel=3,
            )

    # ---- generation -----------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        width: int,
        height: int,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        generator: Optional[torch.Generator] = None,
        stage_sizes: Optional[Sequence[Tuple[int, int]]] = None,
        stage_strengths: Optional[Sequence[float]] = None,
        stage_steps: Optional[Sequence[int]] = None,
        stage_growth: float = 2.0,
        skip_residual: bool = True,
        skip_residual_power: float = 3.0,
        dilated_sampling: bool = False,
        dilated_sampling_power: float = 1.0,
        dilated_sampling_size: Optional[int] = None,
        upscale_mode: str = "latent",
        color_fix: bool = False,
        sequential_cfg_above: int = 2048 * 2048,
        feed_forward_chunk_above: int = 2048 * 2048,
        feed_forward_chunk_tokens: int = 65536,
        vae_tile_size: Optional[int] = 128,
        vae_tile_overlap: int = 16,
        offload_vae_while_denoising: bool = False,
        output_type: str = "pil",
        return_stage_images: bool = False,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
    ):
        """Generate ``width x height`` images in stages.

        Args:
            prompt, negative_prompt, num_inference_steps, guidance_scale,
                generator, output_type, callback_on_step_end(_tensor_inputs),
                return_dict: as in diffusers' text-to-image pipelines. The
                callback's step index counts across stages; ``self.stage_index``
                names the stage.
            width, height: target size in pixels (rounded to the latent factor
                with a warning; at least the native area).
            stage_sizes / stage_strengths / stage_steps: override the plan of
                :func:`~gspn_diffusers.pipelines.stages.plan_stages`;
                ``stage_growth``: side growth per stage of the default plan
                (2; larger = fewer stages, fewer VAE round trips in pixel mode).
            skip_residual: DemoFusion's skip residual (layout from the previous
                stage); ``skip_residual_power`` shapes its decay.
            dilated_sampling: DemoFusion's dilated sampling in upscaling stages
                at least twice ``dilated_sampling_size`` latent cells a side
                (default: the UNet's native latent side): the s x s interleaved
                sub-latents are denoised too and blended in with a weight from
                1 to 0 over the stage (``dilated_sampling_power`` shapes it).
                Costs up to twice the UNet work of those stages.
            upscale_mode: ``"latent"`` (bicubic latents) or ``"pixel"`` (decode,
                upscale, encode; sharper, costs two tiled VAE passes).
            color_fix: each upscaling stage's output keeps the low frequencies
                (down to about one pixel of the smaller image) of the image it
                started from and takes only finer detail from the denoiser
                (:mod:`~gspn_diffusers.pipelines.color_fix`): no colour drift
                at large sizes. In latent mode it costs one more VAE decode,
                of the last stage's input.
            sequential_cfg_above: above this many pixels the two CFG halves run
                one after the other; ``feed_forward_chunk_above`` /
                ``feed_forward_chunk_tokens``: chunk the transformer
                feed-forwards above that size.
            vae_tile_size / vae_tile_overlap: tiled VAE in latent cells (None:
                never tile); ``offload_vae_while_denoising`` keeps the VAE on the
                CPU except while it decodes or encodes.
            return_stage_images: also decode every stage's result (once: the
                next stage's pixel upscale and the output reuse it; the output
                is the same either way, so in latent mode only the last stage
                image is colour-fixed).
        """
        device = self._execution_device
        width, height = self._valid_size(width, "width"), self._valid_size(height, "height")
        if upscale_mode not in ("latent", "pixel"):
            raise ValueError(f"upscale_mode={upscale_mode!r}: use 'latent' or 'pixel'")
        stages = plan_stages(width, height, self.native_size, self.vae_scale_factor, num_inference_steps,
                             stage_sizes, stage_strengths, stage_steps, stage_growth)
        self._warn_without_gspn(width, height)
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)}: only {self._callback_tensor_inputs}")
        do_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, negative_prompt, do_cfg, device)
        batch = cond["encoder_hidden_states"].shape[0]
        dtype = self.unet.dtype
        total_steps = sum(s.denoising_steps for s in stages)
        overall = self.progress_bar(total=total_steps)
        overall.set_description("all stages")
        reports: List[StageReport] = []
        stage_images: List[Any] = []
        latents = None
        color_reference = None  # the image the current stage started from, for color_fix
        decoded = None  # latents decoded for a stage image, reused by the next upscale or the output
        global_step = 0
        vae_home = self.vae.device
        for index, stage in enumerate(stages):
            self.stage_index = index
            started = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                reference = None
                if index > 0:
                    # Latent mode colour-fixes only the output (the last stage): its
                    # earlier stages' inputs are not decoded, and stage images do not
                    # change that, so that they change no output pixel.
                    keep = color_fix and (upscale_mode == "pixel" or index == len(stages) - 1)
                    if upscale_mode == "pixel" or keep:
                        self.vae.to(vae_home)
                    reference, color_reference = self.upscale(latents, stage.width, stage.height, upscale_mode,
                                                              vae_tile_size, vae_tile_overlap, color_reference, keep,
                                                              decoded)
                    decoded = None
                latents, global_step = self._run_stage(
                    stage, index, reference, batch, dtype, device, generator, cond, uncond, guidance_scale,
                    skip_residual, skip_residual_power,
                    dilated_sampling_size or self.unet.config.sample_size if dilated_sampling else None,
                    dilated_sampling_power, sequential_cfg_above, feed_forward_chunk_above,
                    feed_forward_chunk_tokens, offload_vae_while_denoising,
                    callback_on_step_end, global_step, overall, len(stages))
                reference = None  # the stage is done with it: not held through the decodes
            except torch.cuda.OutOfMemoryError as exc:
                raise RuntimeError(
                    f"out of GPU memory in stage {index + 1}/{len(stages)} ({stage.width}x{stage.height}). Try: "
                    "sequential_cfg_above=0, a smaller feed_forward_chunk_tokens, feed_forward_chunk_above=0, "
                    "offload_vae_while_denoising=True, a smaller vae_tile_size, or a smaller target"
                ) from exc
            if return_stage_images:
                image, decoded = self._to_output(latents, output_type, vae_tile_size, vae_tile_overlap, vae_home,
                                                 color_reference)
                stage_images.append(image)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            reports.append(StageReport(index, stage.width, stage.height, stage.strength, stage.denoising_steps,
                                       time.perf_counter() - started, peak))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        overall.close()
        images = stage_images[-1] if return_stage_images else self._to_output(
            latents, output_type, vae_tile_size, vae_tile_overlap, vae_home, color_reference)[0]
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, reports
        return GSPNHighResPipelineOutput(images=images, stages=reports,
                                         stage_images=stage_images if return_stage_images else None)

    def _run_stage(self, stage: Stage, index, reference, batch, dtype, device, generator, cond, uncond,
                   guidance_scale, skip_residual, skip_power, dilated_size, dilated_power, sequential_cfg_above,
                   ff_chunk_above, ff_chunk_tokens, offload_vae, callback, global_step, overall, num_stages):
        """Denoises one stage from noise (``reference`` None) or from its
        upscaled input ``reference`` re-noised to the stage's strength."""
        pixels = stage.width * stage.height
        shape = (batch, self.unet.config.in_channels, stage.height // self.vae_scale_factor,
                 stage.width // self.vae_scale_factor)
        self.scheduler.set_timesteps(stage.steps, device=device)
        start = (stage.steps - stage.denoising_steps) * self.scheduler.order
        timesteps = self.scheduler.timesteps[start:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if reference is None:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(reference, noise, timesteps[:1])
        if offload_vae:
            self.vae.to("cpu")
        sequential = pixels > sequential_cfg_above
        dilation = dilation_factor(shape[2], shape[3], dilated_size) if dilated_size and index > 0 else 1
        bar = self.progress_bar(total=len(timesteps))
        bar.set_description(f"stage {index + 1}/{num_stages} {stage.width}x{stage.height}")
        with chunked_feed_forward(self.unet, ff_chunk_tokens if pixels > ff_chunk_above else None):
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                # DemoFusion's cosine weight, 1 -> 0 over the stage
                c_dilated = ((1 + math.cos(math.pi * i / len(timesteps))) / 2) ** dilated_power if dilation > 1 else 0
                eps = 0 if c_dilated == 1 else self.predict_noise(
                    model_input, t, cond, uncond, guidance_scale, stage.width, stage.height, sequential)
                if c_dilated > 1e-3:
                    dilated = self.predict_noise_dilated(model_input, t, cond, uncond, guidance_scale, dilation,
                                                         sequential)
                    eps = c_dilated * dilated + (1 - c_dilated) * eps
                latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
                if reference is not None and skip_residual and i + 1 < len(timesteps):
                    # DemoFusion skip residual: weight 1 -> 0 over the stage.
                    c = ((1 + math.cos(math.pi * (i + 1) / len(timesteps))) / 2) ** skip_power
                    renoised = self.scheduler.add_noise(reference, noise, timesteps[i + 1:i + 2])
                    latents = c * renoised + (1 - c) * latents
                global_step += 1
                if callback is not None:
                    latents = callback(self, global_step - 1, t, {"latents": latents}).get("latents", latents)
                bar.update()
                overall.update()
        bar.close()
        del noise
        return latents, global_step

    def _to_output(self, latents, output_type, tile, overlap, vae_home, color_reference=None):
        """The latents as ``output_type``, and their decoded image (None for latent output)."""
        if output_type == "latent":
            return latents, None
        if self.vae.device != vae_home:
            self.vae.to(vae_home)
        images = self.decode(latents, tile, overlap, color_reference)
        return self.image_processor.postprocess(images, output_type=output_type), images
