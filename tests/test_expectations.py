"""Each great-expectations check fails on a pairs manifest broken in exactly its way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_factory.config import FactoryConfig, GatesSection
from anomaly_factory.gates.decide import decide
from anomaly_factory.gates.expectations import pair_table, run_expectations, type_table
from anomaly_factory.gates.pair_checks import compute_pair_checks
from anomaly_factory.manifest import read_images
from tests.gates_pairs import build_pairs

PER_TYPE = 3


@pytest.fixture(scope="module")
def context():
    from anomaly_factory.gates.expectations import new_context

    return new_context()  # one context for the module: great-expectations is slow to start


@pytest.fixture(scope="module")
def pairs(demo_manifest_path, tmp_path_factory) -> pd.DataFrame:
    path = build_pairs(demo_manifest_path, tmp_path_factory.mktemp("pairs"), per_type=PER_TYPE)
    return pd.read_parquet(path)


@pytest.fixture(scope="module")
def checks(pairs, demo_manifest_path) -> pd.DataFrame:
    return compute_pair_checks(FactoryConfig(), pairs, read_images(demo_manifest_path))


def _metrics(types: list[str], region: float = 1.0, ic: float = 0.3) -> dict:
    """Metrics under which every type gate passes unless ``region`` / ``ic`` say otherwise."""
    reference = {"kid_x1e3": 5.0, "bound_x1e3": 6.0}
    return {
        "kid": {"per_type": {t: {"kid_x1e3": 5.0} for t in types}},
        "ic_lpips": {"per_type": {t: {"score": ic, "real_score": 0.3} for t in types}},
        "kid_region": {
            "per_type": {
                t: {"generated": {"kid_x1e3": region}, "normals": reference, "cutpaste": reference}
                for t in types
            }
        },
    }


def _run(
    pairs: pd.DataFrame,
    out: Path,
    context,
    expected: int = PER_TYPE,
    checks: pd.DataFrame | None = None,
    metrics: dict | None = None,
    absolute_off: dict | None = None,
    **gates,
):
    table = pair_table(pairs)
    types = sorted(table["type_id"].unique())
    section = GatesSection(**gates)
    types_table = type_table(
        types, table, metrics or _metrics(types), section.type_gates.ic_lpips_ratio_min
    )
    report = run_expectations(
        table, types_table, section, expected, out, context, checks, absolute_off
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
        "kid_region_finite",
        "kid_vs_normals",
        "kid_vs_cutpaste",
        "ic_lpips_vs_real",
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


def test_absolute_thresholds_are_off_without_standard_weights(pairs, tmp_path, context) -> None:
    off = {"kid_max": "not the standard Inception", "ic_lpips_min": "not LPIPS-VGG"}
    report, failed, _ = _run(
        pairs, tmp_path, context, absolute_off=off, kid_max=4.0, ic_lpips_min=0.5
    )
    assert failed == {} and not {"kid_max", "ic_lpips_min"} & {c.check for c in report.checks}


def test_type_gates_fail_a_type_worse_than_its_references_or_collapsed(
    pairs, tmp_path, context
) -> None:
    types = sorted(pair_table(pairs)["type_id"].unique())
    metrics = _metrics(types, region=6.0, ic=0.01)  # at the tie bound; a tenth of 0.3 is 0.03
    _, failed, result = _run(pairs, tmp_path, context, metrics=metrics)
    assert set(failed) == {"kid_vs_normals", "kid_vs_cutpaste", "ic_lpips_vs_real"}
    assert set(failed["kid_vs_normals"]) == set(types) and not result.passed
    metrics["kid_region"]["per_type"][types[0]]["generated"]["kid_x1e3"] = None
    _, failed, _ = _run(pairs, tmp_path, context, metrics=metrics)
    assert set(failed["kid_region_finite"]) == {types[0]}  # undefined is its own failure


def test_pair_checks_are_expectations_per_check_and_type(pairs, checks, tmp_path, context) -> None:
    report, failed, result = _run(pairs, tmp_path, context, checks=checks)
    assert failed == {} and result.passed  # the oracle's pairs
    assert {c.table for c in report.checks} == {"pairs", "pair_checks", "types"}
    broken = checks.copy()
    broken.loc[0, "bg_psnr"] = 18.0
    broken.loc[1, "fg_share"] = 0.2
    broken.loc[2, "duplicate_of"] = broken.loc[1, "key"]
    broken.loc[3, "status"] = "unreadable: ImageReadError"
    _, failed, result = _run(pairs, tmp_path, context, checks=broken)
    assert set(failed) == {"background_psnr", "mask_on_object", "no_duplicate", "pair_readable"}
    assert broken.loc[0, "key"] in failed["background_psnr"][broken.loc[0, "type_id"]]
    assert not result.passed
    _, failed, _ = _run(pairs, tmp_path, context, checks=broken, pair_checks={"psnr_min": None})
    assert "background_psnr" not in failed  # a null threshold turns its check off
