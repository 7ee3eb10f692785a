"""Localization: DRAEM's discriminative network learns, and never looks at the test split."""

from __future__ import annotations

import pytest
import torch

from anomaly_factory.detectors import localization
from anomaly_factory.detectors.compare import load_test_set
from anomaly_factory.detectors.data import fewshot_samples, train_normals
from anomaly_factory.detectors.evaluate import localization_metrics
from anomaly_factory.detectors.localization import image_scores, predict, train_localizer
from anomaly_factory.detectors.run import torch_threads

CATEGORY = "tile_demo"


def test_image_score_is_max_of_pooled_map():
    maps = torch.zeros(2, 32, 32)
    maps[0, 16, 16] = 1.0  # a single hot pixel is averaged away ...
    maps[1, 8:29, 8:29] = 1.0  # ... a 21 x 21 blob is not
    scores = image_scores(maps, 21)
    assert scores[0] == pytest.approx(1 / 21**2)
    assert scores[1] == pytest.approx(1.0)


def test_learning_beats_random(tiny_config, demo_manifest):
    """Trained on the demo's own few-shot anomalies, it beats random on the test split."""
    settings = tiny_config.detector.model_copy(
        update={"base_width": 8, "lr": 1e-3, "epochs": 3, "steps_per_epoch": 15}
    )
    with torch_threads(1):
        model = train_localizer(
            train_normals(demo_manifest, CATEGORY),
            fewshot_samples(demo_manifest, CATEGORY),
            settings,
            seed=0,
        )
        test = load_test_set(demo_manifest, CATEGORY, settings.resolution)
        maps, scores = predict(model, test.samples)
    metrics = localization_metrics(maps, scores, test.masks, test.labels)
    assert metrics["pixel_auroc"] > 0.75  # random is 0.5 (test_evaluate)
    assert metrics["aupro"] > 0.4  # random is ~0.15
    assert metrics["pixel_ap"] > 5 * float(test.masks.mean())  # random is the prevalence


def test_model_selection_never_reads_the_test_split(tiny_config, demo_manifest, monkeypatch):
    read: list[str] = []
    real_image, real_mask = localization.load_image, localization.load_mask

    def spy_image(path, size):
        read.append(str(path))
        return real_image(path, size)

    def spy_mask(path, size):
        read.append(str(path))
        return real_mask(path, size)

    monkeypatch.setattr(localization, "load_image", spy_image)
    monkeypatch.setattr(localization, "load_mask", spy_mask)
    settings = tiny_config.detector.model_copy(
        update={"selection": "validation", "epochs": 2, "steps_per_epoch": 1, "val_fraction": 0.25}
    )
    with torch_threads(1):
        model = train_localizer(
            train_normals(demo_manifest, CATEGORY),
            fewshot_samples(demo_manifest, CATEGORY),
            settings,
            seed=0,
        )
    test = demo_manifest[demo_manifest["split"] == "test"]
    forbidden = set(test["image_path"]) | set(test["mask_path"].dropna())
    assert read and not set(read) & forbidden
    schedule = model.schedule
    assert schedule["selection"] == "validation" and schedule["n_val_anomalies"] >= 1
    assert schedule["best_epoch"] in (1, 2)
    assert all("val_pixel_ap" in h for h in schedule["history"])


def test_no_pairs_is_a_clear_error(tiny_config, demo_manifest):
    with pytest.raises(ValueError, match="needs train normals and anomalies"):
        train_localizer(train_normals(demo_manifest, CATEGORY), [], tiny_config.detector, 0)
