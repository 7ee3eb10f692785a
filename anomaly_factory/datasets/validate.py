"""Checks of every ingested file, collected into one report.

Problems are collected rather than raised one at a time so that a user fixing
a broken dataset sees every offending file at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from anomaly_factory.io import sha256_file
from anomaly_factory.manifest import GOOD


@dataclass(frozen=True)
class Problem:
    path: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.check}: {self.detail}"


class BadInputError(ValueError):
    """Ingestion found bad files; the message lists all of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the input:\n{lines}")


def read_image(path: str) -> np.ndarray:
    """Decode fully (so truncated files fail here, not during training)."""
    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def _image_info(path: str) -> tuple[int, int, int]:
    arr = read_image(path)
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return arr.shape[1], arr.shape[0], channels


def inspect_files(raw: pd.DataFrame) -> tuple[pd.DataFrame, list[Problem]]:
    """Fill ``width, height, channels, sha256`` and list every problem found."""
    problems: list[Problem] = []
    widths, heights, channels, hashes = [], [], [], []
    for rec in raw.itertuples(index=False):
        w = h = c = -1
        digest = None
        try:
            w, h, c = _image_info(rec.image_path)
            digest = sha256_file(rec.image_path)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            problems.append(Problem(rec.image_path, "unreadable image", str(exc)))
        widths.append(w)
        heights.append(h)
        channels.append(c)
        hashes.append(digest)
        if rec.anomaly_type != GOOD:
            problems.extend(_check_mask(rec, w, h))
        if rec.xyz_path is not None:
            problems.extend(_check_xyz(rec.xyz_path, w, h))
    out = raw.copy()
    out["width"], out["height"], out["channels"], out["sha256"] = widths, heights, channels, hashes
    return out, problems


def _check_mask(rec, width: int, height: int) -> list[Problem]:
    if rec.mask_path is None or pd.isna(rec.mask_path):
        return [Problem(rec.image_path, "missing mask", "anomaly image has no mask file")]
    try:
        mask = read_image(rec.mask_path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return [Problem(rec.mask_path, "unreadable mask", str(exc))]
    found = []
    if width > 0 and (mask.shape[1], mask.shape[0]) != (width, height):
        found.append(
            Problem(
                rec.mask_path,
                "mask size mismatch",
                f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}",
            )
        )
    if not np.any(mask != 0):
        found.append(Problem(rec.mask_path, "empty mask", "no defect pixel"))
    if rec.mask_binary:
        values = np.unique(mask)
        extra = sorted(set(values.tolist()) - {0, 255})
        if extra:
            found.append(
                Problem(rec.mask_path, "non-binary mask", f"values {extra[:5]} besides 0/255")
            )
    return found


def _check_xyz(path: str, width: int, height: int) -> list[Problem]:
    import tifffile

    try:
        xyz = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt files
        return [Problem(path, "unreadable xyz", str(exc))]
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        return [Problem(path, "bad xyz", f"shape {xyz.shape} is not HxWx3")]
    if width > 0 and (xyz.shape[1], xyz.shape[0]) != (width, height):
        return [Problem(path, "xyz size mismatch", f"{xyz.shape[1]}x{xyz.shape[0]} vs image")]
    return []


def load_mask(path: str) -> np.ndarray:
    """A mask as bool, whatever its encoding (0/255, VisA labels, 3D-AD values)."""
    from anomaly_factory.images import read_mask

    return read_mask(path, source="dataset")
