"""``anomaly-factory align``: context-aware mask alignment on sampled normals (MAGIC §3.4).

For ``--n`` seeded random ``train`` normal images it takes seeded random
``fewshot`` (image, mask) references of one anomaly type, aligns each mask onto
its normal image (or leaves it in place with ``--no-cama``, for comparison) and
writes the aligned masks plus ``alignments.parquet``. It goes through the same
:class:`~anomaly_factory.generators.magic.cama.CamaAligner` call as ``generate``,
with the reference's own mask as both the keypoint source and the mask placed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config


def _load_rgb(path: str):
    from anomaly_factory.images import ImageReadError, read_rgb

    try:
        return read_rgb(path)
    except ImageReadError as exc:
        raise fail(exc) from None


def _load_mask(path: str):
    """A ground-truth mask: any non-zero value is defect (VisA labels, 3D-AD values)."""
    from anomaly_factory.images import ImageReadError, read_mask

    try:
        return read_mask(path, source="dataset")
    except ImageReadError as exc:
        raise fail(exc) from None


def demo_foreground(row, seed: int):
    """The exact foreground of a demo image, or None when the row is not a demo image
    rendered with ``seed`` (checked by re-rendering it)."""
    import numpy as np

    from anomaly_factory.datasets import demo

    if row["dataset"] != "demo" or row["category"] not in demo.NORMALS:
        return None
    path = Path(row["image_path"])
    try:
        index = int(path.stem) + (1000 if path.parent.parent.name == "test" else 0)
    except ValueError:
        return None
    size = int(row["width"])
    try:
        rendered, _ = demo.render_category(row["category"], row["anomaly_type"], size, seed, index)
    except (ValueError, RuntimeError):
        return None
    if not np.array_equal(rendered, _load_rgb(str(path))):
        return None
    return demo.foreground(row["category"], size, seed, index, row["anomaly_type"])


def align(
    manifest: Annotated[Path, typer.Option(help="Image manifest (parquet) from ingest")],
    category: Annotated[str, typer.Option(help="Category to align in")],
    anomaly_type: Annotated[str, typer.Option("--anomaly-type", help="Type of the references")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of normal images to sample")],
    out: Annotated[Path, typer.Option(help="Output folder")],
    no_cama: Annotated[
        bool, typer.Option("--no-cama", help="Leave each mask where it was (baseline)")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: cama.seed)")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Align few-shot anomaly masks onto random normal images and report where they land."""
    import numpy as np
    import pandas as pd

    from anomaly_factory.generators.magic.cama import (
        CamaAligner,
        alignment_metrics,
        expected_placements,
        resize_mask,
    )
    from anomaly_factory.io import save_png
    from anomaly_factory.manifest import GOOD, ManifestError, read_images, select, write_parquet

    cfg = get_config(config, profile)
    try:
        df = read_images(manifest)
    except ManifestError as exc:
        raise fail(exc) from None
    normals = select(df, category, GOOD, "train")
    refs = select(df, category, anomaly_type, "fewshot")
    if normals.empty:
        raise fail(f"{manifest}: no train normal images for category {category!r}")
    if refs.empty:
        raise fail(f"{manifest}: no fewshot images of {category!r}/{anomaly_type!r}")

    rng = np.random.default_rng(cfg.cama.seed if seed is None else seed)
    picks = rng.choice(len(normals), size=n, replace=n > len(normals))
    ref_picks = rng.integers(len(refs), size=n)
    pair_seeds = rng.integers(2**31 - 1, size=n)
    aligner = CamaAligner(cfg, category, anomaly_type)
    rows = []
    for i, (ni, ri, pair_seed) in enumerate(zip(picks, ref_picks, pair_seeds, strict=True)):
        normal_row, ref_row = normals.iloc[int(ni)], refs.iloc[int(ri)]
        normal = _load_rgb(normal_row["image_path"])
        reference = _load_rgb(ref_row["image_path"])
        mask = _load_mask(ref_row["mask_path"])
        if mask.shape != reference.shape[:2]:
            raise fail(
                f"{ref_row['mask_path']}: mask size {mask.shape} differs from its image "
                f"{reference.shape[:2]}"
            )
        if no_cama:
            aligned = resize_mask(mask, normal.shape[:2])
            record = {"cama_status": "no_cama"}
        else:
            aligned, record = aligner(mask, reference, normal, int(pair_seed), reference_mask=mask)
        fg = aligner.foreground(normal).mask
        mask_path = out / "masks" / f"{i:05d}.png"
        save_png(mask_path, aligned.astype(np.uint8) * 255)
        row = {
            "normal_path": normal_row["image_path"],
            "reference_path": ref_row["image_path"],
            "reference_mask_path": ref_row["mask_path"],
            "mask_path": str(mask_path),
            "seed": int(pair_seed),
            "status": record["cama_status"],
            **alignment_metrics(aligned, fg),
        }
        exact_normal = demo_foreground(normal_row, cfg.demo.seed)
        exact_ref = demo_foreground(ref_row, cfg.demo.seed)
        if exact_normal is not None and exact_ref is not None:
            ref_mask = resize_mask(mask, exact_ref.shape)
            expected = expected_placements(exact_ref, exact_normal, ref_mask)
            exact = alignment_metrics(aligned, exact_normal, expected)
            row["foreground_ratio_exact"] = exact["foreground_ratio"]
            row["iou_expected"] = exact["iou_expected"]
        rows.append({**row, **{k: v for k, v in record.items() if k != "cama_status"}})
    table = pd.DataFrame(rows)
    write_parquet(table, out / "alignments.parquet")
    summary = table.groupby("status").size().to_dict()
    console.print(f"status: {summary}")
    console.print(f"mean foreground_ratio: {table['foreground_ratio'].mean():.3f}")
    if "iou_expected" in table:
        console.print(f"mean iou_expected: {table['iou_expected'].mean():.3f}")
    console.print(f"wrote {out / 'alignments.parquet'} ({len(table)} masks)")


def register(app: typer.Typer) -> None:
    app.command("align", epilog=EPILOG)(align)
