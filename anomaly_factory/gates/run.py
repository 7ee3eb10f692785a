"""Metrics and gates of one generated version: the functions the CLI and flows call.

``compute_metrics`` -> ``metrics.json`` (KID and IC-LPIPS per type, averaged,
with provenance; the defect-region KID of the generated pairs and of the reference
sets; the real anomalies' own IC-LPIPS); ``run_gates`` -> ``pair_checks.parquet``,
``metrics.json``, ``gates.json``, Data Docs and ``report.html`` in ``out_dir``.
Nothing produced by the generator is modified or deleted.

Order: pixel checks of every pair first; with ``gates.on_pair_failure: drop`` the
metrics and expectations then see only the pairs chosen for publication
(``gates/publication.py``), so the numbers describe what is published.

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
from anomaly_factory.gates.pair_checks import PAIR_CHECKS_FILE, as_trained, failure_counts
from anomaly_factory.io import (
    atomic_write_json,
    portable_path,
    remove_stale,
    sha256_file,
    stale_temp_files,
)
from anomaly_factory.manifest import ManifestError, read_images
from anomaly_factory.metrics.features import FeatureExtractor, load_extractor, load_rgb
from anomaly_factory.metrics.ic_lpips import ic_lpips, load_lpips
from anomaly_factory.metrics.kid import (
    SCALE,
    kid_all_images,
    kid_difference,
    kid_from_features,
    mean_over_types,
)

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


def _real_table(images: pd.DataFrame, tid: str, splits: tuple[str, ...]) -> pd.DataFrame:
    d, c, a = tid.split("/")
    sel = images[
        (images["dataset"] == d)
        & (images["category"] == c)
        & (images["anomaly_type"] == a)
        & images["split"].isin(splits)
    ]
    return sel.sort_values("image_path")


def _real_rows(images: pd.DataFrame, tid: str, splits: tuple[str, ...]) -> list[str]:
    return _real_table(images, tid, splits)["image_path"].tolist()


def _load_triplets(rows: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, mask, normal) of the pairs whose three files read and agree in size."""
    from anomaly_factory.images import read_mask, read_rgb

    out = []
    for r in rows.itertuples(index=False):
        try:
            image, normal = read_rgb(r.image_path), read_rgb(r.normal_path)
            mask = read_mask(str(r.mask_path), source="binary")
        except (OSError, ValueError, TypeError):
            continue  # unreadable pairs fail their pixel checks
        if image.shape[:2] == normal.shape[:2] == mask.shape and mask.any():
            out.append((image, mask, normal))
    return out


def region_kids(
    cfg: FactoryConfig,
    extractor: FeatureExtractor,
    rows: pd.DataFrame,
    real: pd.DataFrame,
) -> dict[str, Any]:
    """KID of one type's defect regions and of each reference set, against the real
    anomalies' regions (resized to the pairs' size first, as generators train on them).

    Each KID is over all images (no subsets). A reference's ``bound_x1e3`` is its KID
    plus ``type_gates.kid_tie_se`` standard errors of the paired difference: the gate
    fails a type whose defect-region KID reaches it.
    """
    from anomaly_factory.gates.type_gates import region_crop, region_sets
    from anomaly_factory.images import read_mask, read_rgb

    t = cfg.gates.type_gates
    triplets = _load_triplets(rows)
    sets = region_sets(cfg, triplets)
    shape = triplets[0][1].shape if triplets else None
    crops = []
    for r in real.itertuples(index=False):
        try:
            image, mask = read_rgb(r.image_path), read_mask(str(r.mask_path))
        except (OSError, ValueError, TypeError):
            continue
        if not mask.any():
            continue
        if shape is not None:
            image, mask = as_trained(image, mask, shape)
        crops.append(region_crop(image, mask, t.region_size, t.region_context, t.region_window))
    real_f = extractor.features(crops) if crops else np.zeros((0, 1))
    gen_f = extractor.features(sets.generated) if sets.generated else np.zeros((0, 1))
    out: dict[str, Any] = {"generated": kid_all_images(real_f, gen_f).as_dict()}
    for name, images in sets.references.items():
        ref_f = extractor.features(images) if images else np.zeros((0, 1))
        ref = kid_all_images(real_f, ref_f).as_dict()
        if ref["kid_x1e3"] is not None and out["generated"]["kid_x1e3"] is not None:
            d, se = kid_difference(real_f, gen_f, ref_f)
            ref["difference_x1e3"] = d * SCALE
            ref["difference_se_x1e3"] = se * SCALE
            ref["bound_x1e3"] = ref["kid_x1e3"] + t.kid_tie_se * se * SCALE
        out[name] = ref
    return out


