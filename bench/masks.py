"""Mask generator shapes and fit time: does a type's generator draw its few-shot strokes?

For each (category, type), fits the mask DDPM under the profile's ``masks.generator``
and under a baseline setting (by default the whole-image 64-px generator of the
previous default), samples ``--n`` masks through the same rejection rules as the
factory, and prints per type: skeleton length (px at the mask size), pieces (8-connected
components), median elongation (:func:`masks.elongation`)
and area of the masks against the few-shot ones, the fallbacks, and the fit seconds with
their ratio to the baseline's, fitted in the same process on one thread.

    .venv/bin/python bench/masks.py --types nut_demo:scratch,tile_demo:crack
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import report  # noqa: E402
from quality import ingest_source  # noqa: E402

from anomaly_factory.config import load_config  # noqa: E402
from anomaly_factory.generators.common import derive_seed  # noqa: E402
from anomaly_factory.generators.magic import masks as M  # noqa: E402

BASELINE = {"window": "image", "resolution": 64, "steps": 400, "augment_shift": 0.25}


def shape_stats(masks: list[np.ndarray]) -> dict[str, float]:
    from skimage.morphology import skeletonize

    return {
        "skeleton_px": float(np.mean([skeletonize(m).sum() for m in masks])),
        "pieces": float(np.mean([M.piece_count(m) for m in masks])),
        "elongation": float(np.median([M.elongation(m) for m in masks])),
        "area_x1e3": float(np.mean([m.mean() for m in masks]) * 1e3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--types", default="bar_demo:crack,carpet_demo:cut,nut_demo:scratch,tile_demo:crack"
    )
    ap.add_argument("--n", type=int, default=16, help="masks sampled per type and setting")
    ap.add_argument("--work", type=Path, default=Path("bench/results/masks"))
    ap.add_argument("--profile", default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(None, args.profile)
    work = args.work.resolve()
    demo = argparse.Namespace(dataset="demo", source=None, categories=None)
    manifest = ingest_source(cfg, demo, work)
    size = cfg.model.resolution
    settings = {
        "baseline": cfg.masks.model_copy(
            update={
                "generator": cfg.masks.generator.model_copy(update=BASELINE),
                "max_pieces_vs_fewshot": False,
                "min_elongation_vs_fewshot": 0.0,
            }
        ),
        "profile": cfg.masks,
    }
    rows: list[dict[str, Any]] = []
    for spec in args.types.split(","):
        category, anomaly_type = spec.split(":")
        fewshot, paths = M.fewshot_masks(manifest, category, anomaly_type, size)
        rows.append({"type": spec, "setting": "few-shot", **shape_stats(list(fewshot))})
        base_s = None
        for name, section in settings.items():
            fit_size = M.fit_size(section.generator)
            train, _ = M.fewshot_masks(manifest, category, anomaly_type, fit_size)
            start = time.perf_counter()
            gen = M.MaskGenerator.fit(
                train, section.generator, derive_seed(section.seed, category, anomaly_type)
            )
            fit_s = time.perf_counter() - start
            base_s = base_s or fit_s
            src = M.GeneratorMaskSource(
                gen,
                section,
                derive_seed(section.seed, category, anomaly_type),
                bounds=M.fewshot_bounds(section, paths),
            )
            masks = src.masks(args.n, size)
            rows.append(
                {
                    "type": spec,
                    "setting": name,
                    **shape_stats(masks),
                    "fit_s": round(fit_s, 1),
                    "fit_vs_baseline": round(fit_s / base_s, 2),
                    "rejected": sum(src.rejected.values()),
                    "fallbacks": len(src.fallback_used),
                }
            )
    report("mask_generator", rows, work / "masks.json", baseline=BASELINE)


if __name__ == "__main__":
    main()
