"""``dvc.yaml`` written from :class:`~anomaly_factory.layout.RunLayout`, not by hand.

Every DVC stage runs ``anomaly-factory stage <name>`` (``anomaly_factory.stages``, the
functions the Prefect tasks call), and its ``outs`` are the paths ``RunLayout`` gives
for the configured profile and its default version name (``<profile>-<config hash>``),
so ``dvc repro`` and ``anomaly-factory run`` write the same tree. A config change
changes the version name: write the file again (``anomaly-factory dvc-yaml``);
``--check`` (and the tests) fail while the committed file differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.layout import RunLayout, default_version

HEADER = """\
# Written by `anomaly-factory dvc-yaml` from pipelines.yaml and RunLayout: do not edit.
# After changing pipelines.yaml, run `anomaly-factory dvc-yaml` again (the version
# name holds the config's hash). Each stage runs `anomaly-factory stage <name>`, the
# same functions as the Prefect flow (`anomaly-factory run`), on the same paths.
#
#   dvc repro                  # build the version named below
#   anomaly-factory publish --version <version>   # S3 + dvc push + git tag
#
# Pair PNG trees and reports are outputs with `cache: false` (hashed, never cached or
# pushed: DVC handles millions of small files badly); the shards carry them.
# Fine-tuned checkpoints `persist`: DVC keeps them, and a fine-tune resumes or skips.
"""

# The pipelines.yaml sections each stage reads (besides profiles.<profile>).
PARAMS = {
    "ingest": ["datasets", "demo", "split"],
    "generate": [
        "seed",
        "generator",
        "model",
        "finetune",
        "masks",
        "cama",
        "generate",
        "anomalycontrol",
        "baselines",
        "gates.on_pair_failure",
        "gates.extra_candidates",
    ],
    "gates": ["gates", "generate.n_pairs"],
    "detect": ["detector", "baselines", "seed"],
    "report": ["gates"],
    "shards": ["shards", "gates.on_pair_failure"],
}


# The code every stage runs besides its own package: the stage functions, the config,
# the paths, the tables and image IO, the thread rule. A change there re-runs every stage.
CORE_DEPS = (
    "anomaly_factory/stages.py",
    "anomaly_factory/config.py",
    "anomaly_factory/layout.py",
    "anomaly_factory/manifest.py",
    "anomaly_factory/images.py",
    "anomaly_factory/io.py",
    "anomaly_factory/threads.py",
)


def categories(cfg: FactoryConfig) -> list[str]:
    """The version's categories, as the config names them (DVC needs them before ingest)."""
    names: list[str] = []
    for i, item in enumerate(cfg.datasets.items):
        chosen = item.categories
        if chosen is None and item.name == "demo":
            chosen = list(cfg.demo.categories)
        if chosen is None:
            raise InputError(
                f"datasets.items[{i}].categories: null (every category) cannot be expanded "
                f"into DVC stages before ingest; name the categories of {item.name!r}"
            )
        names += [c for c in chosen if c not in names]
    return names


def _rel(layout: RunLayout, path: Path) -> str:
    return path.relative_to(layout.root).as_posix()


def pipeline(cfg: FactoryConfig, root: Path, config_file: str = "pipelines.yaml") -> dict:
    """The dvc.yaml content for ``cfg`` (its profile, default version) under ``root``."""
    version = default_version(cfg)
    layout = RunLayout(cfg, version, Path(root).resolve())
    rel = lambda p: _rel(layout, p)  # noqa: E731
    args = f"--profile {cfg.profile} --version {version}"
    cats = categories(cfg)
    profile_key = f"profiles.{cfg.profile}"

    def params(stage: str) -> list[dict[str, list[str]]]:
        return [{config_file: [*PARAMS[stage], profile_key]}]

    def cmd(stage: str, extra: str = "") -> str:
        return f"anomaly-factory stage {stage} {args}{extra}"

    manifest = rel(layout.manifest)
    pairs = rel(layout.pairs)
    reports = layout.reports
    pair_dirs = [rel(layout.category_pairs(c)) for c in cats]
    stages: dict[str, Any] = {
        "ingest": {
            "cmd": cmd("ingest"),
            "deps": ["anomaly_factory/datasets", *CORE_DEPS],
            "params": params("ingest"),
            "outs": [
                *(rel(layout.dataset_manifest(d.name)) for d in cfg.datasets.items),
                manifest,
            ],
        },
        "generate": {
            "foreach": cats,
            "do": {
                "cmd": cmd("generate", " --category ${item}"),
                "deps": [manifest, "anomaly_factory/generators", *CORE_DEPS],
                "params": params("generate"),
                "outs": [
                    # MAGIC's per-type fine-tunes (other generators train none per type)
                    *(
                        [{rel(layout.category_checkpoints("${item}")): {"persist": True}}]
                        if cfg.generator == "magic"
                        else []
                    ),
                    {rel(layout.category_pairs("${item}")): {"cache": False}},
                ],
            },
        },
        "merge": {
            "cmd": cmd("merge"),
            "deps": [*pair_dirs, "anomaly_factory/generators/output.py", *CORE_DEPS],
            "outs": [{pairs: {"cache": False}}],
        },
        "gates": {
            "cmd": cmd("gates"),
            "deps": [
                pairs,
                manifest,
                "anomaly_factory/gates",
                "anomaly_factory/metrics",
                "anomaly_factory/generators/baselines",  # the gates' CutPaste reference
                *CORE_DEPS,
            ],
            "params": params("gates"),
            "outs": [
                {rel(reports / name): {"cache": False}}
                for name in ("gates.json", "pair_checks.parquet", "data_docs")
            ],
            "metrics": [{rel(reports / "metrics.json"): {"cache": False}}],
        },
    }
    report_deps = [
        rel(reports / "gates.json"),
        rel(reports / "metrics.json"),
        "anomaly_factory/reports",
        *CORE_DEPS,
    ]
    if cfg.detector.enabled:
        stages["detect"] = {
            "cmd": cmd("detect"),
            "deps": [
                pairs,
                manifest,
                rel(reports / "gates.json"),
                "anomaly_factory/detectors",
                "anomaly_factory/generators",  # the baselines it trains beside
                *CORE_DEPS,
            ],
            "params": params("detect"),
            "outs": [
                {rel(reports / name): {"cache": False}}
                for name in (
                    "detector_metrics.json",
                    "comparison.json",
                    "comparison.parquet",
                    "baselines",
                    "export",
                )
            ],
        }
        report_deps.append(rel(reports / "detector_metrics.json"))
    stages["report"] = {
        "cmd": cmd("report"),
        "deps": [pairs, *report_deps],
        "params": params("report"),
        "outs": [{rel(reports / "report.html"): {"cache": False}}],
    }
    stages["shards"] = {
        "cmd": cmd("shards"),
        "deps": [
            pairs,
            manifest,
            rel(reports / "gates.json"),
            "anomaly_factory/storage",
            *CORE_DEPS,
        ],
        "params": params("shards"),
        "outs": [rel(layout.shards / version)],
    }
    return {"stages": stages}


def render(cfg: FactoryConfig, root: Path) -> str:
    body = yaml.safe_dump(pipeline(cfg, root), sort_keys=False, width=100)
    return HEADER + "\n" + body
