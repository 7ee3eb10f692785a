"""``anomaly-factory run | deploy | worker``: the factory under Prefect."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import (
    EPILOG,
    ConfigOpt,
    ProfileOpt,
    console,
    describe,
    exit_code_for,
    fail,
    get_config,
)
from anomaly_factory.errors import GATES_FAILED, INFRASTRUCTURE


def _watch(layout, stop: threading.Event) -> None:
    """Show per-type pair progress (done / total, ETA) by counting finished records."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from anomaly_factory import progress as run_progress
    from anomaly_factory.manifest import anomaly_types, read_images

    total = layout.cfg.generate.n_pairs
    bars: dict[tuple[str, str], int] = {}
    with Progress(
        TextColumn("{task.fields[stage]:<9}", style="bold", markup=False),
        TextColumn("{task.description:<28}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        stage_task = bar.add_task("starting", total=None, stage="stage")
        while not stop.wait(1.0):
            records = run_progress.read(layout.progress)
            if records:
                last = records[-1]
                bar.update(stage_task, description=f"{last['stage']} {last['unit']}")
            if not bars and layout.manifest.exists():
                try:
                    images = read_images(layout.manifest)
                except Exception:  # being written; try again next tick
                    continue
                for c in sorted(images["category"].unique()):
                    for t in anomaly_types(images, c):
                        bars[(c, t)] = bar.add_task(f"{c}/{t}", total=total, stage="generate")
            for (c, t), task_id in bars.items():
                done = len(list((layout.pairs_dir(c, t) / "records").glob("*.json")))
                bar.update(task_id, completed=min(done, total))


def run(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    version: Annotated[
        str | None, typer.Option(help="Dataset version (default: <profile>-<config hash>)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show live progress")] = True,
) -> None:
    """Run the whole factory for one dataset version; exit 1 if any gate fails."""
    # A cold machine needs longer than Prefect's 20 s to migrate the ephemeral
    # server's database (the first `run` failed on it); and no telemetry offline.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from anomaly_factory.layout import RunLayout, default_version
    from flows.factory import factory

    cfg = get_config(config, profile)
    version = version or default_version(cfg)
    layout = RunLayout(cfg, version, Path.cwd())
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(layout, stop), daemon=True)
    if progress:
        watcher.start()
    try:
        result = factory(
            profile=cfg.profile,
            config=str(config) if config else None,
            version=version,
            root=str(Path.cwd()),
        )
    except Exception as exc:
        stop.set()
        code = exit_code_for(exc) or INFRASTRUCTURE  # a flow that crashed without a known cause
        raise fail(f"factory run failed: {describe(exc)}", code) from None
    finally:
        stop.set()
        if progress:
            watcher.join(timeout=5)
    console.print(f"version  {result['version']}")
    console.print(f"report   {result['report']}")
    console.print(f"shards   {result['shards']}")
    if result.get("published"):
        console.print(f"published {result['published']}")
    if not result["passed"]:
        failed = [t for t, ok in result["types"].items() if not ok]
        raise fail(f"quality gates failed for: {', '.join(failed) or 'the version'}", GATES_FAILED)
    console.print("all gates passed", style="green")


def deploy(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    cron: Annotated[str | None, typer.Option(help="Schedule of the factory deployment")] = None,
) -> None:
    """Register the factory (scheduled) and GPU-stage deployments with the Prefect API."""
    from flows.deploy import register_deployments

    cfg = get_config(config, profile)
    ids = register_deployments(
        cfg, cron or cfg.orchestration.schedule_cron, str(config) if config else None
    )
    for name, dep_id in ids.items():
        console.print(f"deployment {name}: {dep_id}")


def worker(
    pool: Annotated[str, typer.Option(help="Work pool to serve")] = "cuda",
    gpu: Annotated[
        str | None, typer.Option(help="GPU index to pin (sets CUDA_VISIBLE_DEVICES)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker name")] = None,
    limit: Annotated[int, typer.Option(help="Flow runs at once")] = 1,
) -> None:
    """Start a Prefect process worker on POOL, pinned to one GPU."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [
        str(prefect) if prefect.exists() else "prefect",
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        "--limit",
        str(limit),
    ]
    if name or gpu is not None:
        cmd += ["--name", name or f"{pool}-gpu{gpu}"]
    console.print(f"starting: {' '.join(cmd)}")
    raise typer.Exit(subprocess.run(cmd, env=env).returncode)


def register(app: typer.Typer) -> None:
    app.command("run", epilog=EPILOG)(run)
    app.command("deploy", epilog=EPILOG)(deploy)
    app.command("worker", epilog=EPILOG)(worker)
