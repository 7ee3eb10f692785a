"""Readers of the benchmark folder layouts (CONTEXT §4) into raw image records.

Each reader lists files only; checking their contents is ``validate.py``'s job
and assigning splits is ``split.py``'s. A record holds ``source_split`` (where the
dataset put the image) and ``mask_binary`` (whether the format promises 0/255).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.manifest import GOOD

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
RAW_COLUMNS = [
    "dataset",
    "category",
    "anomaly_type",
    "source_split",
    "image_path",
    "mask_path",
    "xyz_path",
    "mask_binary",
]


class LayoutError(InputError):
    """The folder does not have the layout the dataset promises."""


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _record(**kw: object) -> dict[str, object]:
    rec: dict[str, object] = dict.fromkeys(RAW_COLUMNS)
    rec.update(kw)
    return rec


def _keep(category: str, categories: Iterable[str] | None) -> bool:
    return categories is None or category in set(categories)


def _frame(records: list[dict[str, object]], root: Path, dataset: str) -> pd.DataFrame:
    if not records:
        raise LayoutError(f"{root}: no {dataset} images found (is this the right folder?)")
    return pd.DataFrame.from_records(records, columns=RAW_COLUMNS)


# --------------------------------------------------------------------------- MVTec-AD
def read_mvtec_ad(
    root: Path, categories: Iterable[str] | None = None, dataset: str = "mvtec_ad"
) -> pd.DataFrame:
    """``<cat>/train/good``, ``<cat>/test/<type>``, ``<cat>/ground_truth/<type>/*_mask.png``.

    A category folder needs both ``train/`` and ``test/``: one with only one of them is
    a LayoutError naming it, never silently dropped.
    """
    records = []
    cat_dirs = sorted(
        p for p in Path(root).iterdir() if (p / "train").is_dir() or (p / "test").is_dir()
    )
    for cat_dir in cat_dirs:
        cat = cat_dir.name
        if not _keep(cat, categories):
            continue
        for part in ("train", "test"):
            if not (cat_dir / part).is_dir():
                raise LayoutError(
                    f"{cat_dir}: category {cat!r} has no {part}/ folder (MVTec layout: "
                    "<category>/train/good, <category>/test/<type>)"
                )
        for img in _images(cat_dir / "train" / GOOD):
            records.append(
                _record(
                    dataset=dataset,
                    category=cat,
                    anomaly_type=GOOD,
                    source_split="train",
                    image_path=str(img),
                    mask_binary=True,
                )
            )
        for type_dir in sorted(p for p in (cat_dir / "test").iterdir() if p.is_dir()):
            for img in _images(type_dir):
                mask = None
                if type_dir.name != GOOD:
                    cand = cat_dir / "ground_truth" / type_dir.name / f"{img.stem}_mask.png"
                    mask = str(cand) if cand.exists() else None
                records.append(
                    _record(
                        dataset=dataset,
                        category=cat,
                        anomaly_type=type_dir.name,
                        source_split="test",
                        image_path=str(img),
                        mask_path=mask,
                        mask_binary=True,
                    )
                )
    return _frame(records, root, dataset)


# --------------------------------------------------------------------------- VisA
def _visa_type(label: str) -> str:
    """Normalise a VisA ``image_anno.csv`` label into an anomaly-type name."""
    parts = [re.sub(r"[^a-z0-9]+", "_", p.strip().lower()).strip("_") for p in label.split(",")]
    return "+".join(p for p in parts if p) or "anomaly"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise LayoutError(f"{path}: missing (VisA needs it)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_visa(root: Path, categories: Iterable[str] | None = None) -> pd.DataFrame:
    """``<cat>/Data/{Images,Masks}``, types from ``<cat>/image_anno.csv``, split from
    ``split_csv/1cls.csv`` (normal images); masks are binarised with ``!= 0``."""
    root = Path(root)
    split_rows = _read_csv(root / "split_csv" / "1cls.csv")
    normal_split = {
        (root / r["image"]).resolve(): r["split"].strip()
        for r in split_rows
        if r["label"].strip().lower() == "normal"
    }
    records = []
    for cat_dir in sorted(p for p in root.iterdir() if (p / "Data").is_dir()):
        cat = cat_dir.name
        if not _keep(cat, categories):
            continue
        anno = {(root / r["image"]).resolve(): r for r in _read_csv(cat_dir / "image_anno.csv")}
        for img in _images(cat_dir / "Data" / "Images" / "Normal"):
            split = normal_split.get(img.resolve())
            if split is None:
                raise LayoutError(f"{img}: not listed in split_csv/1cls.csv")
            records.append(
                _record(
                    dataset="visa",
                    category=cat,
                    anomaly_type=GOOD,
                    source_split=split,
                    image_path=str(img),
                    mask_binary=False,
                )
            )
        for img in _images(cat_dir / "Data" / "Images" / "Anomaly"):
            row = anno.get(img.resolve())
            if row is None:
                raise LayoutError(f"{img}: not listed in {cat_dir / 'image_anno.csv'}")
            mask = cat_dir / "Data" / "Masks" / "Anomaly" / f"{img.stem}.png"
            records.append(
                _record(
                    dataset="visa",
                    category=cat,
                    anomaly_type=_visa_type(row["label"]),
                    source_split="test",
                    image_path=str(img),
                    mask_path=str(mask) if mask.exists() else None,
                    mask_binary=False,
                )
            )
    return _frame(records, root, "visa")


# --------------------------------------------------------------------------- MVTec 3D-AD
def read_mvtec_3d_ad(root: Path, categories: Iterable[str] | None = None) -> pd.DataFrame:
    """``<cat>/{train,validation,test}/<type>/{rgb,xyz,gt}``; gt masks share the RGB name."""
    records = []
    for cat_dir in sorted(p for p in Path(root).iterdir() if (p / "train").is_dir()):
        cat = cat_dir.name
        if not _keep(cat, categories):
            continue
        for source_split in ("train", "validation", "test"):
            split_dir = cat_dir / source_split
            if not split_dir.is_dir():
                continue
            for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                for img in _images(type_dir / "rgb"):
                    xyz = type_dir / "xyz" / f"{img.stem}.tiff"
                    gt = type_dir / "gt" / img.name
                    is_good = type_dir.name == GOOD
                    records.append(
                        _record(
                            dataset="mvtec_3d_ad",
                            category=cat,
                            anomaly_type=type_dir.name,
                            source_split=source_split,
                            image_path=str(img),
                            mask_path=None if is_good or not gt.exists() else str(gt),
                            xyz_path=str(xyz) if xyz.exists() else None,
                            mask_binary=False,
                        )
                    )
    return _frame(records, root, "mvtec_3d_ad")
