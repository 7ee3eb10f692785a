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
from typing import Annotated

import typer
from typer.core import TyperGroup

from anomaly_factory.cli._common import EPILOG, exit_code_for, fail


class FactoryGroup(TyperGroup):
    """Ends every command the same way: an exception the package knows becomes a
    one-line ``error:`` naming the culprit and its exit code (``exit_code_for``), with
    the traceback only under ``--verbose``; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:  # click's own (Exit, usage errors) map to None: re-raised
            if exit_code_for(exc) is None:
                raise
            raise fail(exc, verbose=bool(ctx.params.get("verbose"))) from None


app = typer.Typer(
    name="anomaly-factory",
    help="Synthetic anomaly datasets for industrial visual inspection.",
    epilog=EPILOG,
    cls=FactoryGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks with errors")
    ] = False,
) -> None:
    """Synthetic anomaly datasets for industrial visual inspection."""


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
