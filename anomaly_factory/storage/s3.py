"""Publishing a version to S3 (or any S3-compatible store) so it is complete or invisible.

Layout: ``s3://BUCKET/PREFIX/<version>/<dataset>/<category>/shard-000000.tar`` plus the
indexes and ``card.md`` / ``card.json``. A version is **visible** exactly when its
``card.json`` object exists: it is uploaded last, after every other object has been
uploaded and checked, and readers (``pull``, ``load_dataset``) look for it first. An
interrupted upload therefore leaves an invisible version; publishing again skips the
objects already there intact and finishes it.

Credentials, region and endpoint come from the standard AWS configuration (environment,
``AWS_PROFILE``, ``~/.aws``); ``AWS_ENDPOINT_URL`` selects an S3-compatible endpoint
(boto3 reads it natively). Nothing here logs or stores a credential.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomaly_factory.io import atomic_write_bytes, sha256_bytes
from anomaly_factory.storage.card import CARD_JSON, CARD_MD, read_card
from anomaly_factory.storage.shards import INDEX_FILE, check_version

log = logging.getLogger(__name__)

SHA256_META = "sha256"  # user metadata key holding the object's hex sha256
MISSING = {"404", "NoSuchKey", "NotFound"}
NO_BUCKET = {"NoSuchBucket"}
DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}


class PublishError(RuntimeError):
    """A version could not be published or fetched."""


class CredentialsError(PublishError):
    """The store rejected (or could not find) the credentials."""


class BucketNotFound(PublishError):
    pass


class VersionExists(PublishError):
    pass


class VersionNotFound(PublishError):
    pass


class ChecksumMismatch(PublishError):
    pass


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    version: str

    def key(self, rel: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, self.version, rel) if p.strip("/"))

    def uri(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(rel)}" + ("" if rel else "/")


def make_client(max_attempts: int = 5) -> Any:
    """An S3 client from the standard AWS configuration, with botocore's standard retries."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def _endpoint(client: Any) -> str:
    return client.meta.endpoint_url


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def explain(exc: Exception, client: Any, bucket: str) -> PublishError:
    """Turn a boto error into a clear message (never including a credential)."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    where = f"bucket {bucket!r} at {_endpoint(client)}"
    if isinstance(exc, NoCredentialsError):
        return CredentialsError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, EndpointConnectionError):
        return PublishError(f"cannot reach the S3 endpoint {_endpoint(client)} (AWS_ENDPOINT_URL)")
    code = _code(exc)
    if code in NO_BUCKET or (code in MISSING and "Bucket" in str(exc)):
        return BucketNotFound(f"{where}: the bucket does not exist")
    if code in DENIED:
        return CredentialsError(
            f"{where}: access denied ({code}); the credentials were rejected or lack permission "
            "(check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
        )
    return PublishError(f"{where}: {type(exc).__name__}: {exc}")


def check_bucket(client: Any, bucket: str) -> None:
    """Fail early, and clearly, on a missing bucket or rejected credentials."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _code(exc) in MISSING | NO_BUCKET:
            raise BucketNotFound(
                f"bucket {bucket!r} at {_endpoint(client)}: does not exist"
            ) from None
        raise explain(exc, client, bucket) from None
    except BotoCoreError as exc:
        raise explain(exc, client, bucket) from None


def head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's metadata, or None if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if _code(exc) in MISSING:
            return None
        raise


def is_visible(client: Any, loc: S3Location) -> bool:
    """A version is visible once its card object exists."""
    return head(client, loc.bucket, loc.key(CARD_JSON)) is not None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def file_checksums(path: Path, chunksize: int) -> tuple[str, set[str]]:
    """The file's hex sha256 and S3's ChecksumSHA256 values for it, in one read.

    The set holds the whole-object checksum and the multipart one: a multipart object's
    checksum is the sha256 of its parts' sha256 digests (AWS adds ``-<parts>``; moto
    does not), so both forms are accepted.
    """
    from s3transfer.utils import ChunksizeAdjuster

    size = path.stat().st_size
    part = ChunksizeAdjuster().adjust_chunksize(chunksize, size)
    whole, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        while chunk := f.read(part):
            whole.update(chunk)
            if len(chunk) < size:  # a one-part file's part digest is its whole digest
                parts.append(hashlib.sha256(chunk).digest())
    parts = parts or [whole.digest()]
    composite = _b64(hashlib.sha256(b"".join(parts)).digest())
    return whole.hexdigest(), {_b64(whole.digest()), composite, f"{composite}-{len(parts)}"}


