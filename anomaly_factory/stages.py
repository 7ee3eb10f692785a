"""The factory's stages, one function each: the core every route runs.

The Prefect tasks (``tasks/stages.py``), the ``anomaly-factory stage`` command and the
DVC stages it backs (``dvc.yaml``, written by ``anomaly-factory dvc-yaml``) all call
these, so a version's files are the same whichever way it was made. Each takes a
:class:`RunRef` and reads and writes only :class:`~anomaly_factory.layout.RunLayout`
paths; relative paths in manifests are relative to ``ref.root``, so run them there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from anomaly_factory.config import FactoryConfig
from anomaly_factory.gates.decide import GateSummary
from anomaly_factory.generators.base import GenerationRequest
from anomaly_factory.layout import RunLayout, default_version

if TYPE_CHECKING:
    from anomaly_factory.storage.store import Store

# The stages in order, as `anomaly-factory stage` and dvc.yaml name them.
STAGES = ("ingest", "generate", "merge", "gates", "detect", "report", "shards", "publish")


class RunRef(BaseModel):
    """Which run a stage belongs to: its config, version name, data root and code version.

    One typed value that every task and GPU flow takes (Prefect hashes it into their
    cache keys and sends it to workers as JSON). ``code`` (``provenance.code_hash()``) is
    not read by the stages: it is in the cache key, so that changed code re-runs them.
    ``root`` is a local folder, or a store URL (``s3://bucket/prefix``): then every
    machine works in its own cache of it (:attr:`workspace`) and the flows pull and push.
    """

    model_config = ConfigDict(frozen=True)

    cfg: FactoryConfig
    version: str
    root: str
    code: str = ""

    @classmethod
    def make(
        cls, cfg: FactoryConfig, version: str | None, root: Path | str, code: str = ""
    ) -> RunRef:
        """``version`` None is the config's default name (``<profile>-<hash>``)."""
        from anomaly_factory.storage.store import is_url

        root = str(root).rstrip("/") if is_url(root) else str(Path(root).resolve())
        return cls(cfg=cfg, version=version or default_version(cfg), root=root, code=code)

    @property
    def store(self) -> Store | None:
        """The store of a URL data root (this machine's cache of it), else None."""
        from anomaly_factory.storage.store import Store, is_url

        return Store.at(self.root) if is_url(self.root) else None

    @property
    def workspace(self) -> Path:
        """The local folder the stages read and write: the data root, or its cache."""
        store = self.store
        return store.workspace if store is not None else Path(self.root)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.cfg, self.version, self.workspace)


def ingest(ref: RunRef, dataset_index: int) -> Path:
    """One dataset of ``datasets.items`` into its image manifest."""
    from anomaly_factory.datasets.ingest import ingest as ingest_dataset

    cfg = ref.cfg
    spec = cfg.datasets.items[dataset_index]
    out = ref.layout.dataset_manifest(spec.name)
    ingest_dataset(
        spec.name,
        spec.source,
        out,
        ref.layout.raw_root,
        spec.sha256,
        spec.categories,
        cfg.datasets.on_bad_input,
        cfg.split.fewshot_fraction,
        cfg.demo,
        show_progress=False,
        alpha=cfg.datasets.alpha,
    )
    return out


def combine_manifests(ref: RunRef, parts: list[Path] | None = None) -> Path:
    """The version's manifest: every dataset's (default: each of ``datasets.items``)."""
    import pandas as pd

    from anomaly_factory.manifest import read_images, write_images

    if parts is None:
        parts = [ref.layout.dataset_manifest(d.name) for d in ref.cfg.datasets.items]
    out = ref.layout.manifest
    write_images(pd.concat([read_images(p) for p in parts], ignore_index=True), out)
    return out


def category_types(ref: RunRef) -> dict[str, list[str]]:
    """Each category of the version's manifest with its few-shot anomaly types."""
    from anomaly_factory.manifest import anomaly_types, read_images

    images = read_images(ref.layout.manifest)
    jobs = {c: anomaly_types(images, c) for c in sorted(images["category"].unique())}
    return {c: t for c, t in jobs.items() if t}


def generation_request(ref: RunRef, category: str, anomaly_type: str) -> GenerationRequest:
    """What the run asks its generator for one type: the layout's paths, and as many
    pairs as the gates may need (``n_pairs`` plus extras when they drop failing pairs)."""
    from anomaly_factory.gates.publication import candidates_per_type

    layout = ref.layout
    return GenerationRequest(
        cfg=ref.cfg,
        manifest=layout.manifest,
        category=category,
        anomaly_type=anomaly_type,
        n_pairs=candidates_per_type(ref.cfg),
        out_dir=layout.pairs_dir(category, anomaly_type),
        train_dir=layout.checkpoint(category, anomaly_type),
    )


