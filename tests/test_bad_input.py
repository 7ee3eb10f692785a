"""A hostile but fair user: every bad input gets its exit code and a message naming it.

One table of cases (issue 22 and the cases handled before it). Each case builds its
inputs in a fresh workspace, runs one command, and asserts the exit code, that the
message names the culprit (file, field or value), that no traceback is shown, and that
the outputs of earlier runs (``ws/out``) are byte-identical before and after. Cases
where the input is valid but unusual (16-bit, palette, alpha) assert what the pixels
become instead. ``pytest -s`` prints the table of cases and outcomes.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.images import read_rgb
from anomaly_factory.io import sha256_file
from tests.layouts import make_mvtec_ad

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("anomaly-factory")
runner = CliRunner()


# --------------------------------------------------------------------------- helpers
def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` with its sha256 (the bytes the user already has)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (a few hundred bytes on disk)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )
    return path


def first_image(root: Path, rel: str = "bottle/train/good") -> Path:
    return sorted((root / rel).glob("*.png"))[0]


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """A folder tree nobody may write into, root included (``chattr -R +i``; chmod
    otherwise)."""
    if os.geteuid() != 0:
        dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
        for d in dirs:
            d.chmod(0o555)
        try:
            yield
        finally:
            for d in dirs:
                d.chmod(0o755)
        return
    if subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)


# --------------------------------------------------------------------------- shared inputs
@dataclass
class Shared:
    """Expensive inputs built once per module and copied into each workspace."""

    manifest: Path  # a good demo image manifest (64 px)
    gen_config: Path  # cutpaste at 32 px
    pairs: Path  # a pairs folder: 2 cutpaste pairs of nut_demo/scratch
    version: Path  # a complete local shards version 'v1' (publishable)
    reports: Path
    gate_pairs: Path  # oracle pairs for gates


@pytest.fixture(scope="module")
def shared(tmp_path_factory, demo_manifest_path) -> Shared:
    from anomaly_factory.storage.shards import write_shards
    from tests.gates_pairs import build_pairs
    from tests.test_shards import make_pairs, write_reports

    root = tmp_path_factory.mktemp("shared")
    gen_config = write_yaml(
        root / "gen.yaml", {"generator": "cutpaste", "model": {"resolution": 32}}
    )
    pairs = root / "pairs"
    res = runner.invoke(app, [*_gen_args(demo_manifest_path, gen_config, pairs), "--n-pairs", "2"])
    assert res.exit_code == 0, res.output
    reports = write_reports(root / "reports" / "v1")
    demo_pairs = make_pairs(pd.read_parquet(demo_manifest_path), root / "demo_pairs", per_type=1)
    cfg = _shards_cfg(root)
    write_shards(cfg, demo_pairs, demo_manifest_path, "v1", reports)
    gate_pairs = build_pairs(demo_manifest_path, root / "gate_pairs", per_type=3)
    return Shared(
        demo_manifest_path, gen_config, pairs, root / "shards" / "v1", reports, gate_pairs
    )


def _shards_cfg(root: Path):
    from anomaly_factory.config import load_config

    cfg = load_config(REPO / "pipelines.yaml", "tiny")
    cfg.shards.out_dir = root / "shards"
    cfg.gates.out_dir = root / "reports"
    return cfg


def _gen_args(manifest: Path, config: Path, out: Path, type_: str = "scratch") -> list[str]:
    return [
        "generate",
        "--manifest",
        str(manifest),
        "--category",
        "nut_demo",
        "--anomaly-type",
        type_,
        "--out",
        str(out),
        "--config",
        str(config),
    ]


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    name: str
    make: Callable[[Path, Shared], list[str]]  # builds inputs in ws, returns CLI args
    code: int
    says: tuple[str, ...]  # what the message must name (checked whitespace-insensitively)
    after: Callable[[Path, Shared], None] | None = None  # checks of the outcome
    read_only: str | None = None  # folder under ws made read-only during the run
    s3: bool = False  # needs the moto server (env set by the s3 fixture)
    subprocess_limit: int | None = None  # run as a subprocess with this RLIMIT_FSIZE
    notes: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)


def _earlier_manifest(ws: Path, shared: Shared) -> Path:
    """An earlier run's manifest at the path this run writes (must survive a failure)."""
    out = ws / "out" / "m.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared.manifest, out)
    return out


