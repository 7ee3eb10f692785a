"""What the downstream detectors may read, and the checks that keep it leak-free.

Training reads only ``train`` normals and generated pairs (or, for the protocol's
sanity check, ``fewshot`` anomalies); evaluation reads only the ``test`` split
(CONTEXT §3). Images are compared by path *and* content hash, so a copy of a test
image under another name is caught too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anomaly_factory.errors import InputError
from anomaly_factory.images import read_mask, read_rgb, rgb_to_tensor
from anomaly_factory.io import sha256_file
from anomaly_factory.manifest import GOOD, select


class LeakError(InputError):
    """A test image would reach training, model selection or the few-shot set."""


@dataclass(frozen=True)
class Sample:
    """One image for a detector: its path, its mask (None = all normal) and its label."""

    image_path: str
    mask_path: str | None
    anomaly_type: str

    @property
    def is_anomalous(self) -> bool:
        return self.anomaly_type != GOOD


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image as float CxHxW in [0, 1], resized to size x size."""
    return rgb_to_tensor(read_rgb(path, size, "bilinear"), (0.0, 1.0))


def load_mask(path: str | Path | None, size: int) -> torch.Tensor:
    """A mask as float 1xHxW in {0, 1} (> 0 is defect); None gives an empty mask."""
    if path is None or (isinstance(path, float) and np.isnan(path)):
        return torch.zeros(1, size, size)
    # dataset ground truth and the 0/255 pair masks alike: any non-zero value is defect
    return torch.from_numpy(read_mask(path, size, source="dataset").astype(np.float32))[None]


def _samples(rows: pd.DataFrame) -> list[Sample]:
    return [
        Sample(
            str(r.image_path),
            None if pd.isna(r.mask_path) else str(r.mask_path),
            str(r.anomaly_type),
        )
        for r in rows.itertuples()
    ]


def train_normals(manifest: pd.DataFrame, category: str) -> list[Sample]:
    return _samples(select(manifest, category, GOOD, "train"))


def test_samples(manifest: pd.DataFrame, category: str) -> list[Sample]:
    """The real test split of a category (normal and anomalous), never few-shot images."""
    return _samples(select(manifest, category, split="test"))


def fewshot_samples(manifest: pd.DataFrame, category: str) -> list[Sample]:
    return _samples(select(manifest, category, split="fewshot"))


def pair_samples(pairs: pd.DataFrame, category: str) -> list[Sample]:
    rows = pairs[pairs["category"] == category].sort_values("key")
    return _samples(rows)


def _hashes(manifest: pd.DataFrame, paths: set[str]) -> set[str]:
    known = dict(
        zip(manifest["image_path"].astype(str), manifest["sha256"].astype(str), strict=True)
    )
    return {known[p] if p in known else sha256_file(p) for p in paths}


def assert_disjoint(
    manifest: pd.DataFrame, used: list[str], category: str, what: str, forbidden: str = "test"
) -> None:
    """Raise LeakError if any of ``used`` is (by path or content) a ``forbidden`` image."""
    rows = manifest[(manifest["category"] == category) & (manifest["split"] == forbidden)]
    forbidden_paths = set(rows["image_path"].astype(str))
    forbidden_hashes = set(rows["sha256"].astype(str))
    used_set = {str(p) for p in used}
    clash = sorted(used_set & forbidden_paths)
    if not clash:
        clash = sorted(_hashes(manifest, used_set) & forbidden_hashes)
    if clash:
        raise LeakError(
            f"{category}: {len(clash)} {forbidden}-split image(s) would reach {what}: {clash[:3]}"
        )


def assert_split_integrity(manifest: pd.DataFrame, category: str) -> None:
    """Few-shot and train images never reach the test set (AnomalyDiffusion's overlap bug)."""
    for split in ("fewshot", "train"):
        rows = select(manifest, category, split=split)
        assert_disjoint(manifest, rows["image_path"].tolist(), category, f"the {split} split")
