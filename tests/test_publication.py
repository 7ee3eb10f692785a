"""The gate decides publication: failing pairs make a version unpublishable, or, with
``gates.on_pair_failure: drop``, stay out of the shards while each type still needs its
full pair count from the rest."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from anomaly_factory.gates.decide import GateSummary
from anomaly_factory.gates.publication import (
    PublicationError,
    candidates_per_type,
    published_keys,
    select_published,
)
from anomaly_factory.gates.run import run_gates
from anomaly_factory.manifest import write_pairs
from anomaly_factory.storage.shards import ShardError, write_shards
from tests.gates_pairs import build_pairs, sabotage, tiny_config

N_PAIRS = 3  # the count each type must publish
CANDIDATES = 5  # what the generator is asked for with extra_candidates 0.5


@pytest.fixture(scope="module")
def context():
    from anomaly_factory.gates.expectations import new_context

    return new_context()


@pytest.fixture(scope="module")
def candidates(demo_manifest_path, tmp_path_factory) -> tuple[Path, Path]:
    """Oracle candidates of nut_demo's two types and their identity (failing) versions."""
    root = tmp_path_factory.mktemp("candidates")
    oracle = build_pairs(demo_manifest_path, root / "oracle", per_type=CANDIDATES)
    return oracle, sabotage("identity", oracle, demo_manifest_path, root / "identity")


def mixed(candidates: tuple[Path, Path], failing: dict[str, int], out: Path) -> Path:
    """The candidates with the first ``failing[type]`` pairs of a type swapped for failing ones."""
    good, bad = (pd.read_parquet(p) for p in candidates)
    rows = []
    for anomaly_type, group in good.groupby("anomaly_type"):
        k = failing.get(anomaly_type, 0)
        group = group.sort_values("key")
        swapped = bad[bad["key"].isin(group["key"].head(k))]
        rows += [swapped, group.iloc[k:]]
    return write_pairs(pd.concat(rows, ignore_index=True), out / "pairs.parquet")


def drop_config():
    cfg = tiny_config().model_copy(deep=True)
    cfg.generate.n_pairs = N_PAIRS
    cfg.gates.on_pair_failure = "drop"
    cfg.gates.extra_candidates = 0.5
    return cfg


def test_extra_candidates_only_when_dropping() -> None:
    cfg = drop_config()
    assert candidates_per_type(cfg) == CANDIDATES  # 3 + ceil(1.5)
    cfg.gates.on_pair_failure = "fail"
    assert candidates_per_type(cfg) == N_PAIRS


def test_select_published_keeps_the_first_passing_pairs_of_each_type() -> None:
    checks = pd.DataFrame(
        {
            "key": ["a1", "a2", "a3", "a4", "b1", "b2"],
            "type_id": ["a"] * 4 + ["b"] * 2,
            "passed": [False, True, True, True, True, False],
        }
    )
    chosen = select_published(checks, 2, "drop").set_index("key")["published"]
    assert chosen.to_dict() == {
        "a1": False,
        "a2": True,
        "a3": True,
        "a4": False,
        "b1": True,
        "b2": False,
    }
    assert select_published(checks, 2, "fail")["published"].all()


def test_failing_pairs_make_the_version_unpublishable(
    candidates, demo_manifest_path, tmp_path, context
) -> None:
    cfg = tiny_config().model_copy(deep=True)
    pairs = mixed(candidates, {"rust": 1}, tmp_path)
    result = run_gates(cfg, pairs, demo_manifest_path, tmp_path / "reports", CANDIDATES, context)
    assert not result.publishable
    assert not result.types["demo/nut_demo/rust"].passed
    assert result.types["demo/nut_demo/scratch"].passed
    assert any("anomaly_change" in r for r in result.types["demo/nut_demo/rust"].reasons)
    checks = pd.read_parquet(tmp_path / "reports" / "pair_checks.parquet")
    assert checks["published"].all() and (~checks["passed"]).sum() == 1


def test_drop_publishes_only_passing_pairs_and_keeps_the_count(
    candidates, demo_manifest_path, tmp_path, context
) -> None:
    cfg = drop_config()
    pairs = mixed(candidates, {"rust": 2}, tmp_path)  # 3 of 5 pass: enough
    reports = tmp_path / "reports"
    result = run_gates(cfg, pairs, demo_manifest_path, reports, N_PAIRS, context)
    assert result.publishable, {t: g.reasons for t, g in result.types.items()}
    rust = result.types["demo/nut_demo/rust"].pairs
    assert rust == {
        "candidates": 5,
        "passed": 3,
        "published": 3,
        "failed_by_check": {"anomaly_change": 2, "anomaly_concentration": 2},
    }
    keys = published_keys(reports)
    checks = pd.read_parquet(reports / "pair_checks.parquet").set_index("key")
    assert len(keys) == 2 * N_PAIRS and checks.loc[sorted(keys), "passed"].all()
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["ic_lpips"]["per_type"]["demo/nut_demo/rust"]["n_generated"] == N_PAIRS

    index = json.loads(
        write_shards(cfg, pairs, demo_manifest_path, "v1", reports, tmp_path).read_text()
    )
    assert index["nsamples"] == 2 * N_PAIRS
    tars = sorted((tmp_path / "v1").rglob("*.tar"))
    with tarfile.open(tars[0]) as tar:
        sharded = {m.name.split(".")[0] for m in tar.getmembers()}
    assert sharded == keys  # the failing and the surplus candidates stay out


def test_drop_still_needs_the_full_count(candidates, demo_manifest_path, tmp_path, context) -> None:
    cfg = drop_config()
    pairs = mixed(candidates, {"scratch": 3}, tmp_path)  # 2 of 5 pass: short of 3
    result = run_gates(cfg, pairs, demo_manifest_path, tmp_path / "reports", N_PAIRS, context)
    assert not result.publishable
    scratch = result.types["demo/nut_demo/scratch"]
    assert not scratch.passed and any(r.startswith("pair_count") for r in scratch.reasons)
    assert result.types["demo/nut_demo/rust"].passed
    # the stages after the gates read the same decision back from gates.json
    summary = GateSummary.read(tmp_path / "reports")
    assert summary == GateSummary.of(result, tmp_path / "reports")
    assert summary.failed_types == ["demo/nut_demo/scratch"] and not summary.publishable
    assert any(r.startswith("pair_count") for r in summary.reasons["demo/nut_demo/scratch"])


def test_drop_shards_need_the_gates_record(candidates, demo_manifest_path, tmp_path) -> None:
    with pytest.raises(PublicationError, match="pair_checks.parquet"):
        published_keys(tmp_path)
    with pytest.raises(ShardError, match="run `anomaly-factory gates` first"):
        write_shards(drop_config(), candidates[0], demo_manifest_path, "v1", tmp_path, tmp_path)
