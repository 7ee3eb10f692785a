"""Gaussian prompt perturbation (MAGIC §3.2): placement, scale, and sigma = 0."""

from __future__ import annotations

import pytest
import torch

from anomaly_factory.generators.magic.gpp import (
    anomaly_token_positions,
    gaussian_prompt_perturbation,
)
from anomaly_factory.generators.magic.models import build_tokenizer

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
