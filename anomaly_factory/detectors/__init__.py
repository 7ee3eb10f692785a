"""Downstream detectors: retraining on generated pairs, scored on the real test split.

``run_detectors(cfg, pairs_path, manifest_path, out_dir)`` is the detect stage
(``anomaly-factory detect``); see ``detectors/run.py``.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # lazy, so that importing a submodule does not pull in torch and anomalib
    if name == "run_detectors":
        from anomaly_factory.detectors.run import run_detectors

        return run_detectors
    raise AttributeError(name)


__all__ = ["run_detectors"]
