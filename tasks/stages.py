"""One task per factory stage, each wrapping one package function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task

from anomaly_factory.layout import RunLayout
from tasks.common import CACHE, config_from, retry_transient


def _layout(cfg_json: dict[str, Any], version: str, root: str) -> RunLayout:
    return RunLayout(config_from(cfg_json), version, Path(root))


@task(
    name="ingest",
    cache_policy=CACHE,
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def ingest_dataset(
    cfg_json: dict[str, Any], dataset_index: int, version: str, root: str, code: str
) -> str:
    """Ingest one dataset of ``datasets.items`` into its image manifest."""
    from anomaly_factory.datasets.ingest import ingest

    layout = _layout(cfg_json, version, root)
    cfg = layout.cfg
    spec = cfg.datasets.items[dataset_index]
    out = layout.dataset_manifest(spec.name)
    result = ingest(
        spec.name,
        spec.source,
        out,
        layout.raw_root,
        spec.sha256,
        spec.categories,
        cfg.datasets.on_bad_input,
        cfg.split.fewshot_fraction,
        cfg.demo,
        show_progress=False,
        alpha=cfg.datasets.alpha,
    )
    get_run_logger().info("ingested %s: %d images -> %s", spec.name, len(result.manifest), out)
    return str(out)


@task(name="combine-manifests", cache_policy=CACHE, persist_result=True)
def combine_manifests(parts: list[str], out: str, code: str) -> str:
    from anomaly_factory.manifest import read_images, write_images

    write_images(pd.concat([read_images(p) for p in parts], ignore_index=True), out)
    return out


@task(
    name="finetune",
    cache_policy=CACHE,
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def finetune_type(
    cfg_json: dict[str, Any],
    manifest: str,
    category: str,
    anomaly_type: str,
    version: str,
    root: str,
    code: str,
) -> str:
    """MAGIC per-type DreamBooth fine-tuning (resumes from its last checkpoint)."""
    from anomaly_factory.generators.magic.finetune import finetune

    layout = _layout(cfg_json, version, root)
    out = finetune(
        layout.cfg,
        Path(manifest),
        category,
        anomaly_type,
        layout.checkpoint(category, anomaly_type),
    )
    return str(out)


@task(
    name="generate",
    cache_policy=CACHE,
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def generate_type(
    cfg_json: dict[str, Any],
    manifest: str,
    category: str,
    anomaly_type: str,
    checkpoint: str | None,
    version: str,
    root: str,
    code: str,
) -> str:
    """Masks -> CAMA -> generation for one type; resumable, returns pairs.parquet."""
    from anomaly_factory import progress
    from anomaly_factory.gates.publication import candidates_per_type
    from anomaly_factory.generators.registry import run_generator

    layout = _layout(cfg_json, version, root)
    cfg = layout.cfg
    unit = f"{category}/{anomaly_type}"
    n = candidates_per_type(cfg)  # n_pairs, plus extras when the gates drop failing pairs
    progress.report(layout.progress, "generate", unit, 0, n)
    pairs = run_generator(
        cfg.generator,
        cfg,
        Path(manifest),
        category,
        anomaly_type,
        n,
        layout.pairs_dir(category, anomaly_type),
        checkpoint=Path(checkpoint) if checkpoint else None,
    )
    progress.report(layout.progress, "generate", unit, n, n)
    return str(pairs)


@task(name="merge-pairs", cache_policy=CACHE, persist_result=True)
def merge_pairs(parts: list[str], out: str, code: str) -> str:
    from anomaly_factory.generators.output import merge_pairs as merge

    return str(merge([Path(p) for p in parts], Path(out)))


@task(name="gates", cache_policy=CACHE, persist_result=True)
def run_gates(
    cfg_json: dict[str, Any], pairs: str, manifest: str, version: str, root: str, code: str
) -> dict[str, Any]:
    """KID / IC-LPIPS / expectations; returns the gate decision (never raises on a fail)."""
    from anomaly_factory.gates import run_gates as gates

    layout = _layout(cfg_json, version, root)
    result = gates(
        layout.cfg, Path(pairs), Path(manifest), layout.reports, layout.cfg.generate.n_pairs
    )
    return _gate_summary(result, layout.reports)


def _gate_summary(result: Any, reports: Path) -> dict[str, Any]:
    """The decision, the reasons per type and which gates ran or were off (for the run's
    Failed message and the CLI's summary)."""
    return {
        "passed": bool(result.passed),
        "publishable": bool(result.publishable),
        "reports": str(reports),
        "types": {name: bool(t.passed) for name, t in result.types.items()},
        "reasons": {name: list(t.reasons) for name, t in result.types.items()},
        "version_reasons": list(result.version_reasons),
        "gates_on": [g["gate"] for g in result.gates if g["on"]],
        "gates_off": [g["gate"] for g in result.gates if not g["on"]],
    }


@task(
    name="detectors",
    cache_policy=CACHE,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def run_detectors(
    cfg_json: dict[str, Any], pairs: str, manifest: str, version: str, root: str, code: str
) -> str:
    from anomaly_factory.detectors import run_detectors as detect

    layout = _layout(cfg_json, version, root)
    return str(detect(layout.cfg, Path(pairs), Path(manifest), layout.reports))


@task(name="render-report", cache_policy=CACHE, persist_result=True)
def render_report(cfg_json: dict[str, Any], pairs: str, version: str, root: str, code: str) -> str:
    """Re-render the report so it includes the downstream-detector section."""
    from anomaly_factory.gates.run import rerender_report

    layout = _layout(cfg_json, version, root)
    return str(rerender_report(layout.cfg, Path(pairs), layout.reports))


@task(name="shards", cache_policy=CACHE, persist_result=True)
def write_shards(
    cfg_json: dict[str, Any], pairs: str, manifest: str, version: str, root: str, code: str
) -> str:
    from anomaly_factory.storage.shards import write_shards as shards

    layout = _layout(cfg_json, version, root)
    return str(
        shards(layout.cfg, Path(pairs), Path(manifest), version, layout.reports, layout.shards)
    )


@task(name="publish", retries=3, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def publish_version(cfg_json: dict[str, Any], version: str, root: str) -> str:
    from anomaly_factory.storage.publish import publish_version as publish

    return publish(config_from(cfg_json), version, workspace=Path(root)).uri
