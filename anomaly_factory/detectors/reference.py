"""The unsupervised reference detector: PaDiM or PatchCore through anomalib's Engine.

It sees no synthetic anomalies at all: it fits on the exported real ``train`` normals
and scores the exported real ``test`` split, the "no synthetic anomalies" row of the
comparison. anomalib's post-processing and evaluator are off (their thresholds and
normalisation would be fitted on a validation split, which for MVTec-AD is the test
split by default); raw maps go through the same metrics as every other detector.
Lightning runs barebones: no loggers, no checkpoints, nothing written but its root.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from anomaly_factory.config import DetectorSection
from anomaly_factory.detectors.data import Sample
from anomaly_factory.detectors.export import Export
from anomaly_factory.detectors.localization import image_scores
from anomaly_factory.errors import InputError


def build_model(settings: DetectorSection) -> Any:
    """A PaDiM or PatchCore model at the detector's resolution, with no post-processing."""
    from anomalib.models import Padim, Patchcore

    size = (settings.resolution, settings.resolution)
    common = {
        "backbone": settings.reference_backbone,
        "pre_trained": settings.reference_pre_trained,
        "post_processor": False,
        "evaluator": False,
        "visualizer": False,
    }
    if settings.reference_model == "padim":
        return Padim(pre_processor=Padim.configure_pre_processor(size), **common)
    if settings.reference_model == "patchcore":
        return Patchcore(pre_processor=Patchcore.configure_pre_processor(size), **common)
    raise InputError(f"detector.reference_model: {settings.reference_model!r} has no model")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info chatter (GPU/TPU availability, tips) is noise in a pipeline log."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_reference(
    export: Export, test: list[Sample], settings: DetectorSection, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Fit on the export's train normals; anomaly maps and scores of ``test``, in its order.

    ``test`` must be the samples the export's ``test/`` folder was made from.
    """
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True, verbose=False)
    datamodule = MVTecAD(
        root=export.mvtec_root,
        category=export.category,
        train_batch_size=settings.batch_size,
        eval_batch_size=settings.batch_size,
        num_workers=0,
        val_split_mode="none",
        seed=seed,
    )
    datamodule.setup()
    model = build_model(settings)
    with _quiet_lightning(), tempfile.TemporaryDirectory(prefix="reference-") as root:
        engine = Engine(
            default_root_dir=root,
            logger=False,
            barebones=True,
            accelerator="cpu" if not torch.cuda.is_available() else "auto",
            devices=1,
            max_epochs=1,
            num_sanity_val_steps=0,
        )
        engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
        batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    sources = _export_sources(export)
    maps_by_source: dict[str, torch.Tensor] = {}
    for batch in batches or []:
        for path, amap in zip(batch.image_path, batch.anomaly_map, strict=True):
            maps_by_source[sources[_key(path)]] = amap.reshape(amap.shape[-2:]).float()
    missing = [s.image_path for s in test if s.image_path not in maps_by_source]
    if missing:
        raise RuntimeError(f"reference detector: no prediction for {len(missing)} test images")
    maps = torch.stack([maps_by_source[s.image_path] for s in test])
    size = settings.resolution
    if maps.shape[-1] != size:
        maps = torch.nn.functional.interpolate(maps[:, None], (size, size), mode="bilinear")[:, 0]
    schedule = {
        "selection": "fixed_schedule",
        "epochs": 1,
        "pre_trained": settings.reference_pre_trained,
        "backbone": settings.reference_backbone,
    }
    return maps, image_scores(maps, settings.score_pool), schedule


def _key(path: str | Path) -> str:
    """anomalib reports absolute paths; the export may hold relative ones (``dvc repro``)."""
    return str(Path(path).resolve())


def _export_sources(export: Export) -> dict[str, str]:
    table = pd.read_parquet(export.root / f"export-{export.category}.parquet")
    return {
        _key(path): str(source)
        for path, source in zip(table["path"], table["source_path"], strict=True)
    }
