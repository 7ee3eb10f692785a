"""Mask generator (MAGIC §3.1): rejection rules, novelty, determinism, save/load, folder source."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_factory.config import MaskGeneratorSection, MasksSection
from anomaly_factory.generators.magic import masks as M
from anomaly_factory.io import save_png

RULES = {"min_area": 0.001, "max_area": 0.3, "max_border_fraction": 1 / 3}


def _mask(size=32, box=None):
    m = np.zeros((size, size), bool)
    if box:
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        (None, "empty"),
        ((0, 32, 0, 32), "area"),  # covers everything
        ((10, 11, 10, 11), "area"),  # 1 px of 1024 < 0.001
        ((0, 3, 2, 14), "border"),  # 12 of 32 top-border pixels > 1/3
        ((0, 3, 2, 12), None),  # 10 of 32: allowed
        ((8, 16, 8, 16), None),
    ],
)
def test_rejection_rules(box, reason):
    assert M.rejection_reason(_mask(box=box), **RULES) == reason


def test_derive_seed_is_stable_and_distinct():
    assert M.derive_seed(0, "a", 1) == M.derive_seed(0, "a", 1)
    assert M.derive_seed(0, "a", 1) != M.derive_seed(0, "a", 2)
    assert 0 <= M.derive_seed("x") < 2**63


@pytest.fixture(scope="module", params=["image", "defect"])
def trained(demo_manifest_path, request):
    section = MaskGeneratorSection(
        resolution=32, steps=200, sample_steps=10, batch_size=8, window=request.param
    )
    cfg = MasksSection(seed=3, generator=section, max_area=0.3, max_tries_per_mask=40)
    train, _ = M.fewshot_masks(demo_manifest_path, "carpet_demo", "stain", 64)
    return cfg, train, M.MaskGenerator.fit(train, section, seed=0)


@pytest.mark.slow
def test_generated_masks_obey_rules_and_are_new(trained, tmp_path):
    cfg, train, gen = trained
    src = M.GeneratorMaskSource(gen, cfg, seed=7)
    masks = src.masks(6, 64)
    for m in masks:
        assert m.shape == (64, 64)
        assert M.rejection_reason(m, cfg.min_area, cfg.max_area, cfg.max_border_fraction) is None
    iou = M.nearest_iou(masks, train)
    print(f"nearest-training-mask IoU: {np.round(iou, 3).tolist()}, rejected {src.rejected}")
    print(f"areas: {[round(float(m.mean()), 4) for m in masks]}, train {train.mean((1, 2))}")
    assert np.all(iou < 1.0)
    assert len({m.tobytes() for m in masks}) == len(masks)

    # deterministic by seed; mask i does not depend on how many are asked for
    again = M.GeneratorMaskSource(gen, cfg, seed=7).masks(6, 64)
    assert all(np.array_equal(a, b) for a, b in zip(masks, again, strict=True))
    part = M.GeneratorMaskSource(gen, cfg, seed=7).masks_for([2], 6, 64)
    assert np.array_equal(part[2], masks[2])
    other = M.GeneratorMaskSource(gen, cfg, seed=8).masks(6, 64)
    assert not all(np.array_equal(a, b) for a, b in zip(masks, other, strict=True))

    # safetensors round trip gives the same masks
    gen.save(tmp_path / "gen")
    assert (tmp_path / "gen" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = M.MaskGenerator.load(tmp_path / "gen")
    assert loaded.section == gen.section
    reloaded = M.GeneratorMaskSource(loaded, cfg, seed=7).masks(6, 64)
    assert all(np.array_equal(a, b) for a, b in zip(masks, reloaded, strict=True))


def test_impossible_rules_fail_clearly(trained):
    cfg, _, gen = trained
    strict = cfg.model_copy(update={"min_area": 0.9, "max_area": 0.95, "max_tries_per_mask": 2})
    with pytest.raises(RuntimeError, match="rejected 2 times"):
        M.GeneratorMaskSource(gen, strict, seed=0).masks(1, 32)


def test_folder_source_skips_rejected_and_is_seeded(tmp_path):
    folder = tmp_path / "masks" / "carpet_demo" / "stain"
    good = [_mask(box=(4 + i, 12 + i, 5, 15)) for i in range(3)]
    for i, m in enumerate(good):
        save_png(folder / f"{i:03d}.png", m.astype(np.uint8) * 255)
    save_png(folder / "900.png", _mask().astype(np.uint8))  # empty: rejected
    save_png(folder / "901.png", _mask(box=(0, 32, 0, 5)).astype(np.uint8) * 255)  # border
    cfg = MasksSection(source="folder", folder=tmp_path / "masks", **RULES)
    src = M.mask_source(cfg, tmp_path / "unused.parquet", "carpet_demo", "stain")
    assert isinstance(src, M.FolderMaskSource) and src.folder == folder
    out = src.masks(5, 32)
    assert src.rejected == {"empty": 1, "area": 0, "border": 1}
    keys = [m.tobytes() for m in out]
    assert set(keys) == {m.tobytes() for m in good}
    assert keys[3:] == keys[:2]  # cycles through the accepted masks
    again = M.mask_source(cfg, tmp_path / "unused.parquet", "carpet_demo", "stain").masks(5, 32)
    assert [m.tobytes() for m in again] == keys
    with pytest.raises(FileNotFoundError, match="masks.folder"):
        M.FolderMaskSource(tmp_path / "nope", cfg, 0, "c", "t")


def _scratch(size: int = 1024, width: int = 6) -> np.ndarray:
    import cv2

    m = np.zeros((size, size), np.uint8)
    cv2.line(m, (120, 200), (880, 690), 1, width)
    return m > 0


@pytest.mark.parametrize("width", [1, 6])
def test_thin_scratches_survive_the_generator_resolution(width):
    """A 6-px scratch of a 1024-px screw image at the mask generator's 32 px: nearest
    sampling kept at most a few pixels, so the generator learnt empty masks."""
    import cv2

    small = M.resize_mask(_scratch(width=width), 32)
    n_parts = cv2.connectedComponents(small.astype(np.uint8))[0] - 1
    print(f"{width}-px scratch at 32 px: {int(small.sum())} cells, {n_parts} component(s)")
    assert small.sum() >= 20 and n_parts == 1
    blob = np.zeros((1024, 1024), bool)
    blob[300:600, 200:650] = True  # blobs keep their area (half-covered cells)
    assert M.resize_mask(blob, 32).mean() == pytest.approx(blob.mean(), abs=0.01)


def test_fewshot_thin_masks_train_the_generator(tmp_path):
    """fewshot_masks at the generator's resolution keep every thin few-shot defect."""
    import pandas as pd

    from anomaly_factory.manifest import write_images

    rows = []
    for i in range(3):
        save_png(tmp_path / f"{i}_mask.png", _scratch(width=4 + i).astype(np.uint8) * 255)
        save_png(tmp_path / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
        rows.append(
            {
                "dataset": "mvtec_ad",
                "category": "screw",
                "anomaly_type": "scratch_neck",
                "split": "fewshot",
                "image_path": str(tmp_path / f"{i}.png"),
                "mask_path": str(tmp_path / f"{i}_mask.png"),
                "xyz_path": None,
                "width": 1024,
                "height": 1024,
                "channels": 3,
                "sha256": str(i),
            }
        )
    write_images(pd.DataFrame(rows), tmp_path / "manifest.parquet")
    train, _ = M.fewshot_masks(tmp_path / "manifest.parquet", "screw", "scratch_neck", 32)
    assert train.shape == (3, 32, 32) and all(m.sum() >= 20 for m in train)


class _FaintGenerator:
    """Stands in for an undertrained DDPM: every sample is a faint 2x2 dot in a corner,
    peak 0.3, under the 0.5 threshold."""

    def __init__(self, section: MaskGeneratorSection):
        self.section = section

    def sample_soft(self, seeds):
        import torch

        soft = torch.zeros((len(seeds), 1, 32, 32))
        soft[:, :, :2, :2] = 0.3
        return soft

    def place(self, soft, size, seed):
        return M.place_sample(soft, size, self.section, {}, seed)


def test_faint_samples_are_rejected_not_turned_into_corner_dots():
    """A sample with nothing above the threshold is empty: rejected, then the few-shot
    fallback is used. (A peak-relative threshold made such samples into corner dots.)"""
    section = MaskGeneratorSection(resolution=32, batch_size=4)
    cfg = MasksSection(seed=0, generator=section, min_area=0.001, max_tries_per_mask=3)
    fewshot = _mask(box=(10, 20, 12, 16))[None]
    src = M.GeneratorMaskSource(_FaintGenerator(section), cfg, seed=0, fallback=fewshot)
    masks = src.masks(2, 32)
    assert src.rejected["empty"] == 2 * 3
    assert src.fallback_used == {0, 1}
    for m in masks:
        assert not m[:2, :2].any() or m.sum() > 4  # no corner dot
        assert m.sum() == fewshot.sum()  # the augmented few-shot mask, same area


def test_mid_attention_is_optional():
    """masks.generator.mid_attention builds the mask UNet with or without its mid-block
    self-attention (at 64 px over 2 levels it attends over 1024 positions)."""
    from diffusers.models.attention_processor import Attention

    def n_attention(section):
        return sum(isinstance(m, Attention) for m in M.build_mask_unet(section).modules())

    assert n_attention(MaskGeneratorSection(resolution=32, channels=[8, 16])) == 1
    assert (
        n_attention(MaskGeneratorSection(resolution=32, channels=[8, 16], mid_attention=False)) == 0
    )


class _SpeckGenerator(_FaintGenerator):
    """Every sample is a clear 2x2 speck (4 px of 32 x 32) away from the borders."""

    def sample_soft(self, seeds):
        import torch

        soft = torch.zeros((len(seeds), 1, 32, 32))
        soft[:, :, 15:17, 15:17] = 1.0
        return soft


@pytest.mark.parametrize("ratio, specks_kept", [(0.0, True), (0.5, False)])
def test_specks_under_half_the_smallest_fewshot_mask_are_rejected(tmp_path, ratio, specks_kept):
    """masks.min_area_vs_fewshot: a 4-px speck is under half of a 16-px few-shot mask, so
    it is rejected as 'area' (the few-shot fallback stands in); with 0 it is kept."""
    from PIL import Image

    section = MaskGeneratorSection(resolution=32, batch_size=4)
    cfg = MasksSection(
        seed=0, generator=section, min_area=0.001, max_tries_per_mask=2, min_area_vs_fewshot=ratio
    )
    fewshot = _mask(box=(8, 12, 20, 24))  # 16 px
    Image.fromarray(fewshot.astype(np.uint8) * 255).save(tmp_path / "000_mask.png")
    min_area = M.fewshot_bounds(cfg, [str(tmp_path / "000_mask.png")]).min_area
    assert min_area == pytest.approx(ratio * 16 / 32**2)
    bounds = M.FewshotBounds(min_area=min_area)
    src = M.GeneratorMaskSource(_SpeckGenerator(section), cfg, 0, fewshot[None], bounds)
    masks = src.masks(2, 32)
    assert [int(m.sum()) for m in masks] == ([4, 4] if specks_kept else [16, 16])
    assert src.rejected["area"] == (0 if specks_kept else 2 * 2)


def test_defect_windows_round_trip_to_the_few_shot_masks():
    """A defect window cut at the generator's own resolution and placed back at its own
    centre with no shift is the few-shot mask again, pixel for pixel; with a shift, the
    same shape moves by at most place_shift of the side."""
    import torch

    a = _mask(64, (28, 34, 26, 36))  # 6 x 10 box, far enough from the borders to move
    b = _mask(64, (40, 48, 44, 47))
    b[44:46, 50:54] = True  # a second piece: the window keeps both
    section = MaskGeneratorSection(resolution=16, window="defect", window_margin=1.6, place_shift=0)
    crops, info = M.defect_windows(np.stack([a, b]), section)
    assert crops.shape == (2, 16, 16) and info["window_fraction"] == 16 / 64
    assert crops[0].sum() == a.sum() and crops[1].sum() == b.sum()
    for k, m in enumerate((a, b)):
        one = {**info, "centres": [info["centres"][k]]}
        soft = torch.from_numpy(crops[k].astype(np.float32))[None]
        assert np.array_equal(M.place_sample(soft, 64, section, one, seed=5), m)
    moved = section.model_copy(update={"place_shift": 0.25})
    one = {**info, "centres": [info["centres"][0]]}
    soft = torch.from_numpy(crops[0].astype(np.float32))[None]
    placed = [M.place_sample(soft, 64, moved, one, seed=s) for s in range(8)]
    offsets = set()
    for m in placed:
        ys, xs = np.nonzero(m)
        assert m.sum() == a.sum()  # the same shape, moved
        dy, dx = ys.min() - 28, xs.min() - 26
        assert abs(dy) <= 16 + 1 and abs(dx) <= 16 + 1
        offsets.add((int(dy), int(dx)))
    assert len(offsets) > 1  # seeded shifts differ


class _TwoDotGenerator:
    """Every sample is two separate dots: a stroke broken into pieces."""

    def __init__(self, section: MaskGeneratorSection):
        self.section = section

    def sample_soft(self, seeds):
        import torch

        soft = torch.zeros((len(seeds), 1, 32, 32))
        soft[:, :, 8:12, 8:12] = 1.0
        soft[:, :, 20:24, 20:24] = 1.0
        return soft

    def place(self, soft, size, seed):
        return M.place_sample(soft, size, self.section, {}, seed)


@pytest.mark.parametrize("max_pieces", [None, 1, 2])
def test_masks_in_more_pieces_than_the_few_shot_ones_are_rejected(max_pieces):
    section = MaskGeneratorSection(resolution=32, batch_size=4)
    cfg = MasksSection(seed=0, generator=section, min_area=0.001, max_tries_per_mask=3)
    fewshot = _mask(box=(10, 20, 12, 16))[None]
    src = M.GeneratorMaskSource(
        _TwoDotGenerator(section), cfg, 0, fewshot, M.FewshotBounds(max_pieces=max_pieces)
    )
    masks = src.masks(2, 32)
    broken = max_pieces == 1
    assert src.rejected["pieces"] == (2 * 3 if broken else 0)
    assert src.fallback_used == ({0, 1} if broken else set())
    assert all(M.piece_count(m) == (1 if broken else 2) for m in masks)


def test_max_pieces_comes_from_the_fewshot_masks(tmp_path):
    one, two = _mask(box=(4, 8, 4, 8)), _mask(box=(4, 8, 4, 8))
    two[20:24, 20:24] = True
    for name, m in (("one", one), ("two", two)):
        save_png(tmp_path / f"{name}.png", m.astype(np.uint8) * 255)
    paths = [str(tmp_path / "one.png"), str(tmp_path / "two.png")]
    on = MasksSection(max_pieces_vs_fewshot=True)
    assert M.fewshot_bounds(on, paths).max_pieces == 2
    assert M.fewshot_bounds(on, paths[:1]).max_pieces == 1
    assert M.fewshot_bounds(MasksSection(), paths).max_pieces is None


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_elongation_is_length_over_width_at_any_angle(angle):
    """A 40 x 4 px box at any angle (41 x 5 px filled) is about 8.2 long per wide; a disc 4/pi."""
    import cv2

    stroke = np.zeros((96, 96), np.uint8)
    corners = cv2.boxPoints(((48.0, 48.0), (40.0, 4.0), angle))
    cv2.fillPoly(stroke, [np.round(corners).astype(np.int32)], 1)
    assert M.elongation(stroke > 0) == pytest.approx(41 / 5, rel=0.06)  # filled with its edges
    disc = np.zeros((96, 96), np.uint8)
    cv2.circle(disc, (48, 48), 15, 1, -1)
    assert M.elongation(disc > 0) == pytest.approx(4 / np.pi, rel=0.05)
    assert M.elongation(np.zeros((8, 8), bool)) == 0.0


class _StubGenerator(_TwoDotGenerator):
    """Every sample is a 4 x 4 stub (elongation 1)."""

    def sample_soft(self, seeds):
        import torch

        soft = torch.zeros((len(seeds), 1, 32, 32))
        soft[:, :, 14:18, 14:18] = 1.0
        return soft


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_stubs_less_elongated_than_the_few_shot_strokes_are_rejected(tmp_path, ratio):
    """masks.min_elongation_vs_fewshot: with few-shot strokes 16 x 2 (elongation 8), a
    4 x 4 stub is rejected as 'elongation' at ratios whose bound (8 x ratio) exceeds 1,
    and the few-shot fallback stands in; at 0 it is kept."""
    section = MaskGeneratorSection(resolution=32, batch_size=4)
    cfg = MasksSection(
        seed=0,
        generator=section,
        min_area=0.001,
        max_tries_per_mask=3,
        min_elongation_vs_fewshot=ratio,
    )
    strokes = [_mask(box=(10, 12, 8, 24)), _mask(box=(4, 20, 20, 22))]
    for k, m in enumerate(strokes):
        save_png(tmp_path / f"{k}.png", m.astype(np.uint8) * 255)
    paths = [str(tmp_path / f"{k}.png") for k in range(2)]
    bound = M.fewshot_bounds(cfg, paths).min_elongation
    assert bound == pytest.approx(ratio * 8.0)
    src = M.GeneratorMaskSource(
        _StubGenerator(section), cfg, 0, np.stack(strokes), M.FewshotBounds(min_elongation=bound)
    )
    masks = src.masks(2, 32)
    kept = ratio == 0.0
    assert src.rejected["elongation"] == (0 if kept else 2 * 3)
    assert src.fallback_used == (set() if kept else {0, 1})
    assert all((M.elongation(m) == 1.0) == kept for m in masks)
