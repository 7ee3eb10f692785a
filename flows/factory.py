"""The factory: one dataset version from raw benchmark data to published shards.

ingest -> per (category, type) [finetune -> masks -> CAMA -> generate]
-> gates -> detectors -> shards -> publish / DVC
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from anomaly_factory.config import FactoryConfig, load_config
from anomaly_factory.layout import RunLayout, default_version
from anomaly_factory.manifest import anomaly_types, read_images
from anomaly_factory.provenance import code_hash
from tasks.dispatch import dispatch_gpu_stage
from tasks.stages import (
    combine_manifests,
    ingest_dataset,
    merge_pairs,
    publish_version,
    render_report,
    run_gates,
    write_shards,
)


def _with_options(cfg: FactoryConfig, fn):
    """Apply the configured retries and caching to a task."""
    orch = cfg.orchestration
    options: dict[str, Any] = {"retries": orch.retries, "retry_delay_seconds": orch.retry_delay_s}
    if not orch.cache:
        options["refresh_cache"] = True
    return fn.with_options(**options)


@flow(name="factory", log_prints=True)
def factory(
    profile: str = "tiny",
    config: str | None = None,
    version: str | None = None,
    root: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Produce one dataset version; returns where its report and shards are."""
    logger = get_run_logger()
    cfg = load_config(config, profile, overrides)
    version = version or default_version(cfg)
    root = str(Path(root or os.getcwd()).resolve())
    layout = RunLayout(cfg, version, Path(root))
    cfg_json = cfg.model_dump(mode="json")
    code = code_hash()
    logger.info(
        "factory %s: profile %s, config %s, code %s", version, cfg.profile, cfg.hash(), code
    )

    # ingest
    ingest = _with_options(cfg, ingest_dataset)
    parts = [ingest(cfg_json, i, version, root, code) for i in range(len(cfg.datasets.items))]
    manifest = combine_manifests(parts, str(layout.manifest), code)
    images = read_images(manifest)

    # GPU stages: one run per category, fanned out on the work pool
    dispatch = _with_options(cfg, dispatch_gpu_stage)
    categories = sorted(images["category"].unique())
    jobs = {c: anomaly_types(images, c) for c in categories}
    jobs = {c: t for c, t in jobs.items() if t}
    if cfg.orchestration.dispatch == "work_pool":
        futures = [
            dispatch.submit(cfg_json, "generate", c, t, manifest, version, root, code)
            for c, t in jobs.items()
        ]
        per_category = [f.result() for f in futures]
    else:
        per_category = [
            dispatch(cfg_json, "generate", c, t, manifest, version, root, code)
            for c, t in jobs.items()
        ]
    pairs = merge_pairs([p for paths in per_category for p in paths], str(layout.pairs), code)

    # quality gates, downstream detectors, report
    gates = run_gates(cfg_json, pairs, manifest, version, root, code)
    if cfg.detector.enabled:
        dispatch(cfg_json, "detect", "all", [], manifest, version, root, code, pairs=pairs)
    report = render_report(cfg_json, pairs, version, root, code)

    # shards, publishing
    index = write_shards(cfg_json, pairs, manifest, version, root, code)
    published = None
    if cfg.publish.enabled and gates["publishable"]:
        published = publish_version(cfg_json, version, root)
    elif cfg.publish.enabled:
        logger.warning("version %s failed its gates: not published", version)

    result = {
        "version": version,
        "passed": gates["passed"],
        "types": gates["types"],
        "report": report,
        "shards": str(layout.shards / version),
        "shard_index": index,
        "pairs": pairs,
        "published": published,
    }
    _artifacts(result)
    return result


def _artifacts(result: dict[str, Any]) -> None:
    rows = [
        {"type": t, "gate": "pass" if ok else "FAIL"} for t, ok in sorted(result["types"].items())
    ]
    create_table_artifact(rows, key="gates", description=f"Gate outcomes of {result['version']}")
    create_markdown_artifact(
        f"# {result['version']}\n\n"
        f"- gates: **{'passed' if result['passed'] else 'FAILED'}**\n"
        f"- report: `{result['report']}`\n- shards: `{result['shards']}`\n"
        f"- published: `{result['published']}`\n",
        key="factory-run",
        description="Where this version's outputs are",
    )