def ingest(
    source: Path | str, ws: Path, shared: Shared, *extra: str, dataset: str = "mvtec_ad"
) -> list[str]:
    out = _earlier_manifest(ws, shared)
    return [
        "ingest",
        "--dataset",
        dataset,
        "--source",
        str(source),
        "--manifest-out",
        str(out),
        "--root",
        str(ws / "raw"),
        *extra,
    ]


def mvtec(ws: Path, categories=("bottle",), **kw) -> Path:
    return make_mvtec_ad(ws / "src" / "mvtec", categories=categories, **kw)


# ---- ingest: images
def _16bit(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    eight = mvtec(ws / "eight")
    for path in sorted(src.rglob("*.png")):
        if "ground_truth" in path.parts:
            continue
        grey = np.asarray(Image.open(path).convert("L"), np.uint16)
        Image.fromarray(grey * 257).save(path)  # value * 257: the full 16-bit range
        Image.fromarray(grey.astype(np.uint8)).save(eight / path.relative_to(src))
    return ingest(src, ws, shared)


def _16bit_after(ws: Path, shared: Shared) -> None:
    """The 16-bit set gives the same normals, bit for bit, as its 8-bit twin."""
    eight = ws / "eight" / "src" / "mvtec"
    args = ["ingest", "--dataset", "mvtec_ad", "--source", str(eight)]
    assert runner.invoke(app, [*args, "--manifest-out", str(ws / "eight.parquet")]).exit_code == 0
    normals = {}
    for name, manifest in (("16", ws / "out" / "m.parquet"), ("8", ws / "eight.parquet")):
        cmd = _gen_args(manifest, shared.gen_config, ws / f"pairs{name}", "crack")
        cmd[cmd.index("nut_demo")] = "bottle"
        res = runner.invoke(app, [*cmd, "--n-pairs", "2"])
        assert res.exit_code == 0, res.output
        normals[name] = [read_rgb(p) for p in sorted((ws / f"pairs{name}" / "normals").glob("*"))]
    assert all(n.mean() < 250 for n in normals["16"])  # not the all-white images of before
    assert all(np.array_equal(a, b) for a, b in zip(normals["16"], normals["8"], strict=True))


def _palette(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    path = first_image(src)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    Image.open(path).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path)
    (ws / "expected.npy").write_bytes(np.asarray(Image.open(path).convert("RGB")).tobytes())
    assert rgb.shape == (32, 32, 3)
    return ingest(src, ws, shared)


def _palette_after(ws: Path, shared: Shared) -> None:
    path = first_image(ws / "src" / "mvtec")
    expected = np.frombuffer((ws / "expected.npy").read_bytes(), np.uint8).reshape(32, 32, 3)
    assert np.array_equal(read_rgb(path), expected)  # its palette colours, not its indices


def _rgba(ws: Path, shared: Shared, transparent: bool = True) -> Path:
    src = mvtec(ws)
    path = first_image(src)
    rgba = np.asarray(Image.open(path).convert("RGBA")).copy()
    if transparent:
        rgba[:8, :, 3] = 0  # a transparent band
    Image.fromarray(rgba).save(path)
    return src


def _rgba_refused(ws: Path, shared: Shared) -> list[str]:
    return ingest(_rgba(ws, shared), ws, shared)


def _rgba_composited(ws: Path, shared: Shared) -> list[str]:
    config = write_yaml(ws / "alpha.yaml", {"datasets": {"alpha": "composite"}})
    return [*ingest(_rgba(ws, shared), ws, shared), "--config", str(config)]


def _rgba_composited_after(ws: Path, shared: Shared) -> None:
    rgb = read_rgb(first_image(ws / "src" / "mvtec"))
    assert (rgb[:8] == 0).all() and rgb[8:].any()  # composited over black


def _rgba_opaque(ws: Path, shared: Shared) -> list[str]:
    return ingest(_rgba(ws, shared, transparent=False), ws, shared)


def _mixed(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws, categories=("grid",))  # a grey category
    stray = src / "grid" / "train" / "good" / "001.png"
    Image.open(stray).convert("RGB").point(lambda v: 255 - v).save(stray)
    return ingest(src, ws, shared)


def _bomb(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    bomb_png(first_image(src))
    return ingest(src, ws, shared)


def _bomb_quarantined(ws: Path, shared: Shared) -> list[str]:
    return [*_bomb(ws, shared), "--on-bad-input", "quarantine"]


def _bomb_quarantined_after(ws: Path, shared: Shared) -> None:
    listed = pd.read_csv(ws / "out" / "m.quarantine.csv")
    assert listed["path"].tolist() == [str(first_image(ws / "src" / "mvtec"))]
    assert "decompression bomb" in listed["detail"].iloc[0]


def _no_iend(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    path = first_image(src)
    path.write_bytes(path.read_bytes()[:-12])  # only the IEND chunk is missing
    return ingest(src, ws, shared)


def _truncated_png(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    path = first_image(src)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ingest(src, ws, shared)


def _not_an_image(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    first_image(src).write_text("no pixels here")
    return ingest(src, ws, shared)


def _markup_name(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    bad = src / "bottle" / "train" / "good" / "scan[red]01.png"
    bad.write_bytes(b"\x89PNG broken")
    return ingest(src, ws, shared)


def _missing_mask(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    (src / "bottle" / "ground_truth" / "crack" / "002_mask.png").unlink()
    return ingest(src, ws, shared)


def _empty_mask(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(
        src / "bottle" / "ground_truth" / "crack" / "003_mask.png"
    )
    return ingest(src, ws, shared)


def _mask_size(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(
        src / "bottle" / "ground_truth" / "crack" / "004_mask.png"
    )
    return ingest(src, ws, shared)


def _quarantine_all_masks(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    for mask in (src / "bottle" / "ground_truth" / "scratch").glob("*.png"):
        mask.write_bytes(b"broken")
    return [*ingest(src, ws, shared), "--on-bad-input", "quarantine"]


def _stale_quarantine(ws: Path, shared: Shared) -> list[str]:
    args = ingest(mvtec(ws), ws, shared)
    (ws / "out" / "m.quarantine.csv").write_text("path,check,detail\nold.png,x,y\n")
    return args


def _stale_quarantine_after(ws: Path, shared: Shared) -> None:
    assert not (ws / "out" / "m.quarantine.csv").exists()


def _read_only_manifest(ws: Path, shared: Shared) -> list[str]:
    return ingest(mvtec(ws), ws, shared)


# ---- ingest: layout and sources
def _no_test_dir(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws)
    shutil.rmtree(src / "bottle" / "test")
    return ingest(src, ws, shared)


def _only_test_dir(ws: Path, shared: Shared) -> list[str]:
    src = mvtec(ws, categories=("bottle", "cable"))
    shutil.rmtree(src / "cable" / "train")
    return ingest(src, ws, shared)


def _no_source(ws: Path, shared: Shared) -> list[str]:
    return ingest(ws / "nowhere" / "mvtec", ws, shared)


def _sha_with_folder(ws: Path, shared: Shared) -> list[str]:
    return [*ingest(mvtec(ws), ws, shared), "--sha256", "0" * 64]


def _archive(ws: Path, name: str, mode: str, src: Path | None = None) -> Path:
    src = src or mvtec(ws)
    path = ws / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        tar.add(src, arcname="mvtec_anomaly_detection")
    return path


def _wrong_sha(ws: Path, shared: Shared) -> list[str]:
    return [*ingest(_archive(ws, "d.tar.gz", "w:gz"), ws, shared), "--sha256", "0" * 64]


def _truncated(suffix: str, mode: str) -> Callable[[Path, Shared], list[str]]:
    def make(ws: Path, shared: Shared) -> list[str]:
        path = _archive(ws, f"data{suffix}", mode)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return ingest(path, ws, shared)

    return make


def _not_gzip(ws: Path, shared: Shared) -> list[str]:
    path = ws / "data.tar.gz"
    path.write_bytes(b"this is not gzip data at all " * 50)
    return ingest(path, ws, shared)


def _no_extracting_left(ws: Path, shared: Shared) -> None:
    assert not list((ws / "raw").rglob("*.extracting")), list((ws / "raw").rglob("*"))


def _stale_extraction(ws: Path, shared: Shared) -> list[str]:
    """v1/data.tar.gz is ingested; v2/data.tar.gz (other images, same name) comes next."""
    first = _archive(ws, "v1/data.tar.gz", "w:gz", mvtec(ws / "a"))
    args = ingest(first, ws, shared)
    assert runner.invoke(app, args).exit_code == 0
    second_src = make_mvtec_ad(ws / "b" / "mvtec", categories=("bottle",), n_train=5)
    second = _archive(ws, "v2/data.tar.gz", "w:gz", second_src)
    args = ingest(second, ws, shared, "--sha256", sha256_file(second))
    args[args.index("--manifest-out") + 1] = str(ws / "b.parquet")
    return args


def _stale_extraction_after(ws: Path, shared: Shared) -> None:
    got = set(pd.read_parquet(ws / "b.parquet")["sha256"])
    want = {sha256_file(p) for p in (ws / "b" / "mvtec").rglob("*.png") if "ground" not in str(p)}
    assert got == want  # the second archive's images, not the first extraction's


def _unknown_dataset(ws: Path, shared: Shared) -> list[str]:
    return ["ingest", "--dataset", "imagenet", "--manifest-out", str(ws / "out" / "m.parquet")]


def _unknown_category(ws: Path, shared: Shared) -> list[str]:
    return [*ingest(mvtec(ws), ws, shared), "--categories", "nope"]


def _bad_on_bad_input(ws: Path, shared: Shared) -> list[str]:
    return [*ingest(mvtec(ws), ws, shared), "--on-bad-input", "ignore"]


# ---- config
def _config(mutate: Callable[[dict], None], text: str | None = None):
    def make(ws: Path, shared: Shared) -> list[str]:
        raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
        mutate(raw)
        path = ws / "pipelines.yaml"
        path.write_text(text(path) if text else yaml.safe_dump(raw, sort_keys=False))
        return ["config", "validate", str(path)]

    return make


def _set(path: str, value: object) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        node = raw
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _duplicate_key_text(path: Path) -> str:
    text = (REPO / "pipelines.yaml").read_text()
    return text.replace("\nseed: 0\n", "\nseed: 0\nseed: 1\n", 1)


# ---- generate
def _gen_into(ws: Path, shared: Shared, *extra: str, type_: str = "scratch") -> list[str]:
    out = ws / "out" / "pairs"
    shutil.copytree(shared.pairs, out)
    return [*_gen_args(shared.manifest, shared.gen_config, out, type_), *extra]


def _more_pairs_than_asked(ws: Path, shared: Shared) -> list[str]:
    return _gen_into(ws, shared, "--n-pairs", "1")


def _other_type_folder(ws: Path, shared: Shared) -> list[str]:
    return _gen_into(ws, shared, "--n-pairs", "2", type_="rust")


def _perlin_unknown_type(ws: Path, shared: Shared) -> list[str]:
    return [*_gen_into(ws, shared, "--n-pairs", "2", "--generator", "perlin", type_="dent")]


def _gen_unknown_category(ws: Path, shared: Shared) -> list[str]:
    args = _gen_into(ws, shared, "--n-pairs", "2")
    args[args.index("nut_demo")] = "moon_demo"
    return args


def _gen_read_only(ws: Path, shared: Shared) -> list[str]:
    return _gen_into(ws, shared, "--n-pairs", "3")


def _gen_disk_full(ws: Path, shared: Shared) -> list[str]:
    return _gen_into(ws, shared, "--n-pairs", "4")


def _gen_no_manifest(ws: Path, shared: Shared) -> list[str]:
    args = _gen_into(ws, shared, "--n-pairs", "2")
    args[args.index("--manifest") + 1] = str(ws / "missing.parquet")
    return args


def _gen_bad_generator(ws: Path, shared: Shared) -> list[str]:
    return _gen_into(ws, shared, "--n-pairs", "2", "--generator", "nope")


def _no_temp_left(ws: Path, shared: Shared) -> None:
    assert not list((ws / "out").rglob(".*.tmp")), list((ws / "out").rglob(".*.tmp"))


# ---- gates, shards
def _gates_read_only(ws: Path, shared: Shared) -> list[str]:
    out = ws / "out" / "reports"
    out.mkdir(parents=True)
    (out / "gates.json").write_text('{"passed": true}')  # an earlier report
    return [
        "gates",
        "--pairs",
        str(shared.gate_pairs),
        "--manifest",
        str(shared.manifest),
        "--out",
        str(out),
    ]


def _gates_no_pairs(ws: Path, shared: Shared) -> list[str]:
    args = _gates_read_only(ws, shared)
    args[args.index("--pairs") + 1] = str(ws / "nope.parquet")
    return args


def _shards_args(ws: Path, shared: Shared, pairs: Path | None = None) -> list[str]:
    out = ws / "out" / "shards"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(shared.version, out / "v1")
    return [
        "shards",
        "--pairs",
        str(pairs or shared.pairs / "pairs.parquet"),
        "--manifest",
        str(shared.manifest),
        "--version",
        "v1",
        "--reports",
        str(shared.reports),
        "--out",
        str(out),
    ]


def _shards_missing_file(ws: Path, shared: Shared) -> list[str]:
    pairs = pd.read_parquet(shared.pairs / "pairs.parquet")
    pairs.loc[0, "mask_path"] = str(ws / "masks" / "gone.png")
    (ws / "broken").mkdir()
    pairs.to_parquet(ws / "broken" / "pairs.parquet")
    return _shards_args(ws, shared, ws / "broken" / "pairs.parquet")


def _shards_bad_version(ws: Path, shared: Shared) -> list[str]:
    args = _shards_args(ws, shared)
    args[args.index("--version") + 1] = "a/b"
    return args


def _shards_leftovers(ws: Path, shared: Shared) -> list[str]:
    args = _shards_args(ws, shared)
    out = ws / "out" / "shards"
    (out / ".v1.build-99999" / "x").mkdir(parents=True)  # a killed shards run's staging
    (out / "v1" / "demo" / ".screw.tmp-99999").mkdir()  # an older killed run's partial tars
    (out / "v1" / "demo" / ".screw.tmp-99999" / "shard-000000.tar").write_bytes(b"partial")
    return args


def _shards_leftovers_after(ws: Path, shared: Shared) -> None:
    out = ws / "out" / "shards"
    assert [p.name for p in out.iterdir()] == ["v1"]
    assert not list((out / "v1").rglob(".*.tmp-*"))


# ---- publish, pull (moto)
def _s3_config(ws: Path, bucket: str) -> Path:
    return write_yaml(
        ws / "s3.yaml",
        {
            "shards": {"out_dir": str(ws / "out" / "shards")},
            "gates": {"out_dir": str(ws / "reports")},
            "publish": {
                "bucket": bucket,
                "prefix": "bad",
                "max_attempts": 1,
                "retry_backoff_s": 0.0,
            },
        },
    )


def _local_version(ws: Path, shared: Shared) -> None:
    (ws / "out" / "shards").mkdir(parents=True, exist_ok=True)
    shutil.copytree(shared.version, ws / "out" / "shards" / "v1")


def _publish(ws: Path, shared: Shared, *extra: str) -> list[str]:
    _local_version(ws, shared)
    return ["publish", "--version", "v1", "--config", str(_s3_config(ws, ws.name)), *extra]


def _publish_bad_bucket(ws: Path, shared: Shared) -> list[str]:
    return _publish(ws, shared, "--bucket", "Bad_Bucket!!")


def _publish_no_bucket(ws: Path, shared: Shared) -> list[str]:
    return _publish(ws, shared, "--bucket", "no-such-bucket-af")


def _publish_twice(ws: Path, shared: Shared) -> list[str]:
    args = _publish(ws, shared)
    assert runner.invoke(app, args).exit_code == 0
    return args


def _publish_not_publishable(ws: Path, shared: Shared) -> list[str]:
    args = _publish(ws, shared)
    card_path = ws / "out" / "shards" / "v1" / "card.json"
    card = json.loads(card_path.read_text())
    card["gates"] = {"passed": False, "publishable": False}
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return args


def _publish_incomplete(ws: Path, shared: Shared) -> list[str]:
    args = _publish(ws, shared)
    (ws / "out" / "shards" / "v1" / "card.json").unlink()
    return args


def _publish_unreachable(ws: Path, shared: Shared) -> list[str]:
    return _publish(ws, shared)


def _pull(ws: Path, shared: Shared, version: str = "v1") -> list[str]:
    _local_version(ws, shared)
    return ["pull", "--version", version, "--config", str(_s3_config(ws, ws.name))]


def _pull_absent(ws: Path, shared: Shared) -> list[str]:
    return _pull(ws, shared)  # a complete local v1, none on S3: the local card must stay


def _pull_corrupt(ws: Path, shared: Shared) -> list[str]:
    args = _pull(ws, shared)
    publish = ["publish", "--version", "v1", "--config", args[-1]]
    assert runner.invoke(app, publish).exit_code == 0
    from anomaly_factory.storage.s3 import make_client

    client = make_client()
    key = next(
        o["Key"] for o in client.list_objects_v2(Bucket=ws.name)["Contents"] if ".tar" in o["Key"]
    )
    client.put_object(Bucket=ws.name, Key=key, Body=b"corrupted")
    return args


def _pull_read_only(ws: Path, shared: Shared) -> list[str]:
    args = _pull(ws, shared)
    assert runner.invoke(app, ["publish", "--version", "v1", "--config", args[-1]]).exit_code == 0
    return args


def _pull_bad_bucket(ws: Path, shared: Shared) -> list[str]:
    return [*_pull(ws, shared), "--bucket", "Bad_Bucket!!"]


CASES = [
    # ingest: image encodings
    Case("16-bit PNGs are scaled, not white", _16bit, 0, ("wrote",), _16bit_after),
    Case("palette image gives its colours", _palette, 0, ("wrote",), _palette_after),
    Case("RGBA with transparency refused", _rgba_refused, 2, ("000.png", "transparent")),
    Case(
        "RGBA composited by config",
        _rgba_composited,
        0,
        ("wrote",),
        _rgba_composited_after,
    ),
    Case("opaque RGBA accepted", _rgba_opaque, 0, ("wrote",)),
    Case("one RGB image among grey ones", _mixed, 2, ("001.png", "mixed channels")),
    Case("decompression bomb (20000^2 header)", _bomb, 2, ("000.png", "decompression bomb")),
    Case(
        "decompression bomb quarantined",
        _bomb_quarantined,
        0,
        ("quarantined 1",),
        _bomb_quarantined_after,
    ),
    Case("PNG without its IEND end marker", _no_iend, 2, ("000.png", "IEND")),
    Case("PNG cut in half", _truncated_png, 2, ("000.png", "unreadable image")),
    Case("text file named .png", _not_an_image, 2, ("000.png", "unreadable image")),
    Case("file name with Rich markup", _markup_name, 2, ("scan[red]01.png",)),
    Case("anomaly image without mask", _missing_mask, 2, ("002.png", "missing mask")),
    Case("empty mask", _empty_mask, 2, ("003_mask.png", "empty mask")),
    Case("mask size differs from image", _mask_size, 2, ("004_mask.png", "size mismatch")),
    Case(
        "quarantine would empty a type",
        _quarantine_all_masks,
        2,
        ("bottle/scratch", "vanish"),
    ),
    Case(
        "clean rerun removes an old quarantine list",
        _stale_quarantine,
        0,
        ("wrote",),
        _stale_quarantine_after,
    ),
    Case(
        "read-only output folder (ingest)",
        _read_only_manifest,
        2,
        ("m.parquet",),
        read_only="out",
        notes="EPERM under chattr +i (root); EACCES under chmod",
    ),
    # ingest: layouts and sources
    Case("category without test/", _no_test_dir, 2, ("bottle", "no test/")),
    Case("extra category with only test/", _only_test_dir, 2, ("cable", "no train/")),
    Case("--source that does not exist", _no_source, 2, ("nowhere", "does not exist")),
    Case("--sha256 with a folder source", _sha_with_folder, 2, ("--sha256", "is a folder")),
    Case("archive with the wrong --sha256", _wrong_sha, 2, ("d.tar.gz", "0" * 64)),
    Case(
        "truncated .tar.gz",
        _truncated(".tar.gz", "w:gz"),
        2,
        ("data.tar.gz", "truncated"),
        _no_extracting_left,
    ),
    Case(
        "truncated .tar.xz",
        _truncated(".tar.xz", "w:xz"),
        2,
        ("data.tar.xz", "truncated"),
        _no_extracting_left,
    ),
    Case("non-gzip .tar.gz", _not_gzip, 2, ("data.tar.gz", "corrupt"), _no_extracting_left),
    Case(
        "same archive name, other content",
        _stale_extraction,
        0,
        ("wrote",),
        _stale_extraction_after,
    ),
    Case("unknown --dataset", _unknown_dataset, 2, ("imagenet",)),
    Case("unknown --categories", _unknown_category, 2, ("nope", "not found")),
    Case("bad --on-bad-input", _bad_on_bad_input, 2, ("--on-bad-input", "ignore")),
    # config
    Case("profile: tinyy", _config(_set("profile", "tinyy")), 2, ("profile", "tinyy")),
    Case(
        "n_pairs: true",
        _config(_set("generate.n_pairs", True)),
        2,
        ("generate.n_pairs", "boolean"),
    ),
    Case(
        "n_pairs: '6' (a string)",
        _config(_set("generate.n_pairs", "6")),
        2,
        ("generate.n_pairs", "string"),
    ),
    Case(
        "epochs: 3.5 (not an integer)",
        _config(_set("detector.epochs", 3.5)),
        2,
        ("detector.epochs", "3.5"),
    ),
    Case("duplicate YAML key", _config(lambda r: None, _duplicate_key_text), 2, ("seed", "dup")),
    Case(
        "n_pairs: 1 (no metric possible)",
        _config(_set("generate.n_pairs", 1)),
        2,
        ("generate.n_pairs", "nothing to measure"),
    ),
    Case(
        "mask_area_min >= mask_area_max",
        _config(_set("gates.mask_area_min", 0.6)),
        2,
        ("gates.mask_area_min", "mask_area_max"),
    ),
    Case("unknown key", _config(_set("generate.n_pair", 6)), 2, ("generate.n_pair", "unknown")),
    Case("value out of bounds", _config(_set("generate.sag.w_m", -1)), 2, ("generate.sag.w_m",)),
    # generate
    Case(
        "--n-pairs 1 into a folder holding 2",
        _more_pairs_than_asked,
        2,
        ("pairs", "more than --n-pairs 1"),
    ),
    Case("folder holding another type's pairs", _other_type_folder, 2, ("nut_demo/scratch",)),
    Case("perlin with an unknown --anomaly-type", _perlin_unknown_type, 2, ("'dent'", "types")),
    Case("unknown --category", _gen_unknown_category, 2, ("moon_demo",)),
    Case("missing --manifest", _gen_no_manifest, 2, ("missing.parquet",)),
    Case("unknown --generator", _gen_bad_generator, 2, ("nope",)),
    Case(
        "read-only output folder (generate)",
        _gen_read_only,
        2,
        ("pairs",),
        _no_temp_left,
        read_only="out/pairs",
    ),
    Case(
        "disk full (ulimit -f) during generate",
        _gen_disk_full,
        3,
        ("pairs", "File too large"),
        _no_temp_left,
        subprocess_limit=256,
    ),
    # gates, shards
    Case(
        "read-only output folder (gates)",
        _gates_read_only,
        2,
        ("reports",),
        read_only="out/reports",
    ),
    Case("gates without the pairs file", _gates_no_pairs, 2, ("nope.parquet", "does not exist")),
    Case(
        "read-only output folder (shards)",
        _shards_args,
        2,
        ("shards",),
        read_only="out/shards",
    ),
    Case("shards with a missing pair file", _shards_missing_file, 2, ("gone.png", "not found")),
    Case("shards with a bad --version", _shards_bad_version, 2, ("'a/b'", "version")),
    Case(
        "killed runs' leftovers are removed",
        _shards_leftovers,
        0,
        ("wrote",),
        _shards_leftovers_after,
    ),
    # publish, pull
    Case("publish --bucket 'Bad_Bucket!!'", _publish_bad_bucket, 2, ("Bad_Bucket!!",), s3=True),
    Case(
        "publish to a missing bucket",
        _publish_no_bucket,
        2,
        ("no-such-bucket-af", "does not exist"),
        s3=True,
    ),
    Case("publish twice without --force", _publish_twice, 2, ("v1", "--force"), s3=True),
    Case(
        "publish a version the gates failed",
        _publish_not_publishable,
        1,
        ("card.json", "not publishable"),
        s3=True,
    ),
    Case("publish an incomplete version", _publish_incomplete, 2, ("v1", "incomplete"), s3=True),
    Case(
        "publish to an unreachable endpoint",
        _publish_unreachable,
        3,
        ("127.0.0.1:9", "cannot reach"),
        s3=True,
        extra_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    ),
    Case(
        "failed pull keeps the local version",
        _pull_absent,
        2,
        ("v1", "no published version"),
        s3=True,
    ),
    Case("pull of a corrupted object", _pull_corrupt, 3, ("sha256 differs",), s3=True),
    Case(
        "read-only output folder (pull)",
        _pull_read_only,
        2,
        ("shards",),
        s3=True,
        read_only="out/shards",
    ),
    Case("pull --bucket 'Bad_Bucket!!'", _pull_bad_bucket, 2, ("Bad_Bucket!!",), s3=True),
]


@pytest.fixture(scope="module")
def moto_url():
    from tests.test_s3_publish import start_server

    server, url = start_server()
    yield url
    server.stop()


def _s3_env(monkeypatch, tmp_path: Path, url: str, bucket: str) -> None:
    from anomaly_factory.storage.s3 import make_client
    from tests.test_s3_publish import use_moto

    use_moto(monkeypatch, tmp_path, url)
    make_client().create_bucket(Bucket=bucket)


def _run_subprocess(args: list[str], limit: int, cwd: Path) -> tuple[int, str]:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(CLI), *args], preexec_fn=cap, capture_output=True, text=True, cwd=cwd, env=env
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, shared, monkeypatch, request):
    ws = tmp_path / ("b" + os.urandom(4).hex())  # also the bucket name of s3 cases
    ws.mkdir()
    if case.s3:
        _s3_env(monkeypatch, ws, request.getfixturevalue("moto_url"), ws.name)
    args = case.make(ws, shared)
    for key, value in case.extra_env.items():
        monkeypatch.setenv(key, value)
    before = tree(ws / "out")
    guard = read_only(ws / case.read_only) if case.read_only else contextlib.nullcontext()
    with guard:
        if case.subprocess_limit:
            code, output = _run_subprocess(args, case.subprocess_limit, ws)
        else:
            res = runner.invoke(app, args)
            code, output = res.exit_code, res.output
    said = " ".join(output.split())
    error = next((line for line in output.splitlines() if line.startswith("error:")), "")
    print(f"\n{case.name:<42} exit {code}  {error[:240] or said[-150:]}")
    assert code == case.code, output
    for culprit in case.says:
        assert culprit in said, (culprit, output)
    assert "Traceback" not in output and "MarkupError" not in output, output
    if case.code != 0:
        assert error, output  # one line saying what is wrong
        assert tree(ws / "out") == before  # earlier outputs untouched
    if case.after is not None:
        case.after(ws, shared)


def test_verbose_shows_the_traceback(tmp_path, shared):
    """--verbose (before the command) adds the traceback to the same error."""
    args = _no_source(tmp_path, shared)
    quiet = runner.invoke(app, args)
    loud = runner.invoke(app, ["--verbose", *args])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and "Traceback" in loud.output
    assert "does not exist" in loud.output


def test_at_least_forty_cases_and_every_command_has_exit_codes_in_its_help():
    assert len(CASES) >= 40
    for command in ("ingest", "generate", "gates", "shards", "publish", "pull"):
        res = runner.invoke(app, [command, "--help"])
        assert "Exit codes" in res.output and "infrastructure" in res.output, command
