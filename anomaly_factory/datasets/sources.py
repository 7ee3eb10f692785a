"""Getting a dataset onto disk: download with resume and checksum, safe extraction.

Official archives move; the defaults below can be overridden per dataset in
``pipelines.yaml`` (``datasets.items[].source`` / ``sha256``) or on the CLI.
"""

from __future__ import annotations

import lzma
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from anomaly_factory.errors import FactoryError, InfrastructureError, InputError
from anomaly_factory.io import HASH_CHUNK, sha256_file


@dataclass(frozen=True)
class ArchiveInfo:
    url: str
    filename: str
    checksum: str
    algorithm: str = "sha256"


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


class SourceError(FactoryError, RuntimeError):
    """A dataset source is missing, or could not be verified or extracted (exit 2)."""

    exit_code = InputError.exit_code


class DownloadError(SourceError):
    """The source's server could not be reached or refused the download (exit 3)."""

    exit_code = InfrastructureError.exit_code


class ChecksumMismatch(SourceError):
    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(f"{path}: checksum mismatch: expected {expected}, got {actual}")
        self.expected, self.actual = expected, actual


class UnsafeArchiveMember(SourceError):
    """An archive member would land outside the extraction folder."""


def is_url(source: str) -> bool:
    return urlparse(str(source)).scheme in ("http", "https")


def is_archive(path: Path) -> bool:
    return path.is_file() and str(path).lower().endswith(ARCHIVE_SUFFIXES)


def verify_checksum(path: Path, expected: str | None, algorithm: str = "sha256") -> str:
    """Return the file's hash; raise ChecksumMismatch showing both values if it differs."""
    import hashlib

    if algorithm == "sha256":
        actual = sha256_file(path)
    else:
        h = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        actual = h.hexdigest()
    if expected is not None and actual.lower() != expected.lower():
        raise ChecksumMismatch(path, expected.lower(), actual)
    return actual


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    algorithm: str = "sha256",
    show_progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, resuming a partial ``.part`` file.

    The finished file is checked against ``sha256`` (or ``algorithm``) before it is
    renamed into place, so ``dest`` only ever exists complete and verified.
    """
    dest = Path(dest)
    if dest.exists():
        verify_checksum(dest, sha256, algorithm)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "anomaly-factory"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)  # noqa: S310 (http(s) only)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # partial file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: download failed: {exc.reason}") from exc
    if response is not None:
        with response:
            resumed = response.status == 206
            mode = "ab" if resumed else "wb"
            done = offset if resumed else 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length else None
            with (
                open(part, mode) as out,
                Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    disable=not show_progress,
                ) as progress,
            ):
                task = progress.add_task(escape(dest.name), total=total, completed=done)
                while chunk := response.read(HASH_CHUNK):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
    try:
        verify_checksum(part, sha256, algorithm)
    except ChecksumMismatch as exc:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(dest, exc.expected, exc.actual) from None
    os.replace(part, dest)
    return dest


def _member_filter(target: Path):
    """tarfile's ``data`` filter, with errors that name the offending member."""

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        if member.isdev():
            raise UnsafeArchiveMember(f"archive member {member.name!r}: device files are refused")
        if os.path.isabs(member.name) or member.name.startswith(("/", "\\")):
            # the data filter would silently strip the slash; a dataset never needs it
            raise UnsafeArchiveMember(f"archive member {member.name!r}: absolute paths are refused")
        try:
            return tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            raise UnsafeArchiveMember(
                f"archive member {member.name!r}: refused, it would escape {target}: {exc}"
            ) from exc

    return check


# what a corrupt or cut-off archive raises from tarfile and its decompressors
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def extract(archive: Path, target: Path) -> Path:
    """Extract a tar archive into ``target``, refusing any member that escapes it.

    Extraction happens in a temporary sibling folder that is renamed on success (and
    removed on failure, or by the next run after a kill), and a ``.complete`` marker
    makes a re-run skip it. A corrupt or truncated archive is a SourceError naming it.
    """
    target = Path(target)
    marker = target / ".complete"
    if marker.exists():
        return target
    tmp = target.with_name(target.name + ".extracting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter=_member_filter(tmp))
    except UnsafeArchiveMember:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except ARCHIVE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk, not the archive (full, read-only): exit_code_for maps it
        raise SourceError(f"{archive}: corrupt or truncated archive: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    marker.write_text(str(archive))
    return target


def extraction_folder(root: Path, dataset: str, archive: Path, digest: str) -> Path:
    """Where an archive is extracted: keyed by its content (sha256), so a different
    archive with the same file name never reuses an older extraction."""
    stem = archive.name.split(".")[0]
    return Path(root) / dataset / f"{stem}-{digest[:16]}"


def find_root(folder: Path, marker: str) -> Path:
    """The folder under ``folder`` (itself or one level down) that holds ``marker``."""
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if list(candidate.glob(marker)):
            return candidate
    return folder


def materialize(
    dataset: str,
    source: str | os.PathLike[str] | None,
    root: Path,
    sha256: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Turn a folder, archive or URL into an extracted folder on disk."""
    from anomaly_factory.datasets.formats import get_format

    info = get_format(dataset).archive
    algorithm = "sha256"
    if source is None:
        if info is None:
            raise SourceError(f"dataset {dataset!r} has no default source; pass --source")
        source, algorithm = info.url, info.algorithm
        sha256 = sha256 or info.checksum
    source_str = str(source)
    if is_url(source_str):
        name = Path(urlparse(source_str).path).name or f"{dataset}.tar"
        if info and sha256 is None and name == info.filename:
            sha256, algorithm = info.checksum, info.algorithm
        archive = download(source_str, root / "downloads" / name, sha256, algorithm, show_progress)
        digest = sha256 if sha256 and algorithm == "sha256" else sha256_file(archive)
        return extract(archive, extraction_folder(root, dataset, archive, digest.lower()))
    path = Path(source_str)
    if not path.exists():
        raise SourceError(
            f"{path}: --source does not exist (give a folder, a tar archive "
            f"({', '.join(ARCHIVE_SUFFIXES)}) or an http(s) URL)"
        )
    if path.is_dir():
        if sha256 is not None:
            raise SourceError(
                f"--sha256: checks archives and downloads only, but {path} is a folder "
                "(drop --sha256, or pass the archive)"
            )
        return path
    if is_archive(path):
        digest = verify_checksum(path, sha256)
        return extract(path, extraction_folder(root, dataset, path, digest))
    raise SourceError(f"{path}: not a folder, a tar archive ({', '.join(ARCHIVE_SUFFIXES)}) or URL")
