"""The demo's oracle generator: true defects, fresh masks on the exact object, exact background."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly_factory.datasets import demo
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.oracle import demo_foreground
from anomaly_factory.generators.registry import get_generator
from anomaly_factory.images import read_mask, read_rgb
from anomaly_factory.manifest import read_pairs
from tests.gates_pairs import tiny_config


@pytest.fixture(scope="module")
def oracle_pairs(demo_manifest_path, tmp_path_factory) -> pd.DataFrame:
    generate = get_generator("oracle")
    out = tmp_path_factory.mktemp("oracle")
    path = generate.generate(
        GenerationRequest(tiny_config(), demo_manifest_path, "nut_demo", "rust", 5, out)
    )
    return read_pairs(path)


def test_oracle_pairs_are_pixel_exact_true_defects_on_the_object(
    oracle_pairs, demo_manifest
) -> None:
    train = demo_manifest[(demo_manifest["category"] == "nut_demo")]
    native = int(train["width"].iloc[0])
    masks = []
    for row in oracle_pairs.itertuples():
        image, normal = read_rgb(row.image_path), read_rgb(row.normal_path)
        mask = read_mask(row.mask_path, source="binary")
        assert image.shape[:2] == (native, native)  # the demo's own size
        assert np.array_equal(normal, read_rgb(row.source_path))  # an untouched train normal
        changed = (image != normal).any(axis=2)
        assert not (changed & ~mask).any() and changed[mask].mean() > 0.9
        fg = demo_foreground(row.source_path, "nut_demo", 0)
        assert fg is not None and not (mask & ~fg).any()  # on the exact object
        assert row.generator == "oracle" and row.mask_source == "oracle"
        masks.append(mask)
    assert len({m.tobytes() for m in masks}) == len(masks)  # a fresh mask per pair


def test_oracle_is_deterministic_and_only_for_the_demo(
    oracle_pairs, demo_manifest_path, tmp_path
) -> None:
    generate = get_generator("oracle")
    again = read_pairs(
        generate.generate(
            GenerationRequest(tiny_config(), demo_manifest_path, "nut_demo", "rust", 5, tmp_path)
        )
    )
    for a, b in zip(oracle_pairs.itertuples(), again.itertuples(), strict=True):
        assert np.array_equal(read_rgb(a.image_path), read_rgb(b.image_path))
    with pytest.raises(ValueError, match="only for the demo"):
        generate.generate(
            GenerationRequest(
                tiny_config(), demo_manifest_path, "screw", "scratch", 1, tmp_path / "x"
            )
        )
    with pytest.raises(ValueError, match="no anomaly type 'stain'"):
        generate.generate(
            GenerationRequest(
                tiny_config(), demo_manifest_path, "nut_demo", "stain", 1, tmp_path / "y"
            )
        )


def test_demo_foreground_is_refused_for_images_that_are_not_the_render(tmp_path) -> None:
    from anomaly_factory.io import save_png

    img, _ = demo.render_category("bar_demo", "good", 64, 0, 3)
    save_png(tmp_path / "003.png", img)
    assert demo_foreground(str(tmp_path / "003.png"), "bar_demo", 0) is not None
    assert demo_foreground(str(tmp_path / "003.png"), "bar_demo", 1) is None  # another seed
    save_png(tmp_path / "004.png", img)
    assert demo_foreground(str(tmp_path / "004.png"), "bar_demo", 0) is None  # another index
