"""AnomalyControl end to end on the tiny backbone: adapter training, pairs, non-matching references."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from anomaly_factory.config import load_config
from anomaly_factory.gates.pair_checks import dilate, outside_region, pair_checks_for_manifest
from anomaly_factory.generators.anomalycontrol.csm import load_blip2
from anomaly_factory.generators.anomalycontrol.train import (
    ADAPTER_FILE,
    META_FILE,
    checkpoint_dir,
    drop_conditions,
    load_captions,
    train_adapter,
    training_references,
)
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.composite import blurred_mask_alpha
from anomaly_factory.generators.registry import get_generator
from anomaly_factory.images import read_mask, read_rgb
from anomaly_factory.io import save_png
from anomaly_factory.manifest import pair_params, read_images, read_pairs

from .blip2_checkpoints import save_generation
from .conftest import REPO


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("anomalycontrol")
    return {
        "model": {
            "cache_dir": str(root / "models"),
            "tiny": {"pretrain_vae_steps": 2, "pretrain_unet_steps": 2, "pretrain_batch_size": 2},
        },
        "anomalycontrol": {
            "cache_dir": str(root / "cache"),
            "out_dir": str(root / "checkpoints"),
            "steps": 3,
            "batch_size": 2,
            "asea": {"steps": 2},
            "adapter": {"steps": 2, "batch_size": 2, "checkpoint_every": 1},
        },
    }


@pytest.fixture(scope="module")
def cfg(overrides):
    return load_config(REPO / "pipelines.yaml", "tiny", overrides=overrides)


@pytest.fixture(scope="module")
def checkpoint(cfg, demo_manifest_path):
    return train_adapter(cfg, demo_manifest_path, "carpet_demo")


def test_adapter_checkpoint(checkpoint, cfg) -> None:
    meta = json.loads((checkpoint / META_FILE).read_text())
    assert meta["complete"] and meta["step"] == cfg.anomalycontrol.adapter.steps
    assert meta["n_tokens"] == cfg.anomalycontrol.n_tokens
    assert (checkpoint / ADAPTER_FILE).is_file()
    assert not (checkpoint / "optimizer.safetensors").exists()  # only partial runs keep it


def test_generate_pairs_with_non_matching_reference(cfg, demo_manifest_path, checkpoint, tmp_path):
    generate = _run
    out = tmp_path / "pairs"
    kwargs = dict(
        checkpoint=checkpoint,
        reference_text="a photo of a deep cut",
        reference_category="tile_demo",
        reference_type="crack",
    )
    path = generate(cfg, demo_manifest_path, "carpet_demo", "cut", 3, out, **kwargs)
    df = read_pairs(path)
    params = _params(df)
    assert len(df) == 3 and set(df["generator"]) == {"anomalycontrol"}
    assert set(df["category"]) == {"carpet_demo"} and set(df["anomaly_type"]) == {"cut"}
    assert set(params["reference_category"]) == {"tile_demo"}
    assert set(params["reference_type"]) == {"crack"}
    assert set(params["reference_text"]) == {"a photo of a deep cut"}
    assert set(params["target_prompt"]) == {
        "a photo of a deep cut"
    }  # no --prompt: the public code's
    assert all("/tile_demo/" in p for p in params["reference_image"])
    assert set(params["strength"]) == {cfg.anomalycontrol.strength}
    res = cfg.model.resolution
    for row in df.itertuples():
        image = np.asarray(Image.open(row.image_path))
        mask = np.asarray(Image.open(row.mask_path))
        normal = np.asarray(Image.open(row.normal_path))
        assert image.shape == normal.shape == (res, res, 3)
        assert mask.shape == (res, res) and set(np.unique(mask)) <= {0, 255} and mask.any()
    assert (params["asea_mass_after"] > params["asea_mass_before"]).all()

    # a re-run finds every pair done and rebuilds the same manifest
    before = path.read_bytes()
    records = {p: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}
    path = generate(cfg, demo_manifest_path, "carpet_demo", "cut", 3, out, **kwargs)
    assert path.read_bytes() == before
    assert records == {p: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}


def test_checkpoint_with_other_token_count_is_rejected(
    cfg, demo_manifest_path, checkpoint, tmp_path
):
    other = cfg.model_copy(deep=True)
    other.anomalycontrol.n_tokens = 2
    with pytest.raises(ValueError, match="n_tokens"):
        _run(other, demo_manifest_path, "carpet_demo", "cut", 1, tmp_path, checkpoint=checkpoint)


def test_condition_drop_rates() -> None:
    n = 200_000
    text, image = drop_conditions(n, 0.05, 0.05, 0.05, torch.Generator().manual_seed(0))
    both = (text & image).float().mean().item()
    text_only = (text & ~image).float().mean().item()
    image_only = (image & ~text).float().mean().item()
    for rate in (both, text_only, image_only):
        assert rate == pytest.approx(0.05, abs=0.003)


def test_interrupted_training_resumes_to_the_same_weights(
    cfg, demo_manifest_path, checkpoint, tmp_path, monkeypatch
) -> None:
    from safetensors.torch import load_file

    from anomaly_factory.generators.anomalycontrol import train

    real_save = train._save

    def crash_after_partial(*args, **kwargs):
        real_save(*args, **kwargs)
        if not kwargs["complete"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save", crash_after_partial)
    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cfg, demo_manifest_path, "carpet_demo", out)
    assert json.loads((out / META_FILE).read_text())["step"] == 1
    monkeypatch.setattr(train, "_save", real_save)
    train_adapter(cfg, demo_manifest_path, "carpet_demo", out)
    resumed, straight = load_file(out / ADAPTER_FILE), load_file(checkpoint / ADAPTER_FILE)
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- helpers
def _run(cfg, manifest, category, anomaly_type, n, out, checkpoint=None, **options) -> Path:
    """AnomalyControl's pairs of one request; ``options``: the reference of the call."""
    request = GenerationRequest(
        cfg, manifest, category, anomaly_type, n, out, checkpoint, options=options
    )
    return get_generator("anomalycontrol").generate(request)


