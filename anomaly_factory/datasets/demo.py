"""A small procedural industrial dataset in MVTec-AD layout (the embedded default).

Two texture categories (woven carpet, tiles) and two object categories (a hex
nut and a threaded bar) placed at random positions and rotations on a
background, so that mask placement matters. Each category has two anomaly types
that look clearly different. Masks are pixel-exact: a defect is painted only on
the pixels of its mask. Everything is deterministic from the seed.

>>> from anomaly_factory.datasets.demo import render_category
>>> img, mask = render_category("nut_demo", "scratch", size=64, seed=0, index=0)
>>> img.shape, mask.dtype, bool(mask.any())
((64, 64, 3), dtype('bool'), True)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from anomaly_factory.errors import InputError
from anomaly_factory.io import save_png

Image = np.ndarray
Rng = np.random.Generator

ANOMALY_TYPES: dict[str, tuple[str, ...]] = {
    "carpet_demo": ("stain", "cut"),
    "tile_demo": ("crack", "missing"),
    "nut_demo": ("scratch", "rust"),
    "bar_demo": ("crack", "spot"),
}
TEXTURES = ("carpet_demo", "tile_demo")
MAX_REDRAWS = 20  # clipping to the object can empty a mask; redraw until it doesn't
MIN_DEFECT_PIXELS = 4  # smaller defects are invisible at the demo's sizes


# --------------------------------------------------------------------------- normals
def _carpet(size: int, rng: Rng) -> tuple[Image, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(xx * 0.9 + phase[0]) * np.sin(yy * 0.9 + phase[1])
    noise = rng.normal(0, 6, (size, size))
    base = np.array([150, 110, 80], np.float32) + rng.normal(0, 4, 3)
    img = base[None, None, :] + (18 * weave + noise)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), np.ones((size, size), bool)


def _tiles(size: int, rng: Rng) -> tuple[Image, np.ndarray]:
    period = size // 4
    off = rng.integers(0, period, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    grout = ((xx + off[0]) % period < 2) | ((yy + off[1]) % period < 2)
    img = np.full((size, size, 3), 200, np.float32) + rng.normal(0, 5, (size, size, 1))
    img[grout] = (90, 90, 95)
    return np.clip(img, 0, 255).astype(np.uint8), np.ones((size, size), bool)


def _place(size: int, rng: Rng, margin: float) -> tuple[tuple[float, float], float]:
    lo, hi = size * margin, size * (1 - margin)
    return (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))), float(rng.uniform(0, 360))


def _background(size: int, rng: Rng) -> Image:
    img = np.full((size, size, 3), 40, np.float32) + rng.normal(0, 3, (size, size, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _nut(size: int, rng: Rng) -> tuple[Image, np.ndarray]:
    img = _background(size, rng)
    (cx, cy), angle = _place(size, rng, 0.3)
    r = size * 0.22
    theta = np.deg2rad(angle) + np.arange(6) * np.pi / 3
    hexagon = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], 1).round().astype(np.int32)
    fg = np.zeros((size, size), np.uint8)
    cv2.fillPoly(fg, [hexagon], 1)
    cv2.circle(fg, (round(cx), round(cy)), round(r * 0.45), 0, -1)
    shade = np.array([170, 175, 180], np.float32) + rng.normal(0, 3, (size, size, 3))
    img[fg > 0] = np.clip(shade[fg > 0], 0, 255).astype(np.uint8)
    return img, fg > 0


def _bar(size: int, rng: Rng) -> tuple[Image, np.ndarray]:
    img = _background(size, rng)
    (cx, cy), angle = _place(size, rng, 0.35)
    box = ((cx, cy), (size * 0.6, size * 0.16), angle)
    pts = cv2.boxPoints(box).round().astype(np.int32)
    fg = np.zeros((size, size), np.uint8)
    cv2.fillPoly(fg, [pts], 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = np.deg2rad(angle)
    along = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    thread = 25 * np.sin(along * 1.2)
    body = np.array([200, 170, 90], np.float32)[None, None] + thread[..., None]
    img[fg > 0] = np.clip(body[fg > 0], 0, 255).astype(np.uint8)
    return img, fg > 0


NORMALS: dict[str, Callable[[int, Rng], tuple[Image, np.ndarray]]] = {
    "carpet_demo": _carpet,
    "tile_demo": _tiles,
    "nut_demo": _nut,
    "bar_demo": _bar,
}


# --------------------------------------------------------------------------- defects
DefectMask = Callable[[np.ndarray, Rng], np.ndarray]  # (foreground, rng) -> bool mask


def _scale(region: np.ndarray) -> int:
    """The length defect sizes are relative to: the image's short side."""
    return min(region.shape[:2])


