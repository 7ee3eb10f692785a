"""Baseline generators (Perlin, CutPaste): output format, locality, seeding, resume."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.output import PAIRS_FILE
from anomaly_factory.generators.registry import get_generator
from anomaly_factory.manifest import PAIR_COLUMNS, read_pairs, select

CATEGORY, TYPE = "nut_demo", "scratch"


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module", params=["perlin", "cutpaste"])
def generated(request, tmp_path_factory, tiny_config, demo_manifest_path):
    out = tmp_path_factory.mktemp(request.param)
    gen = get_generator(request.param)
    path = gen.generate(GenerationRequest(tiny_config, demo_manifest_path, CATEGORY, TYPE, 3, out))
    return request.param, out, path


def test_writes_the_common_pairs_format(generated, tiny_config, demo_manifest):
    name, out, path = generated
    assert path == out / PAIRS_FILE
    pairs = read_pairs(path)
    assert len(pairs) == 3 and set(PAIR_COLUMNS) <= set(pairs.columns)
    assert set(pairs["generator"]) == {name} and set(pairs["anomaly_type"]) == {TYPE}
    assert set(pairs["checkpoint_hash"]) == {"none"} and set(pairs["params"]) == {"{}"}
    train = set(select(demo_manifest, CATEGORY, "good", "train")["image_path"])
    assert set(pairs["source_path"]) <= train  # backgrounds come from train normals only
    size = tiny_config.model.resolution
    for row in pairs.itertuples():
        image, mask, normal = _png(row.image_path), _png(row.mask_path), _png(row.normal_path)
        assert image.shape == normal.shape == (size, size, 3)
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        outside = mask == 0
        # the anomaly is local: outside the mask the image is the normal one
        np.testing.assert_array_equal(image[outside], normal[outside])


def test_seeded_and_resumable(generated, tiny_config, demo_manifest_path, tmp_path):
    name, out, path = generated
    first = read_pairs(path)
    gen = get_generator(name)
    # interrupted run: a copy with one pair missing is completed to the same bytes
    again = tmp_path / "again"
    gen.generate(GenerationRequest(tiny_config, demo_manifest_path, CATEGORY, TYPE, 2, again))
    resumed = read_pairs(
        gen.generate(GenerationRequest(tiny_config, demo_manifest_path, CATEGORY, TYPE, 3, again))
    )
    assert resumed["key"].tolist() == first["key"].tolist()
    for a, b in zip(first["image_path"], resumed["image_path"], strict=True):
        np.testing.assert_array_equal(_png(a), _png(b))
    other = tiny_config.model_copy(deep=True)
    other.generate.seed = 1
    changed = read_pairs(
        gen.generate(
            GenerationRequest(other, demo_manifest_path, CATEGORY, TYPE, 3, tmp_path / "seed1")
        )
    )
    assert any(
        not np.array_equal(_png(a), _png(b))
        for a, b in zip(first["image_path"], changed["image_path"], strict=True)
    )


def test_unknown_category_is_a_clear_error(tiny_config, demo_manifest_path, tmp_path):
    with pytest.raises(ValueError, match="no train normals for category 'nope'"):
        get_generator("cutpaste").generate(
            GenerationRequest(tiny_config, demo_manifest_path, "nope", TYPE, 1, tmp_path)
        )
