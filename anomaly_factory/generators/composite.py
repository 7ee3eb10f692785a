"""Putting a generated image back on its normal image: one implementation for every generator.

The 9-channel inpainting UNet (SD2 inpainting, MAGIC's and AnomalyControl's backbone)
repaints the whole image, and diffusers restores the unmasked pixels only when
``padding_mask_crop`` is set, so without a composite the normal region comes out of
a VAE round trip. Each composite is ``alpha * generated + (1 - alpha) * normal``
with its own ``alpha``:

* ``paste_back`` (MAGIC's): 1 on the mask, linear to 0 at ``feather_px + 1`` px from
  it, so the normal image is exact beyond that;
* ``blurred_mask`` (the public AnomalyControl code's ``Image.composite`` with the mask
  blurred by ``gaussian_filter(mask, sigma=5)`` at 512 px): the blurred mask, cut to
  8 bits as that code stores it, so the normal image is exact where the blur is
  below 1/255 and the defect's own edge is blended;
* ``none``: the generated image as it is.

Images are (B, H, W, 3) floats in [0, 1], as diffusers' ``output_type="np"``; masks
are bool H x W.

>>> import numpy as np
>>> mask = np.zeros((16, 16), bool); mask[6:10, 6:10] = True
>>> gen, normal = np.ones((1, 16, 16, 3)), np.zeros((1, 16, 16, 3))
>>> out = composite(gen, normal, [mask], "paste_back", feather_px=2)
>>> float(out[0, 8, 8, 0]), float(out[0, 0, 0, 0])
(1.0, 0.0)
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter

COMPOSITES = ("paste_back", "blurred_mask", "none")
MASK_LEVELS = 255  # the public code stores the blurred mask as uint8 before compositing


def feather_alpha(mask: np.ndarray, feather_px: int) -> np.ndarray:
    """Blend weight of the generated image: 1 on the mask, linear to 0 over ``feather_px`` px."""
    mask = np.asarray(mask, bool)
    if feather_px == 0 or not mask.any():
        return mask.astype(np.float32)
    dist = distance_transform_edt(~mask)
    return np.clip(1.0 - dist / (feather_px + 1), 0.0, 1.0).astype(np.float32)


def paste_back(
    generated: np.ndarray, normal: np.ndarray, masks: list[np.ndarray], feather_px: int
) -> np.ndarray:
    """``alpha * generated + (1 - alpha) * normal`` per image, (B, H, W, 3) floats in [0, 1]."""
    alpha = np.stack([feather_alpha(m, feather_px) for m in masks])[..., None]
    return alpha * generated + (1 - alpha) * normal


def blurred_mask_alpha(mask: np.ndarray, sigma: float) -> np.ndarray:
    """The public AnomalyControl code's blend weight: the mask blurred by a Gaussian of
    ``sigma`` px, floored to 8 bits (``(blurred * 255).astype(np.uint8) / 255``)."""
    blurred = gaussian_filter(np.asarray(mask, bool).astype(np.float64), sigma=sigma)
    return (np.floor(blurred * MASK_LEVELS) / MASK_LEVELS).astype(np.float32)


def blurred_mask_composite(
    generated: np.ndarray, normal: np.ndarray, masks: list[np.ndarray], sigma: float
) -> np.ndarray:
    """``alpha * generated + (1 - alpha) * normal`` with :func:`blurred_mask_alpha`."""
    alpha = np.stack([blurred_mask_alpha(m, sigma) for m in masks])[..., None]
    return alpha * generated + (1 - alpha) * normal


def composite(
    generated: np.ndarray,
    normal: np.ndarray,
    masks: list[np.ndarray],
    method: str,
    feather_px: int = 3,
    blur_sigma: float = 5.0,
) -> np.ndarray:
    """The generated images put back on their normals by ``method`` (one of COMPOSITES)."""
    if method == "paste_back":
        return paste_back(generated, normal, masks, feather_px)
    if method == "blurred_mask":
        return blurred_mask_composite(generated, normal, masks, blur_sigma)
    if method == "none":
        return generated
    raise ValueError(f"composite method: {method!r} is not one of {list(COMPOSITES)}")
