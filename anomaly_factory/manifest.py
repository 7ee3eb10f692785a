"""Manifests: the typed tables that carry data between stages.

Two kinds cross every boundary of the factory:

* the **image manifest** (one row per real image, written by ingestion), and
* the **pairs manifest** (one row per generated anomaly/mask/normal triple,
  written by every generator, read by gates, detectors and shards).

Both are parquet files. Required columns are checked on read and write; extra
columns are allowed so that stages can add what they know. File paths (the ``*_path``
columns) are stored relative to the data root, the working directory the factory runs
in (``io.portable_path``), never as this machine's absolute paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.io import atomic_path, portable_path

SPLITS = ("train", "fewshot", "test")
GOOD = "good"

IMAGE_COLUMNS: dict[str, str] = {
    "dataset": "string",
    "category": "string",
    "anomaly_type": "string",
    "split": "string",
    "image_path": "string",
    "mask_path": "string",
    "xyz_path": "string",
    "width": "int64",
    "height": "int64",
    "channels": "int64",
    "sha256": "string",
}

# The core columns every generator writes. What only one generator knows (MAGIC's GPP
# sigma and guidance weights, AnomalyControl's reference, CAMA's record) is in ``params``,
# a JSON object (``pair_params``), so that a new generator adds no column.
PAIR_COLUMNS: dict[str, str] = {
    "key": "string",
    "dataset": "string",
    "category": "string",
    "anomaly_type": "string",
    "generator": "string",
    "image_path": "string",
    "mask_path": "string",
    "normal_path": "string",
    "source_path": "string",  # the dataset image the normal was taken from
    "seed": "int64",
    "mask_source": "string",
    "checkpoint_hash": "string",
    "params": "string",
}


class ManifestError(InputError):
    """A manifest is missing columns or holds invalid values."""


def _check(df: pd.DataFrame, columns: dict[str, str], where: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ManifestError(f"{where}: missing columns {missing}")
    out = df.copy()
    for col, dtype in columns.items():
        try:
            out[col] = out[col].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: column {col!r} is not {dtype}: {exc}") from exc
    return out


def validate_images(df: pd.DataFrame, where: str = "image manifest") -> pd.DataFrame:
    """Check columns, types and split values of an image manifest."""
    df = _check(df, IMAGE_COLUMNS, where)
    bad = sorted(set(df["split"].dropna()) - set(SPLITS))
    if bad:
        raise ManifestError(f"{where}: split values {bad} are not in {list(SPLITS)}")
    anomalous = df["anomaly_type"] != GOOD
    no_mask = df.loc[anomalous & df["mask_path"].isna(), "image_path"].tolist()
    if no_mask:
        raise ManifestError(f"{where}: anomaly images without mask_path: {no_mask[:5]}")
    return df


def validate_pairs(df: pd.DataFrame, where: str = "pairs manifest") -> pd.DataFrame:
    df = _check(df, PAIR_COLUMNS, where)
    dup = df.loc[df["key"].duplicated(), "key"].tolist()
    if dup:
        raise ManifestError(f"{where}: duplicate keys {dup[:5]}")
    dotted = df.loc[df["key"].str.contains(".", regex=False), "key"].tolist()
    if dotted:
        raise ManifestError(f"{where}: keys must contain no dots: {dotted[:5]}")
    for key, params in zip(df["key"], df["params"], strict=True):
        try:
            ok = isinstance(json.loads(params), dict)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ManifestError(f"{where}: pair {key}: params {params!r} is not a JSON object")
    return df


def write_parquet(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a table atomically, without the pandas index."""
    with atomic_path(path) as tmp:
        df.reset_index(drop=True).to_parquet(tmp, index=False)
    return Path(path)


def portable_paths(df: pd.DataFrame) -> pd.DataFrame:
    """The table with its ``*_path`` columns relative to the data root where they lie below it."""
    out = df.copy()
    for col in (c for c in out.columns if str(c).endswith("_path")):
        out[col] = out[col].map(lambda p: portable_path(p) if isinstance(p, str) else p)
    return out


def write_images(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    return write_parquet(validate_images(portable_paths(df), str(path)), path)


def read_images(path: str | os.PathLike[str]) -> pd.DataFrame:
    return validate_images(_read(path), str(path))


def pair_params(row: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's own settings of one pair (its ``params`` column, a JSON object).

    >>> pair_params({"params": '{"sigma": 1.0}'})
    {'sigma': 1.0}
    """
    return dict(json.loads(row["params"]))


def write_pairs(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    return write_parquet(validate_pairs(portable_paths(df), str(path)), path)


def read_pairs(path: str | os.PathLike[str]) -> pd.DataFrame:
    return validate_pairs(_read(path), str(path))


def _read(path: str | os.PathLike[str]) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: manifest not found") from exc


def select(
    df: pd.DataFrame,
    category: str | None = None,
    anomaly_type: str | None = None,
    split: str | None = None,
) -> pd.DataFrame:
    """Rows of one category / anomaly type / split, in a stable order."""
    mask = pd.Series(True, index=df.index)
    if category is not None:
        mask &= df["category"] == category
    if anomaly_type is not None:
        mask &= df["anomaly_type"] == anomaly_type
    if split is not None:
        mask &= df["split"] == split
    return df[mask].sort_values("image_path").reset_index(drop=True)


def anomaly_types(df: pd.DataFrame, category: str) -> list[str]:
    """The anomaly types of a category that have few-shot images."""
    rows = df[(df["category"] == category) & (df["split"] == "fewshot")]
    return sorted(rows["anomaly_type"].unique().tolist())
