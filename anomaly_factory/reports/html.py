"""One self-contained HTML page per generated version (viewable offline).

From the top: the verdict, with the gates that ran (threshold, what measured them) and
those that were off and why; charts (the downstream detectors per category, the given
generator against Perlin, CutPaste and no synthetic data; KID and IC-LPIPS per type);
compact tables of the same numbers; the pixel checks per type with the worst failing
pairs and their reasons; a sample grid per anomaly type (normal | mask over the normal |
generated; thumbnails embedded as data URIs); and last the provenance of every number
(feature extractors and weights hashes, detector models and schedules, data hashes).
Hashes live only in that last section.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_factory.io import atomic_write_text, png_bytes

REPORT_FILE = "report.html"
THUMB = 160  # px: large enough to judge a defect, small enough for 73 types on one page
MAX_EMBED = 256  # px: larger images are downscaled before embedding
OVERLAY_RGB = np.array([255, 40, 40], np.float32)
OVERLAY_ALPHA = 0.45
DOWNSTREAM_FILES = ("detector_metrics.json", "comparison.json")
WEIGHTS_HASH = re.compile(r" \(weights [0-9a-f]{6,}\)")  # hashes live in the provenance

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;
background:#f6f7f9}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:2px solid #d9dde3;padding-bottom:4px}
.badge{display:inline-block;padding:4px 12px;border-radius:12px;color:#fff;font-weight:600}
.pass{background:#1e8e3e}.fail{background:#c5221f}.off{background:#80868b}
table{border-collapse:collapse;background:#fff;margin:8px 0}
td,th{border:1px solid #d9dde3;padding:4px 8px;text-align:left;font-size:14px;vertical-align:top}
th{background:#eceff3}.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:12px}.sample{background:#fff;padding:6px;
border:1px solid #d9dde3}.sample img{width:160px;height:160px;image-rendering:pixelated;
margin-right:4px}.caption{font-size:12px;color:#555}.mono{font-family:monospace;font-size:12px}
.reasons{color:#c5221f;font-size:13px}
.verdict{background:#fff;border:1px solid #d9dde3;padding:12px 16px;margin:12px 0}
.verdict h2{margin-top:8px}.chart{max-width:100%;background:#fff;border:1px solid #d9dde3}
.off-list{color:#5f6368}
"""