def _params(pairs: pd.DataFrame) -> pd.DataFrame:
    """The generator's own columns of each pair (its params JSON), as a table."""
    return pd.DataFrame([pair_params(row) for row in pairs.to_dict("records")])


def _generate(cfg, manifest, out, n=2, category="carpet_demo", anomaly_type="cut", **kwargs):
    return read_pairs(_run(cfg, manifest, category, anomaly_type, n, out, **kwargs))


def _pair(row):
    image, normal = read_rgb(row.image_path), read_rgb(row.normal_path)
    return image, read_mask(row.mask_path, source="binary"), normal


def _fewshot(manifest_path, category: str, anomaly_type: str):
    df = read_images(manifest_path)
    rows = df[(df["category"] == category) & (df["anomaly_type"] == anomaly_type)]
    return rows[rows["split"] == "fewshot"].sort_values("image_path").iloc[0]


# --------------------------------------------------------------------------- composite (item 4)
def test_output_is_the_normal_image_outside_the_dilated_mask(
    cfg, demo_manifest_path, checkpoint, tmp_path
) -> None:
    """The 9-channel UNet repaints everything; the composite puts the normal back."""
    dilation = cfg.gates.pair_checks.dilation_px
    assert cfg.anomalycontrol.composite.method == "paste_back"
    assert cfg.anomalycontrol.composite.feather_px + 1 <= dilation
    pasted = _generate(cfg, demo_manifest_path, tmp_path / "paste", checkpoint=checkpoint)
    assert set(_params(pasted)["composite"]) == {"paste_back"}
    for row in pasted.itertuples():
        image, mask, normal = _pair(row)
        outside = outside_region(mask, dilation)
        assert np.array_equal(image[outside], normal[outside])
        assert np.abs(image[mask].astype(int) - normal[mask]).mean() > 1  # a defect was painted

    blurred_cfg = cfg.model_copy(deep=True)
    blurred_cfg.anomalycontrol.composite.method = "blurred_mask"
    blurred_cfg.anomalycontrol.composite.blur_sigma = 2.0
    blurred = _generate(blurred_cfg, demo_manifest_path, tmp_path / "blur", checkpoint=checkpoint)
    for row in blurred.itertuples():
        image, mask, normal = _pair(row)
        far = blurred_mask_alpha(mask, 2.0) == 0
        assert far.any() and np.array_equal(image[far], normal[far])

    raw_cfg = cfg.model_copy(deep=True)
    raw_cfg.anomalycontrol.composite.method = "none"
    raw = _generate(raw_cfg, demo_manifest_path, tmp_path / "none", checkpoint=checkpoint)
    changed = []
    for row in raw.itertuples():
        image, mask, normal = _pair(row)
        outside = outside_region(mask, dilation)
        changed.append(np.abs(image[outside].astype(int) - normal[outside]).mean())
    assert min(changed) > 0.5  # without a composite the background is a VAE round trip


