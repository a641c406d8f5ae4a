"""apply_gspn / remove_gspn / adapters on tiny SD-1.x-, SDXL- and PixArt-like
pipelines saved with save_pretrained and loaded with from_pretrained."""

from __future__ import annotations

import importlib
import json
import warnings

import numpy as np
import pytest
import torch

import tiny_pipelines
from gspn_diffusers import (
    AdapterError,
    GSPNLayer,
    UnsupportedModelError,
    apply_gspn,
    gspn_layers,
    remove_gspn,
    save_gspn_adapter,
)
from gspn_diffusers.compat import from_pretrained_dtype
from gspn_diffusers.integration import GSPNAttnProcessor, denoiser_of

KINDS = ("sd", "sdxl", "pixart")


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: build(root / kind) for kind, build in tiny_pipelines.BUILDERS.items()}


def load(saved, kind):
    return tiny_pipelines.load(kind, saved[kind])


def generate(pipe, kind, height=32, width=48, seed=0, **kw):
    extra = {"use_resolution_binning": False, "clean_caption": False} if kind == "pixart" else {}
    return pipe(
        prompt="a red circle at the top left", num_inference_steps=2, height=height, width=width,
        generator=torch.Generator().manual_seed(seed), output_type="np", **extra, **kw,
    ).images


def count_self_attentions(denoiser):
    from diffusers.models.attention import BasicTransformerBlock

    return sum(
        1 for m in denoiser.modules() if isinstance(m, BasicTransformerBlock) and not m.attn1.is_cross_attention
    )


def randomize(pipe, seed=0):
    """GSPN weights away from their initialisation, so equality tests mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in gspn_layers(pipe).values():
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 64), (72, 136)])
def test_generates_after_apply(saved, kind, size):
    pipe = load(saved, kind)
    denoiser = denoiser_of(pipe)
    expected = count_self_attentions(denoiser)
    assert apply_gspn(pipe) is pipe
    layers = gspn_layers(pipe)
    assert len(layers) == expected > 0
    assert all(isinstance(layer, GSPNLayer) for layer in layers.values())
    # Cross-attention stays attention.
    assert not any(isinstance(m.processor, GSPNAttnProcessor) for n, m in denoiser.named_modules() if n.endswith("attn2"))
    images = generate(pipe, kind, *size)
    assert images.shape == (1, *size, 3) and np.isfinite(images).all()


def test_odd_latent_grids(saved):
    """Grids come from the model: a 9x17 latent gives 9x17 and 5x9 grids,
    which no token-count guess could recover."""
    pipe = load(saved, "sd")
    apply_gspn(pipe)
    seen = {}
    for name, layer in gspn_layers(pipe).items():
        layer.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[1]}))
    unet = pipe.unet
    out = unet(torch.randn(1, 4, 9, 17), 10, encoder_hidden_states=torch.randn(1, 16, 32)).sample
    assert out.shape == (1, 4, 9, 17)
    assert set(seen.values()) == {(9, 17), (5, 9)}


def test_highres_selection(saved):
    pipe = load(saved, "sd")
    apply_gspn(pipe, layers="highres")
    names = list(gspn_layers(pipe))
    assert names and all(n.startswith(("down_blocks.0.", "up_blocks.1.")) for n in names)
    remove_gspn(pipe)
    apply_gspn(pipe, layers=["down_blocks.1.*"])
    assert list(gspn_layers(pipe)) == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_identical_outputs(saved, kind):
    pipe = load(saved, kind)
    before = generate(pipe, kind)
    apply_gspn(pipe)
    randomize(pipe)
    during = generate(pipe, kind)
    assert not np.array_equal(before, during)
    assert remove_gspn(pipe) is pipe
    assert np.array_equal(generate(pipe, kind), before)
    assert not any(isinstance(m, GSPNAttnProcessor) for m in denoiser_of(pipe).modules())


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_round_trip(saved, kind, tmp_path):
    pipe = load(saved, kind)
    apply_gspn(pipe, proxy_dim=0.5, gate_groups=2, chunk=3)
    randomize(pipe)
    want = generate(pipe, kind, 48, 32)
    folder = save_gspn_adapter(pipe, tmp_path / "adapter")
    config = json.loads((folder / "gspn_adapter.json").read_text())
    assert config["options"]["chunk"] == 3 and config["base_model"] == type(denoiser_of(pipe)).__name__
    fresh = load(saved, kind)
    apply_gspn(fresh, adapter=folder)
    layer = next(iter(gspn_layers(fresh).values()))
    assert layer.chunk == 3 and layer.gate_groups == 2
    assert np.array_equal(generate(fresh, kind, 48, 32), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_pipelines(saved, dtype):
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # no deprecation warning for the dtype keyword, on any diffusers
        warnings.simplefilter("error", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(saved["sd"], **from_pretrained_dtype(dtype))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == dtype
    apply_gspn(pipe)
    assert all(p.dtype == dtype for layer in gspn_layers(pipe).values() for p in layer.parameters())
    assert np.isfinite(generate(pipe, "sd", 32, 48).astype(np.float32)).all()


def test_from_pretrained_dtype_follows_the_diffusers_version(monkeypatch):
    import diffusers

    from gspn_diffusers import compat

    for version, keyword in (("0.30.3", "torch_dtype"), ("0.39.0", "torch_dtype"), ("0.40.0", "dtype"),
                             ("0.42.0.dev0", "dtype"), ("1.0.0", "dtype")):
        monkeypatch.setattr(diffusers, "__version__", version)
        assert importlib.reload(compat).from_pretrained_dtype(torch.float16) == {keyword: torch.float16}
    monkeypatch.undo()
    importlib.reload(compat)


def test_model_cpu_offload(saved):
    """accelerate's offload hooks wrap the UNet; the grid hooks still fire."""
    pipe = load(saved, "sd")
    apply_gspn(pipe)
    randomize(pipe)
    want = generate(pipe, "sd")
    pipe.enable_model_cpu_offload(device="cpu")  # the hook machinery, with the CPU as the "accelerator"
    assert np.array_equal(generate(pipe, "sd"), want)


