"""Foreground extraction for context-aware mask alignment (MAGIC §3.4, step 1).

The paper segments the normal image with U²-Net so that an anomaly mask lands on
the object. The default here needs no weights and runs offline on CPU:

* ``border_color`` (default): the image border is assumed to be background; its
  colours are clustered in Lab space and every pixel far (in units of the
  cluster's spread) from all background clusters is foreground. Chosen by
  measurement on the demo objects (see ``bench/cama.py``: IoU with the exact
  demo foreground).
* ``otsu``: Otsu's threshold on grey levels, polarity set so the border is background.
* ``grabcut``: OpenCV GrabCut initialised from ``border_color``.
* ``model``: a learned salient-object segmenter from ``cama.foreground_model``: a
  local TorchScript file (e.g. an exported U²-Net: 1x3xHxW -> saliency map) or a
  Hugging Face id / local folder (``AutoModelForImageSegmentation``, e.g. BiRefNet
  or RMBG with ``cama.trust_remote_code``, else ``AutoModelForSemanticSegmentation``),
  fed and read as ``cama.foreground_model_*`` say (:class:`SegmenterOptions`). On
  real MVTec screws the border-colour foreground covers about twice the screw
  (issue 16), which a learned segmenter fixes.

Texture categories use the whole image. A foreground that is (almost) empty or
(almost) full on an object category is flagged (``status``) rather than silently
used, fixing the public code's pitfall where a missing mask became all-ones.

>>> import numpy as np
>>> img = np.full((32, 32, 3), 30, np.uint8); img[8:24, 8:24] = 200
>>> int(border_color_foreground(img).sum())
256
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np

if TYPE_CHECKING:
    from anomaly_factory.config import CamaSection

ForegroundMethod = Literal["border_color", "otsu", "grabcut", "model"]
FOREGROUND_METHODS: tuple[str, ...] = ("border_color", "otsu", "grabcut", "model")

BORDER_FRACTION = 0.03  # border band width (fraction of the short side) used as background sample
BACKGROUND_CLUSTERS = 3  # background colours modelled (uneven lighting, shadows)
BACKGROUND_MIN_SHARE = 0.15  # least share of the border a background colour holds
MIN_SPREAD = 3.0  # Lab units: floor on a cluster's spread, so flat backgrounds do not amplify noise
DISTANCE_THRESHOLD = 4.0  # ~99.9% of a 3-D Gaussian lies within 4 spreads
MIN_BLOB_FRACTION = 0.002  # foreground specks smaller than this (of the image) are noise
GRABCUT_ITERATIONS = 3
CLOSE_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))  # bridges 1-2 px cracks


@dataclass(frozen=True)
class Foreground:
    """A foreground mask and how it was obtained.

    ``status`` is ``ok``, ``texture`` (whole image by design), ``empty`` or
    ``full`` (an object category whose foreground is unusable).
    """

    mask: np.ndarray
    method: str
    status: str

    @property
    def ratio(self) -> float:
        return float(self.mask.mean())

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "texture")


# --------------------------------------------------------------------------- helpers
def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"foreground: expected an HxWx3 uint8 image, got {image.dtype} {image.shape}"
        )
    return image


def _border(height: int, width: int) -> np.ndarray:
    band = max(1, round(BORDER_FRACTION * min(height, width)))
    border = np.zeros((height, width), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    return border


def _small_components(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Pixels of ``mask`` in components smaller than ``MIN_BLOB_FRACTION`` of the image."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=connectivity
    )
    small = np.zeros(n, bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] < MIN_BLOB_FRACTION * mask.size
    return small[labels]


def _clean(mask: np.ndarray) -> np.ndarray:
    """Drop specks and fill small holes (dark defects); large holes stay (a nut has one)."""
    mask = mask & ~_small_components(mask, 8)
    # closing bridges thin dark defects (cracks) that would otherwise open a hole to the edge
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, CLOSE_KERNEL) > 0
    return mask | _small_components(~mask, 4)


# --------------------------------------------------------------------------- methods
def border_color_foreground(image: np.ndarray) -> np.ndarray:
    """Pixels whose Lab colour is far from every background cluster of the border."""
    lab = cv2.cvtColor(_check_image(image), cv2.COLOR_RGB2LAB).astype(np.float32)
    h, w = lab.shape[:2]
    samples = lab[_border(h, w)]
    k = min(BACKGROUND_CLUSTERS, len(samples))
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(0)  # k-means++ seeding must not depend on global state
    _, labels, centers = cv2.kmeans(samples, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    labels = labels.ravel()
    distance = np.full((h, w), np.inf, np.float32)
    for c in range(k):
        members = samples[labels == c]
        if len(members) < BACKGROUND_MIN_SHARE * len(samples):
            continue  # a rare border colour is an object touching the border, not background
        spread = np.maximum(members.std(0), MIN_SPREAD)
        d = np.sqrt((((lab - centers[c]) / spread) ** 2).sum(-1))
        distance = np.minimum(distance, d)
    return _clean(distance > DISTANCE_THRESHOLD)


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """Otsu's grey-level threshold; the side holding most of the border is background."""
    grey = cv2.cvtColor(_check_image(image), cv2.COLOR_RGB2GRAY)
    _, binary = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = binary > 0
    if mask[_border(*mask.shape)].mean() > 0.5:
        mask = ~mask
    return _clean(mask)


