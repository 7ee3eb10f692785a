"""Atomic file writes and content hashes.

Every artifact the factory produces goes through these helpers so that an
interrupted run never leaves a half-written file behind: data is written to a
temporary file in the same folder and renamed into place. Folders are swapped the
same way (:func:`swap_dir`), and a stage that owns an output folder holds its lock
(:func:`folder_lock`) and removes what a killed run of it left (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomaly_factory.errors import Busy

HASH_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB archives
TMP_SUFFIX = ".tmp"  # atomic_path's temporary files: ``.<name>.<random>.tmp``
RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one atomic rename
FILE_MODE = 0o666  # what open() creates files with, before the umask


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _named(exc: OSError, target: Path) -> OSError:
    """The same OS error, naming the file the caller meant (not a temporary one)."""
    return type(exc)(exc.errno, exc.strerror, str(target))


def name_the_output(exc: OSError, staging: Path, output: Path) -> OSError:
    """An OS error met while building ``output`` in its hidden ``staging`` folder, naming
    the folder the user chose (``output``'s parent) rather than the staging path."""
    if exc.filename is not None and str(exc.filename).startswith(str(staging)):
        return _named(exc, output.parent)
    return exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    The file gets the mode ``open()`` would give it (0644 under the usual umask 022), not
    ``mkstemp``'s private 0600: reports, cards and shards are meant to be read by others.
    An OS error (read-only folder, full disk) names ``path`` itself, and leaves no
    temporary file behind.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise _named(exc, target) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE & ~current_umask())
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno is None or exc.filename is not None:
            raise
        raise _named(exc, target) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- folders
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def swap_dir(new: Path, dest: Path) -> None:
    """Put the finished folder ``new`` at ``dest``; an old ``dest`` is removed.

    The swap is one atomic exchange where the file system supports it, so ``dest`` is
    always either the old complete folder or the new one, even if the process is killed.
    Elsewhere it takes two renames; a kill between them leaves the old folder as
    ``.<name>.old-<pid>``, which :func:`restore_or_remove` puts back.
    """
    new, dest = Path(new), Path(dest)
    if dest.exists() and _exchange(new, dest):
        shutil.rmtree(new)  # now the old folder
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_beside(dest: Path, kind: str) -> Iterator[Path]:
    """Yield an empty hidden sibling ``.<name>.<kind>-<pid>`` to build ``dest`` in; it is
    swapped into place (:func:`swap_dir`) when the block ends, and removed if it fails.

    An OS error inside names ``dest``'s folder, not the hidden one.
    """
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.{kind}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        swap_dir(staging, dest)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise name_the_output(exc, staging, dest) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) while one run writes it.

    The lock is the folder's own ``flock``: the kernel releases it when the process ends,
    however it ends, so a killed run never leaves a stale lock. Without ``wait``, a
    folder another process holds raises Busy (exit 3).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _named(exc, folder) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"{folder}: another {what} is writing this folder now") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def remove_stale(paths: Iterable[Path]) -> list[Path]:
    """Remove leftovers of killed runs (files or folders); returns what was removed."""
    removed = []
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def restore_or_remove(dest: Path, building: Iterable[str] = ("build", "pull")) -> list[Path]:
    """Clean what killed runs left beside the folder ``dest``; returns what was removed.

    ``.<name>.old-<pid>`` (a :func:`swap_dir` cut between its two renames) is put back
    when ``dest`` is missing, else removed; ``.<name>.<building>-<pid>`` folders (half
    built) are removed. Call it while holding the lock of ``dest``'s writers.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(old|{'|'.join(building)})-\d+")
    leftovers = sorted(p for p in dest.parent.iterdir() if pattern.fullmatch(p.name))
    for old in (p for p in leftovers if p.name.split(".")[-1].startswith("old-")):
        if not dest.exists():
            os.replace(old, dest)
            leftovers.remove(old)
    return remove_stale(leftovers)


def stale_temp_files(folder: Path) -> list[Path]:
    """``atomic_path``'s temporary files anywhere below ``folder``."""
    return sorted(Path(folder).rglob(f".*{TMP_SUFFIX}")) if Path(folder).is_dir() else []


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON with sorted keys so equal content gives equal bytes."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 HxW or HxWxC array as PNG, deterministically."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_png(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save a uint8 array as PNG atomically."""
    return atomic_write_bytes(path, png_bytes(array))


def portable_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """``path`` as manifests, cards and reports store it: relative to the data root (the
    working directory unless ``root`` is given) when it lies below it, so a version reads
    the same on every machine that mounts its data; URIs and other paths as given.

    >>> portable_path("/srv/factory/data/pairs/v1/a.png", "/srv/factory")
    'data/pairs/v1/a.png'
    >>> portable_path("s3://bucket/v1/index.json", "/srv/factory")
    's3://bucket/v1/index.json'
    """
    text = os.fspath(path)
    if "://" in text or not os.path.isabs(text):
        return text
    base = Path(root) if root is not None else Path.cwd()
    target = Path(os.path.normpath(text))
    for candidate in (base, base.resolve()):
        with contextlib.suppress(ValueError):
            return target.relative_to(candidate).as_posix() or "."
    return text


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def md5_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
