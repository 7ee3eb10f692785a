"""The factory's GPU flows, deployed on the ``cuda`` work pool (one worker per GPU).

``category``: what the category's types share (the generator's ``prepare_category``), then
per anomaly type given, the generator's ``prepare`` (MAGIC: the GPP fine-tune and the mask
generator) and ``generate`` (masks -> CAMA -> SAG sampling). The factory sends it one
category with all its types, or (``orchestration.fan_out: type``) one type at a time,
after a run per category with no types for the shared part.
``detect``: the downstream detectors, retrained on the version's pairs and evaluated.

Both work in the run's workspace: the data root, or with a store data root (``s3://…``)
this machine's cache of it, into which they pull the manifest and the category's images;
their tasks pull and push the rest. A worker then needs no checkout and no shared disk.

The dispatcher (``tasks.dispatch.dispatch_gpu``) runs either in-process or on the pool;
:data:`GPU_FLOWS` is the one table of what it can run, and :func:`flow_outputs` says where
each leaves its results, so a dispatcher that only waited on a worker can return them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow

from anomaly_factory.stages import RunRef
from anomaly_factory.storage import staging
from tasks.common import configured
from tasks.heartbeat import Heartbeat
from tasks.stages import generate_type, prepare_category, prepare_type, run_detectors


@flow(name="category", persist_result=True)
def category(ref: RunRef, category: str, anomaly_types: list[str]) -> list[str]:
    """Prepare ``category``, then each of ``anomaly_types``; returns their pairs manifests.

    It runs in ``ref.workspace``, as the factory does: manifests name files relative to it.
    """
    with entered(ref), Heartbeat():
        staging.pull_manifest(ref, category)
        configured(prepare_category, ref.cfg)(ref, category)
        outputs = []
        for anomaly_type in anomaly_types:
            checkpoint = configured(prepare_type, ref.cfg)(ref, category, anomaly_type)
            generate = configured(generate_type, ref.cfg)
            outputs.append(str(generate(ref, category, anomaly_type, checkpoint)))
        return outputs


@flow(name="detect", persist_result=True)
def detect(ref: RunRef) -> list[str]:
    """The downstream detectors of the version; returns their metrics file."""
    with entered(ref), Heartbeat():
        return [str(configured(run_detectors, ref.cfg)(ref))]


@contextlib.contextmanager
def entered(ref: RunRef) -> Iterator[Path]:
    """Work in the run's workspace (made on a machine that has not worked on it yet)."""
    ref.workspace.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(ref.workspace):
        yield ref.workspace


GPU_FLOWS: dict[str, Callable[..., list[str]]] = {"category": category, "detect": detect}


def flow_outputs(ref: RunRef, name: str, params: dict[str, Any]) -> list[str]:
    """Where GPU flow ``name`` run with ``params`` leaves its results."""
    layout = ref.layout
    if name == "category":
        return [
            str(layout.pairs_dir(params["category"], t) / "pairs.parquet")
            for t in params["anomaly_types"]
        ]
    return [str(layout.reports / "detector_metrics.json")]
