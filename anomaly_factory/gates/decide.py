"""Gate decisions: per anomaly type and per version, each pass/fail with reasons.

A version is publishable only when every type passes every check. A failure is
recorded, never acted on destructively: all produced files stay where they are,
and the other types' results are kept in ``gates.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from anomaly_factory.gates.expectations import CheckOutcome
from anomaly_factory.io import atomic_write_json

GATES_FILE = "gates.json"
ALL_TYPES = "*"  # reason key of a failure that no single type explains


@dataclass
class TypeGate:
    """One type's decision; ``values`` are its measured numbers (the type table's row)
    and ``pairs`` its pair-check counts (candidates, failed per check, published)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GateResult:
    passed: bool
    publishable: bool
    types: dict[str, TypeGate]
    version_reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    data_docs: str | None = None
    out_dir: str | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)  # gates.catalogue: on/off, why
    on_pair_failure: str = "fail"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        """0 when every gate passed, 1 otherwise (CI fails on a failed gate)."""
        return 0 if self.passed else 1


def decide(
    type_ids: list[str], checks: list[CheckOutcome], data_docs: Path | None = None
) -> GateResult:
    """Fold expectation outcomes into per-type and per-version decisions."""
    types = {t: TypeGate(passed=True) for t in type_ids}
    version_reasons: list[str] = []
    for check in checks:
        for t, reason in check.failed_types.items():
            if t in types:
                types[t].passed = False
                types[t].reasons.append(reason)
            else:
                version_reasons.append(reason if t == ALL_TYPES else f"{t}: {reason}")
        if not check.success and not check.failed_types:
            version_reasons.append(f"{check.check}: failed")
    if not type_ids:
        version_reasons.append("no anomaly types to gate (empty pairs manifest?)")
    passed = all(g.passed for g in types.values()) and not version_reasons
    return GateResult(
        passed=passed,
        publishable=passed,
        types=types,
        version_reasons=version_reasons,
        checks=[asdict(c) for c in checks],
        data_docs=str(data_docs) if data_docs else None,
    )


def write_gates(result: GateResult, out_dir: Path) -> Path:
    return atomic_write_json(Path(out_dir) / GATES_FILE, result.as_dict())


class GateSummary(BaseModel):
    """The decision the rest of the factory acts on (publish or not, exit 1 or 0), without
    the measurements: what the gates stage returns and ``gates.json`` holds.

    >>> s = GateSummary(passed=False, publishable=False, reports=Path("r"),
    ...                 types={"a": True, "b": False}, reasons={"b": ["kid 9 > 4"]})
    >>> s.failed_types
    ['b']
    >>> print(s.table("v1"))
    quality gates failed for v1: 1 of 2 types
      b  FAIL  kid 9 > 4
      a  pass
    """

    model_config = ConfigDict(frozen=True)

    passed: bool
    publishable: bool
    reports: Path
    types: dict[str, bool]
    reasons: dict[str, list[str]] = {}
    version_reasons: list[str] = []
    gates_on: list[str] = []
    gates_off: list[str] = []

    @classmethod
    def of(cls, result: GateResult, reports: Path) -> GateSummary:
        return cls(
            passed=result.passed,
            publishable=result.publishable,
            reports=Path(reports),
            types={name: t.passed for name, t in result.types.items()},
            reasons={name: list(t.reasons) for name, t in result.types.items()},
            version_reasons=list(result.version_reasons),
            gates_on=[g["gate"] for g in result.gates if g["on"]],
            gates_off=[g["gate"] for g in result.gates if not g["on"]],
        )

    @classmethod
    def read(cls, reports: Path) -> GateSummary:
        """The decision a gates run wrote into ``reports`` (its ``gates.json``)."""
        saved = json.loads((Path(reports) / GATES_FILE).read_text())
        types = saved["types"]
        return cls(
            passed=saved["passed"],
            publishable=saved["publishable"],
            reports=Path(reports),
            types={name: t["passed"] for name, t in types.items()},
            reasons={name: list(t["reasons"]) for name, t in types.items()},
            version_reasons=saved.get("version_reasons", []),
            gates_on=[g["gate"] for g in saved.get("gates", []) if g["on"]],
            gates_off=[g["gate"] for g in saved.get("gates", []) if not g["on"]],
        )

    @property
    def failed_types(self) -> list[str]:
        return sorted(t for t, ok in self.types.items() if not ok)

    def table(self, version: str) -> str:
        """The outcome as text: one line per type, failures first, with their reasons."""
        failed = self.failed_types
        lines = [f"quality gates failed for {version}: {len(failed)} of {len(self.types)} types"]
        width = max((len(t) for t in self.types), default=0)
        for t in failed + sorted(t for t, ok in self.types.items() if ok):
            why = "; ".join(self.reasons.get(t, []))
            verdict = "pass" if self.types[t] else "FAIL"
            lines.append(f"  {t:<{width}}  {verdict}  {why}".rstrip())
        lines += [f"  version: {r}" for r in self.version_reasons]
        return "\n".join(lines)
