"""Ingestion of each real layout: counts, splits, bad-input report, quarantine."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_factory.datasets.ingest import ingest
from anomaly_factory.datasets.split import SplitLeakError, assign_splits, check_no_leak
from anomaly_factory.datasets.validate import BadInputError
from anomaly_factory.errors import InputError
from anomaly_factory.manifest import IMAGE_COLUMNS, read_images
from tests.layouts import make_mvtec_3d_ad, make_mvtec_ad, make_visa


def _counts(df: pd.DataFrame) -> dict:
    return df.groupby(["category", "anomaly_type", "split"]).size().to_dict()


def test_mvtec_ad_counts_and_split(tmp_path):
    root = make_mvtec_ad(tmp_path / "mvtec")
    res = ingest(
        "mvtec_ad", root, tmp_path / "m.parquet", root=tmp_path / "raw", show_progress=False
    )
    df = read_images(tmp_path / "m.parquet")
    assert set(IMAGE_COLUMNS) <= set(df.columns)
    c = _counts(df)
    # crack: 7 images -> floor(7/3) = 2 fewshot, 5 test; scratch: 4 -> 1 / 3
    assert c[("bottle", "crack", "fewshot")] == 2 and c[("bottle", "crack", "test")] == 5
    assert c[("bottle", "scratch", "fewshot")] == 1 and c[("bottle", "scratch", "test")] == 3
    assert c[("bottle", "good", "train")] == 4 and c[("bottle", "good", "test")] == 2
    # the fewshot images are the lowest-numbered ones
    few = df[(df.category == "bottle") & (df.anomaly_type == "crack") & (df.split == "fewshot")]
    assert sorted(p.rsplit("/", 1)[1] for p in few.image_path) == ["000.png", "001.png"]
    # grayscale category keeps 1 channel; good images have no mask
    assert set(df[df.category == "grid"].channels) == {1}
    assert df[df.anomaly_type == "good"].mask_path.isna().all()
    assert df.xyz_path.isna().all()
    assert len(res.manifest) == len(df) == 2 * (4 + 2 + 7 + 4)


def test_split_never_leaks_and_handles_10_numbers(tmp_path):
    # numbers sort numerically (2 < 10), not lexically
    raw = pd.DataFrame(
        {
            "dataset": "x",
            "category": "c",
            "anomaly_type": "t",
            "source_split": "test",
            "image_path": [f"/d/{i}.png" for i in (10, 2, 1, 0, 11, 3)],
        }
    )
    df = assign_splits(raw)
    few = sorted(df[df.split == "fewshot"].image_path)
    assert few == ["/d/0.png", "/d/1.png"]
    assert math.floor(6 / 3) == len(few)
    df["sha256"] = ["h0", "h1", "h2", "h3", "h4", "h2"]  # same content in fewshot and test
    with pytest.raises(SplitLeakError, match="sha256"):
        check_no_leak(df)


def test_visa_types_split_and_masks(tmp_path):
    root = make_visa(tmp_path / "visa")
    ingest("visa", root, tmp_path / "v.parquet", root=tmp_path / "raw", show_progress=False)
    df = read_images(tmp_path / "v.parquet")
    c = _counts(df)
    # per-type labels from image_anno.csv (3 scratch, 3 chunk..., 1 multi-label)
    assert c[("candle", "scratch", "fewshot")] == 1 and c[("candle", "scratch", "test")] == 2
    assert c[("candle", "chunk_of_wax_missing", "fewshot")] == 1
    assert c[("candle", "scratch+damaged_corner", "test")] == 1
    # normal split from split_csv/1cls.csv
    assert c[("candle", "good", "train")] == 4 and c[("candle", "good", "test")] == 2
    assert df[df.anomaly_type != "good"].mask_path.notna().all()


def test_mvtec_3d_ad_records_xyz(tmp_path):
    root = make_mvtec_3d_ad(tmp_path / "3d")
    ingest("mvtec_3d_ad", root, tmp_path / "d.parquet", root=tmp_path / "raw", show_progress=False)
    df = read_images(tmp_path / "d.parquet")
    assert df.xyz_path.notna().all()
    c = _counts(df)
    assert c[("bagel", "good", "train")] == 3 + 2  # train + validation
    assert c[("bagel", "crack", "fewshot")] == 2 and c[("bagel", "crack", "test")] == 4
    assert df[df.anomaly_type == "crack"].mask_path.str.contains("/gt/").all()


def _break_inputs(root):
    cat = root / "bottle"
    (cat / "test" / "crack" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # truncated
    (cat / "ground_truth" / "crack" / "002_mask.png").unlink()  # missing mask
    small = np.zeros((16, 16), np.uint8)
    small[2:6, 2:6] = 255
    Image.fromarray(small).save(cat / "ground_truth" / "crack" / "003_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(
        cat / "ground_truth" / "crack" / "004_mask.png"
    )
    m = np.zeros((32, 32), np.uint8)
    m[2:5, 2:5] = 128
    Image.fromarray(m).save(cat / "ground_truth" / "scratch" / "000_mask.png")


def test_bad_input_report_lists_every_file_and_writes_nothing(tmp_path):
    root = make_mvtec_ad(tmp_path / "mvtec", categories=("bottle",))
    _break_inputs(root)
    out = tmp_path / "m.parquet"
    with pytest.raises(BadInputError) as err:
        ingest("mvtec_ad", root, out, root=tmp_path / "raw", show_progress=False)
    text = str(err.value)
    for needle in (
        "001.png: unreadable image",
        "002.png: missing mask",
        "003_mask.png: mask size mismatch",
        "004_mask.png: empty mask",
        "scratch/000_mask.png: non-binary mask",
    ):
        assert needle in text, text
    assert len(err.value.problems) == 5
    assert not out.exists()


def test_quarantine_writes_manifest_without_bad_files(tmp_path):
    root = make_mvtec_ad(tmp_path / "mvtec", categories=("bottle",))
    _break_inputs(root)
    out = tmp_path / "m.parquet"
    res = ingest(
        "mvtec_ad", root, out, root=tmp_path / "raw", on_bad_input="quarantine", show_progress=False
    )
    df = read_images(out)
    q = pd.read_csv(res.quarantine_path)
    assert res.quarantine_path.name == "m.quarantine.csv"
    assert len(q) == 5
    bad_images = {f"{i:03d}.png" for i in range(1, 5)}
    crack = df[df.anomaly_type == "crack"].image_path.str.rsplit("/", n=1).str[1]
    assert not (set(crack) & bad_images)
    assert len(crack) == 3  # 7 - 4 bad
    assert (df.anomaly_type == "scratch").sum() == 3  # 4 - 1 non-binary mask


def test_archive_source_and_sha256(tmp_path):
    import tarfile

    from anomaly_factory.datasets.sources import ChecksumMismatch
    from anomaly_factory.io import sha256_file

    root = make_mvtec_ad(tmp_path / "src" / "mvtec_anomaly_detection", categories=("bottle",))
    archive = tmp_path / "mvtec.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="mvtec_anomaly_detection")
    shutil.rmtree(tmp_path / "src")
    with pytest.raises(ChecksumMismatch) as err:
        ingest(
            "mvtec_ad",
            archive,
            tmp_path / "m.parquet",
            root=tmp_path / "raw",
            sha256="0" * 64,
            show_progress=False,
        )
    assert "0" * 64 in str(err.value) and sha256_file(archive) in str(err.value)
    res = ingest(
        "mvtec_ad",
        archive,
        tmp_path / "m.parquet",
        root=tmp_path / "raw",
        sha256=sha256_file(archive),
        show_progress=False,
    )
    assert (res.manifest.category == "bottle").all() and len(res.manifest) == 17


def test_category_filter_and_unknown_category(tmp_path):
    root = make_mvtec_ad(tmp_path / "mvtec")
    res = ingest("mvtec_ad", root, tmp_path / "m.parquet", categories=["grid"], show_progress=False)
    assert set(res.manifest.category) == {"grid"}
    with pytest.raises(ValueError, match="nope"):
        ingest("mvtec_ad", root, tmp_path / "m2.parquet", categories=["nope"], show_progress=False)


def test_a_format_added_to_the_registry_is_ingested(tmp_path, monkeypatch):
    """One DatasetFormat entry is all a new format needs: its reader, root marker, licence."""
    from anomaly_factory.datasets import formats
    from anomaly_factory.datasets.layouts import read_mvtec_ad
    from anomaly_factory.storage.card import dataset_license

    toy = formats.DatasetFormat(
        "toy",
        lambda root, categories=None: read_mvtec_ad(root, categories, dataset="toy"),
        "*/train/good",
        license="CC0",
    )
    monkeypatch.setitem(formats.FORMATS, "toy", toy)
    wrapped = make_mvtec_ad(tmp_path / "archive" / "toy_v1")  # one folder above its root
    res = ingest("toy", wrapped.parent, tmp_path / "t.parquet", show_progress=False)
    assert set(res.manifest["dataset"]) == {"toy"}
    assert len(res.manifest) == 2 * (4 + 2 + 7 + 4)
    assert dataset_license("toy") == "CC0"
    with pytest.raises(InputError, match=r"'nope' is not one of \['mvtec_ad'.*'toy'\]"):
        ingest("nope", wrapped, tmp_path / "n.parquet", show_progress=False)