def prepare_category(ref: RunRef, category: str) -> None:
    """Train what the category's types share (MAGIC's tiny base adaptation, AnomalyControl's
    adapter), once; cached, so running it again costs a folder check."""
    from anomaly_factory.generators.registry import prepare_category as prepare_shared
    from anomaly_factory.threads import generation_threads, torch_threads

    with torch_threads(generation_threads(ref.cfg)):
        prepare_shared(ref.cfg.generator, ref.cfg, ref.layout.manifest, category)


def shared_dirs(ref: RunRef, category: str) -> list[Path]:
    """The folders ``prepare_category`` writes (the workspace's, absolute)."""
    from anomaly_factory.generators.registry import shared_dirs as generator_dirs

    layout = ref.layout
    dirs = generator_dirs(ref.cfg.generator, ref.cfg, layout.manifest, category)
    return [d if d.is_absolute() else ref.workspace / d for d in dirs]


def prepare(ref: RunRef, category: str, anomaly_type: str) -> Path | None:
    """Train what the generator needs for one type (MAGIC: its fine-tune and mask
    generator; resumes, and returns a finished one as is); None for generators that
    train nothing."""
    from anomaly_factory.generators.registry import prepare_generator
    from anomaly_factory.threads import generation_threads, torch_threads

    with torch_threads(generation_threads(ref.cfg)):
        return prepare_generator(ref.cfg.generator, generation_request(ref, category, anomaly_type))


def generate_type(ref: RunRef, category: str, anomaly_type: str, checkpoint: Path | None) -> Path:
    """Masks -> CAMA -> generation for one type; resumable. Returns its pairs.parquet."""
    from anomaly_factory import progress
    from anomaly_factory.generators.registry import run_generator
    from anomaly_factory.threads import generation_threads, torch_threads

    request = generation_request(ref, category, anomaly_type).with_checkpoint(checkpoint)
    unit, n = f"{category}/{anomaly_type}", request.n_pairs
    folder = ref.layout.progress

    def on_pair(done: int, total: int) -> None:  # what the run's live display shows
        progress.report(folder, "generate", unit, done, total)

    on_pair(0, n)
    with torch_threads(generation_threads(ref.cfg)):
        pairs = run_generator(ref.cfg.generator, request, on_pair)
    on_pair(n, n)
    return Path(pairs)


def generate_category(ref: RunRef, category: str, anomaly_types: list[str]) -> list[Path]:
    """``prepare_category``, then ``prepare`` and ``generate_type`` for each type in order."""
    prepare_category(ref, category)
    return [generate_type(ref, category, t, prepare(ref, category, t)) for t in anomaly_types]


def merge_pairs(ref: RunRef, parts: list[Path] | None = None) -> Path:
    """The version's pairs manifest (default: every type's of the manifest)."""
    from anomaly_factory.generators.output import PAIRS_FILE
    from anomaly_factory.generators.output import merge_pairs as merge

    if parts is None:
        parts = [
            ref.layout.pairs_dir(c, t) / PAIRS_FILE
            for c, types in category_types(ref).items()
            for t in types
        ]
    return merge(parts, ref.layout.pairs)


def gates(ref: RunRef) -> GateSummary:
    """KID / IC-LPIPS / pair checks / expectations into the reports folder; returns the
    decision (never raises on a failed gate)."""
    from anomaly_factory.gates import run_gates

    layout = ref.layout
    result = run_gates(
        ref.cfg,
        layout.pairs,
        layout.manifest,
        layout.reports,
        ref.cfg.generate.n_pairs,
        report=False,  # the report stage renders it, once, after the detectors
    )
    return GateSummary.of(result, layout.reports)


def gate_verdict(ref: RunRef) -> GateSummary:
    """The decision ``gates`` wrote (gates.json), for the stages after it."""
    return GateSummary.read(ref.layout.reports)


def detect(ref: RunRef) -> Path:
    """Downstream detectors on the real test split: ``detector_metrics.json``."""
    from anomaly_factory.detectors import run_detectors

    layout = ref.layout
    return Path(run_detectors(ref.cfg, layout.pairs, layout.manifest, layout.reports))


def report(ref: RunRef) -> Path:
    """The HTML report, with the detectors' section when they ran."""
    from anomaly_factory.gates.run import rerender_report

    return Path(rerender_report(ref.cfg, ref.layout.pairs, ref.layout.reports))


def shards(ref: RunRef) -> Path:
    """Webdataset shards, wids index and card of the version (swapped in complete)."""
    from anomaly_factory.storage.shards import write_shards

    layout = ref.layout
    return Path(
        write_shards(
            ref.cfg, layout.pairs, layout.manifest, ref.version, layout.reports, layout.shards
        )
    )


def publish(ref: RunRef) -> str:
    """Upload the version to S3 (+ dvc push, git tag); returns its URI."""
    from anomaly_factory.storage.publish import publish_version

    return publish_version(ref.cfg, ref.version, workspace=ref.workspace).uri
