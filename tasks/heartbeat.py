"""Heartbeats and crashes of GPU stages: how a dispatcher tells a dead worker from a slow one.

A GPU stage on a worker sets a Prefect Variable every few seconds (:class:`Heartbeat`);
the dispatcher (``tasks.dispatch``) reads it and, when it goes stale, marks the run
crashed and raises :class:`StageCrashed`, which ``tasks.common.is_transient`` retries.
Both sides import this module, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.logging import get_logger
from prefect.variables import Variable

from anomaly_factory.errors import InfrastructureError

HEARTBEAT_S = 3.0  # seconds between beats; the dispatcher's timeout is several of these


def heartbeat_name(flow_run_id: Any) -> str:
    """The Prefect Variable a flow run beats on."""
    return f"heartbeat-{flow_run_id}"


class StageCrashed(InfrastructureError):
    """A GPU stage's run died (worker gone, heartbeat stale) or failed."""


class Heartbeat:
    """Sets a Prefect Variable every few seconds while the stage runs on a worker.

    Each beat also reads the run's state: once the dispatcher has given the run up
    (marked it crashed because beats went stale, as a starved machine can make them) and
    sent a retry elsewhere, this run stops itself with SIGTERM, as a cancelled one would,
    so that two machines never write the same type's files at once.

    The last beat is left in place on exit: the run's state turns Completed only after
    the flow returns, and a dispatcher that saw the beat vanish in that gap would take a
    finished run for a dead one. The dispatcher unsets the variable once it is done.
    A stage called in-process (no deployment, nobody watching) does not beat.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        ctx = get_run_context()
        self.flow_run_id = ctx.flow_run.id
        self.name = heartbeat_name(self.flow_run_id)
        self.enabled = ctx.flow_run.deployment_id is not None
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a missed beat is not fatal
                Variable.set(self.name, str(time.time()), overwrite=True)
            final = self._final_state()
            if final is not None and not self._stop.is_set():
                get_logger("anomaly_factory").warning(
                    "run %s was marked %s by its dispatcher (heartbeat lost); stopping: "
                    "its retry resumes from what this run stored",
                    self.flow_run_id,
                    final,
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self._stop.wait(HEARTBEAT_S)

    def _final_state(self) -> str | None:
        """The name of the final state this run already has while it still runs (the
        dispatcher gave it up), else None."""
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self.flow_run_id).state
        except Exception:  # the API unreachable now is not a verdict
            return None
        return state.name if state is not None and state.is_final() else None

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=HEARTBEAT_S + 1)
