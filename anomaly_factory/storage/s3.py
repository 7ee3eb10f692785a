"""Publishing a version to S3 (or any S3-compatible store) so it is complete or invisible.

Layout: ``s3://BUCKET/PREFIX/<version>/<dataset>/<category>/shard-000000.tar`` plus the
indexes and ``card.md`` / ``card.json``. A version is **visible** exactly when its
``card.json`` object exists: it is uploaded last, after every other object has been
uploaded and checked, and readers (``pull``, ``load_dataset``) look for it first. An
interrupted upload therefore leaves an invisible version; publishing again skips the
objects already there intact and finishes it.

**One writer per version.** A publisher first takes the version's lease, the object
``<version>/.publish-lease.json`` written with ``If-None-Match: *``; a second publisher
of different content fails (``LeaseHeld``, exit 3) until the first ends (or its lease
expires after ``publish.lease_ttl_s`` without renewal, when it was killed). A rerun of
the same content takes the lease over, so a killed publish can always be finished. The
card itself is written conditionally too (``If-None-Match: *`` for a new version,
``If-Match: <etag>`` of the card it replaces), so only one publisher's card can win.

**Replacing a version** (``--force``) with different content uploads the new files
under ``<version>/_g/<card sha256[:16]>/`` while the old card stays visible and its
files untouched; the new card, naming that folder in its ``objects`` field, replaces
the old one in one write, and only then are the old files deleted. Readers resolve
paths through :func:`objects_root`; ``pull`` writes the card without ``objects``, so a
pulled version is byte-identical to the published local one.

Credentials, region and endpoint come from the standard AWS configuration (environment,
``AWS_PROFILE``, ``~/.aws``); ``AWS_ENDPOINT_URL`` selects an S3-compatible endpoint
(boto3 reads it natively). Nothing here logs or stores a credential.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly_factory.errors import BAD_INPUT, GatesFailed, InfrastructureError
from anomaly_factory.io import atomic_write_bytes, build_beside, folder_lock, sha256_bytes
from anomaly_factory.storage.card import CARD_JSON, CARD_MD, read_card
from anomaly_factory.storage.shards import INDEX_FILE, check_version, clean_leftovers

log = logging.getLogger(__name__)

SHA256_META = "sha256"  # user metadata key holding the object's hex sha256
MISSING = {"404", "NoSuchKey", "NotFound"}
NO_BUCKET = {"NoSuchBucket"}
DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
LOST_RACE = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
LEASE = ".publish-lease.json"  # the version's lease object, beside its files
OBJECTS = "objects"  # card field: the folder of the files, when not the version's own
GENERATIONS = "_g"  # <version>/_g/<card sha256[:16]>/: files of a replacing publication
# the bucket names botocore accepts (S3 itself wants 3-63 lowercase letters, digits, . -)
BUCKET_RE = re.compile(r"^[a-zA-Z0-9.\-_]{1,255}$")


class PublishError(InfrastructureError):
    """A version could not be published or fetched (exit 3 unless a subclass says)."""


class CredentialsError(PublishError):
    """The store rejected (or could not find) the credentials."""


class BucketNotFound(PublishError):
    exit_code = BAD_INPUT


class InvalidBucketName(PublishError):
    exit_code = BAD_INPUT


class VersionExists(PublishError):
    exit_code = BAD_INPUT


class VersionNotFound(PublishError):
    exit_code = BAD_INPUT


class IncompleteVersion(PublishError):
    """The local version has no card, or its files differ from it (exit 2)."""

    exit_code = BAD_INPUT


class NotPublishable(PublishError, GatesFailed):
    """The gates say no (exit 1)."""

    exit_code = GatesFailed.exit_code


class ChecksumMismatch(PublishError):
    pass


class LeaseHeld(PublishError):
    """Another publisher holds the version's lease, or wrote its card first (exit 3)."""


def check_bucket_name(bucket: str) -> str:
    if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
        raise InvalidBucketName(
            f"bucket: {bucket!r} is not a valid S3 bucket name (letters, digits, '.', '-', "
            "'_'; S3 itself wants 3-63 lowercase letters, digits, '.' and '-')"
        )
    return bucket


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    version: str

    def __post_init__(self) -> None:
        check_bucket_name(self.bucket)

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
        raise IncompleteVersion(
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
        raise IncompleteVersion(f"{version_dir}: no {CARD_JSON}: the version is incomplete")
    out = {}
    for f in card["files"]:
        path = Path(version_dir) / f["path"]
        sums = file_checksums(path, chunksize) if path.is_file() else None
        if sums is None or path.stat().st_size != f["size"] or sums[0] != f["sha256"]:
            raise IncompleteVersion(
                f"{path}: missing or differs from {CARD_JSON} (sha256 {f['sha256']})"
            )
        out[f["path"]] = sums
    return out


# --------------------------------------------------------------------------- the lease
def _put(client: Any, bucket: str, key: str, body: bytes, **condition: str) -> str:
    """A small object written with its sha256 (and a condition); returns its ETag."""
    out = client.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ChecksumAlgorithm="SHA256",
        Metadata={SHA256_META: sha256_bytes(body)},
        **condition,
    )
    return out["ETag"]


