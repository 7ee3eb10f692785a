"""Per-type distribution gates that calibrate themselves, whatever the feature extractor.

A KID number alone means little without the standard Inception weights, and even
with them a threshold from a paper says nothing about a new dataset. So each type's
generated anomalies are compared with *reference sets built from the same normals
and masks*:

* ``normals`` -- the pairs' normal images themselves ("do nothing");
* ``cutpaste`` -- a jittered patch of the same normal pasted into the same mask
  (CutPaste, Li et al. 2021, at the generator's own masks).

KID is measured on crops around the defect (``type_gates.region_size`` px, with
``region_context`` of margin, moved to stay within the image: zero padding at the
borders made KID measure where defects lie, not what they look like) against the same
crops of the type's real anomaly images, with the same extractor and the same seeded
subsets, so the comparison is paired. A generator whose defects are no closer to the
real ones than "nothing" or "a pasted patch" fails. Whole-image KID (the papers' number)
is kept in ``metrics.json`` and gated absolutely only where the weights make it
comparable.

Diversity: IC-LPIPS of the generated images must reach ``ic_lpips_ratio_min`` of the
real test anomalies' own IC-LPIPS (same network, same few-shot clusters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from anomaly_factory.config import FactoryConfig
from anomaly_factory.gates.pair_checks import defect_crop
from anomaly_factory.generators.baselines.cutpaste import _jitter

REFERENCE_SEED = 0  # CutPaste references are seeded per pair index: reruns give the same set


def region_crop(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    context: float,
    window: Literal["inside", "centred"] = "inside",
) -> np.ndarray:
    """The defect and its surroundings: a square uint8 crop around the mask's box, kept
    within the image by default (``type_gates.region_window``)."""
    crop, _ = defect_crop(image, mask, size, context, inside=window == "inside")
    return np.clip(crop, 0, 255).round().astype(np.uint8)


def cutpaste_at_mask(
    normal: np.ndarray, mask: np.ndarray, rng: np.random.Generator, jitter: float
) -> np.ndarray:
    """CutPaste at a given mask: a jittered patch of the same normal, from a random other
    place, fills the mask's pixels (Li et al. 2021, §3.1, with the mask imposed)."""
    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    sy = int(rng.integers(0, max(1, h - bh + 1)))
    sx = int(rng.integers(0, max(1, w - bw + 1)))
    patch = _jitter(normal[sy : sy + bh, sx : sx + bw], rng, jitter)
    if patch.shape[:2] != (bh, bw):  # a mask larger than the image's free room
        patch = cv2.resize(patch, (int(bw), int(bh)), interpolation=cv2.INTER_LINEAR)
    out = normal.copy()
    out[ys, xs] = patch[ys - ys.min(), xs - xs.min()]
    return out


@dataclass
class RegionSets:
    """Defect-region crops of one type's pairs and of the reference sets built from them."""

    generated: list[np.ndarray]
    references: dict[str, list[np.ndarray]]


def region_sets(
    cfg: FactoryConfig, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> RegionSets:
    """Crops of (image, mask, normal) pairs and of the configured reference sets."""
    t = cfg.gates.type_gates
    generated, refs = [], {name: [] for name in t.kid_references}
    for i, (image, mask, normal) in enumerate(pairs):

        def crop(picture: np.ndarray, mask: np.ndarray = mask) -> np.ndarray:
            return region_crop(picture, mask, t.region_size, t.region_context, t.region_window)

        generated.append(crop(image))
        if "normals" in refs:
            refs["normals"].append(crop(normal))
        if "cutpaste" in refs:
            rng = np.random.default_rng([REFERENCE_SEED, i])
            refs["cutpaste"].append(
                crop(cutpaste_at_mask(normal, mask, rng, cfg.baselines.cutpaste.jitter))
            )
    return RegionSets(generated, refs)


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def absolute_gates_apply(metrics: dict[str, Any]) -> dict[str, str | None]:
    """Why each absolute threshold is off (None when it applies): published numbers are
    only comparable with the standard Inception and ImageNet LPIPS-VGG."""
    kid = metrics.get("kid", {}).get("provenance", {})
    lp = metrics.get("ic_lpips", {}).get("provenance", {})
    kid_off = (
        None
        if kid.get("standard")
        else (
            f"extractor {kid.get('extractor')!r} is not the standard Inception: "
            "absolute KID is not comparable with the papers"
        )
    )
    lp_ok = lp.get("net") == "vgg" and str(lp.get("trunk", "")).startswith("imagenet")
    lp_off = (
        None
        if lp_ok
        else (
            f"LPIPS {lp.get('backbone')!r} is not ImageNet LPIPS-VGG: "
            "absolute IC-LPIPS is not comparable with the papers"
        )
    )
    return {"kid_max": kid_off, "ic_lpips_min": lp_off}
