"""The GSPN layer: a drop-in for a transformer block's self-attention.

Tokens ``(B, N, C)`` of an ``H x W`` latent grid in, tokens out. Nothing here
knows diffusers; :mod:`gspn_diffusers.integration` supplies the grid.

Data flow (``Cp`` = proxy channels, ``G`` = gate groups, D = 4 directions)::

    z    = proxy_in(x)                      (B, N, Cp)   value path, C -> Cp
    ctrl = heads(silu(bottleneck(x)))       (B, N, 12G + 4G + 2Cp)
           -> gate logits (B, 4, G, 3, H, W), decay a (B, 4, G, H, W),
              lam (B, Cp, H, W), output gate u (B, Cp, H, W)
    gates_d = sigmoid(a_d) * normalize_gates(logits_d)       rows sum to sigmoid(a_d) < 1
    h_d  = scan_d(z, gates_d, lam)                           (B, 4, Cp, H, W), one launch
           (gates_d made inside the op from the logits and a: normalize=True, decay=a)
    y    = proxy_out(u * sum_d m_d h_d + skip * z)           (B, N, C)

Each position's gates sum to ``sigmoid(a) < 1``, so the hidden state is a
decaying, spatially weighted average of earlier inputs: bounded over any
number of lines. Gates are shared by the ``Cp / G`` channels of a group, so the
scan reads ``3G`` gate planes instead of ``3Cp`` (GSPN-2), and propagation runs
in the proxy space (``Cp`` defaults to ``C / 8``), which keeps the layer lean
at 8K-16K resolution.

Initialisation from a teacher (:meth:`GSPNLayer.init_from_attention`): the
value->output path ``proxy_out . proxy_in`` starts as the best rank-``Cp``
factorisation (truncated SVD) of the replaced attention's ``W_out W_v``, with
its biases; the control heads start at zero weight with biases that make every
direction an even-weighted moving average (``sigmoid(a) = lam = 1/2``,
``u = 1``, ``m_d = 1/4``). The fresh layer is then "the teacher's value and
output projections around a local spatial average instead of softmax
attention". ``init_from_attention`` is skipped for ``init="scratch"``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import DIRECTIONS, gspn_scan_4dir


def default_proxy_dim(channels: int) -> int:
    """``C / 8`` rounded to a multiple of 8 (at least 8, at most C)."""
    return min(channels, max(8, (channels // 8 + 7) // 8 * 8))


class GSPNLayer(nn.Module):
    """Four-direction GSPN over a token grid.

    Args:
        channels: token width C.
        proxy_dim: channels the scan runs in (default ``C / 8``, see
            :func:`default_proxy_dim`).
        gate_groups: gate sets shared by ``proxy_dim / gate_groups`` channels.
        chunk: lines per chunk of a local scan, or None for global scans.
        bottleneck: width of the control path that predicts gates, decay,
            lam and output gate from the tokens.
    """

    def __init__(
        self,
        channels: int,
        proxy_dim: Optional[int] = None,
        gate_groups: int = 4,
        chunk: Optional[int] = None,
        bottleneck: int = 64,
    ):
        super().__init__()
        proxy_dim = default_proxy_dim(channels) if proxy_dim is None else int(proxy_dim)
        if not 1 <= proxy_dim <= channels:
            raise ValueError(f"proxy_dim must be in [1, {channels}] for {channels} channels, got {proxy_dim}")
        if gate_groups < 1 or proxy_dim % gate_groups:
            raise ValueError(f"gate_groups={gate_groups} must divide proxy_dim={proxy_dim}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive int or None (global scan), got {chunk!r}")
        self.channels = channels
        self.proxy_dim = proxy_dim
        self.gate_groups = gate_groups
        self.chunk = chunk
        self.proxy_in = nn.Linear(channels, proxy_dim)
        self.proxy_out = nn.Linear(proxy_dim, channels)
        self.bottleneck = nn.Linear(channels, bottleneck)
        # logits 4*G*3 | decay 4*G | lam Cp | output gate Cp
        self.heads = nn.Linear(bottleneck, 16 * gate_groups + 2 * proxy_dim)
        self.direction_weights = nn.Parameter(torch.full((len(DIRECTIONS),), 1.0 / len(DIRECTIONS)))
        self.skip = nn.Parameter(torch.zeros(proxy_dim))
        self.reset_control()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, proxy_dim={self.proxy_dim}, gate_groups={self.gate_groups}, "
            f"chunk={self.chunk}"
        )

    @torch.no_grad()
    def reset_control(self) -> None:
        """Control heads at zero weight: every direction starts as an even
        moving average (decay = lam = 1/2, output gate ~1)."""
        nn.init.zeros_(self.heads.weight)
        bias = self.heads.bias
        bias.zero_()  # gate logits 0 (even taps), decay and lam sigmoid(0) = 1/2
        bias[16 * self.gate_groups + self.proxy_dim :] = 6.0  # output gate sigmoid(6) ~ 1
        self.direction_weights.fill_(1.0 / len(DIRECTIONS))
        self.skip.zero_()

    @torch.no_grad()
    def init_from_attention(
        self,
        value_weight: torch.Tensor,
        out_weight: torch.Tensor,
        value_bias: Optional[torch.Tensor] = None,
        out_bias: Optional[torch.Tensor] = None,
    ) -> None:
        """Start the value->output path from a replaced attention's projections.

        ``proxy_out @ proxy_in`` becomes the best rank-``proxy_dim`` factorisation
        of ``out_weight @ value_weight`` (exact when ``proxy_dim == C``), with
        the biases carried through. Computed in float64, stored in the layer's dtype.
        """
        composite = out_weight.double() @ value_weight.double()
        if composite.shape != (self.channels, self.channels):
            raise ValueError(
                f"attention projections compose to {tuple(composite.shape)}, expected "
                f"({self.channels}, {self.channels})"
            )
        u, s, vh = torch.linalg.svd(composite)
        k = self.proxy_dim
        root = s[:k].sqrt()
        w_in = root[:, None] * vh[:k]  # (Cp, C)
        w_out = u[:, :k] * root[None, :]  # (C, Cp)
        b_in = w_in @ value_bias.double() if value_bias is not None else torch.zeros(k, dtype=torch.float64)
        b_out = out_bias.double() if out_bias is not None else torch.zeros(self.channels, dtype=torch.float64)
        for linear, weight, bias in ((self.proxy_in, w_in, b_in), (self.proxy_out, w_out, b_out)):
            linear.weight.copy_(weight.to(linear.weight))
            linear.bias.copy_(bias.to(linear.bias))

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``tokens`` (B, N, C) of a row-major ``grid = (H, W)``, N = H * W."""
        height, width = grid
        batch, count, channels = tokens.shape
        if count != height * width:
            raise ValueError(
                f"GSPN layer got {count} tokens for a {height}x{width} grid ({height * width} tokens)"
            )
        if channels != self.channels:
            raise ValueError(f"GSPN layer built for {self.channels} channels got tokens with {channels}")
        g, cp = self.gate_groups, self.proxy_dim

        def planes(t: torch.Tensor) -> torch.Tensor:  # (B, N, K) -> (B, K, H, W)
            return t.transpose(1, 2).reshape(batch, t.shape[-1], height, width)

        z = planes(self.proxy_in(tokens)).contiguous()
        ctrl = planes(self.heads(F.silu(self.bottleneck(tokens))))
        logits, decay, lam, gate = ctrl.split([12 * g, 4 * g, cp, cp], dim=1)
        # Gate logits, decay logits and lam stay channels-last (slices of the
        # heads' token-major output): the op makes their planes (on CUDA with a
        # tiled transpose, faster than .contiguous()) and normalises and decays
        # the gates as it reads them, where doing that here took several passes
        # over the gates (on the CPU twice the scan's own time at 128x128).
        hidden = gspn_scan_4dir(
            z,
            logits.reshape(batch, 4, g, 3, height, width),
            torch.sigmoid(lam),
            chunk=self.chunk,
            normalize=True,
            decay=decay.reshape(batch, 4, g, height, width),
        )
        # The directions' weighted sum as a batched (1 x D) @ (D x Cp H W) product
        # over hidden as it lies: einsum (and matmul) first copied hidden, 4x z,
        # to move d last (1.6 of 13 ms of a 64x64 layer on the CPU).
        weights = self.direction_weights.to(hidden.dtype).view(1, 1, -1).expand(batch, 1, -1)
        mixed = torch.bmm(weights, hidden.flatten(2)).view(batch, cp, height, width)
        y = torch.sigmoid(gate) * mixed + self.skip.to(z.dtype)[:, None, None] * z
        return self.proxy_out(y.flatten(2).transpose(1, 2))
