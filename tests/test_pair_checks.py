"""The pixel checks: each number against a reference implementation or a case with a
known answer, and each check failing exactly the pair broken its way."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from anomaly_factory.config import FactoryConfig, PairChecksSection
from anomaly_factory.gates.pair_checks import (
    CHECK_NAMES,
    SSIM_RADIUS,
    compute_pair_checks,
    concentration,
    defect_crop,
    dihedral,
    failure_counts,
    fingerprint,
    judge,
    masked_crop,
    near_duplicates,
    nearest_distance,
    outside_region,
    pixel_checks,
    placement_rule,
    psnr,
    ssim,
    ssim_map,
)
from anomaly_factory.generators.output import pair_key, pair_metadata, save_pair

RNG = np.random.default_rng(0)


def _textured(shape=(48, 56, 3), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 120 + 40 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 5.0)[..., None]
    return np.clip(base + rng.normal(0, 6, shape), 0, 255).astype(np.uint8)


def _blob(shape=(48, 56), centre=(24, 28), r=6) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


# --------------------------------------------------------------------------- references
def test_ssim_and_psnr_match_scikit_image() -> None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = _textured(seed=1)
    b = np.clip(a.astype(float) + RNG.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(
        a, b, data_range=255, channel_axis=2, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )  # fmt: skip
    assert ssim(a, b) == pytest.approx(ref, abs=1e-9)
    _, ref_map = structural_similarity(
        a, b, data_range=255, channel_axis=2, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )  # fmt: skip
    np.testing.assert_allclose(ssim_map(a, b), ref_map.mean(axis=2), atol=1e-9)
    grey = structural_similarity(
        a[..., 0], b[..., 0], data_range=255, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )  # fmt: skip
    assert ssim(a[..., 0], b[..., 0]) == pytest.approx(grey, abs=1e-9)

    region = outside_region(_blob(), 4)
    assert psnr(a, b, region) == pytest.approx(
        peak_signal_noise_ratio(a[region], b[region], data_range=255), abs=1e-9
    )
    assert psnr(a, a, region) == math.inf


def test_ssim_region_excludes_windows_touching_the_mask() -> None:
    normal = _textured()
    mask = _blob()
    image = normal.copy()
    image[mask] = 255
    checks = pixel_checks(image, mask, normal, dilation_px=4)
    assert checks["bg_ssim"] == 1.0 and checks["bg_psnr"] == math.inf
    # the plain SSIM over "outside the dilated mask" would see the defect through its window
    assert ssim(image, normal, outside_region(mask, 4)) < 1.0
    assert SSIM_RADIUS == 5  # 11-tap window of sigma 1.5 (Wang et al. 2004)


# --------------------------------------------------------------------------- anomaly present
def test_anomaly_present_needs_change_inside_concentrated_there() -> None:
    normal, mask = _textured(), _blob()
    image = normal.copy()
    image[mask] = 20
    good = pixel_checks(image, mask, normal, 4)
    assert good["change_inside"] > 50 and good["change_outside"] == 0
    assert good["concentration"] == good["change_inside"]  # in / (0 + 1)
    same = pixel_checks(normal, mask, normal, 4)
    assert same["change_inside"] == 0 and same["concentration"] == 0
    spread = np.clip(image.astype(int) + 40, 0, 255).astype(np.uint8)
    assert pixel_checks(spread, mask, normal, 4)["concentration"] < 3
    assert concentration(10.0, math.nan) == 10.0


# --------------------------------------------------------------------------- memorisation
def test_defect_crops_are_translation_invariant_and_see_orientation() -> None:
    img, mask = _textured((64, 64, 3)), np.zeros((64, 64), bool)
    mask[10:14, 8:30] = True
    moved_img = np.roll(img, (27, 21), axis=(0, 1))
    moved_mask = np.roll(mask, (27, 21), axis=(0, 1))
    a, b = masked_crop(img, mask), masked_crop(moved_img, moved_mask)
    np.testing.assert_array_equal(a, b)
    turned = masked_crop(np.rot90(img).copy(), np.rot90(mask).copy())
    assert nearest_distance(turned, [a])[0] > 20  # a plain comparison sees the turn
    assert nearest_distance(turned, dihedral(a))[0] == 0  # a turned copy is still a copy
    fresh = masked_crop(_textured((64, 64, 3), seed=9), mask)  # same shape, other pixels
    assert nearest_distance(fresh, dihedral(a))[0] > 5
    crop, cover = defect_crop(img, mask, 16, context=0.5)
    assert crop.shape == (16, 16, 3) and 0 < cover.mean() < 1


def test_an_inside_crop_at_a_border_holds_image_pixels_and_the_whole_defect() -> None:
    """``inside``: a defect at the image's corner gets the window moved in by exactly the
    overhang (the known crop of the image), not zero padding; in the middle the two
    windows are the same crop; a window larger than the image is still zero-padded."""
    img, mask = _textured((64, 64, 3)) // 2 + 100, np.zeros((64, 64), bool)  # no zero pixel
    mask[0:4, 1:9] = True  # box 4 x 8 at the top-left: side 8 * 2 = 16
    padded, _ = defect_crop(img, mask, 16, context=0.5)
    crop, cover = defect_crop(img, mask, 16, context=0.5, inside=True)
    assert padded.min() == 0 and crop.min() >= 100
    np.testing.assert_array_equal(crop, img[0:16, 0:16].astype(np.float32))  # moved in
    assert cover.sum() == mask.sum()  # the whole defect, off-centre
    middle = np.roll(mask, (30, 30), axis=(0, 1))
    np.testing.assert_array_equal(
        defect_crop(img, middle, 16, 0.5, inside=True)[0], defect_crop(img, middle, 16, 0.5)[0]
    )
    wide = np.zeros((64, 64), bool)
    wide[0:2, 2:40] = True  # side 38 * 2 = 76 > 64
    assert defect_crop(img, wide, 16, 0.5, inside=True)[0].min() == 0


# --------------------------------------------------------------------------- duplicates
def test_near_duplicates_need_the_same_mask_and_the_same_pixels() -> None:
    normal = _textured((64, 64, 3))
    m1, m2 = _blob((64, 64), (20, 20)), _blob((64, 64), (44, 40))
    paint = lambda m: np.where(m[..., None], np.uint8(30), normal)  # noqa: E731
    other_normal = _textured((64, 64, 3), seed=5)
    prints = [
        fingerprint(paint(m1), m1),
        fingerprint(paint(m2), m2),  # same normal, other mask: not a duplicate
        fingerprint(paint(m1), m1),  # exact repeat of the first
        fingerprint(np.where(m1[..., None], np.uint8(200), other_normal), m1),  # same mask only
    ]
    assert near_duplicates(prints, 0.9, 2.0) == [-1, -1, 0, -1]


# --------------------------------------------------------------------------- placement
def test_placement_is_checked_for_objects_only_and_says_why_not() -> None:
    cfg = FactoryConfig()
    assert placement_rule(cfg, "nut_demo", "rust").applies
    assert placement_rule(cfg, "carpet_demo", "stain").status == "texture"
    assert placement_rule(cfg, "cable", "bent_wire").status == "may_lie_outside"
    assert placement_rule(cfg, "screw", "manipulated_front").status == "may_lie_outside"
    assert placement_rule(cfg, "screw", "scratch_head").applies
    cfg.cama.foreground = "model"
    rule = placement_rule(cfg, "nut_demo", "rust")
    assert rule.applies and "fallback" in rule.method


# --------------------------------------------------------------------------- table
def _pair(tmp_path, i, image, mask, normal, category="nut_demo", kind="rust"):
    key = pair_key("demo", category, kind, i)
    meta = pair_metadata("demo", category, kind, "test", i, "test", "normal.png")
    return save_pair(tmp_path, key, image, mask, normal, meta)


def test_compute_pair_checks_names_every_failure_in_reasons(tmp_path) -> None:
    size = 64
    normal = np.full((size, size, 3), 40, np.uint8)
    normal[16:48, 16:48] = 180  # the object
    normal = np.clip(normal + RNG.normal(0, 2, normal.shape), 0, 255).astype(np.uint8)
    on, off = _blob((size, size), (32, 32), 5), _blob((size, size), (6, 6), 4)
    good = np.where(on[..., None], np.uint8(90), normal)
    rows = [
        _pair(tmp_path, 0, good, on, normal),
        _pair(tmp_path, 1, normal, on, normal),  # identity
        _pair(tmp_path, 2, np.where(off[..., None], np.uint8(90), normal), off, normal),
        _pair(tmp_path, 3, good, on, normal),  # repeats pair 0
    ]
    rows[3]["image_path"] = rows[0]["image_path"]
    images = pd.DataFrame(
        columns=["dataset", "category", "anomaly_type", "split", "image_path", "mask_path"]
    )
    table = compute_pair_checks(FactoryConfig(), pd.DataFrame(rows), images)
    by_key = table.set_index("key")
    first, identity, off_object, repeat = (r["key"] for r in rows)
    assert by_key.loc[first, "passed"] and by_key.loc[first, "reasons"] == ""
    assert math.isnan(by_key.loc[first, "fewshot_distance"])  # no few-shot images: skipped
    assert "anomaly_change" in by_key.loc[identity, "reasons"]
    assert by_key.loc[off_object, "reasons"].startswith("mask_on_object")
    assert by_key.loc[repeat, "duplicate_of"] == first
    assert failure_counts(table)["no_duplicate"] == 1
    assert set(failure_counts(table)) == set(CHECK_NAMES)


def test_unreadable_pairs_fail_and_null_thresholds_turn_checks_off() -> None:
    rec = {"status": "unreadable: ImageReadError", "duplicate_of": None}
    assert judge(rec, PairChecksSection()) == ["pair_readable: unreadable: ImageReadError"]
    rec = {
        "status": "ok",
        "bg_psnr": 10.0,
        "bg_ssim": 0.2,
        "change_inside": 0.0,
        "concentration": 0.0,
        "fg_share": 0.0,
        "fewshot_distance": 0.0,
        "duplicate_of": None,
    }
    assert len(judge(rec, PairChecksSection())) == 6
    off = PairChecksSection(psnr_min=None, ssim_min=None, foreground_share_min=None)
    assert [r.split(":")[0] for r in judge(rec, off)] == [
        "anomaly_change",
        "anomaly_concentration",
        "no_memorisation",
    ]
