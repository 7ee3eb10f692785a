"""DRAEM-style Perlin-noise anomalies (Zavrtanik et al., ICCV 2021, §3.1.1).

A Perlin noise map is rotated and thresholded into a mask; the mask is filled with an
augmented texture image blended in with factor beta ~ U(blend_min, blend_max):

    I_a = (1 - M) * I + (1 - beta) * M * I + beta * M * A

The noise, the threshold, the rotation and the texture augmentations are anomalib's
``PerlinAnomalyGenerator.generate_perturbation``; this module only seeds it per pair
and chooses the texture. DRAEM takes textures from DTD; with no ``texture_dir`` the
train normals of the other categories serve (the same category's when alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from anomaly_factory.config import PerlinSection
from anomaly_factory.errors import InputError
from anomaly_factory.generators.base import GenerationRequest, ProgressFn, Untrained
from anomaly_factory.generators.baselines.common import (
    Synthesize,
    generate_baseline_pairs,
)
from anomaly_factory.manifest import GOOD

GENERATOR = "perlin"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what torchvision.io.read_image decodes


def texture_sources(
    settings: PerlinSection, manifest: pd.DataFrame, normals: pd.DataFrame
) -> list[str]:
    """Texture images: ``texture_dir``, else other categories' train normals, else own."""
    if settings.texture_dir is not None:
        found = sorted(
            str(p)
            for p in Path(settings.texture_dir).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            raise InputError(f"baselines.perlin.texture_dir: no images in {settings.texture_dir}")
        return found
    category = normals["category"].iloc[0]
    others = manifest[
        (manifest["category"] != category)
        & (manifest["anomaly_type"] == GOOD)
        & (manifest["split"] == "train")
    ]
    pool = others if not others.empty else normals
    return sorted(pool["image_path"].astype(str).tolist())


@contextlib.contextmanager
def _textures_read_by_images_py() -> Iterator[None]:
    """anomalib reads the texture file with torchvision, which leaves a 16-bit PNG's
    values above 255 (a white texture); route that one read through ``images.read_rgb``
    (the one reader), which scales them."""
    import torch
    from anomalib.data.utils.generators import perlin as anomalib_perlin

    from anomaly_factory.images import read_rgb

    tv_io = anomalib_perlin.io

    def read_image(path: str, mode: object = None) -> torch.Tensor:
        return torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1).contiguous()

    anomalib_perlin.io = SimpleNamespace(read_image=read_image, ImageReadMode=tv_io.ImageReadMode)
    try:
        yield
    finally:
        anomalib_perlin.io = tv_io


def perlin_anomaly(
    normal: np.ndarray, texture_path: str, beta: float, seed: int, max_tries: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """One Perlin anomaly on ``normal`` (uint8 HxWx3), textured from ``texture_path``.

    Torch's global RNG drives anomalib's noise and augmentations, so it is forked and
    seeded here: the result depends on the arguments alone.
    """
    import torch
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    h, w = normal.shape[:2]
    with torch.random.fork_rng(devices=[]), _textures_read_by_images_py():
        torch.manual_seed(seed)
        augmenter = PerlinAnomalyGenerator(probability=1.0)
        for _ in range(max_tries):
            perturbation, mask = augmenter.generate_perturbation(h, w, None, texture_path)
            if mask.any():
                break
        else:
            raise RuntimeError(f"perlin: empty mask after {max_tries} tries (seed {seed})")
    img = torch.from_numpy(np.array(normal)).float().div(255)
    blended = img * (1 - mask) + (1 - beta) * img * mask + beta * perturbation
    out = (blended.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return out, mask[..., 0].numpy() > 0


def _synthesizer(settings: PerlinSection) -> Callable[[pd.DataFrame, pd.DataFrame], Synthesize]:
    def make(manifest: pd.DataFrame, normals: pd.DataFrame) -> Synthesize:
        textures = texture_sources(settings, manifest, normals)

        def synthesize(
            normal: np.ndarray, rng: np.random.Generator, seed: int
        ) -> tuple[np.ndarray, np.ndarray]:
            texture = textures[int(rng.integers(len(textures)))]
            beta = float(rng.uniform(settings.blend_min, settings.blend_max))
            return perlin_anomaly(normal, texture, beta, seed, settings.max_tries)

        return synthesize

    return make


class Perlin(Untrained):
    """DRAEM's Perlin-noise anomalies (the baseline MAGIC is compared with)."""

    name = GENERATOR

    def generate(self, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path:
        """Write ``request.n_pairs`` pairs labelled ``request.anomaly_type``; returns
        ``pairs.parquet``."""
        settings = request.cfg.baselines.perlin
        if settings.blend_min > settings.blend_max:
            raise InputError(
                f"baselines.perlin.blend_min: {settings.blend_min} is > blend_max {settings.blend_max}"
            )
        return generate_baseline_pairs(
            request, GENERATOR, "perlin", _synthesizer(settings), on_pair
        )
