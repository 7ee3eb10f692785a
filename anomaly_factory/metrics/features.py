"""Pluggable image feature extractors for KID (CONTEXT §3, "KID").

KID is only comparable between runs that used the same features, so every
extractor carries its ``name`` and the sha256 of its weights, and every number
computed from it is reported with that provenance. Extractors, by spec string:

* ``inception`` -- the standard KID/FID network: torch-fidelity's InceptionV3
  (``pt_inception-2015-12-05``), 2048-d pool features, resized to 299 px inside
  the network as TF1 did. Weights come from ``gates.kid.weights`` or the torch
  hub cache; they are never downloaded here.
* ``module:<file>`` -- any local ``nn.Module`` saved as TorchScript (``.pt``) or
  as a ``torch.export`` program (``.pt2``); neither format unpickles code.
* ``inception_random_init`` -- InceptionV3's architecture with random weights
  from a fixed seed. Offline and deterministic, but NOT the standard network.
* ``pixel_stats`` -- colour histograms, moments, gradient histogram and an 8x8
  thumbnail. Offline, no weights; for the tiny profile and tests.

>>> ext = load_extractor("pixel_stats")
>>> ext.features([np.zeros((32, 32, 3), np.uint8)]).shape
(1, 134)
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomaly_factory.errors import InputError
from anomaly_factory.images import read_rgb

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch-hub convention: the file name holds the hash prefix
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
OFFLINE = ("pixel_stats", "inception_random_init")
BATCH = 16  # images per forward pass: bounded memory at 299 px on CPU
PIXEL_STATS_VERSION = "pixel_stats-v1: rgb hist16, mean/std, grad hist16, gray 8x8"


class FeatureExtractorError(InputError):
    """An extractor cannot be built (unknown name, missing or unsafe weights)."""


@dataclass
class FeatureExtractor:
    """A named image -> vector function with the hash of what defines it."""

    name: str
    weights_sha256: str
    weights_source: str
    fn: Callable[[np.ndarray], np.ndarray]  # uint8 NxHxWx3 (one size) -> float64 N x d
    standard: bool = False  # True only for the published network KID numbers use

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Features of uint8 HxWx3 images (any sizes), as float64 N x d."""
        out = []
        for start in range(0, len(images), BATCH):
            batch = [as_rgb(im) for im in images[start : start + BATCH]]
            batch = _same_size(batch)
            out.append(np.asarray(self.fn(np.stack(batch)), np.float64).reshape(len(batch), -1))
        if not out:
            return np.zeros((0, 0))
        return np.concatenate(out)

    def provenance(self) -> dict[str, Any]:
        return {
            "extractor": self.name,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            "standard": self.standard,
        }


# --------------------------------------------------------------------------- images
def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 from grayscale, RGBA or RGB (MVTec grid/screw/zipper are grayscale)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image.astype(np.uint8, copy=False)


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """An image as uint8 HxWx3 at its own size (:func:`anomaly_factory.images.read_rgb`)."""
    return read_rgb(path)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to size x size (PIL, as the LPIPS and KID reference code feed PIL images)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _same_size(batch: list[np.ndarray]) -> list[np.ndarray]:
    h, w = batch[0].shape[:2]
    if all(b.shape[:2] == (h, w) for b in batch):
        return batch
    return [resize(b, max(h, w)) for b in batch]


