"""Model presets: the tiny inpainting pipeline, its cache, and the SD2-inpainting loading path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anomaly_factory.config import FactoryConfig, ModelSection, TinyModelSection, load_config
from anomaly_factory.generators.magic import models
from anomaly_factory.generators.magic.components import build_tiny_pipeline, build_tokenizer
from anomaly_factory.generators.magic.models import load_base_pipeline, resolve_device

REPO = Path(__file__).resolve().parents[1]

SMALL_TINY = {
    "vae_channels": [8, 16, 16],
    "unet_channels": [16, 32],
    "unet_cross_attention": None,
    "base": "scratch",
    "norm_num_groups": 8,
    "text_hidden_size": 32,
    "cross_attention_dim": 32,
    "text_layers": 1,
    "pretrain_vae_steps": 2,
    "pretrain_unet_steps": 2,
    "pretrain_batch_size": 2,
}


def small_config(cache_dir: Path, **finetune) -> FactoryConfig:
    """The tiny profile, shrunk further (32 px, 8 px latent) so tests stay fast on CPU."""
    ft = {"resolution": 32, "batch_size": 4, "steps": 20, "checkpoint_every": 2, "lr": 3e-3}
    ft.update(finetune)
    overrides = {
        "model": {"resolution": 32, "device": "cpu", "cache_dir": cache_dir, "tiny": SMALL_TINY},
        "finetune": ft,
    }
    return load_config(REPO / "pipelines.yaml", "tiny", overrides=overrides)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Several test runs share two cores; one intra-op thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unet_output(unet, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, size, size, generator=gen)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def build(cfg: FactoryConfig):
    torch.manual_seed(0)
    return build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)


def test_tiny_pipeline_has_the_sd_inpainting_interface(tmp_path):
    cfg = FactoryConfig()  # schema defaults = tiny profile values
    pipe = build(cfg)
    assert pipe.unet.config.in_channels == 9  # latent 4 + mask 1 + masked-image latent 4
    assert pipe.unet.config.out_channels == 4
    assert pipe.vae.config.latent_channels == 4
    assert cfg.model.resolution // pipe.vae_scale_factor in (8, 16, 32)
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a photo of sks defect").input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids)[1:-1] == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "sks</w>",
        "defect</w>",
    ]
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert (sched.steps_offset, sched.prediction_type) == (1, "epsilon")
    assert sched.clip_sample is False and sched.set_alpha_to_one is False
    assert pipe.safety_checker is None


def test_tiny_pipeline_is_deterministic_under_manual_seed(tmp_path):
    cfg = small_config(tmp_path)
    a, b = build(cfg), build(cfg)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_pipeline_inpaints_end_to_end(tmp_path):
    cfg = small_config(tmp_path)
    pipe = build(cfg)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    out = pipe(
        prompt="a photo of sks defect",
        image=torch.rand(1, 3, 32, 32),
        mask_image=mask,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert (out >= 0).all() and (out <= 1).all()


def test_sd2_layout_folder_loads_through_the_same_path(tmp_path):
    """A pipeline saved in SD2-inpainting's folder layout loads with preset sd2_inpainting."""
    cfg = small_config(tmp_path)
    pipe = build(cfg)
    folder = tmp_path / "sd2-layout"
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= index.keys()
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == 9

    sd2 = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"preset": "sd2_inpainting"})}
    )
    sd2.model.pretrained = str(folder)
    loaded = load_base_pipeline(sd2)
    assert torch.equal(unet_output(loaded.unet, 8), unet_output(pipe.unet, 8))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.scheduler.config.clip_sample is False
    assert loaded.tokenizer("sks").input_ids == pipe.tokenizer("sks").input_ids


