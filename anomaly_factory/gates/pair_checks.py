"""Weight-free pixel checks of every generated pair: the gates that look at the data.

Five questions, each answered by one pure function and one threshold in
``gates.pair_checks`` (a null threshold turns its check off):

* **background kept** -- PSNR and SSIM of the anomaly image against its normal image
  outside the mask dilated by ``dilation_px`` (MAGIC's paste-back feather is 3 px);
  a generator that redraws the object fails.
* **anomaly present** -- the mean change inside the mask is large enough, and it is
  concentrated there: ``inside / (outside + 1)``. A pair that returns its normal fails.
* **mask placement** -- for object categories and types that must stay on the object
  (``cama.outside_object_types``), the share of mask pixels on the normal's foreground.
* **no memorisation** -- the defect crop is not a near-copy of a few-shot training
  defect (nearest distance over the type's few-shot crops, their flips and 90-degree
  turns, translation-free because crops are centred on the mask).
* **no near-duplicates** -- no two pairs of a type share their mask and defect pixels.

:func:`compute_pair_checks` runs them over a pairs manifest and returns one row per
pair (``key``, ``passed``, one column per check, ``reasons``); bench scripts call
:func:`pair_checks_for_manifest` with paths.

>>> normal = np.full((32, 32, 3), 100, np.uint8)
>>> mask = np.zeros((32, 32), bool); mask[12:20, 12:20] = True
>>> image = normal.copy(); image[mask] = 200
>>> checks = pixel_checks(image, mask, normal, dilation_px=4)
>>> checks["bg_psnr"], checks["change_inside"], checks["concentration"]
(inf, 100.0, 100.0)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from anomaly_factory.config import FactoryConfig, PairChecksSection
from anomaly_factory.io import atomic_path

PAIR_CHECKS_FILE = "pair_checks.parquet"
DATA_RANGE = 255.0  # uint8 images
SSIM_SIGMA = 1.5  # Wang et al. 2004: 11-tap Gaussian window, sigma 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5), scikit-image's truncation of that window
SSIM_K1, SSIM_K2 = 0.01, 0.03
FINGERPRINT = 64  # px: masks and images are compared at this size for near-duplicates
MEMORISATION_CONTEXT = 0.1  # margin around the mask's box in memorisation crops (of its side)
OK = "ok"
# placement status values other than "checked" say why the check was skipped
TEXTURE, OUTSIDE_ALLOWED = "texture", "may_lie_outside"


# --------------------------------------------------------------------------- regions
def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` grown by ``px`` pixels (a disc), so a feathered edge counts as inside."""
    mask = np.asarray(mask, bool)
    if px <= 0:
        return mask.copy()
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), disc) > 0


def outside_region(mask: np.ndarray, dilation_px: int) -> np.ndarray:
    """Pixels farther than ``dilation_px`` from the mask: what must stay the normal image."""
    return ~dilate(mask, dilation_px)


