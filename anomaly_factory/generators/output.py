"""The one output format of every generator: pair files plus a pairs manifest.

Each pair is written as ``images/<key>.png``, ``masks/<key>.png``,
``normals/<key>.png`` and finally ``records/<key>.json`` (atomically, last), so
a pair exists exactly when its record does. A re-run skips keys whose record
exists; the manifest (``pairs.parquet``) is rebuilt from the records, sorted by
key, so an interrupted and resumed run gives the same bytes as an uninterrupted
one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.io import atomic_write_json, portable_path, save_png
from anomaly_factory.manifest import PAIR_COLUMNS, write_pairs

PAIRS_FILE = "pairs.parquet"


def pair_key(dataset: str, category: str, anomaly_type: str, index: int) -> str:
    """A webdataset-safe key (no dots): ``<dataset>-<category>-<type>-<index:06d>``."""
    parts = [dataset, category, anomaly_type]
    safe = ["".join(ch if ch.isalnum() or ch == "_" else "_" for ch in p) for p in parts]
    return "-".join([*safe, f"{index:06d}"])


def pair_metadata(
    dataset: str,
    category: str,
    anomaly_type: str,
    generator: str,
    seed: int,
    mask_source: str,
    source_path: str,
    *,
    checkpoint_hash: str = "none",
    **params: Any,
) -> dict[str, Any]:
    """The non-file PAIR_COLUMNS of one pair: the core ones, and ``params``, the generator's
    own settings and records (JSON values), e.g. MAGIC's ``sigma``, ``w_m``, ``w_d``.

    ``source_path`` is the dataset image the normal was taken from (the detectors check
    that no test image became a pair); ``checkpoint_hash`` "none" says "nothing trained".
    A NaN param is stored as null (JSON has no NaN).
    """
    params = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in params.items()}
    return {
        "dataset": dataset,
        "category": category,
        "anomaly_type": anomaly_type,
        "generator": generator,
        "seed": seed,
        "mask_source": mask_source,
        "source_path": portable_path(source_path),
        "checkpoint_hash": checkpoint_hash,
        "params": params,
    }


def reference_params(
    *,
    reference_text: str,
    target_prompt: str,
    reference_image: str,
    reference_mask: str,
    reference_category: str,
    reference_type: str,
) -> dict[str, Any]:
    """The params of a pair generated from a reference (AnomalyControl's cross-modal
    reference), to pass to :func:`pair_metadata` beside its own.

    ``reference_text`` is the text given to the vision-language model with the
    reference image (and mask); ``target_prompt`` is what the diffusion model was
    asked to make. They differ in non-matching transfers (AnomalyControl §4.4).
    """
    return {
        "reference_text": reference_text,
        "target_prompt": target_prompt,
        "reference_image": reference_image,
        "reference_mask": reference_mask,
        "reference_category": reference_category,
        "reference_type": reference_type,
    }


def record_path(out_dir: Path, key: str) -> Path:
    return Path(out_dir) / "records" / f"{key}.json"


def is_done(out_dir: Path, key: str) -> bool:
    return record_path(out_dir, key).exists()


def save_pair(
    out_dir: Path,
    key: str,
    image: np.ndarray,
    mask: np.ndarray,
    normal: np.ndarray,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Write one pair's files and its record (last). Returns the manifest row.

    ``mask`` may be bool or uint8; it is saved as 0/255 single-channel PNG.
    ``metadata`` is :func:`pair_metadata`'s; the record keeps ``params`` as an object.
    """
    out_dir = Path(out_dir)
    mask_u8 = (np.asarray(mask) > 0).astype(np.uint8) * 255
    row = dict(metadata)
    row["key"] = key
    # relative to the data root, as in pairs.parquet: the records read the same anywhere
    row["image_path"] = portable_path(save_png(out_dir / "images" / f"{key}.png", image))
    row["mask_path"] = portable_path(save_png(out_dir / "masks" / f"{key}.png", mask_u8))
    row["normal_path"] = portable_path(save_png(out_dir / "normals" / f"{key}.png", normal))
    missing = [c for c in PAIR_COLUMNS if c not in row]
    if missing or not isinstance(row["params"], dict):
        raise InputError(f"pair {key}: metadata lacks {missing or ['params as a dict']}")
    atomic_write_json(record_path(out_dir, key), row)
    return row


def check_existing_pairs(out_dir: Path, category: str, anomaly_type: str, n_pairs: int) -> None:
    """A pairs folder may be resumed, not mixed: refuse one that holds pairs of another
    (category, type) or more pairs than asked for (its manifest would hold them all)."""
    records = sorted((Path(out_dir) / "records").glob("*.json"))
    other, beyond = [], []
    for path in records:
        index = path.stem.rsplit("-", 1)[-1]
        row = json.loads(path.read_text())
        if (row.get("category"), row.get("anomaly_type")) != (category, anomaly_type):
            other.append(f"{row.get('category')}/{row.get('anomaly_type')}")
        elif not index.isdigit() or int(index) >= n_pairs:
            beyond.append(path.stem)
    if other:
        raise InputError(
            f"{out_dir}: holds pairs of {sorted(set(other))}, not {category}/{anomaly_type}; "
            "use one folder per (category, type)"
        )
    if beyond:
        raise InputError(
            f"{out_dir}: already holds {len(records)} pairs, more than --n-pairs {n_pairs} "
            f"(e.g. {beyond[0]}); use a new folder, or --n-pairs {len(records)} or more"
        )


def collect_pairs(out_dir: Path) -> pd.DataFrame:
    """All finished pairs of a folder, sorted by key."""
    rows = [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "records").glob("*.json"))]
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in PAIR_COLUMNS.items()})
    for row in rows:  # the manifest's params column: one JSON text per pair
        row["params"] = json.dumps(row["params"], sort_keys=True)
    return pd.DataFrame(rows).sort_values("key").reset_index(drop=True)


def write_pairs_manifest(out_dir: Path) -> Path:
    """Rebuild ``out_dir/pairs.parquet`` from the records."""
    return write_pairs(collect_pairs(out_dir), Path(out_dir) / PAIRS_FILE)


def merge_pairs(parts: list[Path], out_path: Path) -> Path:
    """Concatenate per-type pairs manifests into one version manifest, sorted by key."""
    from anomaly_factory.manifest import read_pairs

    frames = [read_pairs(p) for p in parts]
    if not frames:
        raise InputError(f"{out_path}: no pairs manifests to merge")
    merged = pd.concat(frames, ignore_index=True).sort_values("key").reset_index(drop=True)
    return write_pairs(merged, out_path)
