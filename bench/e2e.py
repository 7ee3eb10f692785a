"""(f) The tiny end-to-end run: wall time and peak memory of ``anomaly-factory run``.

Runs the main job exactly as a user does (fresh working folder, default profile,
ephemeral Prefect) in a subprocess and samples the RSS of its whole process tree.

    .venv/bin/python bench/e2e.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from _table import report  # noqa: E402

TARGET_S, TARGET_GB = 600, 4.0


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="af-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = Path(sys.executable).with_name("anomaly-factory")
    start = time.perf_counter()
    proc = subprocess.Popen([str(cli), "run", "--no-progress"], cwd=work)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    rows = [
        {
            "run": "anomaly-factory run (tiny, demo, ephemeral Prefect)",
            "exit_code": proc.returncode,
            "wall_s": round(wall, 1),
            "peak_rss_tree_gb": round(peak / 2**30, 3),
            "target_s": TARGET_S,
            "target_gb": TARGET_GB,
            "within_target": proc.returncode == 0
            and wall <= TARGET_S
            and peak / 2**30 <= TARGET_GB,
        }
    ]
    report("e2e", rows)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
