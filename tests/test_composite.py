"""Composites of a generated image on its normal: MAGIC's paste-back, the public AnomalyControl
code's blurred mask, none."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from anomaly_factory.generators import composite as C
from anomaly_factory.generators.magic import sampler


def _inputs():
    rng = np.random.default_rng(0)
    gen = rng.random((2, 64, 64, 3))
    normal = rng.random((2, 64, 64, 3))
    masks = [np.zeros((64, 64), bool) for _ in range(2)]
    masks[0][20:30, 10:40] = True
    masks[1][40:50, 40:44] = True
    return gen, normal, masks


def test_magic_and_anomalycontrol_share_one_paste_back() -> None:
    assert sampler.paste_back is C.paste_back
    gen, normal, masks = _inputs()
    out = C.composite(gen, normal, masks, "paste_back", feather_px=3)
    for b, m in enumerate(masks):
        alpha = C.feather_alpha(m, 3)
        assert np.array_equal(out[b][m], gen[b][m])
        assert np.array_equal(out[b][alpha == 0], normal[b][alpha == 0])


def test_blurred_mask_is_the_public_code_composite() -> None:
    """``Image.composite(generated, normal, uint8(gaussian_filter(mask, 5) * 255))``."""
    gen, normal, masks = _inputs()
    out = C.composite(gen, normal, masks, "blurred_mask", blur_sigma=5.0)
    for b, m in enumerate(masks):
        blurred = (gaussian_filter(m.astype(np.float64), sigma=5) * 255).astype(np.uint8)
        gen8, normal8 = (np.round(x[b] * 255).astype(np.uint8) for x in (gen, normal))
        theirs = np.asarray(
            Image.composite(
                Image.fromarray(gen8), Image.fromarray(normal8), Image.fromarray(blurred)
            )
        )
        ours = C.composite(gen8[None] / 255.0, normal8[None] / 255.0, [m], "blurred_mask")[0]
        assert np.abs(np.round(ours * 255) - theirs.astype(float)).max() <= 1  # PIL rounds
        far = blurred == 0
        assert far.any() and np.array_equal(out[b][far], normal[b][far])
        assert (blurred[m] < 255).any()  # the defect's own edge is blended, unlike paste-back


def test_none_and_unknown_methods() -> None:
    gen, normal, masks = _inputs()
    assert C.composite(gen, normal, masks, "none") is gen
    with pytest.raises(ValueError, match="'feathered'"):
        C.composite(gen, normal, masks, "feathered")
