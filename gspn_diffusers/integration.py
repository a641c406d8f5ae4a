"""apply_gspn / remove_gspn: GSPN layers in place of a diffusers denoiser's
self-attention, and the plumbing that tells each layer its latent grid.

The only module that knows diffusers' internals:

- Every self-attention (``attn1`` of a ``BasicTransformerBlock`` that is not
  cross-attention) keeps its ``Attention`` module and weights; only its
  *processor* is swapped for a :class:`GSPNAttnProcessor`, an ``nn.Module``
  that owns the :class:`~gspn_diffusers.layer.GSPNLayer`. Removing GSPN puts
  the original processor object back, so outputs are bit-identical, and LoRA
  keys for ``attn1.to_q/to_k/to_v/to_out`` still find their projections.
- The grid comes from the model, never from the token count: a forward
  pre-hook on each grid owner (each ``Transformer2DModel`` of a UNet, or the
  DiT itself) records ``(H, W)`` of its input latent (divided by the patch
  size for DiTs) into a small state object its layers read. This holds for
  any aspect ratio and odd sizes, under ``torch.compile`` (the hook is traced)
  and CPU offload (the hook runs wherever the module runs).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from .adapter import AdapterError, read_adapter, write_adapter
from .layer import GSPNLayer

SUPPORTED_MODELS = (
    "UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL)",
    "PixArtTransformer2DModel (PixArt-alpha/sigma)",
    "Transformer2DModel with patch input (DiT)",
)
LAYER_SELECTIONS = ("all", "highres")
INITS = ("attention", "scratch")


class UnsupportedModelError(TypeError):
    """The denoiser has no self-attention layout GSPN knows how to replace."""


@dataclasses.dataclass
class GSPNOptions:
    """How GSPN layers are built. Recorded in every adapter.

    Attributes:
        layers: ``"all"`` self-attentions, ``"highres"`` (only the
            highest-resolution level that has attention, where attention cost
            lives), or a list of ``fnmatch`` patterns of attention module names
            (e.g. ``"down_blocks.0.*"``).
        proxy_dim: scan channels per layer: an int, a float fraction of the
            layer's width, or None for the default (width / 8).
        gate_groups: gate sets per layer, shared by proxy_dim / gate_groups channels.
        chunk: lines per chunk (local scan) or None (global scan).
        bottleneck: width of the path that predicts gates from the tokens.
        init: ``"attention"`` starts from the replaced attention's value and
            output projections; ``"scratch"`` from random weights.
    """

    layers: Union[str, Sequence[str]] = "all"
    proxy_dim: Union[int, float, None] = None
    gate_groups: int = 4
    chunk: Optional[int] = None
    bottleneck: int = 64
    init: str = "attention"

    def __post_init__(self):
        if isinstance(self.layers, str):
            if self.layers not in LAYER_SELECTIONS:
                raise ValueError(
                    f"layers={self.layers!r}: use one of {LAYER_SELECTIONS} or a list of name patterns"
                )
        else:
            self.layers = [str(p) for p in self.layers]
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: use one of {INITS}")

    def proxy_for(self, channels: int) -> Optional[int]:
        """The proxy width of a layer with ``channels`` channels."""
        if isinstance(self.proxy_dim, float):
            return max(1, round(channels * self.proxy_dim))
        return self.proxy_dim

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


class GridState:
    """The latent grid ``(H, W)`` of one grid owner's current forward pass."""

    def __init__(self, patch_size: int = 1):
        self.patch_size = patch_size
        self.hw: Optional[Tuple[int, int]] = None


