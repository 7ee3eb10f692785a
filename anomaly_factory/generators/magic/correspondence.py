"""Dense semantic correspondence for context-aware mask alignment (MAGIC §3.4, step 3).

The paper matches keypoints by the argmax of cosine similarity between dense
GeoAware-SC features (Stable Diffusion + DINOv2). Two extractors are pluggable:

* ``gradient`` (default, weight-free, CPU): rotation-invariant descriptors on a
  grid. Around each cell, concentric rings (radii a fraction of the image) each
  give their mean Lab colour, mean gradient magnitude and the magnitudes of the
  first harmonics of their gradient-orientation histogram. An in-plane rotation
  circularly shifts an orientation histogram, which leaves the magnitude of its
  Fourier coefficients unchanged, so the descriptor of a point on an object does
  not depend on the object's pose; the large rings say *where* on the object it is.
* ``dinov2``: patch tokens of ``transformers.Dinov2Model`` from a Hugging Face id
  (``facebook/dinov2-small``) or a local folder.

**Coordinates.** A :class:`FeatureMap` covers its image exactly: grid cell
``(i, j)`` spans ``[j*sx, (j+1)*sx) x [i*sy, (i+1)*sy)`` in continuous image
coordinates (pixel ``k`` spans ``[k, k+1)``), with ``sx = W / Wf``. Extractors
resize the *whole* image to ``(Wf*p, Hf*p)`` for a patch/stride ``p``, so this
holds whatever the extractor's working size, and every lookup goes through
:meth:`FeatureMap.to_grid` / :meth:`FeatureMap.to_image`. The public code computes
matches at 480 px and applies them at 512 px; here a point can only be mapped
through the map that produced it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

FeatureMethod = Literal["gradient", "dinov2"]
FEATURE_METHODS: tuple[str, ...] = ("gradient", "dinov2")

ORIENTATION_BINS = 8  # 45° bins; harmonics 1..3 of 8 bins carry the orientation structure
HARMONICS = 3
RING_RADII = (0.02, 0.05, 0.1, 0.2, 0.35)  # fractions of the long side: local -> object-scale
EPS = 1e-8
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --------------------------------------------------------------------------- feature map
@dataclass(frozen=True)
class FeatureMap:
    """L2-normalised descriptors ``(Hf, Wf, C)`` covering an ``(H, W)`` image exactly."""

    features: np.ndarray
    image_size: tuple[int, int]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.features.shape[0], self.features.shape[1]

    @property
    def stride(self) -> tuple[float, float]:
        """(sy, sx): image pixels per grid cell along y and x."""
        (h, w), (hf, wf) = self.image_size, self.grid_size
        return h / hf, w / wf

    def to_grid(self, xy: np.ndarray) -> np.ndarray:
        """Image pixel coordinates (x, y; pixel centres at integers) -> continuous grid coords."""
        sy, sx = self.stride
        xy = np.asarray(xy, np.float64)
        return np.stack([(xy[..., 0] + 0.5) / sx - 0.5, (xy[..., 1] + 0.5) / sy - 0.5], -1)

    def to_image(self, grid_xy: np.ndarray) -> np.ndarray:
        """Grid coordinates (column, row; cell centres at integers) -> image pixel coordinates."""
        sy, sx = self.stride
        g = np.asarray(grid_xy, np.float64)
        return np.stack([(g[..., 0] + 0.5) * sx - 0.5, (g[..., 1] + 0.5) * sy - 0.5], -1)

    def cell_centers(self) -> np.ndarray:
        """Pixel coordinates ``(Hf, Wf, 2)`` (x, y) of every cell's centre."""
        hf, wf = self.grid_size
        gy, gx = np.mgrid[0:hf, 0:wf]
        return self.to_image(np.stack([gx, gy], -1))

    def sample(self, xy: np.ndarray) -> np.ndarray:
        """Bilinearly interpolated, re-normalised descriptors ``(N, C)`` at pixel points."""
        g = self.to_grid(np.atleast_2d(xy))
        hf, wf = self.grid_size
        gx = np.clip(g[:, 0], 0, wf - 1)
        gy = np.clip(g[:, 1], 0, hf - 1)
        x0, y0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
        x1, y1 = np.minimum(x0 + 1, wf - 1), np.minimum(y0 + 1, hf - 1)
        fx, fy = (gx - x0)[:, None], (gy - y0)[:, None]
        f = self.features
        out = (
            f[y0, x0] * (1 - fx) * (1 - fy)
            + f[y0, x1] * fx * (1 - fy)
            + f[y1, x0] * (1 - fx) * fy
            + f[y1, x1] * fx * fy
        )
        return _l2(out)


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)).astype(np.float32)


def best_match(
    query: np.ndarray, target: FeatureMap, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, float] | None:
    """Pixel (x, y) of the target cell most cosine-similar to ``query``, and the similarity.

    ``allowed`` (bool, target image size) restricts the search to cells whose centre
    pixel is allowed; ``None`` when no cell is.
    """
    sims = target.features @ np.asarray(query, np.float32).reshape(-1)
    centers = target.cell_centers()
    if allowed is not None:
        h, w = target.image_size
        cx = np.clip(np.round(centers[..., 0]).astype(int), 0, w - 1)
        cy = np.clip(np.round(centers[..., 1]).astype(int), 0, h - 1)
        ok = allowed[cy, cx]
        if not ok.any():
            return None
        sims = np.where(ok, sims, -np.inf)
    i, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
    return centers[i, j], float(sims[i, j])


# --------------------------------------------------------------------------- extractors
class FeatureExtractor(Protocol):
    name: str

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[FeatureMap, FeatureMap]:
        """Comparable feature maps of two HxWx3 uint8 images."""