# --------------------------------------------------------------------------- hashes
def sha256_state_dict(state: dict[str, Any]) -> str:
    """Hash of a state dict's names, shapes and values (stable across save formats)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- pixel_stats
def _pixel_stats(batch: np.ndarray) -> np.ndarray:
    """Handcrafted colour/texture statistics; 134-d."""
    x = batch.astype(np.float64) / 255.0
    feats = []
    for img in x:
        hist = [
            np.histogram(img[..., c], bins=16, range=(0, 1))[0] / img[..., c].size for c in range(3)
        ]
        moments = np.concatenate([img.mean(axis=(0, 1)), img.std(axis=(0, 1))])
        gray = img.mean(axis=2)
        gy, gx = np.gradient(gray)
        grad = np.hypot(gx, gy)
        ghist = np.histogram(grad, bins=16, range=(0, 0.5))[0] / grad.size
        thumb = (
            np.asarray(
                Image.fromarray((gray * 255).astype(np.uint8)).resize((8, 8), Image.BILINEAR)
            ).ravel()
            / 255.0
        )
        feats.append(np.concatenate([*hist, moments, ghist, thumb]))
    return np.stack(feats)


def pixel_stats_extractor() -> FeatureExtractor:
    return FeatureExtractor(
        name="pixel_stats",
        weights_sha256=_sha256_bytes(PIXEL_STATS_VERSION.encode()),
        weights_source="none (handcrafted statistics; hash of their definition)",
        fn=_pixel_stats,
    )


# --------------------------------------------------------------------------- inception
def _torch_module_fn(module: Any, device: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def fn(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            out = module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1).double().cpu().numpy()

    return fn


def _inception(state: dict[str, Any] | None, seed: int) -> Any:
    """torch-fidelity's InceptionV3 ('2048' pool features) with ``state`` or a seeded random init."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Inception(FeatureExtractorInceptionV3):
        # torch-fidelity unpickles with weights_only=False; we pass bytes already loaded
        # safely (weights_only=True), or keep the random init when there is no state.
        def load_state_dict(self, sd: Any, strict: bool = True, assign: bool = False) -> Any:
            if state is None:
                return None
            return super().load_state_dict(state, strict=strict, assign=assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _Inception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def find_inception_weights(weights: Path | None) -> Path:
    """The local pt_inception-2015-12-05 file: ``weights`` or the torch hub cache."""
    import torch

    if weights is not None:
        if not Path(weights).is_file():
            raise FeatureExtractorError(f"gates.kid.weights: {weights} does not exist")
        return Path(weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    raise FeatureExtractorError(
        f"KID extractor 'inception': weights not found at {cached} and gates.kid.weights is "
        f"unset. Download {INCEPTION_URL} on a connected machine and set gates.kid.weights "
        "(or place it in the torch hub cache). For offline runs use 'pixel_stats' or "
        "'inception_random_init' (not comparable with published KID)."
    )


def inception_extractor(weights: Path | None = None, device: str = "cpu") -> FeatureExtractor:
    import torch

    path = find_inception_weights(weights)
    data = path.read_bytes()
    digest = _sha256_bytes(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not plain weights"
        raise FeatureExtractorError(f"{path}: not a plain tensor state dict: {exc}") from exc
    module = _inception(state, seed=0).to(device)
    return FeatureExtractor(
        name="inception_v3_torch_fidelity_2015-12-05",
        weights_sha256=digest,
        weights_source=str(path),
        fn=_torch_module_fn(module, device),
        standard=digest.startswith(INCEPTION_SHA256_PREFIX),
    )


def random_inception_extractor(seed: int = 0, device: str = "cpu") -> FeatureExtractor:
    module = _inception(None, seed).to(device)
    return FeatureExtractor(
        name=f"inception_v3_RANDOM_INIT_seed{seed}",
        weights_sha256=sha256_state_dict(module.state_dict()),
        weights_source=f"random initialisation, torch.manual_seed({seed}); NOT pretrained",
        fn=_torch_module_fn(module, device),
    )


# --------------------------------------------------------------------------- local modules
def module_extractor(
    module: Any, name: str, resolution: int, device: str = "cpu", source: str = "in-process"
) -> FeatureExtractor:
    """Wrap any ``nn.Module`` taking float N x 3 x R x R in [0, 1] and returning N x d."""
    import torch

    module = module.to(device).eval() if hasattr(module, "eval") else module

    def fn(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.stack([resize(b, resolution) for b in batch]))
        x = x.permute(0, 3, 1, 2).float().div(255.0).to(device)
        with torch.no_grad():
            out = module(x)
        return out.reshape(out.shape[0], -1).double().cpu().numpy()

    state = module.state_dict() if hasattr(module, "state_dict") else {}
    return FeatureExtractor(name, sha256_state_dict(state), source, fn)


def load_module_file(path: Path) -> Any:
    """Load an ``nn.Module`` without unpickling code: TorchScript or torch.export (.pt2)."""
    import torch

    if not path.is_file():
        raise FeatureExtractorError(f"gates.kid.extractor: module file {path} does not exist")
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - report any format error with the file name
        raise FeatureExtractorError(
            f"{path}: not a TorchScript (.pt) or torch.export (.pt2) module: {exc}"
        ) from exc


def load_extractor(
    spec: str,
    weights: Path | None = None,
    resolution: int = 299,
    seed: int = 0,
    device: str = "cpu",
) -> FeatureExtractor:
    """Build the extractor named by ``gates.kid.extractor``."""
    if spec == "inception":
        return inception_extractor(weights, device)
    if spec == "inception_random_init":
        return random_inception_extractor(seed, device)
    if spec == "pixel_stats":
        return pixel_stats_extractor()
    if spec.startswith("module:"):
        path = Path(spec.removeprefix("module:"))
        ext = module_extractor(load_module_file(path), f"module:{path.name}", resolution, device)
        ext.weights_sha256 = _sha256_bytes(path.read_bytes())
        ext.weights_source = str(path)
        return ext
    raise FeatureExtractorError(
        f"gates.kid.extractor: {spec!r} is not one of "
        f"['inception', 'module:<file>', {', '.join(repr(o) for o in OFFLINE)}]"
    )
