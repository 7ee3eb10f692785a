"""Kill -9 at the atomic boundaries of generate, shards, publish and pull, then rerun.

Each stage runs in a forked child that SIGKILLs itself at its n-th boundary: just before
or just after an ``os.replace`` / atomic folder exchange (generate, shards, pull), or an
S3 write (publish: PutObject, CompleteMultipartUpload, DeleteObject). After every kill
the test checks that the complete version the user had is still complete and readable,
then reruns the stage and checks the outputs are byte-identical to an uninterrupted run
and that no temporary file or folder is left. 24 kill points in all.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from anomaly_factory import io as af_io
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.generators.registry import run_generator
from anomaly_factory.io import sha256_file
from anomaly_factory.storage.card import read_card
from anomaly_factory.storage.shards import write_shards
from tests import test_s3_publish
from tests.test_shards import make_pairs, write_reports

s3_bucket = test_s3_publish.s3_bucket  # the fixture: its own moto server and bucket

S3_WRITES = {"PutObject", "CompleteMultipartUpload", "DeleteObject"}


# --------------------------------------------------------------------------- killing
def _arm(n: int, after: bool, tally: Path | None) -> None:
    """In the child: count boundaries; SIGKILL this process at the n-th one."""
    from botocore.client import BaseClient

    seen = [0]

    def boundary(label: str, do: Callable[[], object]) -> object:
        seen[0] += 1
        if tally is not None:
            with open(tally, "a") as f:
                f.write(label + "\n")
        if seen[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = do()
        if seen[0] == n and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    real_replace, real_exchange = os.replace, af_io._exchange
    real_call = BaseClient._make_api_call
    os.replace = lambda a, b, **kw: boundary(
        f"replace {Path(b).name}", lambda: real_replace(a, b, **kw)
    )
    af_io._exchange = lambda a, b: boundary(f"exchange {Path(b).name}", lambda: real_exchange(a, b))

    def api_call(self, operation, params):
        if operation in S3_WRITES:
            label = f"{operation} {params.get('Key')}"
            return boundary(label, lambda: real_call(self, operation, params))
        return real_call(self, operation, params)

    BaseClient._make_api_call = api_call


def _child(n: int, after: bool, tally: Path | None, stage: Callable[[], object]) -> None:
    _arm(n, after, tally)
    stage()


def run_killed(stage: Callable[[], object], n: int, after: bool) -> int:
    """The child's exit code: -9 when killed at boundary n, 0 when the stage finished."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(n, after, None, stage))
    proc.start()
    proc.join(120)
    assert proc.exitcode is not None, "the stage hung"
    return proc.exitcode


def boundaries(stage: Callable[[], object], tmp: Path) -> list[str]:
    """The labels of a full run's boundaries, in order ('replace card.json', ...)."""
    tally = tmp / "tally"
    tally.unlink(missing_ok=True)
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(0, False, tally, stage))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    return tally.read_text().splitlines()


