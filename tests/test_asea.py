"""ASEA: a zero-initialised prompt on the vision tokens concentrates Q-Former attention in the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_factory.config import ASEASection, Blip2Section
from anomaly_factory.generators.anomalycontrol.asea import (
    asea_prompt,
    attention_mass_inside,
    optimise_prompt,
)
from anomaly_factory.generators.anomalycontrol.csm import load_blip2, patch_mask

from .blip2_checkpoints import save_itm


@pytest.fixture(scope="module")
def encoder():
    return load_blip2(Blip2Section(pretrained="tiny"))


@pytest.fixture(scope="module")
def reference():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 36:56] = 255
    return image, mask, "a photo of a scratch defect"


def _mass_without_prompt(encoder, image, mask, text) -> float:
    tokens = encoder.vision_tokens(encoder.pixel_values([image]))
    ids, text_mask = encoder.text_inputs([text])
    with torch.no_grad():
        out = encoder.qformer(tokens, ids, text_mask, output_attentions=True)
    return float(attention_mass_inside(out.cross_attentions, patch_mask(mask, encoder.patch_grid)))


@pytest.mark.parametrize("steps", [3, 5])  # the paper's Tg = 3 and the public code's 5
def test_attention_mass_inside_mask_increases(encoder, reference, steps) -> None:
    image, mask, text = reference
    result = optimise_prompt(encoder, image, mask, text, steps=steps, lr=0.1)
    area = (mask > 0).mean()
    print(
        f"ASEA {steps} steps: in-mask attention mass {result.mass_before:.4f} -> "
        f"{result.mass_after:.4f} (mask area {area:.4f})"
    )
    # the prompt starts at zero, so "before" is the plain Q-Former's attention
    assert result.mass_before == pytest.approx(_mass_without_prompt(encoder, image, mask, text))
    assert result.mass_after > 1.5 * result.mass_before
    assert result.prompt.shape == encoder.vision_tokens(encoder.pixel_values([image])).shape


def test_mass_of_uniform_attention_is_mask_fraction() -> None:
    n = 16
    attn = torch.full((1, 2, 3, n + 1), 1.0 / (n + 1))
    inside = torch.zeros(n)
    inside[:4] = 1.0
    mass = attention_mass_inside((attn, attn), inside)
    torch.testing.assert_close(mass, torch.tensor([4.0 / (n + 1)]))


def test_prompt_is_cached_per_reference(encoder, reference, tmp_path) -> None:
    image, mask, text = reference
    section = ASEASection(steps=2, lr=0.1)
    first = asea_prompt(encoder, image, mask, text, section, tmp_path)
    files = list((tmp_path / "asea").glob("*.safetensors"))
    assert len(files) == 1
    second = asea_prompt(encoder, image, mask, text, section, tmp_path)
    assert torch.equal(first.prompt, second.prompt)
    assert second.mass_after == pytest.approx(first.mass_after)
    asea_prompt(encoder, image, mask, "another text", section, tmp_path)
    asea_prompt(encoder, image, mask, text, ASEASection(steps=3, lr=0.1), tmp_path)
    assert len(list((tmp_path / "asea").glob("*.safetensors"))) == 3


def test_empty_mask_is_an_error(encoder, reference) -> None:
    image, mask, text = reference
    with pytest.raises(ValueError, match="empty"):
        optimise_prompt(encoder, image, np.zeros_like(mask), text, steps=1, lr=0.1)


def test_prompt_cache_keys_on_encoder_weights_not_name(encoder, reference, tmp_path) -> None:
    """Two ``tiny`` encoders of different seeds share a name; each gets its own prompt."""
    image, mask, text = reference
    section = ASEASection(steps=2, lr=0.1)
    other = load_blip2(Blip2Section(pretrained="tiny", seed=1))
    assert other.name == encoder.name and other.weights_hash != encoder.weights_hash
    asea_prompt(encoder, image, mask, text, section, tmp_path)
    cached = asea_prompt(other, image, mask, text, section, tmp_path)
    fresh = optimise_prompt(other, image, mask, text, section.steps, section.lr)
    assert torch.equal(cached.prompt, fresh.prompt)
    assert len(list((tmp_path / "asea").glob("*.safetensors"))) == 2


def test_prompt_cache_follows_a_folder_whose_weights_change(reference, tmp_path) -> None:
    image, mask, text = reference
    section = ASEASection(steps=2, lr=0.1)
    folder, cache = tmp_path / "blip2", tmp_path / "cache"
    save_itm(folder, seed=0)
    first = load_blip2(Blip2Section(pretrained=str(folder)))
    asea_prompt(first, image, mask, text, section, cache)
    again = load_blip2(Blip2Section(pretrained=str(folder)))
    assert again.weights_hash == first.weights_hash  # same weights: the cache still hits
    save_itm(folder, seed=1)  # the folder's weights change, its name does not
    changed = load_blip2(Blip2Section(pretrained=str(folder)))
    cached = asea_prompt(changed, image, mask, text, section, cache)
    fresh = optimise_prompt(changed, image, mask, text, section.steps, section.lr)
    assert torch.equal(cached.prompt, fresh.prompt)
    assert len(list((cache / "asea").glob("*.safetensors"))) == 2
