"""Which failures a task retries, and the orchestration modules' import graph."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

from anomaly_factory.errors import InputError
from tasks.common import is_transient
from tasks.heartbeat import StageCrashed

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "exc",
    [
        StageCrashed("worker gone"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(),
        TimeoutError(),
        OSError("disk hiccup"),
    ],
)
def test_infrastructure_failures_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [InputError("generate.n_pairs: 0"), ValueError("bad"), FileNotFoundError("x"), KeyError("k")],
)
def test_bad_input_and_bugs_fail_at_once(exc):
    assert not is_transient(exc)


def test_the_gpu_flow_does_not_import_its_dispatcher():
    """The worker side (``flows.gpu``) and the dispatcher share ``tasks.heartbeat``;
    neither imports the other at module level."""
    code = "import sys, flows.gpu; print('tasks.dispatch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


RETRIES = """
import json, sys
from prefect import flow, task
from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from tasks.common import configured
from tasks.heartbeat import StageCrashed

attempts = []

@task(name="flaky")
def flaky(kind):
    attempts.append(kind)
    if attempts.count(kind) <= 2:
        raise StageCrashed("worker gone") if kind == "crash" else InputError("n_pairs: 0")
    return "done"

cfg = FactoryConfig.model_validate(
    {"orchestration": {"retries": 2, "retry_delay_s": 0, "cache": False}}
)

@flow
def run(kind):
    return configured(flaky, cfg)(kind)

results = {"crash": run("crash")}
try:
    run("bad")
except InputError:
    results["bad"] = "raised"
print(json.dumps({"results": results, "attempts": attempts}))
"""


def test_configured_tasks_retry_transient_failures_as_the_config_says(tmp_path):
    """``tasks.common.configured`` gives a task ``orchestration.retries`` for transient
    failures only: run by Prefect's engine (its temporary server, in a process of its
    own), a worker crash is retried, bad input is not."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1"}
    script = tmp_path / "retries.py"
    script.write_text(RETRIES)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["results"] == {"crash": "done", "bad": "raised"}
    assert out["attempts"].count("crash") == 3  # two retries
    assert out["attempts"].count("bad") == 1  # none
