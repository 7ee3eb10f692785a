"""DVC operations on a workspace, serialised: one workspace has one DVC lock.

Every call here takes a file lock in ``.dvc/tmp`` first, so parallel tasks of a flow queue
up instead of failing on DVC's own repo lock. DVC's Python API (``dvc.repo.Repo``) does
the work; git (tagging) goes through the ``git`` command. The S3 remote's endpoint and
credentials come from the standard AWS configuration (``AWS_ENDPOINT_URL`` is read by
DVC's s3fs/aiobotocore backend), so no secret is written into a DVC config.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from anomaly_factory.errors import InfrastructureError, InputError

LOCK_FILE = "anomaly-factory.lock"
LOCK_TIMEOUT_S = 3600  # a long `dvc push` of paper-size shards must not time out the queue


class DVCError(InfrastructureError):
    """A DVC or git operation failed (exit 3)."""


class DVCUsageError(DVCError):
    """DVC or git cannot do what was asked here: no repository, a bad remote, a tag
    that exists (exit 2)."""

    exit_code = InputError.exit_code


@contextlib.contextmanager
def dvc_lock(root: Path | str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the workspace's DVC lock (a file lock beside DVC's own)."""
    from filelock import FileLock

    lock_dir = Path(root) / ".dvc" / "tmp"
    if not lock_dir.parent.is_dir():
        raise DVCUsageError(f"{root}: not a DVC repository (no .dvc folder; run `dvc init`)")
    lock_dir.mkdir(exist_ok=True)
    with FileLock(str(lock_dir / LOCK_FILE), timeout=timeout):
        yield


@contextlib.contextmanager
def _repo(root: Path | str) -> Iterator[Any]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with dvc_lock(root):
        try:
            with Repo(str(root)) as repo:
                yield repo
        except DvcException as exc:
            raise DVCError(f"dvc in {root}: {exc}") from exc


def add_s3_remote(root: Path | str, name: str, url: str, default: bool = True) -> None:
    """Configure an S3 remote (``url`` is ``s3://bucket/path``); the endpoint stays in env."""
    if not url.startswith("s3://"):
        raise DVCUsageError(f"remote url {url!r} is not an s3:// URL")
    with _repo(root) as repo, repo.config.edit() as conf:
        conf["remote"][name] = {"url": url}
        if default:
            conf["core"]["remote"] = name


def default_remote(root: Path | str) -> str | None:
    """The repository's default DVC remote (``core.remote``), if one is set."""
    with _repo(root) as repo:
        return repo.config.get("core", {}).get("remote")


def track(root: Path | str, paths: Sequence[Path | str]) -> list[Path]:
    """Record outputs in DVC: ``dvc commit`` for a dvc.yaml stage output, else ``dvc add``.

    Returns the files git must commit (``.dvc`` files, ``dvc.lock``, ``.gitignore`` s).
    """
    from dvc.exceptions import OutputNotFoundError

    root = Path(root)
    changed: list[Path] = []
    with _repo(root) as repo:
        for path in paths:
            rel = Path(path).resolve().relative_to(root.resolve())
            try:
                outs = repo.find_outs_by_path(str(root / rel), strict=False)
            except OutputNotFoundError:
                outs = []
            if outs and not outs[0].stage.is_data_source:
                repo.commit(str(outs[0].stage.addressing), force=True)
                changed.append(root / "dvc.lock")
            else:
                repo.add(str(root / rel))
                changed.append(root / rel.parent / f"{rel.name}.dvc")
            changed.append(root / rel.parent / ".gitignore")
    return [p for p in changed if p.exists()]


def push(
    root: Path | str, targets: Sequence[Path | str] | None = None, remote: str | None = None
) -> int:
    """``dvc push``; returns the number of files transferred."""
    with _repo(root) as repo:
        return repo.push(targets=[str(t) for t in targets] if targets else None, remote=remote)


def pull(
    root: Path | str, targets: Sequence[Path | str] | None = None, remote: str | None = None
) -> None:
    """``dvc pull`` of the given targets (default: everything tracked)."""
    with _repo(root) as repo:
        repo.pull(targets=[str(t) for t in targets] if targets else None, remote=remote)


def get(url: str, path: str, out: Path | str, rev: str | None = None) -> Path:
    """``dvc get <url> <path> --rev <rev>``: one tracked path of a repo at a tag."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        Repo.get(url, path, out=str(out), rev=rev)
    except DvcException as exc:
        raise DVCError(f"dvc get {url} {path} --rev {rev}: {exc}") from exc
    return Path(out)


def _git(root: Path | str, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DVCError(f"git {' '.join(args)} in {root}: {proc.stderr.strip()}")
    return proc.stdout


def tag_version(
    root: Path | str, version: str, files: Sequence[Path | str], force: bool = False
) -> None:
    """Commit the DVC metadata of a version and tag it (``git tag -a <version>``)."""
    exists = _git(root, "tag", "--list", version).strip()
    if exists and not force:
        raise DVCUsageError(
            f"git tag {version!r} already exists in {root} (use --force to move it)"
        )
    _git(root, "add", "--", *[os.fspath(f) for f in files])
    if _git(root, "diff", "--cached", "--name-only").strip():
        _git(root, "commit", "-m", f"Dataset version {version}")
    _git(root, "tag", "-a", *(["-f"] if force else []), version, "-m", f"Dataset version {version}")
