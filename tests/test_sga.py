"""SGA: diffusers' IP-Adapter decoupled cross-attention on MAGIC's tiny inpainting backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from PIL import Image
from safetensors.torch import save_file

from anomaly_factory.config import FactoryConfig
from anomaly_factory.generators.anomalycontrol import sga
from anomaly_factory.generators.magic.components import build_tiny_pipeline

FEATURE_DIM = 32


def _pipe():
    cfg = FactoryConfig()
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs() -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 8:30] = 255
    return dict(
        prompt=["a photo of sks defect"] * 2,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask),
        strength=0.7,
        num_inference_steps=4,
        guidance_scale=7.0,
        height=64,
        width=64,
        output_type="np",
    )


def _run(pipe, embeds=None) -> np.ndarray:
    extra = {} if embeds is None else {"ip_adapter_image_embeds": embeds}
    return pipe(generator=torch.Generator().manual_seed(3), **_inputs(), **extra).images


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, FEATURE_DIM, generator=torch.Generator().manual_seed(1))


def test_scale_zero_reproduces_base_model_exactly(features) -> None:
    pipe = _pipe()
    base = _run(pipe)
    sga.install_adapter(pipe.unet, FEATURE_DIM, n_tokens=4, scale=0.0)
    with_adapter = _run(pipe, sga.semantic_embeds(features, guidance=True))
    assert np.array_equal(base, with_adapter)
    pipe.set_ip_adapter_scale(1.0)  # diffusers' own lambda setter reaches our processors
    assert not np.allclose(base, _run(pipe, sga.semantic_embeds(features, guidance=True)))


def test_new_key_value_start_from_text_ones() -> None:
    pipe = _pipe()
    cross = sga.cross_attention_layers(pipe.unet)
    sga.install_adapter(pipe.unet, FEATURE_DIM, n_tokens=4)
    procs = sga.adapter_processors(pipe.unet)
    assert set(procs) == set(cross) and len(procs) > 0
    for name, attn in cross.items():
        assert isinstance(procs[name], IPAdapterAttnProcessor2_0)
        assert torch.equal(procs[name].to_k_ip[0].weight, attn.to_k.weight)
        assert torch.equal(procs[name].to_v_ip[0].weight, attn.to_v.weight)
        assert procs[name].to_k_ip[0].weight.data_ptr() != attn.to_k.weight.data_ptr()


def test_only_adapter_parameters_train() -> None:
    pipe = _pipe()
    sga.install_adapter(pipe.unet, FEATURE_DIM, n_tokens=4)
    params = sga.adapter_parameters(pipe.unet)
    n_cross = len(sga.cross_attention_layers(pipe.unet))
    assert len(params) == 4 + 2 * n_cross  # projection (linear + norm) + k/v per layer
    base_ids = {id(p) for n, p in pipe.unet.named_parameters() if "processor" not in n}
    proj_ids = {id(p) for p in sga.projection_layer(pipe.unet).parameters()}
    assert not ({id(p) for p in params} - proj_ids) & base_ids


def _trained_pipe(n_tokens: int):
    """A pipeline with SGA moved away from its initialisation, so comparisons mean something."""
    pipe = _pipe()
    sga.install_adapter(pipe.unet, FEATURE_DIM, n_tokens=n_tokens)
    with torch.no_grad():
        for p in sga.adapter_parameters(pipe.unet):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return pipe


def test_weights_load_with_diffusers_ip_adapter_loader(tmp_path, features) -> None:
    """Our layout is IP-Adapter's: diffusers' ``load_ip_adapter`` gives the same output."""
    pipe = _trained_pipe(n_tokens=4)
    state = sga.adapter_state_dict(pipe.unet)
    save_file(state, str(tmp_path / "sga.safetensors"))
    ours = _run(pipe, sga.semantic_embeds(features, guidance=True))

    other = _pipe()
    other.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name="sga.safetensors", image_encoder_folder=None
    )
    theirs = _run(other, sga.semantic_embeds(features, guidance=True))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)

    fresh = _pipe()
    sga.install_adapter(fresh.unet, FEATURE_DIM, n_tokens=4)
    sga.load_adapter_state_dict(fresh.unet, state)
    assert np.array_equal(ours, _run(fresh, sga.semantic_embeds(features, guidance=True)))
    with pytest.raises(ValueError, match="shape"):
        bad = dict(state, **{"image_proj.proj.bias": torch.zeros(3)})
        sga.load_adapter_state_dict(fresh.unet, bad)


@pytest.mark.parametrize(("n_tokens", "loader"), [(4, "load_ip_adapter"), (2, "install_adapter")])
def test_adapter_weights_load_through_diffusers_with_four_tokens(
    tmp_path, features, n_tokens, loader
) -> None:
    """Generation loads 4-token weights with ``pipe.load_ip_adapter`` and sets lambda with
    ``pipe.set_ip_adapter_scale``; other token counts keep the custom install."""
    pipe = _trained_pipe(n_tokens)
    save_file(sga.adapter_state_dict(pipe.unet), str(tmp_path / "adapter.safetensors"))
    pipe.set_ip_adapter_scale(0.6)
    ours = _run(pipe, sga.semantic_embeds(features, guidance=True))

    other = _pipe()
    how = sga.load_adapter_weights(
        other, tmp_path / "adapter.safetensors", FEATURE_DIM, n_tokens, scale=0.6
    )
    assert how == loader
    assert all(p.scale == [0.6] for p in sga.adapter_processors(other.unet).values())
    theirs = _run(other, sga.semantic_embeds(features, guidance=True))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
