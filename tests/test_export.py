"""MVTec-AD export: anomalib's own datamodules load it; few-shot images stay out of test."""

from __future__ import annotations

import pandas as pd
import pytest

from anomaly_factory.detectors.data import LeakError
from anomaly_factory.detectors.export import export_category
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.registry import get_generator
from anomaly_factory.io import sha256_file
from anomaly_factory.manifest import read_pairs, select

CATEGORY = "nut_demo"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_config, demo_manifest_path):
    out = tmp_path_factory.mktemp("pairs")
    for anomaly_type in ("rust", "scratch"):
        get_generator("cutpaste").generate(
            GenerationRequest(tiny_config, demo_manifest_path, CATEGORY, anomaly_type, 2, out)
        )
    return read_pairs(out / "pairs.parquet")


@pytest.fixture(scope="module")
def export(tmp_path_factory, demo_manifest, pairs):
    return export_category(demo_manifest, CATEGORY, tmp_path_factory.mktemp("export"), pairs)


def test_mvtec_datamodule_loads_the_real_part(export, demo_manifest):
    from anomalib.data import MVTecAD

    dm = MVTecAD(
        root=export.mvtec_root,
        category=CATEGORY,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        val_split_mode="none",
    )
    dm.setup()
    assert len(dm.train_data) == len(select(demo_manifest, CATEGORY, "good", "train"))
    test = select(demo_manifest, CATEGORY, split="test")
    assert len(dm.test_data) == len(test)
    assert int(dm.test_data.samples["label_index"].sum()) == int(
        (test["anomaly_type"] != "good").sum()
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch.image.shape == (4, 3, 64, 64)
    batch = next(iter(dm.test_dataloader()))
    assert batch.gt_mask.shape == (4, 64, 64)


def test_folder_datamodule_loads_the_pairs(export, pairs):
    from anomalib.data import Folder

    dm = Folder(
        name="generated",
        normal_dir=export.normal_dir,
        abnormal_dir=export.generated_images,
        mask_dir=export.generated_masks,
        train_batch_size=4,
        eval_batch_size=len(pairs) + 4,
        num_workers=0,
        val_split_mode="none",
    )
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    abnormal = batch.gt_label.bool()
    assert int(abnormal.sum()) == len(pairs)
    # every generated image came with its own (non-empty) mask
    assert all(batch.gt_mask[abnormal].flatten(1).any(1))


def test_fewshot_images_never_reach_the_test_set(export, demo_manifest):
    fewshot = set(select(demo_manifest, CATEGORY, split="fewshot")["sha256"])
    test_dir = export.mvtec_root / CATEGORY / "test"
    exported = {sha256_file(p) for p in test_dir.rglob("*.png")}
    assert exported and not exported & fewshot
    assert {sha256_file(p) for p in export.fewshot_images.rglob("*.png")} == fewshot


def test_overlapping_split_is_refused(demo_manifest, tmp_path):
    # AnomalyDiffusion's off-by-one: the last few-shot image is also a test image
    shot = select(demo_manifest, CATEGORY, split="fewshot").iloc[[-1]].assign(split="test")
    leaky = pd.concat([demo_manifest, shot], ignore_index=True)
    with pytest.raises(LeakError, match="fewshot"):
        export_category(leaky, CATEGORY, tmp_path)


def test_pairs_made_from_test_images_are_refused(demo_manifest, pairs, tmp_path):
    test_image = select(demo_manifest, CATEGORY, split="test")["image_path"].iloc[0]
    bad = pairs.assign(source_path=test_image)
    with pytest.raises(LeakError, match="generated pairs"):
        export_category(demo_manifest, CATEGORY, tmp_path, bad)
