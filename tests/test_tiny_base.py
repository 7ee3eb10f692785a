"""The bundled tiny base: its recipe's data, its snapshot folder, the shapes it serves, and
what it does with pixels (reconstruction); the pretraining loops behind it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from anomaly_factory.config import FactoryConfig
from anomaly_factory.generators.magic import models, pretrain, tiny_base


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


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) ** 2).mean().item() / 4  # [-1, 1] -> [0, 1]
    return 10 * float(np.log10(1 / mse))


def test_bundled_autoencoder_reconstructs_demo_normals_deterministically():
    """The base's VAE keeps a demo image (its own train normals) and is deterministic."""
    cfg = FactoryConfig()
    pipe = models.tiny_start(cfg)
    x = tiny_base.to_tensor(tiny_base.demo_train_normals(cfg, 1, cfg.model.resolution))
    with torch.no_grad():
        posterior = pipe.vae.encode(x).latent_dist
        assert float(posterior.std.max()) < 1e-5  # sample() is the mean
        recon = pipe.vae.decode(posterior.mean).sample
    assert _psnr(recon, x) >= RECON_PSNR_MIN


RECON_PSNR_MIN = 24.0  # measured 0.0 dB on the shipped base; see bench/RESULTS.md (h)


def test_pretraining_loops_learn_and_pin_the_posterior():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )
    images = tiny_base.to_tensor(tiny_base.procedural_images(8, 32, seed=0))
    gen = torch.Generator().manual_seed(0)

    def error() -> float:
        with torch.no_grad():
            return float(((vae(images).sample - images) ** 2).mean())

    before = error()
    pretrain.train_autoencoder(vae, images, 60, 3e-3, 4, 16, gen)
    assert error() < 0.5 * before
    pretrain.make_deterministic(vae)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        assert float((posterior.sample(generator=gen) - posterior.mean).abs().max()) < 1e-5
    sf = pretrain.set_latent_scale(vae, images)
    with torch.no_grad():
        assert abs(float((vae.encode(images).latent_dist.mean * sf).std()) - 1.0) < 1e-3