def grabcut_foreground(image: np.ndarray) -> np.ndarray:
    """GrabCut refinement of ``border_color`` (border pixels are sure background)."""
    image = _check_image(image)
    init = border_color_foreground(image)
    if not init.any() or init.all():
        return init
    gc = np.where(init, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    gc[_border(*init.shape) & ~init] = cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    cv2.grabCut(bgr, gc, None, bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    return _clean((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD))


@dataclass(frozen=True)
class SegmenterOptions:
    """How a learned segmenter is fed and read (``cama.foreground_model_*``).

    The defaults suit U²-Net exports (320 px, [0, 1] input). Hugging Face
    salient-object models differ: BiRefNet wants ImageNet mean/std at 1024 px and
    returns its final map last (``output: -1``); RMBG-1.4 wants mean 0.5, std 1.
    """

    resolution: int = 320
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    output: int = 0
    trust_remote_code: bool = False

    @classmethod
    def from_section(cls, section: CamaSection) -> SegmenterOptions:
        """From a :class:`~anomaly_factory.config.CamaSection`."""
        return cls(
            resolution=section.foreground_model_resolution,
            mean=tuple(section.foreground_model_mean),
            std=tuple(section.foreground_model_std),
            output=section.foreground_model_output,
            trust_remote_code=section.trust_remote_code,
        )


class ModelForeground:
    """A learned salient-object segmenter (U²-Net-like) from a local file, folder or HF id.

    * a local TorchScript file: ``1x3xHxW -> saliency map``;
    * a folder or Hugging Face id: ``AutoModelForImageSegmentation`` (salient-object
      models such as BiRefNet or RMBG ship their own code: ``cama.trust_remote_code``),
      else ``AutoModelForSemanticSegmentation`` (e.g. a two-class SegFormer), where
      the foreground is every class but 0 (background).

    Loaded once per (source, device, options) and reused: see :func:`load_model_foreground`.
    """

    def __init__(self, source: str, device: str = "cpu", options: SegmenterOptions | None = None):
        import torch

        self.device = torch.device(device)
        self.options = options or SegmenterOptions()
        if Path(source).is_file():
            try:
                self.model = torch.jit.load(str(source), map_location=self.device)
            except RuntimeError as exc:
                raise ValueError(
                    f"cama.foreground_model: {source!r} is not a TorchScript file: {exc}"
                ) from exc
        else:
            self.model = _load_hf_segmenter(source, self.options.trust_remote_code).to(self.device)
        self.model.eval()

    def saliency(self, image: np.ndarray):
        """Foreground probability at the model's resolution, a (h, w) float tensor."""
        import torch

        o = self.options
        x = cv2.resize(image, (o.resolution, o.resolution), interpolation=cv2.INTER_AREA)
        x = (x.astype(np.float32) / 255 - np.float32(o.mean)) / np.float32(o.std)
        t = torch.from_numpy(x).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad():
            out = self.model(t)
        return _saliency(_output_tensor(out, o.output))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = _check_image(image).shape[:2]
        prob = self.saliency(image).float().cpu().numpy()
        prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        return _clean(prob > 0.5)


def _load_hf_segmenter(source: str, trust_remote_code: bool):
    """``AutoModelForImageSegmentation``, else ``AutoModelForSemanticSegmentation``."""
    from transformers import AutoModelForImageSegmentation, AutoModelForSemanticSegmentation

    errors = []
    for auto in (AutoModelForImageSegmentation, AutoModelForSemanticSegmentation):
        try:
            return auto.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            errors.append(f"{auto.__name__}: {exc}")
    hint = (
        ""
        if trust_remote_code
        else "; models that ship their own code need cama.trust_remote_code: true"
    )
    raise ValueError(
        f"cama.foreground_model: cannot load {source!r} (local TorchScript file, folder or "
        f"Hugging Face id; offline runs need it in the local cache){hint}: " + " | ".join(errors)
    )


def _output_tensor(out, index: int = 0):
    """The saliency logits/probabilities of a model output, as (1, C, h, w).

    ``index`` picks from a list/tuple output (nested lists take their first item).
    """
    import torch

    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError("cama.foreground_model: the model returned an empty output")
        out = out[index]
    while not isinstance(out, torch.Tensor):
        if isinstance(out, (list, tuple)):
            out = out[0]
        elif hasattr(out, "logits"):
            out = out.logits
        else:
            raise ValueError(f"cama.foreground_model: cannot read a mask from {type(out)}")
    if out.ndim == 4:
        return out[:1]
    return out.reshape(1, 1, *out.shape[-2:])


def _saliency(maps):
    """Foreground probability (h, w): one channel is a saliency map (logits if outside
    [0, 1]); several channels are classes with 0 the background."""
    if maps.shape[1] == 1:
        s = maps[0, 0].float()
        return s.sigmoid() if s.min() < 0 or s.max() > 1 else s
    return 1 - maps[0].float().softmax(0)[0]


@functools.lru_cache(maxsize=4)
def load_model_foreground(
    source: str, device: str = "cpu", options: SegmenterOptions | None = None
) -> ModelForeground:
    return ModelForeground(source, device, options)


# --------------------------------------------------------------------------- entry point
def extract_foreground(
    image: np.ndarray,
    method: str = "border_color",
    *,
    resolution: int | None = None,
    model: str | None = None,
    device: str = "cpu",
    segmenter: SegmenterOptions | None = None,
) -> np.ndarray:
    """The foreground (bool HxW) of an object image by ``method``.

    ``resolution`` (long side) runs the method on a downscaled copy and resizes the
    result back, which bounds the cost of GrabCut on 1024 px images. ``segmenter``
    says how ``method: model`` feeds and reads ``model``.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    small = image
    if resolution is not None and max(h, w) > resolution:
        scale = resolution / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if method == "border_color":
        mask = border_color_foreground(small)
    elif method == "otsu":
        mask = otsu_foreground(small)
    elif method == "grabcut":
        mask = grabcut_foreground(small)
    elif method == "model":
        if not model:
            raise ValueError("cama.foreground_model: required when cama.foreground is 'model'")
        mask = load_model_foreground(model, device, segmenter or SegmenterOptions())(small)
    else:
        raise ValueError(f"cama.foreground: {method!r} is not one of {list(FOREGROUND_METHODS)}")
    if mask.shape != (h, w):
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return mask


def foreground_status(mask: np.ndarray, min_ratio: float, max_ratio: float) -> str:
    """``empty`` / ``full`` when the foreground covers too little / too much, else ``ok``."""
    ratio = float(mask.mean())
    if ratio < min_ratio:
        return "empty"
    if ratio > max_ratio:
        return "full"
    return "ok"


def object_foreground(
    image: np.ndarray,
    method: str = "border_color",
    *,
    texture: bool = False,
    min_ratio: float = 0.01,
    max_ratio: float = 0.95,
    resolution: int | None = None,
    model: str | None = None,
    device: str = "cpu",
    segmenter: SegmenterOptions | None = None,
) -> Foreground:
    """The foreground of a normal image with its status; textures are the whole image."""
    if texture:
        return Foreground(np.ones(image.shape[:2], bool), "whole_image", "texture")
    mask = extract_foreground(
        image, method, resolution=resolution, model=model, device=device, segmenter=segmenter
    )
    return Foreground(mask, method, foreground_status(mask, min_ratio, max_ratio))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
