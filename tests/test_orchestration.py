"""The factory under a real Prefect server (SQLite, 127.0.0.1) and real process workers.

One server and one worker per module; every process is torn down by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from anomaly_factory.config import deep_merge, read_config_file
from anomaly_factory.datasets.demo import ANOMALY_TYPES
from anomaly_factory.io import sha256_file
from tests.conftest import REPO
from tests.prefect_services import BIN, PrefectServer, kill_tree

pytestmark = pytest.mark.slow

# The smallest settings that still exercise every stage.
FAST = {
    "demo": {
        "size": 64,
        "n_train": 8,
        "n_test_good": 2,
        "n_per_type": 6,
        "categories": ["nut_demo", "carpet_demo"],
    },
    "model": {
        "resolution": 32,
        "tiny": {"pretrain_vae_steps": 4, "pretrain_unet_steps": 4, "pretrain_batch_size": 2},
    },
    "finetune": {"steps": 2, "batch_size": 2, "resolution": 32, "checkpoint_every": 1},
    "masks": {"generator": {"resolution": 32, "steps": 40, "sample_steps": 5}},
    # enough denoising work that a worker killed mid-stage is killed mid-generation
    "generate": {"n_pairs": 3, "steps": 12, "batch_size": 3},
    "gates": {"kid": {"subset_size": 2, "subsets": 2}, "lpips": {"resolution": 32}},
    "detector": {"resolution": 32, "epochs": 1, "batch_size": 4, "classifier_epochs": 1},
    "orchestration": {
        "retries": 2,
        "retry_delay_s": 1,
        "heartbeat_timeout_s": 15,
        "start_timeout_s": 300,
    },
}


def write_config(path: Path, **extra) -> Path:
    raw = read_config_file(REPO / "pipelines.yaml")
    raw = deep_merge(raw, deep_merge(FAST, extra))
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    srv = PrefectServer(home)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("factory")


@pytest.fixture
def api(server, monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    for key, value in server.env.items():
        if key.startswith(("PREFECT_", "HF_")):
            monkeypatch.setenv(key, value)
    with temporary_settings(
        {PREFECT_API_URL: server.api_url, PREFECT_LOCAL_STORAGE_PATH: server.home / "storage"}
    ):
        yield server


@pytest.fixture(scope="module")
def deployed(server, workdir):
    """Deployments registered and one worker serving the cuda pool."""
    import os

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from anomaly_factory.config import load_config
    from flows.deploy import register_deployments

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            cfg = load_config(
                write_config(workdir / "pipelines.yaml", orchestration={"dispatch": "work_pool"})
            )
            register_deployments(cfg, schedules=[])
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
    worker = server.start_worker("cuda", "gpu0", workdir)
    yield worker
    kill_tree(worker.pid)


def _run_factory(workdir: Path, version: str, config: Path) -> dict:
    """The factory's outputs, whether or not the gates passed (a failed gate fails the run
    after every output is written)."""
    from flows.factory import VersionFailedGates, factory

    try:
        return factory(profile="tiny", config=str(config), version=version, root=str(workdir))
    except VersionFailedGates as exc:
        return exc.result


def _flow_runs(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _version(run) -> str | None:
    """The version a GPU stage run worked on (its RunRef parameter)."""
    return (run.parameters.get("ref") or {}).get("version")


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix == ".png"
    }


def test_a_stage_that_completes_as_its_heartbeat_is_judged_stays_completed(api, monkeypatch):
    """The race CI hit: the dispatcher reads Running, the run completes, then its beat
    looks stale. The crash verdict must not overwrite the Completed state."""
    from prefect import flow
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.states import Completed, Running

    from tasks.dispatch import _wait

    @flow(name="race-probe")
    def probe() -> None:
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(probe)
        client.set_flow_run_state(run.id, Running())
        stale = client.read_flow_run(run.id)  # what the dispatcher saw
        assert stale.state.is_running(), stale.state
        client.set_flow_run_state(run.id, Completed())

    real = SyncPrefectClient.read_flow_run
    reads: list[object] = []

    def first_read_is_stale(self, flow_run_id):
        if flow_run_id != run.id:  # the engine reads its own runs too
            return real(self, flow_run_id)
        reads.append(flow_run_id)
        return stale if len(reads) == 1 else real(self, flow_run_id)

    monkeypatch.setattr(SyncPrefectClient, "read_flow_run", first_read_is_stale)

    @flow(name="race-dispatcher")
    def dispatcher() -> None:
        _wait(run.id, heartbeat_timeout=0.0, start_timeout=60)  # stale at once: no beat

    dispatcher()  # returns: the run completed; no StageCrashed
    monkeypatch.undo()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.is_completed()
    assert len(reads) >= 2


FENCE_PROBE = """
import sys, time
from pathlib import Path
from prefect import flow
from tasks.heartbeat import Heartbeat

