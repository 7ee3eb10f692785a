"""Gates benchmark (issue 11 d): KID + IC-LPIPS time for 500 generated pairs of one type.

    .venv/bin/python bench/gates.py [--n 500] [--sample 8] [--profile-top 12]

1. Tiny profile, measured in full: ``compute_metrics`` on ``n`` synthetic pairs of one
   type (perturbed real demo anomalies, 64 px) with the profile's extractors
   (``pixel_stats`` KID, LPIPS-alex random trunk at 64 px), split into its components,
   and IC-LPIPS with the per-pair reference evaluation (``lpips_pairs`` on every pair,
   the code before this benchmark) against the feature-cached one, checked bit-equal.
2. Real architectures with random weights (nothing is downloaded): InceptionV3 KID
   features at 299 px and LPIPS-VGG at 256 px. On 2 CPU cores a full run of 500 takes
   many minutes, so their rates are measured on ``--sample`` images and the time for
   ``n`` pairs is extrapolated from the work IC-LPIPS does (marked ``extrapolated``).
3. One cProfile of the tiny ``compute_metrics``: where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import report  # noqa: E402

CATEGORY, ANOMALY_TYPE = "nut_demo", "scratch"


# --------------------------------------------------------------------------- data
def build_data(root: Path, n: int) -> tuple[Path, Path]:
    """A 64 px demo manifest and ``n`` pairs of one type (real anomaly + noise)."""
    from PIL import Image

    from anomaly_factory.config import DemoSection
    from anomaly_factory.datasets.ingest import ingest
    from anomaly_factory.generators.output import (
        pair_key,
        pair_metadata,
        save_pair,
        write_pairs_manifest,
    )
    from anomaly_factory.manifest import read_images

    demo = DemoSection(seed=0, size=64, n_train=8, n_test_good=4, n_per_type=12)
    demo.categories = [CATEGORY]
    manifest_path = root / "manifest.parquet"
    ingest("demo", None, manifest_path, root=root / "raw", demo=demo, show_progress=False)
    images = read_images(manifest_path)
    rows = images[images["anomaly_type"] == ANOMALY_TYPE].sort_values("image_path")
    normal = sorted(images.loc[images["split"] == "train", "image_path"])[0]
    normal_img = np.asarray(Image.open(normal).convert("RGB"))
    rng = np.random.default_rng(0)
    out = root / "pairs"
    for i in range(n):
        src = rows.iloc[i % len(rows)]
        img = np.asarray(Image.open(src["image_path"]).convert("RGB")).astype(np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        meta = pair_metadata(
            src["dataset"],
            CATEGORY,
            ANOMALY_TYPE,
            "bench_perturbed_real",
            i,
            "real",
            sigma=1.0,
            w_m=4.0,
            w_d=7.5,
        )
        mask = np.asarray(Image.open(src["mask_path"]).convert("L"))
        save_pair(out, pair_key("demo", CATEGORY, ANOMALY_TYPE, i), img, mask, normal_img, meta)
    return write_pairs_manifest(out), manifest_path


def type_images(pairs_path: Path, manifest_path: Path) -> dict[str, list[np.ndarray]]:
    import pandas as pd

    from anomaly_factory.manifest import read_images
    from anomaly_factory.metrics.features import load_rgb

    pairs = pd.read_parquet(pairs_path).sort_values("key")
    images = read_images(manifest_path)
    sel = images[images["anomaly_type"] == ANOMALY_TYPE].sort_values("image_path")
    return {
        "generated": [load_rgb(p) for p in pairs["image_path"]],
        "real": [load_rgb(p) for p in sel["image_path"]],
        "fewshot": [load_rgb(p) for p in sel.loc[sel["split"] == "fewshot", "image_path"]],
    }


# --------------------------------------------------------------------------- reference
def reference_ic_lpips(model, generated, fewshot, resolution: int, max_per_cluster: int):
    """IC-LPIPS as it was before this benchmark: both trunks run for every pair."""
    from anomaly_factory.metrics.ic_lpips import ic_lpips_from_distances, lpips_pairs, to_tensor

    gen, shots = to_tensor(generated, resolution), to_tensor(fewshot, resolution)
    n_gen, n_shot = len(gen), len(shots)
    to_shot = np.stack(
        [
            lpips_pairs(model, gen, shots[f : f + 1].expand(n_gen, -1, -1, -1))
            for f in range(n_shot)
        ],
        axis=1,
    )
    assignment = to_shot.argmin(axis=1)
    pairs = []
    for c in range(n_shot):
        kept = np.flatnonzero(assignment == c)[:max_per_cluster]
        pairs.extend(combinations(kept.tolist(), 2))
    values = {}
    if pairs:
        ia, ib = (list(x) for x in zip(*pairs, strict=True))
        values = dict(zip(pairs, lpips_pairs(model, gen[ia], gen[ib]).tolist(), strict=True))
    return ic_lpips_from_distances(assignment, lambda i, j: values[(i, j)], max_per_cluster, n_shot)


def lpips_evaluations(n_gen: int, n_shot: int, cap: int) -> int:
    """LPIPS distances IC-LPIPS needs when every cluster is full (the worst case)."""
    per_cluster = min(cap, max(n_gen // max(n_shot, 1), 0))
    return n_gen * n_shot + n_shot * per_cluster * (per_cluster - 1) // 2


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def row(component: str, n: int, seconds: float, unit: str = "images", **extra) -> dict:
    return {
        "component": component,
        "n": n,
        "seconds": seconds,
        f"{unit}/s": n / seconds if seconds > 0 else None,
        **extra,
    }


# --------------------------------------------------------------------------- 1. tiny
def bench_tiny(cfg, pairs_path: Path, manifest_path: Path, imgs: dict) -> list[dict]:
    from anomaly_factory.gates.run import compute_metrics
    from anomaly_factory.metrics.features import load_extractor
    from anomaly_factory.metrics.ic_lpips import ic_lpips, load_lpips
    from anomaly_factory.metrics.kid import kid_from_features

    g = cfg.gates
    n, rows = len(imgs["generated"]), []
    ext = load_extractor(g.kid.extractor, g.kid.weights, g.kid.resolution, g.kid.seed, "cpu")
    gen_f, s = timed(ext.features, imgs["generated"])
    rows.append(row(f"KID features {ext.name} 64px", n, s))
    real_f = ext.features(imgs["real"])
    kid_args = (real_f, gen_f, g.kid.subsets, g.kid.subset_size, g.kid.seed)
    _, s = timed(kid_from_features, *kid_args)  # the first call imports torchmetrics
    rows.append(row("KID first call (imports torchmetrics; once per process)", n, s))
    _, s = timed(kid_from_features, *kid_args)
    rows.append(row(f"KID estimator ({g.kid.subsets}x{g.kid.subset_size})", n, s))
    model, _ = load_lpips(g.lpips.net, g.lpips.pretrained, g.lpips.weights, g.lpips.seed, "cpu")
    args = (model, imgs["generated"], imgs["fewshot"], g.lpips.resolution, g.lpips.max_per_cluster)
    evals = lpips_evaluations(n, len(imgs["fewshot"]), g.lpips.max_per_cluster)
    ref, s_ref = timed(reference_ic_lpips, *args)
    new, s_new = timed(ic_lpips, *args)
    same = ref.score == new.score and ref.cluster_scores == new.cluster_scores
    label = f"IC-LPIPS {g.lpips.net} random {g.lpips.resolution}px"
    rows.append(row(f"{label}, per-pair reference", n, s_ref, lpips_evals=evals))
    rows.append(
        row(f"{label}, feature-cached", n, s_new, lpips_evals=evals, bit_equal_to_reference=same)
    )
    _, s = timed(compute_metrics, cfg, pairs_path, manifest_path)
    rows.append(row("compute_metrics tiny (load + KID + IC-LPIPS, 2 types)", n, s))
    return rows


# --------------------------------------------------------------------------- 2. real archs
def bench_real_archs(imgs: dict, n: int, sample: int, cap: int) -> list[dict]:
    from anomaly_factory.metrics.features import load_extractor
    from anomaly_factory.metrics.ic_lpips import (
        ic_lpips,
        load_lpips,
        lpips_features,
        lpips_from_features,
        lpips_pairs,
        to_tensor,
    )

    rows = []
    gen = imgs["generated"][:sample]
    ext = load_extractor("inception_random_init", seed=0)
    ext.features(gen[:2])  # warm-up: first-call allocations
    _, s = timed(ext.features, gen)
    rows.append(
        row("KID features inception_random_init 299px", n, n * s / len(gen), extrapolated=True)
    )
    model, _ = load_lpips("vgg", pretrained=False, weights=None, seed=0)
    n_shot = len(imgs["fewshot"])
    evals = lpips_evaluations(n, n_shot, cap)
    a, b = to_tensor(gen, 256), to_tensor(gen[::-1], 256)
    lpips_pairs(model, a[:2], b[:2])
    _, s_pair = timed(lpips_pairs, model, a, b)
    per_pair = s_pair / len(gen)
    rows.append(
        row(
            "IC-LPIPS vgg random 256px, per-pair reference",
            n,
            evals * per_pair,
            lpips_evals=evals,
            extrapolated=True,
        )
    )
    fa, s_trunk = timed(lpips_features, model, a)
    fb = lpips_features(model, b)
    _, s_head = timed(lpips_from_features, model, fa, fb)
    cached = (n + n_shot) * s_trunk / len(gen) + evals * s_head / len(gen)
    rows.append(
        row(
            "IC-LPIPS vgg random 256px, feature-cached",
            n,
            cached,
            lpips_evals=evals,
            extrapolated=True,
            trunk_images_per_s=len(gen) / s_trunk,
            head_pairs_per_s=len(gen) / s_head,
        )
    )
    # a full (small) run of both implementations at 256 px: real speed-up, bit-equality
    small = imgs["generated"][:sample]
    args = (model, small, imgs["fewshot"], 256, cap)
    ref, s_ref = timed(reference_ic_lpips, *args)
    new, s_new = timed(ic_lpips, *args)
    same = ref.score == new.score and ref.cluster_scores == new.cluster_scores
    evals_small = lpips_evaluations(len(small), n_shot, cap)
    rows.append(row("  measured: vgg 256px reference", len(small), s_ref, lpips_evals=evals_small))
    rows.append(
        row(
            "  measured: vgg 256px feature-cached",
            len(small),
            s_new,
            lpips_evals=evals_small,
            bit_equal_to_reference=same,
        )
    )
    return rows


# --------------------------------------------------------------------------- 3. profile
def profile(cfg, pairs_path: Path, manifest_path: Path, top: int) -> list[str]:
    from anomaly_factory.gates.run import compute_metrics

    prof = cProfile.Profile()
    prof.runcall(compute_metrics, cfg, pairs_path, manifest_path)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    return lines[-(top + 1) :]


def main(argv: list[str] | None = None) -> None:
    import torch

    from anomaly_factory.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="generated pairs of the one type")
    parser.add_argument("--sample", type=int, default=8, help="images timed at 299/256 px")
    parser.add_argument("--profile-top", type=int, default=12)
    parser.add_argument("--skip-real-archs", action="store_true")
    args = parser.parse_args(argv)

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "pipelines.yaml", "tiny")
    cfg.gates.device = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        (pairs_path, manifest_path), s_build = timed(build_data, Path(tmp), args.n)
        print(f"built {args.n} pairs in {s_build:.1f}s", flush=True)
        imgs, s_load = timed(type_images, pairs_path, manifest_path)
        rows = [row("decode PNGs (generated + real)", args.n + len(imgs["real"]), s_load)]
        rows += bench_tiny(cfg, pairs_path, manifest_path, imgs)
        if not args.skip_real_archs:
            rows += bench_real_archs(imgs, args.n, args.sample, cfg.gates.lpips.max_per_cluster)
        top = profile(cfg, pairs_path, manifest_path, args.profile_top)
    print("\ncProfile of compute_metrics (tiny), top by tottime:")
    print("\n".join(top))
    print()
    report(
        "gates",
        rows,
        n_pairs=args.n,
        sample=args.sample,
        n_fewshot=len(imgs["fewshot"]),
        torch_threads=torch.get_num_threads(),
        profile_top_tottime=top,
    )


if __name__ == "__main__":
    main()
