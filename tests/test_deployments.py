"""One deployment route, schedules that fire, failed gates that fail the run.

A real Prefect server (SQLite, 127.0.0.1, a 2 s scheduler loop) and a real process
worker serving the `factory` pool from an ANOMALY_FACTORY_HOME that is a bare data folder
(no checkout): the worker imports the installed package. The factory runs the Perlin
generator on one demo category, so a run takes seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO
from tests.prefect_services import BIN, PrefectServer, kill_tree
from tests.test_orchestration import write_config

pytestmark = pytest.mark.slow

SCHEDULER = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "3",
    "PREFECT_WORKER_QUERY_SECONDS": "2",
}
# Perlin pairs of one category, no detectors: every stage, in seconds
QUICK = {
    "generator": "perlin",
    "demo": {"categories": ["nut_demo"]},
    "detector": {"enabled": False},
}
# gates a Perlin run passes: the type gates and pixel checks are off
PASSING = {
    "gates": {
        "type_gates": {"kid_references": [], "ic_lpips_ratio_min": None},
        "pair_checks": {
            k: None
            for k in (
                "psnr_min",
                "ssim_min",
                "change_min",
                "concentration_min",
                "foreground_share_min",
                "memorisation_min",
                "duplicate_iou_min",
            )
        },
    }
}
# ... and one it fails: no pair changes its masked pixels by 255 on average
FAILING = {"gates": {"pair_checks": {"change_min": 255.0}}}
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect"), extra_env=SCHEDULER)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """ANOMALY_FACTORY_HOME: pipelines.yaml (the default config) and the two test configs."""
    home = tmp_path_factory.mktemp("home")
    write_config(home / "pipelines.yaml", **QUICK, **PASSING)
    write_config(home / "passing.yaml", **QUICK, **PASSING)
    write_config(home / "failing.yaml", **QUICK, **FAILING)
    return home


@pytest.fixture(scope="module")
def worker(server, home, tmp_path_factory):
    """A worker of the `factory` pool, started elsewhere than its home."""
    proc = server.start_worker(
        "factory",
        "factory-0",
        tmp_path_factory.mktemp("elsewhere"),
        {"ANOMALY_FACTORY_HOME": str(home)},
    )
    yield proc
    kill_tree(proc.pid)


def _cli(server, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        env=server.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _deployments(server) -> dict[str, dict]:
    """What the server holds for each deployment, minus ids, times and the code version."""
    with _client() as client:
        found = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
    out = {}
    for d in found:
        out[d.name] = {
            "flow": flows[d.flow_id],
            "entrypoint": d.entrypoint,
            "work_pool": d.work_pool_name,
            "parameters": d.parameters,
            "schedules": sorted(
                (
                    getattr(s.schedule, "cron", None),
                    str(getattr(s.schedule, "interval", None)),
                    s.schedule.timezone,
                    s.active,
                )
                for s in d.schedules
            ),
            "tags": sorted(d.tags),
            "pull_steps": d.pull_steps,
            "job_variables": d.job_variables,
            "description": d.description,
            "path": d.path,
            "enforce_parameter_schema": d.enforce_parameter_schema,
            "parameter_schema": d.parameter_openapi_schema,
        }
    return out


def _delete_deployments() -> None:
    with _client() as client:
        for d in client.read_deployments():
            client.delete_deployment(d.id)


def _deployment_runs(**where) -> list:
    """Flow runs of deployments (not the in-process GPU subflows)."""
    with _client() as client:
        runs = client.read_flow_runs()
    return [
        r
        for r in runs
        if r.deployment_id is not None and all(getattr(r, k) == v for k, v in where.items())
    ]


def _wait_final(flow_run_id, timeout: float = RUN_TIMEOUT_S):
    deadline = time.time() + timeout
    with _client() as client:
        while time.time() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} not final after {timeout}s")


@pytest.fixture(scope="module")
def routes(server, tmp_path_factory):
    """The deployments of `anomaly-factory deploy`, then those of `prefect deploy --all`
    (left registered), each from a folder without a checkout."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        cli = _cli(server, [str(BIN / "anomaly-factory"), "deploy"], tmp_path_factory.mktemp("a"))
        assert cli.returncode == 0, cli.stderr
        by_cli = _deployments(server)
        _delete_deployments()
        folder = tmp_path_factory.mktemp("b")
        shutil.copy(REPO / "prefect.yaml", folder / "prefect.yaml")
        prefect = _cli(server, [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], folder)
        assert prefect.returncode == 0, prefect.stdout + prefect.stderr
        by_prefect = _deployments(server)
        yield by_cli, by_prefect


def test_both_routes_register_the_same_deployments(routes):
    by_cli, by_prefect = routes
    assert by_cli == by_prefect
    factory = by_cli["factory"]
    assert factory["entrypoint"] == "flows.factory.factory" and factory["work_pool"] == "factory"
    assert factory["parameters"] == {"profile": None, "config": None, "version": None}
    assert factory["schedules"] == [("0 3 * * 0", "None", "UTC", True)]
    assert factory["pull_steps"] == [{"flows.deploy.enter_factory_home": {}}]
    for name in ("category", "detect"):  # the two GPU flows, on the GPU pool, never scheduled
        assert by_cli[name]["entrypoint"] == f"flows.gpu.{name}"
        assert by_cli[name]["work_pool"] == "cuda" and by_cli[name]["schedules"] == []


