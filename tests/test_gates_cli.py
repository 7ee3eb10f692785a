"""``anomaly-factory gates``: outputs, exit code following the gates, nothing deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from anomaly_factory.cli import app
from tests.gates_pairs import build_pairs

REPO = Path(__file__).resolve().parents[1]
PER_TYPE = 4


@pytest.fixture(scope="module")
def pairs_path(demo_manifest_path, tmp_path_factory) -> Path:
    return build_pairs(demo_manifest_path, tmp_path_factory.mktemp("pairs"), per_type=PER_TYPE)


def _gates(pairs: Path, manifest: Path, out: Path, *extra: str):
    args = ["gates", "--pairs", str(pairs), "--manifest", str(manifest), "--out", str(out)]
    args += ["--config", str(REPO / "pipelines.yaml"), "--profile", "tiny", *extra]
    return CliRunner().invoke(app, args)


def test_passing_gates_exit_0_and_write_outputs(pairs_path, demo_manifest_path, tmp_path) -> None:
    res = _gates(pairs_path, demo_manifest_path, tmp_path, "--expected-per-type", str(PER_TYPE))
    assert res.exit_code == 0, res.output
    gates = json.loads((tmp_path / "gates.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert gates["passed"] is True and gates["publishable"] is True
    assert set(gates["types"]) == set(metrics["types"]) and len(metrics["types"]) == 2
    for t in metrics["types"]:
        assert metrics["kid"]["per_type"][t]["kid_x1e3"] is not None
        assert metrics["ic_lpips"]["per_type"][t]["score"] is not None
    assert metrics["kid"]["provenance"]["extractor"] == "pixel_stats"
    assert metrics["ic_lpips"]["provenance"]["backbone"] == "lpips=alex, pretrained=False"
    assert (tmp_path / "report.html").is_file()
    assert (tmp_path / "data_docs" / "index.html").is_file()
    checks = pd.read_parquet(tmp_path / "pair_checks.parquet")
    assert len(checks) == 2 * PER_TYPE and checks["passed"].all()
    assert {"key", "passed", "reasons", "bg_psnr", "bg_ssim", "change_inside"} <= set(checks)
    assert {"concentration", "fg_share", "fewshot_distance", "duplicate_of"} <= set(checks)
    assert sorted(checks["key"]) == sorted(pd.read_parquet(pairs_path)["key"])
    ran = {g["gate"] for g in gates["gates"] if g["on"]}
    assert {"background_psnr", "no_memorisation", "kid_vs_normals", "ic_lpips_vs_real"} <= ran


def test_pairs_that_keep_the_normal_fail_with_their_reasons(
    pairs_path, demo_manifest_path, tmp_path
) -> None:
    from tests.gates_pairs import sabotage

    identity = sabotage("identity", pairs_path, demo_manifest_path, tmp_path / "identity")
    out = tmp_path / "out"
    res = _gates(identity, demo_manifest_path, out, "--expected-per-type", str(PER_TYPE))
    assert res.exit_code == 1, res.output
    assert "anomaly_change" in res.output and "NOT publishable" in res.output
    checks = pd.read_parquet(out / "pair_checks.parquet")
    assert not checks["passed"].any()
    assert checks["reasons"].str.startswith("anomaly_change: mean change in mask 0 < 8").all()


def test_failed_gate_exits_1_keeps_other_types_and_files(
    pairs_path, demo_manifest_path, tmp_path
) -> None:
    pairs_dir = tmp_path / "pairs"
    shutil.copytree(pairs_path.parent, pairs_dir)
    df = pd.read_parquet(pairs_path)
    for col in ("image_path", "mask_path", "normal_path"):
        df[col] = [p.replace(str(pairs_path.parent), str(pairs_dir)) for p in df[col]]
    df.to_parquet(pairs_dir / "pairs.parquet")
    victim = Path(df.loc[0, "image_path"])
    victim.unlink()
    before = sorted(p for p in pairs_dir.rglob("*") if p.is_file())

    out = tmp_path / "out"
    res = _gates(pairs_dir / "pairs.parquet", demo_manifest_path, out, "--expected-per-type", "4")
    assert res.exit_code == 1, res.output
    gates = json.loads((out / "gates.json").read_text())
    assert gates["passed"] is False and gates["publishable"] is False
    outcome = {t: g["passed"] for t, g in gates["types"].items()}
    assert sorted(outcome.values()) == [False, True]
    assert before == sorted(p for p in pairs_dir.rglob("*") if p.is_file())
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()


def test_bad_input_is_a_clear_error(demo_manifest_path, tmp_path) -> None:
    res = _gates(tmp_path / "none.parquet", demo_manifest_path, tmp_path)
    assert res.exit_code == 2 and "--pairs" in res.output and "does not exist" in res.output
