"""MAGIC's base model, loaded or made: SD2 inpainting (``paper``) or a tiny stand-in (``tiny``).

Both presets give a :class:`diffusers.StableDiffusionInpaintPipeline` whose UNet
takes MAGIC's 9 input channels (CONTEXT §1): the noisy latent (4), the mask on
the latent grid (1) and the latent of the masked image (4). ``sd2_inpainting``
loads ``stabilityai/stable-diffusion-2-inpainting`` (or a local folder in the
same diffusers layout); ``tiny`` starts from the bundled base (or the components of
``components.py``) and adapts it to a category's normal images (``pretrain.py``),
standing in for SD2's own pretraining. This module is where that result is cached
(per category, keyed by what made it) and loaded; :func:`base_model_id` names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
)

from anomaly_factory.config import (
    FactoryConfig,
    ModelSection,
    SchedulerSection,
)
from anomaly_factory.errors import InputError
from anomaly_factory.generators.common import resolve_device, resolve_dtype, resolve_path
from anomaly_factory.generators.magic.components import (
    _latent_size,
    build_tiny_pipeline,
    ddim_settings,
    tokenizer_words,
)
from anomaly_factory.generators.magic.pretrain import pretrain_tiny
from anomaly_factory.generators.magic.training import load_image, load_mask
from anomaly_factory.manifest import read_images, select

log = logging.getLogger(__name__)

TINY_SUBDIR = "tiny"


# --------------------------------------------------------------------------- tiny cache
def tiny_cache_dir(cfg: FactoryConfig, category: str, manifest_path: Path) -> Path:
    """``cache_dir/tiny/<category>-<hash of model config + pretraining images>``."""
    df = pretrain_rows(manifest_path, category, cfg.model.tiny.base == "bundled")
    key = {
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir", "device", "pretrained"}),
        "words": tokenizer_words(cfg.finetune, cfg.model.tiny),
        "scheduler": cfg.generate.scheduler.model_dump(mode="json"),
        "data": sorted(df["sha256"].tolist()),
        "base": _base_digest(cfg),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.model.cache_dir) / TINY_SUBDIR / f"{category}-{digest}"


def _base_digest(cfg: FactoryConfig) -> str | None:
    """The bundled base's weights digest (its folder name), or None from scratch."""
    if cfg.model.tiny.base == "scratch":
        return None
    from anomaly_factory.generators.magic.tiny_base import bundled_folder

    return bundled_folder(cfg.model.tiny.base_folder).name


def tiny_start(cfg: FactoryConfig) -> StableDiffusionInpaintPipeline:
    """The weights a category's tiny model starts from: the bundled base, or random ones."""
    if cfg.model.tiny.base == "scratch":
        return build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)
    from anomaly_factory.generators.magic.tiny_base import (
        bundled_folder,
        check_shapes,
        verify_digest,
    )

    folder = bundled_folder(cfg.model.tiny.base_folder)
    check_shapes(cfg, folder)
    verify_digest(folder)
    cpu = cfg.model.model_copy(update={"device": "cpu", "dtype": "float32"})
    pipe = from_folder(folder, cpu, cfg.generate.scheduler)
    pipe.unet.register_to_config(sample_size=_latent_size(cfg.model))
    pipe.vae.register_to_config(sample_size=cfg.model.resolution)
    return pipe


def pretrain_rows(manifest_path: Path, category: str, with_fewshot: bool) -> pd.DataFrame:
    """The images a category's tiny model is pretrained on: its ``train`` normals and its
    few-shot anomalies (every type's; the fine-tuning data, never a test image), so the
    decoder learns the defects' colours as well as the object's."""
    images = read_images(manifest_path)
    train = select(images, category=category, split="train")
    if train.empty:
        raise InputError(f"{manifest_path}: no 'train' images for category {category!r}")
    if not with_fewshot:
        return train
    return pd.concat([train, select(images, category=category, split="fewshot")])


def train_images(
    manifest_path: Path, category: str, size: int, with_fewshot: bool = False
) -> torch.Tensor:
    df = pretrain_rows(manifest_path, category, with_fewshot)
    paths = [resolve_path(p, manifest_path) for p in df["image_path"]]
    return torch.stack([load_image(p, size) for p in paths])


def train_masks(
    manifest_path: Path, category: str, size: int, with_fewshot: bool = False
) -> torch.Tensor:
    """The defect masks of :func:`train_images`' rows (all zeros for a normal image)."""
    df = pretrain_rows(manifest_path, category, with_fewshot)
    empty = torch.zeros(1, size, size)
    return torch.stack(
        [
            load_mask(resolve_path(p, manifest_path), size) if isinstance(p, str) and p else empty
            for p in df["mask_path"]
        ]
    )


def pretrained_tiny_pipeline(
    cfg: FactoryConfig, category: str, manifest_path: Path, show_progress: bool = False
) -> Path:
    """Build and pretrain the category's tiny model unless cached; return its folder.

    The cache is written to a temporary folder and renamed into place, so an
    interrupted pretraining never leaves a half-written model behind.
    """
    target = tiny_cache_dir(cfg, category, manifest_path)
    if (target / "model_index.json").is_file():
        return target
    device = resolve_device(cfg.model)
    torch.manual_seed(cfg.model.tiny.seed)
    pipe = tiny_start(cfg)
    bundled = cfg.model.tiny.base == "bundled"
    images = train_images(manifest_path, category, cfg.model.resolution, bundled)
    masks = train_masks(manifest_path, category, cfg.model.resolution, bundled)
    losses = pretrain_tiny(pipe, images, cfg.model.tiny, device, show_progress, masks)
    log.info("tiny pretraining of %s: %s", category, losses)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps(losses, sort_keys=True) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- loading
def from_folder(
    folder: str | Path, model: ModelSection, scheduler: SchedulerSection
) -> StableDiffusionInpaintPipeline:
    """Load a diffusers inpainting folder (or hub id), switch to DDIM, move to device/dtype.

    The same call serves the full SD2-inpainting checkpoint and the tiny cache,
    which is saved in the same layout (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, model_index.json).
    """
    device = resolve_device(model)
    dtype = resolve_dtype(model, device)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(folder),
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **ddim_settings(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_base_pipeline(
    cfg: FactoryConfig,
    category: str | None = None,
    manifest_path: Path | None = None,
) -> StableDiffusionInpaintPipeline:
    """The preset's pipeline: SD2 inpainting from ``model.pretrained``, or the category's
    pretrained tiny model (built and pretrained on its ``train`` images if not cached)."""
    if cfg.model.preset == "sd2_inpainting":
        return from_folder(cfg.model.pretrained, cfg.model, cfg.generate.scheduler)
    if category is None or manifest_path is None:
        raise InputError("model.preset 'tiny' needs a category and an image manifest to pretrain")
    folder = pretrained_tiny_pipeline(cfg, category, Path(manifest_path))
    return from_folder(folder, cfg.model, cfg.generate.scheduler)


def base_model_id(cfg: FactoryConfig, category: str | None, manifest_path: Path | None) -> str:
    """What identifies the base weights: the hub id / folder, or the tiny cache folder."""
    if cfg.model.preset == "sd2_inpainting":
        return cfg.model.pretrained
    if category is None or manifest_path is None:
        raise InputError("model.preset 'tiny' needs a category and an image manifest")
    return str(tiny_cache_dir(cfg, category, Path(manifest_path)))
