"""Context-aware mask alignment, CAMA (MAGIC §3.4).

A reference is a ``fewshot`` image with its own ground-truth defect mask; CAMA
moves a mask to a plausible place on the chosen normal image. Per connected
component of the reference's mask:

1. keypoints: the centroid, the top point and the bottom point, read where the
   reference really shows its defect;
2. the top and bottom points are matched into the normal image by the argmax of
   cosine similarity between dense features (:mod:`.correspondence`);
3. the line between the two matches, intersected with the foreground
   (:mod:`.foreground`), gives the candidate centres;
4. the candidate whose feature is most similar to the centroid's wins;
5. the component placed is translated so its centroid lands there.

The component placed is the reference's own (``align``) or one of a new mask from
the mask generator (``generate``), paired largest to largest, as the official
code moves its generated masks to the matches of a reference defect; both go
through :meth:`CamaAligner.__call__`, and candidate centres are those where the
placed component fits the foreground.

Matching *fails* when a keypoint's best similarity, or the best candidate's, is
under ``cama.min_similarity``, or when no candidate centre on the line keeps at
least ``cama.min_inside`` of the component on the foreground. A failed component
falls back to a random (seeded) centre that does. Types in
``cama.outside_object_types`` skip the foreground constraint (only the image
bounds hold); texture categories and ``cama.enabled: false`` leave the mask where
it was; an empty or full foreground on an object is reported, never used.

>>> import numpy as np
>>> from anomaly_factory.config import FactoryConfig
>>> img = np.full((48, 48, 3), 40, np.uint8); img[10:38, 20:30] = 200
>>> mask = np.zeros((48, 48), bool); mask[30:34, 22:26] = True
>>> aligned, record = CamaAligner(FactoryConfig(), "bar", "dent")(mask, img, img, seed=0)
>>> record["cama_status"], aligned.shape, record["cama_foreground_ratio"]
('matched', (48, 48), 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from anomaly_factory.config import CamaSection, FactoryConfig
from anomaly_factory.generators.magic.correspondence import (
    FeatureMap,
    best_match,
    load_extractor,
)
from anomaly_factory.generators.magic.foreground import (
    Foreground,
    SegmenterOptions,
    iou,
    object_foreground,
)
from anomaly_factory.images import resize_mask_keep_thin

INPAINT_RADIUS = 3  # px: OpenCV's usual neighbourhood for Telea inpainting

__all__ = [
    "CamaAligner",
    "alignment_metrics",
    "expected_placements",
    "foreground_ratio",
    "may_lie_outside",
]


def may_lie_outside(section: CamaSection, category: str, anomaly_type: str) -> bool:
    """Whether this type may leave the object (``cama.outside_object_types``; '*' = all)."""
    types = section.outside_object_types.get(category, [])
    return "*" in types or anomaly_type in types


def foreground_ratio(mask: np.ndarray, foreground: np.ndarray) -> float:
    """Fraction of mask pixels inside the foreground (1.0 for an empty mask)."""
    n = int(mask.sum())
    return 1.0 if n == 0 else float((mask & foreground).sum() / n)


def alignment_metrics(
    aligned: np.ndarray,
    foreground: np.ndarray,
    expected: np.ndarray | list[np.ndarray] | None = None,
) -> dict[str, float]:
    """Fraction of the mask on the foreground; IoU with the (best of the) expected placements."""
    out = {"foreground_ratio": foreground_ratio(aligned, foreground)}
    if expected is not None:
        candidates = [expected] if isinstance(expected, np.ndarray) else list(expected)
        out["iou_expected"] = max((iou(aligned, e) for e in candidates), default=float("nan"))
    return out


def expected_placements(
    reference_fg: np.ndarray,
    normal_fg: np.ndarray,
    mask: np.ndarray,
    step_deg: float = 2.0,
    tolerance: float = 0.02,
) -> list[np.ndarray]:
    """Ground-truth placements of a reference mask, from exact object foregrounds.

    Searches the rigid motion (rotation about the centroid, then centroid to
    centroid) that best maps the reference object onto the normal one. Symmetric
    objects have several equally good motions (a hexagon every 60°); every motion
    within ``tolerance`` IoU of the best yields one expected placement.
    """
    h, w = normal_fg.shape
    (rx, ry), (nx, ny) = _centroid(reference_fg), _centroid(normal_fg)
    scores, matrices = [], []
    for angle in np.arange(0.0, 360.0, step_deg):
        m = cv2.getRotationMatrix2D((rx, ry), float(angle), 1.0)
        m[:, 2] += (nx - rx, ny - ry)
        moved = cv2.warpAffine(reference_fg.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST)
        scores.append(iou(moved > 0, normal_fg))
        matrices.append(m)
    best = max(scores)
    return [
        cv2.warpAffine(mask.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
        for m, score in zip(matrices, scores, strict=True)
        if score >= best - tolerance
    ]


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to ``(H, W)``: area coverage >= 0.5, thin parts kept whole
    (:func:`anomaly_factory.images.resize_mask_keep_thin`)."""
    return resize_mask_keep_thin(mask, size)


