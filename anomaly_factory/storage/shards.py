"""webdataset shards of a pairs set, with a ``wids`` shard index beside them.

Layout of one version (``out`` is ``shards.out_dir``)::

    <out>/<version>/<dataset>/<category>/shard-000000.tar   # samples of one category
    <out>/<version>/<dataset>/<category>/index.json         # wids index of those shards
    <out>/<version>/index.json                              # wids index of the whole version
    <out>/<version>/card.md, card.json                      # dataset card; card.json is last

A version is built in a sibling folder ``<out>/.<version>.build-<pid>`` and swapped into
place whole (``io.swap_dir``), so a failed or killed rewrite never touches a complete
version; writers of ``<out>`` (``shards``, ``pull``) take turns on its lock, and the next
one removes what a killed run left.

A sample is ``__key__`` (no dots), ``image.png``, ``mask.png``, ``normal.png`` (the pair's
PNG files, byte for byte) and ``json`` (its metadata). Tar members get a fixed mtime,
owner and mode, so writing the same pairs again gives identical bytes: consumers pin
versions by checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.io import (
    atomic_write_json,
    build_beside,
    folder_lock,
    md5_file,
    remove_stale,
    restore_or_remove,
)
from anomaly_factory.manifest import read_pairs

SHARD_PATTERN = "shard-%06d.tar"
INDEX_FILE = "index.json"
WIDS_KIND = "wids-shard-index-v1"
TAR_MTIME = 0  # fixed member time: re-written shards are byte-identical
TAR_OWNER = "anomaly-factory"
TAR_MODE = 0o444
FILE_FIELDS = {"image_path": "image.png", "mask_path": "mask.png", "normal_path": "normal.png"}
SPLITS = ("train", "val")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ShardError(InputError):
    """Pairs cannot be sharded (missing files, bad version name, ...)."""


def check_version(version: str) -> str:
    """A version is one path segment that is also a valid git tag."""
    if not VERSION_RE.match(version) or ".." in version or version.endswith(".lock"):
        raise ShardError(
            f"version: {version!r} is invalid (letters, digits, '.', '_', '-'; one segment)"
        )
    return version


def sample_split(key: str, val_fraction: float) -> str:
    """'val' for a stable ``val_fraction`` of keys (by their sha256), else 'train'."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def _plain(value: Any) -> Any:
    """JSON-safe scalar: numpy/pandas scalars to Python, NA to None."""
    if value is None or (not isinstance(value, str | bytes) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _resolve(path: str, bases: Sequence[Path]) -> Path:
    """A manifest path: as written (relative to the cwd), else relative to a manifest's folder."""
    p = Path(path)
    if p.is_file():
        return p
    for base in bases:
        if (base / p).is_file():
            return base / p
    raise ShardError(
        f"pair file {path!r} not found (also tried relative to {list(map(str, bases))})"
    )


def pair_sample(row: dict[str, Any], bases: Sequence[Path], val_fraction: float) -> dict[str, Any]:
    """One webdataset sample: the pair's PNG bytes untouched plus its metadata as JSON
    (the generator's ``params`` as an object within it, not as text)."""
    key = str(row["key"])
    sample: dict[str, Any] = {"__key__": key}
    for column, ext in FILE_FIELDS.items():
        sample[ext] = _resolve(str(row[column]), bases).read_bytes()
    meta = {k: _plain(v) for k, v in row.items() if k not in FILE_FIELDS}
    if isinstance(meta.get("params"), str):
        meta["params"] = json.loads(meta["params"])
    meta["split"] = sample_split(key, val_fraction)
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def wids_index(name: str, entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A ``wids`` shard index (urls relative to the index file's folder)."""
    return {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": name,
        "shardlist": entries,
        "nsamples": sum(e["nsamples"] for e in entries),
        **extra,
    }


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished folder into place, so ``dest`` is never half-written."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def write_category_shards(
    rows: pd.DataFrame,
    dest: Path,
    name: str,
    maxcount: int,
    maxsize: int,
    val_fraction: float,
    bases: Sequence[Path] = (),
) -> dict[str, Any]:
    """Write one (dataset, category)'s pairs as shards + ``index.json`` in ``dest``."""
    import webdataset as wds

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    splits = dict.fromkeys(SPLITS, 0)
    per_shard: dict[str, int] = {}  # counted as written: no second pass over the tars
    try:
        with wds.ShardWriter(
            str(tmp / SHARD_PATTERN),
            maxcount=maxcount,
            maxsize=maxsize,
            verbose=0,
            encoder=False,
            mtime=TAR_MTIME,
            user=TAR_OWNER,
            group=TAR_OWNER,
            mode=TAR_MODE,
        ) as writer:
            for row in rows.sort_values("key").to_dict("records"):
                sample = pair_sample(row, bases, val_fraction)
                splits[json.loads(sample["json"])["split"]] += 1
                writer.write(sample)
                shard = Path(writer.fname).name
                per_shard[shard] = per_shard.get(shard, 0) + 1
        entries = [
            {
                "url": p.name,
                "md5sum": md5_file(p),
                "nsamples": per_shard[p.name],
                "filesize": p.stat().st_size,
            }
            for p in sorted(tmp.glob("shard-*.tar"))
        ]
        index = wids_index(name, entries, splits=splits)
        atomic_write_json(tmp / INDEX_FILE, index)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def version_index(version_dir: Path, version: str) -> dict[str, Any]:
    """Index of a whole version from its category indexes (urls relative to the version)."""
    entries = []
    for cat_index in sorted(Path(version_dir).glob(f"*/*/{INDEX_FILE}")):
        dataset, category = cat_index.parent.parent.name, cat_index.parent.name
        for entry in json.loads(cat_index.read_text())["shardlist"]:
            url = f"{dataset}/{category}/{entry['url']}"
            entries.append({**entry, "url": url, "dataset": dataset, "category": category})
    return wids_index(version, entries, version=version)


def _as_list(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]


def find_manifests(paths: Path | str | Iterable[Path | str], name: str) -> list[Path]:
    """Files as given; a folder stands for every ``name`` (a glob) below it.

    A match in a folder above other matches is their merge (a category's pairs.parquet
    over its types' ones), so it stands for them and they are left out.
    """
    found: list[Path] = []
    for p in _as_list(paths):
        if p.is_dir():
            matches = sorted(p.rglob(name))
            if not matches:
                raise ShardError(f"{p}: no {name} below this folder")
            merged = {m.parent for m in matches}
            found.extend(m for m in matches if not any(a in merged for a in m.parent.parents))
        elif p.is_file():
            found.append(p)
        else:
            raise ShardError(f"{p}: manifest not found")
    return found


def read_pair_sets(pairs_paths: list[Path]) -> pd.DataFrame:
    """All pairs of several pairs manifests, with the folder each came from."""
    frames = []
    for path in pairs_paths:
        df = read_pairs(path)
        df["_base"] = str(path.parent)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    dup = df.loc[df["key"].duplicated(), "key"].tolist()
    if dup:
        raise ShardError(f"pairs manifests {list(map(str, pairs_paths))}: duplicate keys {dup[:5]}")
    return df


def write_version_shards(
    pairs: pd.DataFrame,
    version_dir: Path,
    version: str,
    maxcount: int,
    maxsize: int,
    val_fraction: float,
) -> Path:
    """Shards for every (dataset, category) of ``pairs``, then the version index.

    Categories that an earlier write of this version had but ``pairs`` lacks are removed,
    so the folder holds exactly this pairs set. Returns the version index path.
    """
    version_dir = Path(version_dir)
    if pairs.empty:
        raise ShardError(f"version {version}: the pairs manifest holds no pairs")
    groups = pairs.groupby(["dataset", "category"], sort=True)
    for (dataset, category), rows in groups:
        bases = sorted({Path(b) for b in rows["_base"]}) if "_base" in rows else []
        write_category_shards(
            rows.drop(columns=["_base"], errors="ignore"),
            version_dir / str(dataset) / str(category),
            f"{version}/{dataset}/{category}",
            maxcount,
            maxsize,
            val_fraction,
            bases,
        )
    wanted = {f"{d}/{c}" for d, c in groups.groups}
    for cat_index in version_dir.glob(f"*/*/{INDEX_FILE}"):
        if f"{cat_index.parent.parent.name}/{cat_index.parent.name}" not in wanted:
            shutil.rmtree(cat_index.parent)
    return atomic_write_json(version_dir / INDEX_FILE, version_index(version_dir, version))


def verify_version(version_dir: Path) -> dict[str, Any]:
    """Check every shard against the version index (size and md5); return the index."""
    index_path = Path(version_dir) / INDEX_FILE
    if not index_path.is_file():
        raise ShardError(f"{index_path}: version index not found")
    index = json.loads(index_path.read_text())
    for entry in index["shardlist"]:
        path = Path(version_dir) / entry["url"]
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in {index_path} is missing")
        if path.stat().st_size != entry["filesize"] or md5_file(path) != entry["md5sum"]:
            raise ShardError(f"{path}: does not match its md5sum/filesize in {index_path}")
    return index


def published_pairs(cfg: Any, pairs: pd.DataFrame, reports_dir: Path) -> pd.DataFrame:
    """The pairs to shard: all of them, or with ``gates.on_pair_failure: drop`` only those
    the gates chose (``pair_checks.parquet`` in the reports folder)."""
    from anomaly_factory.gates.publication import DROP, PublicationError, published_keys

    if cfg.gates.on_pair_failure != DROP:
        return pairs
    try:
        keep = published_keys(reports_dir)
    except PublicationError as exc:
        raise ShardError(str(exc)) from None
    return pairs[pairs["key"].isin(keep)].reset_index(drop=True)


def write_shards(
    cfg: Any,
    pairs_path: Path | str | Iterable[Path | str],
    manifest_path: Path | str | Iterable[Path | str],
    version: str,
    reports_dir: Path | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Shards + indexes + card of one version under ``out_dir/<version>``; returns the index.

    ``pairs_path`` / ``manifest_path`` are files or folders (a folder means every
    ``pairs.parquet`` / ``*.parquet`` below it); ``reports_dir`` defaults to
    ``gates.out_dir/<version>``. With ``gates.on_pair_failure: drop`` only the pairs the
    gates published go in. The version is built beside ``out_dir/<version>`` and swapped
    in complete (card last), so an existing version stays whole if this run fails.
    """
    check_version(version)
    version_dir = Path(out_dir if out_dir is not None else cfg.shards.out_dir) / version
    pairs_paths = find_manifests(pairs_path, "pairs.parquet")
    manifest_paths = find_manifests(manifest_path, "*.parquet")
    if reports_dir is None:
        reports_dir = Path(cfg.gates.out_dir) / version
    from anomaly_factory.storage.card import read_reports

    reports = read_reports(reports_dir)  # read before writing: a bad report fails early
    pairs = published_pairs(cfg, read_pair_sets(pairs_paths), reports_dir)
    with (
        folder_lock(version_dir.parent, "shards or pull", wait=True),
        build_beside(version_dir, "build") as staging,
    ):
        clean_leftovers(version_dir)
        _build_version(cfg, pairs, staging, version, pairs_paths, manifest_paths, reports)
    return version_dir / INDEX_FILE


def clean_leftovers(version_dir: Path) -> list[Path]:
    """What killed ``shards``/``pull`` runs left: staging folders beside the version and
    per-category temporary folders inside it (call with the out folder's lock held)."""
    inside = sorted(Path(version_dir).glob("*/*/.*.tmp-*")) + sorted(
        Path(version_dir).glob("*/.*.tmp-*")
    )
    return restore_or_remove(version_dir) + remove_stale(inside)


def _build_version(
    cfg: Any,
    pairs: pd.DataFrame,
    folder: Path,
    version: str,
    pairs_paths: list[Path],
    manifest_paths: list[Path],
    reports: dict[str, Any],
) -> None:
    """Shards, indexes and card of one version in the empty folder ``folder``."""
    from anomaly_factory.storage.card import build_card, write_card

    folder.mkdir(parents=True)
    index_path = write_version_shards(
        pairs,
        folder,
        version,
        cfg.shards.maxcount,
        cfg.shards.maxsize,
        cfg.shards.val_fraction,
    )
    index = json.loads(index_path.read_text())
    card = build_card(version, folder, index, pairs_paths, manifest_paths, reports, cfg)
    write_card(folder, card)
