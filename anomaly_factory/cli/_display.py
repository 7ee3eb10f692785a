"""What ``anomaly-factory run`` shows: one live display; library output goes to a run log.

:class:`RunOutput` points the process's stdout and stderr (file descriptors 1 and 2, so
Prefect, its ephemeral server, diffusers' tqdm bars, Lightning, anomalib and Python
warnings alike) at the run's log file, and the CLI's consoles at the terminal. Under
``--verbose`` that output is also shown, above the live display.

:class:`RunDisplay` is the live display: one row per stage with its counts (datasets,
types, pairs), one bar per anomaly type with its ETA, refreshed from the run's progress
files (``anomaly_factory.progress``), which every process of the run writes.

:func:`stop_on_signals` makes Ctrl-C and SIGTERM end the run within a few seconds;
everything a finished step wrote is kept, so the same command resumes.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from anomaly_factory import progress as run_progress
from anomaly_factory.cli import _common
from anomaly_factory.errors import Interrupted

STOP_GRACE_S = 5.0  # after Ctrl-C / SIGTERM the run gets this long to record its state
POLL_S = 0.5
SYNC_S = 2.0  # seconds between pulls of other machines' progress records (a store)
UNITS = {"ingest": "datasets", "generate": "types"}
LABELS = {"detect": "detectors"}
DONE, RUNNING, PENDING, OFF = "✓", "●", "·", "-"


# --------------------------------------------------------------------------- output
def _fd(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class RunOutput:
    """Send fds 1 and 2 to ``log_path`` (``verbose``: to it and to the terminal) and the
    CLI's consoles to the terminal, until the block ends.

    Where stdout and stderr are not the process's own descriptors (the CLI called from
    Python, as in tests) nothing is redirected: the caller holds the output.
    """

    def __init__(self, log_path: Path, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.redirected = False
        self._saved: dict[int, int] = {}
        self._consoles: list[tuple[Console, Any]] = []
        self._tee: threading.Thread | None = None
        self._pipe_w: int | None = None

    def __enter__(self) -> RunOutput:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 (closed on exit)
        self.log.write(f"\n==== anomaly-factory run, pid {os.getpid()}, {time.ctime()}\n".encode())
        if _fd(sys.stdout) != 1 or _fd(sys.stderr) != 2:
            return self
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        terminal = {
            fd: open(saved, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            for fd, saved in self._saved.items()
        }
        for console, fd in ((_common.console, 1), (_common.err_console, 2)):
            self._consoles.append((console, console._file))
            console.file = terminal[fd]
        if self.verbose:
            read, self._pipe_w = os.pipe()
            target = self._pipe_w
            self._tee = threading.Thread(target=self._copy, args=(read,), daemon=True)
            self._tee.start()
        else:
            target = self.log.fileno()
        for fd in (1, 2):
            os.dup2(target, fd)
        self.redirected = True
        return self

    def _log_at_exit(self) -> None:
        """What Prefect prints while it exits (stopping its temporary server) goes to the log."""
        if self.verbose or not self.redirected:
            return
        with contextlib.suppress(OSError, ValueError):
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            with open(self.log_path, "ab") as log:
                for fd in (1, 2):
                    os.dup2(log.fileno(), fd)

    def _copy(self, read: int) -> None:
        """Under --verbose: every line into the log, and onto the terminal above the display."""
        buffer = b""
        with contextlib.suppress(OSError, ValueError):  # the log closed as the run ended
            while chunk := os.read(read, 65536):
                self.log.write(chunk)
                buffer += chunk.replace(b"\r", b"\n")
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        text = Text(line.decode("utf-8", "replace"))
                        _common.console.print(text, soft_wrap=True)

    def __exit__(self, *exc: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        if self.redirected:  # after Prefect's exit hooks were registered: runs before them
            atexit.register(self._log_at_exit)
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
        if self._pipe_w is not None:
            os.close(self._pipe_w)  # child processes may still hold it: the tee is a daemon
            if self._tee is not None:
                self._tee.join(timeout=1)
        for console, file in self._consoles:
            console.file.flush()
            console._file = file  # None again where it followed sys.stdout / sys.stderr
        for saved in self._saved.values():
            os.close(saved)
        self._saved = {}
        self.log.close()


# --------------------------------------------------------------------------- signals
def _end_children() -> None:
    """Stop the processes this run started (Prefect's ephemeral server, flow processes)."""
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=1)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def stop_on_signals(
    on_timeout: Callable[[int], None] | None = None, grace_s: float = STOP_GRACE_S
) -> Iterator[None]:
    """Inside: SIGINT / SIGTERM raise :class:`Interrupted` at once; if the run has not
    unwound ``grace_s`` later (Prefect reporting the crash to a server that Ctrl-C also
    stopped), ``on_timeout(signum)`` tidies the terminal and the process ends with the
    processes it started. A second signal ends it at once.

    Every output is written atomically and each pair is recorded last, so what finished
    stays valid and the same command resumes from it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def end(signum: int) -> None:
        if on_timeout is not None:
            with contextlib.suppress(Exception):
                on_timeout(signum)
        _end_children()
        os._exit(128 + signum)

    def watchdog(signum: int) -> None:
        time.sleep(grace_s)
        end(signum)

    def handler(signum: int, frame: object) -> None:
        if received:
            end(signum)
        received.append(signum)
        threading.Thread(target=watchdog, args=(signum,), daemon=True).start()
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except BaseException as exc:
        if received and not isinstance(exc, Interrupted):
            raise Interrupted(received[0]) from exc
        if not received and "prefect.exceptions" in sys.modules:
            from prefect.exceptions import TerminationSignal

            # Prefect turns a SIGTERM inside a flow into its own TerminationSignal (and
            # sends the signal again later): it is the same stop
            if isinstance(exc, TerminationSignal):
                raise Interrupted(exc.signal) from exc
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- display
def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class TimeColumn(ProgressColumn):
    """How long a finished row took, the ETA of a running one, nothing for a pending one."""

    def render(self, task: Task) -> Text:
        if not task.started:
            return Text("")
        if task.finished:
            return Text(_hms(task.finished_time or 0), style="dim")
        remaining = task.time_remaining
        return Text(f"ETA {_hms(remaining)}" if remaining is not None else "", style="cyan")


class RunDisplay:
    """The live display of one run: stage rows, then one row per anomaly type."""

    def __init__(
        self, layout: Any, console: Console, sync: Callable[[], object] | None = None
    ) -> None:
        """``sync``: brings progress records made on other machines into the progress
        folder (a store pull); called every ``SYNC_S`` at most."""
        self.layout = layout
        self._sync, self._synced = sync, 0.0
        cfg = layout.cfg
        self.off = {"detect": not cfg.detector.enabled, "publish": not cfg.publish.enabled}
        self.bar = Progress(
            TextColumn("{task.fields[mark]}", markup=False),
            TextColumn("{task.description:<26}", markup=False),
            BarColumn(bar_width=28),
            TextColumn("{task.fields[count]:<26}", markup=False),
            TimeColumn(),
            console=console,
            transient=False,
            refresh_per_second=4,
            # sys.stdout/err stay the run log's: Rich would otherwise swap in proxies
            # that print whatever Python code writes (warnings) onto the terminal
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.stages: dict[str, TaskID] = {}
        self.types: dict[tuple[str, str], TaskID] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RunDisplay:
        self._add_stages(("ingest", "generate"))
        self.bar.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.update()
        self.bar.stop()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # a file being written: next tick
                self.update()

    def _add_stages(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name in self.stages:
                continue
            off = self.off.get(name, False)
            self.stages[name] = self.bar.add_task(
                LABELS.get(name, name),
                total=1,
                start=False,
                mark=OFF if off else PENDING,
                count="off" if off else "",
            )

    def _add_types(self) -> None:
        from anomaly_factory.manifest import anomaly_types, read_images

        if self.types or not self.layout.manifest.exists():
            return
        images = read_images(self.layout.manifest)
        for c in sorted(images["category"].unique()):
            for t in anomaly_types(images, c):
                self.types[(c, t)] = self.bar.add_task(
                    f"  {c}/{t}", total=None, start=False, mark=" ", count=""
                )
        self._add_stages(run_progress.STAGES[2:])

    def update(self) -> None:
        """Read the progress files and the pair records; move the rows."""
        if self._sync is not None and time.monotonic() - self._synced >= SYNC_S:
            self._synced = time.monotonic()
            self._sync()
        records = run_progress.read(self.layout.progress)
        stage = {r["stage"]: r for r in records if r["unit"] == run_progress.STAGE_UNIT}
        per_type = {r["unit"]: r for r in records if r["stage"] == "generate"}
        if "generate" in stage:
            self._add_types()
        pairs_done = pairs_total = 0
        for (c, t), task in self.types.items():
            record = per_type.get(f"{c}/{t}", {})
            total = record.get("total") or self.layout.cfg.generate.n_pairs
            records_dir = self.layout.pairs_dir(c, t) / "records"
            # pair records here (a job on this file system), else its own count (a job
            # on another machine, whose pairs arrive only when they are merged)
            made = max(sum(1 for _ in records_dir.glob("*.json")), record.get("done", 0))
            done = min(made, total)
            pairs_done, pairs_total = pairs_done + done, pairs_total + total
            if not self.bar.tasks[task].started:  # the clock of every type runs from here
                self.bar.start_task(task)
            mark = DONE if done >= total else (RUNNING if done else " ")
            self.bar.update(
                task, total=total, completed=done, mark=mark, count=f"{done}/{total} pairs"
            )
            if done >= total:
                self.bar.stop_task(task)
        for name, task in self.stages.items():
            record = stage.get(name)
            if record is None or self.off.get(name):
                continue
            total, done = max(int(record["total"]), 1), int(record["done"])
            count = f"{done}/{record['total']} {UNITS.get(name, '')}".strip()
            if name == "generate" and pairs_total:
                total, done = pairs_total, pairs_done
                count += f" · {pairs_done}/{pairs_total} pairs"
            elif name not in UNITS:
                count = ""
            finished = int(record["done"]) >= int(record["total"])
            if not self.bar.tasks[task].started:
                self.bar.start_task(task)
            self.bar.update(
                task,
                total=total,
                completed=total if finished else done,
                mark=DONE if finished else RUNNING,
                count=count,
            )
            if finished:
                self.bar.stop_task(task)