@flow(name="fence-probe")
def probe(marker: str) -> None:
    beat = Heartbeat()
    beat.enabled = True  # as on a worker (a deployment's run)
    with beat:
        for _ in range(240):
            time.sleep(0.5)
    Path(marker).write_text("finished")

probe(sys.argv[1])
"""


def test_a_run_its_dispatcher_gave_up_on_stops_itself(api, tmp_path):
    """A starved worker whose beats went stale keeps running after the dispatcher marked
    its run crashed and sent a retry elsewhere; it must stop, not write beside the retry."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed
    from prefect.variables import Variable

    from tasks.heartbeat import heartbeat_name

    marker = tmp_path / "finished"
    proc = subprocess.Popen(
        [sys.executable, "-c", FENCE_PROBE, str(marker)],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        run = None
        while time.time() < deadline and run is None:
            runs = [r for r in _flow_runs("fence-probe") if r.state and r.state.is_running()]
            if runs and Variable.get(heartbeat_name(runs[0].id), default=None):
                run = runs[0]
            time.sleep(0.5)
        assert run is not None, "the probe never beat"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Crashed(message="heartbeat lost: worker gone"))
        proc.wait(timeout=60)  # within a few beats, long before its 120 s of work
        assert not marker.exists()
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run.id).state.is_crashed()
    finally:
        kill_tree(proc.pid)


def test_gpu_stages_run_on_the_worker_and_rerun_is_cached(api, deployed, workdir):
    config = workdir / "pipelines.yaml"
    result = _run_factory(workdir, "v1", config)
    assert Path(result["report"]).exists()
    category_runs, detect_runs = _flow_runs("category"), _flow_runs("detect")
    assert {r.name for r in category_runs} == {"category-nut_demo", "category-carpet_demo"}
    assert [r.name for r in detect_runs] == ["detect"]  # the second GPU flow, same dispatcher
    for run in category_runs + detect_runs:
        assert run.state.is_completed(), run.state
        assert run.work_pool_name == "cuda"
        assert run.infrastructure_pid, "the process worker records the PID it ran the flow in"
    assert (workdir / "data" / "pairs" / "v1" / "pairs.parquet").exists()

    # the run's artifacts: gate and metric tables, where the outputs are, progress at 100 %
    first = max(_flow_runs("factory"), key=lambda r: r.start_time)
    artifacts = _artifacts(first.id)
    assert {"gates", "metrics", "factory-run", "factory-progress"} <= set(artifacts)
    assert float(artifacts["factory-progress"].data) == 100.0
    metrics = json.loads(artifacts["metrics"].data)
    assert len(metrics) == 4 and all(m["kid_x1e3"] is not None for m in metrics)
    assert result["report"] in artifacts["factory-run"].data

    # rerun with nothing changed: every task of the new factory run is a cache hit
    before = {r.id for r in _flow_runs("category") + _flow_runs("detect")}
    again = _run_factory(workdir, "v1", config)
    assert again["report"] == result["report"]
    after = {r.id for r in _flow_runs("category") + _flow_runs("detect")}
    assert after == before, "no GPU flow ran again"
    latest = max(_flow_runs("factory"), key=lambda r: r.start_time)
    states = [t.state.name for t in _task_runs(latest.id)]
    assert states and all(s == "Cached" for s in states), states


