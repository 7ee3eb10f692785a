"""CAMA (MAGIC §3.4): known transforms, fallback, determinism, options, DINOv2 path, CLI."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.config import FactoryConfig
from anomaly_factory.datasets.demo import foreground as demo_foreground
from anomaly_factory.datasets.demo import render_category
from anomaly_factory.generators.magic.cama import (
    CamaAligner,
    alignment_metrics,
    expected_placements,
    inside_fraction_map,
    keypoints,
)
from anomaly_factory.generators.magic.foreground import iou

SIZE = 96  # test image side
CANVAS = 256  # canonical object canvas


# --------------------------------------------------------------------------- synthetic object
def _canonical() -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric key (striped shaft, blue head with a hole, one tooth) on a canvas."""
    c = CANVAS // 2
    alpha = np.zeros((CANVAS, CANVAS), np.uint8)
    cv2.rectangle(alpha, (c - 70, c - 14), (c + 50, c + 14), 1, -1)
    cv2.circle(alpha, (c + 62, c), 34, 1, -1)
    cv2.rectangle(alpha, (c - 70, c + 14), (c - 50, c + 30), 1, -1)
    cv2.circle(alpha, (c + 70, c), 9, 0, -1)
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]
    stripes = 30 * np.sin((xx - c) * 0.35)
    body = np.stack([190 + stripes, 160 + stripes, 90 + 0 * stripes], -1)
    in_head = (xx - (c + 62)) ** 2 + (yy - c) ** 2 <= 34**2
    img = np.where(in_head[..., None], np.array([90, 140, 200]), body)
    return np.clip(img, 0, 255).astype(np.uint8), alpha > 0


def _pose(cx: float, cy: float, angle: float, scale: float) -> np.ndarray:
    """Affine map from the canvas into a SIZE image: rotate, scale, centre at (cx, cy)."""
    m = cv2.getRotationMatrix2D((CANVAS / 2, CANVAS / 2), angle, SIZE / CANVAS * scale)
    m[:, 2] += np.array([cx, cy]) - CANVAS / 2
    return m


