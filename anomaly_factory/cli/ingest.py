"""``anomaly-factory ingest``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config


def ingest(
    dataset: Annotated[str, typer.Option(help="mvtec_ad | visa | mvtec_3d_ad | demo")],
    manifest_out: Annotated[Path, typer.Option("--manifest-out", help="Parquet file to write")],
    source: Annotated[
        str | None, typer.Option(help="Folder, .tar/.tar.gz/.tar.xz archive or http(s) URL")
    ] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the archive")] = None,
    categories: Annotated[str | None, typer.Option(help="Comma-separated categories")] = None,
    on_bad_input: Annotated[str, typer.Option(help="fail | quarantine")] = "fail",
    root: Annotated[Path | None, typer.Option(help="Download/extract folder")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Turn a benchmark dataset into one validated image manifest."""
    from anomaly_factory.datasets.ingest import DATASETS
    from anomaly_factory.datasets.ingest import ingest as run_ingest

    if dataset not in DATASETS:
        raise fail(f"--dataset: {dataset!r} is not one of {list(DATASETS)}")
    if on_bad_input not in ("fail", "quarantine"):
        raise fail(f"--on-bad-input: {on_bad_input!r} is not one of ['fail', 'quarantine']")
    cfg = get_config(config, profile)
    cats = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    result = run_ingest(
        dataset,
        source,
        manifest_out,
        root or cfg.datasets.root,
        sha256,
        cats,
        on_bad_input,
        cfg.split.fewshot_fraction,
        cfg.demo,
        alpha=cfg.datasets.alpha,
    )
    df = result.manifest
    counts = df.groupby(["category", "split"]).size().unstack(fill_value=0)
    console.print(counts.to_string())
    console.print(f"wrote {manifest_out} ({len(df)} images)")
    if result.quarantine_path:
        console.print(
            f"quarantined {len(result.problems)} problem(s): {result.quarantine_path}",
            style="yellow",
        )


def register(app: typer.Typer) -> None:
    app.command("ingest", epilog=EPILOG)(ingest)
