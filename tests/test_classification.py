"""The type classifier's inputs: whole images, or crops around each sample's mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_factory.config import DetectorSection
from anomaly_factory.detectors.classification import IMAGENET_MEAN, IMAGENET_STD, _inputs
from anomaly_factory.detectors.data import Sample


def _sample(tmp_path, name: str, box: tuple[int, int, int, int], colour) -> Sample:
    """A grey 64-px image with a coloured box, and the box as its mask."""
    image = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = colour
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(image).save(tmp_path / f"{name}.png")
    Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
    return Sample(str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_mask.png"), name)


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x * std + mean) * 255


def test_defect_crops_centre_each_defect_wherever_it_is(tmp_path):
    """The same 4-px red defect in a corner or in the middle gives the same crop: the
    defect fills the crop's middle half (context 0.5), grey around it."""
    samples = [
        _sample(tmp_path, "corner", (4, 8, 50, 54), (255, 0, 0)),
        _sample(tmp_path, "middle", (30, 34, 30, 34), (255, 0, 0)),
    ]
    settings = DetectorSection(
        classifier_input="defect_crop", classifier_crop_size=8, classifier_crop_context=0.5
    )
    crops = _denormalise(_inputs(samples, settings))
    assert crops.shape == (2, 3, 8, 8)
    torch.testing.assert_close(crops[0], crops[1], atol=1e-3, rtol=0)
    red = torch.tensor([255.0, 0.0, 0.0])[:, None, None]
    torch.testing.assert_close(crops[0, :, 2:6, 2:6], red.expand(3, 4, 4), atol=1e-3, rtol=0)
    assert torch.allclose(crops[0, :, 0, :], torch.tensor(128.0), atol=1e-3)


def test_whole_images_are_the_default(tmp_path):
    sample = _sample(tmp_path, "corner", (4, 8, 50, 54), (255, 0, 0))
    x = _denormalise(_inputs([sample], DetectorSection(resolution=64)))
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x[0, :, 5, 51], torch.tensor([255.0, 0.0, 0.0]), atol=1e-3, rtol=0)


def test_a_crop_needs_a_mask(tmp_path):
    sample = _sample(tmp_path, "corner", (4, 8, 50, 54), (255, 0, 0))
    settings = DetectorSection(classifier_input="defect_crop")
    with pytest.raises(ValueError, match="corner.png: classifier_input defect_crop needs"):
        _inputs([Sample(sample.image_path, None, "corner")], settings)