def _get(client: Any, bucket: str, key: str) -> tuple[bytes, str] | None:
    """An object's bytes and ETag, or None if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in MISSING:
            return None
        raise
    return obj["Body"].read(), obj["ETag"]


@dataclass
class Lease:
    """The right to write one version, held by one publisher at a time (see the module
    docstring). ``content`` is the sha256 of the card being published: a publisher of
    the same content may take the lease over (a rerun after a kill)."""

    client: Any
    loc: S3Location
    content: str
    ttl_s: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str = ""
    renewed: float = 0.0

    def _body(self) -> bytes:
        self.renewed = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "content": self.content,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "renewed_at": self.renewed,
                "ttl_s": self.ttl_s,
            },
            sort_keys=True,
        ).encode()

    def acquire(self) -> Lease:
        from botocore.exceptions import ClientError

        key = self.loc.key(LEASE)
        for _ in range(3):  # the holder may release between our write and our read
            try:
                self.etag = _put(self.client, self.loc.bucket, key, self._body(), IfNoneMatch="*")
                return self
            except ClientError as exc:
                if _code(exc) not in LOST_RACE:
                    raise
            held = _get(self.client, self.loc.bucket, key)
            if held is None:
                continue
            other, etag = json.loads(held[0]), held[1]
            age = time.time() - float(other.get("renewed_at", 0))
            if other.get("content") != self.content and age <= float(other.get("ttl_s", 0)):
                raise LeaseHeld(
                    f"{self.loc.uri()}: another publisher is publishing different content "
                    f"(lease held by {other.get('host')} pid {other.get('pid')}, renewed "
                    f"{age:.0f} s ago); retry when it ends, or after its lease expires "
                    f"({other.get('ttl_s')} s without renewal) if it was killed"
                )
            try:  # same content (a rerun), or a lease its killed holder stopped renewing
                self.etag = _put(self.client, self.loc.bucket, key, self._body(), IfMatch=etag)
                log.info("took over the lease of %s (%s)", self.loc.uri(), other.get("owner"))
                return self
            except ClientError as exc:
                if _code(exc) not in LOST_RACE | MISSING:
                    raise
        raise LeaseHeld(f"{self.loc.uri()}: could not take the publish lease (contended)")

    def renew_if_due(self) -> None:
        """Renew the lease after a quarter of its time, so a live publisher keeps it."""
        if time.time() - self.renewed > self.ttl_s / 4:
            self.check()
            self.etag = _put(
                self.client, self.loc.bucket, self.loc.key(LEASE), self._body(), IfMatch=self.etag
            )

    def check(self) -> None:
        """Still ours? (A publisher whose lease was taken over must not write the card.)"""
        meta = head(self.client, self.loc.bucket, self.loc.key(LEASE))
        if meta is None or meta.get("ETag") != self.etag:
            raise LeaseHeld(
                f"{self.loc.uri()}: this publisher's lease was taken over by another "
                "(its lease expired); nothing was made visible by this run"
            )

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(
                Bucket=self.loc.bucket, Key=self.loc.key(LEASE), IfMatch=self.etag
            )
        except (ClientError, BotoCoreError) as exc:  # taken over, or the store is gone
            log.info("lease of %s not released: %s", self.loc.uri(), exc)


# --------------------------------------------------------------------------- cards
def objects_root(card: dict[str, Any]) -> str:
    """The folder (relative to the version, '' or ending in '/') the card's files are in."""
    root = card.get(OBJECTS) or ""
    return root if not root or root.endswith("/") else root + "/"


def remote_card_bytes(local: bytes, root: str) -> bytes:
    """The card to upload: the local bytes, plus ``objects`` when files are elsewhere."""
    if not root:
        return local
    return (
        json.dumps({**json.loads(local), OBJECTS: root}, indent=2, sort_keys=True) + "\n"
    ).encode()


def local_card_bytes(remote: bytes) -> bytes:
    """The published local card's bytes back from a remote card (``objects`` removed;
    cards are written by ``atomic_write_json``, so re-serialising gives the same bytes)."""
    card = json.loads(remote)
    if OBJECTS not in card:
        return remote
    card.pop(OBJECTS)
    return (json.dumps(card, indent=2, sort_keys=True, default=str) + "\n").encode()


