"""One self-contained HTML page per generated version (viewable offline).

It shows the gate outcome; which gates ran (threshold, what measured them) and
which were off and why; the metric table with the provenance of every number
(feature extractor and weights hash); the pixel checks per type with the worst
failing pairs as images and their reasons; a sample grid per anomaly type
(normal | mask overlay | generated; thumbnails embedded as data URIs), links to
the great-expectations Data Docs, and, when the detector stage has written
``detector_metrics.json`` / ``comparison.json`` next to it, a downstream table.
"""

from __future__ import annotations

import base64
import html
import json
import math
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
    """The generated image with the mask tinted red."""
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
            "mask overlay",
            mask_overlay(image, mask) if image is not None and mask is not None else None,
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
    out = ["<h2>Samples <span class='caption'>(normal | mask overlay | generated)</span></h2>"]
    for tid in types:
        rows = pairs[pairs["type_id"] == tid].head(n_samples) if len(pairs) else pairs
        out.append(f"<h3>{_e(tid)}</h3>")
        if not len(rows):
            out.append('<p class="reasons">no pairs</p>')
            continue
        out.append('<div class="grid">' + "".join(_sample_cell(r) for _, r in rows.iterrows()))
        out.append("</div>")
    return "\n".join(out)


def _gates_section(gates: dict[str, Any]) -> str:
    """Which gates ran, with their thresholds and what measured them; which were off, why."""
    entries = gates.get("gates") or []
    if not entries:
        return ""
    rows = []
    for e in entries:
        state = (
            '<span class="badge pass">on</span>'
            if e.get("on")
            else '<span class="badge off">off</span>'
        )
        rows.append(
            f"<tr><td class='mono'>{_e(e.get('gate'))}</td><td>{_e(e.get('level'))}</td>"
            f"<td>{state}</td><td class='mono'>{_e(e.get('threshold'))}</td>"
            f"<td>{_e(e.get('measured_with'))}</td><td>{_e(e.get('why_off') or '')}</td></tr>"
        )
    mode = gates.get("on_pair_failure", "fail")
    note = (
        "failing pairs are dropped; each type publishes its first passing pairs"
        if mode == "drop"
        else "a failing pair fails its type"
    )
    return (
        f"<h2>Gates</h2><p>on_pair_failure: <b>{_e(mode)}</b> ({_e(note)})</p><table>"
        "<tr><th>gate</th><th>level</th><th>state</th><th>threshold</th><th>measured with</th>"
        f"<th>why off</th></tr>{''.join(rows)}</table>"
    )