class GSPNAttnProcessor(nn.Module):
    """A diffusers attention processor that runs a GSPN layer instead of attention."""

    def __init__(self, layer: GSPNLayer, grid: GridState):
        super().__init__()
        self.layer = layer
        self.grid = grid

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Same contract as diffusers' ``AttnProcessor2_0`` for self-attention."""
        if encoder_hidden_states is not None:
            raise ValueError("GSPN replaces self-attention only; it got encoder_hidden_states")
        residual = hidden_states
        if hidden_states.ndim == 4:  # (B, C, H, W) input: the grid is its shape
            batch, channels, height, width = hidden_states.shape
            tokens = hidden_states.flatten(2).transpose(1, 2)
            grid = (height, width)
        else:
            tokens = hidden_states
            if self.grid.hw is None:
                raise RuntimeError(
                    "GSPN layer called without a latent grid: call the whole denoiser, not a block alone"
                )
            grid = self.grid.hw
        out = self.layer(tokens, grid)
        if hidden_states.ndim == 4:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclasses.dataclass
class _Target:
    name: str  # attention module name inside the denoiser
    attention: Attention
    grid: GridState
    original_processor: Any = None


@dataclasses.dataclass
class _GSPNState:
    options: GSPNOptions
    targets: List[_Target]
    hooks: list


def denoiser_of(pipe_or_model) -> nn.Module:
    """The UNet or transformer of a pipeline, or the model itself."""
    for attr in ("unet", "transformer"):
        model = getattr(pipe_or_model, attr, None)
        if isinstance(model, nn.Module):
            return model
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model
    raise UnsupportedModelError(
        f"{type(pipe_or_model).__name__} is neither a diffusers pipeline with a unet/transformer nor a "
        f"model. Supported: {', '.join(SUPPORTED_MODELS)}"
    )


def _grid_owners(denoiser: nn.Module) -> List[Tuple[str, nn.Module, int]]:
    """(name, module, patch size) of every module whose input is the latent grid
    of the self-attentions inside it."""
    from diffusers import PixArtTransformer2DModel, Transformer2DModel, UNet2DConditionModel

    if isinstance(denoiser, UNet2DConditionModel):
        return [
            (name, m, 1)
            for name, m in denoiser.named_modules()
            if isinstance(m, Transformer2DModel) and getattr(m, "is_input_continuous", False)
        ]
    if isinstance(denoiser, PixArtTransformer2DModel):
        return [("", denoiser, int(denoiser.config.patch_size))]
    if isinstance(denoiser, Transformer2DModel) and getattr(denoiser, "is_input_patches", False):
        return [("", denoiser, int(denoiser.config.patch_size))]
    raise UnsupportedModelError(
        f"GSPN does not support {type(denoiser).__name__} yet (e.g. SD3/FLUX joint attention). "
        f"Supported: {', '.join(SUPPORTED_MODELS)}"
    )


def _self_attentions(owner_name: str, owner: nn.Module) -> List[Tuple[str, Attention]]:
    prefix = f"{owner_name}." if owner_name else ""
    found = []
    for name, module in owner.named_modules():
        if isinstance(module, BasicTransformerBlock) and not module.attn1.is_cross_attention:
            found.append((f"{prefix}{name}.attn1" if name else f"{prefix}attn1", module.attn1))
    return found


def find_self_attentions(denoiser: nn.Module, layers: Union[str, Sequence[str]] = "all"):
    """``[(attention name, Attention, grid owner, patch size)]`` that GSPN replaces."""
    owners = _grid_owners(denoiser)
    if layers == "highres":
        # The highest-resolution level with attention has the narrowest blocks.
        widths = [o.config.in_channels for n, o, _p in owners if _self_attentions(n, o)]
        narrowest = min(widths) if widths else None
        owners = [(n, o, p) for n, o, p in owners if o.config.in_channels == narrowest]
    found = []
    for owner_name, owner, patch in owners:
        for name, attention in _self_attentions(owner_name, owner):
            if isinstance(layers, str) or any(fnmatch.fnmatchcase(name, pat) for pat in layers):
                found.append((name, attention, owner, patch))
    return found


