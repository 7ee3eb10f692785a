"""Shards, indexes and the dataset card: byte-exact, deterministic, complete-or-absent."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_factory.generators.output import (
    pair_key,
    pair_metadata,
    save_pair,
    write_pairs_manifest,
)
from anomaly_factory.io import atomic_write_json, md5_file, sha256_file
from anomaly_factory.storage.card import read_card
from anomaly_factory.storage.shards import (
    ShardError,
    check_version,
    sample_split,
    verify_version,
    write_shards,
)


def make_pairs(manifest: pd.DataFrame, out_dir: Path, per_type: int = 2, n_cats: int = 2) -> Path:
    """A small pairs set from demo images (the anomaly image stands in for a generated one)."""
    categories = sorted(manifest["category"].unique())[:n_cats]
    for category in categories:
        normal_path = manifest[(manifest["category"] == category) & (manifest["split"] == "train")][
            "image_path"
        ].iloc[0]
        normal = np.asarray(Image.open(normal_path).convert("RGB"))
        rows = manifest[(manifest["category"] == category) & (manifest["split"] == "fewshot")]
        for anomaly_type, group in rows.groupby("anomaly_type"):
            for i, row in enumerate(group.head(per_type).itertuples()):
                meta = pair_metadata(
                    row.dataset,
                    category,
                    anomaly_type,
                    "test",
                    i,
                    "real",
                    normal_path,
                    sigma=1.0,
                    w_m=4.0,
                    w_d=7.5,
                    steps=2,
                )
                save_pair(
                    out_dir,
                    pair_key(row.dataset, category, anomaly_type, i),
                    np.asarray(Image.open(row.image_path).convert("RGB")),
                    np.asarray(Image.open(row.mask_path)),
                    normal,
                    meta,
                )
    return write_pairs_manifest(out_dir)


def write_reports(reports_dir: Path, publishable: bool = True) -> Path:
    atomic_write_json(reports_dir / "metrics.json", {"kid_x1e3": {"demo/x": 12.5}})
    atomic_write_json(
        reports_dir / "gates.json", {"passed": publishable, "publishable": publishable}
    )
    return reports_dir


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory, demo_manifest) -> Path:
    return make_pairs(demo_manifest, tmp_path_factory.mktemp("pairs"))


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_hold_the_pair_files_byte_for_byte(
    tmp_path, tiny_config, pairs_path, demo_manifest_path
):
    index_path = write_shards(
        tiny_config, pairs_path, demo_manifest_path, "v1", write_reports(tmp_path / "r"), tmp_path
    )
    index = json.loads(index_path.read_text())
    pairs = pd.read_parquet(pairs_path)
    assert index["wids_version"] == 1 and index["nsamples"] == len(pairs)
    members: dict[str, bytes] = {}
    for entry in index["shardlist"]:
        shard = tmp_path / "v1" / entry["url"]
        assert entry["md5sum"] == md5_file(shard) and entry["filesize"] == shard.stat().st_size
        got = _tar_members(shard)
        assert len({name.split(".", 1)[0] for name in got}) == entry["nsamples"]
        members.update(got)
    for row in pairs.itertuples():
        assert "." not in row.key
        assert members[f"{row.key}.image.png"] == Path(row.image_path).read_bytes()
        assert members[f"{row.key}.mask.png"] == Path(row.mask_path).read_bytes()
        assert members[f"{row.key}.normal.png"] == Path(row.normal_path).read_bytes()
        meta = json.loads(members[f"{row.key}.json"])
        assert meta["anomaly_type"] == row.anomaly_type and meta["split"] in ("train", "val")
        assert "image_path" not in meta
        assert meta["params"] == json.loads(row.params)  # the generator's own, as an object
        assert meta["params"]["w_m"] == 4.0
    first = pairs.iloc[0]
    cat_dir = tmp_path / "v1" / first["dataset"] / first["category"]
    assert (cat_dir / "shard-000000.tar").is_file() and (cat_dir / "index.json").is_file()


def test_rewriting_gives_identical_bytes_and_maxcount_splits(
    tmp_path, tiny_config, pairs_path, demo_manifest_path
):
    cfg = tiny_config.model_copy(deep=True)
    cfg.shards.maxcount = 3
    reports = write_reports(tmp_path / "r")
    runs = []
    for out in ("a", "b"):
        write_shards(cfg, pairs_path, demo_manifest_path, "v1", reports, tmp_path / out)
        root = tmp_path / out / "v1"
        runs.append({p.relative_to(root): sha256_file(p) for p in root.rglob("*") if p.is_file()})
    assert runs[0] == runs[1]
    tars = [p for p in runs[0] if p.suffix == ".tar"]
    assert len(tars) >= 4  # 4 pairs per category at most 3 per shard: 2 shards each
    verify_version(tmp_path / "a" / "v1")


def test_card_records_sources_config_gates_and_files(
    tmp_path, tiny_config, pairs_path, demo_manifest_path
):
    reports = write_reports(tmp_path / "r", publishable=False)
    write_shards(tiny_config, pairs_path, demo_manifest_path, "v2", reports, tmp_path)
    card = read_card(tmp_path / "v2")
    assert card["version"] == "v2" and card["publishable"] is False
    assert card["config"]["hash"] == tiny_config.hash()
    assert card["source_datasets"][0]["name"] == "demo"
    assert "procedurally generated" in card["source_datasets"][0]["license"]
    assert card["inputs"]["image_manifests"][demo_manifest_path.as_posix()] == sha256_file(
        demo_manifest_path
    )
    assert card["metrics"] == {"kid_x1e3": {"demo/x": 12.5}}
    listed = {f["path"]: f["sha256"] for f in card["files"]}
    assert "index.json" in listed and all(
        sha256_file(tmp_path / "v2" / p) == h for p, h in listed.items()
    )
    assert "# anomaly-factory" in (tmp_path / "v2" / "card.md").read_text()


def test_per_category_reports_are_aggregated(tmp_path, tiny_config, pairs_path, demo_manifest_path):
    write_reports(tmp_path / "r" / "demo" / "a", publishable=True)
    write_reports(tmp_path / "r" / "demo" / "b", publishable=False)
    write_shards(tiny_config, pairs_path, demo_manifest_path, "v3", tmp_path / "r", tmp_path)
    gates = read_card(tmp_path / "v3")["gates"]
    assert gates["publishable"] is False and set(gates["parts"]) == {"demo/a", "demo/b"}


def test_failed_rewrite_keeps_the_complete_version(
    tmp_path, tiny_config, pairs_path, demo_manifest_path
):
    write_shards(tiny_config, pairs_path, demo_manifest_path, "v1", None, tmp_path)
    before = {p.relative_to(tmp_path): sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()}
    broken = tmp_path / "broken"
    df = pd.read_parquet(pairs_path)
    df.loc[0, "mask_path"] = str(tmp_path / "gone.png")
    broken.mkdir()
    df.to_parquet(broken / "pairs.parquet")
    with pytest.raises(ShardError, match="gone.png"):
        write_shards(
            tiny_config, broken / "pairs.parquet", demo_manifest_path, "v1", None, tmp_path
        )
    after = {p.relative_to(tmp_path): sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] == "v1"} == {
        k: v for k, v in before.items() if k.parts[0] == "v1"
    }  # the old version, card included, untouched; no staging folder left
    assert read_card(tmp_path / "v1") is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v1.")]


def test_version_names_and_split_are_checked():
    assert check_version("v1.0-rc_2") == "v1.0-rc_2"
    for bad in ("", "a/b", "..", "-x", "v1.lock"):
        with pytest.raises(ShardError, match="version"):
            check_version(bad)
    keys = [f"k{i}" for i in range(2000)]
    val = sum(sample_split(k, 0.1) == "val" for k in keys)
    assert 120 < val < 280 and sample_split("k1", 0.1) == sample_split("k1", 0.1)


def test_webdataset_decodes_local_shards(tmp_path, tiny_config, pairs_path, demo_manifest_path):
    import webdataset as wds

    index_path = write_shards(tiny_config, pairs_path, demo_manifest_path, "v1", None, tmp_path)
    urls = [
        str(tmp_path / "v1" / e["url"]) for e in json.loads(index_path.read_text())["shardlist"]
    ]
    sample = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil")))
    assert isinstance(sample["image.png"], Image.Image) and sample["json"]["generator"] == "test"


def test_shards_cli_accepts_folders(tmp_path, pairs_path, demo_manifest_path):
    from typer.testing import CliRunner

    from anomaly_factory.cli import app

    args = ["shards", "--pairs", str(pairs_path.parent), "--manifest", str(demo_manifest_path)]
    args += [
        "--version",
        "v1",
        "--out",
        str(tmp_path),
        "--reports",
        str(write_reports(tmp_path / "r")),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_card(tmp_path / "v1")["publishable"] is True
    bad = CliRunner().invoke(app, [*args[:-4], "--version", "a/b", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "version" in bad.output


def test_a_folder_stands_for_its_outermost_pairs_manifests(tmp_path):
    """dvc.yaml's layout: a category's merged pairs.parquet above its types' ones."""
    from anomaly_factory.storage.shards import find_manifests

    files = ["a/pairs.parquet", "a/t1/pairs.parquet", "a/t2/pairs.parquet", "b/t3/pairs.parquet"]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = find_manifests(tmp_path, "pairs.parquet")
    assert found == [tmp_path / "a/pairs.parquet", tmp_path / "b/t3/pairs.parquet"]
    assert find_manifests(tmp_path / "a" / "t1", "pairs.parquet") == [
        tmp_path / "a/t1/pairs.parquet"
    ]
