"""`anomaly-factory run` as a user sees it in a real terminal.

tmux (its screen, as rendered) when installed, else a pty (the raw stream, escape codes
stripped). The run uses Prefect's temporary server, as `run` does by default, the Perlin
generator on one demo category and the downstream detectors (Lightning and anomalib
print a lot), with gates it fails: exit 1, every output kept.

First it is stopped with Ctrl-C once it has written a pair, then the same command
resumes it. The last screen is saved as ``run-screen.txt`` in the test's folder;
``tests/captures/run_tmux.txt`` is one such capture.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.prefect_services import BIN, kill_tree
from tests.test_deployments import FAILING, QUICK
from tests.test_orchestration import write_config

pytestmark = pytest.mark.slow

VERSION = "t1"
COLUMNS, ROWS = 120, 60
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
NOISE = ("Traceback", " INFO ", "WARNING", "it/s]", "lightning", "Prefect collects", "telemetry")


def _own_terminal() -> None:
    """In the child: a session of its own with the pty (its stdin) as controlling terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """One command in a terminal: send Ctrl-C, wait for it, read what it shows."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.tmux = shutil.which("tmux")
        self.exit_file = cwd / f".exit-{uuid.uuid4().hex[:6]}"
        if self.tmux:
            self.socket = f"af-test-{uuid.uuid4().hex[:8]}"  # a tmux server of our own
            # the pane stays after the command ends, to be read; close() ends it
            script = f"{' '.join(command)}; echo $? > {self.exit_file}; sleep 3600"
            self._tmux(
                "new-session", "-d", "-x", str(COLUMNS), "-y", str(ROWS), script, env=env, cwd=cwd
            )
            self._tmux("set-option", "-g", "history-limit", "5000")
            self.shell = psutil.Process(int(self._tmux("display", "-p", "#{pane_pid}").strip()))
        else:
            self.master, slave = pty.openpty()
            os.set_blocking(self.master, False)
            self.proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env | {"COLUMNS": str(COLUMNS), "LINES": str(ROWS)},
                stdin=slave,
                stdout=slave,
                stderr=slave,
                preexec_fn=_own_terminal,  # Ctrl-C on the master then sends SIGINT
            )
            os.close(slave)
            self.raw = b""

    def _tmux(self, *args: str, **kw) -> str:
        return subprocess.run(
            [self.tmux, "-L", self.socket, *args], capture_output=True, text=True, check=True, **kw
        ).stdout

    def pid(self) -> int:
        """The CLI's process."""
        if not self.tmux:
            return self.proc.pid
        for _ in range(100):
            children = self.shell.children()
            if children:
                return children[0].pid
            time.sleep(0.1)
        raise RuntimeError("the command did not start")

    def ctrl_c(self) -> None:
        if self.tmux:
            self._tmux("send-keys", "C-c")
        else:
            os.write(self.master, b"\x03")  # the line discipline sends SIGINT

    def pump(self) -> None:
        """Read what the pty holds (a full pty would block the program)."""
        while not self.tmux and select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.raw += chunk

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.pump()
            if self.tmux and self.exit_file.exists() and self.exit_file.read_text().strip():
                return int(self.exit_file.read_text())
            if not self.tmux and self.proc.poll() is not None:
                self.pump()
                return self.proc.returncode
            time.sleep(0.2)
        raise TimeoutError(f"still running after {timeout}s:\n{self.screen()[-3000:]}")

    def screen(self) -> str:
        """What the terminal shows (tmux: scrollback and screen, as rendered)."""
        if self.tmux:
            return self._tmux("capture-pane", "-p", "-J", "-S", "-")
        self.pump()
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def close(self) -> None:
        if self.tmux:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._tmux("kill-server")
        else:
            kill_tree(self.proc.pid)
            os.close(self.master)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("terminal")
    detector = {"enabled": True, "classifier_epochs": 1}
    write_config(root / "pipelines.yaml", **QUICK | {"detector": detector}, **FAILING)
    return root


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DO_NOT_TRACK"))}
    return env | {"PREFECT_HOME": str(workdir / "prefect-home"), "HF_HUB_OFFLINE": "1"}


