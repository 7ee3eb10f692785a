"""Judge generators by what they make: pair checks, KID / IC-LPIPS and downstream detectors.

For one dataset (the demo by default, or any folder in a supported layout given with
``--source``) and each generator, per category and anomaly type:

* the share of pairs that pass every pair check of the gates (``gates.pair_checks``),
* KID x1e3 against the type's real anomaly images and IC-LPIPS, with one extractor
  (``gates.kid`` / ``gates.lpips`` of the profile) for every generator: whole-image KID
  (the papers' number) and the gates' defect-region KID (crops around each mask against
  the same crops around the real defects). The demo keeps the background exact in every
  generator, so whole-image KID mostly compares backgrounds; the region KID compares
  the defects (RESULTS (n), (p)),

and per category, the downstream detectors trained on each generator's pairs and
scored on the real test split: pixel / image AUROC and AUPRO (DRAEM-style
localization) and the type classifier's accuracy. Generators: ``magic`` (fine-tuned
per type, then generated, exactly as the factory does), ``perlin``, ``cutpaste``,
``anomalycontrol`` and the demo's ``oracle`` (true defects painted by the demo's
renderer; demo only). Prints a table per level, writes JSON and a sample grid
(normal | mask on the normal | generated, one row per generator and type).

    .venv/bin/python bench/quality.py                      # the demo, tiny profile
    .venv/bin/python bench/quality.py --detector-seeds 3   # downstream as mean +- sd
    .venv/bin/python bench/quality.py --source ../shared/data/real/mvtec_3d_ad \\
        --dataset mvtec_3d_ad --generators magic,perlin,cutpaste
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import report  # noqa: E402

from anomaly_factory.config import FactoryConfig, load_config  # noqa: E402

GENERATORS = ("magic", "perlin", "cutpaste", "anomalycontrol", "oracle")
DETECT_METRICS = ("pixel_auroc", "image_auroc", "aupro", "accuracy")


def work_config(args: argparse.Namespace, work: Path) -> FactoryConfig:
    """The profile's config with every output folder under ``work``."""
    overrides: dict[str, Any] = {
        "model": {"cache_dir": str(work / "models")},
        "anomalycontrol": {
            "cache_dir": str(work / "models" / "anomalycontrol"),
            "out_dir": str(work / "checkpoints" / "anomalycontrol"),
        },
        "finetune": {"out_dir": str(work / "checkpoints")},
        "detector": {"baselines": ["none"]},  # every generator is given explicitly
    }
    if args.n_pairs:
        overrides["generate"] = {"n_pairs": args.n_pairs}
    return load_config(args.config, args.profile, overrides=overrides)


def ingest_source(cfg: FactoryConfig, args: argparse.Namespace, work: Path) -> Path:
    from anomaly_factory.datasets.ingest import ingest

    categories = args.categories.split(",") if args.categories else None
    source = args.source
    if args.dataset == "demo" and source is None:
        from anomaly_factory.datasets.demo import build_demo

        d = cfg.demo
        source = build_demo(
            work / "demo", d.seed, d.size, d.n_train, d.n_test_good, d.n_per_type, categories
        )
    out = work / "manifests" / f"{args.dataset}.parquet"
    if out.is_file():
        return out
    result = ingest(
        args.dataset,
        source,
        out,
        root=work / "raw",
        categories=categories,
        fewshot_fraction=cfg.split.fewshot_fraction,
        demo=cfg.demo,
        show_progress=False,
    )
    return result.manifest_path


def types_of(manifest: Path) -> list[tuple[str, str]]:
    from anomaly_factory.manifest import read_images

    images = read_images(manifest)
    shots = images[images["split"] == "fewshot"]
    return sorted({(str(c), str(t)) for c, t in shots[["category", "anomaly_type"]].values})


def generate(cfg: FactoryConfig, gen: str, manifest: Path, work: Path) -> tuple[Path, float]:
    """Every type's pairs of one generator, merged; and the seconds it took."""
    from anomaly_factory.generators.base import GenerationRequest
    from anomaly_factory.generators.output import merge_pairs
    from anomaly_factory.generators.registry import get_generator

    start = time.perf_counter()
    generator = get_generator(gen)
    parts = []
    for category, anomaly_type in types_of(manifest):
        request = GenerationRequest(
            cfg,
            manifest,
            category,
            anomaly_type,
            cfg.generate.n_pairs,
            work / "pairs" / gen / category / anomaly_type,
            train_dir=work / "checkpoints" / category / anomaly_type,
        )
        parts.append(generator.generate(request.with_checkpoint(generator.prepare(request))))
    return merge_pairs(parts, work / "pairs" / gen / "pairs.parquet"), time.perf_counter() - start


