"""Which gates ran, with which thresholds and extractor, and which were off and why.

``gates.json`` and the report carry this list, so a reader never mistakes a gate
that was off for one that passed.
"""

from __future__ import annotations

from typing import Any

from anomaly_factory.config import FactoryConfig
from anomaly_factory.gates.pair_checks import DUPLICATE_CHECK, pair_bounds


def _entry(
    gate: str, level: str, threshold: str | None, measured_with: str, why_off: str | None = None
) -> dict[str, Any]:
    return {
        "gate": gate,
        "level": level,
        "on": why_off is None,
        "threshold": threshold,
        "measured_with": measured_with,
        "why_off": why_off,
    }


def gate_catalogue(
    cfg: FactoryConfig, metrics: dict[str, Any], absolute_off: dict[str, str | None]
) -> list[dict[str, Any]]:
    """Every pixel check and type gate, on or off, with its threshold and what measured it."""
    g = cfg.gates
    pc = g.pair_checks
    out = []
    pixel = f"weight-free, outside = mask dilated by {pc.dilation_px} px"
    for b in pair_bounds(pc):
        via = pixel
        if b.check == "mask_on_object":
            via = f"foreground {cfg.cama.foreground}"
            if cfg.cama.foreground == "model":
                via = "foreground border_color (fallback: cama.foreground is model)"
            via += "; objects only, not cama.outside_object_types"
        elif b.check == "no_memorisation":
            via = (
                "masked defect crops vs the few-shot ones (8 orientations): pixel for pixel, "
                f"or at {pc.crop_size} px when their shapes differ"
            )
        threshold = f"{b.column} >= {b.min_value:g}" if b.enabled else None
        off = None if b.enabled else f"gates.pair_checks threshold for {b.column} is null"
        out.append(_entry(b.check, "pair", threshold, via, off))
    dup_on = pc.duplicate_iou_min is not None
    out.append(
        _entry(
            DUPLICATE_CHECK,
            "pair",
            f"not (mask IoU >= {pc.duplicate_iou_min:g} and mean |diff| <= "
            f"{pc.duplicate_difference_max:g})"
            if dup_on
            else None,
            "pairs of one type compared at 64 px",
            None if dup_on else "gates.pair_checks.duplicate_iou_min is null",
        )
    )
    kid_prov = metrics.get("kid", {}).get("provenance", {})
    extractor = f"{kid_prov.get('extractor')} (weights {str(kid_prov.get('weights_sha256'))[:12]})"
    refs = g.type_gates.kid_references
    for ref in ("normals", "cutpaste"):
        out.append(
            _entry(
                f"kid_vs_{ref}",
                "type",
                f"KID(defect regions) < KID({ref} at the same masks) + "
                f"{g.type_gates.kid_tie_se:g} SE",
                f"{extractor}, {g.type_gates.region_size} px region crops "
                f"({g.type_gates.region_window} window)",
                None if ref in refs else f"{ref!r} is not in gates.type_gates.kid_references",
            )
        )
    ratio = g.type_gates.ic_lpips_ratio_min
    lp_prov = metrics.get("ic_lpips", {}).get("provenance", {})
    out.append(
        _entry(
            "ic_lpips_vs_real",
            "type",
            f"IC-LPIPS >= {ratio:g} x IC-LPIPS(real test anomalies)" if ratio is not None else None,
            str(lp_prov.get("backbone")),
            None if ratio is not None else "gates.type_gates.ic_lpips_ratio_min is null",
        )
    )
    for name, value, via in (
        ("kid_max", g.kid_max, extractor),
        ("ic_lpips_min", g.ic_lpips_min, str(lp_prov.get("backbone"))),
    ):
        why = f"gates.{name} is null" if value is None else absolute_off.get(name)
        op = "<=" if name == "kid_max" else ">="
        column = "KID x1e3" if name == "kid_max" else "IC-LPIPS"
        out.append(
            _entry(
                name, "type", f"{column} {op} {value:g}" if value is not None else None, via, why
            )
        )
    return out
