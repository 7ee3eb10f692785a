"""One Prefect task per factory stage, each a call of ``anomaly_factory.stages``.

Their arguments are plain JSON (the resolved config, version, data root, code hash):
Prefect hashes them into the cache key, so a change of config or code re-runs a task.
Retries and caching come from the config, through ``tasks.common.configured``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from anomaly_factory import stages
from tasks.common import CACHE, config_from


def _ref(cfg_json: dict[str, Any], version: str, root: str, code: str = "") -> stages.RunRef:
    return stages.RunRef(config_from(cfg_json), version, Path(root), code)


@task(name="ingest", cache_policy=CACHE, persist_result=True)
def ingest_dataset(
    cfg_json: dict[str, Any], dataset_index: int, version: str, root: str, code: str
) -> str:
    """Ingest one dataset of ``datasets.items`` into its image manifest."""
    out = stages.ingest(_ref(cfg_json, version, root, code), dataset_index)
    get_run_logger().info("ingested %s", out)
    return str(out)


@task(name="combine-manifests", cache_policy=CACHE, persist_result=True)
def combine_manifests(
    cfg_json: dict[str, Any], parts: list[str], version: str, root: str, code: str
) -> str:
    ref = _ref(cfg_json, version, root, code)
    return str(stages.combine_manifests(ref, [Path(p) for p in parts]))


@task(name="finetune", cache_policy=CACHE, persist_result=True)
def prepare_type(
    cfg_json: dict[str, Any],
    category: str,
    anomaly_type: str,
    version: str,
    root: str,
    code: str,
) -> str | None:
    """The generator's per-type training (MAGIC's DreamBooth fine-tune; resumes)."""
    out = stages.prepare(_ref(cfg_json, version, root, code), category, anomaly_type)
    return str(out) if out is not None else None


@task(name="generate", cache_policy=CACHE, persist_result=True)
def generate_type(
    cfg_json: dict[str, Any],
    category: str,
    anomaly_type: str,
    checkpoint: str | None,
    version: str,
    root: str,
    code: str,
) -> str:
    """Masks -> CAMA -> generation for one type; resumable, returns pairs.parquet."""
    ref = _ref(cfg_json, version, root, code)
    ckpt = Path(checkpoint) if checkpoint else None
    return str(stages.generate_type(ref, category, anomaly_type, ckpt))


@task(name="merge-pairs", cache_policy=CACHE, persist_result=True)
def merge_pairs(
    cfg_json: dict[str, Any], parts: list[str], version: str, root: str, code: str
) -> str:
    ref = _ref(cfg_json, version, root, code)
    return str(stages.merge_pairs(ref, [Path(p) for p in parts]))


@task(name="gates", cache_policy=CACHE, persist_result=True)
def run_gates(cfg_json: dict[str, Any], version: str, root: str, code: str) -> dict[str, Any]:
    """KID / IC-LPIPS / expectations; returns the gate decision (never raises on a fail)."""
    return stages.gates(_ref(cfg_json, version, root, code))


@task(name="detectors", cache_policy=CACHE, persist_result=True)
def run_detectors(cfg_json: dict[str, Any], version: str, root: str, code: str) -> str:
    return str(stages.detect(_ref(cfg_json, version, root, code)))


@task(name="render-report", cache_policy=CACHE, persist_result=True)
def render_report(cfg_json: dict[str, Any], version: str, root: str, code: str) -> str:
    """Re-render the report so it includes the downstream-detector section."""
    return str(stages.report(_ref(cfg_json, version, root, code)))


@task(name="shards", cache_policy=CACHE, persist_result=True)
def write_shards(cfg_json: dict[str, Any], version: str, root: str, code: str) -> str:
    return str(stages.shards(_ref(cfg_json, version, root, code)))


@task(name="publish")
def publish_version(cfg_json: dict[str, Any], version: str, root: str) -> str:
    return stages.publish(_ref(cfg_json, version, root))