def _visible(client: Any, loc: S3Location) -> tuple[bytes, str] | None:
    """The visible card's bytes and ETag, or None."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return _get(client, loc.bucket, loc.key(CARD_JSON))
    except (ClientError, BotoCoreError) as exc:
        raise explain(exc, client, loc.bucket) from None


def _root_for(visible: tuple[bytes, str] | None, card_bytes: bytes) -> str:
    """Where this publication's files go: the version's own folder for a new version or
    a repair (same content); a fresh ``_g/<sha>/`` folder when replacing other content."""
    if visible is None:
        return ""
    if local_card_bytes(visible[0]) == card_bytes:
        return objects_root(json.loads(visible[0]))
    return f"{GENERATIONS}/{sha256_bytes(card_bytes)[:16]}/"


def _write_card(client: Any, loc: S3Location, body: bytes, replaces: str | None) -> None:
    """Make the version visible: the one conditional write that decides the winner."""
    from botocore.exceptions import ClientError

    condition = {"IfMatch": replaces} if replaces else {"IfNoneMatch": "*"}
    try:
        _put(client, loc.bucket, loc.key(CARD_JSON), body, **condition)
    except ClientError as exc:
        if _code(exc) not in LOST_RACE:
            raise explain(exc, client, loc.bucket) from None
        now = _visible(client, loc)
        if now is not None and now[0] == body:
            return  # another publisher of the very same content got there first
        raise LeaseHeld(
            f"{loc.uri()}: another publisher made its own card visible first; this run's "
            "files were not published"
        ) from None


def publish_dir(
    uploader: Uploader,
    version_dir: Path,
    loc: S3Location,
    force: bool = False,
    on_uploaded: Callable[[str], None] | None = None,
    checked: dict[str, tuple[str, set[str]]] | None = None,
    lease_ttl_s: float = 900.0,
) -> str:
    """Upload a complete local version so that it becomes visible only at the end.

    ``checked`` is ``checked_files(version_dir, ...)`` when the caller has just run it.
    The whole upload happens under the version's lease. With ``force`` an existing
    version stays visible and complete until the new card replaces it; the old version's
    objects that the new one does not use are deleted after that.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket = uploader.client, loc.bucket
    check_version(loc.version)
    if checked is None:
        checked = checked_files(version_dir, uploader.multipart_chunksize)
    check_bucket(client, bucket)
    card_bytes = (Path(version_dir) / CARD_JSON).read_bytes()
    order = upload_order(version_dir)
    try:
        lease = Lease(client, loc, sha256_bytes(card_bytes), lease_ttl_s).acquire()
    except (ClientError, BotoCoreError) as exc:
        raise explain(exc, client, bucket) from None
    try:
        visible = _visible(client, loc)
        if visible is not None and not force:
            raise VersionExists(f"{loc.uri()} is already published (use --force to replace it)")
        root = _root_for(visible, card_bytes)
        present = _listed_keys(client, loc)
        for rel in order[:-1]:  # the card last: its arrival is what publishes the version
            key = loc.key(root + rel)
            uploader.upload(
                Path(version_dir) / rel, key, listed=key in present, checksums=checked.get(rel)
            )
            if on_uploaded is not None:
                on_uploaded(rel)
            lease.renew_if_due()
        lease.check()
        _write_card(
            client, loc, remote_card_bytes(card_bytes, root), visible[1] if visible else None
        )
        if on_uploaded is not None:
            on_uploaded(CARD_JSON)
        _delete_stale(client, loc, {root + rel for rel in order[:-1]} | {CARD_JSON, LEASE})
    except (ClientError, BotoCoreError) as exc:
        raise explain(exc, client, bucket) from None
    finally:
        lease.release()
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
    check_bucket(client, loc.bucket)
    visible = _visible(client, loc)
    if visible is None:
        raise VersionNotFound(
            f"{loc.uri()}: no published version (no {CARD_JSON}; absent or incomplete)"
        )
    return visible[0]


def read_remote_card(client: Any, loc: S3Location) -> dict[str, Any]:
    """The card of a visible version (with ``objects`` when its files are in a
    generation folder); VersionNotFound if it is absent or incomplete."""
    return json.loads(_remote_card_bytes(client, loc))


def _download(client: Any, loc: S3Location, rel: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.get_object(Bucket=loc.bucket, Key=loc.key(rel))["Body"].read()
    except ClientError as exc:
        if _code(exc) in MISSING:
            raise ChecksumMismatch(f"{loc.uri(rel)}: listed in the card but missing") from None
        raise explain(exc, client, loc.bucket) from None
    except BotoCoreError as exc:
        raise explain(exc, client, loc.bucket) from None


def pull_version(client: Any, loc: S3Location, out_dir: Path) -> Path:
    """Download a visible version to ``out_dir/<version>``, checking every sha256.

    The version is downloaded beside ``out_dir/<version>`` (card last) and swapped into
    place complete, so a failed or killed pull never touches a local version there.
    """
    remote = _remote_card_bytes(client, loc)
    card, card_bytes = json.loads(remote), local_card_bytes(remote)
    root = objects_root(card)
    dest = Path(out_dir) / loc.version
    with (
        folder_lock(dest.parent, "shards or pull", wait=True),
        build_beside(dest, "pull") as staging,
    ):
        clean_leftovers(dest)
        for f in card["files"]:
            data = _download(client, loc, root + f["path"])
            if sha256_bytes(data) != f["sha256"]:
                raise ChecksumMismatch(
                    f"{loc.uri(root + f['path'])}: sha256 differs from the card's"
                )
            atomic_write_bytes(staging / f["path"], data)
        atomic_write_bytes(staging / CARD_MD, _download(client, loc, root + CARD_MD))
        atomic_write_bytes(staging / CARD_JSON, card_bytes)
    return dest
