"""A store data root (moto's S3 server on 127.0.0.1) mirrored through local caches."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest

from anomaly_factory.errors import InputError
from anomaly_factory.storage.store import Store, _local_etag, pushing
from tests.test_s3_publish import make_client, start_server, use_moto


@pytest.fixture(scope="module")
def moto_url():
    server, url = start_server()
    yield url
    server.stop()


@pytest.fixture
def bucket(moto_url, monkeypatch, tmp_path) -> str:
    use_moto(monkeypatch, tmp_path, moto_url)
    name = f"st-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return name


def _write(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = make_client()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


def test_push_then_pull_elsewhere_is_byte_exact_and_unchanged_files_stay(bucket, tmp_path):
    a = Store(f"s3://{bucket}/runs", tmp_path / "a")
    b = Store(f"s3://{bucket}/runs", tmp_path / "b")
    files = {"data/pairs/v1/x/images/0.png": os.urandom(3000), "data/pairs/v1/x/r.json": b"{}"}
    for name, data in files.items():
        _write(a.workspace / name, data)
    _write(a.workspace / "data/pairs/v1/x/.r.json.tmp123", b"half")  # a write in progress

    assert a.push(["data/pairs/v1"]) == 2
    assert _objects(bucket, "runs/") == files  # the temporary file stayed local
    assert b.pull(["data/pairs/v1", "data/checkpoints/none"]) == 2  # a missing path: nothing
    assert {n: (b.workspace / n).read_bytes() for n in files} == files

    assert a.push(["data/pairs/v1"]) == 0 and b.pull(["data/pairs/v1"]) == 0
    # same size, other bytes: the MD5 (ETag) tells them apart
    _write(a.workspace / "data/pairs/v1/x/r.json", b"[]")
    assert a.push(["data/pairs/v1"]) == 1
    assert b.pull(["data/pairs/v1"]) == 1
    assert (b.workspace / "data/pairs/v1/x/r.json").read_bytes() == b"[]"


def test_files_go_up_in_the_order_they_were_written(bucket, tmp_path, monkeypatch):
    """The commit record written last goes up last, so a cut-off upload never shows a
    record whose images are missing."""
    store = Store(f"s3://{bucket}/runs", tmp_path / "w")
    t = 1_700_000_000_000_000_000
    _write(store.workspace / "p/records/a.json", b"{}", t + 3)  # written last
    _write(store.workspace / "p/images/a.png", b"png", t + 1)
    _write(store.workspace / "p/masks/a.png", b"mask", t + 2)
    fs, _ = store._fs
    sent: list[str] = []
    real = fs.put_file

    def cut_off_after_two(lpath, rpath, **kw):
        if len(sent) == 2:
            raise ConnectionError("network gone")
        sent.append(Path(lpath).relative_to(store.workspace).as_posix())
        return real(lpath, rpath, **kw)

    monkeypatch.setattr(fs, "put_file", cut_off_after_two)
    with pytest.raises(ConnectionError):
        store.push(["p"])
    assert sent == ["p/images/a.png", "p/masks/a.png"]
    assert set(_objects(bucket, "runs/")) == {"p/images/a.png", "p/masks/a.png"}
    monkeypatch.undo()
    assert store.push(["p"]) == 1  # the rest, once the network is back


def test_mirror_removes_what_the_stage_removed(bucket, tmp_path):
    store = Store(f"s3://{bucket}/runs", tmp_path / "w")
    old = store.workspace / "ckpt/train_state-00000002/state.json"
    _write(old, b'{"step": 2}')
    store.push(["ckpt"], mirror=True)
    old.unlink()
    _write(store.workspace / "ckpt/train_state-00000004/state.json", b'{"step": 4}')
    store.push(["ckpt"], mirror=True)
    assert set(_objects(bucket, "runs/")) == {"ckpt/train_state-00000004/state.json"}
    store.push(["ckpt"])  # not mirrored: a file only the store has stays
    _write(store.workspace / "ckpt/x", b"x")
    (store.workspace / "ckpt/train_state-00000004/state.json").unlink()
    store.push(["ckpt"])
    assert len(_objects(bucket, "runs/")) == 2


def test_mirror_keeps_the_store_when_the_stage_changes_the_folder_under_it(
    bucket, tmp_path, monkeypatch
):
    """The race the kill test hit: a push lists the folder, the fine-tune then replaces
    its resume state; a mirror of that torn snapshot deleted the store's only complete
    state, and the retry on another machine started from step 0."""
    store = Store(f"s3://{bucket}/runs", tmp_path / "w")
    done = store.workspace / "ckpt/train_state-00000040"
    _write(done / "trainable.safetensors", b"w40")
    _write(done / "state.json", b'{"step": 40}')
    store.push(["ckpt"], mirror=True)
    # the stage writes state 44 and drops 40; 44's state.json goes while the push lists
    _write(store.workspace / "ckpt/train_state-00000044/trainable.safetensors", b"w44")
    _write(store.workspace / "ckpt/train_state-00000044/state.json", b'{"step": 44}')
    for f in done.iterdir():
        f.unlink()
    done.rmdir()
    real_stat = Path.stat

    def replaced_while_listed(self, *args, **kwargs):
        if self.name == "state.json" and "00000044" in str(self):
            raise FileNotFoundError(errno.ENOENT, "replaced by the stage", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", replaced_while_listed)
    store.push(["ckpt"], mirror=True)
    assert "ckpt/train_state-00000040/state.json" in _objects(bucket, "runs/")
    monkeypatch.setattr(Path, "stat", real_stat)
    store.push(["ckpt"], mirror=True)  # a whole snapshot: now 40 goes
    assert set(_objects(bucket, "runs/")) == {
        "ckpt/train_state-00000044/trainable.safetensors",
        "ckpt/train_state-00000044/state.json",
    }


def test_periodic_pushes_leave_progress_in_the_store_while_the_body_runs(bucket, tmp_path):
    import time

    store = Store(f"s3://{bucket}/runs", tmp_path / "w")
    with pushing(store, [Path("ckpt")], every_s=0.05):
        _write(store.workspace / "ckpt/train_state-00000001/state.json", b"1")
        deadline = time.time() + 30
        while time.time() < deadline and not _objects(bucket, "runs/"):
            time.sleep(0.05)
        assert set(_objects(bucket, "runs/")) == {"ckpt/train_state-00000001/state.json"}
        _write(store.workspace / "ckpt/checkpoint.json", b"done")
    assert len(_objects(bucket, "runs/")) == 2  # the final push, at the end


def test_a_multipart_upload_is_recognised_as_unchanged(bucket, tmp_path):
    """Large files go up in parts: their ETag is not an MD5 of the file (5 MiB parts here,
    S3's smallest, instead of the default 64 MiB)."""
    store = Store(f"s3://{bucket}/runs", tmp_path / "w", part_size=5 * 2**20)
    big = store.workspace / "unet/weights.safetensors"
    _write(big, os.urandom(11 * 2**20))
    assert store.push(["unet"]) == 1
    head = make_client().head_object(Bucket=bucket, Key="runs/unet/weights.safetensors")
    assert head["ETag"].strip('"').endswith("-3")
    assert _local_etag(big, big.stat().st_size, store.part_size) == head["ETag"].strip('"')
    assert store.push(["unet"]) == 0


def test_paths_outside_the_data_root_are_refused(bucket, tmp_path):
    store = Store(f"s3://{bucket}/runs", tmp_path / "w")
    for bad in ("../elsewhere", "/etc/passwd"):
        with pytest.raises(InputError, match="not a path inside the data root"):
            store.pull([bad])


def test_a_job_on_another_machine_shows_its_progress_in_the_run_display(
    bucket, tmp_path, monkeypatch
):
    """With a store data root, a type's pairs reach the factory's machine only at the
    merge; its progress record (pushed with them) is what moves the type's bar."""
    import io

    import pandas as pd
    from rich.console import Console

    from anomaly_factory import manifest, progress
    from anomaly_factory.cli._display import RunDisplay
    from anomaly_factory.config import FactoryConfig
    from anomaly_factory.stages import RunRef
    from anomaly_factory.storage.staging import progress_sync

    monkeypatch.setenv("ANOMALY_FACTORY_CACHE", str(tmp_path / "factory-machine"))
    cfg = FactoryConfig.model_validate({"orchestration": {"dispatch": "work_pool"}})
    ref = RunRef.make(cfg, "v1", f"s3://{bucket}/runs")
    worker = Store(f"s3://{bucket}/runs", tmp_path / "gpu-machine")
    record = progress.record_path(
        worker.workspace / "data/runs/v1/progress", "generate", "nut/rust"
    )
    rel = record.relative_to(worker.workspace)

    progress.report(record.parent, "generate", "nut/rust", 3, 3)  # an earlier run's
    worker.push([rel])
    sync = progress_sync(ref)
    assert sync is not None and _objects(bucket, "runs/data/runs/") == {}

    progress.report(record.parent, "generate", "nut/rust", 2, 3)  # this run's job, so far
    worker.push([rel])
    ref.layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    ref.layout.manifest.touch()
    images = pd.DataFrame({"category": ["nut", "nut"], "anomaly_type": ["rust", "scratch"]})
    monkeypatch.setattr(manifest, "read_images", lambda path: images)
    monkeypatch.setattr(manifest, "anomaly_types", lambda df, c: ["rust", "scratch"])
    progress.report(ref.layout.progress, "generate", progress.STAGE_UNIT, 0, 2)
    display = RunDisplay(ref.layout, Console(file=io.StringIO()), sync=sync)
    display.update()
    rows = {
        display.bar.tasks[t].description.strip(): display.bar.tasks[t]
        for t in display.types.values()
    }
    assert rows["nut/rust"].completed == 2 and rows["nut/scratch"].completed == 0
