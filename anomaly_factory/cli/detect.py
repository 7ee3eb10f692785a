"""``anomaly-factory detect``: downstream detectors on the real test split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config


def detect(
    pairs: Annotated[Path, typer.Option("--pairs", help="Pairs manifest (pairs.parquet)")],
    manifest: Annotated[Path, typer.Option("--manifest", help="Image manifest from ingestion")],
    out: Annotated[Path, typer.Option("--out", help="Folder for detector_metrics.json")],
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Train detectors on the pairs (and baselines); score them on the real test split."""
    import json

    from anomaly_factory.detectors.run import run_detectors

    cfg = get_config(config, profile)
    for flag, path in (("--pairs", pairs), ("--manifest", manifest)):
        if not path.is_file():
            raise fail(f"{flag}: {path} does not exist")
    metrics_path = run_detectors(cfg, pairs, manifest, out)
    report = json.loads(metrics_path.read_text())
    for name, values in report["summary"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
        console.print(f"{name}: {shown}", highlight=False)
    console.print(f"wrote {metrics_path}")


def register(app: typer.Typer) -> None:
    app.command("detect", epilog=EPILOG)(detect)
