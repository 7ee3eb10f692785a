"""Builders of tiny datasets in the real benchmark layouts (CONTEXT §4), for tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

SIZE = 32


def _img(path: Path, seed: int, size: int = SIZE, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    arr = rng.integers(0, 255, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _mask(path: Path, seed: int, size: int = SIZE, value: int = 255) -> None:
    m = np.zeros((size, size), np.uint8)
    r = 3 + seed % 5
    m[r : r + 6, r : r + 5] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def make_mvtec_ad(
    root: Path, categories=("bottle", "grid"), n_train=4, n_good=2, types=None
) -> Path:
    """``<cat>/train/good``, ``<cat>/test/<type>``, ``<cat>/ground_truth/<type>/NNN_mask.png``."""
    types = types or {"crack": 7, "scratch": 4}
    seed = 0
    for cat in categories:
        mode = "L" if cat == "grid" else "RGB"  # MVTec has grayscale categories
        for i in range(n_train):
            _img(root / cat / "train" / "good" / f"{i:03d}.png", seed := seed + 1, mode=mode)
        for i in range(n_good):
            _img(root / cat / "test" / "good" / f"{i:03d}.png", seed := seed + 1, mode=mode)
        for t, n in types.items():
            for i in range(n):
                _img(root / cat / "test" / t / f"{i:03d}.png", seed := seed + 1, mode=mode)
                _mask(root / cat / "ground_truth" / t / f"{i:03d}_mask.png", i)
    return root


def make_visa(root: Path, categories=("candle", "pcb1")) -> Path:
    """``<cat>/Data/Images/{Normal,Anomaly}``, ``Data/Masks/Anomaly``, ``image_anno.csv``,
    ``split_csv/1cls.csv``; masks hold label values (not 0/255)."""
    split_rows = []
    seed = 100
    labels = [
        "scratch",
        "scratch",
        "scratch",
        "chunk of wax missing",
        "chunk of wax missing",
        "chunk of wax missing",
        "scratch,damaged corner",
    ]
    for cat in categories:
        anno = []
        for i in range(6):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel, seed := seed + 1)
            split = "train" if i < 4 else "test"
            split_rows.append([cat, split, "normal", rel, ""])
            anno.append([rel, "normal", ""])
        for i, label in enumerate(labels):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel, seed := seed + 1)
            _mask(root / mrel, i, value=1 + i % 3)  # VisA masks are labels, binarise with != 0
            split_rows.append([cat, "test", "anomaly", rel, mrel])
            anno.append([rel, label, mrel])
        with open(root / cat / "image_anno.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", "mask"])
            w.writerows(anno)
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(split_rows)
    return root


def make_mvtec_3d_ad(root: Path, categories=("bagel",)) -> Path:
    """``<cat>/{train,validation}/good/{rgb,xyz}``, ``<cat>/test/<type>/{rgb,xyz,gt}``."""
    seed = 200
    for cat in categories:
        jobs = [
            ("train", "good", 3),
            ("validation", "good", 2),
            ("test", "good", 2),
            ("test", "crack", 6),
            ("test", "hole", 3),
        ]
        for split, kind, n in jobs:
            for i in range(n):
                base = root / cat / split / kind
                _img(base / "rgb" / f"{i:03d}.png", seed := seed + 1)
                xyz = np.random.default_rng(seed).random((SIZE, SIZE, 3), dtype=np.float32)
                (base / "xyz").mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(base / "xyz" / f"{i:03d}.tiff", xyz)
                if kind != "good":
                    _mask(base / "gt" / f"{i:03d}.png", i, value=255 if i % 2 else 1)
    return root