def _e(value: Any) -> str:
    return "—" if value is None else html.escape(str(value))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def data_uri(image: np.ndarray) -> str:
    """A PNG data URI, downscaled to at most MAX_EMBED px."""
    if max(image.shape[:2]) > MAX_EMBED:
        im = Image.fromarray(image)
        im.thumbnail((MAX_EMBED, MAX_EMBED), Image.LANCZOS)
        image = np.asarray(im)
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (the normal the defect was painted into) with the mask tinted red."""
    if mask.shape != image.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(image.shape[1::-1], Image.NEAREST))
    out = image.astype(np.float32)
    m = mask > 0
    out[m] = (1 - OVERLAY_ALPHA) * out[m] + OVERLAY_ALPHA * OVERLAY_RGB
    return out.clip(0, 255).astype(np.uint8)


def _open(path: Any, mode: str) -> np.ndarray | None:
    try:
        with Image.open(str(path)) as im:
            return np.asarray(im.convert(mode))
    except (OSError, ValueError):
        return None


def _sample_cell(row: pd.Series, reasons: str | None = None) -> str:
    image, normal = _open(row["image_path"], "RGB"), _open(row["normal_path"], "RGB")
    mask = _open(row["mask_path"], "L")
    parts = []
    for label, arr in (
        ("normal", normal),
        (
            "mask on the normal",
            mask_overlay(normal, mask) if normal is not None and mask is not None else None,
        ),
        ("generated", image),
    ):
        if arr is None:
            parts.append(f'<span class="reasons">{label}: unreadable</span>')
        else:
            parts.append(f'<img alt="{label}" title="{label}" src="{data_uri(arr)}">')
    why = "".join(f"<div class='reasons'>{_e(r)}</div>" for r in (reasons or "").split("; ") if r)
    return (
        f'<div class="sample">{"".join(parts)}'
        f'<div class="caption mono">{_e(row["key"])} · seed {_e(row.get("seed"))}</div>{why}</div>'
    )


def _samples_section(pairs: pd.DataFrame, types: list[str], n_samples: int) -> str:
    out = [
        "<h2>Samples <span class='caption'>(normal | mask on the normal | generated)</span></h2>"
    ]
    for tid in types:
        rows = pairs[pairs["type_id"] == tid].head(n_samples) if len(pairs) else pairs
        out.append(f"<h3>{_e(tid)}</h3>")
        if not len(rows):
            out.append('<p class="reasons">no pairs</p>')
            continue
        out.append('<div class="grid">' + "".join(_sample_cell(r) for _, r in rows.iterrows()))
        out.append("</div>")
    return "\n".join(out)


def _verdict_section(g: dict[str, Any], types: list[str]) -> str:
    """The decision first, then the gates that made it (with thresholds) and those that
    were off, so "publishable" is never read as "every gate passed"."""
    entries = g.get("gates") or []
    ran = [e for e in entries if e.get("on")]
    off = [e for e in entries if not e.get("on")]
    n_failed = sum(1 for t in g.get("types", {}).values() if not t["passed"])
    if g.get("passed"):
        badge = '<span class="badge pass">PUBLISHABLE</span>'
        said = f"the {len(ran)} gates that ran passed for all {len(types)} types"
    else:
        badge = '<span class="badge fail">NOT PUBLISHABLE · gates failed</span>'
        said = f"{n_failed} of {len(types)} types failed"
    if off:
        said += f"; {len(off)} gates were off"
    version_reasons = "".join(f"<li>{_e(r)}</li>" for r in g.get("version_reasons", []))
    failed_types = "".join(
        f"<li><b>{_e(t)}</b>: {_e('; '.join(v.get('reasons') or []))}</li>"
        for t, v in sorted(g.get("types", {}).items())
        if not v["passed"]
    )
    ran_rows = "".join(
        f"<tr><td class='mono'>{_e(e.get('gate'))}</td><td>{_e(e.get('level'))}</td>"
        f"<td class='mono'>{_e(e.get('threshold'))}</td>"
        f"<td>{_e(WEIGHTS_HASH.sub('', str(e.get('measured_with'))))}</td></tr>"
        for e in ran
    )
    off_rows = "".join(
        f"<li><span class='mono'>{_e(e.get('gate'))}</span>: {_e(e.get('why_off'))}</li>"
        for e in off
    )
    mode = g.get("on_pair_failure", "fail")
    note = (
        "failing pairs are dropped; each type publishes its first passing pairs"
        if mode == "drop"
        else "a failing pair fails its type"
    )
    return (
        f"<div class='verdict'><p>{badge} &nbsp; {_e(said)}.</p>"
        + (
            f"<ul class='reasons'>{failed_types}{version_reasons}</ul>"
            if failed_types or version_reasons
            else ""
        )
        + f"<h2>Gates that ran ({len(ran)})</h2><p class='caption'>on_pair_failure: "
        f"<b>{_e(mode)}</b> ({_e(note)})</p><table><tr><th>gate</th><th>level</th>"
        f"<th>threshold</th><th>measured with</th></tr>{ran_rows}</table>"
        + (
            f"<h2>Gates that were off ({len(off)})</h2><ul class='off-list'>{off_rows}</ul>"
            if off
            else ""
        )
        + "</div>"
    )


def _chart(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return f"<p><img class='chart' alt='{_e(alt)}' title='{_e(alt)}' src='{uri}'></p>"


def _read_rows(out_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """The downstream comparison rows (``comparison.json``, else ``detector_metrics.json``)."""
    for name in DOWNSTREAM_FILES[::-1]:
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return [], f"<p class='reasons'>{_e(name)}: unreadable ({_e(exc)})</p>"
        rows = data.get("rows") if isinstance(data, dict) else None
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            return rows, ""
    return [], ""


def _charts_section(metrics: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from anomaly_factory.reports.charts import downstream_chart, type_metrics_chart

    parts = []
    if rows:
        parts.append(
            "<h2>Downstream detectors: the generator against the baselines</h2>"
            "<p class='caption'>The same detectors, seed and schedule trained on each "
            "generator's pairs (Perlin and CutPaste with the same count per type; no "
            "synthetic data = the unsupervised reference), scored on the real test split. "
            "Dashed line: chance.</p>"
            + _chart(downstream_chart(rows), "downstream metrics per category")
        )
    parts.append(
        "<h2>KID and IC-LPIPS per anomaly type</h2>"
        + _chart(type_metrics_chart(metrics), "KID and IC-LPIPS per type")
    )
    return "".join(parts)


def _pair_checks_section(
    checks: pd.DataFrame | None, pairs: pd.DataFrame, types: list[str], n_samples: int
) -> str:
    """Per type: pixel-check counts, then the worst failing pairs with their reasons."""
    if checks is None:
        return ""
    from anomaly_factory.gates.pair_checks import CHECK_NAMES, failure_counts

    rows, worst = [], []
    by_key = {row["key"]: row for _, row in pairs.iterrows()}
    for tid in types:
        mine = checks[checks["type_id"] == tid]
        counts = failure_counts(mine)
        failed = ", ".join(f"{c} {counts[c]}" for c in CHECK_NAMES if counts[c])
        published = int(mine["published"].sum()) if "published" in mine else len(mine)
        rows.append(
            f"<tr><td>{_e(tid)}</td><td class='num'>{len(mine)}</td>"
            f"<td class='num'>{int(mine['passed'].sum())}</td><td class='num'>{published}</td>"
            f"<td class='num'>{_fmt(mine['bg_psnr'].median(), 1)}</td>"
            f"<td class='{'reasons mono' if failed else 'mono'}'>{_e(failed or 'none')}</td></tr>"
        )
        failing = mine[~mine["passed"]].copy()
        if failing.empty:
            continue
        failing["n_reasons"] = failing["reasons"].str.count("; ") + 1
        failing = failing.sort_values(
            ["n_reasons", "bg_psnr", "key"], ascending=[False, True, True]
        )
        cells_html = [
            _sample_cell(by_key[r.key], r.reasons)
            for r in failing.head(n_samples).itertuples(index=False)
            if r.key in by_key
        ]
        worst.append(
            f"<h3>{_e(tid)} <span class='caption'>{len(failing)} failing, worst first</span></h3>"
            f"<div class='grid'>{''.join(cells_html)}</div>"
        )
    table = (
        "<table><tr><th>type</th><th>candidates</th><th>pass</th><th>published</th>"
        f"<th>median PSNR out</th><th>failed checks (pairs)</th></tr>{''.join(rows)}</table>"
    )
    return (
        "<h2>Pixel checks <span class='caption'>(per type; the checks are listed under "
        "Gates that ran)</span></h2>"
        + table
        + (
            "<h2>Worst failing pairs <span class='caption'>(normal | mask on the normal | generated)"
            "</span></h2>" + "".join(worst)
            if worst
            else ""
        )
    )


def _metrics_section(
    metrics: dict[str, Any], gates: dict[str, Any], n_pairs: dict[str, int]
) -> str:
    kid, lp = metrics.get("kid", {}), metrics.get("ic_lpips", {})
    region = metrics.get("kid_region", {}).get("per_type", {})
    head = (
        "<tr><th>type</th><th>pairs</th><th>KID×10³</th><th>± std</th><th>KID subset</th>"
        "<th>region KID×10³ gen / normals / cutpaste</th>"
        "<th>IC-LPIPS</th><th>floor</th><th>clusters</th><th>gate</th><th>reasons / notes</th></tr>"
    )
    rows = []
    for tid in metrics.get("types", []):
        k = kid.get("per_type", {}).get(tid, {})
        li = lp.get("per_type", {}).get(tid, {})
        reg = region.get(tid, {})
        g = gates.get("types", {}).get(tid, {"passed": False, "reasons": []})
        floor = (g.get("values") or {}).get("ic_lpips_floor")
        region_cell = " / ".join(
            _fmt((reg.get(n) or {}).get("kid_x1e3"), 2)
            for n in ("generated", "normals", "cutpaste")
        )
        badge = (
            '<span class="badge pass">pass</span>'
            if g["passed"]
            else ('<span class="badge fail">fail</span>')
        )
        sizes = li.get("cluster_sizes") or []
        rows.append(
            f"<tr><td>{_e(tid)}</td><td class='num'>{n_pairs.get(tid, 0)}</td>"
            f"<td class='num'>{_fmt(k.get('kid_x1e3'), 2)}</td>"
            f"<td class='num'>{_fmt(k.get('kid_std_x1e3'), 2)}</td>"
            f"<td class='num'>{_fmt(k.get('subset_size'))}×{_fmt(k.get('subsets'))}</td>"
            f"<td class='num'>{region_cell}</td>"
            f"<td class='num'>{_fmt(li.get('score'))}</td><td class='num'>{_fmt(floor)}</td>"
            f"<td class='mono'>{_e(sizes)}</td><td>{badge}</td>"
            f"<td><div class='reasons'>{'<br>'.join(_e(r) for r in g['reasons'])}</div>"
            f"<div class='caption'>{_e(k.get('note') or '')} {_e(li.get('note') or '')}</div>"
            "</td></tr>"
        )
    rows.append(
        f"<tr><th>mean over types</th><td></td><th class='num'>{_fmt(kid.get('mean_x1e3'), 2)}</th>"
        f"<td></td><td></td><td></td><th class='num'>{_fmt(lp.get('mean'))}</th><td></td><td></td>"
        "<td></td><td></td></tr>"
    )
    return f"<h2>Metrics per type</h2><table>{head}{''.join(rows)}</table>"


def _downstream_table(rows: list[dict[str, Any]]) -> str:
    """One row per (category, generator); the numbers of the chart, no hashes."""
    from anomaly_factory.reports.charts import (
        DOWNSTREAM_METRICS,
        downstream_table,
        generator_label,
        generator_order,
    )

    table = downstream_table(rows)
    if not table:
        return ""
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in DOWNSTREAM_METRICS)
    body = []
    for category in sorted(table):
        for g in generator_order(set(table[category])):
            cell = table[category][g]
            values = "".join(
                f"<td class='num'>{_fmt(cell.get(m))}</td>" for m, _, _ in DOWNSTREAM_METRICS
            )
            body.append(
                f"<tr><td>{_e(category)}</td><td>{_e(generator_label(g))}</td>{values}"
                f"<td class='num'>{_fmt(cell.get('n_pairs'))}</td></tr>"
            )
    return (
        "<h2>Downstream detectors</h2><table><tr><th>category</th><th>trained on</th>"
        f"{head}<th>pairs</th></tr>{''.join(body)}</table>"
    )


def _provenance_section(metrics: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> str:
    """Where every number comes from: extractors, weights, detector models and schedules,
    data hashes. The only place hashes appear."""
    kid, lp = metrics.get("kid", {}), metrics.get("ic_lpips", {})
    prov, lprov = kid.get("provenance", {}), lp.get("provenance", {})
    inputs = metrics.get("inputs", {})

    def row(name: str, value: Any, mono: bool = True) -> str:
        return f"<tr><th>{_e(name)}</th><td class='{'mono' if mono else ''}'>{_e(value)}</td></tr>"

    lines = [
        row("pairs manifest", f"{inputs.get('pairs')} · sha256 {inputs.get('pairs_sha256')}"),
        row("image manifest", f"{inputs.get('manifest')} · sha256 {inputs.get('manifest_sha256')}"),
        row("config", f"profile {metrics.get('profile')} · hash {metrics.get('config_hash')}"),
        row("KID extractor", prov.get("extractor")),
        row("KID weights sha256", prov.get("weights_sha256")),
        row("KID weights source", prov.get("weights_source")),
        row("standard Inception (comparable with papers)", prov.get("standard"), mono=False),
        row(
            "KID kernel / real images",
            f"{kid.get('kernel')}; real = {kid.get('real_split')} anomaly images of the type; "
            f"seed {kid.get('seed')}",
            mono=False,
        ),
        row(
            "IC-LPIPS backbone",
            f"{lprov.get('backbone')} · trunk {lprov.get('trunk')} · {lp.get('resolution')} px"
            f" · ≤{lp.get('max_per_cluster')} per cluster",
        ),
        row("IC-LPIPS weights sha256", lprov.get("weights_sha256")),
    ]
    detector_rows = []
    seen = set()
    for r in rows:
        key = (r.get("category"), r.get("generator"), r.get("model"))
        if key in seen:
            continue
        seen.add(key)
        detector_rows.append(
            "<tr>"
            + "".join(
                f"<td class='mono'>{_e(r.get(c))}</td>"
                for c in ("category", "generator", "task", "model", "schedule", "pairs_sha256")
            )
            + "</tr>"
        )
    version = rows[0] if rows else {}
    detectors = (
        "<h3>Downstream detectors</h3><p class='caption mono'>manifest sha256 "
        f"{_e(version.get('manifest_sha256'))} · config {_e(version.get('config_hash'))} · "
        f"seed {_e(version.get('seed'))} · {_e(version.get('resolution'))} px</p><table><tr>"
        "<th>category</th><th>generator</th><th>task</th><th>model</th><th>schedule</th>"
        f"<th>pairs sha256</th></tr>{''.join(detector_rows)}</table>"
        if rows
        else ""
    )
    files = " · ".join(
        f"<a href='{n}'>{n}</a>"
        for n in ("metrics.json", "gates.json", "pair_checks.parquet", *DOWNSTREAM_FILES)
        if (out_dir / n).is_file()
    )
    return (
        f"<h2>Provenance</h2><p>{files}</p><h3>Metrics</h3><table>{''.join(lines)}</table>"
        f"{detectors}"
    )


def _relative(path: str | None, out_dir: Path) -> str | None:
    if not path:
        return None
    p = Path(path)
    try:
        return p.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return p.resolve().as_uri()


def render_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    gates: Any,
    pairs: pd.DataFrame,
    n_samples: int = 4,
    title: str | None = None,
    checks: pd.DataFrame | None = None,
) -> Path:
    """Write ``out_dir/report.html`` from the metrics, the gate result, the pair table and
    (when given) the pixel checks of every pair (``pair_checks.parquet``)."""
    out_dir = Path(out_dir)
    g = gates.as_dict() if hasattr(gates, "as_dict") else dict(gates)
    types = list(metrics.get("types", []))
    n_pairs = pairs["type_id"].value_counts().to_dict() if len(pairs) else {}
    docs = _relative(g.get("data_docs"), out_dir)
    rows, unreadable = _read_rows(out_dir)
    body = [
        f"<h1>{_e(title or out_dir.name)}</h1>",
        f"<p class='caption'>profile <b>{_e(metrics.get('profile'))}</b> · config "
        f"{_e(metrics.get('config_hash'))}"
        + (f" · <a href='{_e(docs)}'>great-expectations Data Docs</a>" if docs else "")
        + "</p>",
        _verdict_section(g, types),
        _charts_section(metrics, rows),
        _metrics_section(metrics, g, n_pairs),
        _downstream_table(rows) + unreadable,
        _pair_checks_section(checks, pairs, types, n_samples),
        _samples_section(pairs, types, n_samples),
        _provenance_section(metrics, rows, out_dir),
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title or out_dir.name)} · anomaly-factory gates</title><style>{CSS}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )
    return atomic_write_text(out_dir / REPORT_FILE, page)
