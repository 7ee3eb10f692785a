"""A run's data root in object storage (``s3://bucket/prefix``, any fsspec URL), worked on
through a local cache.

Stages read and write local files (``RunLayout`` paths, relative to the data root). When
the data root is a URL, each machine works in a cache folder that mirrors part of the
store: a stage first **pulls** the folders it reads, then **pushes** the folders it
wrote. Nothing needs a shared disk, so GPU workers need only the package, their GPU and
the store.

Why outputs are never seen half-made:
- every file is downloaded to a temporary name and renamed, and an object store's PUT
  replaces an object whole;
- files are uploaded **in the order they were written** (modification time). Every
  stage writes its commit record last (a pair's record JSON after its PNGs, a
  fine-tune's ``state.json`` / ``checkpoint.json`` after its weights, ``pairs.parquet``
  after the records), so a store whose upload was cut off holds a state the stage itself
  passed through: what the readers and a resumed stage see is complete.
- Temporary files (any name starting with ``.``) are never uploaded.

Unchanged files are not copied again: a local file whose size and MD5 match the store's
ETag (S3's, single-part or multipart) is skipped both ways.

Credentials, region and endpoint come from the standard AWS configuration (environment,
``AWS_PROFILE``, ``~/.aws``, an instance or pod role); ``AWS_ENDPOINT_URL`` selects an
S3-compatible endpoint. Nothing here logs or stores a credential.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from anomaly_factory.errors import InputError

log = logging.getLogger(__name__)

CACHE_ENV = "ANOMALY_FACTORY_CACHE"  # where a machine keeps its copies of stores
# Uploads of at least two parts of this size go up in parts (s3fs's rule), and S3's ETag
# of such an object is made of the parts' MD5s: the size is ours, so the ETag is known.
S3_PART_SIZE = 64 * 2**20


def is_url(root: str | os.PathLike[str]) -> bool:
    """Whether a data root names a store (``s3://…``) rather than a local folder.

    >>> is_url("s3://bucket/runs"), is_url("/srv/factory"), is_url("data")
    (True, False, False)
    """
    return "://" in str(root)


def cache_root() -> Path:
    """``$ANOMALY_FACTORY_CACHE``, else ``~/.cache/anomaly-factory/stores``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anomaly-factory" / "stores"


def _local_etag(path: Path, size: int, part_size: int = S3_PART_SIZE) -> str:
    """S3's ETag of ``path`` uploaded by s3fs in ``part_size`` parts: its MD5, or for a
    multipart upload the MD5 of the parts' MD5s followed by ``-<parts>``."""
    if size < 2 * part_size:
        return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    digests = []
    with open(path, "rb") as f:
        while chunk := f.read(part_size):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(digests)}"


def _same(local: Path, info: dict[str, Any], part_size: int = S3_PART_SIZE) -> bool:
    """Whether ``local`` holds what the store's object (its listing ``info``) holds."""
    if not local.is_file():
        return False
    size = local.stat().st_size
    if size != info.get("size"):
        return False
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    # a store without content hashes in its listing: copy (correct, only slower)
    return bool(etag) and _local_etag(local, size, part_size) == etag