def test_adapter_follows_pipeline_dtype(saved, tmp_path):
    pipe = load(saved, "sd")
    apply_gspn(pipe)
    save_gspn_adapter(pipe, tmp_path / "a")
    fresh = load(saved, "sd").to(torch.bfloat16)
    apply_gspn(fresh, adapter=tmp_path / "a")
    assert all(p.dtype == torch.bfloat16 for layer in gspn_layers(fresh).values() for p in layer.parameters())
    assert np.isfinite(generate(fresh, "sd").astype(np.float32)).all()


def test_mismatched_adapters_fail_clearly(saved, tmp_path):
    from diffusers import UNet2DConditionModel

    sd = load(saved, "sd")
    apply_gspn(sd)
    folder = save_gspn_adapter(sd, tmp_path / "sd_adapter")
    sdxl = load(saved, "sdxl")  # same class, different layout
    with pytest.raises(AdapterError, match=r"layer 0 is down_blocks\.0\..* in the adapter but down_blocks\.1\."):
        apply_gspn(sdxl, adapter=folder)
    assert not any(isinstance(m, GSPNAttnProcessor) for m in sdxl.unet.modules()), "failed load must undo itself"
    wide = UNet2DConditionModel(
        sample_size=16, block_out_channels=(48, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8,
    )
    with pytest.raises(AdapterError, match="32 channels in the adapter but .* 48 channels in the model"):
        apply_gspn(wide, adapter=folder)
    with pytest.raises(AdapterError, match="made for a UNet2DConditionModel, not a PixArtTransformer2DModel"):
        apply_gspn(load(saved, "pixart"), adapter=folder)
    with pytest.raises(ValueError, match="conflicts with the adapter"):
        apply_gspn(load(saved, "sd"), adapter=folder, chunk=8)
    with pytest.raises(AdapterError, match="neither an adapter folder nor a Hub repo id"):
        apply_gspn(load(saved, "sd"), adapter=tmp_path / "missing" / "deep")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="needs gspn_adapter.json"):
        apply_gspn(load(saved, "sd"), adapter=tmp_path / "empty")


