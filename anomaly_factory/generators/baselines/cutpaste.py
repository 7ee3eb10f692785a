"""CutPaste anomalies (Li et al., CVPR 2021, §3.1).

A rectangle of the normal image (area ratio in [area_min, area_max], aspect ratio
log-uniform in [1/aspect_max, aspect_max]) is cut, colour-jittered, optionally rotated
and pasted at a random place of the same image. The mask is the pasted region.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from anomaly_factory.config import CutPasteSection
from anomaly_factory.errors import InputError
from anomaly_factory.generators.base import GenerationRequest, ProgressFn, Untrained
from anomaly_factory.generators.baselines.common import Synthesize, generate_baseline_pairs

GENERATOR = "cutpaste"


def _jitter(patch: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Brightness, contrast and saturation jitter by factors in [1 - amount, 1 + amount]."""
    b, c, s = rng.uniform(1 - amount, 1 + amount, 3)
    x = patch.astype(np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * s + gray
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _rotate(patch: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a patch on an enlarged canvas; return it and its coverage mask."""
    h, w = patch.shape[:2]
    rad = math.radians(angle)
    cw = int(math.ceil(abs(w * math.cos(rad)) + abs(h * math.sin(rad))))
    ch = int(math.ceil(abs(w * math.sin(rad)) + abs(h * math.cos(rad))))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[0, 2] += (cw - w) / 2
    m[1, 2] += (ch - h) / 2
    flags = {"flags": cv2.INTER_NEAREST, "borderMode": cv2.BORDER_CONSTANT, "borderValue": 0}
    rotated = cv2.warpAffine(patch, m, (cw, ch), **flags)
    cover = cv2.warpAffine(np.ones((h, w), np.uint8), m, (cw, ch), **flags) > 0
    return rotated, cover


def cutpaste_anomaly(
    normal: np.ndarray, rng: np.random.Generator, settings: CutPasteSection
) -> tuple[np.ndarray, np.ndarray]:
    """One CutPaste anomaly on ``normal`` (uint8 HxWx3): the image and its bool mask."""
    h, w = normal.shape[:2]
    area = rng.uniform(settings.area_min, settings.area_max) * h * w
    aspect = math.exp(rng.uniform(-math.log(settings.aspect_max), math.log(settings.aspect_max)))
    ph = int(np.clip(round(math.sqrt(area * aspect)), 1, h - 1))
    pw = int(np.clip(round(math.sqrt(area / aspect)), 1, w - 1))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = _jitter(normal[y0 : y0 + ph, x0 : x0 + pw], rng, settings.jitter)
    angle = float(rng.uniform(-settings.rotation_deg, settings.rotation_deg))
    patch, cover = _rotate(patch, angle) if settings.rotation_deg > 0 else (patch, None)
    if cover is None:
        cover = np.ones(patch.shape[:2], bool)
    # a rotated patch may outgrow the image: crop it to fit
    patch, cover = patch[:h, :w], cover[:h, :w]
    qh, qw = cover.shape
    y1, x1 = int(rng.integers(0, h - qh + 1)), int(rng.integers(0, w - qw + 1))
    image = normal.copy()
    region = image[y1 : y1 + qh, x1 : x1 + qw]
    region[cover] = patch[cover]
    mask = np.zeros((h, w), bool)
    mask[y1 : y1 + qh, x1 : x1 + qw] = cover
    return image, mask


def _synthesizer(settings: CutPasteSection) -> Callable[[pd.DataFrame, pd.DataFrame], Synthesize]:
    def make(manifest: pd.DataFrame, normals: pd.DataFrame) -> Synthesize:
        del manifest, normals
        return lambda normal, rng, seed: cutpaste_anomaly(normal, rng, settings)

    return make


class CutPaste(Untrained):
    """CutPaste's pasted patches (the baseline MAGIC is compared with)."""

    name = GENERATOR

    def generate(self, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path:
        """Write ``request.n_pairs`` pairs labelled ``request.anomaly_type``; returns
        ``pairs.parquet``."""
        settings = request.cfg.baselines.cutpaste
        if settings.area_min > settings.area_max:
            raise InputError(
                f"baselines.cutpaste.area_min: {settings.area_min} is > area_max {settings.area_max}"
            )
        return generate_baseline_pairs(
            request, GENERATOR, "cutpaste", _synthesizer(settings), on_pair
        )
