"""`dvc repro` on a fresh clone makes the same files as `anomaly-factory run` (Prefect).

Both routes call ``anomaly_factory.stages`` on ``RunLayout`` paths; ``dvc.yaml`` is
written from them (``anomaly-factory dvc-yaml``). The project is cloned, given a small
config (MAGIC at test size, one demo category), its dvc.yaml written again for that
config and reproduced; the same config is run through the Prefect flow in another
folder; then every file of the version, fine-tuned weights included, is compared byte
for byte.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from anomaly_factory.config import load_config
from anomaly_factory.layout import default_version
from tests.prefect_services import BIN
from tests.test_deployments import PASSING, QUICK
from tests.test_orchestration import write_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# MAGIC at test size (write_config's FAST), one category; gates it passes
SMALL = {"demo": {"categories": ["nut_demo"]}, "detector": {"enabled": False}} | PASSING
# a version's files (data/runs holds each route's own logs)
VERSION_FILES = ("manifests", "checkpoints", "pairs", "reports", "shards")
# great-expectations names its rendered pages by run id: they differ between any two runs
PER_RUN = "/data_docs/"


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DO_NOT_TRACK"))}
    return env | {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PREFECT_HOME": str(root / ".prefect-home"),
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
    }


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=_env(cwd), capture_output=True, text=True)
    assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for folder in VERSION_FILES
        for p in sorted((root / "data" / folder).rglob("*"))
        if p.is_file() and p.name != ".gitignore" and PER_RUN not in p.as_posix()
    }


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("routes")
    clone = base / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    write_config(clone / "pipelines.yaml", **SMALL)
    version = default_version(load_config(clone / "pipelines.yaml"))
    _run([str(BIN / "anomaly-factory"), "dvc-yaml"], clone)
    _run([str(BIN / "dvc"), "repro"], clone)

    flow = base / "flow"
    flow.mkdir()
    (flow / "pipelines.yaml").write_text((clone / "pipelines.yaml").read_text())
    _run([str(BIN / "anomaly-factory"), "run", "--no-progress"], flow)
    return clone, flow, version


def test_dvc_repro_on_a_fresh_clone_writes_the_flows_files(routes):
    clone, flow, version = routes
    by_dvc, by_flow = _files(clone), _files(flow)
    assert f"data/shards/{version}/card.json" in by_flow  # the flow made the whole version
    assert any(name.startswith("data/checkpoints/tiny/nut_demo/") for name in by_flow)
    assert sorted(by_dvc) == sorted(by_flow)
    differ = [name for name in by_flow if by_dvc[name] != by_flow[name]]
    assert not differ, differ


def test_dvc_yaml_names_the_layouts_paths_and_is_current(routes):
    clone, _, version = routes
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    outs = {
        next(iter(o)) if isinstance(o, dict) else o
        for s in stages.values()
        for o in s.get("do", s).get("outs", [])
    }
    assert f"data/pairs/{version}/pairs.parquet" in outs
    assert f"data/shards/{version}" in outs
    assert "data/pairs/" + version + "/${item}" in outs
    # the project's own dvc.yaml is what the generator writes for pipelines.yaml
    _run([str(BIN / "anomaly-factory"), "dvc-yaml", "--check"], REPO)


def test_stages_of_a_failing_version_write_everything_then_the_last_one_fails(tmp_path):
    """As `anomaly-factory run`: every output is written, the report included, and the
    pipeline ends with exit 1 (so `dvc repro` fails) naming the failed types."""
    from tests.test_deployments import FAILING

    write_config(tmp_path / "pipelines.yaml", **QUICK | FAILING)
    version = default_version(load_config(tmp_path / "pipelines.yaml"))
    cli = str(BIN / "anomaly-factory")
    for name in ("ingest", "generate", "merge"):
        _run([cli, "stage", name], tmp_path)
    gates = _run([cli, "stage", "gates"], tmp_path).stdout  # exit 0: the verdict is printed
    assert "failed: demo/nut_demo/rust, demo/nut_demo/scratch" in gates
    _run([cli, "stage", "report"], tmp_path)
    assert (tmp_path / "data" / "reports" / version / "report.html").is_file()
    shards = subprocess.run(
        [cli, "stage", "shards"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True
    )
    assert shards.returncode == 1, shards.stderr
    assert "quality gates failed for: demo/nut_demo/rust, demo/nut_demo/scratch" in shards.stderr
    assert (tmp_path / "data" / "shards" / version / "card.json").is_file()
