"""Run progress shared between the flow (any process) and the CLI's progress display.

Each (stage, unit) writes its own small JSON file in the run's progress folder,
atomically, so that GPU stages running in worker processes show up in
``anomaly-factory run``'s rich progress bars without two writers ever touching one
file: on the same file system directly, and from other machines through a store data
root (each GPU job pushes its type's file; the display pulls the folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from anomaly_factory.io import atomic_write_json

STAGES = ("ingest", "generate", "gates", "detect", "report", "shards", "publish")
STAGE_UNIT = "*"  # the unit of a record that counts a whole stage (datasets, types, steps)


def record_path(folder: str | Path, stage: str, unit: str) -> Path:
    """The file of ``unit`` of ``stage`` (a GPU job on another machine pushes its own)."""
    name = f"{stage}__{unit}".replace("/", "_").replace("*", "all")
    return Path(folder) / f"{name}.json"


def report(folder: str | Path | None, stage: str, unit: str, done: int, total: int) -> None:
    """Record that ``unit`` of ``stage`` has ``done`` of ``total`` items finished."""
    if folder is None:
        return
    atomic_write_json(
        record_path(folder, stage, unit),
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
