"""The ``anomaly-factory`` command line.

Each module in this package adds its commands through ``register(app)``; they are
discovered automatically, so a stage's CLI lives next to nothing but itself.
Heavy imports (torch, diffusers, prefect) stay inside the command functions so
that ``anomaly-factory config validate`` answers in a second.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

app = typer.Typer(
    name="anomaly-factory",
    help="Synthetic anomaly datasets for industrial visual inspection.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
