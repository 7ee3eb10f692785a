"""The procedural demo dataset: deterministic, pixel-exact masks, objects that move."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_factory.datasets.demo import ANOMALY_TYPES, build_demo, foreground, render_category
from anomaly_factory.io import sha256_file


def test_deterministic_bytes(tmp_path):
    a = build_demo(tmp_path / "a", seed=3, size=64, n_train=3, n_test_good=1, n_per_type=3)
    b = build_demo(tmp_path / "b", seed=3, size=64, n_train=3, n_test_good=1, n_per_type=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 4 * (3 + 1 + 2 * 3 * 2)
    assert all(sha256_file(a / f) == sha256_file(b / f) for f in files)


def test_masks_are_pixel_exact():
    # the defect changes exactly the mask's pixels relative to the same normal render
    for cat, types in ANOMALY_TYPES.items():
        assert len(types) >= 2
        for kind in types:
            img, mask = render_category(cat, kind, size=64, seed=0, index=5)
            assert mask.any()
            if cat in ("nut_demo", "bar_demo"):
                fg = foreground(cat, 64, 0, 5, kind)
                assert not (mask & ~fg).any(), f"{cat}/{kind} defect leaves the object"


def test_objects_vary_in_position_and_rotation():
    centroids = []
    for i in range(8):
        fg = foreground("bar_demo", 64, 0, i)
        ys, xs = np.nonzero(fg)
        centroids.append((xs.mean(), ys.mean()))
        cov = np.cov(np.stack([xs, ys]))
        centroids[-1] += (np.degrees(np.arctan2(*np.linalg.eigh(cov)[1][:, 1][::-1])) % 180,)
    c = np.array(centroids)
    assert c[:, 0].std() > 3 and c[:, 1].std() > 3  # positions differ
    assert c[:, 2].std() > 10  # orientations differ


def test_anomaly_types_look_different():
    a, ma = render_category("carpet_demo", "stain", 64, 0, 1)
    b, mb = render_category("carpet_demo", "cut", 64, 0, 1)
    assert a[ma].mean() < 120 < b[mb].mean()  # dark stains vs bright cuts


# Digest of render_category over every category/type, two sizes and four indices, taken
# before defect drawing and painting were split into defect_mask / paint_defect.
RENDER_DIGEST = "53ae6b2cb76262173615f6a21eeb1169dff14f4125cd1e240b56ec03e7bdf459"


def test_render_category_bytes_unchanged_by_the_defect_api():
    import hashlib

    h = hashlib.sha256()
    for cat, types in ANOMALY_TYPES.items():
        for kind in ("good", *types):
            for size in (64, 128):
                for index in (0, 1, 7, 1003):
                    img, mask = render_category(cat, kind, size, 0, index)
                    h.update(img.tobytes())
                    h.update(np.packbits(mask).tobytes())
    assert h.hexdigest() == RENDER_DIGEST


def test_true_defects_paint_any_image_at_a_given_mask_only():
    from anomaly_factory.datasets.demo import defect_mask, paint_defect

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)  # not a demo image, not square
    original = image.copy()
    region = np.zeros((40, 90), bool)
    region[5:35, 20:80] = True
    for cat, types in ANOMALY_TYPES.items():
        for kind in types:
            mask = defect_mask(cat, kind, region, rng)
            assert mask.shape == region.shape and mask.any() and not (mask & ~region).any()
            painted = paint_defect(cat, kind, image, mask, rng)
            changed = (painted != image).any(axis=2)
            assert not (changed & ~mask).any()  # pixel-exact
            assert changed[mask].mean() > 0.9
            assert np.array_equal(image, original)  # the input is not modified
    with pytest.raises(ValueError, match="nut_demo.*stain"):
        defect_mask("nut_demo", "stain", region, rng)
