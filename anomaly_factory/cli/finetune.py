"""``anomaly-factory finetune``: MAGIC's per-type DreamBooth-inpainting fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config


def finetune(
    manifest: Annotated[Path, typer.Option(help="Image manifest (parquet) from ingestion")],
    category: Annotated[str, typer.Option(help="Category to fine-tune on")],
    anomaly_type: Annotated[str, typer.Option("--anomaly-type", help="Anomaly type")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder (resumed if it exists)")],
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop at this step (resumable)")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Fine-tune the UNet on one anomaly type's few-shot images (MAGIC §3.1-3.2)."""
    import logging

    from rich.logging import RichHandler

    from anomaly_factory.generators.magic.checkpoints import read_meta
    from anomaly_factory.generators.magic.finetune import finetune as run_finetune

    cfg = get_config(config, profile)
    if not manifest.is_file():
        raise fail(f"--manifest: {manifest} does not exist")
    if max_steps is not None and max_steps < 1:
        raise fail(f"--max-steps: {max_steps} is not >= 1")
    logging.basicConfig(level=logging.INFO, handlers=[RichHandler(console=console)], force=True)
    out_dir = run_finetune(
        cfg, manifest, category, anomaly_type, out, max_steps=max_steps, show_progress=True
    )
    meta = read_meta(out_dir) or {}
    console.print(
        f"wrote {out_dir} ({meta.get('save')}, {meta.get('steps')}/{meta.get('target_steps')} "
        f"steps, last loss {meta.get('last_loss', float('nan')):.4f})"
    )


def register(app: typer.Typer) -> None:
    app.command("finetune", epilog=EPILOG)(finetune)
