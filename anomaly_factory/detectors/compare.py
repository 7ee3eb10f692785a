"""One comparison table per category: the given pairs vs Perlin vs CutPaste vs none.

Every generator's pairs train the same detectors with the same seed and schedule on
the same split; "none" is the unsupervised reference detector (no synthetic
anomalies). Each row is one (category, generator, task) and carries its model, seed,
schedule and data version (manifest and pairs hashes), so every number can be traced.
Saved as ``comparison.parquet`` and ``comparison.json`` (``{"rows": [...]}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from anomaly_factory.config import FactoryConfig
from anomaly_factory.detectors.classification import train_and_test_classifier
from anomaly_factory.detectors.data import (
    Sample,
    assert_disjoint,
    load_mask,
    pair_samples,
    test_samples,
    train_normals,
)
from anomaly_factory.detectors.evaluate import LOCALIZATION_METRICS, localization_metrics
from anomaly_factory.detectors.export import Export
from anomaly_factory.detectors.localization import predict, train_localizer
from anomaly_factory.errors import InputError
from anomaly_factory.io import atomic_write_json
from anomaly_factory.manifest import write_parquet

COMPARISON_PARQUET = "comparison.parquet"
COMPARISON_JSON = "comparison.json"
LOCALIZER = "draem_discriminative"
COUNT_COLUMNS = ("n_train_normals", "n_pairs", "n_test", "best_epoch", "seed", "resolution")


@dataclass(frozen=True)
class PairSet:
    """The pairs of one generator for one category, and the hash of their manifest."""

    generator: str
    pairs: pd.DataFrame
    pairs_sha256: str


@dataclass(frozen=True)
class TestSet:
    samples: list[Sample]
    masks: torch.Tensor
    labels: torch.Tensor


def load_test_set(manifest: pd.DataFrame, category: str, size: int) -> TestSet:
    """The real test split of a category at the detectors' resolution."""
    samples = test_samples(manifest, category)
    if not samples:
        raise InputError(f"image manifest: category {category!r} has no test images")
    masks = torch.stack([load_mask(s.mask_path, size)[0] for s in samples])
    labels = torch.tensor([s.is_anomalous for s in samples]).int()
    return TestSet(samples, masks, labels)


def _schedule_text(schedule: dict[str, Any]) -> str:
    text = f"{schedule['selection']}: {schedule['epochs']} epoch(s)"
    if "steps_per_epoch" in schedule:
        text += f" x {schedule['steps_per_epoch']} steps"
    if schedule["selection"] == "validation":
        text += f", best epoch {schedule['best_epoch']} by {schedule['validation_metric']}"
    return text


def localization_row(
    cfg: FactoryConfig,
    manifest: pd.DataFrame,
    category: str,
    pair_set: PairSet,
    test: TestSet,
) -> dict[str, Any]:
    """Train DRAEM's discriminative network on train normals + pairs; score the test split."""
    anomalies = pair_samples(pair_set.pairs, category)
    used = [s.image_path for s in anomalies]
    if "source_path" in pair_set.pairs:
        used += pair_set.pairs["source_path"].dropna().astype(str).tolist()
    normals = train_normals(manifest, category)
    assert_disjoint(manifest, used + [s.image_path for s in normals], category, "training")
    settings = cfg.detector
    localizer = train_localizer(normals, anomalies, settings, settings.seed)
    maps, scores = predict(localizer, test.samples)
    metrics = localization_metrics(maps, scores, test.masks, test.labels, settings.aupro_fpr_limit)
    schedule = localizer.schedule
    return {
        "task": "localization",
        "model": LOCALIZER,
        "schedule": _schedule_text(schedule),
        "selection": schedule["selection"],
        "best_epoch": schedule["best_epoch"],
        "n_train_normals": schedule["n_train_normals"],
        "n_pairs": len(anomalies),
        **metrics,
    }


def classification_row(
    category: str, pair_set: PairSet, test: TestSet, cfg: FactoryConfig
) -> dict[str, Any] | None:
    """ResNet-34 on the pairs' anomaly types; None when the pairs hold fewer than two."""
    generated = pair_samples(pair_set.pairs, category)
    if len({s.anomaly_type for s in generated}) < 2:
        return None
    settings = cfg.detector
    result = train_and_test_classifier(generated, test.samples, settings, settings.seed)
    return {
        "task": "classification",
        "model": settings.classifier_arch,
        "schedule": _schedule_text(result["schedule"]),
        "selection": "fixed_schedule",
        "best_epoch": settings.classifier_epochs,
        "n_pairs": result["n_train"],
        "accuracy": result["accuracy"],
        "pretrained": result["pretrained"],
    }


def reference_row(
    export: Export, test: TestSet, n_train_normals: int, cfg: FactoryConfig
) -> dict[str, Any]:
    """The unsupervised reference detector on the same split ("no synthetic anomalies")."""
    from anomaly_factory.detectors.reference import run_reference

    settings = cfg.detector
    maps, scores, schedule = run_reference(export, test.samples, settings, settings.seed)
    metrics = localization_metrics(maps, scores, test.masks, test.labels, settings.aupro_fpr_limit)
    return {
        "task": "localization",
        "model": settings.reference_model,
        "schedule": f"fixed_schedule: 1 epoch (unsupervised, pre_trained={schedule['pre_trained']})",
        "selection": "fixed_schedule",
        "best_epoch": 1,
        "n_train_normals": n_train_normals,
        "n_pairs": 0,
        "pretrained": str(settings.reference_pre_trained),
        **metrics,
    }


def clean(value: Any) -> Any:
    """JSON-safe scalars: NaN becomes None, numpy scalars become Python ones."""
    if value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_comparison(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``comparison.parquet`` and ``comparison.json`` (``{"rows": [flat dicts]}``)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pd.DataFrame(rows, columns=columns)
    for metric in (*LOCALIZATION_METRICS, "accuracy"):
        if metric in table:
            table[metric] = table[metric].astype("float64")
    for count in COUNT_COLUMNS:
        if count in table:
            table[count] = table[count].astype("Int64")
    parquet = write_parquet(table, Path(out_dir) / COMPARISON_PARQUET)
    flat = [{k: clean(v) for k, v in row.items()} for row in table.to_dict("records")]
    return parquet, atomic_write_json(Path(out_dir) / COMPARISON_JSON, {"rows": flat})
