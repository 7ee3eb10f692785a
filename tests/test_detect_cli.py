"""``anomaly-factory detect``: metrics and the comparison table, from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.config import read_config_file
from anomaly_factory.detectors.evaluate import LOCALIZATION_METRICS
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.registry import get_generator

CATEGORY = "tile_demo"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_config(tmp_path_factory):
    """The repo's pipelines.yaml with a detect stage of a few steps."""
    raw = read_config_file(REPO / "pipelines.yaml")
    raw["detector"].update(epochs=1, steps_per_epoch=2, classifier_epochs=1)
    path = tmp_path_factory.mktemp("cfg") / "pipelines.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def detected(tmp_path_factory, tiny_config, demo_manifest_path, quick_config):
    root = tmp_path_factory.mktemp("detect")
    for anomaly_type in ("crack", "missing"):
        get_generator("cutpaste").generate(
            GenerationRequest(
                tiny_config, demo_manifest_path, CATEGORY, anomaly_type, 2, root / "pairs"
            )
        )
    # relative paths, as `dvc repro` passes them (anomalib reports absolute ones)
    args = ["detect", "--pairs", "pairs/pairs.parquet"]
    args += ["--manifest", str(demo_manifest_path), "--out", "out"]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, [*args, "--config", str(quick_config)])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return root / "out"


def test_writes_detector_metrics(detected, demo_manifest_path):
    report = json.loads((detected / "detector_metrics.json").read_text())
    assert report["generators"] == ["cutpaste"]
    assert report["integrity"]["test_split_used_for_selection"] is False
    assert report["selection"] == "fixed_schedule"
    localization = report["summary"]["cutpaste/draem_discriminative"]
    assert set(LOCALIZATION_METRICS) <= set(localization)
    assert all(0.0 <= v <= 1.0 for v in localization.values())


def test_comparison_table_covers_every_generator(detected, tiny_config, demo_manifest):
    rows = json.loads((detected / "comparison.json").read_text())["rows"]
    table = pd.read_parquet(detected / "comparison.parquet")
    assert len(table) == len(rows)
    localization = table[table["task"] == "localization"]
    assert sorted(localization["generator"]) == ["cutpaste", "none", "perlin"]
    assert set(localization["model"]) == {"draem_discriminative", "padim"}
    classifiers = set(table.loc[table["task"] == "classification", "model"])
    assert classifiers == {tiny_config.detector.classifier_arch}
    in_test = (demo_manifest["category"] == CATEGORY) & (demo_manifest["split"] == "test")
    n_test = int(in_test.sum())
    for row in rows:  # every number records its model, seed, schedule and data version
        assert row["category"] == CATEGORY and row["n_test"] == n_test
        assert row["model"] and row["schedule"] and row["seed"] == tiny_config.detector.seed
        assert len(row["manifest_sha256"]) == 64 and row["pairs_sha256"]
    # baselines get the same number of pairs per type as the given generator
    pairs = localization.set_index("generator")["n_pairs"]
    assert pairs["perlin"] == pairs["cutpaste"] == 4 and pairs["none"] == 0


def test_missing_pairs_file_fails_clearly(tmp_path, demo_manifest_path):
    args = ["detect", "--pairs", str(tmp_path / "nope.parquet")]
    args += ["--manifest", str(demo_manifest_path), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "nope.parquet does not exist" in result.output


def test_categories_detected_side_by_side_give_the_same_rows(
    tmp_path, tiny_config, demo_manifest_path, quick_config, monkeypatch
):
    """detector.workers: 2 runs the categories in two processes; the comparison table is
    the one of running them in order, number for number."""
    from anomaly_factory.config import load_config
    from anomaly_factory.detectors import run_detectors
    from anomaly_factory.generators.output import merge_pairs

    parts = []
    for category, anomaly_type in (("tile_demo", "crack"), ("nut_demo", "scratch")):
        folder = tmp_path / "pairs" / category
        get_generator("cutpaste").generate(
            GenerationRequest(tiny_config, demo_manifest_path, category, anomaly_type, 2, folder)
        )
        parts.append(folder / "pairs.parquet")
    pairs = merge_pairs(parts, tmp_path / "pairs.parquet")
    tables = {}
    for workers in (1, 2):
        cfg = load_config(quick_config, overrides={"detector": {"workers": workers}})
        monkeypatch.chdir(tmp_path.joinpath(f"w{workers}").mkdir() or tmp_path / f"w{workers}")
        run_detectors(cfg, pairs, demo_manifest_path, Path("out"))  # same relative paths
        tables[workers] = pd.read_parquet("out/comparison.parquet")
    assert sorted(tables[2]["category"].unique()) == ["nut_demo", "tile_demo"]
    # the config differs in detector.workers only, hence its hash
    pd.testing.assert_frame_equal(*(t.drop(columns="config_hash") for t in tables.values()))
