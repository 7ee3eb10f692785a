"""Metric sanity on the demo test split: an oracle scores 1, random scores score 0.5."""

from __future__ import annotations

import pytest
import torch

from anomaly_factory.detectors.compare import load_test_set
from anomaly_factory.detectors.evaluate import (
    LOCALIZATION_METRICS,
    classification_metrics,
    localization_metrics,
)


@pytest.fixture(scope="module")
def test_set(demo_manifest):
    return load_test_set(demo_manifest, "tile_demo", 64)


def test_oracle_scores_one(test_set):
    masks = test_set.masks
    metrics = localization_metrics(masks, masks.amax((1, 2)), masks, test_set.labels)
    assert set(metrics) == set(LOCALIZATION_METRICS)
    for name, value in metrics.items():
        assert value == pytest.approx(1.0, abs=1e-3), name


def test_random_scores_score_half(test_set):
    gen = torch.Generator().manual_seed(0)
    masks, labels = test_set.masks, test_set.labels
    runs = [
        localization_metrics(
            torch.rand(masks.shape, generator=gen),
            torch.rand(len(labels), generator=gen),
            masks,
            labels,
        )
        for _ in range(8)
    ]
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    assert mean["pixel_auroc"] == pytest.approx(0.5, abs=0.02)
    assert mean["image_auroc"] == pytest.approx(0.5, abs=0.12)
    assert mean["pixel_ap"] == pytest.approx(float(masks.mean()), abs=0.02)  # = prevalence
    assert mean["aupro"] < 0.3  # random PRO ~ FPR: area 0.15 of the 0.3 FPR limit


def test_inverted_oracle_scores_zero(test_set):
    masks = test_set.masks
    metrics = localization_metrics(-masks, -masks.amax((1, 2)), masks, test_set.labels)
    assert metrics["pixel_auroc"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["image_auroc"] == pytest.approx(0.0, abs=1e-3)


def test_bad_inputs_are_clear_errors(test_set):
    masks = test_set.masks
    with pytest.raises(ValueError, match="shapes differ"):
        localization_metrics(masks[:2], masks.amax((1, 2)), masks, test_set.labels)
    ones = torch.ones(len(masks), dtype=torch.int)
    with pytest.raises(ValueError, match="normal and anomalous"):
        localization_metrics(masks, masks.amax((1, 2)), masks, ones)


def test_classification_accuracy():
    m = classification_metrics(["a", "b", "b", "a"], ["a", "b", "a", "a"], ["a", "b"])
    assert m == {"accuracy": 0.75, "accuracy_a": pytest.approx(2 / 3), "accuracy_b": 1.0}
