"""Run progress shared between the flow (any process) and the CLI's progress display.

Each (stage, unit) writes its own small JSON file in the run's progress folder,
atomically, so that GPU stages running in worker processes on the same file
system show up in ``anomaly-factory run``'s rich progress bars without two
writers ever touching one file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from anomaly_factory.io import atomic_write_json

STAGES = ("ingest", "generate", "gates", "detect", "report", "shards", "publish")
STAGE_UNIT = "*"  # the unit of a record that counts a whole stage (datasets, types, steps)


def report(folder: str | Path | None, stage: str, unit: str, done: int, total: int) -> None:
    """Record that ``unit`` of ``stage`` has ``done`` of ``total`` items finished."""
    if folder is None:
        return
    name = f"{stage}__{unit}".replace("/", "_").replace("*", "all")
    atomic_write_json(
        Path(folder) / f"{name}.json",
        {"stage": stage, "unit": unit, "done": done, "total": total, "time": time.time()},
    )


def clear(folder: str | Path) -> None:
    """Forget an earlier run's records (a new run of the version starts from nothing)."""
    for path in Path(folder).glob("*.json"):
        path.unlink(missing_ok=True)


def read(folder: str | Path) -> list[dict[str, Any]]:
    """All progress records of a run, oldest first."""
    records = []
    for path in Path(folder).glob("*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: r["time"])
