"""report.html: content from metrics/gates/downstream files, and a headless-Chromium screenshot."""

from __future__ import annotations

import json
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
    rows = [{"detector": "draem", "pixel_auroc": 0.91}, {"detector": "none", "pixel_auroc": 0.5}]
    (out / "comparison.json").write_text(json.dumps({"rows": rows}))
    return render_report(out, metrics, gates, pairs, n_samples=2, checks=checks)


def test_report_shows_metrics_provenance_gates_samples_and_downstream(report) -> None:
    html = report.read_text()
    assert "GATES FAILED" in html and "kid_max: 1 unexpected" in html
    assert "12.50" in html and "13.50" in html  # per-type KID x1e3
    assert "pixel_stats" in html and "ab" * 32 in html and "lpips=alex, pretrained=False" in html
    # 2 types x 2 samples x 3 views, and the one failing pair (3 views) with its reason
    assert html.count("data:image/png;base64,") == 2 * 2 * 3 + 3
    assert "Worst failing pairs" in html and FAILING.replace("<", "&lt;") in html
    assert "gates.kid_max is null" in html  # an off gate says why
    assert "background_psnr" in html and "kid_vs_cutpaste" in html  # the gates that ran
    assert "Downstream detectors" in html and "draem" in html and "0.910" in html
    assert "http://" not in html and "https://" not in html  # viewable offline


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
        "--window-size=1280,2000",
        report.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20  # not a blank page
    colours = {tuple(c) for c in pixels[::8, ::8].reshape(-1, 3)}
    assert len(colours) > 50  # text, badges and image thumbnails
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 100  # the failure badge / mask overlays are rendered
