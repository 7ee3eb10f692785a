"""The GPU work of one category, deployed on the ``cuda`` work pool.

``generate``: per anomaly type, finetune -> masks -> CAMA -> generate.
``detect``: downstream detector retraining and evaluation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import flow

from anomaly_factory.layout import RunLayout
from tasks.common import config_from, configured
from tasks.heartbeat import Heartbeat
from tasks.stages import generate_type, prepare_type, run_detectors


def stage_outputs(
    cfg, stage: str, category: str, anomaly_types: list[str], version: str, root: str
) -> list[str]:
    """Where a GPU stage leaves its results (so a dispatcher can find them)."""
    layout = RunLayout(cfg, version, Path(root))
    if stage == "generate":
        return [str(layout.pairs_dir(category, t) / "pairs.parquet") for t in anomaly_types]
    return [str(layout.reports / "detector_metrics.json")]


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
) -> list[str]:
    """Run one GPU stage for one category; returns the produced paths.

    It runs in ``root``, the factory's data root, as the factory does: manifests name
    files relative to it.
    """
    cfg = config_from(cfg_json)
    layout = RunLayout(cfg, version, Path(root))
    if Path(manifest).resolve() != layout.manifest:
        raise ValueError(f"gpu_stage: manifest {manifest} is not the version's {layout.manifest}")
    with contextlib.chdir(root), Heartbeat():
        if stage == "detect":
            return [configured(run_detectors, cfg)(cfg_json, version, root, code)]
        if stage != "generate":
            raise ValueError(f"stage: {stage!r} is not one of ['generate', 'detect']")
        outputs = []
        for anomaly_type in anomaly_types:
            args = (cfg_json, category, anomaly_type)
            checkpoint = configured(prepare_type, cfg)(*args, version, root, code)
            outputs.append(configured(generate_type, cfg)(*args, checkpoint, version, root, code))
        return outputs
