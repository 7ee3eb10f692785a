"""``anomaly-factory config validate | show | schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from anomaly_factory.cli._common import EPILOG, ProfileOpt, console, fail
from anomaly_factory.config import (
    ConfigError,
    FactoryConfig,
    load_config,
    validate_all_profiles,
)

config_app = typer.Typer(help="Validate, show and describe pipelines.yaml.", no_args_is_help=True)

FileArg = Annotated[Path | None, typer.Argument(help="pipelines.yaml (default: ./pipelines.yaml)")]


@config_app.command("validate", epilog=EPILOG)
def validate(file: FileArg = None, profile: ProfileOpt = None) -> None:
    """Validate one profile (or all of them): types (no boolean or string for a number),
    duplicate keys, the profile name, and settings that leave no metric; exit 2 on any error."""
    try:
        if profile:
            load_config(file, profile)
            names = [profile]
        else:
            names = validate_all_profiles(file)
    except ConfigError as exc:
        raise fail(exc) from None
    console.print(f"ok: profiles {', '.join(names)} are valid")


@config_app.command("show", epilog=EPILOG)
def show(file: FileArg = None, profile: ProfileOpt = None) -> None:
    """Print the resolved values of one profile as YAML."""
    try:
        cfg = load_config(file, profile)
    except ConfigError as exc:
        raise fail(exc) from None
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@config_app.command("schema", epilog=EPILOG)
def schema() -> None:
    """Print the JSON Schema of a resolved profile."""
    typer.echo(json.dumps(FactoryConfig.model_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
