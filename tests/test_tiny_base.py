"""The bundled tiny base: its recipe's data, its snapshot folder, the shapes it serves, and
what it does with pixels (reconstruction); the pretraining loops behind it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from anomaly_factory.config import FactoryConfig, load_config
from anomaly_factory.generators.magic import models, pretrain, tiny_base

REPO = Path(__file__).resolve().parents[1]


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


SMALL = {
    "base": "bundled",
    "vae_channels": [8, 16, 16],
    "unet_channels": [16, 32],
    "unet_cross_attention": None,
    "norm_num_groups": 8,
    "text_hidden_size": 32,
    "cross_attention_dim": 32,
    "text_layers": 1,
    "pretrain_vae_steps": 4,
    "pretrain_unet_steps": 0,
    "pretrain_batch_size": 2,
}
RECIPE = tiny_base.BaseRecipe(
    size=32,
    n_procedural=6,
    demo_train_per_category=1,
    vae_steps=3,
    vae_batch_size=2,
    vae_crop=16,
    unet_steps=2,
    unet_batch_size=2,
)


def small_config(root, **tiny) -> FactoryConfig:
    overrides = {
        "model": {
            "resolution": 32,
            "device": "cpu",
            "tiny": {**SMALL, "base_folder": str(root), **tiny},
        }
    }
    return load_config(REPO / "pipelines.yaml", "tiny", overrides=overrides)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A base built by the build script's code with a few-step recipe."""
    root = tmp_path_factory.mktemp("tiny_inpaint")
    torch.set_num_threads(1)
    folder = tiny_base.build_base(small_config(root), root, RECIPE, show_progress=False)
    return root, folder


def test_a_built_base_is_content_addressed_and_loads_as_the_start(small_base):
    root, folder = small_base
    cfg = small_config(root)
    assert tiny_base.bundled_folder(root) == folder
    assert folder.name == tiny_base.weights_digest(folder)
    recipe = tiny_base.read_recipe(folder)
    assert recipe["data"]["test_images"] == 0 and recipe["recipe"]["vae_steps"] == 3
    tiny_base.check_shapes(cfg, folder)
    pipe = models.tiny_start(cfg)
    saved = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    name, tensor = next(iter(saved.items()))
    assert torch.equal(pipe.unet.state_dict()[name], tensor)
    with torch.no_grad():  # the base's VAE is deterministic: sample() is the mean
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        assert float(pipe.vae.encode(x).latent_dist.std.max()) < 1e-5


def test_other_shapes_or_tokens_are_refused_with_the_field_named(small_base):
    root, folder = small_base
    with pytest.raises(ValueError, match=r"model.tiny.base.*model.tiny.unet_channels"):
        tiny_base.check_shapes(small_config(root, unet_channels=[16, 64]), folder)
    cfg = small_config(root)
    cfg.finetune.anomaly_token = "zzq"
    with pytest.raises(ValueError, match=r"finetune.anomaly_token.*'zzq'"):
        tiny_base.check_shapes(cfg, folder)


def test_decoder_adaptation_keeps_the_latent_space_and_fits_the_images(small_base):
    """Only the decoder moves (the UNet's latent space stays), and reconstruction improves."""
    root, _ = small_base
    pipe = models.tiny_start(small_config(root))
    vae = pipe.vae
    images = tiny_base.to_tensor(tiny_base.procedural_images(4, 32, seed=7))
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}

    def error() -> float:
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
            return float(((vae.decode(latents).sample - images) ** 2).mean())

    before = error()
    gen = torch.Generator().manual_seed(0)
    pretrain.adapt_decoder(vae, images, 40, 3e-3, 4, 16, gen)
    assert error() < before
    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in encoder.items())


