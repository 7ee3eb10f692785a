"""`run` and `deploy` refuse bad input (2) and report a missing server (3) before any
work; outputs are portable (paths relative to the data root) and readable by others."""

from __future__ import annotations

import os
import stat
import subprocess

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.config import read_config_file
from anomaly_factory.io import atomic_write_text, portable_path
from anomaly_factory.manifest import read_pairs, write_pairs
from tests.conftest import REPO
from tests.prefect_services import BIN, free_port

runner = CliRunner()


@pytest.mark.parametrize("version", ["../evil", "a/b", "..", "v1.lock"])
def test_run_refuses_a_version_that_is_not_one_path_segment(tmp_path, monkeypatch, version):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", "--version", version, "--no-progress"])
    assert res.exit_code == 2, res.output
    assert f"version: {version!r} is invalid" in res.output
    assert not list(tmp_path.rglob("*")), "nothing is written, inside the folder or out"


def test_run_bad_config_and_unknown_profile_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", "--profile", "nope", "--no-progress"])
    assert res.exit_code == 2 and "profile: 'nope' is not one of" in res.output
    raw = read_config_file(REPO / "pipelines.yaml")
    raw["generate"]["n_pairs"] = 2  # the tiny demo has 4 few-shot images per type
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["run", "--config", "two.yaml", "--no-progress"])
    assert res.exit_code == 2
    assert "generate.n_pairs: 2 cannot measure IC-LPIPS" in res.output
    assert not (tmp_path / "data").exists()


def _deploy(tmp_path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    clean |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_CLIENT_MAX_RETRIES": "0"}
    return subprocess.run(
        [str(BIN / "anomaly-factory"), "deploy"],
        env=clean | env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_deploy_needs_a_server_and_exits_3_when_it_does_not_answer(tmp_path):
    none = _deploy(tmp_path)
    assert none.returncode == 2 and "set PREFECT_API_URL" in none.stderr
    down = _deploy(tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    assert down.returncode == 3, down.stderr
    (line,) = down.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: Prefect API:")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_manifests_hold_paths_relative_to_the_data_root(tmp_path, monkeypatch, pairs_frame):
    """Files below the working directory (the data root) are stored relative to it; the
    manifest reads back to the same files."""
    monkeypatch.chdir(tmp_path)
    out = write_pairs(pairs_frame(tmp_path), tmp_path / "data" / "pairs.parquet")
    stored = pd.read_parquet(out)
    for column in ("image_path", "mask_path", "normal_path"):
        assert all(p.startswith("data/pairs/") for p in stored[column]), stored[column]
    assert all((tmp_path / p).is_file() for p in read_pairs(out)["image_path"])
    assert portable_path("s3://bucket/v1/index.json") == "s3://bucket/v1/index.json"
    assert portable_path("/elsewhere/x.png") == "/elsewhere/x.png"  # not below the root


@pytest.fixture
def pairs_frame():
    from anomaly_factory.manifest import PAIR_COLUMNS

    def build(root):
        rows = []
        for i in range(2):
            row = {c: 0 for c in PAIR_COLUMNS}
            row.update(
                key=f"k{i}",
                dataset="demo",
                category="nut_demo",
                anomaly_type="rust",
                generator="perlin",
                checkpoint_hash="none",
                mask_source="perlin",
                params="{}",
            )
            for column in ("image_path", "mask_path", "normal_path"):
                path = root / "data" / "pairs" / column / f"k{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"png")
                row[column] = str(path.resolve())  # absolute, as the Prefect route had them
            rows.append(row)
        return pd.DataFrame(rows)

    return build
