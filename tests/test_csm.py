"""CSM: BLIP-2 multimodal Q-Former features and their projection to condition tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_factory.config import Blip2Section
from anomaly_factory.generators.anomalycontrol.csm import (
    load_blip2,
    load_references,
    patch_mask,
    reference_text,
    semantic_projection,
)


@pytest.fixture(scope="module")
def encoder():
    return load_blip2(Blip2Section(pretrained="tiny"))


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)


def test_features_are_mean_pooled_queries(encoder) -> None:
    img, text = _image(0), "a photo of a scratch"
    feats = encoder.semantic_features([img], [text])
    tokens = encoder.vision_tokens(encoder.pixel_values([img]))
    ids, mask = encoder.text_inputs([text])
    queries = encoder.qformer(tokens, ids, mask).queries
    assert queries.shape[1] == encoder.model.config.num_query_tokens
    torch.testing.assert_close(feats, queries.mean(dim=1))


def test_features_depend_on_image_and_text(encoder) -> None:
    a = encoder.semantic_features([_image(0)], ["a scratch"])
    b = encoder.semantic_features([_image(1)], ["a scratch"])
    c = encoder.semantic_features([_image(0)], ["a hole in the middle"])
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)
    again = load_blip2(Blip2Section(pretrained="tiny")).semantic_features(
        [_image(0)], ["a scratch"]
    )
    torch.testing.assert_close(a, again)  # the tiny model is seeded


def test_projection_gives_n_condition_tokens(encoder) -> None:
    proj = semantic_projection(encoder.feature_dim, cross_attention_dim=24, n_tokens=4)
    feats = encoder.semantic_features([_image(0), _image(1)], ["a", "b"])
    assert proj(feats).shape == (2, 4, 24)


def test_patch_mask_fractions() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :2] = 255
    frac = patch_mask(mask, 2).reshape(2, 2)
    torch.testing.assert_close(frac, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_missing_model_folder_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "no-such-blip2"
    with pytest.raises(OSError, match="no-such-blip2"):
        load_blip2(Blip2Section(pretrained=str(path)))


def test_references_text_override(demo_manifest_path) -> None:
    refs = load_references(
        demo_manifest_path, "tile_demo", "crack", 32, "{anomaly_type} on {category}"
    )
    assert refs and all(r.anomaly_type == "crack" and r.category == "tile_demo" for r in refs)
    assert refs[0].text == "crack on tile demo"
    assert refs[0].image.shape == (32, 32, 3) and set(np.unique(refs[0].mask)) <= {0, 255}
    other = load_references(
        demo_manifest_path, "tile_demo", "crack", 32, "{category}", text="a cut"
    )
    assert {r.text for r in other} == {"a cut"}
    with pytest.raises(ValueError, match="text_template"):
        reference_text("{colour}", "a", "b")
