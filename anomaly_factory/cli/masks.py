"""``anomaly-factory masks``: train a type's mask generator (or read a folder) and sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config

MASKS_FILE = "masks.parquet"


def masks(
    manifest: Annotated[Path, typer.Option(help="Image manifest (parquet) from ingest")],
    category: Annotated[str, typer.Option(help="Category")],
    anomaly_type: Annotated[str, typer.Option("--anomaly-type", help="Anomaly type")],
    out: Annotated[Path, typer.Option(help="Folder for the mask PNGs, masks.parquet, generator")],
    n: Annotated[
        int | None, typer.Option("--n", help="Masks to sample; default masks.n_masks")
    ] = None,
    folder: Annotated[
        Path | None, typer.Option(help="Take masks from this folder instead of a generator")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Mask side in px; default model.resolution")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Sample masks of one anomaly type; writes OUT/masks/NNNNNN.png and OUT/masks.parquet."""
    import pandas as pd

    from anomaly_factory.generators.magic.masks import fewshot_masks, mask_source, nearest_iou
    from anomaly_factory.io import save_png
    from anomaly_factory.manifest import write_parquet

    cfg = get_config(config, profile)
    n = n if n is not None else cfg.masks.n_masks
    size = size or cfg.model.resolution
    if n < 1:
        raise fail(f"--n: {n} is not >= 1")
    src = mask_source(cfg.masks, manifest, category, anomaly_type, out / "mask_generator", folder)
    sampled = src.masks(n, size)
    train, _ = fewshot_masks(manifest, category, anomaly_type, size)
    iou = nearest_iou(sampled, train)
    rows = []
    for i, (m, v) in enumerate(zip(sampled, iou, strict=True)):
        path = save_png(out / "masks" / f"{i:06d}.png", m.astype("uint8") * 255)
        rows.append(
            {
                "index": i,
                "mask_path": str(path),
                "category": category,
                "anomaly_type": anomaly_type,
                "mask_source": src.name,
                "area": float(m.mean()),
                "nearest_train_iou": float(v),
            }
        )
    write_parquet(pd.DataFrame(rows), out / MASKS_FILE)
    console.print(
        f"wrote {n} masks to {out} (source {src.name}, rejected {src.rejected}, "
        f"max IoU with a training mask {iou.max():.3f})"
    )


def register(app: typer.Typer) -> None:
    app.command("masks", epilog=EPILOG)(masks)