def test_pairs_pass_the_gates_pixel_checks(cfg, demo_manifest_path, checkpoint, tmp_path) -> None:
    pairs = tmp_path / "pairs.parquet"
    _generate(cfg, demo_manifest_path, tmp_path, n=4, checkpoint=checkpoint)
    table = pair_checks_for_manifest(cfg, pairs, demo_manifest_path)
    assert len(table) == 4
    assert (table["bg_psnr"] == np.inf).all()  # background kept
    assert (table["change_inside"] >= cfg.gates.pair_checks.change_min).all()  # anomaly present
    assert table["passed"].all(), table["reasons"].tolist()


# --------------------------------------------------------------------------- scope (item 3)
def test_scope_all_trains_one_adapter_for_every_category(
    cfg, demo_manifest_path, checkpoint, tmp_path, monkeypatch
) -> None:
    from anomaly_factory.generators.anomalycontrol import train
    from anomaly_factory.generators.magic.models import pretrained_tiny_pipeline

    shared = cfg.model_copy(deep=True)  # one base for every category, as SD2 in the paper
    shared.model.preset = "sd2_inpainting"
    shared.model.pretrained = str(pretrained_tiny_pipeline(cfg, "carpet_demo", demo_manifest_path))
    shared.anomalycontrol.adapter.scope = "all"
    shared.anomalycontrol.out_dir = tmp_path / "adapters"
    calls = []
    real = train.prepare_data
    monkeypatch.setattr(train, "prepare_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    folders = {c: train_adapter(shared, demo_manifest_path, c) for c in ("carpet_demo", "nut_demo")}
    assert folders["carpet_demo"] == folders["nut_demo"]
    assert folders["carpet_demo"].name.startswith("all-") and len(calls) == 1
    meta = json.loads((folders["carpet_demo"] / META_FILE).read_text())
    assert meta["categories"] == sorted(read_images(demo_manifest_path)["category"].unique())

    weights = load_blip2(cfg.anomalycontrol.blip2).weights_hash
    per_category = {c: checkpoint_dir(cfg, demo_manifest_path, c, weights) for c in folders}
    assert per_category["carpet_demo"] == checkpoint
    assert per_category["nut_demo"].name.startswith("nut_demo-")
    assert per_category["carpet_demo"] != per_category["nut_demo"]


# --------------------------------------------------------------------------- prompts (items 5, 6)
@pytest.fixture(scope="module")
def elsewhere(demo_manifest_path, tmp_path_factory):
    """A tile crack and its mask copied out of the dataset, under other names."""
    row = _fewshot(demo_manifest_path, "tile_demo", "crack")
    folder = tmp_path_factory.mktemp("elsewhere")
    image, mask = folder / "ref.png", folder / "ref-defect.png"
    shutil.copy(row.image_path, image)
    shutil.copy(row.mask_path, mask)
    return image, mask


def test_cross_category_transfer_records_both_prompts_and_the_reference_files(
    cfg, demo_manifest_path, checkpoint, elsewhere, tmp_path
) -> None:
    image, mask = elsewhere
    kwargs = dict(
        checkpoint=checkpoint,
        reference_image=image,
        reference_mask=mask,
        reference_category="tile_demo",
        reference_type="crack",
    )
    texts = dict(reference_text="a thin dark crack in a tile", prompt="a cut in a carpet")
    base = _generate(cfg, demo_manifest_path, tmp_path / "a", n=1, **kwargs, **texts)
    row = base.iloc[0]
    params = pair_params(row)
    assert params["reference_text"] == texts["reference_text"]
    assert params["target_prompt"] == texts["prompt"]
    assert (params["reference_image"], params["reference_mask"]) == (str(image), str(mask))
    assert (params["reference_category"], params["reference_type"]) == ("tile_demo", "crack")
    assert (row["category"], row["anomaly_type"]) == ("carpet_demo", "cut")
    assert params["reference_text_source"] == "given"
    assert params["blip2_features"] == "multimodal"

    other_prompt = dict(texts, prompt="a hole in a rug")
    other_text = dict(texts, reference_text="a broken corner")
    a = read_rgb(row["image_path"])
    b = read_rgb(
        _generate(cfg, demo_manifest_path, tmp_path / "b", n=1, **kwargs, **other_prompt).iloc[0][
            "image_path"
        ]
    )
    c = read_rgb(
        _generate(cfg, demo_manifest_path, tmp_path / "c", n=1, **kwargs, **other_text).iloc[0][
            "image_path"
        ]
    )
    assert not np.array_equal(a, b)  # the target prompt reaches the diffusion model
    assert not np.array_equal(a, c)  # the reference text reaches BLIP-2


def test_bad_reference_and_mask_inputs_name_the_flag_and_the_file(
    cfg, demo_manifest_path, elsewhere, tmp_path
) -> None:
    image, mask = elsewhere

    def error(**kwargs) -> str:
        with pytest.raises(ValueError) as err:
            _run(cfg, demo_manifest_path, "carpet_demo", "cut", 1, tmp_path / "x", **kwargs)
        return str(err.value)

    missing = tmp_path / "missing.png"
    assert "--reference-image" in error(reference_image=missing, reference_mask=mask)
    assert str(missing) in error(reference_image=missing, reference_mask=mask)
    assert "--reference-mask" in error(reference_image=image)
    empty = tmp_path / "empty.png"
    save_png(empty, np.zeros((16, 16), np.uint8))
    message = error(reference_image=image, reference_mask=empty)
    assert "--reference-mask" in message and str(empty) in message
    assert f"--masks): {missing}" in error(masks=missing)
    (tmp_path / "no-masks").mkdir()
    assert "--masks" in error(masks=tmp_path / "no-masks")


def test_target_masks_from_a_folder_or_the_mask_generator(
    cfg, demo_manifest_path, checkpoint, tmp_path
) -> None:
    res = cfg.model.resolution
    folder = tmp_path / "masks"
    boxes = [(10, 30, 8, 28), (36, 52, 30, 60)]
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        m = np.zeros((res, res), np.uint8)
        m[y0:y1, x0:x1] = 255
        save_png(folder / f"m{k}.png", m)
    pairs = _generate(
        cfg, demo_manifest_path, tmp_path / "f", n=3, checkpoint=checkpoint, masks=folder
    )
    supplied = {read_mask(p, source="binary").tobytes() for p in sorted(folder.glob("*.png"))}
    assert {read_mask(p, source="binary").tobytes() for p in pairs["mask_path"]} == supplied
    assert set(pairs["mask_source"]) == {"folder"}

    generated_cfg = cfg.model_copy(deep=True)
    generated_cfg.anomalycontrol.mask_source = "masks"
    generated_cfg.masks.generator.steps = 3
    generated_cfg.masks.generator.sample_steps = 2
    generated = _generate(
        generated_cfg, demo_manifest_path, tmp_path / "g", n=1, checkpoint=checkpoint
    )
    assert generated["mask_source"].iloc[0].startswith("generator")
    image, mask, normal = _pair(generated.iloc[0])
    assert mask.any() and np.array_equal(image[~dilate(mask, 4)], normal[~dilate(mask, 4)])


# --------------------------------------------------------------------------- captions (item 7)
def test_captions_are_the_training_reference_texts(
    cfg, demo_manifest_path, checkpoint, tmp_path, caplog
) -> None:
    refs = training_references(cfg, demo_manifest_path, "carpet_demo")
    assert {r.text_source for r in refs} == {"template"}
    captioned = Path(refs[0].image_path)
    captions = tmp_path / "captions.csv"
    tail = "/".join(captioned.parts[-3:])
    captions.write_text(f'image_path,text\n{tail},"a ragged cut, frayed at the ends"\n')
    with_captions = cfg.model_copy(deep=True)
    with_captions.anomalycontrol.captions = captions
    with caplog.at_level(logging.WARNING):
        refs = training_references(
            with_captions, demo_manifest_path, "carpet_demo", load_captions(with_captions)
        )
    assert refs[0].text == "a ragged cut, frayed at the ends"
    assert refs[0].text_source == "caption"
    assert {r.text_source for r in refs[1:]} == {"template"}
    assert "no caption" in caplog.text and str(captions) in caplog.text

    weights = load_blip2(cfg.anomalycontrol.blip2).weights_hash
    folder = checkpoint_dir(with_captions, demo_manifest_path, "carpet_demo", weights)
    assert folder != checkpoint
    trained = train_adapter(with_captions, demo_manifest_path, "carpet_demo")
    assert trained == folder
    assert json.loads((trained / META_FILE).read_text())["captions"] == str(captions)
    ours, plain = load_file(trained / ADAPTER_FILE), load_file(checkpoint / ADAPTER_FILE)
    assert any(not torch.equal(ours[k], plain[k]) for k in plain)  # the captions trained it

    captions.write_text("image_path,caption\nx.png,a cut\n")
    with pytest.raises(ValueError, match=r"captions\.csv:1: header"):
        train_adapter(with_captions, demo_manifest_path, "carpet_demo", tmp_path / "bad")


# --------------------------------------------------------------------------- BLIP-2 families (item 1)
def test_generation_checkpoint_gives_image_only_features_on_record(
    cfg, demo_manifest_path, tmp_path
) -> None:
    opt = cfg.model_copy(deep=True)
    opt.anomalycontrol.blip2.pretrained = str(save_generation(tmp_path / "blip2-opt", "opt"))
    opt.anomalycontrol.adapter.steps = 1
    opt.anomalycontrol.out_dir = tmp_path / "adapters"
    pairs = _generate(opt, demo_manifest_path, tmp_path / "pairs", n=1)
    assert set(_params(pairs)["blip2_features"]) == {"image_only"}
    (folder,) = (tmp_path / "adapters").iterdir()
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["blip2_features"] == "image_only"
    assert meta["blip2_weights"] == load_blip2(opt.anomalycontrol.blip2).weights_hash


# --------------------------------------------------------------------------- library loading (item 8)
def test_generation_loads_four_token_adapters_with_load_ip_adapter(
    cfg, demo_manifest_path, checkpoint, tmp_path, monkeypatch
) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    loaded = []
    real = StableDiffusionInpaintPipeline.load_ip_adapter

    def spy(self, *args, **kwargs):
        loaded.append(kwargs.get("weight_name"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionInpaintPipeline, "load_ip_adapter", spy)
    pairs = _generate(cfg, demo_manifest_path, tmp_path, n=1, checkpoint=checkpoint)
    assert loaded == [ADAPTER_FILE] and set(_params(pairs)["adapter_loader"]) == {"load_ip_adapter"}


# --------------------------------------------------------------------------- CLI
def test_generate_cli_takes_prompt_reference_files_and_masks(
    overrides, demo_manifest_path, checkpoint, elsewhere, tmp_path
) -> None:
    import yaml
    from typer.testing import CliRunner

    from anomaly_factory.cli import app

    raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    raw["profiles"]["tiny"] = overrides
    config = tmp_path / "pipelines.yaml"
    config.write_text(yaml.safe_dump(raw))
    image, mask = elsewhere
    masks = tmp_path / "masks"
    save_png(masks / "m.png", (read_mask(mask, 64, source="binary") * 255).astype(np.uint8))
    args = ["generate", "--manifest", str(demo_manifest_path), "--category", "carpet_demo"]
    args += ["--anomaly-type", "cut", "--n-pairs", "1", "--generator", "anomalycontrol"]
    args += ["--config", str(config), "--checkpoint", str(checkpoint)]
    runner = CliRunner()
    refs = ["--reference-image", str(image), "--reference-mask", str(mask)]
    res = runner.invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "out"),
            *refs,
            "--masks",
            str(masks),
            "--reference-text",
            "a crack",
            "--prompt",
            "a cut",
        ],
    )
    assert res.exit_code == 0, res.output
    row = read_pairs(tmp_path / "out" / "pairs.parquet").iloc[0]
    params = pair_params(row)
    assert (params["reference_text"], params["target_prompt"]) == ("a crack", "a cut")
    assert (params["reference_image"], row["mask_source"]) == (str(image), "folder")
    bad = runner.invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "bad"),
            "--reference-image",
            str(tmp_path / "no.png"),
            "--reference-mask",
            str(mask),
        ],
    )
    assert bad.exit_code == 2 and "--reference-image" in bad.output and "no.png" in bad.output
