"""The dataset card of a version: what it was made from, by what code, and whether it passed.

``card.json`` is the machine-readable record and the version's completion marker: it is
written last (locally and on S3), and it lists every other file of the version with its
sha256, so a pinned version can be checked byte for byte. ``card.md`` is the same
content for people. The card holds no timestamps, so the same inputs give the same card,
and no absolute local paths: inputs are named relative to the data root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.io import atomic_write_json, atomic_write_text, portable_path, sha256_file
from anomaly_factory.manifest import read_images
from anomaly_factory.provenance import code_version

CARD_JSON = "card.json"
CARD_MD = "card.md"
METRICS_FILE = "metrics.json"
GATES_FILE = "gates.json"


def dataset_license(name: str) -> str:
    from anomaly_factory.datasets.formats import FORMATS, UNKNOWN_LICENSE

    fmt = FORMATS.get(name)
    return fmt.license if fmt else UNKNOWN_LICENSE


def source_datasets(manifest_paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Per source dataset: its categories, image count, content hash and licence.

    ``content_sha256`` hashes the sorted per-image sha256s, so it names the images
    themselves whatever parquet writer produced the manifest.
    """
    df = pd.concat([read_images(p) for p in manifest_paths], ignore_index=True)
    out = []
    for name, rows in df.groupby("dataset", sort=True):
        digest = hashlib.sha256("\n".join(sorted(rows["sha256"].astype(str))).encode())
        out.append(
            {
                "name": str(name),
                "categories": sorted(rows["category"].astype(str).unique().tolist()),
                "n_images": len(rows),
                "content_sha256": digest.hexdigest(),
                "license": dataset_license(str(name)),
            }
        )
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc


def read_reports(reports_dir: Path | None) -> dict[str, Any]:
    """``metrics`` and ``gates`` of a reports folder.

    A folder with ``gates.json`` at its top is one report. Otherwise every
    ``<sub>/gates.json`` below it is a part (DVC runs gates per category): the
    version passes / is publishable only if every part is.
    """
    empty = {"metrics": None, "gates": None}
    if reports_dir is None or not Path(reports_dir).is_dir():
        return empty
    root = Path(reports_dir)
    if (root / GATES_FILE).is_file() or (root / METRICS_FILE).is_file():
        return {
            "metrics": _read_json(root / METRICS_FILE) if (root / METRICS_FILE).is_file() else None,
            "gates": _read_json(root / GATES_FILE) if (root / GATES_FILE).is_file() else None,
        }
    parts = sorted(root.rglob(GATES_FILE))
    if not parts:
        return empty
    gates = {str(p.parent.relative_to(root)): _read_json(p) for p in parts}
    metrics = {
        str(p.parent.relative_to(root)): _read_json(p) for p in sorted(root.rglob(METRICS_FILE))
    }
    return {
        "metrics": metrics,
        "gates": {
            "passed": all(bool(g.get("passed")) for g in gates.values()),
            "publishable": all(bool(g.get("publishable")) for g in gates.values()),
            "parts": gates,
        },
    }


def is_publishable(card: dict[str, Any]) -> bool:
    gates = card.get("gates")
    return isinstance(gates, dict) and gates.get("publishable") is True


def version_files(version_dir: Path) -> list[dict[str, Any]]:
    """Every file of a version except the card itself, with size and sha256."""
    root = Path(version_dir)
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (
            not p.is_file()
            or rel in (CARD_JSON, CARD_MD)
            or any(part.startswith(".") for part in p.relative_to(root).parts)
        ):
            continue
        files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return files


def build_card(
    version: str,
    version_dir: Path,
    index: dict[str, Any],
    pairs_paths: Sequence[Path],
    manifest_paths: Sequence[Path],
    reports: dict[str, Any],
    config: Any,
) -> dict[str, Any]:
    """The card's content (``config`` is a FactoryConfig)."""
    counts: dict[str, int] = {}
    for entry in index["shardlist"]:
        name = f"{entry['dataset']}/{entry['category']}"
        counts[name] = counts.get(name, 0) + entry["nsamples"]
    sources = source_datasets(manifest_paths)
    return {
        "name": "anomaly-factory synthetic anomaly pairs",
        "version": version,
        "n_samples": index["nsamples"],
        "samples_per_category": counts,
        "sample_fields": ["__key__", "image.png", "mask.png", "normal.png", "json"],
        "source_datasets": sources,
        "license": {
            "source_data": {s["name"]: s["license"] for s in sources},
            "note": "generated pairs derive from the source images; the source licence applies",
        },
        "inputs": {
            "pairs_manifests": {portable_path(p): sha256_file(p) for p in pairs_paths},
            "image_manifests": {portable_path(p): sha256_file(p) for p in manifest_paths},
        },
        "config": {
            "profile": config.profile,
            "hash": config.hash(),
            "generator": config.generator,
            "shards": config.shards.model_dump(mode="json", exclude={"out_dir"}),
        },
        "code": code_version(),
        "metrics": reports.get("metrics"),
        "gates": reports.get("gates"),
        "publishable": is_publishable(reports),
        "index": "index.json",
        "files": version_files(version_dir),
    }


def render_markdown(card: dict[str, Any]) -> str:
    """A human-readable card with the same content."""
    gates = card.get("gates") or {}
    code = card["code"]
    lines = [
        f"# {card['name']}: version `{card['version']}`",
        "",
        f"{card['n_samples']} samples (`{'`, `'.join(card['sample_fields'])}`), "
        f"publishable: **{card['publishable']}** (gates passed: {gates.get('passed')}).",
        "",
        "## Source datasets",
        "",
        "| dataset | categories | images | content sha256 | licence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in card["source_datasets"]:
        lines.append(
            f"| {s['name']} | {', '.join(s['categories'])} | {s['n_images']} | "
            f"`{s['content_sha256'][:16]}…` | {s['license']} |"
        )
    lines += ["", card["license"]["note"] + ".", "", "## Samples per category", ""]
    lines += [f"- {name}: {n}" for name, n in card["samples_per_category"].items()]
    lines += [
        "",
        "## Provenance",
        "",
        f"- config: profile `{card['config']['profile']}`, hash `{card['config']['hash']}`, "
        f"generator `{card['config']['generator']}`",
        f"- code: anomaly-factory {code['package']}, git commit `{code.get('git_commit')}`",
    ]
    for kind, files in card["inputs"].items():
        lines += [f"- {kind}:"] + [f"  - `{p}`: sha256 `{h}`" for p, h in files.items()]
    lines += [
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps(card["metrics"], indent=2, sort_keys=True),
    ]
    lines += ["```", "", "## Gates", "", "```json", json.dumps(gates, indent=2, sort_keys=True)]
    lines += ["```", "", "## Files", "", "| file | bytes | sha256 |", "| --- | --- | --- |"]
    lines += [f"| {f['path']} | {f['size']} | `{f['sha256']}` |" for f in card["files"]]
    return "\n".join(lines) + "\n"


def write_card(version_dir: Path, card: dict[str, Any]) -> Path:
    """Write ``card.md`` then ``card.json`` (the completion marker) atomically."""
    atomic_write_text(Path(version_dir) / CARD_MD, render_markdown(card))
    return atomic_write_json(Path(version_dir) / CARD_JSON, card)


def read_card(version_dir: Path) -> dict[str, Any] | None:
    """The card of a local version, or None while the version is incomplete."""
    path = Path(version_dir) / CARD_JSON
    return _read_json(path) if path.is_file() else None