def _intact(meta: dict[str, Any] | None, path: Path, sha_hex: str, checksums: set[str]) -> bool:
    if meta is None or meta.get("ContentLength") != path.stat().st_size:
        return False
    if meta.get("Metadata", {}).get(SHA256_META) != sha_hex:
        return False
    checksum = meta.get("ChecksumSHA256")
    return checksum is None or checksum in checksums


@dataclass(frozen=True)
class Uploader:
    """Uploads one file per call: multipart, retried with backoff, checked afterwards."""

    client: Any
    bucket: str
    multipart_threshold: int = 8 << 20
    multipart_chunksize: int = 8 << 20
    attempts: int = 5
    backoff_s: float = 1.0

    def upload(
        self,
        path: Path,
        key: str,
        skip_intact: bool = True,
        listed: bool | None = None,
        checksums: tuple[str, set[str]] | None = None,
    ) -> bool:
        """Upload ``path`` to ``key`` unless an intact copy is there; True if uploaded.

        ``listed=False`` says a listing just taken lacks ``key``, so the first attempt
        skips the HEAD that looks for an intact copy (one request per object saved).
        ``checksums`` is ``file_checksums(path, multipart_chunksize)`` when the caller
        has just computed it (saves reading the file once more).
        """
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import S3UploadFailedError

        sha_hex, checksums_ok = checksums or file_checksums(path, self.multipart_chunksize)
        transfer = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
        )
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {SHA256_META: sha_hex}}
        for attempt in range(1, self.attempts + 1):
            try:
                maybe_there = listed is not False or attempt > 1
                if (
                    skip_intact
                    and maybe_there
                    and _intact(head(self.client, self.bucket, key), path, sha_hex, checksums_ok)
                ):
                    log.info("intact, skipped: s3://%s/%s", self.bucket, key)
                    return False
                self.client.upload_file(
                    str(path), self.bucket, key, ExtraArgs=extra, Config=transfer
                )
                if not _intact(head(self.client, self.bucket, key), path, sha_hex, checksums_ok):
                    raise ChecksumMismatch(
                        f"s3://{self.bucket}/{key}: checksum differs from {path}"
                    )
                log.info("uploaded s3://%s/%s", self.bucket, key)
                return True
            except (BotoCoreError, ClientError, S3UploadFailedError, ChecksumMismatch) as exc:
                if isinstance(exc, ClientError) and _code(exc) in DENIED | NO_BUCKET:
                    raise explain(exc, self.client, self.bucket) from None
                if attempt == self.attempts:
                    raise PublishError(
                        f"s3://{self.bucket}/{key}: upload failed after {attempt} attempts: "
                        f"{type(exc).__name__}: {exc}"
                    ) from None
                wait = self.backoff_s * 2 ** (attempt - 1)
                log.warning("upload of %s failed (%s); retry in %.1fs", key, exc, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


def upload_order(version_dir: Path) -> list[str]:
    """Shards first, then category indexes, the version index, card.md and card.json last."""
    card = read_card(version_dir)
    if card is None:
        raise PublishError(
            f"{version_dir}: no {CARD_JSON}: the version is incomplete "
            "(run `anomaly-factory shards` to finish it)"
        )
    files = [f["path"] for f in card["files"]]

    def rank(rel: str) -> tuple[int, str]:
        if rel == INDEX_FILE:
            return (2, rel)
        return (1 if rel.endswith("/" + INDEX_FILE) else 0, rel)

    return [*sorted(files, key=rank), CARD_MD, CARD_JSON]


def checked_files(version_dir: Path, chunksize: int) -> dict[str, tuple[str, set[str]]]:
    """Check every file the card lists (size, sha256), keeping its ``file_checksums``.

    Publishing read every file three times (check, sha256, S3 checksums); bench/publish.py
    measured those reads at ~15% of publish time, so it now reads each file once.
    """
    card = read_card(version_dir)
    if card is None:
        raise PublishError(f"{version_dir}: no {CARD_JSON}: the version is incomplete")
    out = {}
    for f in card["files"]:
        path = Path(version_dir) / f["path"]
        sums = file_checksums(path, chunksize) if path.is_file() else None
        if sums is None or path.stat().st_size != f["size"] or sums[0] != f["sha256"]:
            raise PublishError(
                f"{path}: missing or differs from {CARD_JSON} (sha256 {f['sha256']})"
            )
        out[f["path"]] = sums
    return out


def publish_dir(
    uploader: Uploader,
    version_dir: Path,
    loc: S3Location,
    force: bool = False,
    on_uploaded: Callable[[str], None] | None = None,
    checked: dict[str, tuple[str, set[str]]] | None = None,
) -> str:
    """Upload a complete local version so that it becomes visible only at the end.

    ``checked`` is ``checked_files(version_dir, ...)`` when the caller has just run it.

    With ``force`` an existing version is first made invisible (its card deleted), then
    rewritten; objects of the old version that the new one lacks are deleted.
    """
    client, bucket = uploader.client, loc.bucket
    check_version(loc.version)
    if checked is None:
        checked = checked_files(version_dir, uploader.multipart_chunksize)
    check_bucket(client, bucket)
    if is_visible(client, loc):
        if not force:
            raise VersionExists(f"{loc.uri()} is already published (use --force to replace it)")
        client.delete_object(Bucket=bucket, Key=loc.key(CARD_JSON))
    order = upload_order(version_dir)
    present = _listed_keys(client, loc)
    for rel in order:
        # the card is always re-uploaded: its arrival is what publishes the version
        uploader.upload(
            Path(version_dir) / rel,
            loc.key(rel),
            skip_intact=rel != CARD_JSON,
            listed=loc.key(rel) in present,
            checksums=checked.get(rel),
        )
        if on_uploaded is not None:
            on_uploaded(rel)
        if rel == CARD_MD:
            _delete_stale(client, loc, set(order))
    return loc.uri()


def _listed_keys(client: Any, loc: S3Location) -> set[str]:
    """Keys under the version now: one listing instead of a HEAD per object to upload."""
    root = loc.key("") + "/"
    paginator = client.get_paginator("list_objects_v2")
    return {
        obj["Key"]
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=root)
        for obj in page.get("Contents", [])
    }


