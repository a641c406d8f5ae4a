"""Tiled VAE decode and encode for images larger than memory allows.

The latent (or image) is cut into overlapping tiles; each tile is processed
alone and pasted with a weight that ramps linearly from 0 at its edge to 1 at
``overlap`` inside it, and the sum is divided by the summed weights. Where two
tiles overlap their results are cross-faded, so no step can appear at a
border. Tiles run one at a time on the VAE's device; the output is assembled
in ``out_device``, so a 16K image never has to fit on the GPU at once.

Each tile is normalised (GroupNorm) and attended (the decoder's mid-block
attention) over its own extent, so a tiled result differs from an untiled
one by a slowly varying amount, which the cross-fade keeps free of steps;
larger tiles shrink it (the pipeline's default tile is 1024 px).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch


def _starts(length: int, tile: int, overlap: int) -> List[int]:
    """Tile origins covering ``length`` with at least ``overlap`` shared cells."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(size: int, overlap: int, at_start: bool, at_end: bool, device) -> torch.Tensor:
    """1-D blend weight of one tile: linear ramps over ``overlap`` cells on
    sides that touch another tile, flat (1) on sides at the image border."""
    w = torch.ones(size, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[-overlap:] = ramp.flip(0)
    return w


def tiled_apply(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    tile: int,
    overlap: int,
    scale: float,
    out_channels: int,
    out_device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Apply ``fn`` (which scales spatial size by ``scale``) tile by tile and
    cross-fade the overlaps. ``tile`` and ``overlap`` are in input cells."""
    if overlap * 2 > tile:
        raise ValueError(f"overlap {overlap} must be at most half the tile size {tile}")
    batch, _, height, width = x.shape
    out_device = out_device or x.device
    out_h, out_w = round(height * scale), round(width * scale)
    out = torch.zeros(batch, out_channels, out_h, out_w, device=out_device, dtype=torch.float32)
    weight = torch.zeros(1, 1, out_h, out_w, device=out_device, dtype=torch.float32)
    rows, cols = _starts(height, tile, overlap), _starts(width, tile, overlap)
    o = round(overlap * scale)
    for top in rows:
        for left in cols:
            piece = x[:, :, top:top + tile, left:left + tile]
            result = fn(piece).float().to(out_device)
            ph, pw = result.shape[-2:]
            wy = _ramp(ph, o, top == 0, top + tile >= height, out_device)
            wx = _ramp(pw, o, left == 0, left + tile >= width, out_device)
            w = (wy[:, None] * wx[None, :])[None, None]
            y0, x0 = round(top * scale), round(left * scale)
            out[:, :, y0:y0 + ph, x0:x0 + pw] += result * w
            weight[:, :, y0:y0 + ph, x0:x0 + pw] += w
    return out / weight


def vae_decode(vae, latents: torch.Tensor, tile: Optional[int] = None, overlap: int = 16,
               out_device: Optional[torch.device] = None) -> torch.Tensor:
    """Latents (already divided by the scaling factor) to images in [-1, 1];
    tiled when ``tile`` (latent cells) is smaller than the latent."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def decode(z):
        return vae.decode(z.to(vae.device, vae.dtype)).sample

    if tile is None or max(latents.shape[-2:]) <= tile:
        return decode(latents).float().to(out_device or latents.device)
    return tiled_apply(latents, decode, tile, min(overlap, tile // 2), factor, vae.config.out_channels, out_device)


def vae_encode(vae, images: torch.Tensor, tile: Optional[int] = None, overlap: int = 128,
               out_device: Optional[torch.device] = None) -> torch.Tensor:
    """Images in [-1, 1] to latent means (not yet scaled); tiled when ``tile``
    (pixels) is smaller than the image. Uses the distribution's mean: sampling
    per tile would add seams of independent noise."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode(x):
        return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean

    if tile is None or max(images.shape[-2:]) <= tile:
        return encode(images).float().to(out_device or images.device)
    return tiled_apply(images, encode, tile, min(overlap, tile // 2), 1.0 / factor, vae.config.latent_channels,
                       out_device)