def _grid_shape(h: int, w: int, resolution: int, patch: int) -> tuple[int, int]:
    """Grid (rows, cols) for an image whose long side is resized to about ``resolution``."""
    scale = resolution / max(h, w)
    return max(1, round(h * scale / patch)), max(1, round(w * scale / patch))


def _disc(radius: float) -> np.ndarray:
    r = max(1, int(np.ceil(radius)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    k = (xx**2 + yy**2 <= radius**2 + 0.5).astype(np.float32)
    return k / k.sum()


class GradientFeatures:
    """Weight-free rotation-invariant ring descriptors (see module docstring)."""

    name = "gradient"

    def __init__(self, resolution: int = 128, stride: int = 4):
        self.resolution = resolution
        self.stride = stride

    def raw(self, image: np.ndarray) -> np.ndarray:
        """Unnormalised descriptors ``(Hf, Wf, C)``; the grid covers the whole image."""
        h, w = image.shape[:2]
        hf, wf = _grid_shape(h, w, self.resolution, self.stride)
        work = cv2.resize(image, (wf * self.stride, hf * self.stride), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(work, cv2.COLOR_RGB2LAB).astype(np.float32)
        smooth = cv2.GaussianBlur(lab, (0, 0), 1.0)
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
        strongest = np.argmax(gx**2 + gy**2, axis=-1)[..., None]  # colour edge: strongest channel
        gx = np.take_along_axis(gx, strongest, -1)[..., 0]
        gy = np.take_along_axis(gy, strongest, -1)[..., 0]
        mag = np.sqrt(gx**2 + gy**2)
        ang = np.arctan2(gy, gx)
        width = 2 * np.pi / ORIENTATION_BINS
        centres = np.arange(ORIENTATION_BINS) * width
        diff = np.abs(np.angle(np.exp(1j * (ang[..., None] - centres))))
        hist = mag[..., None] * np.clip(1 - diff / width, 0, None)  # soft binning
        channels = np.concatenate([lab, mag[..., None], hist], -1).astype(np.float32)
        long_side = max(work.shape[:2])
        rings, prev_sum, prev_area = [], None, 0.0
        for frac in RING_RADII:
            kernel = _disc(frac * long_side)
            area = float((kernel > 0).sum())
            disc = cv2.filter2D(channels, -1, kernel, borderType=cv2.BORDER_REFLECT)
            total = disc * area
            # annulus mean: the difference of two disc sums over the difference of areas
            ring = disc if prev_sum is None else (total - prev_sum) / max(area - prev_area, 1.0)
            prev_sum, prev_area = total, area
            spectrum = np.abs(np.fft.fft(ring[..., 4:], axis=-1))[..., 1 : HARMONICS + 1]
            rings.append(np.concatenate([ring[..., :4], spectrum], -1))
        dense = np.concatenate(rings, -1)
        return cv2.resize(dense, (wf, hf), interpolation=cv2.INTER_AREA).reshape(hf, wf, -1)

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[FeatureMap, FeatureMap]:
        """Descriptors of both images, standardised per channel over the pair, then L2-normalised.

        Joint standardisation puts colour, gradient and orientation channels on one
        scale and removes what both images share, so cosine similarity contrasts.
        """
        fa, fb = self.raw(a), self.raw(b)
        both = np.concatenate([fa.reshape(-1, fa.shape[-1]), fb.reshape(-1, fb.shape[-1])])
        mean, std = both.mean(0), both.std(0) + 1e-3
        return (
            FeatureMap(_l2((fa - mean) / std), a.shape[:2]),
            FeatureMap(_l2((fb - mean) / std), b.shape[:2]),
        )


class Dinov2Features:
    """DINOv2 patch tokens (``transformers.Dinov2Model``) from a HF id or local folder."""

    name = "dinov2"

    def __init__(self, source: str, resolution: int = 448, device: str = "cpu"):
        import torch
        from transformers import Dinov2Model

        try:
            self.model = Dinov2Model.from_pretrained(source).eval()
        except OSError as exc:
            raise ValueError(
                f"cama.features_model: cannot load DINOv2 from {source!r} (Hugging Face id or "
                f"local folder; offline runs need it in the local cache): {exc}"
            ) from exc
        self.device = torch.device(device)
        self.model.to(self.device)
        self.patch = int(self.model.config.patch_size)
        self.resolution = resolution
        self.skip = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def extract(self, image: np.ndarray) -> FeatureMap:
        import torch

        h, w = image.shape[:2]
        hf, wf = _grid_shape(h, w, self.resolution, self.patch)
        work = cv2.resize(image, (wf * self.patch, hf * self.patch), interpolation=cv2.INTER_AREA)
        x = (work.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        t = torch.from_numpy(x).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad():
            tokens = self.model(pixel_values=t).last_hidden_state[0, self.skip :]
        feats = tokens.float().cpu().numpy().reshape(hf, wf, -1)
        return FeatureMap(_l2(feats), (h, w))

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[FeatureMap, FeatureMap]:
        return self.extract(a), self.extract(b)


@functools.lru_cache(maxsize=4)
def load_extractor(
    method: str,
    model: str | None = None,
    resolution: int = 128,
    stride: int = 4,
    device: str = "cpu",
) -> FeatureExtractor:
    """A feature extractor, loaded once per setting (DINOv2 weights are heavy)."""
    if method == "gradient":
        return GradientFeatures(resolution, stride)
    if method == "dinov2":
        if not model:
            raise ValueError("cama.features_model: required when cama.features is 'dinov2'")
        return Dinov2Features(model, resolution, device)
    raise ValueError(f"cama.features: {method!r} is not one of {list(FEATURE_METHODS)}")
