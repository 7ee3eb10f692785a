"""The one home for reading images and masks: every reader in the package goes through here.

**Images** are read as RGB uint8 (grayscale MVTec categories such as grid, screw
and zipper become three equal channels) and optionally resized to ``size`` x
``size`` by a named rule, each the one its callers used before this module
existed (so their outputs stay byte-identical). Every other encoding is converted
explicitly, never clipped (PIL's own ``convert("RGB")`` turns a 16-bit image white):

* 16-bit grey (``I;16``, ``I``): scaled, ``round(v * 255 / 65535)``; 16-bit colour
  PNGs are already reduced to their high byte by Pillow;
* palette: its colours; alpha (RGBA, LA, palette transparency): composited over
  black (ingest refuses transparent images unless ``datasets.alpha: composite``);
* 32-bit float and other modes: refused with the file named.

Files are refused (``ImageReadError``, naming the file) when they cannot be decoded,
when a PNG lacks its end marker (a cut-off copy) and when the header claims more
than ``MAX_PIXELS`` (a decompression bomb), before anything is decoded.

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
import warnings
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from anomaly_factory.errors import InputError

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
# Pillow's own decompression-bomb threshold (~89 Mpx); benchmark images are <= 2.5 Mpx
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
CONVERTIBLE = ("RGB", "L", "1", "P", "CMYK", "YCbCr", *GREY_16, *ALPHA_MODES)


class ImageReadError(InputError, FileNotFoundError):
    """An image or mask file is missing, cannot be decoded or has an encoding that is
    refused; the message names the file.

    Both a ``FileNotFoundError`` and a ``ValueError``, since the readers it replaced
    raised one or the other and their callers catch them.
    """


def _check_png_end(path: PathLike, im: Image.Image) -> None:
    """Pillow decodes a PNG whose end marker is cut off; a complete file ends with IEND."""
    if im.format != "PNG" or not isinstance(path, str | os.PathLike):
        return
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - len(PNG_END)))
        if f.read() != PNG_END:
            raise ImageReadError(f"{path}: truncated PNG: no IEND end marker")


def _open(path: PathLike, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below
            im = Image.open(path)
        w, h = im.size
        if w * h > MAX_PIXELS:
            im.close()
            raise ImageReadError(
                f"{path}: {what} of {w}x{h} px is over the {MAX_PIXELS} px limit "
                "(a decompression bomb?)"
            )
        im.load()
        _check_png_end(path, im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: {what} refused as a decompression bomb: {exc}") from exc
    except (FileNotFoundError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot read {what}: {exc}") from exc
    return im


def _scale_16(values: np.ndarray, path: PathLike) -> np.ndarray:
    """16-bit grey levels to 8 bit, ``round(v * 255 / 65535)``."""
    values = np.asarray(values, np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageReadError(
            f"{path}: 32-bit integer image (values {values.min()}..{values.max()}) is not "
            "supported; save it as 8 or 16 bit"
        )
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _composite_on_black(rgba: Image.Image) -> np.ndarray:
    arr = np.asarray(rgba.convert("RGBA"), np.uint16)
    rgb, alpha = arr[..., :3], arr[..., 3:]
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)


def _to_rgb(im: Image.Image, path: PathLike) -> Image.Image:
    """Any accepted encoding as an 8-bit RGB image (see the module docstring)."""
    if im.mode not in CONVERTIBLE:
        raise ImageReadError(
            f"{path}: image mode {im.mode!r} is not supported (convert it to 8- or 16-bit "
            "grey or RGB)"
        )
    if im.mode in GREY_16:
        return Image.fromarray(_scale_16(np.asarray(im), path)).convert("RGB")
    if _has_alpha(im):
        return Image.fromarray(_composite_on_black(im))
    return im.convert("RGB")


@dataclass(frozen=True)
class ImageInfo:
    """What ingest checks of a decoded image."""

    width: int
    height: int
    channels: int  # colour channels of the source: 1 grey, 3 colour (+1 with alpha)
    mode: str  # Pillow's mode, e.g. 'L', 'RGB', 'I;16', 'RGBA'
    transparent: bool  # has an alpha channel with a pixel below 255


def inspect_image(path: PathLike) -> ImageInfo:
    """Decode an image fully (a truncated file fails here, not in training) and describe it.

    Raises ImageReadError, naming the file, for everything ``read_rgb`` would refuse.
    """
    with _open(path, "image") as im:
        _to_rgb(im, path)  # refuses unsupported modes and 32-bit values
        grey = im.mode in ("1", "L", "LA", "La", *GREY_16) or (
            im.mode == "P" and _palette_is_grey(im)
        )
        alpha = _has_alpha(im)
        transparent = alpha and int(np.asarray(im.convert("RGBA"))[..., 3].min()) < 255
        return ImageInfo(im.width, im.height, (1 if grey else 3) + int(alpha), im.mode, transparent)


def _palette_is_grey(im: Image.Image) -> bool:
    colours = np.asarray(im.convert("RGB")).reshape(-1, 3)
    return bool((colours == colours[:, :1]).all())


def read_mask_values(path: PathLike) -> np.ndarray:
    """A dataset mask's stored values (label indices for palette images), for validation."""
    with _open(path, "mask") as im:
        return _raw_mask_values(im, "dataset", path)


def _check_resample(resample: str) -> None:
    if resample not in (*_PIL_RESAMPLE, "area"):
        raise ValueError(f"resample: {resample!r} is not one of {[*_PIL_RESAMPLE, 'area']}")


# --------------------------------------------------------------------------- images
def read_rgb(path: PathLike, size: int | None = None, resample: Resample = "bicubic") -> np.ndarray:
    """An image as uint8 HxWx3, resized to ``size`` x ``size`` by ``resample`` when given."""
    _check_resample(resample)
    with _open(path, "image") as im:
        rgb = _to_rgb(im, path)
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


def _raw_mask_values(im: Image.Image, source: str, path: PathLike = "") -> np.ndarray:
    """The values to threshold: stored values (label indices for palette images) for
    dataset masks (the brightest channel of a colour one), 8-bit grey levels for the rest
    (16-bit ones scaled, not clipped)."""
    if source != "dataset":
        if im.mode in GREY_16:
            return _scale_16(np.asarray(im), path)
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
        mask = binarize_mask(_raw_mask_values(im, source, path), rule)
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
