"""Options and error handling shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from anomaly_factory.config import ConfigError, FactoryConfig, load_config

err_console = Console(stderr=True)
console = Console()

ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="Profile of pipelines.yaml (default: tiny)")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="pipelines.yaml to use (default: ./pipelines.yaml or packaged)"
    ),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def get_config(config: Path | None, profile: str | None) -> FactoryConfig:
    try:
        return load_config(config, profile)
    except ConfigError as exc:
        raise fail(str(exc)) from None
