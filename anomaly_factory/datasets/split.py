"""The leak-free few-shot split (CONTEXT §3).

Per (category, anomaly type) the real anomaly images are sorted by their number;
the first floor(n * fraction) become ``fewshot`` and the rest ``test``. Unlike
AnomalyDiffusion's code (indices 0..n/3 inclusive), no image is in both.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.manifest import GOOD


class SplitLeakError(InputError):
    """An image sits in two splits."""


def image_number(path: str) -> tuple[int, str]:
    """Sort key: the last integer in the file stem, then the stem itself."""
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    numbers = re.findall(r"\d+", stem)
    return (int(numbers[-1]) if numbers else -1, stem)


def assign_splits(raw: pd.DataFrame, fewshot_fraction: float = 1 / 3) -> pd.DataFrame:
    """Add a ``split`` column: train (normal train/validation), fewshot, test."""
    df = raw.copy()
    df["split"] = None
    good = df["anomaly_type"] == GOOD
    df.loc[good & df["source_split"].isin(["train", "validation"]), "split"] = "train"
    df.loc[good & (df["source_split"] == "test"), "split"] = "test"
    for _, group in df[~good].groupby(["dataset", "category", "anomaly_type"], sort=True):
        order = sorted(group.index, key=lambda i: image_number(df.at[i, "image_path"]))
        n_fewshot = math.floor(len(order) * fewshot_fraction + 1e-9)
        df.loc[order[:n_fewshot], "split"] = "fewshot"
        df.loc[order[n_fewshot:], "split"] = "test"
    return df


def check_no_leak(df: pd.DataFrame) -> None:
    """Raise if any image (by path or by content hash) appears in two splits."""
    for column in ("image_path", "sha256"):
        if column not in df.columns:
            continue
        splits = df.groupby(column)["split"].nunique()
        leaked = splits[splits > 1].index.tolist()
        if leaked:
            rows = df[df[column].isin(leaked[:3])][["image_path", "split"]]
            raise SplitLeakError(
                f"{len(leaked)} image(s) appear in more than one split by {column}: "
                + "; ".join(f"{r.image_path} ({r.split})" for r in rows.itertuples())
            )