def _record_grid(state: GridState):
    def hook(module, args, kwargs):
        latent = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
            raise ValueError(
                f"GSPN needs the (B, C, H, W) latent at {type(module).__name__}'s input to know its grid; "
                f"got {type(latent).__name__} {tuple(getattr(latent, 'shape', ()))}"
            )
        height, width = latent.shape[-2], latent.shape[-1]
        p = state.patch_size
        if height % p or width % p:
            raise ValueError(
                f"latent of {height}x{width} is not divisible by the patch size {p} of "
                f"{type(module).__name__}: choose an image size that is a multiple of {p} x the VAE factor"
            )
        state.hw = (height // p, width // p)

    return hook


def _device_and_dtype(module: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _build_layer(attention: Attention, options: GSPNOptions) -> GSPNLayer:
    channels = attention.to_out[0].out_features
    layer = GSPNLayer(
        channels,
        proxy_dim=options.proxy_for(channels),
        gate_groups=options.gate_groups,
        chunk=options.chunk,
        bottleneck=options.bottleneck,
    )
    value, out = attention.to_v, attention.to_out[0]
    if options.init == "attention" and value.weight.device.type != "meta":
        if value.out_features != out.in_features or value.in_features != channels:
            raise ValueError(
                f"cannot initialise from an attention whose value ({value.in_features}->{value.out_features}) "
                f"and output ({out.in_features}->{out.out_features}) projections do not compose; use init='scratch'"
            )
        layer.init_from_attention(
            value.weight.detach().cpu(),
            out.weight.detach().cpu(),
            None if value.bias is None else value.bias.detach().cpu(),
            None if out.bias is None else out.bias.detach().cpu(),
        )
    device, dtype = _device_and_dtype(attention)
    return layer.to(device=device, dtype=dtype)


def gspn_state(pipe_or_model) -> Optional[_GSPNState]:
    """The GSPN bookkeeping of a denoiser, or None when GSPN is not applied."""
    return getattr(denoiser_of(pipe_or_model), "_gspn_state", None)


def apply_layers(pipe_or_model, options: GSPNOptions) -> List[_Target]:
    """Swap the selected self-attention processors for fresh GSPN layers.

    The low-level half of :func:`gspn_diffusers.apply_gspn` (which also loads
    adapters); returns the replaced targets in model order.
    """
    denoiser = denoiser_of(pipe_or_model)
    if getattr(denoiser, "_gspn_state", None) is not None:
        raise RuntimeError("GSPN is already applied to this model; call remove_gspn first")
    found = find_self_attentions(denoiser, options.layers)
    if not found:
        raise UnsupportedModelError(
            f"{type(denoiser).__name__} has no self-attention matching layers={options.layers!r}"
        )
    grids: Dict[int, GridState] = {}
    hooks = []
    targets = []
    for name, attention, owner, patch in found:
        if id(owner) not in grids:
            grids[id(owner)] = GridState(patch)
            hooks.append(owner.register_forward_pre_hook(_record_grid(grids[id(owner)]), with_kwargs=True))
        targets.append(_Target(name, attention, grids[id(owner)], attention.processor))
    for target in targets:
        target.attention.set_processor(GSPNAttnProcessor(_build_layer(target.attention, options), target.grid))
    denoiser._gspn_state = _GSPNState(options, targets, hooks)
    return targets


def remove_gspn(pipe_or_model):
    """Restore the original attention processors exactly; returns the argument."""
    denoiser = denoiser_of(pipe_or_model)
    state = getattr(denoiser, "_gspn_state", None)
    if state is None:
        return pipe_or_model
    for target in state.targets:
        target.attention.set_processor(target.original_processor)
    for hook in state.hooks:
        hook.remove()
    del denoiser._gspn_state
    return pipe_or_model


def gspn_layers(pipe_or_model) -> Dict[str, GSPNLayer]:
    """``{attention name: GSPNLayer}`` of an applied model, in model order."""
    state = gspn_state(pipe_or_model)
    if state is None:
        raise RuntimeError("GSPN is not applied to this model; call apply_gspn first")
    return {t.name: t.attention.processor.layer for t in state.targets}


# ---- the public entry points ------------------------------------------------


def _layout(pipe_or_model) -> Dict[str, Any]:
    denoiser = denoiser_of(pipe_or_model)
    state = gspn_state(pipe_or_model)
    return {
        "base_model": type(denoiser).__name__,
        "layers": [
            {"name": t.name, "channels": t.attention.to_out[0].out_features} for t in state.targets
        ],
    }


def _check_layout(expected: Dict[str, Any], pipe_or_model, where: str) -> None:
    """Raise AdapterError naming the first difference between an adapter's
    layout and the layers GSPN just replaced."""
    actual = _layout(pipe_or_model)
    if expected.get("base_model") != actual["base_model"]:
        raise AdapterError(
            f"adapter {where} was made for a {expected.get('base_model')}, not a {actual['base_model']}"
        )
    want, have = expected.get("layers", []), actual["layers"]
    for i, (w, h) in enumerate(zip(want, have)):
        if w != h:
            raise AdapterError(
                f"adapter {where} does not fit this model: layer {i} is {w['name']} with {w['channels']} "
                f"channels in the adapter but {h['name']} with {h['channels']} channels in the model"
            )
    if len(want) != len(have):
        extra = want[len(have)] if len(want) > len(have) else have[len(want)]
        raise AdapterError(
            f"adapter {where} has {len(want)} GSPN layers, this model {len(have)} "
            f"(first unmatched: {extra['name']})"
        )


def apply_gspn(pipe_or_model, adapter: Optional[Union[str, os.PathLike]] = None, **options):
    """Replace every selected self-attention of the denoiser with a GSPN layer.

    Args:
        pipe_or_model: a diffusers pipeline (its ``unet`` or ``transformer``)
            or the denoiser itself.
        adapter: a GSPN adapter folder or Hub repo id; its recorded options
            are used and its layer layout must match this model.
        **options: :class:`GSPNOptions` fields (``layers``, ``proxy_dim``,
            ``gate_groups``, ``chunk``, ``bottleneck``, ``init``); with an
            adapter, only options equal to the adapter's may be given.

    Returns:
        ``pipe_or_model``, modified in place; :func:`remove_gspn` undoes it.
    """
    if adapter is None:
        apply_layers(pipe_or_model, GSPNOptions(**options))
        return pipe_or_model
    config, tensors = read_adapter(adapter)
    recorded = config.get("options", {})
    for key, value in options.items():
        if key not in recorded or _jsonable(value) != recorded[key]:
            raise ValueError(
                f"option {key}={value!r} conflicts with the adapter, which was trained with "
                f"{key}={recorded.get(key)!r}; leave it out to use the adapter's"
            )
    apply_layers(pipe_or_model, GSPNOptions(**{**recorded, "init": "scratch"}))
    try:
        _check_layout(config, pipe_or_model, str(adapter))
        for name, layer in gspn_layers(pipe_or_model).items():
            prefix = f"{name}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            missing = set(layer.state_dict()) - set(own)
            if missing:
                raise AdapterError(f"adapter {adapter} lacks {sorted(missing)[0]!r} for layer {name}")
            # load_state_dict copies into the layer's own device and dtype (the pipeline's).
            layer.load_state_dict(own, strict=True)
    except Exception:
        remove_gspn(pipe_or_model)
        raise
    denoiser_of(pipe_or_model)._gspn_state.options = GSPNOptions(**recorded)
    return pipe_or_model


def _jsonable(value):
    return json.loads(json.dumps(value))


def save_gspn_adapter(pipe_or_model, path: Union[str, os.PathLike]) -> Path:
    """Save the GSPN layers as an adapter folder (safetensors + JSON layout)."""
    state = gspn_state(pipe_or_model)
    if state is None:
        raise RuntimeError("GSPN is not applied to this model; nothing to save")
    tensors = {
        f"{name}.{key}": value for name, layer in gspn_layers(pipe_or_model).items()
        for key, value in layer.state_dict().items()
    }
    config = {"options": state.options.to_dict(), **_layout(pipe_or_model)}
    return write_adapter(path, config, tensors)