def test_unsupported_models_list_what_is_supported():
    from diffusers import SD3Transformer2DModel, UNet2DModel

    sd3 = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
    )
    with pytest.raises(UnsupportedModelError, match="SD3Transformer2DModel.*Supported: UNet2DConditionModel"):
        apply_gspn(sd3)
    with pytest.raises(UnsupportedModelError, match="UNet2DModel"):
        apply_gspn(UNet2DModel(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8,
                               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    with pytest.raises(UnsupportedModelError, match="neither a diffusers pipeline"):
        apply_gspn(object())


def test_bad_options_and_sizes(saved):
    pipe = load(saved, "pixart")
    with pytest.raises(ValueError, match="layers='most'"):
        apply_gspn(pipe, layers="most")
    with pytest.raises(ValueError, match="gate_groups=3 must divide proxy_dim"):
        apply_gspn(pipe, gate_groups=3, proxy_dim=8)
    with pytest.raises(TypeError):
        apply_gspn(pipe, colour="red")
    apply_gspn(pipe)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_gspn(pipe)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        pipe.transformer(torch.randn(1, 4, 9, 16), encoder_hidden_states=torch.randn(1, 4, 32),
                         timestep=torch.tensor([1]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def test_gradients_reach_only_gspn_when_base_frozen(saved):
    pipe = load(saved, "sd")
    unet = pipe.unet
    unet.requires_grad_(False)
    apply_gspn(pipe)
    trainable = [p for layer in gspn_layers(pipe).values() for p in layer.parameters()]
    assert all(p.requires_grad for p in trainable)
    out = unet(torch.randn(2, 4, 8, 12), 10, encoder_hidden_states=torch.randn(2, 16, 32)).sample
    out.square().mean().backward()
    gspn_ids = {id(p) for p in trainable}
    assert all(p.grad is None for p in unet.parameters() if id(p) not in gspn_ids)
    assert all(p.grad is not None for p in trainable)
    # The control heads start at zero weight (so the bottleneck's first gradient
    # is zero by construction); everything else learns from the first step.
    for layer in gspn_layers(pipe).values():
        for name, p in layer.named_parameters():
            if not name.startswith("bottleneck."):
                assert p.grad.abs().sum() > 0, name


def test_initialised_from_attention_value_and_output(saved):
    """With proxy_dim = C the value->output path equals the teacher's exactly."""
    pipe = load(saved, "sd")
    apply_gspn(pipe, proxy_dim=1.0)
    for name, layer in gspn_layers(pipe).items():
        attn = pipe.unet.get_submodule(name)
        composite = layer.proxy_out.weight @ layer.proxy_in.weight
        torch.testing.assert_close(composite, attn.to_out[0].weight @ attn.to_v.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.proxy_out.bias, attn.to_out[0].bias)


def test_callbacks_and_vae_tiling_work(saved):
    pipe = load(saved, "sd")
    apply_gspn(pipe)
    pipe.vae.enable_tiling()  # diffusers 0.42 moved tiling from the pipeline to the VAE
    steps = []
    generate(pipe, "sd", callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [0, 1]


def test_lora_with_gspn(saved, tmp_path):
    """Cross-attention LoRA keeps working; self-attention LoRA keys load into
    the kept attn1 projections (inactive while GSPN is applied)."""
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    donor = load(saved, "sd")
    donor.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                           init_lora_weights=False))
    lora = peft.get_peft_model_state_dict(donor.unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=lora, safe_serialization=True)

    pipe = load(saved, "sd")
    apply_gspn(pipe)
    randomize(pipe)
    without = generate(pipe, "sd")
    pipe.load_lora_weights(tmp_path)
    with_lora = generate(pipe, "sd")
    assert not np.array_equal(without, with_lora), "cross-attention LoRA must change the output"
    attn1 = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert hasattr(attn1.to_q, "lora_A"), "self-attention LoRA keys go to the kept projections"
    assert isinstance(attn1.processor, GSPNAttnProcessor)


def test_torch_compile_fullgraph(saved):
    pipe = load(saved, "sd")
    apply_gspn(pipe)
    randomize(pipe)
    unet = pipe.unet
    args = (torch.randn(1, 4, 8, 12), torch.tensor([10]))
    kwargs = {"encoder_hidden_states": torch.randn(1, 16, 32)}
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
        torch._dynamo.reset()
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        got = compiled(*args, **kwargs).sample
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
