"""``anomaly-factory stage NAME`` (one stage of a version, what dvc.yaml runs) and
``anomaly-factory dvc-yaml`` (writes that dvc.yaml from RunLayout)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config


class Stage(StrEnum):
    ingest = "ingest"
    generate = "generate"
    merge = "merge"
    gates = "gates"
    detect = "detect"
    report = "report"
    shards = "shards"
    publish = "publish"


def stage(
    name: Annotated[Stage, typer.Argument(help="The stage, in pipeline order", show_default=False)],
    category: Annotated[
        list[str] | None,
        typer.Option(help="generate: this category (repeatable; default every category)"),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Version name (default <profile>-<config hash>)")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Run one stage of a version in this folder, as `anomaly-factory run` does.

    Reads and writes the same paths as the Prefect flow (RunLayout), through the same
    functions (anomaly_factory.stages); dvc.yaml's stages are these commands. As in
    `anomaly-factory run`, a version that fails its gates still gets every output:
    `gates` prints the verdict, and `shards`, the last stage, exits 1 after writing.
    """
    from anomaly_factory import stages
    from anomaly_factory.errors import GatesFailed
    from anomaly_factory.provenance import code_hash

    cfg = get_config(config, profile)
    ref = stages.RunRef.make(cfg, version, Path.cwd(), code_hash())
    if name is Stage.ingest:
        for i in range(len(cfg.datasets.items)):
            console.print(f"ingested {stages.ingest(ref, i)}")
        console.print(f"wrote {stages.combine_manifests(ref)}")
    elif name is Stage.generate:
        jobs = stages.category_types(ref)
        unknown = sorted(set(category or []) - set(jobs))
        if unknown:
            raise fail(f"--category {unknown}: not in {ref.layout.manifest} ({sorted(jobs)})")
        for c in category or list(jobs):
            for pairs in stages.generate_category(ref, c, jobs[c]):
                console.print(f"wrote {pairs}")
    elif name is Stage.merge:
        console.print(f"wrote {stages.merge_pairs(ref)}")
    elif name is Stage.gates:
        decision = stages.gates(ref)
        failed, n = decision.failed_types, len(decision.types)
        console.print(
            f"gates: {n - len(failed)}/{n} types pass"
            + (f"; failed: {', '.join(failed)}" if failed else "")
            + ("; version failed" if not decision.passed and not failed else "")
        )
    elif name is Stage.detect:
        console.print(f"wrote {stages.detect(ref)}")
    elif name is Stage.report:
        console.print(f"wrote {stages.report(ref)}")
    elif name is Stage.shards:
        console.print(f"wrote {stages.shards(ref)}")
        verdict = stages.gate_verdict(ref)
        if not verdict.passed:
            raise GatesFailed(
                f"quality gates failed for: {', '.join(verdict.failed_types) or 'the version'}"
            )
    else:
        console.print(f"published {stages.publish(ref)}")


def dvc_yaml(
    out: Annotated[Path, typer.Option(help="Where to write it")] = Path("dvc.yaml"),
    check: Annotated[
        bool, typer.Option(help="Write nothing; exit 1 if OUT differs from what would be written")
    ] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Write dvc.yaml from pipelines.yaml and RunLayout (the profile's default version)."""
    from anomaly_factory.io import atomic_write_text
    from anomaly_factory.storage.dvc_pipeline import render

    text = render(get_config(config, profile), Path.cwd())
    if check:
        if not out.is_file() or out.read_text() != text:
            raise fail(f"{out} is not what `anomaly-factory dvc-yaml` writes: run it again", 1)
        console.print(f"{out} is current")
        return
    atomic_write_text(out, text)
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("stage", epilog=EPILOG)(stage)
    app.command("dvc-yaml", epilog=EPILOG)(dvc_yaml)
