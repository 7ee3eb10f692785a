"""What produced an artifact: package version, git commit and a hash of the code.

Cached orchestration results are keyed on ``code_hash()`` so that changing any
module of the package invalidates them, not only the thin task wrappers.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import anomaly_factory

PACKAGE_DIR = Path(anomaly_factory.__file__).resolve().parent


@functools.cache
def code_hash() -> str:
    """sha256 over every .py file of the package (path + bytes), truncated."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout the package runs from, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> dict[str, str | None]:
    return {
        "package": anomaly_factory.__version__,
        "git_commit": git_commit(),
        "code_hash": code_hash(),
    }