def _render(m: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    img, alpha = _canonical()
    rng = np.random.default_rng(seed)
    bg = np.clip(45 + rng.normal(0, 3, (SIZE, SIZE, 1)), 0, 255).repeat(3, -1)
    obj = cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
    a = cv2.warpAffine(alpha.astype(np.float32), m, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
    out = bg * (1 - a[..., None]) + obj * a[..., None] + rng.normal(0, 2, (SIZE, SIZE, 1))
    return np.clip(out, 0, 255).astype(np.uint8), a >= 0.5


def _relative(m2: np.ndarray, m1: np.ndarray) -> np.ndarray:
    """The similarity transform taking reference pixels (pose m1) to target pixels (pose m2)."""
    a, b = np.vstack([m1, [0, 0, 1]]), np.vstack([m2, [0, 0, 1]])
    return (b @ np.linalg.inv(a))[:2]


# reference pose, target pose: (cx, cy, angle°, scale)
CASES = {
    "translation": ((30, 40, 0, 1.0), (60, 55, 0, 1.0)),
    "rotation": ((48, 48, 0, 1.0), (48, 48, 90, 1.0)),
    "rotation+translation": ((35, 45, 20, 1.0), (60, 50, 160, 1.0)),
    "rotation+scale+translation": ((45, 45, -30, 0.9), (50, 52, 40, 1.15)),
}
DEFECT_AT = (100, 128)  # canvas point on the shaft, where the reference defect is painted


def _case(name: str):
    p1, p2 = CASES[name]
    m1, m2 = _pose(*p1), _pose(*p2)
    reference, fg_ref = _render(m1, seed=1)
    normal, fg_normal = _render(m2, seed=2)
    x, y = (m1 @ np.array([*DEFECT_AT, 1.0])).round().astype(int)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (int(x), int(y)), (6, 3), 30, 0, 360, 1, -1)
    mask = (mask > 0) & fg_ref
    reference[mask] = (235, 235, 225)  # the defect is visible on the reference
    t = _relative(m2, m1)
    expected = cv2.warpAffine(mask.astype(np.float32), t, (SIZE, SIZE)) >= 0.5
    return mask, reference, normal, fg_normal, expected


@pytest.fixture()
def cfg() -> FactoryConfig:
    return FactoryConfig()


# --------------------------------------------------------------------------- known transforms
@pytest.mark.parametrize("name", list(CASES))
def test_known_transform_beats_no_alignment(cfg, name):
    mask, reference, normal, fg_normal, expected = _case(name)
    aligned, record = CamaAligner(cfg, "key", "dent")(mask, reference, normal, seed=0)
    cama = alignment_metrics(aligned, fg_normal, expected)
    none = alignment_metrics(mask, fg_normal, expected)
    report = (
        f"{name}: IoU cama={cama['iou_expected']:.3f} none={none['iou_expected']:.3f} "
        f"fg_ratio={cama['foreground_ratio']:.3f} status={record['cama_status']}"
    )
    print(report)
    assert aligned.shape == normal.shape[:2] and aligned.sum() == mask.sum(), report
    assert cama["iou_expected"] > none["iou_expected"], report
    assert cama["foreground_ratio"] >= 0.95, report
    assert record["cama_foreground_ratio"] == pytest.approx(
        alignment_metrics(aligned, CamaAligner(cfg, "key", "dent").foreground(normal).mask)[
            "foreground_ratio"
        ]
    )


def test_demo_objects_keep_masks_on_the_object(cfg):
    """Few-shot demo masks aligned onto other poses stay >= 95% on the exact foreground."""
    for category, kind in (("nut_demo", "rust"), ("bar_demo", "spot")):
        for i in range(3):
            reference, mask = render_category(category, kind, 64, 0, 1000 + i)
            normal, _ = render_category(category, "good", 64, 0, i)
            exact = demo_foreground(category, 64, 0, i)
            aligned, record = CamaAligner(cfg, category, kind)(mask, reference, normal, seed=i)
            ratio = alignment_metrics(aligned, exact)["foreground_ratio"]
            assert ratio >= 0.95, f"{category}/{kind} #{i}: {ratio:.3f} {record}"


# --------------------------------------------------------------------------- fallback, determinism
def test_fallback_lands_on_the_foreground_and_is_seeded(cfg):
    cfg.cama.min_similarity = 1.0  # no cosine similarity reaches 1: matching must fail
    mask, reference, normal, fg_normal, _ = _case("rotation+translation")
    aligner = CamaAligner(cfg, "key", "dent")
    a1, r1 = aligner(mask, reference, normal, seed=3)
    a2, r2 = aligner(mask, reference, normal, seed=3)
    others = [aligner(mask, reference, normal, seed=s)[0] for s in range(4, 8)]
    assert r1["cama_status"] == "fallback" and r1["cama_n_fallback"] == 1
    assert r1["cama_fallback_reason"] == "low_similarity"
    assert np.array_equal(a1, a2)
    assert any(not np.array_equal(a1, o) for o in others)  # the seed picks the position
    assert alignment_metrics(a1, fg_normal)["foreground_ratio"] >= 0.95


def test_fallback_when_the_component_cannot_fit(cfg):
    """A component larger than the object falls back to its best-fitting centre."""
    normal = np.full((48, 48, 3), 40, np.uint8)
    normal[20:28, 20:28] = 200
    mask = np.zeros((48, 48), bool)
    mask[5:25, 5:25] = True
    aligned, record = CamaAligner(cfg, "obj", "dent")(mask, normal.copy(), normal, seed=0)
    assert record["cama_status"] == "fallback"
    assert (aligned & (normal[..., 0] > 100)).sum() == 64  # covers the whole object


def test_deterministic(cfg):
    mask, reference, normal, _, _ = _case("rotation")
    a1, r1 = CamaAligner(cfg, "key", "dent")(mask, reference, normal, seed=0)
    a2, r2 = CamaAligner(cfg, "key", "dent")(mask, reference, normal, seed=0)
    assert np.array_equal(a1, a2)
    assert r1 == r2 or all(r1[k] == r2[k] or (np.isnan(r1[k]) and np.isnan(r2[k])) for k in r1)


# --------------------------------------------------------------------------- options
def test_texture_and_disabled_leave_the_mask(cfg):
    img, mask = render_category("carpet_demo", "stain", 64, 0, 1000)
    aligned, record = CamaAligner(cfg, "carpet_demo", "stain")(mask, img, img, seed=0)
    assert record["cama_status"] == "texture" and np.array_equal(aligned, mask)
    cfg.cama.enabled = False
    aligned, record = CamaAligner(cfg, "nut_demo", "rust")(mask, img, img, seed=0)
    assert record["cama_status"] == "disabled" and np.array_equal(aligned, mask)


def test_outside_object_types_skip_the_foreground(cfg):
    """cable/* may leave the object; a screw scratch may not."""
    assert CamaAligner(cfg, "cable", "anything").outside
    assert CamaAligner(cfg, "screw", "manipulated_front").outside
    assert not CamaAligner(cfg, "screw", "scratch_head").outside
    # a mask in the background of the reference: only an outside type may stay off the object
    cfg.cama.min_similarity = 1.0  # force the random fallback, to test the allowed region
    normal = np.full((48, 48, 3), 40, np.uint8)
    normal[16:32, 16:32] = 200
    mask = np.zeros((48, 48), bool)
    mask[2:6, 2:6] = True
    off = []
    for seed in range(6):
        aligned, _ = CamaAligner(cfg, "cable", "poke")(mask, normal, normal, seed=seed)
        off.append(alignment_metrics(aligned, normal[..., 0] > 100)["foreground_ratio"] < 1)
        on, _ = CamaAligner(cfg, "bar", "dent")(mask, normal, normal, seed=seed)
        assert alignment_metrics(on, normal[..., 0] > 100)["foreground_ratio"] >= 0.95
    assert any(off)


def test_bad_foreground_is_reported_not_used(cfg):
    flat = np.full((48, 48, 3), 90, np.uint8)  # no object: empty foreground
    mask = np.zeros((48, 48), bool)
    mask[10:14, 10:14] = True
    aligned, record = CamaAligner(cfg, "bar", "dent")(mask, flat, flat, seed=0)
    assert record["cama_status"] == "bad_foreground"
    assert record["cama_foreground_status"] == "empty"
    assert np.array_equal(aligned, mask)


def test_different_sizes_map_exactly(cfg):
    """Reference at 96 px, normal = the same image at 144 px: the mask lands where it was."""
    cfg.cama.inpaint_reference = False  # identical content: test only the coordinate mapping
    m = _pose(45, 50, 30, 1.0)
    reference, fg = _render(m, seed=1)
    x, y = (m @ np.array([*DEFECT_AT, 1.0])).round().astype(int)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(mask, (int(x), int(y)), 4, 1, -1)
    mask = (mask > 0) & fg
    normal = cv2.resize(reference, (144, 144), interpolation=cv2.INTER_LINEAR)
    aligned, record = CamaAligner(cfg, "key", "dent")(mask, reference, normal, seed=0)
    expected = cv2.resize(mask.astype(np.uint8), (144, 144), interpolation=cv2.INTER_NEAREST) > 0
    score = iou(aligned, expected)
    assert aligned.shape == (144, 144) and record["cama_resized"]
    assert record["cama_status"] == "matched" and score > 0.5, f"IoU {score:.3f} {record}"


def test_bad_inputs_name_the_argument(cfg):
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="mask shape"):
        CamaAligner(cfg, "bar", "dent")(np.zeros((16, 16), bool), img, img, seed=0)
    with pytest.raises(ValueError, match="normal_image"):
        CamaAligner(cfg, "bar", "dent")(np.zeros((32, 32), bool), img, img[..., 0], seed=0)


