"""Metrics and gates of one generated version: the functions the CLI and flows call.

``compute_metrics`` -> ``metrics.json`` (KID and IC-LPIPS per type, averaged,
with provenance); ``run_gates`` -> ``metrics.json``, ``gates.json``, Data Docs
and ``report.html`` in ``out_dir``. Nothing produced by the generator is
modified or deleted.

The types a version must contain are those in its pairs manifest plus every
type with few-shot images in the (dataset, category) pairs it covers, so a
category whose type produced nothing fails its pair-count gate instead of
disappearing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly_factory.config import FactoryConfig
from anomaly_factory.gates.decide import GateResult, decide, write_gates
from anomaly_factory.gates.expectations import pair_table, type_id, type_table
from anomaly_factory.io import atomic_write_json, sha256_file
from anomaly_factory.manifest import ManifestError, read_images
from anomaly_factory.metrics.features import load_extractor, load_rgb
from anomaly_factory.metrics.ic_lpips import ic_lpips, load_lpips
from anomaly_factory.metrics.kid import SCALE, kid_from_features, mean_over_types

METRICS_FILE = "metrics.json"
TYPE_COLUMNS = ("dataset", "category", "anomaly_type")


def read_pairs_lenient(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The pairs manifest as stored; duplicates and blanks are left for the gates to report."""
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: pairs manifest not found") from exc
    missing = [c for c in TYPE_COLUMNS + ("key", "image_path") if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing columns {missing} (see manifest.PAIR_COLUMNS)")
    return df.sort_values("key", kind="stable").reset_index(drop=True)


def expected_types(pairs: pd.DataFrame, images: pd.DataFrame) -> list[str]:
    found = {tuple(str(v) for v in r) for r in pairs[list(TYPE_COLUMNS)].itertuples(index=False)}
    covered = {(d, c) for d, c, _ in found}
    shots = images[images["split"] == "fewshot"]
    for r in shots[list(TYPE_COLUMNS)].drop_duplicates().itertuples(index=False):
        if (r.dataset, r.category) in covered:
            found.add((r.dataset, r.category, r.anomaly_type))
    return sorted(type_id(*t) for t in found)


def _device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_all(paths: list[str]) -> list[np.ndarray]:
    """Decodable images only: unreadable files are reported by the expectations."""
    out = []
    for p in paths:
        try:
            out.append(load_rgb(p))
        except (OSError, ValueError):
            continue
    return out


def _real_rows(images: pd.DataFrame, tid: str, splits: tuple[str, ...]) -> list[str]:
    d, c, a = tid.split("/")
    sel = images[
        (images["dataset"] == d)
        & (images["category"] == c)
        & (images["anomaly_type"] == a)
        & images["split"].isin(splits)
    ]
    return sel.sort_values("image_path")["image_path"].tolist()


def compute_metrics(
    cfg: FactoryConfig, pairs_path: str | os.PathLike[str], manifest_path: str | os.PathLike[str]
) -> dict[str, Any]:
    """KID (x1e3) and IC-LPIPS per anomaly type and averaged, with provenance."""
    g = cfg.gates
    pairs = read_pairs_lenient(pairs_path)
    images = read_images(manifest_path)
    pairs["type_id"] = [type_id(*(str(v) for v in r)) for r in pairs[list(TYPE_COLUMNS)].values]
    types = expected_types(pairs, images)
    device = _device(g.device)
    extractor = load_extractor(g.kid.extractor, g.kid.weights, g.kid.resolution, g.kid.seed, device)
    lp_model, lp_label = load_lpips(
        g.lpips.net, g.lpips.pretrained, g.lpips.weights, g.lpips.seed, device
    )
    real_splits = ("fewshot", "test") if g.kid.real_split == "all" else (g.kid.real_split,)
    kid_per_type: dict[str, Any] = {}
    lp_per_type: dict[str, Any] = {}
    for tid in types:
        generated = _load_all(pairs.loc[pairs["type_id"] == tid, "image_path"].tolist())
        real = _load_all(_real_rows(images, tid, real_splits))
        fewshot = _load_all(_real_rows(images, tid, ("fewshot",)))
        kid = kid_from_features(
            extractor.features(real) if real else np.zeros((0, 1)),
            extractor.features(generated) if generated else np.zeros((0, 1)),
            g.kid.subsets,
            g.kid.subset_size,
            g.kid.seed,
        )
        kid_per_type[tid] = kid.as_dict()
        lp = ic_lpips(lp_model, generated, fewshot, g.lpips.resolution, g.lpips.max_per_cluster)
        lp_per_type[tid] = {
            **lp.as_dict(),
            "n_generated": len(generated),
            "n_fewshot": len(fewshot),
        }
    return {
        "profile": cfg.profile,
        "config_hash": cfg.hash(),
        "inputs": {
            "pairs": str(pairs_path),
            "pairs_sha256": sha256_file(pairs_path),
            "manifest": str(manifest_path),
            "manifest_sha256": sha256_file(manifest_path),
        },
        "types": types,
        "kid": {
            "provenance": extractor.provenance(),
            "kernel": "polynomial (x.y/d + 1)^3, unbiased MMD^2 (torchmetrics)",
            "scale": SCALE,
            "subset_size": g.kid.subset_size,
            "subsets": g.kid.subsets,
            "real_split": g.kid.real_split,
            "seed": g.kid.seed,
            "per_type": kid_per_type,
            "mean_x1e3": mean_over_types([v["kid_x1e3"] for v in kid_per_type.values()]),
        },
        "ic_lpips": {
            "provenance": lp_label,
            "resolution": g.lpips.resolution,
            "max_per_cluster": g.lpips.max_per_cluster,
            "per_type": lp_per_type,
            "mean": mean_over_types([v["score"] for v in lp_per_type.values()]),
        },
    }


def run_gates(
    cfg: FactoryConfig,
    pairs_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    expected_per_type: int | None = None,
    context: Any | None = None,
    metrics: dict[str, Any] | None = None,
) -> GateResult:
    """Compute metrics, validate, decide, and write metrics.json, gates.json, report.html."""
    from anomaly_factory.gates.expectations import run_expectations
    from anomaly_factory.reports.html import render_report

    out = Path(out_dir)
    expected = expected_per_type if expected_per_type is not None else cfg.generate.n_pairs
    metrics = metrics if metrics is not None else compute_metrics(cfg, pairs_path, manifest_path)
    atomic_write_json(out / METRICS_FILE, _json_safe(metrics))
    pairs = pair_table(read_pairs_lenient(pairs_path))
    types = type_table(metrics["types"], pairs, metrics)
    report = run_expectations(pairs, types, cfg.gates, expected, out, context)
    result = decide(metrics["types"], report.checks, report.data_docs)
    result.out_dir = str(out)
    write_gates(result, out)
    render_report(out, metrics, result, pairs, n_samples=cfg.gates.report_samples)
    return result


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null so metrics.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def rerender_report(
    cfg: FactoryConfig, pairs_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Path:
    """Render ``report.html`` again from the saved metrics and gates (after detectors ran)."""
    import json

    from anomaly_factory.gates.decide import GATES_FILE
    from anomaly_factory.reports.html import render_report

    out = Path(out_dir)
    metrics = json.loads((out / METRICS_FILE).read_text())
    gates = json.loads((out / GATES_FILE).read_text())
    pairs = pair_table(read_pairs_lenient(pairs_path))
    return render_report(out, metrics, gates, pairs, n_samples=cfg.gates.report_samples)
