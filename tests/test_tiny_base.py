"""The bundled tiny base: its recipe's data, its snapshot folder, and the shapes it serves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from anomaly_factory.config import FactoryConfig
from anomaly_factory.generators.magic import models, tiny_base


def test_procedural_images_are_seeded_and_varied():
    a = tiny_base.procedural_images(6, 32, seed=3)
    b = tiny_base.procedural_images(6, 32, seed=3)
    c = tiny_base.procedural_images(6, 32, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    means = a.reshape(6, -1, 3).mean(1)
    assert np.ptp(means, axis=0).max() > 20  # colours differ between images


def test_demo_train_normals_are_the_train_images_never_test():
    from anomaly_factory.datasets.demo import render_category

    cfg = FactoryConfig()
    imgs = tiny_base.demo_train_normals(cfg, 2, cfg.demo.size)
    cats = cfg.demo.categories
    assert imgs.shape == (2 * len(cats), cfg.demo.size, cfg.demo.size, 3)
    first, _ = render_category(cats[0], "good", cfg.demo.size, cfg.demo.seed, 0)
    test0, _ = render_category(cats[0], "good", cfg.demo.size, cfg.demo.seed, 1000)
    assert np.array_equal(imgs[0], first) and not np.array_equal(imgs[0], test0)


def test_the_bundled_snapshot_serves_the_default_shapes():
    cfg = FactoryConfig()
    folder = tiny_base.bundled_folder()
    tiny_base.check_shapes(cfg, folder)
    assert folder.name == tiny_base.weights_digest(folder)  # content-addressed
    recipe = tiny_base.read_recipe(folder)
    assert recipe["data"]["test_images"] == 0


def test_other_shapes_are_refused_with_the_field_named():
    cfg = FactoryConfig()
    cfg.model.tiny.unet_channels = [16, 32, 32]
    with pytest.raises(ValueError, match=r"model.tiny.base.*unet_channels"):
        tiny_base.check_shapes(cfg, tiny_base.bundled_folder())


def test_a_missing_or_ambiguous_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="found 0"):
        tiny_base.bundled_folder(tmp_path)
    for name in ("aaa", "bbb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / tiny_base.RECIPE_FILE).write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="found 2"):
        tiny_base.bundled_folder(tmp_path)


def test_inpaint_masks_mix_shapes_in_range():
    gen = torch.Generator().manual_seed(0)
    masks = models.random_inpaint_masks(32, 32, 0.5, gen)
    assert masks.shape == (32, 1, 32, 32)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    areas = masks.mean((1, 2, 3))
    assert (areas > 0).all() and areas.min() < 0.05 < areas.max()  # thin strokes and boxes


def test_mask_weighted_loss_matches_a_hand_computed_weighting():
    torch.manual_seed(0)
    cfg = FactoryConfig()
    pipe = models.build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    lat = torch.randn(2, 4, 16, 16)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 8:24, 8:40] = 1
    cond = torch.randn(1, 77, cfg.model.tiny.cross_attention_dim)

    def loss(w: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return models.inpainting_loss(pipe.unet, sched, lat, masks, lat, cond, g, w)

    # the same draws by hand: noise, then timesteps (the order inpainting_loss uses)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    m = models.latent_mask(masks, 16)
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
