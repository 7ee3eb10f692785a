"""Foreground extraction (MAGIC §3.4 step 1): IoU against the demo's exact foreground."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_factory.datasets.demo import foreground as demo_foreground
from anomaly_factory.datasets.demo import render_category
from anomaly_factory.generators.magic.foreground import (
    extract_foreground,
    foreground_status,
    iou,
    object_foreground,
)

OBJECTS = ("nut_demo", "bar_demo")


def _demo_ious(method: str, size: int = 64, n: int = 4, **kw) -> dict[str, float]:
    out = {}
    for category in OBJECTS:
        for i in range(n):
            img, _ = render_category(category, "good", size, 0, i)
            exact = demo_foreground(category, size, 0, i)
            out[f"{category}#{i}"] = iou(extract_foreground(img, method, **kw), exact)
    return out


@pytest.mark.parametrize("method", ["border_color", "otsu", "grabcut"])
def test_weight_free_methods_match_the_exact_demo_foreground(method):
    ious = _demo_ious(method)
    print(method, {k: round(v, 3) for k, v in ious.items()})
    assert min(ious.values()) >= 0.95, ious


def test_default_recovers_objects_touching_the_border_and_holes():
    """A nut's hole stays background; downscaled extraction is resized back exactly."""
    img, _ = render_category("nut_demo", "good", 128, 0, 0)
    exact = demo_foreground("nut_demo", 128, 0, 0)
    mask = extract_foreground(img, "border_color", resolution=64)
    assert mask.shape == exact.shape and iou(mask, exact) >= 0.9
    ys, xs = np.nonzero(exact)
    assert not mask[int(ys.mean()), int(xs.mean())]  # the hole at the nut's centre


def test_textures_are_whole_image():
    img, _ = render_category("carpet_demo", "good", 64, 0, 0)
    fg = object_foreground(img, texture=True)
    assert fg.status == "texture" and fg.mask.all() and fg.usable


def test_empty_and_full_foregrounds_are_flagged():
    flat = np.full((48, 48, 3), 120, np.uint8)
    empty = object_foreground(flat)
    assert empty.status == "empty" and not empty.usable
    img, _ = render_category("nut_demo", "good", 64, 0, 0)
    full = object_foreground(img, max_ratio=0.05)  # a nut covers more than 5%
    assert full.status == "full" and not full.usable
    assert foreground_status(np.ones((4, 4), bool), 0.01, 0.95) == "full"
    assert foreground_status(np.eye(4, dtype=bool), 0.01, 0.95) == "ok"


