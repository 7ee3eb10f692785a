"""Consumers read a pinned version with plain webdataset, from S3 or a local folder."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import webdataset as wds

from anomaly_factory.storage.consume import load_dataset, register_s3_handler
from anomaly_factory.storage.publish import publish_version
from anomaly_factory.storage.s3 import VersionNotFound, make_client
from tests import test_s3_publish as s3t

# the S3 fixtures, shared with test_s3_publish (moto server, credentials, bucket, version)
moto_server, aws_env, bucket = s3t.moto_server, s3t.aws_env, s3t.bucket
pairs_path, cfg, version = s3t.pairs_path, s3t.cfg, s3t.version


def _samples(ds) -> dict[str, dict]:
    return {s["__key__"]: s for s in ds}


def _local_samples(cfg, version: str) -> dict[str, dict]:
    index = json.loads((Path(cfg.shards.out_dir) / version / "index.json").read_text())
    urls = [str(Path(cfg.shards.out_dir) / version / e["url"]) for e in index["shardlist"]]
    return _samples(wds.WebDataset(urls, shardshuffle=False))


def test_load_dataset_streams_a_category_from_s3(cfg, version):
    publish_version(cfg, version)
    local = _local_samples(cfg, version)
    category = json.loads(next(iter(local.values()))["json"])["category"]
    got = _samples(
        load_dataset(
            version, category, split="all", bucket=cfg.publish.bucket, prefix="datasets/af"
        )
    )
    want = {k: s for k, s in local.items() if json.loads(s["json"])["category"] == category}
    assert set(got) == set(want) and got
    for key, sample in got.items():
        for ext in ("image.png", "mask.png", "normal.png", "json"):
            assert sample[ext] == want[key][ext]


def test_plain_webdataset_reads_published_shards(cfg, version):
    publish_version(cfg, version)
    client = make_client()
    keys = sorted(
        o["Key"]
        for o in client.list_objects_v2(Bucket=cfg.publish.bucket)["Contents"]
        if o["Key"].endswith(".tar")
    )
    local = _local_samples(cfg, version)
    register_s3_handler()
    s3 = _samples(
        wds.WebDataset([f"s3://{cfg.publish.bucket}/{k}" for k in keys], shardshuffle=False)
    )
    assert s3.keys() == local.keys()
    assert all(s3[k]["image.png"] == local[k]["image.png"] for k in local)
    # and with no handler of ours at all: presigned HTTP URLs through webdataset's curl
    if subprocess.run(["which", "curl"], capture_output=True).returncode == 0:
        urls = [
            client.generate_presigned_url(
                "get_object", Params={"Bucket": cfg.publish.bucket, "Key": k}
            )
            for k in keys
        ]
        http = _samples(wds.WebDataset(urls, shardshuffle=False))
        assert http.keys() == local.keys()


def test_splits_partition_the_version_and_local_reading_works(cfg, version):
    root = cfg.shards.out_dir
    every = _samples(load_dataset(version, split="all", root=root))
    train = _samples(load_dataset(version, split="train", root=root))
    val = _samples(load_dataset(version, split="val", root=root))
    assert set(train) | set(val) == set(every) and not set(train) & set(val)
    assert every.keys() == _local_samples(cfg, version).keys()


def test_unknown_or_invisible_versions_are_refused(cfg, version):
    with pytest.raises(VersionNotFound):
        load_dataset(version, bucket=cfg.publish.bucket, prefix="datasets/af")  # not published
    with pytest.raises(VersionNotFound):
        load_dataset("v9", root=cfg.shards.out_dir)
    with pytest.raises(ValueError, match="no shards for"):
        load_dataset(version, category="nope", root=cfg.shards.out_dir)
