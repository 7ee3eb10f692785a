"""Quality gates: a generated version is publishable only when it passes them.

``compute_metrics`` and ``run_gates`` live in :mod:`anomaly_factory.gates.run`, the
pixel checks of every pair in :mod:`anomaly_factory.gates.pair_checks`;
great-expectations is imported only when the expectations actually run.
"""

from __future__ import annotations

from anomaly_factory.gates.decide import GateResult, TypeGate, decide
from anomaly_factory.gates.pair_checks import compute_pair_checks, pair_checks_for_manifest
from anomaly_factory.gates.run import compute_metrics, run_gates

__all__ = [
    "GateResult",
    "TypeGate",
    "compute_metrics",
    "compute_pair_checks",
    "decide",
    "pair_checks_for_manifest",
    "run_gates",
]