class _Brightness(torch.nn.Module):
    """A stand-in for U²-Net: saliency = sigmoid of (brightness - 0.4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean(1, keepdim=True) - 0.4) * 40


def test_model_path_loads_a_local_torchscript_segmenter(tmp_path):
    path = tmp_path / "u2net_like.pt"
    torch.jit.script(_Brightness()).save(str(path))
    ious = _demo_ious("model", n=2, model=str(path))
    assert min(ious.values()) >= 0.9, ious


def test_bad_inputs_name_the_setting(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="cama.foreground"):
        extract_foreground(img, "magic")
    with pytest.raises(ValueError, match="cama.foreground_model"):
        extract_foreground(img, "model")
    bad = tmp_path / "not_a_model.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="cama.foreground_model"):
        extract_foreground(img, "model", model=str(bad))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        extract_foreground(img[..., 0], "otsu")


# --------------------------------------------------------------------------- Hugging Face segmenters
SALIENCY_CODE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel


class TinySaliencyConfig(PretrainedConfig):
    model_type = "tiny_saliency"


class TinySaliencyModel(PreTrainedModel):
    """A one-layer salient-object "network" shipping its own code, as BiRefNet and RMBG do."""

    config_class = TinySaliencyConfig

    def __init__(self, config):
        super().__init__(config)
        self.head = torch.nn.Conv2d(3, 1, 1)
        self.post_init()

    def forward(self, pixel_values):
        return [self.head(pixel_values)]  # a list of maps, the final one first (RMBG)
'''


@pytest.fixture()
def remote_code_segmenter(tmp_path):
    """A local folder holding a segmenter's weights *and its code* (auto_map), built
    from a config and saved with save_pretrained: loading it needs trust_remote_code."""
    import importlib.util
    import sys

    code = tmp_path / "code" / "tiny_saliency.py"
    code.parent.mkdir()
    code.write_text(SALIENCY_CODE)
    spec = importlib.util.spec_from_file_location("tiny_saliency", code)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_saliency"] = module
    spec.loader.exec_module(module)
    module.TinySaliencyConfig.register_for_auto_class()
    module.TinySaliencyModel.register_for_auto_class("AutoModelForImageSegmentation")
    model = module.TinySaliencyModel(module.TinySaliencyConfig())
    with torch.no_grad():  # saliency = 40 * (brightness - 0.4), as _Brightness
        model.head.weight.fill_(40 / 3)
        model.head.bias.fill_(-40 * 0.4)
    folder = tmp_path / "segmenter"
    model.save_pretrained(folder)
    del sys.modules["tiny_saliency"]
    assert (folder / "tiny_saliency.py").is_file()
    return folder


def test_cama_passes_trust_remote_code_to_the_segmenter(remote_code_segmenter):
    """cama.trust_remote_code reaches the loader: a segmenter shipping its own code
    loads with it, and without it the error names the setting."""
    from anomaly_factory.config import FactoryConfig
    from anomaly_factory.generators.magic.cama import CamaAligner

    cfg = FactoryConfig()
    cfg.cama.foreground = "model"
    cfg.cama.foreground_model = str(remote_code_segmenter)
    cfg.cama.device = "cpu"
    with pytest.raises(ValueError, match="cama.trust_remote_code"):
        CamaAligner(cfg, "nut_demo", "rust").foreground(np.zeros((32, 32, 3), np.uint8))
    cfg.cama.trust_remote_code = True
    aligner = CamaAligner(cfg, "nut_demo", "rust")
    ious = []
    for category in OBJECTS:
        for i in range(2):
            img, _ = render_category(category, "good", 64, 0, i)
            fg = aligner.foreground(img)
            assert fg.method == "model" and fg.status == "ok"
            ious.append(iou(fg.mask, demo_foreground(category, 64, 0, i)))
    print(f"remote-code segmenter IoU with the exact demo foreground: {np.round(ious, 3)}")
    assert min(ious) >= 0.9


def test_semantic_segmentation_models_load_natively(tmp_path):
    """A two-class SegFormer (no remote code): the foreground is every class but 0."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from anomaly_factory.generators.magic.foreground import ModelForeground, SegmenterOptions

    config = SegformerConfig(
        num_encoder_blocks=1,
        depths=[1],
        sr_ratios=[1],
        hidden_sizes=[8],
        patch_sizes=[3],
        strides=[2],
        num_attention_heads=[1],
        mlp_ratios=[1],
        decoder_hidden_size=8,
        num_labels=2,
    )
    img, _ = render_category("nut_demo", "good", 64, 0, 0)
    options = SegmenterOptions(resolution=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for favoured, expect_all in ((1, True), (0, False)):
        torch.manual_seed(0)
        model = SegformerForSemanticSegmentation(config)
        with torch.no_grad():
            model.decode_head.classifier.weight.zero_()
            model.decode_head.classifier.bias.zero_()
            model.decode_head.classifier.bias[favoured] = 5.0
        model.save_pretrained(tmp_path / f"seg{favoured}")
        mask = ModelForeground(str(tmp_path / f"seg{favoured}"), "cpu", options)(img)
        assert mask.shape == (64, 64) and bool(mask.all()) == expect_all
        assert mask.any() == expect_all
