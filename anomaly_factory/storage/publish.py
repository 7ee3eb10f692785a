"""Publishing one local version: S3 upload, ``dvc push`` and a git tag, in that order.

The CLI's ``publish`` and the factory flow's publish task both call ``publish_version``.
DVC and git steps default to ``auto``: on when the shards lie in a DVC repository (the
project's own repo, where ``anomaly-factory run`` writes its versions), off elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from anomaly_factory.config import FactoryConfig
from anomaly_factory.layout import RunLayout

log = logging.getLogger(__name__)

Switch = bool | Literal["auto"]
DVC_REMOTE = "store"  # the remote publish adds when a repository has none


@dataclass(frozen=True)
class Publication:
    uri: str  # s3://bucket/prefix/<version>
    dvc_pushed: bool
    tag: str | None  # the git tag, when one was made
    skipped: str | None = None  # why auto DVC/git steps did not run


def find_root(start: Path, marker: str) -> Path | None:
    """The nearest folder at or above ``start`` holding ``marker`` (``.dvc``, ``.git``)."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / marker).exists():
            return folder
    return None


def check_publishable(version_dir: Path, reports_dir: Path) -> dict[str, Any]:
    """The version's card, if it and the gate reports say it may be published.

    The files themselves are checked against the card by ``s3.checked_files``.
    """
    from anomaly_factory.storage.card import is_publishable, read_card, read_reports
    from anomaly_factory.storage.s3 import IncompleteVersion, NotPublishable

    card = read_card(version_dir)
    if card is None:
        raise IncompleteVersion(
            f"{version_dir}: no card.json: the version is incomplete "
            "(run `anomaly-factory shards` to finish it)"
        )
    if not is_publishable(card):
        raise NotPublishable(
            f"{version_dir / 'card.json'}: gates say the version is not publishable "
            f"(gates: {card.get('gates')})"
        )
    reports = read_reports(reports_dir)
    if reports["gates"] is not None and not is_publishable(reports):
        raise NotPublishable(f"{reports_dir}: gates.json says not publishable")
    return card


def _resolve(
    dvc: Switch, git_tag: Switch, version_dir: Path
) -> tuple[bool, bool, Path | None, str]:
    """Turn ``auto`` into on/off for the repository holding ``version_dir``.

    An explicit ``True`` where the shards are not in a DVC repository is an error.
    """
    from anomaly_factory.storage.dvc_ops import DVCUsageError

    root = find_root(version_dir, ".dvc")
    skipped = ""
    if root is None:
        if dvc is True or git_tag is True:
            raise DVCUsageError(f"{version_dir}: not inside a DVC repository (run `dvc init`)")
        skipped = f"{version_dir} is not in a DVC repository"
    elif git_tag == "auto" and find_root(root, ".git") is None:
        git_tag, skipped = False, f"{root} is not in a git repository"
    return (
        dvc is not False and root is not None,
        git_tag is not False and root is not None,
        root,
        skipped,
    )


def publish_version(
    cfg: FactoryConfig,
    version: str,
    bucket: str | None = None,
    prefix: str | None = None,
    force: bool = False,
    dvc: Switch | None = None,
    git_tag: Switch | None = None,
    on_uploaded: Callable[[str], None] | None = None,
    workspace: Path | None = None,
) -> Publication:
    """Publish a finished local version of ``workspace`` (default: the working directory).

    The git tag comes last, so a tag always names a version that is on S3 and (with DVC)
    in the DVC remote. ``None`` for ``dvc``/``git_tag`` takes ``publish.dvc``/``git_tag``.
    """
    from anomaly_factory.errors import InputError
    from anomaly_factory.storage import dvc_ops
    from anomaly_factory.storage.s3 import (
        S3Location,
        Uploader,
        check_bucket_name,
        checked_files,
        make_client,
        publish_dir,
    )

    pub = cfg.publish
    bucket = bucket or pub.bucket
    if not bucket:
        raise InputError("no bucket: pass --bucket or set publish.bucket in pipelines.yaml")
    check_bucket_name(bucket)
    prefix = pub.prefix if prefix is None else prefix
    layout = RunLayout(cfg, version, workspace or Path.cwd())
    version_dir = layout.shards / version
    check_publishable(version_dir, layout.reports)
    checked = checked_files(version_dir, pub.multipart_chunksize)  # before DVC sees them
    use_dvc, use_tag, root, skipped = _resolve(
        pub.dvc if dvc is None else dvc,
        pub.git_tag if git_tag is None else git_tag,
        version_dir,
    )
    if skipped:
        log.info("publish %s: DVC push and git tag skipped (%s)", version, skipped)
    tracked: list[Path] = []
    if root is not None and (use_dvc or use_tag):
        tracked = dvc_ops.track(root, [version_dir])
        if use_dvc:
            if pub.dvc_remote is None and dvc_ops.default_remote(root) is None:
                # no remote yet: the version's own bucket, committed with the tag so that
                # `dvc get <repo> ... --rev <version>` finds the data from anywhere
                url = "/".join(p for p in (f"s3://{bucket}", prefix.strip("/"), "dvc") if p)
                dvc_ops.add_s3_remote(root, DVC_REMOTE, url)
                tracked.append(root / ".dvc" / "config")
                log.info("publish %s: DVC remote %r set to %s", version, DVC_REMOTE, url)
            dvc_ops.push(root, [version_dir], remote=pub.dvc_remote)
    uploader = Uploader(
        make_client(pub.max_attempts),
        bucket,
        pub.multipart_threshold,
        pub.multipart_chunksize,
        pub.max_attempts,
        pub.retry_backoff_s,
    )
    uri = publish_dir(
        uploader,
        version_dir,
        S3Location(bucket, prefix, version),
        force,
        on_uploaded,
        checked,
        pub.lease_ttl_s,
    )
    if root is not None and use_tag:
        dvc_ops.tag_version(root, version, tracked, force=force)
    return Publication(uri, use_dvc, version if use_tag else None, skipped or None)