def test_a_deployment_whose_gates_fail_ends_failed_on_the_worker(server, routes, home, worker):
    """The `prefect deploy` deployment, run through the worker from its home, with a config
    whose gates fail: the run is Failed with the gate table, every output is kept."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = _cli(
        server,
        [str(BIN / "prefect"), "deployment", "run", "factory/factory"]
        + ["--param", "config=failing.yaml", "--param", "version=bad"],
        home,
    )
    assert started.returncode == 0, started.stderr
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        (run,) = [r for r in _deployment_runs() if r.parameters.get("version") == "bad"]
        run = _wait_final(run.id)
        assert run.state.is_failed(), (
            run.state,
            (server.home / "worker-factory-0.log").read_text()[-3000:],
        )
        message = run.state.message
        assert "quality gates failed for bad: 2 of 2 types" in message
        assert re.search(r"demo/nut_demo/rust\s+FAIL\s+anomaly_change", message), message
        from tests.test_orchestration import _artifacts

        gates = json.loads(_artifacts(run.id)["gates"].data)
    assert {g["type"]: g["gate"] for g in gates} == {
        "demo/nut_demo/rust": "FAIL",
        "demo/nut_demo/scratch": "FAIL",
    }
    # every type's outputs are kept, named relative to the home, readable by others
    pairs = pd.read_parquet(home / "data" / "pairs" / "bad" / "pairs.parquet")
    assert sorted(pairs["anomaly_type"].unique()) == ["rust", "scratch"]
    assert all(p.startswith("data/pairs/bad/") for p in pairs["image_path"])
    card = (home / "data" / "shards" / "bad" / "card.json").read_text()
    assert (
        str(home) not in card
        and str(home) not in (home / "data" / "shards" / "bad" / "card.md").read_text()
    )
    assert json.loads(card)["publishable"] is False
    report = home / "data" / "reports" / "bad" / "report.html"
    assert "NOT PUBLISHABLE" in report.read_text()
    assert report.stat().st_mode & 0o777 == 0o644


def test_the_schedule_creates_runs_and_the_worker_completes_one(server, routes, home, worker):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deploy = _cli(
        server,
        [str(BIN / "anomaly-factory"), "deploy", "--interval", "10", "--config", "passing.yaml"],
        home,
    )
    assert deploy.returncode == 0, deploy.stderr
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        deadline = time.time() + RUN_TIMEOUT_S
        while time.time() < deadline:
            scheduled = [r for r in _deployment_runs(auto_scheduled=True)]
            done = [r for r in scheduled if r.state is not None and r.state.is_final()]
            if done:
                break
            time.sleep(2)
        else:
            pytest.fail(f"no scheduled run finished; scheduled: {[r.state for r in scheduled]}")
        assert len(scheduled) >= 2, "the scheduler creates the upcoming runs"
        assert done[0].state.is_completed(), (
            done[0].state,
            (server.home / "worker-factory-0.log").read_text()[-3000:],
        )
        assert done[0].parameters["config"] == "passing.yaml"
        with _client() as client:  # stop the schedule: no more runs while the module ends
            (dep,) = [d for d in client.read_deployments() if d.name == "factory"]
            client.pause_deployment(dep.id)
    gates = json.loads(next((home / "data" / "reports").glob("tiny-*/gates.json")).read_text())
    assert gates["passed"] is True


def test_each_gpu_flow_must_have_its_deployment_on_the_configured_pool() -> None:
    """The factory sends `category` and `detect` to the deployments the config names: a
    prefect.yaml that lacks one, runs another flow under its name, or puts it on another
    pool is refused before anything is registered, naming the field."""
    import copy

    from anomaly_factory.config import FactoryConfig
    from anomaly_factory.errors import InputError
    from flows.deploy import check_consistent, read_deployment_file

    spec = read_deployment_file(REPO / "prefect.yaml")
    cfg = FactoryConfig()
    check_consistent(cfg, spec)  # the shipped file and the default config agree

    def broken(name: str, **change) -> dict:
        out = copy.deepcopy(spec)
        entry = next(d for d in out["deployments"] if d["name"] == name)
        entry.update(change)
        return out

    missing = copy.deepcopy(spec)
    missing["deployments"] = [d for d in spec["deployments"] if d["name"] != "detect"]
    with pytest.raises(InputError, match=r"gpu_deployments\.detect: 'detect/detect' is not"):
        check_consistent(cfg, missing)
    swapped = broken("category", entrypoint="flows.gpu.detect")
    with pytest.raises(InputError, match=r"gpu_deployments\.category: .* not the 'category'"):
        check_consistent(cfg, swapped)
    elsewhere = broken("detect", work_pool={"name": "cpu"})
    with pytest.raises(InputError, match="orchestration.work_pool: 'cuda' differs"):
        check_consistent(cfg, elsewhere)