WARNS = """
import warnings
from pathlib import Path
from anomaly_factory.cli._common import console
from anomaly_factory.cli._display import RunDisplay, RunOutput
from anomaly_factory.config import FactoryConfig
from anomaly_factory.layout import RunLayout

layout = RunLayout(FactoryConfig(), "t1", Path.cwd())
with RunOutput(layout.run_log), RunDisplay(layout, console):
    warnings.warn("a library's warning")
    print("a library's print")
"""


def test_what_python_code_prints_under_the_live_display_goes_to_the_log(tmp_path):
    """Rich's live display would put warnings and prints on screen; the log takes them."""
    (tmp_path / "warns.py").write_text(WARNS)
    term = Terminal([sys.executable, "warns.py"], tmp_path, _env(tmp_path))
    try:
        assert term.wait(timeout=120) == 0, term.screen()[-3000:]
        screen = term.screen()
    finally:
        term.close()
    log = (tmp_path / "data" / "runs" / "t1" / "run.log").read_text()
    assert "✓ ingest" not in screen and "· ingest" in screen, screen  # the display was there
    for line in ("a library's warning", "a library's print"):
        assert line in log and line not in screen, (line, screen)


def test_ctrl_c_stops_the_run_then_the_same_command_resumes_it(workdir):
    command = [str(BIN / "anomaly-factory"), "run", "--version", VERSION]
    records = workdir / "data" / "pairs" / VERSION
    first = Terminal(command, workdir, _env(workdir))
    try:
        cli = psutil.Process(first.pid())
        deadline = time.time() + 300
        while time.time() < deadline and not any(records.glob("*/*/records/*.json")):
            first.pump()
            time.sleep(0.2)
        assert any(records.glob("*/*/records/*.json")), first.screen()[-3000:]
        children = cli.children(recursive=True)  # Prefect's temporary server among them
        kept = {p: p.stat().st_mtime_ns for p in records.glob("*/*/records/*.json")}
        first.ctrl_c()
        code = first.wait(timeout=30)
        stopped = first.screen()
    finally:
        first.close()
    assert code == 130, stopped[-3000:]
    assert "error: interrupted (SIGINT): finished steps are kept" in stopped
    assert "Traceback" not in stopped
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    second = Terminal(command, workdir, _env(workdir))
    try:
        code = second.wait(timeout=600)
        screen = second.screen()
    finally:
        second.close()
    (workdir / "run-screen.txt").write_text(screen)
    assert code == 1, screen[-3000:]  # the gates fail
    # the display: every stage done with its counts, each type's pairs, then the summary
    for row in (
        "✓ ingest",
        "1/1 datasets",
        "✓ generate",
        "2/2 types · 6/6 pairs",
        "nut_demo/rust",
        "3/3 pairs",
        "✓ gates",
        "✓ detectors",
        "✓ report",
        "✓ shards",
    ):
        assert row in screen, (row, screen[-3000:])
    summary = screen[screen.rindex("version  ") :]
    # the label column is as wide as its longest label ("data root"), whatever that is
    rows = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(
            r"^(version|data root|gates|report|shards|log) {2,}(.*)$", summary, re.M
        )
    }
    assert rows["version"] == VERSION and rows["gates"].startswith("0/2 types pass"), rows
    assert "off: kid_max, ic_lpips_min" in rows["gates"]
    assert rows["report"] == f"data/reports/{VERSION}/report.html"
    assert rows["shards"].startswith(f"data/shards/{VERSION}")
    assert rows["log"] == f"data/runs/{VERSION}/run.log"
    assert "error: quality gates failed for: demo/nut_demo/rust, demo/nut_demo/scratch" in summary
    for noise in NOISE:
        assert noise not in screen, (noise, screen[-3000:])
    # what libraries said went to the run log, and no telemetry was attempted
    log = (workdir / "data" / "runs" / VERSION / "run.log").read_text()
    assert "Beginning flow run" in log and "lightning" in log.lower()
    assert "database is locked" not in log and "anonymous usage" not in log
    # resumed: the pairs the first run finished were kept as they were
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
