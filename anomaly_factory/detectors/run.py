"""The detect stage: downstream detectors on the real test split, per category.

``run_detectors`` exports each category in MVTec-AD layout, makes the baseline pairs
(Perlin, CutPaste; same seed and count per type as the given pairs), trains and scores
the detectors on every pairs set plus the unsupervised reference, and writes
``detector_metrics.json`` with ``comparison.parquet`` / ``comparison.json``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from anomaly_factory.config import FactoryConfig
from anomaly_factory.detectors.compare import (
    PairSet,
    classification_row,
    clean,
    load_test_set,
    localization_row,
    reference_row,
    write_comparison,
)
from anomaly_factory.detectors.data import assert_split_integrity, train_normals
from anomaly_factory.detectors.evaluate import LOCALIZATION_METRICS
from anomaly_factory.detectors.export import export_category
from anomaly_factory.errors import InputError
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.registry import get_generator
from anomaly_factory.io import atomic_write_json, portable_path, sha256_file
from anomaly_factory.manifest import read_images, read_pairs
from anomaly_factory.threads import torch_threads

METRICS_FILE = "detector_metrics.json"


def baseline_pairs(
    cfg: FactoryConfig,
    manifest_path: Path,
    category: str,
    counts: dict[str, int],
    name: str,
    out_dir: Path,
) -> PairSet:
    """Generate (or resume) a baseline's pairs with the same count per type as the given."""
    generator = get_generator(name)
    path = out_dir / "baselines" / name / category  # one writer per folder (workers)
    for anomaly_type, n in sorted(counts.items()):
        generator.generate(GenerationRequest(cfg, manifest_path, category, anomaly_type, n, path))
    pairs_path = path / "pairs.parquet"
    pairs = read_pairs(pairs_path)
    keep = (pairs["category"] == category) & pairs["anomaly_type"].isin(list(counts))
    return PairSet(name, pairs[keep], sha256_file(pairs_path))


def compare_category(
    cfg: FactoryConfig,
    manifest: pd.DataFrame,
    manifest_path: Path,
    category: str,
    given: list[PairSet],
    out_dir: Path,
) -> list[dict[str, Any]]:
    """All rows of one category's comparison table."""
    assert_split_integrity(manifest, category)
    settings = cfg.detector
    pairs = pd.concat([p.pairs for p in given])
    export = export_category(manifest, category, out_dir / "export", pairs)
    test = load_test_set(manifest, category, settings.resolution)
    counts = pairs.groupby("anomaly_type").size().to_dict()
    pair_sets = list(given)
    for name in settings.baselines:
        if name != "none" and name not in {p.generator for p in given}:
            pair_sets.append(baseline_pairs(cfg, manifest_path, category, counts, name, out_dir))
    rows = []
    for pair_set in pair_sets:
        common = {"generator": pair_set.generator, "pairs_sha256": pair_set.pairs_sha256}
        rows.append({**common, **localization_row(cfg, manifest, category, pair_set, test)})
        if (row := classification_row(category, pair_set, test, cfg)) is not None:
            rows.append({**common, **row})
    if "none" in settings.baselines and settings.reference_model != "none":
        n_normals = len(train_normals(manifest, category))
        row = reference_row(export, test, n_normals, cfg)
        rows.append({"generator": "none", "pairs_sha256": "none", **row})
    return [{"category": category, "n_test": len(test.samples), **row} for row in rows]


def _use_threads(n: int) -> None:
    """A detector worker's initializer: ``n`` torch threads (0 keeps torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each metric per (generator, model) over categories."""
    table = pd.DataFrame(rows)
    metrics = [m for m in (*LOCALIZATION_METRICS, "accuracy") if m in table]
    means = table.groupby(["generator", "model"])[metrics].mean()
    return {
        f"{gen}/{model}": {m: clean(v) for m, v in values.items() if clean(v) is not None}
        for (gen, model), values in means.iterrows()
    }


def run_detectors(cfg: FactoryConfig, pairs_path: Path, manifest_path: Path, out_dir: Path) -> Path:
    """Run the detect stage; returns the path of ``detector_metrics.json``."""
    pairs_path, manifest_path, out_dir = Path(pairs_path), Path(manifest_path), Path(out_dir)
    manifest = read_images(manifest_path)
    pairs = read_pairs(pairs_path)
    if pairs.empty:
        raise InputError(f"{pairs_path}: pairs manifest has no rows")
    unknown = sorted(set(pairs["category"]) - set(manifest["category"]))
    if unknown:
        raise InputError(f"{pairs_path}: categories {unknown} are not in {manifest_path}")
    pairs_sha = sha256_file(pairs_path)
    version = {
        "manifest_sha256": sha256_file(manifest_path),
        "config_hash": cfg.hash(),
        "seed": cfg.detector.seed,
        "resolution": cfg.detector.resolution,
    }
    calls = []
    for category in sorted(pairs["category"].unique()):
        in_cat = pairs[pairs["category"] == category]
        given = [
            PairSet(str(gen), rows_gen, pairs_sha)
            for gen, rows_gen in in_cat.groupby("generator", sort=True)
        ]
        calls.append((cfg, manifest, manifest_path, category, given, out_dir))
    workers = min(cfg.detector.workers, len(calls))
    here = [i for i in range(len(calls)) if i % workers == 0]
    with contextlib.ExitStack() as stack:
        elsewhere = {}
        if workers > 1:
            # Categories are independent: this process takes every workers-th one and
            # spawned processes (torch and fork do not mix) the rest, so that one fewer
            # process holds a detector's memory (1.4 GB at tiny). Rows stay in order.
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    workers - 1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_use_threads,
                    initargs=(cfg.detector.num_threads,),
                )
            )
            elsewhere = {
                i: pool.submit(compare_category, *call)
                for i, call in enumerate(calls)
                if i not in here
            }
        with torch_threads(cfg.detector.num_threads):
            done = {i: compare_category(*calls[i]) for i in here}
        done.update({i: future.result() for i, future in elsewhere.items()})
    per_category = [done[i] for i in range(len(calls))]
    rows = [{**row, **version} for category_rows in per_category for row in category_rows]
    write_comparison(rows, out_dir)
    given_generators = sorted(pairs["generator"].unique())
    report = {
        "pairs": portable_path(pairs_path),
        "pairs_sha256": pairs_sha,
        "manifest": portable_path(manifest_path),
        "profile": cfg.profile,
        **version,
        "generators": given_generators,
        "selection": cfg.detector.selection,
        "integrity": {
            "model_selection": cfg.detector.selection,
            "test_split_used_for_selection": False,
            "fewshot_in_test": False,
        },
        "summary": _summary(rows),
        "rows": [{k: clean(v) for k, v in row.items()} for row in rows],
    }
    return atomic_write_json(out_dir / METRICS_FILE, report)
