"""Gaussian prompt perturbation (MAGIC §3.2): placement, scale, and sigma = 0."""

from __future__ import annotations

import pytest
import torch

from anomaly_factory.generators.magic.components import build_tokenizer
from anomaly_factory.generators.magic.gpp import (
    anomaly_token_positions,
    gaussian_prompt_perturbation,
)

PROMPT = "a photo of sks defect"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["sks", "a", "photo", "of", "defect"])


def test_positions_mark_the_anomaly_token_only(tokenizer):
    pos = anomaly_token_positions(tokenizer, PROMPT, "sks")
    assert pos.shape == (77,)
    # BOS, a, photo, of, sks: the one anomaly token sits at index 4
    assert pos.nonzero().flatten().tolist() == [4]


def test_positions_cover_every_piece_of_a_multi_token_word(tokenizer):
    # "xq" is not a vocabulary word, so it encodes as two single-letter pieces
    pos = anomaly_token_positions(tokenizer, "a photo of xq defect", "xq")
    assert pos.nonzero().flatten().tolist() == [4, 5]


def test_positions_reject_a_prompt_without_the_token(tokenizer):
    with pytest.raises(ValueError, match="does not occur"):
        anomaly_token_positions(tokenizer, "a photo of defect", "sks")


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_anomaly_token_target_perturbs_only_its_positions_with_std_sigma(tokenizer, sigma):
    pos = anomaly_token_positions(tokenizer, PROMPT, "sks")
    embeds = torch.randn(256, 77, 32)
    out = gaussian_prompt_perturbation(embeds, sigma, pos, torch.Generator().manual_seed(0))
    delta = out - embeds
    assert torch.count_nonzero(delta[:, ~pos]) == 0
    d = delta[:, pos].flatten()
    assert d.numel() == 256 * 32
    # std estimate of 8192 normal draws: standard error sigma/sqrt(2n) ~ 0.8% of sigma
    assert d.std().item() == pytest.approx(sigma, rel=0.05)
    assert d.mean().item() == pytest.approx(0.0, abs=0.05 * sigma)


def test_all_tokens_target_perturbs_every_vector():
    embeds = torch.zeros(64, 77, 16)
    delta = gaussian_prompt_perturbation(embeds, 1.0, None, torch.Generator().manual_seed(1))
    assert torch.all(delta != 0)
    assert delta.std().item() == pytest.approx(1.0, rel=0.05)


def test_each_batch_row_and_each_call_draws_fresh_noise(tokenizer):
    pos = anomaly_token_positions(tokenizer, PROMPT, "sks")
    embeds = torch.zeros(2, 77, 16)
    gen = torch.Generator().manual_seed(0)
    first = gaussian_prompt_perturbation(embeds, 1.0, pos, gen)
    second = gaussian_prompt_perturbation(embeds, 1.0, pos, gen)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, second)


def test_sigma_zero_leaves_embeddings_untouched(tokenizer):
    pos = anomaly_token_positions(tokenizer, PROMPT, "sks")
    embeds = torch.randn(3, 77, 16)
    before = embeds.clone()
    for positions in (pos, None):
        out = gaussian_prompt_perturbation(embeds, 0.0, positions, torch.Generator())
        assert torch.equal(out, before)
    assert torch.equal(embeds, before)


def test_negative_sigma_is_an_error():
    with pytest.raises(ValueError, match="sigma"):
        gaussian_prompt_perturbation(torch.zeros(1, 77, 4), -0.1)


# --------------------------------------------------------------------------- consistency
def test_training_gpp_comes_from_the_checkpoint_meta():
    from anomaly_factory.generators.magic.gpp import training_gpp

    assert training_gpp({"sigma": 1.0, "target": "all_tokens"}) == (1.0, "all_tokens")
    sigma, target = training_gpp(None)
    assert target == "none" and sigma != sigma  # NaN: no fine-tuning
    assert training_gpp({"steps": 3})[1] == "unknown"


@pytest.mark.parametrize(
    ("train", "inference", "why"),
    [
        ((1.0, "anomaly_token"), (1.0, "anomaly_token"), None),
        ((0.0, "anomaly_token"), (1.0, "anomaly_token"), "sigma 1.0 at inference, 0.0 in training"),
        ((1.0, "anomaly_token"), (0.5, "anomaly_token"), "sigma 0.5 at inference"),
        ((1.0, "all_tokens"), (1.0, "anomaly_token"), "target 'anomaly_token' at inference"),
        ((0.0, "all_tokens"), (0.0, "anomaly_token"), None),  # no perturbation either side
        ((float("nan"), "none"), (1.0, "anomaly_token"), None),  # base model: nothing to match
    ],
)
def test_gpp_mismatch(train, inference, why):
    from anomaly_factory.generators.magic.gpp import gpp_mismatch

    got = gpp_mismatch(train, inference)
    assert got == why if why is None else why in got


def test_inference_only_gpp_is_refused_or_warned(caplog):
    from anomaly_factory.generators.magic.gpp import GPPMismatchError, check_gpp_consistency

    meta = {"sigma": 0.0, "target": "anomaly_token"}
    with pytest.raises(GPPMismatchError, match="generate.gpp_mismatch: warn"):
        check_gpp_consistency(meta, 1.0, "anomaly_token", "error", "ckpt/")
    with caplog.at_level("WARNING"):
        assert check_gpp_consistency(meta, 1.0, "anomaly_token", "warn") == (0.0, "anomaly_token")
    assert "inference GPP unlike training hurts" in caplog.text


def test_generate_refuses_a_checkpoint_trained_without_gpp(demo_manifest_path, tmp_path):
    """generate.gpp sigma 1 on a checkpoint fine-tuned with sigma 0: refused before any
    model is loaded (the paper's ablation: inference-only GPP hurts)."""
    import json

    from anomaly_factory.config import FactoryConfig
    from anomaly_factory.generators.magic.gpp import GPPMismatchError
    from anomaly_factory.generators.magic.pairs import generate_pairs

    ckpt = tmp_path / "ckpt"
    (ckpt / "unet").mkdir(parents=True)
    (ckpt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (ckpt / "checkpoint.json").write_text(json.dumps({"sigma": 0.0, "target": "anomaly_token"}))
    cfg = FactoryConfig()
    cfg.model.cache_dir = tmp_path / "models"
    assert cfg.generate.gpp.sigma == 1.0
    with pytest.raises(GPPMismatchError, match="sigma 1.0 at inference, 0.0 in training"):
        generate_pairs(cfg, demo_manifest_path, "bar_demo", "spot", 1, tmp_path / "out", ckpt)