def _pair_checks_section(
    checks: pd.DataFrame | None, pairs: pd.DataFrame, types: list[str], n_samples: int
) -> str:
    """Per type: pixel-check counts, then the worst failing pairs with their reasons."""
    if checks is None:
        return ""
    from anomaly_factory.gates.pair_checks import CHECK_NAMES, failure_counts

    head = "".join(f"<th class='mono'>{_e(c)}</th>" for c in CHECK_NAMES)
    rows, worst = [], []
    by_key = {row["key"]: row for _, row in pairs.iterrows()}
    for tid in types:
        mine = checks[checks["type_id"] == tid]
        counts = failure_counts(mine)
        cells = "".join(
            f"<td class='num{' reasons' if counts[c] else ''}'>{counts[c]}</td>"
            for c in CHECK_NAMES
        )
        published = int(mine["published"].sum()) if "published" in mine else len(mine)
        rows.append(
            f"<tr><td>{_e(tid)}</td><td class='num'>{len(mine)}</td>"
            f"<td class='num'>{int(mine['passed'].sum())}</td><td class='num'>{published}</td>"
            f"<td class='num'>{_fmt(mine['bg_psnr'].median(), 1)}</td>{cells}</tr>"
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
        f"<th>median PSNR out</th>{head}</tr>{''.join(rows)}</table>"
    )
    return (
        "<h2>Pixel checks <span class='caption'>(failures per check)</span></h2>"
        + table
        + (
            "<h2>Worst failing pairs <span class='caption'>(normal | mask overlay | generated)"
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
    prov, lprov = kid.get("provenance", {}), lp.get("provenance", {})
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
    provenance = (
        "<table>"
        f"<tr><th>KID extractor</th><td class='mono'>{_e(prov.get('extractor'))}</td></tr>"
        f"<tr><th>KID weights sha256</th><td class='mono'>{_e(prov.get('weights_sha256'))}</td></tr>"
        f"<tr><th>KID weights source</th><td class='mono'>{_e(prov.get('weights_source'))}</td></tr>"
        f"<tr><th>standard Inception (comparable with papers)</th><td>{_e(prov.get('standard'))}</td></tr>"
        f"<tr><th>KID kernel / real images</th><td>{_e(kid.get('kernel'))}; real = "
        f"{_e(kid.get('real_split'))} anomaly images of the type; seed {_e(kid.get('seed'))}</td></tr>"
        f"<tr><th>IC-LPIPS backbone</th><td class='mono'>{_e(lprov.get('backbone'))} · trunk "
        f"{_e(lprov.get('trunk'))} · {_e(lp.get('resolution'))} px · ≤{_e(lp.get('max_per_cluster'))}"
        f" per cluster</td></tr>"
        f"<tr><th>IC-LPIPS weights sha256</th><td class='mono'>{_e(lprov.get('weights_sha256'))}</td></tr>"
        "</table>"
    )
    return f"<h2>Metrics</h2><table>{head}{''.join(rows)}</table><h3>Provenance</h3>{provenance}"


def _table_from_rows(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj if not isinstance(obj, list) else json.dumps(obj)}


def _downstream_section(out_dir: Path) -> str:
    parts = []
    for name in DOWNSTREAM_FILES:
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            parts.append(f"<p class='reasons'>{_e(name)}: unreadable ({_e(exc)})</p>")
            continue
        rows = data.get("rows") if isinstance(data, dict) else None
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            table = _table_from_rows(rows)
        else:
            table = _table_from_rows([{"field": k, "value": v} for k, v in _flatten(data).items()])
        parts.append(f"<h3><a href='{_e(name)}'>{_e(name)}</a></h3>{table}")
    return "<h2>Downstream detectors</h2>" + "".join(parts) if parts else ""


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
    passed = bool(g.get("passed"))
    badge = (
        '<span class="badge pass">ALL GATES PASSED · publishable</span>'
        if passed
        else '<span class="badge fail">GATES FAILED · not publishable</span>'
    )
    docs = _relative(g.get("data_docs"), out_dir)
    links = [f"<a href='{_e(docs)}'>great-expectations Data Docs</a>"] if docs else []
    links += [
        f"<a href='{n}'>{n}</a>" for n in ("metrics.json", "gates.json", "pair_checks.parquet")
    ]
    n_failed = sum(1 for t in g.get("types", {}).values() if not t["passed"])
    version_reasons = "".join(f"<li>{_e(r)}</li>" for r in g.get("version_reasons", []))
    inputs = metrics.get("inputs", {})
    body = [
        f"<h1>{_e(title or out_dir.name)}</h1>",
        f"<p>{badge} &nbsp; {len(types) - n_failed}/{len(types)} types pass · profile "
        f"<b>{_e(metrics.get('profile'))}</b> · config {_e(metrics.get('config_hash'))}</p>",
        f"<p>{' · '.join(links)}</p>",
        f"<p class='caption mono'>pairs {_e(inputs.get('pairs'))} · manifest "
        f"{_e(inputs.get('manifest'))}</p>",
        f"<ul class='reasons'>{version_reasons}</ul>" if version_reasons else "",
        _gates_section(g),
        _metrics_section(metrics, g, n_pairs),
        _pair_checks_section(checks, pairs, types, n_samples),
        _downstream_section(out_dir),
        _samples_section(pairs, types, n_samples),
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title or out_dir.name)} · anomaly-factory gates</title><style>{CSS}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )
    return atomic_write_text(out_dir / REPORT_FILE, page)