def type_rows(cfg: FactoryConfig, gen: str, pairs: Path, manifest: Path) -> list[dict[str, Any]]:
    from anomaly_factory.gates.pair_checks import pair_checks_for_manifest
    from anomaly_factory.gates.run import compute_metrics

    metrics = compute_metrics(cfg, pairs, manifest)
    checks = pair_checks_for_manifest(cfg, pairs, manifest)
    region = metrics.get("kid_region", {}).get("per_type", {})
    rows = []
    for tid in metrics["types"]:
        mine = checks[checks["type_id"] == tid]
        failed = mine.loc[~mine["passed"], "reasons"].str.split("; ").explode()
        worst = failed.str.split(":").str[0].value_counts()
        rows.append(
            {
                "type": tid.split("/", 1)[1],
                "generator": gen,
                "pass_rate": float(mine["passed"].mean()) if len(mine) else float("nan"),
                "top_failure": str(worst.index[0]) if len(worst) else "",
                "kid_x1e3": metrics["kid"]["per_type"][tid]["kid_x1e3"],
                "region_kid_x1e3": region.get(tid, {}).get("generated", {}).get("kid_x1e3"),
                "ic_lpips": metrics["ic_lpips"]["per_type"][tid]["score"],
                "bg_psnr_median": float(mine["bg_psnr"].median()) if len(mine) else float("nan"),
                "fg_share_mean": float(mine["fg_share"].mean()) if len(mine) else float("nan"),
            }
        )
    return rows