def _point_in(region: np.ndarray, rng: Rng, margin: int) -> tuple[int, int]:
    inner = cv2.erode(region.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
    ys, xs = np.nonzero(inner if inner.any() else region)
    i = rng.integers(len(xs))
    return int(xs[i]), int(ys[i])


def _line_mask(region: np.ndarray, rng: Rng, length: float, width: int) -> np.ndarray:
    x, y = _point_in(region, rng, 3)
    a = rng.uniform(0, np.pi)
    dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
    m = np.zeros(region.shape, np.uint8)
    cv2.line(m, (round(x - dx), round(y - dy)), (round(x + dx), round(y + dy)), 1, width)
    return m > 0


def _crack_mask(region: np.ndarray, rng: Rng) -> np.ndarray:
    x, y = _point_in(region, rng, 3)
    pts = [(x, y)]
    a = rng.uniform(0, 2 * np.pi)
    for _ in range(4):
        a += rng.uniform(-0.8, 0.8)
        step = _scale(region) * 0.06
        x, y = x + step * np.cos(a), y + step * np.sin(a)
        pts.append((x, y))
    m = np.zeros(region.shape, np.uint8)
    cv2.polylines(m, [np.array(pts).round().astype(np.int32)], False, 1, 2)
    return m > 0


def _blob_mask(region: np.ndarray, rng: Rng, radius: float) -> np.ndarray:
    x, y = _point_in(region, rng, int(radius // 2))
    m = np.zeros(region.shape, np.uint8)
    for _ in range(3):
        ox, oy = rng.normal(0, radius / 3, 2)
        axes = (
            max(2, round(rng.uniform(0.5, 1) * radius)),
            max(2, round(rng.uniform(0.4, 0.8) * radius)),
        )
        cv2.ellipse(m, (round(x + ox), round(y + oy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    return m > 0


def _line(length: float) -> DefectMask:
    return lambda fg, rng: _line_mask(fg, rng, _scale(fg) * length, 2)


def _blob(radius: float) -> DefectMask:
    return lambda fg, rng: _blob_mask(fg, rng, _scale(fg) * radius)


# what each defect type looks like: how its mask is drawn (sizes relative to the image's
# short side), its colour and its opacity
DEFECTS: dict[str, tuple[DefectMask, tuple[int, int, int], float]] = {
    "stain": (_blob(0.09), (60, 40, 30), 0.7),
    "cut": (_line(0.25), (235, 235, 225), 0.85),
    "scratch": (_line(0.25), (235, 235, 225), 0.85),
    "crack": (_crack_mask, (20, 20, 20), 0.9),
    "missing": (_blob(0.08), (90, 90, 95), 1.0),
    "rust": (_blob(0.06), (140, 70, 20), 0.8),
    "spot": (_blob(0.05), (40, 120, 200), 0.8),
}


def _check_type(category: str, anomaly_type: str) -> None:
    if category not in NORMALS:
        raise InputError(f"unknown demo category {category!r}; known: {sorted(NORMALS)}")
    if anomaly_type not in ANOMALY_TYPES[category]:
        raise InputError(
            f"{category}: unknown anomaly type {anomaly_type!r}; known: {ANOMALY_TYPES[category]}"
        )


def defect_mask(category: str, anomaly_type: str, foreground: np.ndarray, rng: Rng) -> np.ndarray:
    """A fresh defect mask (bool HxW) of a type, drawn on ``foreground`` and clipped to it.

    The mask may come out empty when clipping removes it; callers redraw (see
    ``render_category``). ``foreground`` is the object (all True for textures).

    >>> fg = np.zeros((64, 64), bool); fg[16:48, 16:48] = True
    >>> m = defect_mask("nut_demo", "rust", fg, np.random.default_rng(0))
    >>> bool(m.any()), bool((m & ~fg).any())
    (True, False)
    """
    _check_type(category, anomaly_type)
    foreground = np.asarray(foreground, bool)
    draw = DEFECTS[anomaly_type][0]
    return draw(foreground, rng) & foreground  # defects stay on the object


def paint_defect(
    category: str, anomaly_type: str, image: Image, mask: np.ndarray, rng: Rng
) -> Image:
    """A copy of ``image`` (any HxWx3 uint8) with the true defect of a type painted on ``mask``.

    Only the mask's pixels change: the demo's defects are pixel-exact, which is what
    makes the demo an oracle for the gates.
    """
    _check_type(category, anomaly_type)
    _, color, alpha = DEFECTS[anomaly_type]
    mask = np.asarray(mask, bool)
    out = np.array(image, np.uint8, copy=True)
    noise = rng.normal(0, 4, (int(mask.sum()), 3))
    mixed = (1 - alpha) * out[mask].astype(np.float32) + alpha * np.array(color) + noise
    out[mask] = np.clip(mixed, 0, 255).astype(np.uint8)
    return out


def render_category(
    category: str, anomaly_type: str, size: int, seed: int, index: int
) -> tuple[Image, np.ndarray]:
    """One image (HxWx3 uint8) and its defect mask (bool, all False for ``good``)."""
    if category not in NORMALS:
        raise InputError(f"unknown demo category {category!r}; known: {sorted(NORMALS)}")
    types = ("good", *ANOMALY_TYPES[category])
    code = types.index(anomaly_type) if anomaly_type in types else -1
    if code < 0:
        raise InputError(f"{category}: unknown anomaly type {anomaly_type!r}; known: {types}")
    cat_code = list(NORMALS).index(category)
    rng = np.random.default_rng([seed, cat_code, code, index])
    img, fg = NORMALS[category](size, rng)
    if anomaly_type == "good":
        return img, np.zeros(fg.shape, bool)
    for _ in range(MAX_REDRAWS):
        mask = defect_mask(category, anomaly_type, fg, rng)
        candidate = paint_defect(category, anomaly_type, img, mask, rng)
        if mask.sum() >= MIN_DEFECT_PIXELS:
            return candidate, mask
    raise RuntimeError(f"{category}/{anomaly_type}: could not place a defect")


def foreground(
    category: str, size: int, seed: int, index: int, anomaly_type: str = "good"
) -> np.ndarray:
    """The object's exact foreground for an image (all True for textures)."""
    types = ("good", *ANOMALY_TYPES[category])
    rng = np.random.default_rng(
        [seed, list(NORMALS).index(category), types.index(anomaly_type), index]
    )
    return NORMALS[category](size, rng)[1]


def build_demo(
    root: Path,
    seed: int = 0,
    size: int = 128,
    n_train: int = 50,
    n_test_good: int = 8,
    n_per_type: int = 12,
    categories: list[str] | None = None,
) -> Path:
    """Write the demo dataset in MVTec-AD layout under ``root``; skip it if complete."""
    root = Path(root)
    marker = root / ".complete"
    stamp = f"{seed},{size},{n_train},{n_test_good},{n_per_type},{categories}"
    if marker.exists() and marker.read_text() == stamp:
        return root
    for cat in categories or list(NORMALS):
        jobs = [("train", "good", n_train), ("test", "good", n_test_good)]
        jobs += [("test", t, n_per_type) for t in ANOMALY_TYPES[cat]]
        for split, kind, count in jobs:
            for i in range(count):
                img, mask = render_category(
                    cat, kind, size, seed, i + (1000 if split == "test" else 0)
                )
                save_png(root / cat / split / kind / f"{i:03d}.png", img)
                if kind != "good":
                    save_png(
                        root / cat / "ground_truth" / kind / f"{i:03d}_mask.png",
                        mask.astype(np.uint8) * 255,
                    )
    marker.write_text(stamp)
    return root
