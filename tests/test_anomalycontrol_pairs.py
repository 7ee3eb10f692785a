"""AnomalyControl end to end on the tiny backbone: adapter training, pairs, non-matching references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_factory.config import load_config
from anomaly_factory.generators.anomalycontrol.train import (
    ADAPTER_FILE,
    META_FILE,
    drop_conditions,
    train_adapter,
)
from anomaly_factory.generators.registry import get_generator
from anomaly_factory.manifest import read_pairs

from .conftest import REPO


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomalycontrol")
    overrides = {
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
    generate = get_generator("anomalycontrol")
    out = tmp_path / "pairs"
    kwargs = dict(
        checkpoint=checkpoint,
        reference_text="a photo of a deep cut",
        reference_category="tile_demo",
        reference_type="crack",
    )
    path = generate(cfg, demo_manifest_path, "carpet_demo", "cut", 3, out, **kwargs)
    df = read_pairs(path)
    assert len(df) == 3 and set(df["generator"]) == {"anomalycontrol"}
    assert set(df["category"]) == {"carpet_demo"} and set(df["anomaly_type"]) == {"cut"}
    assert set(df["reference_category"]) == {"tile_demo"}
    assert set(df["reference_type"]) == {"crack"}
    assert set(df["reference_text"]) == {"a photo of a deep cut"}
    assert all("/tile_demo/" in p for p in df["reference_image"])
    assert set(df["strength"]) == {cfg.anomalycontrol.strength}
    res = cfg.model.resolution
    for row in df.itertuples():
        image = np.asarray(Image.open(row.image_path))
        mask = np.asarray(Image.open(row.mask_path))
        normal = np.asarray(Image.open(row.normal_path))
        assert image.shape == normal.shape == (res, res, 3)
        assert mask.shape == (res, res) and set(np.unique(mask)) <= {0, 255} and mask.any()
    assert (df["asea_mass_after"] > df["asea_mass_before"]).all()

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
        get_generator("anomalycontrol")(
            other, demo_manifest_path, "carpet_demo", "cut", 1, tmp_path, checkpoint=checkpoint
        )


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
