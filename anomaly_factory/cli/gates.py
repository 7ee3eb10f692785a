"""``anomaly-factory gates``: metrics, expectations, gate decisions and the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config


def gates(
    pairs: Annotated[Path, typer.Option("--pairs", help="Pairs manifest (pairs.parquet)")],
    manifest: Annotated[Path, typer.Option("--manifest", help="Image manifest from ingestion")],
    out: Annotated[Path, typer.Option("--out", help="Reports folder of this version")],
    expected_per_type: Annotated[
        int | None,
        typer.Option("--expected-per-type", help="Exact pairs per type (default generate.n_pairs)"),
    ] = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write OUT/metrics.json, OUT/gates.json, OUT/report.html.

    Exit 0 when every gate passes, 1 when any gate fails, 2 on unusable input.
    """
    from anomaly_factory.gates.run import run_gates

    cfg = get_config(config, profile)
    for flag, path in (("--pairs", pairs), ("--manifest", manifest)):
        if not path.is_file():
            raise fail(f"{flag}: {path} does not exist", code=2)
    if expected_per_type is not None and expected_per_type < 1:
        raise fail(f"--expected-per-type: {expected_per_type} is not >= 1", code=2)
    result = run_gates(cfg, pairs, manifest, out, expected_per_type)  # FactoryErrors: exit 2/3
    for tid, gate in result.types.items():
        mark = ("pass", "green") if gate.passed else ("FAIL", "red")
        console.print(Text.assemble(mark, f" {tid}"), highlight=False)
        for reason in gate.reasons:
            console.print(f"    {reason}", highlight=False, soft_wrap=True)
    for reason in result.version_reasons:
        console.print(Text.assemble(("version:", "red"), f" {reason}"), soft_wrap=True)
    verdict = ("publishable", "green") if result.publishable else ("NOT publishable", "red")
    console.print(Text.assemble(verdict, f": wrote {out}/metrics.json, gates.json, report.html"))
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command("gates", epilog=EPILOG)(gates)
