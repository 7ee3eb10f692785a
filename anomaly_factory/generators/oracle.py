"""The demo's oracle generator: true defects painted by the demo's own renderer.

For the procedural demo dataset the renderer *is* the ground truth, so its pairs
are what a perfect generator would make: a fresh defect mask of the type drawn on
the chosen normal's exact object (``datasets.demo.foreground``), the defect painted
on exactly the mask's pixels, the background untouched. The gates are calibrated on
it (every pair check and type gate must pass) and ``bench/quality.py`` uses it as
the ceiling the real generators are measured against.

Pairs are made at the demo's native size (the size of its train normals), not at
``cfg.model.resolution``: the demo's defects have fixed pixel widths (a crack is
2 px wide at any size), so only at the native size is the oracle's output
distributed exactly like the real anomaly images, which is what the type gates are
calibrated on. Consumers that need another size resize, as they do for real images.
The object mask is the demo's exact foreground when the stored normal is the demo
render of ``demo.seed`` (checked pixel for pixel), else the weight-free border-colour
foreground of the normal.

Demo categories only: elsewhere there is no renderer to be an oracle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_factory.datasets import demo
from anomaly_factory.errors import InputError
from anomaly_factory.generators.base import GenerationRequest, ProgressFn, Untrained
from anomaly_factory.generators.baselines.common import Synthesize, generate_baseline_pairs
from anomaly_factory.images import read_rgb

GENERATOR = "oracle"


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def demo_foreground(path: str, category: str, seed: int) -> np.ndarray | None:
    """The exact object mask of a stored demo train normal, or None when the file is not
    the demo render of ``seed`` (another seed, or not a demo image)."""
    stored = read_rgb(path)
    try:
        index = int(Path(path).stem)
    except ValueError:
        return None
    size = stored.shape[0]
    if stored.shape[:2] != (size, size):
        return None
    rendered, _ = demo.render_category(category, "good", size, seed, index)
    if not np.array_equal(rendered, stored):
        return None
    return demo.foreground(category, size, seed, index)


def foregrounds(seed: int, category: str, normals: pd.DataFrame) -> dict[str, np.ndarray]:
    """Object masks of the train normals, keyed by the digest of the normal's pixels."""
    from anomaly_factory.generators.magic.foreground import border_color_foreground

    out = {}
    for path in normals["image_path"].astype(str):
        normal = read_rgb(path)
        if category in demo.TEXTURES:
            fg = np.ones(normal.shape[:2], bool)
        else:
            exact = demo_foreground(path, category, seed)
            fg = exact if exact is not None else border_color_foreground(normal)
        out[_digest(normal)] = fg
    return out


def native_size(manifest_path: Path, category: str) -> int:
    """The side of a demo category's train normals (the size the demo was rendered at)."""
    from anomaly_factory.manifest import GOOD, read_images, select

    rows = select(read_images(manifest_path), category, GOOD, "train")
    sizes = set(zip(rows["width"], rows["height"], strict=True))
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise InputError(
            f"generator oracle: {category} train normals are not square images of one size "
            f"({sorted(sizes)[:3]}); not the demo dataset?"
        )
    return int(next(iter(sizes))[0])


def oracle_anomaly(
    category: str,
    anomaly_type: str,
    normal: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A true defect of the type on ``normal`` at a fresh mask drawn on ``foreground``."""
    for _ in range(demo.MAX_REDRAWS):
        mask = demo.defect_mask(category, anomaly_type, foreground, rng)
        if mask.sum() >= demo.MIN_DEFECT_PIXELS:
            return demo.paint_defect(category, anomaly_type, normal, mask, rng), mask
    raise RuntimeError(f"oracle {category}/{anomaly_type}: could not place a defect")


class Oracle(Untrained):
    """The demo renderer's true defects: the ceiling the gates are calibrated on."""

    name = GENERATOR

    def generate(self, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path:
        """Write ``request.n_pairs`` pairs labelled ``request.anomaly_type``; returns
        ``pairs.parquet``."""
        category, anomaly_type = request.category, request.anomaly_type
        if category not in demo.ANOMALY_TYPES:
            raise InputError(
                f"generator oracle: {category!r} is not a demo category "
                f"({sorted(demo.ANOMALY_TYPES)}); the oracle exists only for the demo dataset"
            )
        if anomaly_type not in demo.ANOMALY_TYPES[category]:
            raise InputError(
                f"generator oracle: {category} has no anomaly type {anomaly_type!r} "
                f"(known: {demo.ANOMALY_TYPES[category]})"
            )

        def make(manifest: pd.DataFrame, normals: pd.DataFrame) -> Synthesize:
            del manifest
            masks = foregrounds(request.cfg.demo.seed, category, normals)
            return lambda normal, rng, seed: oracle_anomaly(
                category, anomaly_type, normal, masks[_digest(normal)], rng
            )

        size = native_size(Path(request.manifest), category)  # the demo's own, not the model's
        return generate_baseline_pairs(request, GENERATOR, "oracle", make, on_pair, size)
