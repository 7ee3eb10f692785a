"""Small pairs manifests for gate tests: perturbed real anomalies through ``save_pair``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_factory.generators.output import (
    pair_key,
    pair_metadata,
    save_pair,
    write_pairs_manifest,
)

CATEGORY = "nut_demo"  # one object category, two anomaly types


def _load(path: str, mode: str = "RGB") -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


def build_pairs(
    manifest: pd.DataFrame, out_dir: Path, per_type: int = 4, noise: float = 8.0
) -> Path:
    """``per_type`` pairs for each type of CATEGORY: a real anomaly + noise, its mask, a normal."""
    rng = np.random.default_rng(0)
    cat = manifest[manifest["category"] == CATEGORY]
    normals = sorted(cat.loc[cat["split"] == "train", "image_path"])
    anomalies = cat[cat["anomaly_type"] != "good"]
    for anomaly_type, rows in sorted(anomalies.groupby("anomaly_type")):
        rows = rows.sort_values("image_path").reset_index(drop=True)
        for i in range(per_type):
            src = rows.iloc[i % len(rows)]
            image = _load(src["image_path"]).astype(np.float32)
            image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
            key = pair_key(src["dataset"], CATEGORY, anomaly_type, i)
            meta = pair_metadata(
                src["dataset"],
                CATEGORY,
                anomaly_type,
                "test_perturbed_real",
                i,
                "real",
                sigma=1.0,
                w_m=4.0,
                w_d=7.5,
            )
            normal = _load(normals[i % len(normals)])
            save_pair(out_dir, key, image, _load(src["mask_path"], "L"), normal, meta)
    return write_pairs_manifest(out_dir)