# --------------------------------------------------------------------------- background
def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """PSNR (dB) of two uint8 images over ``region`` (all channels); inf when equal.

    ``10 log10(255^2 / MSE)``, scikit-image's ``peak_signal_noise_ratio`` on the
    region's pixels; NaN for an empty region.
    """
    diff = a.astype(np.float64) - b.astype(np.float64)
    if region is not None:
        diff = diff[np.asarray(region, bool)]
    if diff.size == 0:
        return math.nan
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def _gauss(x: np.ndarray) -> np.ndarray:
    k = cv2.getGaussianKernel(2 * SSIM_RADIUS + 1, SSIM_SIGMA, cv2.CV_64F)
    # BORDER_REFLECT is scipy.ndimage's 'reflect', the mode scikit-image's SSIM uses
    return cv2.sepFilter2D(x, cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004, eq. 13), averaged over colour channels.

    Gaussian-weighted statistics (sigma 1.5, 11 taps), population covariance,
    K1 = 0.01, K2 = 0.03, data range 255: scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, use_sample_covariance=False``.
    """
    planes = [np.atleast_3d(v).transpose(2, 0, 1).astype(np.float64) for v in (a, b)]
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    total = np.zeros(planes[0].shape[1:])
    for xc, yc in zip(*planes, strict=True):
        ux, uy = _gauss(xc), _gauss(yc)
        vx = _gauss(xc * xc) - ux * ux
        vy = _gauss(yc * yc) - uy * uy
        vxy = _gauss(xc * yc) - ux * uy
        num = (2 * ux * uy + c1) * (2 * vxy + c2)
        total += num / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return total / len(planes[0])


def ssim_region(mask: np.ndarray, dilation_px: int) -> np.ndarray:
    """Where SSIM measures the background: pixels whose whole window misses the dilated
    mask, away from the image border (scikit-image's crop of the padded strip)."""
    region = ~dilate(mask, dilation_px + SSIM_RADIUS)
    inner = np.zeros_like(region)
    inner[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS] = True
    return region & inner


def ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean of :func:`ssim_map` over ``region`` (default: the whole image less its border
    strip, which is scikit-image's mean SSIM); NaN for an empty region."""
    full = ssim_map(a, b)
    if region is None:
        region = np.zeros(full.shape, bool)
        region[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS] = True
    values = full[np.asarray(region, bool)]
    return float(values.mean(dtype=np.float64)) if values.size else math.nan


# --------------------------------------------------------------------------- anomaly present
def mean_change(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Mean absolute difference (0-255, averaged over channels) over ``region``; NaN if empty."""
    region = np.asarray(region, bool)
    if not region.any():
        return math.nan
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(diff[region].mean())


def concentration(change_inside: float, change_outside: float) -> float:
    """How much more the image changed inside the mask than outside: ``in / (out + 1)``.

    The ``+ 1`` (one grey level) keeps an exact background from dividing by zero.
    """
    outside = 0.0 if math.isnan(change_outside) else change_outside
    return change_inside / (outside + 1.0)


def pixel_checks(
    image: np.ndarray, mask: np.ndarray, normal: np.ndarray, dilation_px: int
) -> dict[str, float]:
    """Background-kept and anomaly-present values of one pair (uint8 HxWx3, bool mask)."""
    mask = np.asarray(mask, bool)
    outside = outside_region(mask, dilation_px)
    diff = image.astype(np.float32) - normal.astype(np.float32)  # one pass for all three
    change = np.abs(diff).mean(axis=2)
    out_diff = diff[outside]
    mse = float(np.mean(np.square(out_diff, dtype=np.float64))) if out_diff.size else math.nan
    inside = float(change[mask].mean(dtype=np.float64)) if mask.any() else math.nan
    out = float(change[outside].mean(dtype=np.float64)) if outside.any() else math.nan
    return {
        "bg_psnr": math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse),
        "bg_ssim": ssim(image, normal, ssim_region(mask, dilation_px)),
        "change_inside": inside,
        "change_outside": out,
        "concentration": concentration(inside, out),
    }


# --------------------------------------------------------------------------- placement
def foreground_share(mask: np.ndarray, foreground: np.ndarray) -> float:
    """Share of mask pixels on the foreground (NaN for an empty mask)."""
    mask = np.asarray(mask, bool)
    n = int(mask.sum())
    return math.nan if n == 0 else float((mask & np.asarray(foreground, bool)).sum() / n)


@dataclass(frozen=True)
class Placement:
    """How mask placement is judged for one (category, type)."""

    applies: bool
    status: str  # "checked", TEXTURE or OUTSIDE_ALLOWED
    method: str  # the foreground method, with the fallback said


def placement_rule(cfg: FactoryConfig, category: str, anomaly_type: str) -> Placement:
    """Whether placement is checked: objects only, and not for types allowed off the object.

    The weight-free method of ``cama.foreground`` is used; ``model`` needs weights the
    gates do not load, so it falls back to ``border_color`` and says so.
    """
    from anomaly_factory.generators.magic.cama import may_lie_outside

    method = cfg.cama.foreground
    label = method if method != "model" else "border_color (fallback: cama.foreground is model)"
    method = method if method != "model" else "border_color"
    if category in cfg.cama.texture_categories:
        return Placement(False, TEXTURE, label)
    if may_lie_outside(cfg.cama, category, anomaly_type):
        return Placement(False, OUTSIDE_ALLOWED, label)
    return Placement(True, "checked", method if label == method else label)


def normal_foreground(cfg: FactoryConfig, normal: np.ndarray) -> tuple[np.ndarray, str]:
    """The normal image's object mask and its status (``ok``, ``empty`` or ``full``)."""
    from anomaly_factory.generators.magic.foreground import object_foreground

    method = cfg.cama.foreground if cfg.cama.foreground != "model" else "border_color"
    fg = object_foreground(
        normal,
        method,
        min_ratio=cfg.cama.foreground_min_ratio,
        max_ratio=cfg.cama.foreground_max_ratio,
        resolution=cfg.cama.foreground_resolution,
    )
    return fg.mask, fg.status


# --------------------------------------------------------------------------- memorisation
def defect_crop(
    image: np.ndarray, mask: np.ndarray, size: int, context: float, inside: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A square crop centred on the mask's box, resized to ``size``: (float32 RGB, coverage).

    The side is the box's longer side times ``1 + 2 * context``. The window is centred
    exactly (sub-pixel), so a defect moved by whole pixels, flipped or turned by 90
    degrees gives the same crop up to the same move. Outside the image the crop is zero
    with zero coverage. ``inside``: a window that fits in the image is moved, the least
    it must, to lie within it, so the crop holds only image pixels (the defect then
    sits off-centre).
    """
    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError("defect_crop: empty mask")
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    side = max(1, math.ceil((max(y1 - y0, x1 - x0) + 1) * (1 + 2 * context)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = mask.shape
    if inside and side <= min(h, w):  # the window's first and last pixel centres in the image
        half = (side - 1) / 2
        cx, cy = min(max(cx, half), w - 1 - half), min(max(cy, half), h - 1 - half)
    centre = (cx + side, cy + side)  # in the zero-padded image
    pad = dict(top=side, bottom=side, left=side, right=side, borderType=cv2.BORDER_CONSTANT)
    rgb = cv2.copyMakeBorder(np.ascontiguousarray(image[..., :3], np.float32), value=0, **pad)
    cover = cv2.copyMakeBorder(mask.astype(np.float32), value=0, **pad)
    rgb = cv2.getRectSubPix(rgb, (side, side), centre)
    cover = cv2.getRectSubPix(cover, (side, side), centre)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return (
        cv2.resize(rgb, (size, size), interpolation=interp),
        cv2.resize(cover, (size, size), interpolation=interp),
    )


def masked_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The defect pixels only, at their own resolution: float32 H x W x 4 (RGB zero off the
    mask, then the mask), cut at the mask's box plus a symmetric margin of
    ``MEMORISATION_CONTEXT`` of its longer side.

    Whole-pixel margins on both sides keep the crop exact under moves by whole pixels,
    flips and 90-degree turns (a turned defect gives the turned crop).
    """
    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError("masked_crop: empty mask")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = math.ceil(MEMORISATION_CONTEXT * max(y1 - y0, x1 - x0))
    rgba = np.concatenate(
        [np.where(mask[..., None], image[..., :3], 0), mask[..., None] * 255], axis=2
    ).astype(np.float32)
    out = np.zeros((y1 - y0 + 2 * m, x1 - x0 + 2 * m, 4), np.float32)
    h, w = mask.shape
    sy0, sy1, sx0, sx1 = max(y0 - m, 0), min(y1 + m, h), max(x0 - m, 0), min(x1 + m, w)
    out[sy0 - (y0 - m) : sy1 - (y0 - m), sx0 - (x0 - m) : sx1 - (x0 - m)] = rgba[sy0:sy1, sx0:sx1]
    out[..., 3] /= 255
    return out


def _square(crop: np.ndarray, size: int) -> np.ndarray:
    """A crop centred on a square canvas, resized to ``size`` (defects of different shapes)."""
    h, w = crop.shape[:2]
    side = max(h, w)
    canvas = np.zeros((side, side, crop.shape[2]), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = crop
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (size, size), interpolation=interp)


def dihedral(crop: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / 90-degree turns of a crop (masks are augmented this way, masks.py)."""
    turns = [np.rot90(crop, k) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def crop_distance(a: np.ndarray, b: np.ndarray, size: int = 32) -> float:
    """Mean |a - b| (0-255, over RGB) over the union of two masked crops' masks.

    Crops of one shape are compared pixel for pixel, at their own resolution, so a copy
    is 0 and a fresh defect of the same shape differs by its own texture and noise;
    crops of different shapes are compared on square canvases resized to ``size``.
    """
    if a.shape != b.shape:
        a, b = _square(a, size), _square(b, size)
    union = np.maximum(a[..., 3], b[..., 3]) > 0.5
    if not union.any():
        return math.nan
    return float(np.abs(a[..., :3] - b[..., :3]).mean(axis=2)[union].mean())


def nearest_distance(
    crop: np.ndarray, references: list[np.ndarray], size: int = 32
) -> tuple[float, int]:
    """Distance to the nearest reference crop and its index (NaN, -1 with no references)."""
    if not references:
        return math.nan, -1
    d = [crop_distance(crop, r, size) for r in references]
    i = int(np.nanargmin(d)) if not all(math.isnan(v) for v in d) else -1
    return (d[i], i) if i >= 0 else (math.nan, -1)


# --------------------------------------------------------------------------- duplicates
def fingerprint(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A pair's image and mask at FINGERPRINT px; any covered pixel stays in the mask so
    thin defects survive."""
    size = (FINGERPRINT, FINGERPRINT)
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    cover = cv2.resize(np.asarray(mask, np.float32), size, interpolation=cv2.INTER_AREA)
    return small, cover > 0


def near_duplicates(
    prints: list[tuple[np.ndarray, np.ndarray]], iou_min: float, difference_max: float
) -> list[int]:
    """For each pair, the index of an earlier pair it nearly duplicates, else -1.

    Two pairs are near-duplicates when their masks overlap with IoU >= ``iou_min`` AND
    their images differ by at most ``difference_max`` (mean, 0-255) over the masks'
    union. Two pairs on one normal with different masks are not duplicates.
    """
    n = len(prints)
    out = [-1] * n
    if n < 2:
        return out
    masks = np.stack([m.reshape(-1) for _, m in prints]).astype(np.float32)
    inter = masks @ masks.T
    area = masks.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    for j in range(n):
        for i in np.flatnonzero(iou[:j, j] >= iou_min):
            both = prints[i][1] | prints[j][1]
            diff = np.abs(prints[i][0] - prints[j][0]).mean(axis=2)[both]
            if diff.size and float(diff.mean()) <= difference_max:
                out[j] = int(i)
                break
    return out


# --------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Bound:
    """One pair check: the column it reads and the threshold it must reach."""

    check: str
    column: str
    min_value: float | None
    label: str  # what the value is, for reasons and the report

    @property
    def enabled(self) -> bool:
        return self.min_value is not None

    def failed(self, value: Any) -> bool:
        """True when the value is below the floor; a NaN (skipped) value never fails."""
        if self.min_value is None or value is None or pd.isna(value):
            return False
        return float(value) < self.min_value


def pair_bounds(section: PairChecksSection) -> list[Bound]:
    """Every thresholded pair check, in report order (null thresholds included, disabled)."""
    return [
        Bound("background_psnr", "bg_psnr", section.psnr_min, "PSNR outside mask (dB)"),
        Bound("background_ssim", "bg_ssim", section.ssim_min, "SSIM outside mask"),
        Bound("anomaly_change", "change_inside", section.change_min, "mean change in mask"),
        Bound("anomaly_concentration", "concentration", section.concentration_min, "in/(out+1)"),
        Bound("mask_on_object", "fg_share", section.foreground_share_min, "mask share on object"),
        Bound(
            "no_memorisation",
            "fewshot_distance",
            section.memorisation_min,
            "distance to nearest few-shot defect",
        ),
    ]


DUPLICATE_CHECK = "no_duplicate"
READABLE_CHECK = "pair_readable"
CHECK_NAMES = (
    READABLE_CHECK,
    *(b.check for b in pair_bounds(PairChecksSection())),
    DUPLICATE_CHECK,
)


def _reason(bound: Bound, value: float) -> str:
    return f"{bound.check}: {bound.label} {value:.3g} < {bound.min_value:g}"


# --------------------------------------------------------------------------- one manifest
def _type_id(row: Any) -> str:
    return f"{row['dataset']}/{row['category']}/{row['anomaly_type']}"


def _read_pair(row: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(image, mask, normal) of a pair, or why it cannot be checked."""
    from anomaly_factory.images import read_mask, read_rgb

    try:
        image = read_rgb(str(row["image_path"]))
        normal = read_rgb(str(row["normal_path"]))
        mask = read_mask(str(row["mask_path"]), source="binary")
    except (OSError, ValueError, TypeError) as exc:
        return f"unreadable: {type(exc).__name__}"
    if not (image.shape[:2] == normal.shape[:2] == mask.shape):
        return (
            f"sizes differ: image {image.shape[:2]}, mask {mask.shape}, normal {normal.shape[:2]}"
        )
    if not mask.any():
        return "empty mask"
    return image, mask, normal


def _fewshot_rows(images: pd.DataFrame, type_id: str) -> pd.DataFrame:
    d, c, a = type_id.split("/")
    return images[
        (images["dataset"] == d)
        & (images["category"] == c)
        & (images["anomaly_type"] == a)
        & (images["split"] == "fewshot")
    ].sort_values("image_path")


def as_trained(
    image: np.ndarray, mask: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A few-shot image and mask at a pair's size, resized as generators train on them
    (bicubic image, nearest mask: ``magic/models.py``)."""
    from PIL import Image

    h, w = shape
    if image.shape[:2] == (h, w):
        return image, mask
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    return img, np.asarray(small) > 0


def fewshot_crops(
    images: pd.DataFrame, type_id: str, shape: tuple[int, int] | None = None
) -> tuple[list[np.ndarray], list[str]]:
    """Masked defect crops of the type's few-shot images in all 8 orientations, with the
    source path of each: at native size and, when ``shape`` is given, also at that size
    (a generator memorises its training images at its own resolution)."""
    from anomaly_factory.images import read_mask, read_rgb

    crops, sources = [], []
    for r in _fewshot_rows(images, type_id).itertuples(index=False):
        image, mask = read_rgb(str(r.image_path)), read_mask(str(r.mask_path))
        versions = [(image, mask)]
        if shape is not None and image.shape[:2] != tuple(shape):
            versions.append(as_trained(image, mask, shape))
        for img, m in versions:
            if not m.any():
                continue
            variants = dihedral(masked_crop(img, m))
            crops += variants
            sources += [str(r.image_path)] * len(variants)
    return crops, sources


def _check_type_rows(
    cfg: FactoryConfig, rows: pd.DataFrame, images: pd.DataFrame, type_id: str
) -> list[dict[str, Any]]:
    s = cfg.gates.pair_checks
    category, anomaly_type = type_id.split("/")[1:]
    rule = placement_rule(cfg, category, anomaly_type)
    references: dict[tuple[int, int], tuple[list[np.ndarray], list[str]]] = {}
    out, prints, print_rows = [], [], []
    for _, row in rows.iterrows():
        rec: dict[str, Any] = {"key": row["key"], "type_id": type_id, "status": OK}
        rec.update({b.column: math.nan for b in pair_bounds(s)})
        rec.update(placement=rule.status, foreground_method=rule.method, nearest_fewshot=None)
        rec["change_outside"] = math.nan
        read = _read_pair(row)
        if isinstance(read, str):
            rec["status"] = read
            out.append(rec)
            continue
        image, mask, normal = read
        rec.update(pixel_checks(image, mask, normal, s.dilation_px))
        if rule.applies:
            fg, status = normal_foreground(cfg, normal)
            if status == OK:
                rec["fg_share"] = foreground_share(mask, fg)
            else:
                rec["placement"] = f"foreground_{status}"
        if mask.shape not in references:  # pairs of a type usually share one size
            references[mask.shape] = fewshot_crops(images, type_id, mask.shape)
        shots, shot_sources = references[mask.shape]
        distance, i = nearest_distance(masked_crop(image, mask), shots, s.crop_size)
        rec["fewshot_distance"] = distance
        rec["nearest_fewshot"] = shot_sources[i] if i >= 0 else None
        prints.append(fingerprint(image, mask))
        print_rows.append(len(out))
        out.append(rec)
    for rec in out:
        rec["duplicate_of"] = None
    if s.duplicate_iou_min is not None:
        dup = near_duplicates(prints, s.duplicate_iou_min, s.duplicate_difference_max)
        for j, i in enumerate(dup):
            if i >= 0:
                out[print_rows[j]]["duplicate_of"] = out[print_rows[i]]["key"]
    return out


def judge(rec: dict[str, Any], section: PairChecksSection) -> list[str]:
    """The reasons one pair fails (empty when it passes)."""
    if rec["status"] != OK:
        return [f"{READABLE_CHECK}: {rec['status']}"]
    reasons = [_reason(b, rec[b.column]) for b in pair_bounds(section) if b.failed(rec[b.column])]
    if rec.get("duplicate_of"):
        reasons.append(f"{DUPLICATE_CHECK}: near-duplicate of {rec['duplicate_of']}")
    return reasons


COLUMNS = [
    "key",
    "type_id",
    "passed",
    "reasons",
    "status",
    "bg_psnr",
    "bg_ssim",
    "change_inside",
    "change_outside",
    "concentration",
    "fg_share",
    "placement",
    "foreground_method",
    "fewshot_distance",
    "nearest_fewshot",
    "duplicate_of",
]


def compute_pair_checks(
    cfg: FactoryConfig, pairs: pd.DataFrame, images: pd.DataFrame
) -> pd.DataFrame:
    """One row per pair: every check's value, ``passed`` and ``reasons`` (sorted by key).

    ``pairs`` is a pairs manifest (``image_path``, ``mask_path``, ``normal_path``,
    ``dataset``, ``category``, ``anomaly_type``); ``images`` the image manifest, whose
    ``fewshot`` rows are the memorisation references.
    """
    records: list[dict[str, Any]] = []
    if len(pairs):
        type_ids = pairs.apply(_type_id, axis=1)
        for tid in sorted(type_ids.unique()):
            rows = pairs[type_ids == tid].sort_values("key", kind="stable")
            records += _check_type_rows(cfg, rows, images, tid)
    for rec in records:
        reasons = judge(rec, cfg.gates.pair_checks)
        rec["passed"] = not reasons
        rec["reasons"] = "; ".join(reasons)
    table = pd.DataFrame(records, columns=COLUMNS)
    table["passed"] = table["passed"].astype(bool)
    for col in ("bg_psnr", "bg_ssim", "change_inside", "change_outside", "concentration"):
        table[col] = table[col].astype("float64")
    for col in ("fg_share", "fewshot_distance"):
        table[col] = table[col].astype("float64")
    return table.sort_values("key", kind="stable").reset_index(drop=True)


def pair_checks_for_manifest(
    cfg: FactoryConfig,
    pairs_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
) -> pd.DataFrame:
    """:func:`compute_pair_checks` from a pairs manifest and an image manifest on disk.

    >>> # table = pair_checks_for_manifest(cfg, "pairs.parquet", "manifest.parquet")
    >>> # table.groupby("type_id")["passed"].mean()   # pass rate per type
    """
    from anomaly_factory.gates.run import read_pairs_lenient
    from anomaly_factory.manifest import read_images

    return compute_pair_checks(cfg, read_pairs_lenient(pairs_path), read_images(manifest_path))


def failure_counts(table: pd.DataFrame, checks: Iterable[str] = CHECK_NAMES) -> dict[str, int]:
    """How many pairs each check failed (from the ``reasons`` text)."""
    reasons = table["reasons"].fillna("") if len(table) else pd.Series(dtype=str)
    return {c: int(reasons.str.contains(f"(?:^|; ){c}:", regex=True).sum()) for c in checks}


def write_pair_checks(table: pd.DataFrame, out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir/pair_checks.parquet``, written atomically."""
    path = Path(out_dir) / PAIR_CHECKS_FILE
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path