def test_worker_killed_mid_run_is_retried_with_same_outputs(api, deployed, server, workdir):
    """v2 is v1's config again; its GPU stage is killed with its worker mid-run.

    The factory runs as the CLI in its own process, as a CI job would, so every
    Prefect client in it (the GPU slot's lease renewal included) talks to the
    test's server.
    """
    config = workdir / "pipelines.yaml"
    log_path = server.home / "factory-v2.log"
    with open(log_path, "wb") as log:
        factory = subprocess.Popen(
            [str(BIN / "anomaly-factory"), "run", "--config", str(config)]
            + ["--version", "v2", "--no-progress"],
            env=server.env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    replacement = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and factory.poll() is None:
            running = [
                r for r in _flow_runs("category") if _version(r) == "v2" and r.state.is_running()
            ]
            if running:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no GPU stage of v2 started:\n{log_path.read_text()[-3000:]}")
        # killed once it has written at least one pair, so the retry has work to resume
        pairs_v2 = workdir / "data" / "pairs" / "v2"
        while time.time() < deadline and not any(pairs_v2.glob("*/*/records/*.json")):
            time.sleep(0.2)
        kill_tree(deployed.pid)  # the worker and the flow run it spawned
        killed = running[0]
        replacement = server.start_worker("cuda", "gpu0-restarted", workdir)
        rc = factory.wait(timeout=900)
        # the same verdict as the uninterrupted v1 (this reduced config's 2-step fine-tune
        # makes data the pixel gates may fail: then both exit 1, and v2 must not differ)
        v1 = json.loads((workdir / "data" / "reports" / "v1" / "gates.json").read_text())
        assert rc == (0 if v1["passed"] else 1), log_path.read_text()[-3000:]
        assert "factory run failed" not in log_path.read_text()
    finally:
        kill_tree(factory.pid)
        if replacement is not None:
            kill_tree(replacement.pid)
    runs = {r.id: r for r in _flow_runs("category")}
    assert runs[killed.id].state.is_crashed(), "the killed run was detected and marked crashed"
    retried = [
        r
        for r in runs.values()
        if _version(r) == "v2" and r.name == killed.name and r.state.is_completed()
    ]
    assert retried, "a new run of the killed stage completed"
    a = _tree_hashes(workdir / "data" / "pairs" / "v1")
    b = _tree_hashes(workdir / "data" / "pairs" / "v2")
    assert len(a) >= 2 * 2 * 3 * 3 and a == b  # 2 categories x 2 types x 3 pairs x 3 PNGs


def test_failed_gate_exits_nonzero_and_keeps_outputs(api, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from anomaly_factory.cli import app

    config = write_config(
        tmp_path / "pipelines.yaml",
        demo={"categories": ["nut_demo"]},
        detector={"enabled": False},
        # no pixel changes by 1,000 grey levels: every pair fails its anomaly check (kid_max
        # would not do: it applies only with the standard Inception weights)
        gates={"pair_checks": {"change_min": 1000.0}},
    )
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        app, ["run", "--config", str(config), "--version", "bad", "--no-progress"]
    )
    assert res.exit_code == 1, res.output
    assert "quality gates failed" in res.output
    pairs = sorted((tmp_path / "data" / "pairs" / "bad").glob("*/*/pairs.parquet"))
    assert len(pairs) == 2, "both types' pairs are kept"
    assert (tmp_path / "data" / "reports" / "bad" / "report.html").exists()


def test_local_workers_run_categories_side_by_side_with_the_same_bytes(api, tmp_path):
    """``orchestration.local_workers: 2``: the two categories' GPU stages run at once, in
    two processes reporting to the factory's own Prefect API, and make the same pairs,
    byte for byte, as the same config run one category after another; and so do the four
    (category, type) runs of ``fan_out: type``, after one shared run per category."""
    runs = {}
    for workers, fan_out in ((1, "category"), (2, "category"), ("t", "type")):
        root = tmp_path / f"w{workers}"
        root.mkdir()
        # the same torch threads in all (by default a share of the cores per worker)
        config = write_config(
            root / "pipelines.yaml",
            detector={"enabled": False},
            orchestration={
                "local_workers": 2 if workers == "t" else workers,
                "torch_threads": 1,
                "fan_out": fan_out,
            },
        )
        runs[workers] = _run_factory(root, f"par{workers}", config)

    stages = [r for r in _flow_runs("category") if _version(r) == "par2"]
    assert sorted(r.parameters["category"] for r in stages) == ["carpet_demo", "nut_demo"]
    assert all(r.state.is_completed() for r in stages)
    assert max(r.start_time for r in stages) < min(r.end_time for r in stages), (
        "the categories ran one after the other"
    )

    per_type = [r for r in _flow_runs("category") if _version(r) == "part"]
    assert all(r.state.is_completed() for r in per_type)
    jobs = sorted((r.parameters["category"], *r.parameters["anomaly_types"]) for r in per_type)
    assert jobs == sorted(
        [(c,) for c in ("carpet_demo", "nut_demo")]  # the shared part of each category
        + [(c, t) for c in ("carpet_demo", "nut_demo") for t in ANOMALY_TYPES[c]]
    ), jobs
    typed = [r for r in per_type if r.parameters["anomaly_types"]]
    shared = [r for r in per_type if not r.parameters["anomaly_types"]]
    assert max(r.end_time for r in shared) <= min(r.start_time for r in typed)  # shared first
    starts = sorted(r.start_time for r in typed)
    assert starts[1] < min(r.end_time for r in typed), "the types ran one after the other"

    pairs = {w: _tree_hashes(tmp_path / f"w{w}" / "data" / "pairs" / f"par{w}") for w in runs}
    assert len(pairs[1]) == 2 * 2 * 3 * 3  # categories x types x pairs x (normal, image, mask)
    assert pairs[2] == pairs[1] and pairs["t"] == pairs[1]