def points(labels: list[str], k: int, around: tuple[str, ...] = ()) -> list[tuple[int, bool]]:
    """k kill points (boundary number, after?): just before and just after the first
    boundary whose label contains each of ``around`` (the commit points), then the first
    and last boundaries, then others spread evenly."""
    chosen: list[tuple[int, bool]] = []
    for word in around:
        n = next(i for i, label in enumerate(labels, 1) if word in label)
        chosen += [(n, False), (n, True)]
    total = len(labels)
    spread = [(1, False), (total, True)]
    spread += [(1 + (total - 1) * i // (k - 1), i % 2 == 1) for i in range(1, k - 1)]
    for point in spread:
        if len(chosen) < k and point not in chosen:
            chosen.append(point)
    return chosen


# --------------------------------------------------------------------------- checks
def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of any stage below ``root``."""
    names = (".tmp", ".extracting")
    found = []
    for p in root.rglob("*"):
        if (
            p.name.endswith(names)
            or ".tmp-" in p.name
            or any(f".{kind}-" in p.name for kind in ("build", "pull", "old"))
        ):
            found.append(str(p.relative_to(root)))
    return found


def assert_complete(version_dir: Path) -> dict[str, str]:
    """A complete, readable local version: its card and every file the card lists."""
    card = read_card(version_dir)
    assert card is not None, f"{version_dir} lost its card"
    for f in card["files"]:
        assert sha256_file(version_dir / f["path"]) == f["sha256"], f["path"]
    return tree(version_dir)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def contents(tmp_path_factory, demo_manifest, demo_manifest_path):
    """Two pairs sets (an 'old' and a 'new' content of one version) and their reports."""
    root = tmp_path_factory.mktemp("contents")
    old = make_pairs(demo_manifest, root / "old", per_type=1)
    new = make_pairs(demo_manifest, root / "new", per_type=2)
    return old, new, write_reports(root / "reports"), demo_manifest_path


def _cfg(tiny_config, root: Path):
    cfg = tiny_config.model_copy(deep=True)
    cfg.generator = "cutpaste"
    cfg.model.resolution = 32
    cfg.shards.out_dir = root / "shards"
    cfg.gates.out_dir = root / "reports"
    cfg.publish.max_attempts = 1
    cfg.publish.retry_backoff_s = 0.0
    return cfg


# --------------------------------------------------------------------------- generate
def test_generate_killed_at_every_kind_of_boundary(tiny_config, demo_manifest_path, tmp_path):
    cfg = _cfg(tiny_config, tmp_path)
    out = tmp_path / "pairs"

    def stage() -> object:
        request = GenerationRequest(cfg, demo_manifest_path, "nut_demo", "rust", 3, out)
        return run_generator("cutpaste", request)

    stage()
    reference = tree(out)
    shutil.rmtree(out)
    labels = boundaries(stage, tmp_path)
    assert len(labels) == 13  # 3 pairs x (image, mask, normal, record) + pairs.parquet
    shutil.rmtree(out)
    for n, after in points(labels, 7, ("rust-000000.json", "pairs.parquet")):
        code = run_killed(stage, n, after)
        assert code == -signal.SIGKILL, (n, after, code)
        done = sorted(p.stem for p in (out / "records").glob("*.json"))
        for key in done:  # a pair whose record exists is complete
            assert all((out / d / f"{key}.png").is_file() for d in ("images", "masks", "normals"))
        stage()  # the rerun finishes the job and removes the killed run's temp files
        assert tree(out) == reference, (n, after)
        assert leftovers(out) == [], (n, after)
        shutil.rmtree(out)


# --------------------------------------------------------------------------- shards
def test_shards_killed_while_rewriting_a_complete_version(tiny_config, contents, tmp_path):
    old, new, reports, manifest = contents
    cfg = _cfg(tiny_config, tmp_path)
    version_dir = tmp_path / "shards" / "v1"

    def stage() -> object:
        return write_shards(cfg, new, manifest, "v1", reports)

    stage()
    reference = tree(version_dir)
    write_shards(cfg, old, manifest, "v1", reports)
    old_tree = assert_complete(version_dir)
    labels = boundaries(stage, tmp_path)
    for n, after in points(labels, 6, ("card.json", "exchange v1")):
        write_shards(cfg, old, manifest, "v1", reports)  # the complete version to protect
        code = run_killed(stage, n, after)
        assert code == -signal.SIGKILL, (n, after, code)
        assert assert_complete(version_dir) in (old_tree, reference), (n, after)
        stage()
        assert tree(version_dir) == reference, (n, after)
        assert leftovers(tmp_path / "shards") == [], (n, after)


# --------------------------------------------------------------------------- publish, pull
def _version_keys(bucket: str, prefix: str) -> set[str]:
    from anomaly_factory.storage.s3 import make_client

    listing = make_client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix) :] for o in listing.get("Contents", [])}


def test_publish_force_killed_keeps_the_old_version_visible(
    tiny_config, contents, tmp_path, s3_bucket
):
    from anomaly_factory.storage.publish import publish_version
    from anomaly_factory.storage.s3 import S3Location, make_client, objects_root, pull_version

    old, new, reports, manifest = contents
    cfg = _cfg(tiny_config, tmp_path)
    cfg.publish.bucket, cfg.publish.prefix = s3_bucket, "p"
    local = {}
    for name, pairs in (("old", old), ("new", new)):
        write_shards(cfg, pairs, manifest, "v1", reports, tmp_path / name)
        local[name] = tree(tmp_path / name / "v1")
    loc = S3Location(s3_bucket, "p", "v1")

    def publish(name: str) -> Callable[[], object]:
        def stage() -> object:
            cfg.shards.out_dir = tmp_path / name
            return publish_version(cfg, "v1", force=True, dvc=False, git_tag=False)

        return stage

    def pulled(tag: str) -> dict[str, str]:
        dest = pull_version(make_client(), loc, tmp_path / "pulled" / tag)
        return tree(dest)

    publish("old")()
    labels = boundaries(publish("new"), tmp_path)
    publish("old")()
    for i, (n, after) in enumerate(points(labels, 6, ("PutObject p/v1/card.json", "Delete"))):
        code = run_killed(publish("new"), n, after)
        assert code == -signal.SIGKILL, (n, after, code)
        assert pulled(f"k{i}") in (local["old"], local["new"])  # visible and complete
        publish("new")()  # the rerun takes over the killed publisher's lease
        assert pulled(f"r{i}") == local["new"], (n, after)
        remote = json.loads(
            make_client().get_object(Bucket=s3_bucket, Key="p/v1/card.json")["Body"].read()
        )
        root = objects_root(remote)
        want = {root + f["path"] for f in remote["files"]} | {root + "card.md", "card.json"}
        assert _version_keys(s3_bucket, "p/v1/") == want, (n, after)  # no stale object, no lease
        publish("old")()  # back to the old content for the next kill


def test_pull_killed_never_loses_the_local_version(tiny_config, contents, tmp_path, s3_bucket):
    from anomaly_factory.storage.publish import publish_version
    from anomaly_factory.storage.s3 import S3Location, make_client, pull_version

    old, new, reports, manifest = contents
    cfg = _cfg(tiny_config, tmp_path)
    cfg.publish.bucket, cfg.publish.prefix = s3_bucket, "p"
    write_shards(cfg, new, manifest, "v1", reports, tmp_path / "published")
    cfg.shards.out_dir = tmp_path / "published"
    publish_version(cfg, "v1", dvc=False, git_tag=False)
    loc = S3Location(s3_bucket, "p", "v1")
    local = tmp_path / "local"

    def stage() -> object:
        return pull_version(make_client(), loc, local)

    stage()
    reference = tree(local / "v1")
    assert reference == tree(tmp_path / "published" / "v1")
    labels = boundaries(stage, tmp_path)
    for n, after in points(labels, 5, ("exchange v1",)):
        shutil.rmtree(local)
        write_shards(cfg, old, manifest, "v1", reports, local)  # an older local copy
        old_tree = assert_complete(local / "v1")
        code = run_killed(stage, n, after)
        assert code == -signal.SIGKILL, (n, after, code)
        assert assert_complete(local / "v1") in (old_tree, reference), (n, after)
        stage()
        assert tree(local / "v1") == reference, (n, after)
        assert leftovers(local) == [], (n, after)
