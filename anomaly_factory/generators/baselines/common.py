"""The generation loop the baseline generators share: pick a train normal, make one
anomaly from it, save the pair. Seeded per pair (``common.pair_seed`` of ``generate.seed``:
the baselines have no seed of their own) and resumable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.generators.base import GenerationRequest, ProgressFn
from anomaly_factory.generators.common import pair_seed
from anomaly_factory.generators.output import (
    is_done,
    pair_key,
    pair_metadata,
    save_pair,
    write_pairs_manifest,
)
from anomaly_factory.images import read_rgb
from anomaly_factory.manifest import GOOD, read_images, select

# (normal uint8 HxWx3, per-pair rng, pair seed) -> (anomalous image, bool mask)
Synthesize = Callable[[np.ndarray, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """An image as uint8 HxWx3, optionally resized to size x size (area interpolation)."""
    return read_rgb(path, size, "area")


def train_normals(manifest: pd.DataFrame, category: str, where: str) -> pd.DataFrame:
    """The normal ``train`` images of a category; only these may become pair backgrounds."""
    rows = select(manifest, category, GOOD, "train")
    if rows.empty:
        raise InputError(f"{where}: no train normals for category {category!r}")
    return rows


def generate_baseline_pairs(
    request: GenerationRequest,
    generator: str,
    mask_source: str,
    make_synthesize: Callable[[pd.DataFrame, pd.DataFrame], Synthesize],
    on_pair: ProgressFn | None = None,
    size: int | None = None,
) -> Path:
    """Write ``request.n_pairs`` pairs of one (category, label) and rebuild ``pairs.parquet``.

    ``make_synthesize(manifest, normals)`` builds the per-pair function once, so it
    can pre-load what it needs (e.g. texture sources). ``on_pair(done, total)`` is
    called after every pair. Pairs are made at ``size`` (default ``model.resolution``).
    """
    cfg, manifest_path, out_dir = request.cfg, request.manifest, Path(request.out_dir)
    category, anomaly_type, n_pairs = request.category, request.anomaly_type, request.n_pairs
    if n_pairs < 1:
        raise InputError(f"n_pairs: {n_pairs} is not >= 1")
    manifest = read_images(manifest_path)
    normals = train_normals(manifest, category, str(manifest_path))
    dataset = str(normals["dataset"].iloc[0])
    size = size or cfg.model.resolution
    synthesize = make_synthesize(manifest, normals)
    for index in range(n_pairs):
        key = pair_key(dataset, category, anomaly_type, index)
        if on_pair is not None:
            on_pair(index, n_pairs)
        if is_done(out_dir, key):
            continue
        seed = pair_seed(cfg.generate.seed, category, anomaly_type, index)
        rng = np.random.default_rng(seed)
        source = str(normals["image_path"].iloc[int(rng.integers(len(normals)))])
        normal = load_rgb(source, size)
        image, mask = synthesize(normal, rng, seed)
        metadata = pair_metadata(
            dataset, category, anomaly_type, generator, seed, mask_source, source
        )
        save_pair(out_dir, key, image, mask, normal, metadata)
    if on_pair is not None:
        on_pair(n_pairs, n_pairs)
    return write_pairs_manifest(out_dir)
