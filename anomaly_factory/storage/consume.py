"""Reading a published version: ``load_dataset`` streams its shards from S3 or a folder.

>>> ds = load_dataset("v1", category="carpet_demo", root="data/shards")  # doctest: +SKIP
>>> sample = next(iter(ds))  # doctest: +SKIP

Each sample holds ``__key__``, ``image.png``, ``mask.png``, ``normal.png`` and ``json``.

Samples are raw bytes (byte-exact with the published files); chain ``.decode("pil")``
to get images. ``s3://`` URLs work in any webdataset pipeline after
``register_s3_handler()``; it uses boto3 and so the standard AWS configuration
(``AWS_ENDPOINT_URL`` included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from anomaly_factory.errors import InputError
from anomaly_factory.storage.card import read_card
from anomaly_factory.storage.s3 import (
    S3Location,
    VersionNotFound,
    make_client,
    objects_root,
    read_remote_card,
)
from anomaly_factory.storage.shards import INDEX_FILE, SPLITS, check_version

Split = Literal["train", "val", "all"]
_clients: dict[int, Any] = {}


def _client() -> Any:
    """One boto3 client per process (DataLoader workers fork)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = make_client()
    return _clients[pid]


def s3_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset ``gopen`` handler for ``s3://bucket/key``: a streaming boto3 body."""
    if mode != "rb":
        raise InputError(f"{url}: the s3 handler only reads (mode 'rb'), got {mode!r}")
    parsed = urlparse(url)
    return _client().get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"]


def register_s3_handler() -> None:
    """Let every webdataset pipeline in this process open ``s3://`` URLs through boto3."""
    from webdataset.gopen import gopen_schemes  # the dispatch dict itself, shared

    gopen_schemes["s3"] = s3_gopen


def _select_split(split: str):
    def keep(sample: dict[str, Any]) -> bool:
        return json.loads(sample["json"])["split"] == split

    return keep


def _index(
    version: str, bucket: str | None, prefix: str, root: Path | None
) -> tuple[dict[str, Any], str]:
    """The version index and the base its shard urls are relative to."""
    if bucket is not None:
        loc = S3Location(bucket, prefix, version)
        client = _client()
        root = objects_root(read_remote_card(client, loc))  # only a visible version is read
        body = client.get_object(Bucket=bucket, Key=loc.key(root + INDEX_FILE))["Body"].read()
        return json.loads(body), loc.uri() + root
    version_dir = Path(root) / version
    if read_card(version_dir) is None:
        raise VersionNotFound(f"{version_dir}: no complete version there (no card.json)")
    return json.loads((version_dir / INDEX_FILE).read_text()), str(version_dir) + "/"


def load_dataset(
    version: str,
    category: str | None = None,
    split: Split = "train",
    bucket: str | None = None,
    prefix: str | None = None,
    root: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
) -> Any:
    """A ``webdataset.WebDataset`` over one published version.

    Reads from ``s3://bucket/prefix/<version>/`` when ``bucket`` is given, from
    ``root/<version>/`` when ``root`` is; with neither, ``pipelines.yaml`` decides
    (``publish.bucket`` if set, else ``shards.out_dir``). ``split`` is 'train', 'val'
    (a fixed hash split of the keys, ``shards.val_fraction``) or 'all'.
    """
    import webdataset as wds

    check_version(version)
    if split not in (*SPLITS, "all"):
        raise InputError(f"split: {split!r} is not one of {[*SPLITS, 'all']}")
    if (bucket is None and root is None) or prefix is None:
        from anomaly_factory.config import load_config

        cfg = load_config()
        if bucket is None and root is None:
            bucket, root = cfg.publish.bucket, cfg.shards.out_dir
        prefix = cfg.publish.prefix if prefix is None else prefix
    if bucket is not None:
        register_s3_handler()
    index, base = _index(version, bucket, prefix, Path(root) if root is not None else None)
    entries = [
        e
        for e in index["shardlist"]
        if (category is None or e["category"] == category)
        and (dataset is None or e["dataset"] == dataset)
    ]
    if not entries:
        have = sorted({f"{e['dataset']}/{e['category']}" for e in index["shardlist"]})
        raise InputError(
            f"version {version}: no shards for dataset={dataset!r} category={category!r}; "
            f"it has {have}"
        )
    urls = [base + e["url"] for e in entries]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return ds if split == "all" else ds.select(_select_split(split))
