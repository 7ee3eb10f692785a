"""One Prefect task per factory stage, each a call of ``anomaly_factory.stages``.

Every task takes the run's :class:`~anomaly_factory.stages.RunRef` (config, version,
data root, code hash), which Prefect hashes into the cache key: a change of config or
code re-runs a task. Retries and caching come from the config (``tasks.common.configured``).
With a store data root (``s3://…``) a task also pulls what its stage reads and pushes
what it wrote (``anomaly_factory.storage.staging``), so it is done only once the store
holds its outputs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from anomaly_factory import progress, stages
from anomaly_factory.gates.decide import GateSummary
from anomaly_factory.stages import RunRef
from anomaly_factory.storage import staging
from tasks.common import CACHE


@task(name="ingest", cache_policy=CACHE, persist_result=True)
def ingest_dataset(ref: RunRef, dataset_index: int) -> str:
    """Ingest one dataset of ``datasets.items`` into its image manifest."""
    out = stages.ingest(ref, dataset_index)
    staging.push_dataset(ref, out)
    get_run_logger().info("ingested %s", out)
    return str(out)


@task(name="combine-manifests", cache_policy=CACHE, persist_result=True)
def combine_manifests(ref: RunRef, parts: list[str]) -> str:
    out = stages.combine_manifests(ref, [Path(p) for p in parts])
    staging.push(ref, [out])
    return str(out)


@task(name="prepare-category", cache_policy=CACHE, persist_result=True)
def prepare_category(ref: RunRef, category: str) -> None:
    """What the category's types share (MAGIC's tiny base adaptation; cached)."""
    with staging.pulled_and_pushed(ref, stages.shared_dirs(ref, category)):
        stages.prepare_category(ref, category)


@task(name="finetune", cache_policy=CACHE, persist_result=True)
def prepare_type(ref: RunRef, category: str, anomaly_type: str) -> str | None:
    """The generator's per-type training (MAGIC's DreamBooth fine-tune; resumes)."""
    layout = ref.layout
    folders = [layout.checkpoint(category, anomaly_type), layout.pairs_dir(category, anomaly_type)]
    with staging.pulled_and_pushed(ref, folders, periodic=True):
        out = stages.prepare(ref, category, anomaly_type)
    return str(out) if out is not None else None


@task(name="generate", cache_policy=CACHE, persist_result=True)
def generate_type(ref: RunRef, category: str, anomaly_type: str, checkpoint: str | None) -> str:
    """Masks -> CAMA -> generation for one type; resumable, returns pairs.parquet."""
    ckpt = Path(checkpoint) if checkpoint else None
    folder = ref.layout.pairs_dir(category, anomaly_type)
    # the type's progress record goes up with its pairs: the run's display pulls it
    record = progress.record_path(ref.layout.progress, "generate", f"{category}/{anomaly_type}")
    with staging.pulled_and_pushed(ref, [folder, record], periodic=True):
        return str(stages.generate_type(ref, category, anomaly_type, ckpt))


@task(name="merge-pairs", cache_policy=CACHE, persist_result=True)
def merge_pairs(ref: RunRef, parts: list[str]) -> str:
    staging.pull(ref, [Path(p).parent for p in parts])  # what the GPU runs made
    out = stages.merge_pairs(ref, [Path(p) for p in parts])
    staging.push(ref, [out])
    return str(out)


@task(name="gates", cache_policy=CACHE, persist_result=True)
def run_gates(ref: RunRef) -> GateSummary:
    """KID / IC-LPIPS / expectations; returns the gate decision (never raises on a fail)."""
    staging.pull_version(ref)
    summary = stages.gates(ref)
    staging.push(ref, [ref.layout.reports])
    return summary


@task(name="detectors", cache_policy=CACHE, persist_result=True)
def run_detectors(ref: RunRef) -> str:
    staging.pull_version(ref)
    out = stages.detect(ref)
    staging.push(ref, [ref.layout.reports])
    return str(out)


@task(name="render-report", cache_policy=CACHE, persist_result=True)
def render_report(ref: RunRef) -> str:
    """The report, once, with the downstream-detector section."""
    staging.pull(ref, [ref.layout.reports])  # the detectors' results, from their GPU run
    out = stages.report(ref)
    staging.push(ref, [ref.layout.reports])
    return str(out)


@task(name="shards", cache_policy=CACHE, persist_result=True)
def write_shards(ref: RunRef) -> str:
    staging.pull_version(ref)
    out = stages.shards(ref)
    staging.push(ref, [ref.layout.shards / ref.version])
    return str(out)


@task(name="publish")
def publish_version(ref: RunRef) -> str:
    staging.pull(ref, [ref.layout.shards / ref.version])
    return stages.publish(ref)
