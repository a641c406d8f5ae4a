"""The GSPN layer on its own (no diffusers)."""

from __future__ import annotations

import pytest
import torch

from gspn_diffusers.layer import GSPNLayer, default_proxy_dim


def test_shapes_and_grid_checks():
    layer = GSPNLayer(32, proxy_dim=8, gate_groups=2, chunk=4)
    tokens = torch.randn(2, 5 * 7, 32)
    assert layer(tokens, (5, 7)).shape == (2, 35, 32)
    with pytest.raises(ValueError, match="35 tokens for a 7x7 grid"):
        layer(tokens, (7, 7))
    with pytest.raises(ValueError, match="built for 32 channels got tokens with 16"):
        layer(torch.randn(2, 35, 16), (5, 7))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"proxy_dim": 0}, "proxy_dim must be in"),
        ({"proxy_dim": 64}, "proxy_dim must be in"),
        ({"proxy_dim": 8, "gate_groups": 3}, "gate_groups=3 must divide proxy_dim=8"),
        ({"chunk": 0}, "chunk must be a positive int"),
    ],
)
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GSPNLayer(32, **kwargs)


def test_default_proxy_dim():
    assert [default_proxy_dim(c) for c in (4, 32, 320, 640, 1280)] == [4, 8, 40, 80, 160]


def test_fresh_layer_is_a_bounded_spatial_average():
    """At initialisation each direction is an even moving average of the
    value path, so a constant input maps to (proxy_out . proxy_in)(x) scaled
    by at most 1, whatever the grid size: no blow-up over many lines."""
    torch.manual_seed(0)
    layer = GSPNLayer(16, proxy_dim=16)
    v, o = torch.randn(16, 16), torch.randn(16, 16)
    layer.init_from_attention(v, o)
    x = torch.randn(1, 1, 16).expand(1, 64 * 64, 16)
    y = layer(x, (64, 64))
    exact = x @ (o @ v).T
    ratio = (y * exact).sum(-1) / exact.square().sum(-1)
    assert ((ratio > 0) & (ratio <= 1.0 + 1e-4)).all()


def test_init_from_attention_rejects_wrong_shapes():
    layer = GSPNLayer(16)
    with pytest.raises(ValueError, match=r"compose to \(16, 8\)"):
        layer.init_from_attention(torch.randn(16, 8), torch.randn(16, 16))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_on_cuda_matches_cpu(compiled_cuda, dtype):
    """The whole layer (projections, four fused-normalisation scans, output
    gates) gives the CPU's outputs and gradients on the GPU."""
    torch.manual_seed(0)
    layer = GSPNLayer(64, proxy_dim=16, gate_groups=4, chunk=None)
    tokens = torch.randn(2, 24 * 40, 64)
    want = layer(tokens.requires_grad_(), (24, 40))
    want.square().mean().backward()
    want_grads = [tokens.grad] + [None if p.grad is None else p.grad.clone() for p in layer.parameters()]
    gpu = layer.to("cuda", dtype)
    gpu.zero_grad(set_to_none=True)
    x = tokens.detach().to("cuda", dtype).requires_grad_()
    got = gpu(x, (24, 40))
    got.float().square().mean().backward()
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    scale = want.abs().max()
    assert (got.float().cpu() - want.detach()).abs().max() <= tol * scale
    for (name, param), ref in zip([("tokens", x)] + list(gpu.named_parameters()), want_grads):
        if ref is None:
            continue
        err = (param.grad.float().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert err <= 10 * tol, f"{name}: relative gradient error {err:.2e}"