def remove_defect(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference with its anomaly inpainted away (OpenCV Telea).

    Keypoints lie on the anomaly (its top and bottom on its very edge), so features
    read from the anomaly image describe the defect, which the normal image does
    not have. Reading them from the surrounding context instead made the matches
    land near the ground-truth points on the known-transform tests.
    """
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    return cv2.inpaint(image, grown, INPAINT_RADIUS, cv2.INPAINT_TELEA)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8-connectivity) of a mask, largest first (ties: label order)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = sorted(range(1, n), key=lambda i: (-int(stats[i, cv2.CC_STAT_AREA]), i))
    return [labels == i for i in order]


# --------------------------------------------------------------------------- one component
@dataclass
class Placement:
    """Where one component went and why."""

    center: tuple[int, int]  # (x, y) of the moved centroid
    matched: bool
    reason: str = ""  # why matching failed: no_match | low_similarity | no_candidate
    sim_top: float = float("nan")
    sim_bottom: float = float("nan")
    sim_center: float = float("nan")


def keypoints(component: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid, top and bottom points (x, y) of a component (step 1)."""
    ys, xs = np.nonzero(component)
    centroid = np.array([xs.mean(), ys.mean()])
    top_xs = np.sort(xs[ys == ys.min()])
    bottom_xs = np.sort(xs[ys == ys.max()])
    top = np.array([top_xs[len(top_xs) // 2], ys.min()], float)
    bottom = np.array([bottom_xs[len(bottom_xs) // 2], ys.max()], float)
    return centroid, top, bottom


def inside_fraction_map(
    component: np.ndarray, anchor: tuple[int, int], region: np.ndarray
) -> np.ndarray:
    """For every centre (x, y): fraction of the component inside ``region`` when moved there.

    A correlation of the region with the component's own shape, anchored at its
    centroid pixel; outside the image counts as outside the region.
    """
    ys, xs = np.nonzero(component)
    y0, x0 = ys.min(), xs.min()
    kernel = component[y0 : ys.max() + 1, x0 : xs.max() + 1].astype(np.float32)
    fitted = cv2.filter2D(
        region.astype(np.float32),
        -1,
        kernel,
        anchor=(anchor[0] - int(x0), anchor[1] - int(y0)),
        borderType=cv2.BORDER_CONSTANT,
    )
    return fitted / kernel.sum()


def line_band(p: np.ndarray, q: np.ndarray, size: tuple[int, int], width: float) -> np.ndarray:
    """Pixels within ``width`` of the segment p-q (step 3), as a bool map.

    A match is only known to one feature cell, so the paper's line is widened by a
    cell: with ``width`` 0 it is the rasterised segment itself.
    """
    h, w = size
    p, q = np.asarray(p, float), np.asarray(q, float)
    ys, xs = np.mgrid[0:h, 0:w]
    d = q - p
    t = np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
    dist = np.hypot(xs - (p[0] + t * d[0]), ys - (p[1] + t * d[1]))
    return dist <= max(width, 0.5)


def shift_component(component: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The component translated by (dx, dy); pixels leaving the image are dropped."""
    h, w = component.shape
    ys, xs = np.nonzero(component)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out = np.zeros_like(component)
    out[ys[keep], xs[keep]] = True
    return out


# --------------------------------------------------------------------------- aligner
class CamaAligner:
    """The pair generator's alignment hook: ``aligner(mask, reference, normal, seed)``.

    Construction is cheap; feature extractors (DINOv2 weights) and foreground
    models are cached per setting and shared between instances.
    """

    def __init__(self, cfg: FactoryConfig, category: str, anomaly_type: str):
        self.section = cfg.cama
        self.category = category
        self.anomaly_type = anomaly_type
        self.texture = category in self.section.texture_categories
        self.outside = may_lie_outside(self.section, category, anomaly_type)
        self.device = self._device(self.section.device)

    @staticmethod
    def _device(device: str) -> str:
        if device != "auto":
            return device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _check(
        mask: np.ndarray, reference: np.ndarray, normal: np.ndarray, reference_mask: np.ndarray
    ) -> None:
        for name, img in (("reference_image", reference), ("normal_image", normal)):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"cama: {name} must be HxWx3 uint8, got {img.dtype} {img.shape}")
        for name, m in (("mask", mask), ("reference_mask", reference_mask)):
            if m.shape != reference.shape[:2]:
                raise ValueError(
                    f"cama: {name} shape {m.shape} differs from reference image "
                    f"{reference.shape[:2]}"
                )

    def foreground(self, normal: np.ndarray) -> Foreground:
        """The normal image's foreground (step 1), with its status."""
        s = self.section
        return object_foreground(
            normal,
            s.foreground,
            texture=self.texture,
            min_ratio=s.foreground_min_ratio,
            max_ratio=s.foreground_max_ratio,
            resolution=s.foreground_resolution,
            model=s.foreground_model,
            device=self.device,
            segmenter=SegmenterOptions.from_section(s),
        )

    def features(self, reference: np.ndarray, normal: np.ndarray) -> tuple[FeatureMap, FeatureMap]:
        s = self.section
        extractor = load_extractor(
            s.features, s.features_model, s.features_resolution, s.grid_stride, self.device
        )
        return extractor.pair(reference, normal)

    # ---------------------------------------------------------------- call
    def __call__(
        self,
        mask: np.ndarray,
        reference_image: np.ndarray,
        normal_image: np.ndarray,
        seed: int,
        reference_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict]:
        """Place ``mask``'s components on ``normal_image``; the one path of ``align`` and ``generate``.

        ``reference_mask`` is the reference image's own ground-truth defect mask:
        the keypoints (step 1) are read from its components, where the reference
        really shows a defect. ``mask`` is what gets placed: the same mask (the
        ``align`` command, the default when ``reference_mask`` is None) or a new
        mask from the mask generator (``generate``). Both are in the reference
        image's pixel frame. Generated components are paired with reference
        components largest to largest; a surplus generated component reuses the
        reference components in turn and may not overlap one already placed.
        """
        mask = np.asarray(mask).astype(bool)
        own = reference_mask is None
        reference_mask = mask if own else np.asarray(reference_mask).astype(bool)
        self._check(mask, reference_image, normal_image, reference_mask)
        size = normal_image.shape[:2]
        resized = reference_image.shape[:2] != size
        if resized:  # one frame: the normal image's; a stretch maps coordinates exactly
            reference_image = cv2.resize(
                reference_image, (size[1], size[0]), interpolation=cv2.INTER_AREA
            )
            mask = resize_mask(mask, size)
            reference_mask = mask if own else resize_mask(reference_mask, size)
        components = _components(mask)
        references = components if own else _components(reference_mask)
        record: dict = {
            "cama_status": "",
            "cama_n_components": len(components),
            "cama_n_reference_components": len(references),
            "cama_n_matched": 0,
            "cama_n_fallback": 0,
            "cama_fallback_reason": "",
            "cama_resized": bool(resized),
            "cama_outside_allowed": bool(self.outside),
            "cama_features": self.section.features,
            "cama_foreground_method": "",
            "cama_foreground_status": "",
            "cama_foreground_area": float("nan"),
            "cama_sim_top": float("nan"),
            "cama_sim_bottom": float("nan"),
            "cama_sim_center": float("nan"),
            "cama_foreground_ratio": float("nan"),
        }
        if not self.section.enabled or self.texture:
            record["cama_status"] = "texture" if self.texture else "disabled"
            record["cama_foreground_ratio"] = 1.0 if self.texture else float("nan")
            return mask, record

        fg = self.foreground(normal_image)
        record.update(
            cama_foreground_method=fg.method,
            cama_foreground_status=fg.status,
            cama_foreground_area=fg.ratio,
            cama_foreground_ratio=foreground_ratio(mask, fg.mask),
        )
        if not fg.usable and not self.outside:
            record["cama_status"] = "bad_foreground"
            return mask, record
        if not components:
            record["cama_status"] = "empty_mask"
            return mask, record

        region = np.ones(size, bool) if self.outside else fg.mask
        feat_ref = feat_normal = None
        if references:
            context = (
                remove_defect(reference_image, reference_mask)
                if self.section.inpaint_reference
                else reference_image
            )
            feat_ref, feat_normal = self.features(context, normal_image)
        aligned = np.zeros(size, bool)
        placements = []
        for k, component in enumerate(components):
            rng = np.random.default_rng([seed, k + 1])
            if not references:
                place = self.place_at_random(component, region, rng)
            else:
                # a reused reference component must not stack its defect on an earlier one
                free = region if k < len(references) else region & ~aligned
                keys = keypoints(references[k % len(references)])
                place = self.place_component(component, keys, feat_ref, feat_normal, free, rng)
            placements.append(place)
            centroid = keypoints(component)[0]
            dx = place.center[0] - int(round(centroid[0]))
            dy = place.center[1] - int(round(centroid[1]))
            aligned |= shift_component(component, dx, dy)

        matched = [p for p in placements if p.matched]
        record.update(
            cama_status="matched" if len(matched) == len(placements) else "fallback",
            cama_n_matched=len(matched),
            cama_n_fallback=len(placements) - len(matched),
            cama_fallback_reason=",".join(sorted({p.reason for p in placements if p.reason})),
            cama_foreground_ratio=foreground_ratio(aligned, fg.mask),
        )
        for key in ("top", "bottom", "center"):  # worst component: flat manifest columns
            values = [getattr(p, f"sim_{key}") for p in placements]
            values = [v for v in values if not np.isnan(v)]
            record[f"cama_sim_{key}"] = float(min(values)) if values else float("nan")
        return aligned, record

    def _fit(self, component: np.ndarray, region: np.ndarray):
        """The component's anchor pixel, its inside-fraction map and the valid centres."""
        centroid = keypoints(component)[0]
        anchor = (int(round(centroid[0])), int(round(centroid[1])))
        inside = inside_fraction_map(component, anchor, region)
        need = 1.0 - 1e-6 if self.outside else self.section.min_inside  # outside: in the image
        return anchor, inside, inside >= need

    def place_at_random(
        self, component: np.ndarray, region: np.ndarray, rng: np.random.Generator
    ) -> Placement:
        """Step 6 when there is nothing to match: the reference shows no defect."""
        anchor, inside, valid = self._fit(component, region)
        place = Placement(anchor, matched=False, reason="no_reference_defect")
        place.center = self.fallback_center(valid, inside, rng)
        return place

    def place_component(
        self,
        component: np.ndarray,
        reference_keypoints: tuple[np.ndarray, np.ndarray, np.ndarray],
        feat_ref: FeatureMap,
        feat_normal: FeatureMap,
        region: np.ndarray,
        rng: np.random.Generator,
    ) -> Placement:
        """Steps 2-5 for one component, or the seeded fallback (step 6).

        The keypoints come from a reference defect component; ``component`` is what
        is placed, so the candidate centres are those where *it* fits the region.
        """
        s = self.section
        centroid, top, bottom = reference_keypoints
        anchor, inside, valid = self._fit(component, region)
        q_top, q_bottom, q_center = feat_ref.sample(np.stack([top, bottom, centroid]))

        allowed = None if self.outside else region
        m_top = best_match(q_top, feat_normal, allowed)
        m_bottom = best_match(q_bottom, feat_normal, allowed)
        place = Placement(anchor, matched=False, reason="no_match")
        if m_top is not None and m_bottom is not None:
            place.sim_top, place.sim_bottom = m_top[1], m_bottom[1]
            place.reason = "low_similarity"
            if min(m_top[1], m_bottom[1]) >= s.min_similarity:
                place.reason = "no_candidate"
                band = line_band(m_top[0], m_bottom[0], region.shape, max(feat_normal.stride))
                ys, xs = np.nonzero(band & valid)
                candidates = np.stack([xs, ys], -1)
                if len(candidates):
                    place.reason = "low_similarity"
                    sims = feat_normal.sample(candidates) @ q_center
                    best = int(np.argmax(sims))
                    place.sim_center = float(sims[best])
                    if sims[best] >= s.min_similarity:
                        place.center = (int(candidates[best][0]), int(candidates[best][1]))
                        place.matched, place.reason = True, ""
                        return place
        place.center = self.fallback_center(valid, inside, rng)
        return place

    @staticmethod
    def fallback_center(
        valid: np.ndarray, inside: np.ndarray, rng: np.random.Generator
    ) -> tuple[int, int]:
        """A random (seeded) valid centre (step 6); the best-fitting one if none is valid."""
        ys, xs = np.nonzero(valid)
        if len(xs) == 0:
            ys, xs = np.nonzero(inside >= inside.max())
        i = int(rng.integers(len(xs)))
        return int(xs[i]), int(ys[i])
