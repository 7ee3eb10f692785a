"""CSM: BLIP-2 multimodal Q-Former features and their projection to condition tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anomaly_factory.config import Blip2Section
from anomaly_factory.generators.anomalycontrol.csm import (
    load_blip2,
    load_references,
    patch_mask,
    reference_text,
    semantic_projection,
)

from .blip2_checkpoints import FAMILIES, save_family


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


# --------------------------------------------------------------------------- checkpoint families
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blip2")
    return {family: save_family(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_blip2_family_loads_its_weights_and_gives_features(checkpoints, family) -> None:
    """OPT / Flan-T5 checkpoints used to load with random Q-Former text embeddings and then
    fail in semantic_features (their Q-Former layers have no text feed-forward)."""
    folder = checkpoints[family]
    enc = load_blip2(Blip2Section(pretrained=str(folder)))
    assert enc.features == ("multimodal" if family == "itm" else "image_only")
    saved = load_file(str(folder / "model.safetensors"))
    own = enc.model.state_dict()
    for name, tensor in own.items():  # every weight used comes from the checkpoint
        assert torch.equal(tensor, saved[name]), name
    a = enc.semantic_features([_image(0)], ["a scratch"])
    b = enc.semantic_features([_image(0)], ["a hole in the middle"])
    c = enc.semantic_features([_image(1)], ["a scratch"])
    assert a.shape == (1, enc.feature_dim) and torch.isfinite(a).all()
    assert not torch.allclose(a, c)
    if family == "itm":
        assert not torch.allclose(a, b)  # the text enters the Q-Former
    else:
        assert torch.equal(a, b)  # image-only: the queries attend the image alone


def test_image_only_asea_concentrates_attention(checkpoints) -> None:
    from anomaly_factory.generators.anomalycontrol.asea import optimise_prompt

    enc = load_blip2(Blip2Section(pretrained=str(checkpoints["opt"])))
    mask = np.zeros((48, 48), np.uint8)
    mask[6:20, 26:44] = 255
    result = optimise_prompt(enc, _image(2), mask, "ignored text", steps=5, lr=0.1)
    assert result.mass_after > 1.5 * result.mass_before


def test_multimodal_features_from_a_generation_checkpoint_are_refused(checkpoints) -> None:
    section = Blip2Section(pretrained=str(checkpoints["flan_t5"]), features="multimodal")
    with pytest.raises(ValueError) as err:
        load_blip2(section)
    message = str(err.value)
    for part in ("anomalycontrol.blip2.features", str(checkpoints["flan_t5"]), "blip2-itm-vit-g"):
        assert part in message
    forced = load_blip2(Blip2Section(pretrained=str(checkpoints["itm"]), features="image_only"))
    assert forced.features == "image_only"
    assert torch.equal(
        forced.semantic_features([_image(0)], ["a"]), forced.semantic_features([_image(0)], ["b"])
    )


def test_checkpoint_that_is_not_blip2_is_refused(tmp_path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"anomalycontrol\.blip2\.pretrained: .*'bert'.*ITM"):
        load_blip2(Blip2Section(pretrained=str(tmp_path)))


def test_references_use_captions_then_the_template(demo_manifest_path, tmp_path) -> None:
    from anomaly_factory.generators.anomalycontrol.captions import read_captions

    refs = load_references(demo_manifest_path, "tile_demo", "crack", 32, "{anomaly_type}")
    first = Path(refs[0].image_path)
    captions = tmp_path / "captions.jsonl"
    tail = "/".join(first.parts[-3:])  # a path below the dataset root names the image
    captions.write_text(json.dumps({"image_path": tail, "text": "a long thin crack"}) + "\n")
    refs = load_references(
        demo_manifest_path,
        "tile_demo",
        "crack",
        32,
        "{anomaly_type}",
        captions=read_captions(captions),
    )
    assert [(r.text, r.text_source) for r in refs] == [("a long thin crack", "caption")] + [
        ("crack", "template")
    ] * (len(refs) - 1)
