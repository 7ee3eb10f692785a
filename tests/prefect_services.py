"""A real Prefect server (SQLite, 127.0.0.1) and real process workers, torn down by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def wait_healthy(api_url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        with suppress(OSError), urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout}s")


class PrefectServer:
    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = prefect_env(home, self.api_url) | (extra_env or {})
        self.log = open(home / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "WARNING",
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_healthy(self.api_url, self.proc)

    def start_worker(
        self, pool: str, name: str, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = open(self.home / f"worker-{name}.log", "ab")  # noqa: SIM115 (handed to the worker)
        return subprocess.Popen(
            [str(BIN / "anomaly-factory"), "worker", "--pool", pool, "--name", name],
            env=self.env | (env or {}),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        forget_api_services()
        kill_tree(self.proc.pid)
        self.log.close()


def forget_api_services() -> None:
    """Stop Prefect's per-process concurrency-slot services: each is a singleton per limit
    name, bound to the API it first talked to, so the next test module's server would
    otherwise get its `gpu` slots asked of this (dead) one."""
    from prefect.concurrency.services import (
        ConcurrencySlotAcquisitionService,
        ConcurrencySlotAcquisitionWithLeaseService,
    )

    for service in (ConcurrencySlotAcquisitionService, ConcurrencySlotAcquisitionWithLeaseService):
        service.drain_all(timeout=10)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Kill a process and every descendant (by PID, not by name)."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    psutil.wait_procs(procs, timeout=15)
