"""Two writers of one output: one version per publisher lease, one generate per folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.io import folder_lock, sha256_file
from anomaly_factory.storage.shards import write_shards
from tests import test_s3_publish
from tests.test_shards import make_pairs, write_reports

s3_bucket = test_s3_publish.s3_bucket  # the fixture: its own moto server and bucket

CLI = Path(sys.executable).with_name("anomaly-factory")
PATHS = ("image_path", "mask_path", "normal_path")
runner = CliRunner()


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def same_pairs(out: Path, alone: Path) -> None:
    """Two pairs folders hold the same pair images, and the same records and manifest up
    to where the files are (records and manifest hold absolute paths)."""
    images = lambda root: {k: v for k, v in tree(root).items() if k.endswith(".png")}  # noqa: E731
    assert images(out) == images(alone) and images(out)

    def located(row: dict) -> dict:
        return {k: Path(v).name if k in PATHS else v for k, v in row.items()}

    for record in sorted((alone / "records").glob("*.json")):
        mine = json.loads((out / "records" / record.name).read_text())
        assert located(mine) == located(json.loads(record.read_text()))
    a, b = (pd.read_parquet(p / "pairs.parquet") for p in (out, alone))
    for col in PATHS:
        a[col], b[col] = a[col].map(lambda v: Path(v).name), b[col].map(lambda v: Path(v).name)
    pd.testing.assert_frame_equal(a, b)


@pytest.fixture
def two_versions(tmp_path, tiny_config, demo_manifest, demo_manifest_path, s3_bucket):
    """Local version v1 with content A (in a/) and with content B (in b/), and a config
    file for each publisher: same bucket, prefix and version."""
    reports = write_reports(tmp_path / "reports")
    configs = {}
    for name, per_type in (("a", 1), ("b", 2)):
        cfg = tiny_config.model_copy(deep=True)
        pairs = make_pairs(demo_manifest, tmp_path / f"pairs_{name}", per_type=per_type)
        write_shards(cfg, pairs, demo_manifest_path, "v1", reports, tmp_path / name)
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(
            yaml.safe_dump(
                {
                    "shards": {"out_dir": str(tmp_path / name)},
                    "gates": {"out_dir": str(tmp_path / "no-reports")},
                    "publish": {"bucket": s3_bucket, "prefix": "race", "max_attempts": 1},
                }
            )
        )
    return configs


def _publish(config: Path) -> list[str]:
    return ["publish", "--version", "v1", "--no-dvc", "--no-tag", "--config", str(config)]


def _pull(config: Path, out: Path):
    return runner.invoke(
        app, ["pull", "--version", "v1", "--out", str(out), "--config", str(config)]
    )


def test_second_publisher_of_a_version_exits_3_and_pull_gives_the_winner(two_versions, tmp_path):
    """A is mid-upload (held after its first object) when B starts: B exits 3 naming
    the lease, A finishes, and pull returns A's bytes, every file its card lists."""
    from anomaly_factory.config import load_config
    from anomaly_factory.storage.publish import publish_version

    cfg_a = load_config(two_versions["a"])
    a_holding, b_done, a_result = threading.Event(), threading.Event(), {}

    def hold_after_first(rel: str) -> None:
        a_holding.set()  # A has its lease and one object uploaded
        b_done.wait(60)

    def publisher_a() -> None:
        try:
            a_result["uri"] = publish_version(
                cfg_a, "v1", dvc=False, git_tag=False, on_uploaded=hold_after_first
            ).uri
        except Exception as exc:  # reported by the assertion below
            a_result["error"] = exc

    thread = threading.Thread(target=publisher_a)
    thread.start()
    try:
        assert a_holding.wait(60), a_result
        b = runner.invoke(app, _publish(two_versions["b"]))
    finally:
        b_done.set()
        thread.join(120)
    assert "error" not in a_result, a_result
    assert b.exit_code == 3, b.output
    said = " ".join(b.output.split())
    assert "another publisher" in said and "race/v1" in said
    pulled = _pull(two_versions["a"], tmp_path / "pulled")
    assert pulled.exit_code == 0, pulled.output
    assert tree(tmp_path / "pulled" / "v1") == tree(tmp_path / "a" / "v1")


def test_two_publishers_started_at_once(two_versions, tmp_path):
    """Two real processes, started together: exactly one publishes; the other exits 3
    (lease held) or, if it only looked after the winner had finished, 2 (already
    published, needs --force). The visible version is the winner's, complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [str(CLI), *_publish(two_versions[name])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    }
    codes = {name: p.wait(120) for name, p in procs.items()}
    outputs = {name: p.stdout.read() for name, p in procs.items()}
    print(f"two publishers: exit codes {codes}")
    winners = [name for name, code in codes.items() if code == 0]
    assert len(winners) == 1, (codes, outputs)
    loser = "b" if winners == ["a"] else "a"
    assert codes[loser] in (3, 2), outputs[loser]
    pulled = _pull(two_versions[winners[0]], tmp_path / "pulled")
    assert pulled.exit_code == 0, pulled.output
    assert tree(tmp_path / "pulled" / "v1") == tree(tmp_path / winners[0] / "v1")


def _generate(manifest: Path, config: Path, out: Path) -> list[str]:
    return [
        "generate",
        "--manifest",
        str(manifest),
        "--category",
        "tile_demo",
        "--anomaly-type",
        "crack",
        "--n-pairs",
        "4",
        "--out",
        str(out),
        "--config",
        str(config),
    ]


@pytest.fixture
def gen_config(tmp_path) -> Path:
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump({"generator": "cutpaste", "model": {"resolution": 32}}))
    return path


def test_generate_into_a_folder_another_generate_writes(demo_manifest_path, gen_config, tmp_path):
    """While a generate holds the folder, a second one exits 3 naming it and writes
    nothing; afterwards it runs and gives the same bytes as a lone run."""
    alone = runner.invoke(app, _generate(demo_manifest_path, gen_config, tmp_path / "alone"))
    assert alone.exit_code == 0, alone.output
    out = tmp_path / "shared"
    with folder_lock(out, "generate"):
        busy = runner.invoke(app, _generate(demo_manifest_path, gen_config, out))
        assert busy.exit_code == 3, busy.output
        assert "another generate is writing this folder" in " ".join(busy.output.split())
        assert tree(out) == {}
    done = runner.invoke(app, _generate(demo_manifest_path, gen_config, out))
    assert done.exit_code == 0, done.output
    same_pairs(out, tmp_path / "alone")


def test_two_generate_processes_into_one_folder(demo_manifest_path, gen_config, tmp_path):
    """Two real processes into one folder: each finishes (0) or is turned away (3); the
    folder ends up exactly as one uninterrupted run leaves it, with no temporary file."""
    out, alone = tmp_path / "shared", tmp_path / "alone"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [str(CLI), *_generate(demo_manifest_path, gen_config, out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    codes = [p.wait(120) for p in procs]
    outputs = [p.stdout.read() for p in procs]
    print(f"two generate processes: exit codes {codes}")
    assert sorted(codes) in ([0, 0], [0, 3]), outputs
    assert runner.invoke(app, _generate(demo_manifest_path, gen_config, alone)).exit_code == 0
    same_pairs(out, alone)
    assert not list(out.rglob(".*.tmp"))
