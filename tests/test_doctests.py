"""The docstring examples of the package's modules run, and say what they show.

Each module with an example is imported and its doctests run (``doctest.testmod``;
examples that need a server or a published version are marked ``+SKIP``), so a
docstring that drifts from the code fails here.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("anomaly_factory", "tasks", "flows")  # the package and its orchestration layer


def modules_with_examples() -> list[str]:
    names = []
    for path in sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(p for p in parts if p != "__init__"))
    return names


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
