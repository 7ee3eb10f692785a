"""Each great-expectations check fails on a pairs manifest broken in exactly its way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_factory.config import GatesSection
from anomaly_factory.gates.decide import decide
from anomaly_factory.gates.expectations import pair_table, run_expectations, type_table
from tests.gates_pairs import build_pairs

PER_TYPE = 3


@pytest.fixture(scope="module")
def context():
    from anomaly_factory.gates.expectations import new_context

    return new_context()  # one context for the module: great-expectations is slow to start


@pytest.fixture(scope="module")
def pairs(demo_manifest, tmp_path_factory) -> pd.DataFrame:
    path = build_pairs(demo_manifest, tmp_path_factory.mktemp("pairs"), per_type=PER_TYPE)
    return pd.read_parquet(path)


def _run(pairs: pd.DataFrame, out: Path, context, expected: int = PER_TYPE, **gates):
    table = pair_table(pairs)
    types = sorted(table["type_id"].unique())
    metrics = {
        "kid": {"per_type": {t: {"kid_x1e3": 5.0} for t in types}},
        "ic_lpips": {"per_type": {t: {"score": 0.3} for t in types}},
    }
    report = run_expectations(
        table, type_table(types, table, metrics), GatesSection(**gates), expected, out, context
    )
    failed = {c.check: c.failed_types for c in report.checks if not c.success}
    return report, failed, decide(types, report.checks)


def _first_type(pairs: pd.DataFrame) -> str:
    r = pairs.iloc[0]
    return f"{r['dataset']}/{r['category']}/{r['anomaly_type']}"


def test_clean_manifest_passes_and_writes_data_docs(pairs, tmp_path, context) -> None:
    report, failed, result = _run(pairs, tmp_path, context)
    assert failed == {} and result.passed
    assert report.data_docs == tmp_path / "data_docs" / "index.html"
    assert report.data_docs.is_file()
    assert {c.check for c in report.checks} >= {
        "unique_keys",
        "image_file_readable",
        "size_image_vs_mask",
        "mask_non_empty",
        "mask_area_fraction",
        "metadata_seed",
        "pair_count",
        "kid_finite",
        "ic_lpips_finite",
    }


def test_missing_file(pairs, tmp_path, context) -> None:
    broken = pairs.copy()
    broken.loc[0, "image_path"] = str(tmp_path / "gone.png")
    _, failed, result = _run(broken, tmp_path, context)
    assert set(failed) == {"image_file_readable"}
    assert set(failed["image_file_readable"]) == {_first_type(pairs)}
    assert "missing" in failed["image_file_readable"][_first_type(pairs)]
    assert not result.passed and sum(g.passed for g in result.types.values()) == 1


def test_undecodable_file(pairs, tmp_path, context) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    broken = pairs.copy()
    broken.loc[0, "normal_path"] = str(bad)
    _, failed, _ = _run(broken, tmp_path, context)
    assert set(failed) == {"normal_file_readable"}


def test_size_mismatch(pairs, tmp_path, context) -> None:
    with Image.open(pairs.loc[0, "mask_path"]) as im:
        small = im.resize((im.width // 2, im.height // 2), Image.NEAREST)
    small.save(tmp_path / "small_mask.png")
    broken = pairs.copy()
    broken.loc[0, "mask_path"] = str(tmp_path / "small_mask.png")
    _, failed, _ = _run(broken, tmp_path, context)
    assert set(failed) == {"size_image_vs_mask"}


def test_empty_mask(pairs, tmp_path, context) -> None:
    with Image.open(pairs.loc[0, "mask_path"]) as im:
        Image.fromarray(np.zeros((im.height, im.width), np.uint8)).save(tmp_path / "empty.png")
    broken = pairs.copy()
    broken.loc[0, "mask_path"] = str(tmp_path / "empty.png")
    _, failed, _ = _run(broken, tmp_path, context)
    assert set(failed) == {"mask_non_empty", "mask_area_fraction"}


def test_mask_area_bounds(pairs, tmp_path, context) -> None:
    _, failed, _ = _run(pairs, tmp_path, context, mask_area_max=0.001)
    assert set(failed) == {"mask_area_fraction"}


def test_wrong_count(pairs, tmp_path, context) -> None:
    _, failed, result = _run(pairs.iloc[1:], tmp_path, context)
    assert set(failed) == {"pair_count"}
    assert set(failed["pair_count"]) == {_first_type(pairs)}
    assert sum(g.passed for g in result.types.values()) == 1


def test_duplicate_keys_and_missing_metadata(pairs, tmp_path, context) -> None:
    broken = pairs.copy()
    broken.loc[1, "key"] = broken.loc[0, "key"]
    broken.loc[2, "checkpoint_hash"] = "  "
    _, failed, _ = _run(broken, tmp_path, context)
    assert set(failed) == {"unique_keys", "metadata_checkpoint_hash"}


def test_metric_thresholds_are_expectations(pairs, tmp_path, context) -> None:
    _, failed, _ = _run(pairs, tmp_path, context, kid_max=4.0, ic_lpips_min=0.5)
    assert set(failed) == {"kid_max", "ic_lpips_min"}
