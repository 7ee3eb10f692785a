"""Dense correspondence (MAGIC §3.4 step 3): exact grid<->image mapping, invariance, DINOv2."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from anomaly_factory.datasets.demo import foreground as demo_foreground
from anomaly_factory.datasets.demo import render_category
from anomaly_factory.generators.magic.correspondence import (
    FeatureMap,
    GradientFeatures,
    best_match,
    load_extractor,
)


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=64,
    )
    path = tmp_path_factory.mktemp("dino") / "tiny"
    Dinov2Model(config).save_pretrained(path)
    return str(path)


def _textured(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return cv2.GaussianBlur(
        cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC), (3, 3), 0
    )


def test_grid_cells_cover_the_image_exactly():
    fm = FeatureMap(np.zeros((8, 5, 1), np.float32), (50, 40))  # stride 6.25 x 8
    assert fm.stride == (6.25, 8.0)
    centres = fm.cell_centers()
    assert centres[0, 0].tolist() == [3.5, 2.625]  # centre of [0, 8) x [0, 6.25)
    assert centres[-1, -1].tolist() == [35.5, 46.375]  # centre of [32, 40) x [43.75, 50)
    pts = np.array([[0.0, 0.0], [39.0, 49.0], [17.3, 21.9]])
    assert np.allclose(fm.to_image(fm.to_grid(pts)), pts)
    # every pixel falls in the cell whose span contains its centre
    x = np.arange(40.0)
    cells = np.floor(fm.to_grid(np.stack([x, x], -1))[:, 0] + 0.5)
    assert np.array_equal(cells, np.floor((x + 0.5) / 8.0))


@pytest.mark.parametrize("method", ["gradient", "dinov2"])
def test_matches_transfer_across_resolutions(method, tiny_dino):
    """A point matched from a 64 px image into the same image at 128 px lands at 2x.

    The public code's bug (matching at 480 px, using at 512 px) would put it at 1x.
    Pixel replication makes both images identical at the extractor's working size.
    """
    a = _textured(64)
    b = a.repeat(2, axis=0).repeat(2, axis=1)
    extractor = load_extractor(method, tiny_dino, 64, 4, "cpu")
    fa, fb = extractor.pair(a, b)
    errors = []
    centres = fa.cell_centers()  # query whole cells: random DINOv2 features do not interpolate
    hf, wf = fa.grid_size
    for i, j in ((hf * 3 // 4, wf * 5 // 6), (hf - 1, wf // 5), (hf // 6, wf * 2 // 3)):
        p = centres[i, j]
        (xy, _) = best_match(fa.sample(p[None])[0], fb)
        errors.append(float(np.abs(xy - (np.array(p) + 0.5) * 2 - 0.5).max()))
    tolerance = max(fb.stride) + 1
    assert max(errors) <= tolerance, (method, errors, tolerance)


def test_gradient_descriptors_are_rotation_invariant():
    """Points on a demo bar match their rotated selves (exact 90° rotation)."""
    img, _ = render_category("bar_demo", "good", 64, 0, 3)
    fg = demo_foreground("bar_demo", 64, 0, 3)
    rotated = np.ascontiguousarray(np.rot90(img))  # (x, y) -> (y, 63 - x)
    fa, fb = GradientFeatures(64, 2).pair(img, rotated)
    ys, xs = np.nonzero(fg)
    rng = np.random.default_rng(0)
    errors = []
    for i in rng.choice(len(xs), 8, replace=False):
        p = np.array([xs[i], ys[i]], float)
        xy, _ = best_match(fa.sample(p[None])[0], fb, np.rot90(fg))
        errors.append(float(np.hypot(*(xy - np.array([p[1], 63 - p[0]])))))
    assert np.median(errors) <= 4, errors


def test_extractor_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="cama.features"):
        load_extractor("sift")
    with pytest.raises(ValueError, match="cama.features_model"):
        load_extractor("dinov2", None)
    with pytest.raises(ValueError, match="cama.features_model"):
        load_extractor("dinov2", str(tmp_path / "missing"))
