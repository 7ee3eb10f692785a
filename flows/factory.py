"""The factory: one dataset version from raw benchmark data to published shards.

ingest -> per (category, type) [finetune -> masks -> CAMA -> generate]
-> gates -> detectors -> shards -> publish / DVC
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

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

    progress = create_progress_artifact(
        0.0, key="factory-progress", description=f"Stages of {version} done (%)"
    )

    def done(percent: float) -> None:
        update_progress_artifact(progress, percent)

    # ingest
    ingest = _with_options(cfg, ingest_dataset)
    parts = [ingest(cfg_json, i, version, root, code) for i in range(len(cfg.datasets.items))]
    manifest = combine_manifests(parts, str(layout.manifest), code)
    images = read_images(manifest)
    done(5)

    # GPU stages: one run per category, fanned out on the work pool
    dispatch = _with_options(cfg, dispatch_gpu_stage)
    categories = sorted(images["category"].unique())
    jobs = {c: anomaly_types(images, c) for c in categories}
    jobs = {c: t for c, t in jobs.items() if t}
    per_category = []
    if cfg.orchestration.dispatch == "work_pool":
        futures = [
            dispatch.submit(cfg_json, "generate", c, t, manifest, version, root, code)
            for c, t in jobs.items()
        ]
        for i, future in enumerate(futures, 1):
            per_category.append(future.result())
            done(5 + 70 * i / len(futures))
    else:
        for i, (c, t) in enumerate(jobs.items(), 1):
            per_category.append(dispatch(cfg_json, "generate", c, t, manifest, version, root, code))
            done(5 + 70 * i / len(jobs))
    pairs = merge_pairs([p for paths in per_category for p in paths], str(layout.pairs), code)

    # quality gates, downstream detectors, report
    gates = run_gates(cfg_json, pairs, manifest, version, root, code)
    done(80)
    if cfg.detector.enabled:
        dispatch(cfg_json, "detect", "all", [], manifest, version, root, code, pairs=pairs)
    done(92)
    report = render_report(cfg_json, pairs, version, root, code)

    # shards, publishing
    index = write_shards(cfg_json, pairs, manifest, version, root, code)
    done(97)
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
    _artifacts(result, Path(gates["reports"]) / "metrics.json")
    done(100)
    return result


def metric_rows(metrics_path: Path) -> list[dict[str, Any]]:
    """One row per anomaly type: KID (x1e3) and IC-LPIPS from the gates' metrics.json."""
    if not metrics_path.exists():
        return []
    metrics = json.loads(metrics_path.read_text())
    kid = metrics.get("kid", {}).get("per_type", {})
    lpips = metrics.get("ic_lpips", {}).get("per_type", {})
    return [
        {
            "type": t,
            "kid_x1e3": kid.get(t, {}).get("kid_x1e3"),
            "ic_lpips": lpips.get(t, {}).get("score"),
            "n_generated": kid.get(t, {}).get("n_generated"),
        }
        for t in metrics.get("types", sorted(kid))
    ]


def _artifacts(result: dict[str, Any], metrics_path: Path) -> None:
    rows = [
        {"type": t, "gate": "pass" if ok else "FAIL"} for t, ok in sorted(result["types"].items())
    ]
    create_table_artifact(rows, key="gates", description=f"Gate outcomes of {result['version']}")
    create_table_artifact(
        metric_rows(metrics_path) or [{"type": "-", "note": f"no {metrics_path}"}],
        key="metrics",
        description=f"KID and IC-LPIPS per type of {result['version']}",
    )
    create_markdown_artifact(
        f"# {result['version']}\n\n"
        f"- gates: **{'passed' if result['passed'] else 'FAILED'}**\n"
        f"- report: `{result['report']}`\n- shards: `{result['shards']}`\n"
        f"- published: `{result['published']}`\n",
        key="factory-run",
        description="Where this version's outputs are",
    )
