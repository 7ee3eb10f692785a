"""report.html: content from metrics/gates/downstream files, and a headless-Chromium screenshot."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_factory.config import FactoryConfig
from anomaly_factory.gates.catalogue import gate_catalogue
from anomaly_factory.gates.decide import GateResult, TypeGate
from anomaly_factory.gates.expectations import pair_table
from anomaly_factory.gates.pair_checks import compute_pair_checks
from anomaly_factory.manifest import read_images
from anomaly_factory.reports.html import render_report
from tests.gates_pairs import build_pairs

FAILING = "background_psnr: PSNR outside mask (dB) 18.2 < 30"


@pytest.fixture(scope="module")
def report(demo_manifest_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    raw = pd.read_parquet(build_pairs(demo_manifest_path, root / "pairs", per_type=3))
    pairs = pair_table(raw)
    checks = compute_pair_checks(FactoryConfig(), raw, read_images(demo_manifest_path))
    checks["published"] = True
    checks.loc[0, ["passed", "reasons"]] = [False, FAILING]
    types = sorted(pairs["type_id"].unique())
    metrics = {
        "profile": "tiny",
        "types": types,
        "kid": {
            "provenance": {"extractor": "pixel_stats", "weights_sha256": "ab" * 32},
            "per_type": {t: {"kid_x1e3": 12.5 + i, "subset_size": 3} for i, t in enumerate(types)},
            "mean_x1e3": 13.0,
        },
        "ic_lpips": {
            "provenance": {"backbone": "lpips=alex, pretrained=False"},
            "per_type": {t: {"score": 0.25} for t in types},
            "mean": 0.25,
        },
    }
    gates = GateResult(
        passed=False,
        publishable=False,
        types={types[0]: TypeGate(True), types[1]: TypeGate(False, ["kid_max: 1 unexpected"])},
        gates=gate_catalogue(FactoryConfig(), metrics, {"kid_max": None, "ic_lpips_min": None}),
    )
    out = root / "out"
    out.mkdir()
    (out / "comparison.json").write_text(json.dumps({"rows": COMPARISON}))
    return render_report(out, metrics, gates, pairs, n_samples=2, checks=checks)


def _row(category, generator, task, **values):
    model = {"localization": "draem_discriminative", "classification": "resnet34"}[task]
    return {
        "category": category,
        "generator": generator,
        "task": task,
        "model": "padim" if generator == "none" else model,
        "schedule": "fixed_schedule: 1 epoch(s)",
        "pairs_sha256": "none" if generator == "none" else PAIRS_SHA,
        "manifest_sha256": MANIFEST_SHA,
        "config_hash": "0123456789abcdef",
        "n_pairs": 0 if generator == "none" else 6,
        **values,
    }


PAIRS_SHA, MANIFEST_SHA = "cd" * 32, "ef" * 32
COMPARISON = [
    _row(c, g, "localization", pixel_auroc=p, image_auroc=i, aupro=a)
    for c in ("nut_demo", "carpet_demo")
    for g, p, i, a in (
        ("magic", 0.91, 0.88, 0.71),
        ("perlin", 0.83, 0.8, 0.6),
        ("cutpaste", 0.8, 0.79, 0.55),
        ("none", 0.72, 0.7, 0.4),
    )
] + [
    _row(c, g, "classification", accuracy=acc)
    for c in ("nut_demo", "carpet_demo")
    for g, acc in (("magic", 0.75), ("perlin", 0.5), ("cutpaste", 0.625))
]


def _decode(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB"))


def test_report_verdict_gates_charts_tables_and_provenance(report) -> None:
    html = report.read_text()
    top, provenance = html.split("<h2>Provenance</h2>")
    # the verdict first, with the gates that ran (thresholds) and those that were off
    verdict = top.index("NOT PUBLISHABLE")
    assert verdict < top.index("Gates that ran") < top.index("Gates that were off")
    assert "1 of 2 types failed" in top and "kid_max: 1 unexpected" in top
    assert "bg_psnr &gt;= 30" in top and "kid_vs_cutpaste" in top  # ran, with its threshold
    assert "gates.kid_max is null" in top  # an off gate says why
    # charts: downstream per category, KID / IC-LPIPS per type; drawn images, not tables
    charts = re.findall(
        r"<img class='chart' alt='([^']+)'[^>]*src='(data:image/png;base64,[^']+)'", top
    )
    assert [alt for alt, _ in charts] == [
        "downstream metrics per category",
        "KID and IC-LPIPS per type",
    ]
    per_category = _decode(charts[0][1])
    assert per_category.shape[1] > 2 * per_category.shape[0] * 0.8  # two panels side by side
    # compact tables: the numbers by name, no hashes anywhere before the provenance
    assert "12.50" in top and "13.50" in top  # per-type KID x1e3
    assert "MAGIC" in top and "no synthetic data" in top and "0.910" in top and "0.750" in top
    assert not re.search(r"[0-9a-f]{64}", top), "hashes belong to the provenance section"
    assert "(weights " not in top
    assert "pixel_stats" in provenance and "ab" * 32 in provenance and PAIRS_SHA in provenance
    assert "lpips=alex, pretrained=False" in provenance and MANIFEST_SHA in provenance
    # 2 types x 2 samples x 3 views, and the one failing pair (3 views) with its reason
    assert html.count("<img alt=") == 2 * 2 * 3 + 3
    assert "Worst failing pairs" in html and FAILING.replace("<", "&lt;") in html
    assert "http://" not in html and "https://" not in html  # viewable offline


def test_sample_grid_is_normal_mask_on_the_normal_generated(report, demo_manifest_path) -> None:
    html = report.read_text()
    first = re.search(r'<div class="sample">(.*?)<div class="caption', html).group(1)
    views = dict(re.findall(r'<img alt="([^"]+)" title="[^"]+" src="([^"]+)"', first))
    assert list(views) == ["normal", "mask on the normal", "generated"]
    normal, overlay, generated = (_decode(views[k]) for k in views)
    tinted = np.any(overlay != normal, axis=-1)
    assert tinted.any() and (overlay[tinted][:, 0] >= normal[tinted][:, 0]).all()  # red tint
    # outside the mask the overlay is the normal, not the generated image
    assert np.array_equal(overlay[~tinted], normal[~tinted])
    assert not np.array_equal(normal, generated)


def test_report_screenshot_in_headless_chromium(report, tmp_path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    png = tmp_path / "report.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}",
        "--window-size=1280,1800",
        report.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1800, 1280)
    assert pixels.std() > 20  # not a blank page
    colours = {tuple(c) for c in pixels[::8, ::8].reshape(-1, 3)}
    assert len(colours) > 50  # text, badges and charts
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red[:300].sum() > 100  # the verdict's failure badge, at the top

    def near(rgb: tuple[int, int, int]) -> np.ndarray:
        return np.abs(pixels - np.array(rgb)).sum(axis=-1) < 30

    # the charts are drawn on the first screen: MAGIC's blue bars, CutPaste's green ones
    assert near((0, 114, 178)).sum() > 2000 and near((0, 158, 115)).sum() > 2000
