"""Printing a benchmark table and saving its JSON: the one format of every bench script."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(name: str, rows: list[dict[str, Any]], out: Path | None = None, **extra: Any) -> Path:
    """Print ``rows`` as an aligned table and write them (with machine facts) as JSON."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(fmt[c]) for c in cols))
    print("-+-".join("-" * fmt[c] for c in cols))
    for r in rows:
        print(" | ".join(_cell(r.get(c)).ljust(fmt[c]) for c in cols))
    out = out or Path("bench/results") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"bench": name, "machine": machine(), "rows": rows, **extra}, indent=2, default=str
        )
    )
    print(f"\nwrote {out}")
    return out


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
