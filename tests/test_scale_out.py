"""Scale-out: GPU workers on separate machines, with no shared disk, one job per
(category, anomaly type), every artifact in a store (moto's S3 server on 127.0.0.1).

Each worker stands for a machine: its own empty working directory, ``HOME`` (where its
cache and Prefect's own files go) and Prefect home; it has the installed package and the
store, nothing else. One Prefect server (SQLite, 127.0.0.1), torn down by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from anomaly_factory.datasets.demo import ANOMALY_TYPES
from tests.conftest import REPO
from tests.prefect_services import BIN, PrefectServer, kill_tree
from tests.test_orchestration import _flow_runs, _version, write_config
from tests.test_s3_publish import make_client, start_server

pytestmark = pytest.mark.slow

CATEGORIES = ["nut_demo", "carpet_demo"]
BUCKET = f"runs-{uuid.uuid4().hex[:10]}"
STORE = f"s3://{BUCKET}/factory"
STORE2 = f"s3://{BUCKET}/factory2"  # the kill test's: nothing of the first run to reuse
STEPS = 60  # fine-tune steps: long enough to kill a worker in the middle of one
SCALE = {
    "demo": {"categories": CATEGORIES},
    "detector": {"enabled": False},
    "finetune": {"steps": STEPS, "checkpoint_every": 4},
    "store": {"sync_every_s": 0.3},
    "orchestration": {
        "dispatch": "work_pool",
        "fan_out": "type",
        "gpu_concurrency_limit": 2,
        "torch_threads": 1,  # the same threads on every route: the same float rounding
        # two workers, a server and the test on 2 cores can starve a beat for a while;
        # a run given up on stops itself (test_orchestration), but would be retried here
        "heartbeat_timeout_s": 45,
    },
}
AWS = {
    "AWS_ACCESS_KEY_ID": "AKIATESTINGKEY",
    "AWS_SECRET_ACCESS_KEY": "scale-out-" + uuid.uuid4().hex,
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    server, url = start_server()
    env = AWS | {
        "AWS_ENDPOINT_URL": url,
        "AWS_CONFIG_FILE": str(tmp_path_factory.mktemp("aws") / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path_factory.mktemp("aws") / "none"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    make_client().create_bucket(Bucket=BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("config")
    return write_config(folder / "pipelines.yaml", **SCALE, data_root=STORE)


@pytest.fixture
def api(server, aws, monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    for key, value in server.env.items():
        if key.startswith(("PREFECT_", "HF_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("ANOMALY_FACTORY_CACHE", str(tmp_path / "factory-cache"))
    with temporary_settings(
        {PREFECT_API_URL: server.api_url, PREFECT_LOCAL_STORAGE_PATH: server.home / "storage"}
    ):
        yield server


class Machine:
    """A worker on the ``cuda`` pool with nothing but the package: an empty working
    directory, its own HOME (its cache and Prefect files go there)."""

    def __init__(self, server: PrefectServer, root: Path, name: str, aws: dict[str, str]):
        self.name, self.cwd, self.home = name, root / "cwd", root / "home"
        self.cwd.mkdir(parents=True)
        self.home.mkdir(parents=True)
        env = dict(server.env) | aws
        for key in ("ANOMALY_FACTORY_CACHE", "ANOMALY_FACTORY_HOME", "XDG_CACHE_HOME"):
            env.pop(key, None)
        env |= {
            "HOME": str(self.home),
            "PREFECT_HOME": str(self.home / ".prefect"),
            "PREFECT_LOCAL_STORAGE_PATH": str(self.home / ".prefect" / "storage"),
            "PREFECT_LOGGING_LEVEL": "INFO",  # the worker's "submitting" line reaches the API
        }
        self.proc = server.start_worker("cuda", name, self.cwd, env)

    def kill(self) -> None:
        kill_tree(self.proc.pid)


@pytest.fixture(scope="module")
def machines(server, aws, config, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from anomaly_factory.config import load_config
    from flows.deploy import register_deployments

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        register_deployments(load_config(config), schedules=[])
    root = tmp_path_factory.mktemp("machines")
    workers = [Machine(server, root / n, n, aws) for n in ("gpu-a", "gpu-b")]
    yield workers
    for w in workers:
        w.kill()


@pytest.fixture(scope="module")
def reference(server, aws, config, tmp_path_factory) -> Path:
    """The same config on one machine, in a local folder: the bytes to match."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.factory import VersionFailedGates, factory

    root = tmp_path_factory.mktemp("local")
    settings = {
        PREFECT_API_URL: server.api_url,
        PREFECT_LOCAL_STORAGE_PATH: server.home / "storage",
    }
    # this reduced config may fail its gates: the bytes are what is compared
    with temporary_settings(settings), contextlib.suppress(VersionFailedGates):
        factory(
            profile="tiny",
            config=str(config),
            version="v1",
            root=str(root),
            overrides={"orchestration": {"dispatch": "local"}},
        )
    return root / "data"


def _store_files(prefix: str) -> dict[str, bytes]:
    s3 = make_client()
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            out[o["Key"][len(prefix) :]] = body
    return out


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _pool_runs(version: str) -> list:
    """The GPU runs of ``version`` on the pool (the local reference's ran in-process)."""
    return [r for r in _flow_runs("category") if _version(r) == version and r.work_pool_name]


def _worker_of(flow_run_id) -> str | None:
    """The worker that took a flow run, from its logs in the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    for entry in logs:
        found = re.search(r"Worker '([^']+)' submitting flow run", entry.message)
        if found:
            return found.group(1)
    return None


def _gpu_job_tables(flow_run_id) -> list[list[dict]]:
    """Every version of a factory run's ``gpu-jobs`` table artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=["gpu-jobs"]),
            )
        )
    return [json.loads(a.data) if isinstance(a.data, str) else a.data for a in found]


