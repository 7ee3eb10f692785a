"""The GPU work of one category, deployed on the ``cuda`` work pool.

``generate``: per anomaly type, finetune -> masks -> CAMA -> generate.
``detect``: downstream detector retraining and evaluation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import get_run_context
from prefect.variables import Variable

from anomaly_factory.layout import RunLayout
from tasks.common import config_from
from tasks.dispatch import heartbeat_name
from tasks.stages import finetune_type, generate_type, run_detectors

HEARTBEAT_S = 3.0


def stage_outputs(
    cfg, stage: str, category: str, anomaly_types: list[str], version: str, root: str
) -> list[str]:
    """Where a GPU stage leaves its results (so a dispatcher can find them)."""
    layout = RunLayout(cfg, version, Path(root))
    if stage == "generate":
        return [str(layout.pairs_dir(category, t) / "pairs.parquet") for t in anomaly_types]
    return [str(layout.reports / "detector_metrics.json")]


class _Heartbeat:
    """Sets a Prefect Variable every few seconds while the stage runs on a worker.

    The last beat is left in place on exit: the run's state turns Completed only after
    the flow returns, and a dispatcher that saw the beat vanish in that gap would take a
    finished run for a dead one. The dispatcher unsets the variable once it is done.
    A stage called in-process (no deployment, nobody watching) does not beat.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        ctx = get_run_context()
        self.name = heartbeat_name(ctx.flow_run.id)
        self.enabled = ctx.flow_run.deployment_id is not None
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a missed beat is not fatal
                Variable.set(self.name, str(time.time()), overwrite=True)
            self._stop.wait(HEARTBEAT_S)

    def __enter__(self) -> _Heartbeat:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=HEARTBEAT_S + 1)


@flow(name="gpu-stage", persist_result=True)
def gpu_stage(
    cfg_json: dict[str, Any],
    stage: str,
    category: str,
    anomaly_types: list[str],
    manifest: str,
    version: str,
    root: str,
    code: str,
    pairs: str | None = None,
) -> list[str]:
    """Run one GPU stage for one category; returns the produced paths.

    It runs in ``root``, the factory's data root, as the factory does: manifests name
    files relative to it.
    """
    cfg = config_from(cfg_json)
    with contextlib.chdir(root), _Heartbeat():
        if stage == "detect":
            if pairs is None:
                raise ValueError("gpu_stage(stage='detect') needs the pairs manifest")
            return [run_detectors(cfg_json, pairs, manifest, version, root, code)]
        if stage != "generate":
            raise ValueError(f"stage: {stage!r} is not one of ['generate', 'detect']")
        outputs = []
        for anomaly_type in anomaly_types:
            checkpoint = None
            if cfg.generator == "magic":
                checkpoint = finetune_type(
                    cfg_json, manifest, category, anomaly_type, version, root, code
                )
            outputs.append(
                generate_type(
                    cfg_json, manifest, category, anomaly_type, checkpoint, version, root, code
                )
            )
        return outputs
