"""Foreground extraction (MAGIC §3.4 step 1): IoU against the demo's exact foreground."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_factory.datasets.demo import foreground as demo_foreground
from anomaly_factory.datasets.demo import render_category
from anomaly_factory.generators.magic.foreground import (
    extract_foreground,
    foreground_status,
    iou,
    object_foreground,
)

OBJECTS = ("nut_demo", "bar_demo")


def _demo_ious(method: str, size: int = 64, n: int = 4, **kw) -> dict[str, float]:
    out = {}
    for category in OBJECTS:
        for i in range(n):
            img, _ = render_category(category, "good", size, 0, i)
            exact = demo_foreground(category, size, 0, i)
            out[f"{category}#{i}"] = iou(extract_foreground(img, method, **kw), exact)
    return out


@pytest.mark.parametrize("method", ["border_color", "otsu", "grabcut"])
def test_weight_free_methods_match_the_exact_demo_foreground(method):
    ious = _demo_ious(method)
    print(method, {k: round(v, 3) for k, v in ious.items()})
    assert min(ious.values()) >= 0.95, ious


def test_default_recovers_objects_touching_the_border_and_holes():
    """A nut's hole stays background; downscaled extraction is resized back exactly."""
    img, _ = render_category("nut_demo", "good", 128, 0, 0)
    exact = demo_foreground("nut_demo", 128, 0, 0)
    mask = extract_foreground(img, "border_color", resolution=64)
    assert mask.shape == exact.shape and iou(mask, exact) >= 0.9
    ys, xs = np.nonzero(exact)
    assert not mask[int(ys.mean()), int(xs.mean())]  # the hole at the nut's centre


def test_textures_are_whole_image():
    img, _ = render_category("carpet_demo", "good", 64, 0, 0)
    fg = object_foreground(img, texture=True)
    assert fg.status == "texture" and fg.mask.all() and fg.usable


def test_empty_and_full_foregrounds_are_flagged():
    flat = np.full((48, 48, 3), 120, np.uint8)
    empty = object_foreground(flat)
    assert empty.status == "empty" and not empty.usable
    img, _ = render_category("nut_demo", "good", 64, 0, 0)
    full = object_foreground(img, max_ratio=0.05)  # a nut covers more than 5%
    assert full.status == "full" and not full.usable
    assert foreground_status(np.ones((4, 4), bool), 0.01, 0.95) == "full"
    assert foreground_status(np.eye(4, dtype=bool), 0.01, 0.95) == "ok"


class _Brightness(torch.nn.Module):
    """A stand-in for U²-Net: saliency = sigmoid of (brightness - 0.4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean(1, keepdim=True) - 0.4) * 40


def test_model_path_loads_a_local_torchscript_segmenter(tmp_path):
    path = tmp_path / "u2net_like.pt"
    torch.jit.script(_Brightness()).save(str(path))
    ious = _demo_ious("model", n=2, model=str(path))
    assert min(ious.values()) >= 0.9, ious


def test_bad_inputs_name_the_setting(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="cama.foreground"):
        extract_foreground(img, "magic")
    with pytest.raises(ValueError, match="cama.foreground_model"):
        extract_foreground(img, "model")
    bad = tmp_path / "not_a_model.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="cama.foreground_model"):
        extract_foreground(img, "model", model=str(bad))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        extract_foreground(img[..., 0], "otsu")