def test_defect_weights_make_the_adapted_decoder_render_the_defect(small_base):
    """A bright 4 px defect on 2% of each image: weighted, the decoder learns its colour;
    unweighted, it keeps rendering the background there (what the demo's carpet showed)."""
    root, _ = small_base
    images = tiny_base.to_tensor(tiny_base.procedural_images(4, 32, seed=11))
    masks = torch.zeros(4, 1, 32, 32)
    masks[:, :, 12:16, 12:16] = 1.0
    images = torch.where(masks > 0.5, torch.tensor([1.0, 1.0, -1.0])[:, None, None], images)

    def in_mask_error(weights) -> float:
        torch.manual_seed(0)
        vae = models.tiny_start(small_config(root)).vae
        gen = torch.Generator().manual_seed(0)
        pretrain.adapt_decoder(vae, images, 40, 3e-3, 4, None, gen, weights=weights)
        with torch.no_grad():
            recon = vae.decode(vae.encode(images).latent_dist.mean).sample
        return float(((recon - images) ** 2).mean(1, keepdim=True)[masks > 0.5].mean())

    plain = in_mask_error(None)
    weighted = in_mask_error(pretrain.defect_weights(masks, 20.0))
    assert weighted < 0.7 * plain


def test_every_defect_crop_holds_its_defect_cell_anywhere_in_the_crop():
    """A defect image's crop holds its defect cell, at every offset it can take; an image
    without one is cropped uniformly."""
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[1, 6] = True
    gen = torch.Generator().manual_seed(0)
    origins = {pretrain.crop_origin(cells, 8, 4, gen) for _ in range(400)}
    assert all(y <= 1 < y + 4 and x <= 6 < x + 4 for y, x in origins)
    assert {y for y, _ in origins} == {0, 1} and {x for _, x in origins} == {3, 4}
    free = {pretrain.crop_origin(None, 8, 4, gen) for _ in range(400)}
    assert free == {(y, x) for y in range(5) for x in range(5)}


def test_defect_batches_and_crops_render_a_small_defect_that_weighting_alone_misses(small_base):
    """Two defect images among twelve, a 3 px defect in a corner, 16 px crops of 32: with
    half of each batch from the defect images and crops that hold the defect, the
    decoder learns its colour at the same step count."""
    root, _ = small_base
    images = tiny_base.to_tensor(tiny_base.procedural_images(12, 32, seed=5))
    masks = torch.zeros(12, 1, 32, 32)
    masks[:2, :, 2:5, 26:29] = 1.0
    images = torch.where(masks > 0.5, torch.tensor([-1.0, -1.0, -1.0])[:, None, None], images)
    weights = pretrain.defect_weights(masks, 20.0)

    def in_mask_error(share: float, crops: bool) -> float:
        torch.manual_seed(0)
        vae = models.tiny_start(small_config(root)).vae
        gen = torch.Generator().manual_seed(0)
        pretrain.adapt_decoder(
            vae, images, 40, 3e-3, 4, 16, gen, None, weights, False, masks, share, crops
        )
        with torch.no_grad():
            recon = vae.decode(vae.encode(images[:2]).latent_dist.mean).sample
        return float(((recon - images[:2]) ** 2).mean(1, keepdim=True)[masks[:2] > 0.5].mean())

    weighted = in_mask_error(0.0, False)
    focused = in_mask_error(0.5, True)
    assert focused < 0.7 * weighted, (focused, weighted)


def test_a_damaged_snapshot_is_refused(small_base, tmp_path):
    import shutil

    _, folder = small_base
    copy = tmp_path / "root" / folder.name
    shutil.copytree(folder, copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    cfg = small_config(copy.parent)
    with pytest.raises(ValueError, match="digest .* differs from the folder name"):
        models.tiny_start(cfg)


def test_the_shipped_base_is_intact_and_serves_the_tiny_profile():
    folder = tiny_base.bundled_folder()
    tiny_base.verify_digest(folder)
    tiny_base.check_shapes(load_config(REPO / "pipelines.yaml", "tiny"), folder)
    assert tiny_base.read_recipe(folder)["data"]["test_images"] == 0


def test_a_missing_or_ambiguous_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="found 0"):
        tiny_base.bundled_folder(tmp_path)
    for name in ("aaa", "bbb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / tiny_base.RECIPE_FILE).write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="found 2"):
        tiny_base.bundled_folder(tmp_path)


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
    assert error() < 0.75 * before  # 0.39 -> 0.26 in 60 steps
    pretrain.make_deterministic(vae)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        assert float((posterior.sample(generator=gen) - posterior.mean).abs().max()) < 1e-5
    sf = pretrain.set_latent_scale(vae, images)
    with torch.no_grad():
        assert abs(float((vae.encode(images).latent_dist.mean * sf).std()) - 1.0) < 1e-3