def test_tiny_preset_pretrains_once_and_caches_per_category(
    tmp_path, demo_manifest_path, monkeypatch
):
    cfg = small_config(tmp_path / "cache")
    pipe = load_base_pipeline(cfg, "nut_demo", demo_manifest_path)
    folders = list((tmp_path / "cache" / "tiny").iterdir())
    assert [f.name.split("-")[0] for f in folders] == ["nut_demo"]
    assert (folders[0] / "model_index.json").is_file()
    # the VAE's latent scale was fitted to the category's images (SD's 0.18215 analogue)
    assert pipe.vae.config.scaling_factor != 0.18215

    def no_pretraining(*args, **kwargs):
        raise AssertionError("cached model was rebuilt")

    monkeypatch.setattr(models, "pretrain_tiny", no_pretraining)
    again = load_base_pipeline(cfg, "nut_demo", demo_manifest_path)
    assert torch.equal(unet_output(again.unet, 8), unet_output(pipe.unet, 8))


def test_tiny_preset_needs_category_and_manifest(tmp_path):
    with pytest.raises(ValueError, match="category"):
        load_base_pipeline(small_config(tmp_path))


def test_resolve_device():
    assert resolve_device(ModelSection(device="cpu")).type == "cpu"
    auto = resolve_device(ModelSection(device="auto")).type
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="model.device"):
            resolve_device(ModelSection(device="cuda"))


def test_bad_tiny_shapes_name_the_field():
    bad = ModelSection(tiny=TinyModelSection(vae_channels=[12, 24], norm_num_groups=8))
    cfg = FactoryConfig()
    with pytest.raises(ValueError, match=r"model\.tiny\.vae_channels: 12"):
        build_tiny_pipeline(bad, cfg.finetune, cfg.generate.scheduler)


def test_tokenizer_rejects_words_it_cannot_spell():
    with pytest.raises(ValueError, match="only"):
        build_tokenizer(["sks", "défaut"])


def test_inpaint_masks_mix_boxes_and_thin_strokes():
    from anomaly_factory.generators.magic.pretrain import random_inpaint_masks

    masks = random_inpaint_masks(32, 32, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (32, 1, 32, 32)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    areas = masks.mean((1, 2, 3))
    assert (areas > 0).all() and areas.min() < 0.05 < areas.max()  # thin strokes and boxes


def test_mask_weighted_loss_matches_a_hand_computed_weighting():
    from diffusers import DDPMScheduler

    from anomaly_factory.generators.magic.training import inpainting_loss, latent_mask

    torch.manual_seed(0)
    cfg = FactoryConfig()
    pipe = build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    lat = torch.randn(2, 4, 16, 16)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 8:24, 8:40] = 1
    cond = torch.randn(1, 77, cfg.model.tiny.cross_attention_dim)

    def loss(w: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return inpainting_loss(pipe.unet, sched, lat, masks, lat, cond, g, w)

    g = torch.Generator().manual_seed(1)  # the same draws by hand: noise, then timesteps
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    m = latent_mask(masks, 16)
    with torch.no_grad():
        pred = pipe.unet(
            torch.cat([sched.add_noise(lat, noise, t), m, lat], 1),
            t,
            encoder_hidden_states=cond.expand(2, -1, -1),
        ).sample
    err = (pred - noise) ** 2
    weight = 1 + 9 * m
    assert torch.allclose(loss(1.0), err.mean(), rtol=1e-5)
    assert torch.allclose(loss(10.0), (weight * err).mean() / weight.mean(), rtol=1e-5)


def test_cross_attention_levels_are_chosen_per_level_and_checked():
    from anomaly_factory.generators.magic.components import build_tiny_unet

    tiny = TinyModelSection(unet_cross_attention=[False, True, False])
    unet = build_tiny_unet(tiny, 16)
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    default = build_tiny_unet(TinyModelSection(), 16)  # SD's layout: all but the deepest
    assert default.config.down_block_types[:2] == ("CrossAttnDownBlock2D",) * 2
    with pytest.raises(ValueError, match="unet_cross_attention: 2 entries for 3 levels"):
        build_tiny_unet(TinyModelSection(unet_cross_attention=[True, False]), 16)
