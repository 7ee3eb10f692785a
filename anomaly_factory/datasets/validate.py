"""Checks of every ingested file, collected into one report.

Problems are collected rather than raised one at a time so that a user fixing
a broken dataset sees every offending file at once. Files are decoded through
``anomaly_factory.images`` (the one reader), so ingest refuses exactly what the
stages after it could not read, and names each file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.images import ImageReadError, inspect_image, read_mask_values
from anomaly_factory.io import sha256_file
from anomaly_factory.manifest import GOOD

ALPHA_RULES = ("refuse", "composite")


@dataclass(frozen=True)
class Problem:
    path: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.check}: {self.detail}"


class BadInputError(InputError):
    """Ingestion found bad files; the message lists all of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        if len(problems) == 1:  # one line, naming the file
            super().__init__(f"1 problem in the input: {problems[0]}")
            return
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problems in the input:\n{lines}")


def _without_path(exc: Exception, path: str) -> str:
    """The reader's message without its leading ``<path>: `` (the Problem names it)."""
    text = str(exc)
    return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text


def _image_problem(path: str, alpha: str) -> tuple[tuple[int, int, int], Problem | None]:
    """(width, height, colour channels) of an image, or the problem that refuses it."""
    try:
        info = inspect_image(path)
    except ImageReadError as exc:
        return (-1, -1, -1), Problem(path, "unreadable image", _without_path(exc, path))
    colour = 1 if info.channels in (1, 2) else 3
    if info.transparent and alpha == "refuse":
        return (info.width, info.height, colour), Problem(
            path,
            "transparent image",
            f"mode {info.mode} has transparent pixels; set datasets.alpha: composite to "
            "composite it over black, or save it without alpha",
        )
    return (info.width, info.height, colour), None


def _mixed_channels(inspected: pd.DataFrame) -> list[Problem]:
    """Images whose colour channels differ from the rest of their category (one RGB
    file among grey ones is a stray file, not a convertible variant)."""
    problems = []
    for category, rows in inspected[inspected["channels"] > 0].groupby("category"):
        counts = Counter(rows["channels"].tolist())
        if len(counts) < 2:
            continue
        usual, n_usual = counts.most_common(1)[0]
        for rec in rows[rows["channels"] != usual].itertuples(index=False):
            problems.append(
                Problem(
                    rec.image_path,
                    "mixed channels",
                    f"{rec.channels} colour channel(s) where {n_usual} other image(s) of "
                    f"category {category!r} have {usual}",
                )
            )
    return problems


def inspect_files(raw: pd.DataFrame, alpha: str = "refuse") -> tuple[pd.DataFrame, list[Problem]]:
    """Fill ``width, height, channels, sha256`` and list every problem found.

    ``alpha`` (``datasets.alpha``): ``refuse`` reports images with transparent pixels,
    ``composite`` accepts them (they are read composited over black).
    """
    if alpha not in ALPHA_RULES:
        raise InputError(f"datasets.alpha: {alpha!r} is not one of {list(ALPHA_RULES)}")
    problems: list[Problem] = []
    widths, heights, channels, hashes = [], [], [], []
    for rec in raw.itertuples(index=False):
        digest = None
        (w, h, c), problem = _image_problem(rec.image_path, alpha)
        if problem is not None:
            problems.append(problem)
        if w > 0:
            digest = sha256_file(rec.image_path)
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
    return out, problems + _mixed_channels(out)


def _check_mask(rec, width: int, height: int) -> list[Problem]:
    if rec.mask_path is None or pd.isna(rec.mask_path):
        return [Problem(rec.image_path, "missing mask", "anomaly image has no mask file")]
    try:
        mask = read_mask_values(rec.mask_path)
    except ImageReadError as exc:
        return [Problem(rec.mask_path, "unreadable mask", _without_path(exc, rec.mask_path))]
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