def _delete_stale(client: Any, loc: S3Location, keep: set[str]) -> None:
    """Remove objects under the version that it does not list (left by a replaced version)."""
    root = loc.key("") + "/"
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=root):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(root) :]
            if rel not in keep:
                client.delete_object(Bucket=loc.bucket, Key=obj["Key"])
                log.info("deleted stale s3://%s/%s", loc.bucket, obj["Key"])


def _remote_card_bytes(client: Any, loc: S3Location) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    check_bucket(client, loc.bucket)
    try:
        return client.get_object(Bucket=loc.bucket, Key=loc.key(CARD_JSON))["Body"].read()
    except ClientError as exc:
        if _code(exc) in MISSING:
            raise VersionNotFound(
                f"{loc.uri()}: no published version (no {CARD_JSON}; absent or incomplete)"
            ) from None
        raise explain(exc, client, loc.bucket) from None
    except BotoCoreError as exc:
        raise explain(exc, client, loc.bucket) from None


def read_remote_card(client: Any, loc: S3Location) -> dict[str, Any]:
    """The card of a visible version; VersionNotFound if it is absent or incomplete."""
    return json.loads(_remote_card_bytes(client, loc))


def pull_version(client: Any, loc: S3Location, out_dir: Path) -> Path:
    """Download a visible version to ``out_dir/<version>``, checking every sha256.

    Files are checked against the card, and the card is written last, so the local copy
    is complete exactly when its card exists.
    """
    card_bytes = _remote_card_bytes(client, loc)
    card = json.loads(card_bytes)
    dest = Path(out_dir) / loc.version
    (dest / CARD_JSON).unlink(missing_ok=True)
    for f in card["files"]:
        data = client.get_object(Bucket=loc.bucket, Key=loc.key(f["path"]))["Body"].read()
        if sha256_bytes(data) != f["sha256"]:
            raise ChecksumMismatch(f"{loc.uri(f['path'])}: sha256 differs from the card's")
        atomic_write_bytes(dest / f["path"], data)
    md = client.get_object(Bucket=loc.bucket, Key=loc.key(CARD_MD))["Body"].read()
    atomic_write_bytes(dest / CARD_MD, md)
    atomic_write_bytes(dest / CARD_JSON, card_bytes)
    return dest