def compute_metrics(
    cfg: FactoryConfig,
    pairs_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    keys: set[str] | None = None,
) -> dict[str, Any]:
    """KID (x1e3) and IC-LPIPS per anomaly type and averaged, with provenance.

    ``keys`` restricts the pairs measured (the published ones); the types expected
    still come from the whole manifest, so a type whose pairs all failed is reported.
    """
    g = cfg.gates
    pairs = read_pairs_lenient(pairs_path)
    images = read_images(manifest_path)
    pairs["type_id"] = [type_id(*(str(v) for v in r)) for r in pairs[list(TYPE_COLUMNS)].values]
    types = expected_types(pairs, images)
    if keys is not None:
        pairs = pairs[pairs["key"].isin(keys)]
    device = _device(g.device)
    extractor = load_extractor(g.kid.extractor, g.kid.weights, g.kid.resolution, g.kid.seed, device)
    lp_model, lp_label = load_lpips(
        g.lpips.net, g.lpips.pretrained, g.lpips.weights, g.lpips.seed, device
    )
    real_splits = ("fewshot", "test") if g.kid.real_split == "all" else (g.kid.real_split,)
    kid_per_type: dict[str, Any] = {}
    lp_per_type: dict[str, Any] = {}
    region_per_type: dict[str, Any] = {}
    for tid in types:
        rows = pairs[pairs["type_id"] == tid]
        generated = _load_all(rows["image_path"].tolist())
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
        real_test = _load_all(_real_rows(images, tid, ("test",)))
        lp_real = ic_lpips(
            lp_model, real_test, fewshot, g.lpips.resolution, g.lpips.max_per_cluster
        )
        lp_per_type[tid] = {
            **lp.as_dict(),
            "n_generated": len(generated),
            "n_fewshot": len(fewshot),
            "real_score": lp_real.as_dict()["score"],  # the real test anomalies' own diversity
            "n_real_test": len(real_test),
        }
        if g.type_gates.kid_references:
            region_per_type[tid] = region_kids(
                cfg, extractor, rows, _real_table(images, tid, real_splits)
            )
    return {
        "profile": cfg.profile,
        "config_hash": cfg.hash(),
        "inputs": {
            "pairs": portable_path(pairs_path),
            "pairs_sha256": sha256_file(pairs_path),
            "manifest": portable_path(manifest_path),
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
            "real_reference": "IC-LPIPS of the type's real test anomalies, same few-shot clusters",
        },
        "kid_region": {
            "provenance": extractor.provenance(),
            "references": list(g.type_gates.kid_references),
            "region_size": g.type_gates.region_size,
            "region_context": g.type_gates.region_context,
            "region_window": g.type_gates.region_window,
            "real": "the type's real anomaly images (gates.kid.real_split) at the pairs' size",
            "estimator": "unbiased MMD^2, polynomial kernel, all images (no subsets)",
            "tie_se": g.type_gates.kid_tie_se,
            "per_type": region_per_type,
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
    report: bool = True,
) -> GateResult:
    """Check pixels, compute metrics, validate, decide; write pair_checks.parquet,
    metrics.json, gates.json and (``report``) report.html. The factory's own report
    stage renders it once, after the detectors (:func:`rerender_report`)."""
    from anomaly_factory.gates.catalogue import gate_catalogue
    from anomaly_factory.gates.expectations import run_expectations
    from anomaly_factory.gates.pair_checks import compute_pair_checks, write_pair_checks
    from anomaly_factory.gates.publication import DROP, select_published
    from anomaly_factory.gates.type_gates import absolute_gates_apply
    from anomaly_factory.reports.html import render_report

    out = Path(out_dir)
    remove_stale(stale_temp_files(out))  # what a killed gates run left half-written
    g = cfg.gates
    expected = expected_per_type if expected_per_type is not None else cfg.generate.n_pairs
    raw = read_pairs_lenient(pairs_path)
    checks = compute_pair_checks(cfg, raw, read_images(manifest_path))
    checks = select_published(checks, expected, g.on_pair_failure)
    write_pair_checks(checks, out)
    drop = g.on_pair_failure == DROP
    keys = set(checks.loc[checks["published"], "key"]) if drop else None
    if metrics is None:
        metrics = compute_metrics(cfg, pairs_path, manifest_path, keys)
    atomic_write_json(out / METRICS_FILE, _json_safe(metrics))
    pairs = pair_table(raw)
    validated = checks
    if drop:
        pairs = pairs[pairs["key"].isin(keys)].reset_index(drop=True)
        validated = checks[checks["published"]].reset_index(drop=True)
    types = type_table(metrics["types"], pairs, metrics, g.type_gates.ic_lpips_ratio_min)
    absolute_off = absolute_gates_apply(metrics)
    report = run_expectations(pairs, types, g, expected, out, context, validated, absolute_off)
    result = decide(metrics["types"], report.checks, report.data_docs)
    result.out_dir = portable_path(out)
    result.data_docs = portable_path(result.data_docs) if result.data_docs else None
    result.gates = gate_catalogue(cfg, metrics, absolute_off)
    result.on_pair_failure = g.on_pair_failure
    _attach_type_details(result, types, checks)
    write_gates(result, out)
    if report:
        render_report(out, metrics, result, pair_table(raw), g.report_samples, checks=checks)
    return result


def _attach_type_details(result: GateResult, types: pd.DataFrame, checks: pd.DataFrame) -> None:
    """Per type: its measured values and its pair-check counts, for gates.json and the report."""
    for row in types.to_dict("records"):
        gate = result.types.get(row["type_id"])
        if gate is None:
            continue
        gate.values = {k: _json_safe(v) for k, v in row.items() if k != "type_id"}
        mine = checks[checks["type_id"] == row["type_id"]]
        gate.pairs = {
            "candidates": int(len(mine)),
            "passed": int(mine["passed"].sum()),
            "published": int(mine["published"].sum()),
            "failed_by_check": {k: v for k, v in failure_counts(mine).items() if v},
        }


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null so metrics.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
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
    checks_path = out / PAIR_CHECKS_FILE
    checks = pd.read_parquet(checks_path) if checks_path.is_file() else None
    return render_report(out, metrics, gates, pairs, cfg.gates.report_samples, checks=checks)
