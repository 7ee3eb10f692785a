"""Export the real splits plus any pairs set in MVTec-AD layout, for anomalib.

Layout under ``out_dir``::

    mvtec/<category>/train/good/NNN.<ext>            real train normals
    mvtec/<category>/test/<type>/NNN.<ext>           real test split (with good)
    mvtec/<category>/ground_truth/<type>/NNN_mask.png
    generated/<category>/images/<type>/<key>.png     the pairs (anomalib ``Folder``:
    generated/<category>/masks/<type>/<key>_mask.png   abnormal_dir / mask_dir)
    fewshot/<category>/images/<type>/NNN.<ext>       real few-shot anomalies, kept
    fewshot/<category>/masks/<type>/NNN_mask.png       apart: never in ``test/``
    export-<category>.parquet                        every exported file and its source

``MVTecAD(root=out_dir / "mvtec", category=...)`` loads the real part unchanged.
Real files are renumbered (``NNN``) because MVTecAD pairs images with masks by sorted
path order, which only holds for equal-width names; ``export.parquet`` maps them back.
Masks are rewritten as 0/255 PNG (VisA's are not).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_factory.detectors.data import assert_disjoint, assert_split_integrity
from anomaly_factory.errors import InputError
from anomaly_factory.images import read_mask, read_rgb
from anomaly_factory.io import save_png
from anomaly_factory.manifest import GOOD, select, write_parquet

COPY_SUFFIXES = (".png", ".jpg", ".jpeg")  # what anomalib reads as is; others become PNG


@dataclass(frozen=True)
class Export:
    """Where one category's export lies, in the terms anomalib's datamodules take."""

    root: Path
    category: str

    @property
    def mvtec_root(self) -> Path:
        """``MVTecAD(root=mvtec_root, category=category)``."""
        return self.root / "mvtec"

    @property
    def normal_dir(self) -> Path:
        return self.mvtec_root / self.category / "train" / "good"

    @property
    def generated_images(self) -> Path:
        return self.root / "generated" / self.category / "images"

    @property
    def generated_masks(self) -> Path:
        return self.root / "generated" / self.category / "masks"

    @property
    def fewshot_images(self) -> Path:
        return self.root / "fewshot" / self.category / "images"

    @property
    def fewshot_masks(self) -> Path:
        return self.root / "fewshot" / self.category / "masks"


def _copy_image(src: str, dst_stem: Path) -> Path:
    suffix = Path(src).suffix.lower()
    dst_stem.parent.mkdir(parents=True, exist_ok=True)
    if suffix in COPY_SUFFIXES:
        dst = dst_stem.with_suffix(suffix)
        shutil.copyfile(src, dst)
        return dst
    return save_png(dst_stem.with_suffix(".png"), read_rgb(src))


def _write_mask(src: str, dst: Path) -> Path:
    return save_png(dst, read_mask(src, source="dataset").astype(np.uint8) * 255)


def _export_rows(rows: pd.DataFrame, image_dir: Path, mask_dir: Path, part: str) -> list[dict]:
    """Copy a group of real images (sorted by source path) as NNN, with NNN_mask.png."""
    out = []
    for i, row in enumerate(rows.sort_values("image_path").itertuples()):
        stem = f"{i:03d}"
        dst = _copy_image(str(row.image_path), image_dir / stem)
        mask = None
        if row.anomaly_type != GOOD:
            mask = _write_mask(str(row.mask_path), mask_dir / f"{stem}_mask.png")
        out.append(
            {
                "part": part,
                "anomaly_type": row.anomaly_type,
                "path": str(dst),
                "mask_path": None if mask is None else str(mask),
                "source_path": str(row.image_path),
            }
        )
    return out


def _export_pairs(pairs: pd.DataFrame, export: Export) -> list[dict]:
    out = []
    for row in pairs.sort_values("key").itertuples():
        dst = export.generated_images / row.anomaly_type / f"{row.key}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(row.image_path, dst)
        mask = _write_mask(
            str(row.mask_path), export.generated_masks / row.anomaly_type / f"{row.key}_mask.png"
        )
        out.append(
            {
                "part": "generated",
                "anomaly_type": row.anomaly_type,
                "path": str(dst),
                "mask_path": str(mask),
                "source_path": str(row.image_path),
            }
        )
    return out


def export_category(
    manifest: pd.DataFrame,
    category: str,
    out_dir: Path,
    pairs: pd.DataFrame | None = None,
) -> Export:
    """Export one category's real splits (and its pairs, if given) under ``out_dir``.

    Raises LeakError if a few-shot or train image is also in the test split, or a
    pair was made from a test image.
    """
    if select(manifest, category).empty:
        raise InputError(f"image manifest: no rows for category {category!r}")
    assert_split_integrity(manifest, category)
    export = Export(Path(out_dir), category)
    if export.root.exists():
        for part in ("mvtec", "generated", "fewshot"):
            shutil.rmtree(export.root / part / category, ignore_errors=True)
    base = export.mvtec_root / category
    records = _export_rows(
        select(manifest, category, GOOD, "train"), base / "train" / GOOD, base, "train"
    )
    test = select(manifest, category, split="test")
    for anomaly_type, rows in test.groupby("anomaly_type", sort=True):
        records += _export_rows(
            rows, base / "test" / anomaly_type, base / "ground_truth" / anomaly_type, "test"
        )
    fewshot = select(manifest, category, split="fewshot")
    for anomaly_type, rows in fewshot.groupby("anomaly_type", sort=True):
        records += _export_rows(
            rows,
            export.fewshot_images / anomaly_type,
            export.fewshot_masks / anomaly_type,
            "fewshot",
        )
    if pairs is not None:
        pairs = pairs[pairs["category"] == category]
        used = pairs["image_path"].astype(str).tolist()
        if "source_path" in pairs:
            used += pairs["source_path"].dropna().astype(str).tolist()
        assert_disjoint(manifest, used, category, "the generated pairs")
        records += _export_pairs(pairs, export)
    table = pd.DataFrame(records).assign(category=category)
    write_parquet(table, export.root / f"export-{category}.parquet")
    return export