def lowest_kid_rows(types: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per type, the generator with the lowest whole-image and defect-region KID."""
    out = []
    for tid in sorted({r["type"] for r in types}):
        mine = [r for r in types if r["type"] == tid]
        row: dict[str, Any] = {"type": tid}
        for col in ("kid_x1e3", "region_kid_x1e3"):
            known = [r for r in mine if r[col] is not None and np.isfinite(r[col])]
            row[f"lowest_{col}"] = min(known, key=lambda r: r[col])["generator"] if known else ""
        out.append(row)
    return out


def detect_rows(
    cfg: FactoryConfig,
    all_pairs: list[Path],
    manifest: Path,
    work: Path,
    seeds: int = 1,
    reuse: bool = False,
) -> list:
    """Downstream detectors on every generator's pairs, trained with ``seeds`` detector
    seeds (0, 1, ...): mean and, with more than one, standard deviation per metric.

    One detector training on 6 pairs a type moves pixel AUROC by up to 0.3 run to run
    (RESULTS (n)); several seeds say which generator's pairs train better on average.
    ``reuse`` keeps a seed's ``detector_metrics.json`` from an earlier run of the same
    work folder (same pairs), so more seeds only train the new ones.
    """
    from anomaly_factory.detectors.run import run_detectors
    from anomaly_factory.manifest import read_pairs, write_pairs

    merged = pd.concat([read_pairs(p) for p in all_pairs], ignore_index=True)
    # every generator numbers its pairs from 0: the generator makes a key unique here
    merged["key"] = merged["generator"] + "-" + merged["key"]
    path = write_pairs(merged.sort_values("key").reset_index(drop=True), work / "all_pairs.parquet")
    tables = []
    for seed in range(seeds):
        seeded = cfg.model_copy(update={"detector": cfg.detector.model_copy(update={"seed": seed})})
        out_dir = work / ("detect" if seed == 0 else f"detect-seed{seed}")
        done = out_dir / "detector_metrics.json"
        if not (reuse and done.is_file()):
            done = run_detectors(seeded, path, manifest, out_dir)
        out = json.loads(done.read_text())
        tables.append(pd.DataFrame(out["rows"]).assign(detector_seed=seed))
    table = pd.concat(tables, ignore_index=True)
    rows = []
    for (category, gen), part in table.groupby(["category", "generator"]):
        row: dict[str, Any] = {"category": category, "generator": gen}
        for metric in DETECT_METRICS:
            # one value per seed: the first non-null row of each seed holds the category's metric
            per_seed = (
                part.groupby("detector_seed")[metric].first()
                if metric in part
                else pd.Series(dtype=float)
            )
            row[metric] = float(per_seed.mean())  # NaN when no seed has the metric
            if seeds > 1:
                row[f"{metric}_sd"] = float(per_seed.std(ddof=1))
        rows.append(row)
    return rows


def best_of_rows(detect: list[dict[str, Any]], metric: str = "pixel_auroc") -> list[dict[str, Any]]:
    """Per category, MAGIC's ``metric`` against the better of Perlin and CutPaste."""
    by = {(r["category"], r["generator"]): r[metric] for r in detect}
    out = []
    for category in sorted({r["category"] for r in detect}):
        if (category, "magic") not in by:
            continue
        base = [by[(category, g)] for g in ("perlin", "cutpaste") if (category, g) in by]
        best = max(base) if base else float("nan")
        magic = by[(category, "magic")]
        out.append(
            {"category": category, "magic": magic, "best_baseline": best, "magic_ge": magic >= best}
        )
    return out


def sample_grid(all_pairs: dict[str, Path], out: Path, per_type: int = 2) -> Path:
    """normal | mask overlay (red) | generated, ``per_type`` rows per generator and type."""
    from anomaly_factory.images import read_mask, read_rgb

    rows = []
    for _gen, path in all_pairs.items():
        pairs = pd.read_parquet(path)
        for _, part in pairs.groupby(["category", "anomaly_type"]):
            for _, r in part.head(per_type).iterrows():
                image = read_rgb(r["image_path"], 128)
                normal = read_rgb(r["normal_path"], 128)
                mask = read_mask(r["mask_path"], 128)
                overlay = normal.copy()
                overlay[mask] = (0.4 * overlay[mask] + [153, 0, 0]).astype(np.uint8)
                rows.append(np.concatenate([normal, overlay, image], 1))
    grid = np.concatenate(rows, 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None, help="dataset folder (default: demo)")
    ap.add_argument("--dataset", default="demo", help="demo | mvtec_ad | mvtec_3d_ad | visa")
    ap.add_argument("--categories", default=None, help="comma-separated (default: all)")
    ap.add_argument("--generators", default=",".join(GENERATORS))
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--config", default=None)
    ap.add_argument("--n-pairs", type=int, default=0, help="pairs per type (default: profile's)")
    ap.add_argument("--work", type=Path, default=Path("bench/results/quality"))
    ap.add_argument("--no-detect", action="store_true", help="skip the downstream detectors")
    ap.add_argument(
        "--detector-seeds", type=int, default=1, help="detector trainings per generator (mean, sd)"
    )
    ap.add_argument(
        "--reuse-detect",
        action="store_true",
        help="keep seeds already trained in --work (same pairs): only new seeds train",
    )
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = work_config(args, work)
    manifest = ingest_source(cfg, args, work)
    gens = [g for g in args.generators.split(",") if g]
    if args.dataset != "demo" and "oracle" in gens:
        print("oracle: demo dataset only, skipped")
        gens.remove("oracle")
    pairs: dict[str, Path] = {}
    timing: dict[str, float] = {}
    for gen in gens:
        pairs[gen], timing[gen] = generate(cfg, gen, manifest, work)
    types = [row for gen in gens for row in type_rows(cfg, gen, pairs[gen], manifest)]
    types.sort(key=lambda r: (r["type"], gens.index(r["generator"])))
    report(f"quality_{args.dataset}_types", types, work / "types.json", timing_s=timing)
    print()
    report(f"quality_{args.dataset}_lowest_kid", lowest_kid_rows(types), work / "lowest_kid.json")
    detect = (
        []
        if args.no_detect
        else detect_rows(
            cfg, list(pairs.values()), manifest, work, args.detector_seeds, args.reuse_detect
        )
    )
    if detect:
        print()
        report(
            f"quality_{args.dataset}_detect",
            detect,
            work / "detect.json",
            detector_seeds=args.detector_seeds,
        )
        best = best_of_rows(detect)
        if best:
            print()
            report(
                f"quality_{args.dataset}_pixel_auroc_vs_baselines", best, work / "vs_baselines.json"
            )
    grid = sample_grid(pairs, work / "samples.png")
    print(f"\nsample grid: {grid}\ngeneration seconds: {timing}")


if __name__ == "__main__":
    main()
