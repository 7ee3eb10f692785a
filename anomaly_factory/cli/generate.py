"""``anomaly-factory generate``: N pairs of one (category, anomaly type)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config


def generate(
    manifest: Annotated[Path, typer.Option(help="Image manifest (parquet) from ingest")],
    category: Annotated[str, typer.Option(help="Category to generate for")],
    anomaly_type: Annotated[str, typer.Option("--anomaly-type", help="Anomaly type")],
    out: Annotated[Path, typer.Option(help="Folder for pairs.parquet and the pair images")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Fine-tuned checkpoint folder; default: base model")
    ] = None,
    n_pairs: Annotated[
        int | None, typer.Option("--n-pairs", help="Pairs to generate; default generate.n_pairs")
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(
            help="magic | anomalycontrol | perlin | cutpaste | oracle (demo only); default: config"
        ),
    ] = None,
    reference_text: Annotated[
        str | None,
        typer.Option(
            help="Text of the text-image reference prompt, given to BLIP-2 with the reference "
            "image; also the target prompt when --prompt is not given (AnomalyControl only)"
        ),
    ] = None,
    reference_category: Annotated[
        str | None, typer.Option(help="Reference category (AnomalyControl only)")
    ] = None,
    reference_type: Annotated[
        str | None, typer.Option(help="Reference anomaly type (AnomalyControl only)")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Targeted text prompt: what the diffusion model is asked to make; default: "
            "--reference-text, else the target type's template (AnomalyControl only)"
        ),
    ] = None,
    reference_image: Annotated[
        Path | None,
        typer.Option(help="Any reference anomaly image; needs --reference-mask (AnomalyControl)"),
    ] = None,
    reference_mask: Annotated[
        Path | None,
        typer.Option(help="Its defect mask, white (> 127) = defect (AnomalyControl only)"),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            "--masks",
            help="Folder of target masks (white = defect) instead of the few-shot masks "
            "(AnomalyControl only)",
        ),
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Generate anomaly/mask/normal pairs; resumes where an interrupted run stopped."""
    from rich.markup import escape
    from rich.progress import Progress

    from anomaly_factory.generators.base import GenerationRequest
    from anomaly_factory.generators.registry import get_generator, prepare_generator, run_generator

    cfg = get_config(config, profile)
    name = generator or cfg.generator
    n = n_pairs if n_pairs is not None else cfg.generate.n_pairs
    if n < 1:
        raise fail(f"--n-pairs: {n} is not >= 1")
    if checkpoint is not None and not checkpoint.is_dir():
        raise fail(f"--checkpoint: {checkpoint} is not a folder")
    try:
        get_generator(name)
    except ImportError as exc:
        raise fail(f"--generator: {exc}") from None
    options = {
        "reference_text": reference_text,
        "reference_category": reference_category,
        "reference_type": reference_type,
        "prompt": prompt,
        "reference_image": reference_image,
        "reference_mask": reference_mask,
        "masks": masks,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if options and name != "anomalycontrol":
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise fail(f"{flags}: AnomalyControl's options; generator {name!r} has no use for them")
    request = GenerationRequest(
        cfg, manifest, category, anomaly_type, n, out, checkpoint, options=options
    )
    progress = Progress(console=console, transient=True)
    task = progress.add_task(escape(f"{name} {category}/{anomaly_type}"), total=n)
    with progress:  # prepare: the training the generator needs (cached), e.g. MAGIC's masks
        request = request.with_checkpoint(prepare_generator(name, request))
        path = run_generator(
            name, request, on_pair=lambda done, total: progress.update(task, completed=done)
        )
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("generate", epilog=EPILOG)(generate)
