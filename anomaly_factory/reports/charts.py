"""The report's charts, drawn with matplotlib (Agg, no display) as PNG bytes.

* :func:`downstream_chart`: per category, the downstream detectors trained on each
  generator's pairs side by side (the given generator against Perlin, CutPaste and no
  synthetic data): pixel AUROC, image AUROC, AUPRO and classification accuracy.
* :func:`type_metrics_chart`: KID x1e3 (with its standard deviation over subsets) and
  IC-LPIPS (with the real test anomalies' own IC-LPIPS) per anomaly type.

Both take the plain rows / dicts the stages write, so they can be redrawn from
``comparison.json`` and ``metrics.json`` alone.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DOWNSTREAM_METRICS = (
    ("pixel_auroc", "pixel AUROC", "localization"),
    ("image_auroc", "image AUROC", "localization"),
    ("aupro", "AUPRO", "localization"),
    ("accuracy", "accuracy", "classification"),
)
GENERATOR_LABELS = {
    "magic": "MAGIC",
    "anomalycontrol": "AnomalyControl",
    "perlin": "Perlin",
    "cutpaste": "CutPaste",
    "none": "no synthetic data",
}
BASELINE_ORDER = ("perlin", "cutpaste", "none")  # after the generator(s) being judged
# colour-blind-safe (Okabe-Ito); the generator being judged gets the strongest one
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#999999", "#CC79A7", "#56B4E9")
DPI = 100


def generator_label(name: str) -> str:
    return GENERATOR_LABELS.get(name, name)


def generator_order(names: set[str] | list[str]) -> list[str]:
    """The generators being judged first (alphabetically), then Perlin, CutPaste, none."""
    names = set(names)
    judged = sorted(n for n in names if n not in BASELINE_ORDER)
    return judged + [n for n in BASELINE_ORDER if n in names]


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def downstream_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{category: {generator: {metric: value}}}`` from comparison rows (localization
    rows give the AUROCs and AUPRO, classification rows the accuracy)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in rows:
        category, generator = row.get("category"), row.get("generator")
        if category is None or generator is None:
            continue
        cell = out.setdefault(str(category), {}).setdefault(str(generator), {})
        for metric, _, task in DOWNSTREAM_METRICS:
            if row.get("task", task) == task and _finite(row.get(metric)) is not None:
                cell[metric] = _finite(row.get(metric))
        if row.get("task") == "localization" and row.get("n_pairs") is not None:
            cell["n_pairs"] = row.get("n_pairs")
    return out


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def downstream_chart(rows: list[dict[str, Any]]) -> bytes | None:
    """One panel per category: grouped bars, one group per metric, one bar per generator."""
    table = downstream_table(rows)
    if not table:
        return None
    generators = generator_order({g for cat in table.values() for g in cat})
    colours = {g: COLOURS[i % len(COLOURS)] for i, g in enumerate(generators)}
    categories = sorted(table)
    columns = min(len(categories), 2)
    n_rows = math.ceil(len(categories) / columns)
    fig = Figure(figsize=(6.2 * columns, 3.0 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, columns, squeeze=False)
    width = 0.8 / len(generators)
    for ax, category in zip(axes.flat, categories, strict=False):
        for i, g in enumerate(generators):
            values = [table[category].get(g, {}).get(m) for m, _, _ in DOWNSTREAM_METRICS]
            xs = [k + (i - (len(generators) - 1) / 2) * width for k in range(len(values))]
            heights = [v if v is not None else 0.0 for v in values]
            bars = ax.bar(xs, heights, width, color=colours[g], label=generator_label(g))
            for bar, v in zip(bars, values, strict=True):
                if v is None:  # not measured (no classifier without synthetic data)
                    bar.set_alpha(0)
        ax.set_title(category, fontsize=11, loc="left")
        ax.set_xticks(range(len(DOWNSTREAM_METRICS)), [label for _, label, _ in DOWNSTREAM_METRICS])
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="#bbbbbb", linewidth=0.8, linestyle="--", zorder=0)
        ax.grid(axis="y", color="#eeeeee")
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(categories) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(generators), frameon=False)
    return _png(fig)


def type_metrics_chart(metrics: dict[str, Any]) -> bytes | None:
    """KID x1e3 and IC-LPIPS per anomaly type, side by side (one row per type)."""
    types = list(metrics.get("types", []))
    if not types:
        return None
    kid = metrics.get("kid", {}).get("per_type", {})
    lp = metrics.get("ic_lpips", {}).get("per_type", {})
    height = 1.2 + 0.32 * len(types)
    fig = Figure(figsize=(11, height), layout="constrained")
    ax_kid, ax_lp = fig.subplots(1, 2, sharey=True)
    ys = list(range(len(types)))[::-1]
    kid_values = [_finite(kid.get(t, {}).get("kid_x1e3")) for t in types]
    kid_std = [_finite(kid.get(t, {}).get("kid_std_x1e3")) or 0.0 for t in types]
    ax_kid.barh(
        ys,
        [v if v is not None else 0.0 for v in kid_values],
        xerr=kid_std,
        color=COLOURS[0],
        error_kw={"ecolor": "#555555", "capsize": 2, "linewidth": 0.8},
    )
    ax_kid.axvline(0, color="#888888", linewidth=0.8)
    ax_kid.set_title("KID ×10³ vs the real anomalies (lower is closer)", fontsize=10, loc="left")
    lp_values = [_finite(lp.get(t, {}).get("score")) for t in types]
    real = [_finite(lp.get(t, {}).get("real_score")) for t in types]
    ax_lp.barh(ys, [v if v is not None else 0.0 for v in lp_values], color=COLOURS[2])
    real_points = [(r, y) for r, y in zip(real, ys, strict=True) if r is not None]
    if real_points:
        ax_lp.scatter(
            [r for r, _ in real_points],
            [y for _, y in real_points],
            marker="|",
            s=160,
            color="#222222",
            label="real test anomalies",
            zorder=3,
        )
        ax_lp.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax_lp.set_title("IC-LPIPS diversity (higher: more diverse)", fontsize=10, loc="left")
    ax_kid.set_yticks(ys, types, fontsize=8)
    for ax in (ax_kid, ax_lp):
        ax.grid(axis="x", color="#eeeeee")
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    for y, v in zip(ys, kid_values, strict=True):
        if v is None:
            ax_kid.text(0, y, " not measured", va="center", fontsize=8, color="#c5221f")
    for y, v in zip(ys, lp_values, strict=True):
        if v is None:
            ax_lp.text(0, y, " not measured", va="center", fontsize=8, color="#c5221f")
    return _png(fig)
