"""Options, printing and error handling shared by every command.

User text (paths, category names, messages) is never parsed as Rich markup: both
consoles print with markup off, and styled words are built as ``rich.text.Text``.
Errors are printed in one place (:func:`print_error`) and mapped to exit codes in
one place (:func:`exit_code_for`); the codes are defined in ``anomaly_factory.errors``.
"""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from anomaly_factory.config import ConfigError, FactoryConfig, load_config
from anomaly_factory.errors import (
    BAD_INPUT,
    EXIT_CODES_HELP,
    INFRASTRUCTURE,
    FactoryError,
)

err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)
console = Console(markup=False, emoji=False)
VERBOSE_ENV = "ANOMALY_FACTORY_VERBOSE"
EPILOG = EXIT_CODES_HELP

# errno values that say the machine, not the user's input, is at fault
INFRASTRUCTURE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENOMEM}

ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="Profile of pipelines.yaml (default: tiny)")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="pipelines.yaml to use (default: ./pipelines.yaml or packaged)"
    ),
]


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an exception, or None for one that is a bug (it keeps its traceback).

    The package's own exceptions carry their code; OS errors are 3 when the disk or
    memory is exhausted and 2 otherwise (a read-only, missing or wrong kind of path).
    """
    from PIL import Image

    if isinstance(exc, FactoryError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return INFRASTRUCTURE if exc.errno in INFRASTRUCTURE_ERRNOS else BAD_INPUT
    if isinstance(exc, Image.DecompressionBombError):
        return BAD_INPUT
    return None


def describe(exc: BaseException) -> str:
    """One line naming the culprit: an OS error leads with its file."""
    if isinstance(exc, OSError) and not isinstance(exc, FactoryError) and exc.strerror:
        where = exc.filename if exc.filename is not None else "disk"
        return f"{where}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _verbose() -> bool:
    """``anomaly-factory --verbose ...`` (or ANOMALY_FACTORY_VERBOSE=1): show tracebacks."""
    try:
        from typer._click.globals import get_current_context  # typer vendors click since 0.26
    except ImportError:
        from click import get_current_context

    ctx = get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("verbose"):
        return True
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def print_error(message: str) -> None:
    """The one place errors are printed: ``error: <message>`` on stderr, never as markup."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


def fail(
    problem: str | BaseException, code: int | None = None, verbose: bool | None = None
) -> typer.Exit:
    """Print an error and return the Exit to raise.

    ``problem`` is a message or the exception that caused it; the code is ``code``, else
    the exception's (``exit_code_for``), else 2 (usage / bad input). An exception's
    traceback is printed too under ``--verbose``.
    """
    if isinstance(problem, BaseException):
        if verbose or (verbose is None and _verbose()):
            err_console.print("".join(traceback.format_exception(problem)), end="")
        if code is None:
            code = exit_code_for(problem)
        problem = describe(problem)
    print_error(problem)
    return typer.Exit(BAD_INPUT if code is None else code)


def get_config(config: Path | None, profile: str | None) -> FactoryConfig:
    try:
        return load_config(config, profile)
    except ConfigError as exc:
        raise fail(exc) from None
