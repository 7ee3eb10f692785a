"""Pairs manifests for gate tests: the demo's oracle and saboteurs built from it.

The oracle (``generators/oracle.py``) paints true defects on train normals; every
gate must pass it. Each saboteur breaks oracle pairs in one way that one check is
meant to catch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from anomaly_factory.config import FactoryConfig, load_config
from anomaly_factory.datasets import demo
from anomaly_factory.gates.pair_checks import as_trained, dilate
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.magic.foreground import border_color_foreground
from anomaly_factory.generators.oracle import Oracle
from anomaly_factory.generators.output import merge_pairs, save_pair, write_pairs_manifest
from anomaly_factory.images import read_mask, read_rgb
from anomaly_factory.manifest import pair_params, read_pairs

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "nut_demo"  # one object category, two anomaly types
Pair = tuple[np.ndarray, np.ndarray, np.ndarray]  # image, mask, normal


def tiny_config() -> FactoryConfig:
    return load_config(REPO / "pipelines.yaml", "tiny")


def build_pairs(
    manifest: pd.DataFrame | Path,
    out_dir: Path,
    per_type: int = 4,
    categories: tuple[str, ...] = (CATEGORY,),
    cfg: FactoryConfig | None = None,
) -> Path:
    """``per_type`` oracle pairs of every type of ``categories``; one merged pairs manifest.

    ``manifest`` is the image manifest's path, or the table (its rows carry the path of
    the demo it came from: the session fixture's ``manifest.parquet`` beside ``raw/``).
    """
    cfg = cfg or tiny_config()
    manifest_path = manifest if isinstance(manifest, Path) else _manifest_path(manifest)
    images = pd.read_parquet(manifest_path)
    parts = []
    for category in categories:
        types = sorted(images.loc[images["category"] == category, "anomaly_type"].unique())
        for anomaly_type in [t for t in types if t != "good"]:
            parts.append(
                Oracle().generate(
                    GenerationRequest(
                        cfg,
                        manifest_path,
                        category,
                        anomaly_type,
                        per_type,
                        out_dir / category / anomaly_type,
                    )
                )
            )
    return merge_pairs(parts, out_dir / "pairs.parquet")


def _manifest_path(images: pd.DataFrame) -> Path:
    first = Path(str(images["image_path"].iloc[0]))
    for parent in first.parents:
        if (parent / "manifest.parquet").is_file():
            return parent / "manifest.parquet"
    raise FileNotFoundError(f"no manifest.parquet above {first}")


# --------------------------------------------------------------------------- saboteurs
def _object(category: str, normal: np.ndarray) -> np.ndarray:
    if category in demo.TEXTURES:
        return np.ones(normal.shape[:2], bool)
    return border_color_foreground(normal)


def identity(row, pair: Pair, rng, images, state: dict) -> Pair | None:
    """The anomaly image is the normal image."""
    _, mask, normal = pair
    return normal.copy(), mask, normal


def blur(row, pair: Pair, rng, images, state: dict) -> Pair | None:
    """The whole image regenerated blurry (background destroyed, like an untrained model)."""
    image, mask, normal = pair
    return cv2.GaussianBlur(image, (0, 0), 1.5), mask, normal


def painted_outside(row, pair: Pair, rng, images, state: dict) -> Pair | None:
    """The defect painted away from the mask the pair claims."""
    _, mask, normal = pair
    free = _object(row["category"], normal) & ~dilate(mask, 8)
    for _ in range(50):
        other = demo.defect_mask(row["category"], row["anomaly_type"], free, rng)
        if other.sum() >= demo.MIN_DEFECT_PIXELS:
            image = demo.paint_defect(row["category"], row["anomaly_type"], normal, other, rng)
            return image, mask, normal
    raise RuntimeError(f"{row['key']}: no room for a defect outside the mask")


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray | None:
    """``mask`` translated by (dy, dx), or None if that moves it off the image."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    if ys.min() + dy < 0 or xs.min() + dx < 0 or ys.max() + dy >= h or xs.max() + dx >= w:
        return None
    out = np.zeros_like(mask)
    out[ys + dy, xs + dx] = True
    return out


def _place(mask: np.ndarray, allowed: np.ndarray, rng, min_inside: float = 1.0) -> np.ndarray:
    """``mask`` translated to a random place with ``min_inside`` of it in ``allowed``."""
    h, w = mask.shape
    for _ in range(5000):
        dy, dx = (int(v) for v in rng.integers(-h, h, 2))
        moved = _shift(mask, dy, dx)
        if moved is not None and (moved & allowed).sum() >= min_inside * moved.sum():
            return moved
    raise RuntimeError("no translation keeps the mask inside the allowed region")


def off_object(row, pair: Pair, rng, images, state: dict) -> Pair | None:
    """Mask and defect moved off the object (object types only)."""
    if row["category"] in demo.TEXTURES:
        return None
    _, mask, normal = pair
    moved = _place(mask, ~dilate(_object(row["category"], normal), 2), rng)
    image = demo.paint_defect(row["category"], row["anomaly_type"], normal, moved, rng)
    return image, moved, normal


def fewshot_copy(row, pair: Pair, rng, images, state: dict) -> Pair | None:
    """A few-shot training defect's pixels translated verbatim onto the normal's object."""
    _, _, normal = pair
    shots = images[
        (images["category"] == row["category"])
        & (images["anomaly_type"] == row["anomaly_type"])
        & (images["split"] == "fewshot")
    ].sort_values("image_path")
    shot = shots.iloc[int(row["seed"]) % len(shots)]
    # at the pair's size as a generator trains on it: what a memorising model reproduces
    source, shot_mask = as_trained(
        read_rgb(shot["image_path"]), read_mask(shot["mask_path"]), normal.shape[:2]
    )
    moved = _place(shot_mask, _object(row["category"], normal), rng, min_inside=0.95)
    image = normal.copy()
    image[moved] = source[shot_mask]
    return image, moved, normal


def repeated(row, pair: Pair, rng, images, state: dict) -> Pair | None:
    """Every pair of a type is the type's first pair."""
    return state.setdefault(f"{row['category']}/{row['anomaly_type']}", pair)


SABOTEURS: dict[str, Callable[..., Pair | None]] = {
    "identity": identity,
    "whole-image blur": blur,
    "defect outside mask": painted_outside,
    "mask off object": off_object,
    "few-shot copy": fewshot_copy,
    "same image repeated": repeated,
}


def sabotage(name: str, pairs_path: Path, manifest_path: Path, out_dir: Path) -> Path:
    """A copy of an oracle pairs manifest broken by saboteur ``name``."""
    fn = SABOTEURS[name]
    images = pd.read_parquet(manifest_path)
    state: dict = {}  # what a saboteur remembers between pairs
    for _, row in read_pairs(pairs_path).iterrows():
        pair = (
            read_rgb(row["image_path"]),
            read_mask(row["mask_path"], source="binary"),
            read_rgb(row["normal_path"]),
        )
        rng = np.random.default_rng(int(row["seed"]))
        broken = fn(row, pair, rng, images, state)
        if broken is None:
            continue
        files = ("key", "image_path", "mask_path", "normal_path")
        meta = {k: row[k] for k in row.index if k not in files}
        meta["params"] = pair_params(row)
        meta["generator"] = f"saboteur:{name}"
        save_pair(out_dir, row["key"], *broken, meta)
    return write_pairs_manifest(out_dir)
