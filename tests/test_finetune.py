"""MAGIC's per-type fine-tuning: loss goes down, GPP per step, checkpoints, exact resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.generators.magic import finetune as finetune_mod
from anomaly_factory.generators.magic.checkpoints import (
    LORA_FILE,
    META_FILE,
    checkpoint_hash,
    load_finetuned_pipeline,
    save_checkpoint,
    state_dirs,
)
from anomaly_factory.generators.magic.finetune import add_lora, fewshot_loss, finetune
from anomaly_factory.generators.magic.gpp import anomaly_token_positions
from anomaly_factory.generators.magic.models import base_model_id, load_base_pipeline
from tests.test_models import SMALL_TINY, small_config, unet_output

CATEGORY, TYPE = "nut_demo", "rust"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Several test runs share two cores; one intra-op thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, demo_manifest_path, tmp_path_factory):
    """One full 20-step run, recording every GPP call it makes."""
    calls = []
    original = finetune_mod.gaussian_prompt_perturbation

    def recording(embeds, sigma, positions=None, generator=None):
        out = original(embeds, sigma, positions, generator)
        calls.append((embeds.detach().clone(), out.detach().clone(), positions))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(finetune_mod, "gaussian_prompt_perturbation", recording)
    out = tmp_path_factory.mktemp("ck") / "full"
    try:
        finetune(small_config(cache_dir), demo_manifest_path, CATEGORY, TYPE, out)
    finally:
        mp.undo()
    return out, calls


def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_checkpoint_is_compact_and_describes_its_origin(uninterrupted, cache_dir):
    out, _ = uninterrupted
    names = sorted(p.name for p in out.iterdir())
    assert names == [META_FILE, "unet"]  # no pipeline, no leftover resume state
    meta = json.loads((out / META_FILE).read_text())
    assert meta["steps"] == 20 and meta["complete"] is True
    assert (meta["sigma"], meta["target"]) == (1.0, "anomaly_token")
    assert (meta["category"], meta["anomaly_type"], meta["save"]) == (CATEGORY, TYPE, "unet")
    assert meta["weights_hash"] == checkpoint_hash(out)
    assert Path(meta["base_model"]).parent == cache_dir / "tiny"


def test_gpp_is_fresh_every_step_and_only_at_the_anomaly_token(uninterrupted):
    _, calls = uninterrupted
    assert len(calls) == 20  # one perturbation per training step
    deltas = []
    for before, after, positions in calls:
        delta = after - before
        assert positions is not None
        assert torch.count_nonzero(delta[:, ~positions]) == 0
        assert torch.all(delta[:, positions] != 0)
        deltas.append(delta)
    assert all(not torch.equal(deltas[i], deltas[i + 1]) for i in range(19))


def test_fine_tuning_lowers_the_training_loss(uninterrupted, cache_dir, demo_manifest_path):
    out, _ = uninterrupted
    cfg = small_config(cache_dir)
    base = load_base_pipeline(cfg, CATEGORY, demo_manifest_path)
    tuned = load_finetuned_pipeline(cfg, out, CATEGORY, demo_manifest_path)
    before = fewshot_loss(base, cfg, demo_manifest_path, CATEGORY, TYPE, seed=123, repeats=8)
    after = fewshot_loss(tuned, cfg, demo_manifest_path, CATEGORY, TYPE, seed=123, repeats=8)
    # paired comparison: both UNets see identical noise, timesteps and latents
    assert after < 0.95 * before, (before, after)


def test_interrupted_and_resumed_run_reaches_the_same_weights(
    uninterrupted, cache_dir, demo_manifest_path, tmp_path, monkeypatch
):
    full, _ = uninterrupted
    cfg = small_config(cache_dir)
    out = tmp_path / "resumed"
    # graceful stop at step 3 (state saved there), then a crash during step 5
    finetune(cfg, demo_manifest_path, CATEGORY, TYPE, out, max_steps=3)
    assert [p.name for p in state_dirs(out)] == ["train_state-00000003"]
    original = finetune_mod.gaussian_prompt_perturbation
    count = {"n": 0}

    def crash_on_second_call(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune_mod, "gaussian_prompt_perturbation", crash_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, demo_manifest_path, CATEGORY, TYPE, out)
    assert [p.name for p in state_dirs(out)] == ["train_state-00000004"]
    monkeypatch.setattr(finetune_mod, "gaussian_prompt_perturbation", original)
    finetune(cfg, demo_manifest_path, CATEGORY, TYPE, out)

    a, b = weights(full), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint_hash(out) == checkpoint_hash(full)


def test_finished_checkpoint_is_not_retrained(uninterrupted, cache_dir, demo_manifest_path):
    out, _ = uninterrupted
    mp = pytest.MonkeyPatch()

    def fail(*args, **kwargs):
        raise AssertionError("retrained a finished checkpoint")

    mp.setattr("anomaly_factory.generators.magic.models.load_base_pipeline", fail)
    try:
        assert finetune(small_config(cache_dir), demo_manifest_path, CATEGORY, TYPE, out) == out
    finally:
        mp.undo()


@pytest.mark.parametrize("kind", ["unet", "lora"])
def test_save_load_round_trip_reproduces_unet_outputs(
    kind, cache_dir, demo_manifest_path, tmp_path
):
    cfg = small_config(cache_dir, save=kind)
    pipe = load_base_pipeline(cfg, CATEGORY, demo_manifest_path)
    unet = pipe.unet
    torch.manual_seed(1)
    if kind == "lora":
        add_lora(unet, 4)
    with torch.no_grad():  # move every trained weight away from the base
        for p in unet.parameters():
            if kind == "unet" or p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    expected = unet_output(unet, 8)
    meta = {"base_model": base_model_id(cfg, CATEGORY, demo_manifest_path), "category": CATEGORY}
    save_checkpoint(unet, tmp_path / kind, meta)
    if kind == "lora":
        assert (tmp_path / kind / LORA_FILE).is_file()
        assert not (tmp_path / kind / "unet").exists()
    # without a manifest, the tiny base comes from checkpoint.json's base_model
    loaded = load_finetuned_pipeline(cfg, tmp_path / kind)
    assert torch.equal(unet_output(loaded.unet, 8), expected)


@pytest.mark.slow
def test_lora_fine_tune_trains_only_the_adapter(cache_dir, demo_manifest_path, tmp_path):
    cfg = small_config(cache_dir, save="lora", steps=2, lr=1e-2)
    out = finetune(cfg, demo_manifest_path, CATEGORY, TYPE, tmp_path / "lora")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["save"] == "lora"
    lora = load_file(out / LORA_FILE)
    assert lora and all("lora" in k for k in lora)
    base = load_base_pipeline(cfg, CATEGORY, demo_manifest_path)
    tuned = load_finetuned_pipeline(cfg, out, CATEGORY, demo_manifest_path)
    assert not torch.equal(unet_output(tuned.unet, 8), unet_output(base.unet, 8))


def test_unknown_anomaly_type_names_the_manifest(cache_dir, demo_manifest_path, tmp_path):
    with pytest.raises(ValueError, match="no 'fewshot' images.*'nope'"):
        finetune(small_config(cache_dir), demo_manifest_path, CATEGORY, "nope", tmp_path / "x")


def test_anomaly_token_positions_on_the_tiny_tokenizer(cache_dir, demo_manifest_path):
    pipe = load_base_pipeline(small_config(cache_dir), CATEGORY, demo_manifest_path)
    pos = anomaly_token_positions(pipe.tokenizer, "a photo of sks defect", "sks")
    assert pos.nonzero().flatten().tolist() == [4]


def test_cli_finetune_writes_a_checkpoint(cache_dir, demo_manifest_path, tmp_path):
    config = tmp_path / "pipelines.yaml"
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines.yaml").read_text())
    raw["model"].update(resolution=32, device="cpu", cache_dir=str(cache_dir))
    raw["model"]["tiny"].update(SMALL_TINY)
    raw["finetune"].update(resolution=32, batch_size=2, steps=6, checkpoint_every=2)
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ck"
    args = ["finetune", "--manifest", str(demo_manifest_path), "--category", CATEGORY]
    args += ["--anomaly-type", TYPE, "--out", str(out), "--config", str(config)]
    result = CliRunner().invoke(app, [*args, "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / META_FILE).read_text())
    assert (meta["steps"], meta["complete"]) == (1, False)
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(out), "--anomaly-type", "nope"])
    assert bad.exit_code == 2