def _is_temporary(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


@dataclass(frozen=True)
class Store:
    """A data root at ``url``, mirrored into the local folder ``workspace``."""

    url: str
    workspace: Path = field(default=Path())
    part_size: int = S3_PART_SIZE

    @classmethod
    def at(cls, url: str, cache: Path | None = None) -> Store:
        """The store at ``url`` with this machine's cache folder for it (one object, and
        one client, per URL, cache folder and endpoint)."""
        return _store(url.rstrip("/"), cache or cache_root(), os.environ.get("AWS_ENDPOINT_URL"))

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        import fsspec

        try:  # a fresh client: the fsspec instance cache would outlive a changed endpoint
            return fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except (ValueError, ImportError) as exc:
            raise InputError(f"data root {self.url!r}: {exc}") from exc

    def _remote(self, rel: str | Path) -> str:
        rel = Path(rel)
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"{rel}: not a path inside the data root {self.url}")
        return f"{self._fs[1]}/{rel.as_posix()}".rstrip("/")

    def _listing(self, rel: str | Path) -> dict[str, dict[str, Any]]:
        """Every object under ``rel`` (a file or a folder) by its path relative to it."""
        fs, _ = self._fs
        remote = self._remote(rel)
        fs.invalidate_cache(remote)
        found = fs.find(remote, detail=True)
        if not found and fs.isfile(remote):  # rel names one object
            return {"": fs.info(remote)}
        return {name[len(remote) :].lstrip("/"): info for name, info in found.items()}

    def exists(self, rel: str | Path) -> bool:
        return bool(self._listing(rel))

    def pull(self, rels: Iterable[str | Path], only: set[str] | None = None) -> int:
        """Copy the files under each of ``rels`` from the store into the workspace (all of
        them, or those whose workspace-relative path is in ``only``); returns how many
        were copied. A path the store lacks is skipped: there is nothing to resume."""
        fs, _ = self._fs
        copied = 0
        for rel in rels:
            for sub, info in sorted(self._listing(rel).items()):
                path = Path(rel) / sub if sub else Path(rel)
                if only is not None and path.as_posix() not in only:
                    continue
                local = self.workspace / path
                if _same(local, info, self.part_size):
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
                os.close(fd)
                try:
                    fs.get_file(self._remote(path), tmp)
                    os.replace(tmp, local)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                copied += 1
        if copied:
            log.info("pulled %d files of %s from %s", copied, ", ".join(map(str, rels)), self.url)
        return copied

    def push(
        self, rels: Iterable[str | Path], only: set[str] | None = None, mirror: bool = False
    ) -> int:
        """Upload the files under each of ``rels`` (workspace-relative; all of them, or
        those in ``only``) in the order they were written; returns how many were uploaded.

        ``mirror``: then delete the store's files under ``rel`` that the workspace no
        longer holds (a fine-tune's older resume states), once all of its files are up.
        """
        fs, _ = self._fs
        uploaded = 0
        for rel in rels:
            root = self.workspace / rel
            if root.is_file():
                entries = [root]
            elif root.is_dir():
                entries = list(root.rglob("*"))
            else:
                continue
            listing = self._listing(rel)
            stamped = []
            # False once the stage changed the folder under us: the snapshot is then not
            # one the stage passed through, and mirroring it could delete the store's only
            # complete resume state while its successor is still being written
            complete = True
            for p in entries:
                sub = p.relative_to(root)
                if only is not None and (Path(rel) / sub).as_posix() not in only:
                    continue
                if _is_temporary(sub):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:  # removed since it was listed: next push
                    complete = False
                    continue
                if stat.S_ISREG(st.st_mode):
                    stamped.append((st.st_mtime_ns, sub.as_posix(), p))
            for _, sub, p in sorted(stamped):
                key = "" if p == root else sub
                if key in listing and _same(p, listing[key], self.part_size):
                    continue
                try:
                    fs.put_file(str(p), self._remote(Path(rel) / key), chunksize=self.part_size)
                except FileNotFoundError:  # the stage replaced it since: next push
                    complete = False
                    continue
                uploaded += 1
            if mirror and only is None and complete and root.is_dir():
                kept = {sub for _, sub, _ in stamped}
                stale = [self._remote(Path(rel) / k) for k in listing if k and k not in kept]
                if stale:
                    fs.rm(stale)
        if uploaded:
            log.info("pushed %d files of %s to %s", uploaded, ", ".join(map(str, rels)), self.url)
        return uploaded


@functools.cache
def _store(url: str, cache: Path, endpoint: str | None) -> Store:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Store(url, cache / digest)


@contextlib.contextmanager
def pushing(store: Store, rels: list[Path], every_s: float, mirror: bool = True) -> Iterator[None]:
    """Push ``rels`` every ``every_s`` seconds while the body runs, and once at the end
    (also when it fails), so a job that dies leaves what it finished in the store for
    the retry, on whichever machine, to resume from."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                store.push(rels, mirror=mirror)
            except Exception as exc:  # the final push reports it; training goes on
                log.warning("periodic push to %s failed: %s", store.url, exc)

    thread = threading.Thread(target=loop, name="store-push", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        store.push(rels, mirror=mirror)