def _pngs(files: dict[str, bytes]) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if k.endswith(".png")}


def _repo_data() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "data").rglob("*")}


def _written_outside(machines: list[Machine]) -> list[str]:
    """What a worker wrote outside its cache and Prefect's folder (none is allowed)."""
    stray = [f"{m.name}: cwd/{p.name}" for m in machines for p in m.cwd.iterdir()]
    for m in machines:
        for p in m.home.rglob("*"):
            rel = p.relative_to(m.home).as_posix()
            if not p.is_file() or rel.startswith((".prefect/", ".cache/anomaly-factory/")):
                continue
            stray.append(f"{m.name}: ~/{rel}")
    return stray


def test_two_workers_without_shared_disk_make_the_single_machine_bytes(
    api, machines, config, reference
):
    from flows.factory import VersionFailedGates, factory

    before = _repo_data()
    try:
        result = factory(profile="tiny", config=str(config), version="v1", root=STORE)
    except VersionFailedGates as exc:
        result = exc.result
    assert result["data_root"] == STORE

    # one GPU job per (category, type), after one per category for the shared part,
    # spread over both machines
    runs = [r for r in _pool_runs("v1") if r.state.is_completed()]
    seen = [(r.name, r.state.name, _worker_of(r.id)) for r in _pool_runs("v1")]
    jobs = sorted((r.parameters["category"], *r.parameters["anomaly_types"]) for r in runs)
    assert jobs == sorted(
        [(c,) for c in CATEGORIES] + [(c, t) for c in CATEGORIES for t in ANOMALY_TYPES[c]]
    ), seen
    typed = [r for r in runs if r.parameters["anomaly_types"]]
    workers = {r.name: _worker_of(r.id) for r in typed}
    assert set(workers.values()) == {"gpu-a", "gpu-b"}, workers

    # the factory's gpu-jobs table shows each type's job, the last version all done
    (factory_run,) = [r for r in _flow_runs("factory") if r.parameters.get("root") == STORE]
    tables = _gpu_job_tables(factory_run.id)
    n_types = sum(len(ANOMALY_TYPES[c]) for c in CATEGORIES)
    assert len(tables) == n_types, tables
    assert sorted(sum(row["state"] == "done" for row in t) for t in tables) == list(
        range(1, n_types + 1)
    )
    assert {row["job"] for row in tables[0]} == {
        f"{c}/{t}" for c in CATEGORIES for t in ANOMALY_TYPES[c]
    }

    # the store holds the version, byte for byte what one machine makes in a local folder
    shards = _store_files("factory/data/shards/v1/")
    assert shards and shards == _local_files(reference / "shards" / "v1")
    pairs = _pngs(_store_files("factory/data/pairs/v1/"))
    assert len(pairs) == 2 * 2 * 3 * 3 and pairs == _pngs(_local_files(reference / "pairs" / "v1"))
    for c in CATEGORIES:
        for t in ANOMALY_TYPES[c]:
            meta = json.loads(
                _store_files(f"factory/data/checkpoints/tiny/{c}/{t}/")["checkpoint.json"]
            )
            assert meta["steps"] == STEPS and meta["resumed_from"] == 0

    assert _written_outside(machines) == []
    assert _repo_data() == before, "nothing was written into the checkout"


def test_a_worker_killed_mid_type_is_resumed_on_the_other_from_the_store(
    api, server, machines, config, reference, aws, tmp_path
):
    """v2 is v1's config again, run as the CLI (a CI job); the worker fine-tuning one type
    is killed once the store holds one of its resume states."""
    log_path = tmp_path / "factory-v2.log"
    env = dict(server.env) | aws | {"ANOMALY_FACTORY_CACHE": str(tmp_path / "factory-cache")}
    with open(log_path, "wb") as log:
        run = subprocess.Popen(
            [str(BIN / "anomaly-factory"), "run", "--config", str(config), "--version", "v2"]
            + ["--data-root", STORE2, "--no-progress"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    s3 = make_client()
    victim = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and run.poll() is None and victim is None:
            listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="factory2/data/checkpoints/")
            keys = [o["Key"] for o in listed.get("Contents", [])]
            for key in keys:
                found = re.search(r"checkpoints/tiny/([^/]+)/([^/]+)/train_state-\d+/state", key)
                if found and not any(
                    k.endswith(f"{found[1]}/{found[2]}/checkpoint.json") for k in keys
                ):
                    victim = (found[1], found[2])
                    break
            time.sleep(0.1)
        assert victim is not None, log_path.read_text()[-3000:]
        name = f"category-{victim[0]}-{victim[1]}"
        running = [r for r in _pool_runs("v2") if r.name == name]
        killed_on = _worker_of(running[0].id)
        by_name = {m.name: m for m in machines}
        by_name[killed_on].kill()
        rc = run.wait(timeout=900)
        v1 = json.loads((reference / "reports" / "v1" / "gates.json").read_text())
        assert rc == (0 if v1["passed"] else 1), log_path.read_text()[-3000:]
    finally:
        kill_tree(run.pid)

    runs = [r for r in _pool_runs("v2") if r.name == name]
    assert any(r.state.is_crashed() for r in runs), "the killed run was marked crashed"
    retried = [r for r in runs if r.state.is_completed()]
    assert retried and _worker_of(retried[0].id) != killed_on
    meta = json.loads(
        _store_files(f"factory2/data/checkpoints/tiny/{victim[0]}/{victim[1]}/")["checkpoint.json"]
    )
    assert meta["steps"] == STEPS and 0 < meta["resumed_from"] < STEPS, meta
    assert _pngs(_store_files("factory2/data/pairs/v2/")) == _pngs(
        _local_files(reference / "pairs" / "v1")
    )
