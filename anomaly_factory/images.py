"""The one home for reading images and masks: every reader in the package goes through here.

**Images** are read as RGB uint8 (grayscale MVTec categories such as grid, screw
and zipper become three equal channels) and optionally resized to ``size`` x
``size`` by a named rule, each the one its callers used before this module
existed (so their outputs stay byte-identical):

* ``bicubic`` (PIL): the diffusion models' input, as diffusers' image processor;
* ``bilinear`` (PIL): the detectors' input;
* ``area`` (OpenCV ``INTER_AREA``): the baseline generators' normals.

**Masks** are binarised by where they come from (CONTEXT §4), never by one
global rule:

* ``dataset``: ground truth of an ingested benchmark. MVTec-AD stores 0/255,
  MVTec 3D-AD per-type values (``> 0``), VisA label indices 1..n (``!= 0``): any
  non-zero raw value is defect. Palette images are read as their indices, so a
  label whose palette colour is dark still counts.
* ``folder``: a mask folder of AnomalyDiffusion's generator (the public MAGIC
  release's 504 masks per type). Those are 8-bit JPEGs whose compression ringing
  leaves small non-zero values around every mask; with ``> 0`` they come out on
  average 2.6 times too large (issue 16), so they need ``> 127``, as the official
  code reads them.
* ``binary``: masks this project wrote itself (0/255 PNG): ``> 127``.

>>> import numpy as np, tempfile, os
>>> from anomaly_factory.io import save_png
>>> path = os.path.join(tempfile.mkdtemp(), "m.png")
>>> _ = save_png(path, np.array([[0, 1], [2, 255]], np.uint8))
>>> read_mask(path, source="dataset").tolist(), read_mask(path, source="folder").tolist()
([[False, True], [True, True]], [[False, False], [False, True]])
"""

from __future__ import annotations

import os
from typing import Literal

import cv2
import numpy as np
from PIL import Image

Resample = Literal["bicubic", "bilinear", "area", "nearest"]
MaskSource = Literal["dataset", "folder", "binary"]

# Binarisation per mask source: a pixel is defect when its value is > the threshold.
MASK_THRESHOLDS: dict[str, int] = {"dataset": 0, "folder": 127, "binary": 127}
_PIL_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
PathLike = str | os.PathLike[str]


class ImageReadError(FileNotFoundError, ValueError):
    """An image or mask file is missing or cannot be decoded; the message names the file.

    Both a ``FileNotFoundError`` and a ``ValueError``, since the readers it replaced
    raised one or the other and their callers catch them.
    """


def _open(path: PathLike, what: str) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
    except (FileNotFoundError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot read {what}: {exc}") from exc
    return im


def _check_resample(resample: str) -> None:
    if resample not in (*_PIL_RESAMPLE, "area"):
        raise ValueError(f"resample: {resample!r} is not one of {[*_PIL_RESAMPLE, 'area']}")


# --------------------------------------------------------------------------- images
def read_rgb(path: PathLike, size: int | None = None, resample: Resample = "bicubic") -> np.ndarray:
    """An image as uint8 HxWx3, resized to ``size`` x ``size`` by ``resample`` when given."""
    _check_resample(resample)
    with _open(path, "image") as im:
        rgb = im.convert("RGB")
        if size is None or rgb.size == (size, size):
            return np.asarray(rgb)
        if resample == "area":
            return cv2.resize(np.asarray(rgb), (size, size), interpolation=cv2.INTER_AREA)
        return np.asarray(rgb.resize((size, size), _PIL_RESAMPLE[resample]))


def rgb_to_tensor(image: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)):
    """uint8 HxWx3 -> float32 CxHxW tensor in ``value_range`` (SD: [-1, 1]; detectors: [0, 1])."""
    import torch

    lo, hi = value_range
    if (lo, hi) == (-1.0, 1.0):  # the exact arithmetic of the former SD reader
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if (lo, hi) == (0.0, 1.0):  # the exact arithmetic of the former detector reader
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    arr = np.asarray(image, dtype=np.float32) / 255.0 * (hi - lo) + lo
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- masks
def mask_threshold(source: str) -> int:
    """The binarisation threshold of a mask source (defect = value > threshold)."""
    try:
        return MASK_THRESHOLDS[source]
    except KeyError:
        raise ValueError(
            f"mask source: {source!r} is not one of {sorted(MASK_THRESHOLDS)}"
        ) from None


def binarize_mask(values: np.ndarray, threshold: int) -> np.ndarray:
    """Bool HxW from raw mask values (HxW, or HxWxC where any channel counts)."""
    values = np.asarray(values)
    if values.ndim == 3:
        values = values.max(axis=2)
    return values > threshold


def _raw_mask_values(im: Image.Image, source: str) -> np.ndarray:
    """The values to threshold: stored values (label indices for palette images) for
    dataset masks (the brightest channel of a colour one), 8-bit grey levels for the rest."""
    if source != "dataset":
        return np.asarray(im.convert("L"))
    if im.mode in ("1", "L", "P", "I", "I;16", "F"):
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))  # binarize_mask takes the channel maximum


def read_mask(
    path: PathLike,
    size: int | None = None,
    *,
    source: MaskSource = "dataset",
    threshold: int | None = None,
) -> np.ndarray:
    """A mask as bool HxW, binarised by its ``source`` (or an explicit ``threshold``).

    With ``size`` it is resized to ``size`` x ``size`` by nearest neighbour after
    binarising, which equals thresholding the nearest-resized grey levels.
    """
    rule = mask_threshold(source) if threshold is None else threshold
    with _open(path, "mask") as im:
        mask = binarize_mask(_raw_mask_values(im, source), rule)
    if size is not None and mask.shape != (size, size):
        mask = resize_mask_nearest(mask, size)
    return mask


def resize_mask_keep_thin(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to ``size`` (side, or (H, W)) so that thin defects survive.

    A cell (output pixel) is in the mask when the mask covers at least half of it,
    or when it holds any pixel of a part thinner than a cell (what an opening with a
    cell-sized disc removes). Blobs keep their area; a 6-px scratch on a 1024-px
    MVTec screw, which nearest-neighbour sampling at 32 or 64 px drops entirely,
    stays a connected line of cells. Upsampling is the area rule alone.
    """
    h, w = (size, size) if isinstance(size, int) else size
    mask = np.asarray(mask, bool)
    if mask.shape == (h, w):
        return mask.copy()
    cover = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    out = cover >= 0.5
    cell = max(mask.shape[0] / h, mask.shape[1] / w)
    k = int(round(cell))
    if k >= 2 and mask.any():
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        thick = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disc) > 0
        thin = (mask & ~thick).astype(np.float32)
        # more than half a pixel row of the cell: a 1-px line counts, rounding slivers do not
        out |= cv2.resize(thin, (w, h), interpolation=cv2.INTER_AREA) > 0.5 / k
    return out


def resize_mask_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` x ``size`` (PIL's pixel choice)."""
    img = Image.fromarray(np.asarray(mask, np.uint8) * 255)
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST)) > 127