# --------------------------------------------------------------------------- pieces
def test_keypoints_and_inside_fraction():
    comp = np.zeros((20, 20), bool)
    comp[4:9, 6:9] = True  # 5 rows x 3 cols
    centroid, top, bottom = keypoints(comp)
    assert centroid.tolist() == [7.0, 6.0]
    assert top.tolist() == [7, 4] and bottom.tolist() == [7, 8]
    region = np.zeros((20, 20), bool)
    region[10:20, 10:20] = True
    inside = inside_fraction_map(comp, (7, 6), region)
    assert inside[15, 15] == 1.0  # fully inside when centred at (15, 15)
    # centred at (x=11, y=10): rows 8..12 x cols 10..12, of which rows 10..12 are inside
    assert inside[10, 11] == pytest.approx(9 / 15)


def test_expected_placements_recover_a_known_rotation():
    _, fg_ref = _render(_pose(40, 44, 10, 1.0), 0)
    _, fg_normal = _render(_pose(52, 50, 100, 1.0), 0)
    m1, m2 = _pose(40, 44, 10, 1.0), _pose(52, 50, 100, 1.0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    x, y = (m1 @ np.array([*DEFECT_AT, 1.0])).round().astype(int)
    cv2.circle(mask, (int(x), int(y)), 4, 1, -1)
    truth = cv2.warpAffine(mask.astype(np.float32), _relative(m2, m1), (SIZE, SIZE)) >= 0.5
    placements = expected_placements(fg_ref, fg_normal, mask > 0)
    assert max(iou(p, truth) for p in placements) > 0.6


# --------------------------------------------------------------------------- DINOv2
def test_dinov2_path_runs_with_a_tiny_model(cfg, tmp_path):
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
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    cfg.cama.features = "dinov2"
    cfg.cama.features_model = str(tmp_path / "dino")
    cfg.cama.features_resolution = 64
    cfg.cama.device = "cpu"
    mask, reference, normal, fg_normal, _ = _case("rotation")
    aligned, record = CamaAligner(cfg, "key", "dent")(mask, reference, normal, seed=0)
    again, _ = CamaAligner(cfg, "key", "dent")(mask, reference, normal, seed=0)
    assert record["cama_features"] == "dinov2"
    assert record["cama_status"] in ("matched", "fallback")
    assert -1 <= record["cama_sim_top"] <= 1
    assert aligned.sum() == mask.sum() and np.array_equal(aligned, again)
    assert alignment_metrics(aligned, fg_normal)["foreground_ratio"] >= 0.95


# --------------------------------------------------------------------------- CLI
def test_align_cli(demo_manifest_path, tmp_path):
    runner = CliRunner()
    base = ["align", "--manifest", str(demo_manifest_path), "--category", "nut_demo"]
    base += ["--anomaly-type", "rust", "--n", "4"]
    out = tmp_path / "cama"
    result = runner.invoke(app, [*base, "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "alignments.parquet")
    cols = {"normal_path", "reference_path", "mask_path", "status", "foreground_ratio"}
    assert cols <= set(table.columns) and len(table) == 4
    assert set(table["status"]) <= {"matched", "fallback"}
    assert (table["foreground_ratio_exact"] >= 0.95).all()
    assert table["iou_expected"].notna().all()
    for row in table.itertuples():
        m = np.asarray(Image.open(row.mask_path))
        assert m.shape == np.asarray(Image.open(row.normal_path)).shape[:2]

    base_out = tmp_path / "none"
    result = runner.invoke(app, [*base, "--out", str(base_out), "--no-cama"])
    assert result.exit_code == 0, result.output
    none = pd.read_parquet(base_out / "alignments.parquet")
    assert (none["status"] == "no_cama").all()
    assert list(none["normal_path"]) == list(table["normal_path"])  # same seeded sample
    for row in none.itertuples():
        ref = np.asarray(Image.open(row.reference_mask_path)) > 127
        assert np.array_equal(np.asarray(Image.open(row.mask_path)) > 127, ref)


def test_align_cli_errors_name_the_problem(demo_manifest_path, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "align",
            "--manifest",
            str(demo_manifest_path),
            "--category",
            "nut_demo",
            "--anomaly-type",
            "dent",
            "--n",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "dent" in result.output


# --------------------------------------------------------------------------- generate path
SCENE = 128  # side of the generate-path scene
TRAY = (slice(6, 40), slice(96, 122))  # a fixture beside the object: foreground by colour


def _scene(pose: tuple[float, float, float, float], seed: int):
    """The key at ``pose`` next to a textured tray; the image, the key's exact
    foreground and the canvas-to-image map."""
    cx, cy, angle, scale = pose
    m = cv2.getRotationMatrix2D((CANVAS / 2, CANVAS / 2), angle, SCENE / CANVAS * scale)
    m[:, 2] += np.array([cx, cy]) - CANVAS / 2
    img, alpha = _canonical()
    rng = np.random.default_rng(seed)
    bg = np.clip(45 + rng.normal(0, 3, (SCENE, SCENE, 1)), 0, 255).repeat(3, -1)
    yy, xx = np.mgrid[0:SCENE, 0:SCENE]
    checker = ((yy // 4 + xx // 4) % 2)[..., None] * np.array([40, 60, 10])
    bg[TRAY] = (np.array([60, 110, 60]) + checker)[TRAY]
    obj = cv2.warpAffine(img, m, (SCENE, SCENE), flags=cv2.INTER_LINEAR)
    a = cv2.warpAffine(alpha.astype(np.float32), m, (SCENE, SCENE), flags=cv2.INTER_LINEAR)
    out = bg * (1 - a[..., None]) + obj * a[..., None] + rng.normal(0, 2, (SCENE, SCENE, 1))
    return np.clip(out, 0, 255).astype(np.uint8), a >= 0.5, m


def _ellipse(center, axes, angle=0) -> np.ndarray:
    mask = np.zeros((SCENE, SCENE), np.uint8)
    cx, cy = (int(round(v)) for v in center)
    cv2.ellipse(mask, (cx, cy), axes, angle, 0, 360, 1, -1)
    return mask > 0


def test_generate_path_takes_keypoints_from_the_reference_defect(cfg, tmp_path):
    """A generated mask that the mask generator put on the tray of the reference image:
    CAMA must read its keypoints where the reference shows its defect (on the key's
    shaft), not where the generated mask happens to lie. Through ``align_pair`` (the
    generate path) the mask lands on the key; the old call, which read the keypoints
    under the generated mask, sends it to the tray."""
    from anomaly_factory.generators.magic.pairs import ImageCache, align_pair

    cases = [((50, 80, 10, 0.8), (60, 75, -25, 0.8)), ((48, 84, -15, 0.8), (64, 80, 30, 0.8))]
    old_share, new_share, miss = [], [], []
    for k, (p_ref, p_normal) in enumerate(cases):
        reference, fg_ref, m1 = _scene(p_ref, seed=1)
        normal, fg_normal, m2 = _scene(p_normal, seed=2)
        defect_at = m1 @ np.array([*DEFECT_AT, 1.0])
        truth = _ellipse(defect_at, (5, 3), 30) & fg_ref
        reference[truth] = (235, 235, 225)
        generated = _ellipse((108, 22), (4, 3))  # the mask source's mask: on the tray
        paths = {}
        for name, arr in (("ref", reference), ("normal", normal), ("ref_mask", truth)):
            paths[name] = str(tmp_path / f"{k}_{name}.png")
            Image.fromarray(arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)).save(
                paths[name]
            )
        normals = pd.DataFrame({"image_path": [paths["normal"]]})
        refs = pd.DataFrame({"image_path": [paths["ref"]], "mask_path": [paths["ref_mask"]]})
        aligner = CamaAligner(cfg, "key", "dent")
        _, got_normal, placed, record = align_pair(
            cfg, "key", "dent", 0, generated, normals, refs, ImageCache(None, SCENE), aligner
        )
        assert np.array_equal(got_normal, normal)
        assert record["reference_mask_source"] == paths["ref_mask"]
        assert record["cama_n_reference_components"] == 1
        old, _ = aligner(generated, reference, normal, 0)  # the call generate made before
        old_share.append(alignment_metrics(old, fg_normal)["foreground_ratio"])
        new_share.append(alignment_metrics(placed, fg_normal)["foreground_ratio"])
        expected = m2 @ np.array([*DEFECT_AT, 1.0])
        ys, xs = np.nonzero(placed)
        miss.append(float(np.hypot(xs.mean() - expected[0], ys.mean() - expected[1])))
        assert placed.sum() == generated.sum()  # the generated shape is placed, whole
    report = (
        f"share of mask pixels on the key: old call {np.round(old_share, 3).tolist()}, "
        f"generate path {np.round(new_share, 3).tolist()}; distance to the expected "
        f"defect centre {np.round(miss, 1).tolist()} px (of {SCENE})"
    )
    print(report)
    assert min(new_share) >= 0.95 and max(old_share) < 0.5, report
    assert max(miss) < 0.15 * SCENE, report


def test_generated_components_pair_with_reference_components(cfg):
    """Two generated blobs, one reference defect: the second reuses the reference's
    keypoint line but may not stack on the first."""
    reference, fg_ref, m1 = _scene((50, 80, 10, 0.8), seed=1)
    normal, _, _ = _scene((60, 75, -25, 0.8), seed=2)
    truth = _ellipse(m1 @ np.array([*DEFECT_AT, 1.0]), (5, 3), 30) & fg_ref
    reference[truth] = (235, 235, 225)
    generated = _ellipse((108, 22), (4, 3)) | _ellipse((20, 20), (2, 2))
    aligner = CamaAligner(cfg, "key", "dent")
    placed, record = aligner(generated, reference, normal, 0, reference_mask=truth)
    assert record["cama_n_components"] == 2 and record["cama_n_reference_components"] == 1
    assert placed.sum() == generated.sum()  # no overlap: both blobs kept whole
    empty, record = aligner(generated, reference, normal, 0, reference_mask=np.zeros_like(truth))
    assert record["cama_fallback_reason"] == "no_reference_defect"
    fg = aligner.foreground(normal).mask
    assert alignment_metrics(empty, fg)["foreground_ratio"] >= 0.95
