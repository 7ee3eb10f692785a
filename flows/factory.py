"""The factory: one dataset version from raw benchmark data to published shards.

ingest -> per (category, type) [finetune -> masks -> CAMA -> generate]
-> gates -> detectors -> shards -> publish / DVC
"""

from __future__ import annotations

import contextlib
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

from anomaly_factory import progress
from anomaly_factory.config import load_config
from anomaly_factory.errors import GatesFailed
from anomaly_factory.provenance import code_hash
from anomaly_factory.stages import RunRef, category_types
from anomaly_factory.storage.store import is_url
from flows.gpu import entered
from tasks.common import configured
from tasks.dispatch import dispatch_gpu, run_stages
from tasks.stages import (
    combine_manifests,
    ingest_dataset,
    merge_pairs,
    publish_version,
    render_report,
    run_gates,
    write_shards,
)


@flow(name="factory", log_prints=True)
def factory(
    profile: str | None = None,
    config: str | None = None,
    version: str | None = None,
    root: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Produce one dataset version; returns where its report and shards are.

    ``profile`` None is the profile ``pipelines.yaml`` names (else ``tiny``); ``root``
    None is the config's ``data_root``, else the working directory (a worker's
    ``ANOMALY_FACTORY_HOME``). A store URL (``s3://bucket/prefix``) works in this
    machine's cache of it and leaves every output in the store. A version whose gates
    fail keeps every output and ends the run Failed (``VersionFailedGates``).
    """
    if root is None or not is_url(root):  # the config is read in the data root, as before
        with contextlib.chdir(Path(root or os.getcwd()).resolve()):
            cfg = load_config(config, profile, overrides)
    else:
        cfg = load_config(config, profile, overrides)
    ref = RunRef.make(cfg, version, root or cfg.data_root or os.getcwd(), code_hash())
    # Manifests, cards and reports name files relative to the workspace (the working
    # directory): in it, every route writes the same portable paths.
    with entered(ref):
        return _produce(ref)


def _produce(ref: RunRef) -> dict[str, Any]:
    logger = get_run_logger()
    cfg, version, layout = ref.cfg, ref.version, ref.layout
    logger.info(
        "factory %s: profile %s, config %s, code %s, data root %s",
        version,
        cfg.profile,
        cfg.hash(),
        ref.code,
        ref.root,
    )

    artifact = create_progress_artifact(
        0.0, key="factory-progress", description=f"Stages of {version} done (%)"
    )

    def done(percent: float) -> None:
        update_progress_artifact(artifact, percent)

    def stage(name: str, finished: int, total: int) -> None:
        """Stage counts for the CLI's live display (``anomaly_factory.progress``)."""
        progress.report(layout.progress, name, progress.STAGE_UNIT, finished, total)

    # ingest
    ingest = configured(ingest_dataset, cfg)
    n_datasets = len(cfg.datasets.items)
    stage("ingest", 0, n_datasets)
    parts = []
    for i in range(n_datasets):
        parts.append(ingest(ref, i))
        stage("ingest", i + 1, n_datasets)
    configured(combine_manifests, cfg)(ref, parts)
    done(5)

    # GPU flows: `category` runs fanned out on the work pool, one per category, or one per
    # (category, type) after one per category for what its types share
    dispatch = configured(dispatch_gpu, cfg)
    jobs = category_types(ref)
    n_types = sum(len(t) for t in jobs.values())
    types_done = 0
    stage("generate", 0, n_types)

    def category_run(category: str, types: list[str]) -> dict[str, Any]:
        params = {"category": category, "anomaly_types": types}
        return dict(ref=ref, flow_name="category", params=params)

    if cfg.orchestration.fan_out == "type":
        shared = {c: category_run(c, []) for c in jobs}
        for _ in run_stages(cfg, dispatch, shared):
            pass
        calls = {f"{c}/{t}": category_run(c, [t]) for c, types in jobs.items() for t in types}
    else:
        calls = {c: category_run(c, t) for c, t in jobs.items()}
    finished: dict[str, list[str]] = {}
    for key, paths in run_stages(cfg, dispatch, calls):
        finished[key] = paths
        types_done += len(paths)
        stage("generate", types_done, n_types)
        done(5 + 70 * len(finished) / len(calls))
        _jobs_artifact(version, calls, finished)
    # in the calls' order, whatever order the jobs finished in: the same merged bytes
    parts = [p for key in calls for p in finished[key]]
    pairs = configured(merge_pairs, cfg)(ref, parts)

    # quality gates, downstream detectors, report
    stage("gates", 0, 1)
    gates = configured(run_gates, cfg)(ref)
    stage("gates", 1, 1)
    done(80)
    if cfg.detector.enabled:
        stage("detect", 0, 1)
        dispatch(ref, "detect", {})
        stage("detect", 1, 1)
    done(92)
    stage("report", 0, 1)
    report = configured(render_report, cfg)(ref)
    stage("report", 1, 1)

    # shards, publishing
    stage("shards", 0, 1)
    index = configured(write_shards, cfg)(ref)
    stage("shards", 1, 1)
    done(97)
    published = None
    if cfg.publish.enabled and gates.publishable:
        stage("publish", 0, 1)
        published = configured(publish_version, cfg)(ref)
        stage("publish", 1, 1)
    elif cfg.publish.enabled:
        logger.warning("version %s failed its gates: not published", version)

    result = {
        "version": version,
        "data_root": ref.root,
        "passed": gates.passed,
        "types": gates.types,
        "report": report,
        "shards": str(layout.shards / version),
        "shard_index": index,
        "pairs": pairs,
        "published": published,
        "gates_on": gates.gates_on,
        "gates_off": gates.gates_off,
    }
    _artifacts(result, gates.reports / "metrics.json")
    done(100)
    if not gates.passed:
        # After every output is written: the run ends Failed, with the gate table as its
        # message, so a scheduled or work-pool run that fails its gates shows as failed.
        raise VersionFailedGates(gates.table(version), result)
    return result


def _jobs_artifact(version: str, calls: dict[str, Any], finished: dict[str, list[str]]) -> None:
    """The ``gpu-jobs`` table: each GPU job (a category, or a category/type with
    ``fan_out: type``) and whether it is done, a new version of it as each job finishes."""
    rows = [
        {"job": key, "state": "done" if key in finished else "running or queued"} for key in calls
    ]
    create_table_artifact(
        rows,
        key="gpu-jobs",
        description=f"GPU jobs of {version}: {len(finished)}/{len(calls)} done",
    )


class VersionFailedGates(GatesFailed):
    """The version's gates failed (exit 1); its outputs are kept and listed in ``result``."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self):  # Prefect pickles a flow's exception with its state
        return (type(self), (str(self), self.result))


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
