"""The GPU work of one category, deployed on the ``cuda`` work pool.

``generate``: per anomaly type, finetune -> masks -> CAMA -> generate.
``detect``: downstream detector retraining and evaluation.
"""

from __future__ import annotations

import contextlib

from prefect import flow

from anomaly_factory.stages import RunRef
from tasks.common import configured
from tasks.heartbeat import Heartbeat
from tasks.stages import generate_type, prepare_type, run_detectors

STAGES = ("generate", "detect")


def stage_outputs(ref: RunRef, stage: str, category: str, anomaly_types: list[str]) -> list[str]:
    """Where a GPU stage leaves its results (so a dispatcher can find them)."""
    layout = ref.layout
    if stage == "generate":
        return [str(layout.pairs_dir(category, t) / "pairs.parquet") for t in anomaly_types]
    return [str(layout.reports / "detector_metrics.json")]


@flow(name="gpu-stage", persist_result=True)
def gpu_stage(ref: RunRef, stage: str, category: str, anomaly_types: list[str]) -> list[str]:
    """Run one GPU stage for one category; returns the produced paths.

    It runs in ``ref.root``, the factory's data root, as the factory does: manifests
    name files relative to it.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r} is not one of {list(STAGES)}")
    with contextlib.chdir(ref.root), Heartbeat():
        if stage == "detect":
            return [configured(run_detectors, ref.cfg)(ref)]
        outputs = []
        for anomaly_type in anomaly_types:
            checkpoint = configured(prepare_type, ref.cfg)(ref, category, anomaly_type)
            generate = configured(generate_type, ref.cfg)
            outputs.append(generate(ref, category, anomaly_type, checkpoint))
        return outputs
