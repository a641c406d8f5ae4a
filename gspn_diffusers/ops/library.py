"""The ``gspn::scan`` custom op: schema, fake (meta) kernel and autograd.

Declared once, here. The compiled extension (csrc/) registers the CPU and CUDA
kernels for these schemas when it loads; see :mod:`gspn_diffusers.ops.build`.

``gspn::scan(x, gates, lam, directions, chunk, normalize, columns_as_rows=-1, decay=None) -> h``
    gates ``(B, D, G, 3, H, W)``; x and lam ``(B, C, H, W)`` (shared by the D
    directions) or ``(B, D, C, H, W)``; ``directions`` D codes, indices into
    :data:`~gspn_diffusers.ops.reference.DIRECTIONS`; ``chunk`` 0 = global scan;
    ``normalize`` = gates are logits; ``columns_as_rows``: from this many
    pixels per plane the column directions run as a launch of their own,
    staged through shared memory on CUDA where the planes align, else as row
    scans of transposed copies of their inputs, written back into the one
    result (-1: never; see ``gspn_diffusers.ops.COLUMNS_AS_ROWS_MIN_PIXELS``);
    ``decay`` (with ``normalize``): logits ``(B, D, G, H, W)`` whose sigmoid
    weighs each position's normalised gates. Returns h ``(B, D, C, H, W)``.
``gspn::scan_backward(grad_h, h, x, gates, lam, directions, chunk, normalize, columns_as_rows=-1, decay=None)``
    -> ``(grad_x, grad_gates, grad_lam, grad_decay)``, shaped like the inputs
    (``grad_decay`` empty without decay).
"""

from __future__ import annotations

import torch

NAMESPACE = "gspn"

torch.library.define(
    f"{NAMESPACE}::scan",
    "(Tensor x, Tensor gates, Tensor lam, int[] directions, int chunk, bool normalize, int columns_as_rows=-1, "
    "Tensor? decay=None) -> Tensor",
)
torch.library.define(
    f"{NAMESPACE}::scan_backward",
    "(Tensor grad_h, Tensor h, Tensor x, Tensor gates, Tensor lam, int[] directions, int chunk, "
    "bool normalize, int columns_as_rows=-1, Tensor? decay=None) -> (Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.register_fake(f"{NAMESPACE}::scan")
def _scan_fake(x, gates, lam, directions, chunk, normalize, columns_as_rows=-1, decay=None):
    batch, dirs, _, _, height, width = gates.shape
    return x.new_empty((batch, dirs, x.shape[-3], height, width))


@torch.library.register_fake(f"{NAMESPACE}::scan_backward")
def _scan_backward_fake(grad_h, h, x, gates, lam, directions, chunk, normalize, columns_as_rows=-1, decay=None):
    grad_decay = gates.new_empty((0,)) if decay is None else decay.new_empty(decay.shape)
    return x.new_empty(x.shape), gates.new_empty(gates.shape), lam.new_empty(lam.shape), grad_decay


def _setup_context(ctx, inputs, output):
    x, gates, lam, directions, chunk, normalize, columns_as_rows, decay = inputs  # defaults filled in
    # The backward needs the hidden state of the previous line for the gate
    # gradients; keeping the output costs nothing a caller does not keep anyway.
    ctx.save_for_backward(x, gates, lam, output, decay)
    ctx.directions = directions
    ctx.chunk = chunk
    ctx.normalize = normalize
    ctx.columns_as_rows = columns_as_rows


def _backward(ctx, grad_h):
    x, gates, lam, h, decay = ctx.saved_tensors
    grad_x, grad_gates, grad_lam, grad_decay = torch.ops.gspn.scan_backward(
        grad_h, h, x, gates, lam, ctx.directions, ctx.chunk, ctx.normalize, ctx.columns_as_rows, decay
    )
    return grad_x, grad_gates, grad_lam, None, None, None, None, None if decay is None else grad_decay


torch.library.register_autograd(f"{NAMESPACE}::scan", _backward, setup_context=_setup_context)

