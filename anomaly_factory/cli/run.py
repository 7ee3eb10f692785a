"""``anomaly-factory run | deploy | worker``: the factory under Prefect."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from anomaly_factory.cli._common import (
    EPILOG,
    ConfigOpt,
    ProfileOpt,
    _verbose,
    console,
    describe,
    exit_code_for,
    fail,
    get_config,
)
from anomaly_factory.errors import GATES_FAILED, INFRASTRUCTURE, GatesFailed, Interrupted

RUN_HELP = (
    "Run the whole factory for one dataset version; exit 1 if any gate fails.\n\n"
    "In a terminal it shows one live display (each stage with its counts, a bar and ETA per "
    "anomaly type), then a summary: version, gates, report, shards. What Prefect, its "
    "temporary server, diffusers, Lightning, anomalib and Python warnings print goes to "
    "data/runs/<version>/run.log (its path is printed); `anomaly-factory --verbose run` "
    "shows it as well.\n\n"
    "Ctrl-C or SIGTERM stops the run within a few seconds; what finished is kept, and the "
    "same command resumes."
)


def _quiet_prefect() -> None:
    """A cold machine needs longer than Prefect's 20 s to migrate the temporary server's
    database (the first `run` failed on it); and no telemetry, neither the server's
    (its writes raced the run's for the SQLite lock) nor the client's."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _summary(result: dict, log: Path, table: str | None = None) -> None:
    """Version, gates (which ran, which were off), report, shards, published, log."""
    import json

    from rich.table import Table

    from anomaly_factory.io import portable_path

    types = result["types"]
    failed = sorted(t for t, ok in types.items() if not ok)
    gates = Text(
        f"{len(types) - len(failed)}/{len(types)} types pass",
        style="green" if not failed else "red",
    )
    if result.get("gates_on") or result.get("gates_off"):
        gates.append(f" · {len(result.get('gates_on', []))} gates ran")
        if result.get("gates_off"):
            gates.append(f", off: {', '.join(result['gates_off'])}")
    shards = portable_path(result["shards"])
    try:
        index = json.loads(Path(result["shard_index"]).read_text())
        shards += f"  ({len(index['shardlist'])} shards, {index['nsamples']} samples)"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("version", result["version"])
    grid.add_row("gates", gates)
    for line in (table or "").splitlines()[1:]:
        style = "red" if " FAIL " in line else ""
        grid.add_row("", Text(line.strip(), style=style, no_wrap=True, overflow="ellipsis"))
    if result.get("data_root"):
        grid.add_row("data root", result["data_root"])
    grid.add_row("report", portable_path(result["report"]))
    grid.add_row("shards", shards)
    if result.get("published"):
        grid.add_row("published", str(result["published"]))
    grid.add_row("log", portable_path(log))
    console.print(grid)


def run(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    version: Annotated[
        str | None, typer.Option(help="Dataset version (default: <profile>-<config hash>)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show the live display")] = True,
    data_root: Annotated[
        str | None,
        typer.Option(
            "--data-root",
            help="Where data/ lives: a folder or s3://bucket/prefix (default: the config's "
            "data_root, else the working directory); a store is worked on through a local "
            "cache ($ANOMALY_FACTORY_CACHE)",
        ),
    ] = None,
) -> None:
    _quiet_prefect()
    from anomaly_factory import progress as run_progress
    from anomaly_factory.cli._display import RunDisplay, RunOutput, stop_on_signals
    from anomaly_factory.io import portable_path
    from anomaly_factory.stages import RunRef
    from anomaly_factory.storage import staging

    cfg = get_config(config, profile)
    root = data_root or cfg.data_root or str(Path.cwd())
    ref = RunRef.make(cfg, version, root)  # checks the version name (exit 2)
    version, layout = ref.version, ref.layout
    log = layout.run_log
    run_progress.clear(layout.progress)  # the display shows this run, not the last one
    with RunOutput(log, verbose=_verbose()):
        console.print(
            Text.assemble(
                ("anomaly-factory run ", "bold"),
                f"{version} · profile {cfg.profile} · log {portable_path(log)}",
            )
        )
        display = RunDisplay(layout, console, sync=staging.progress_sync(ref)) if progress else None

        def interrupted(signum: int) -> str:
            name = signal.Signals(signum).name
            return f"interrupted ({name}): finished steps are kept; run the same command to resume"

        def unwound_too_slowly(signum: int) -> None:
            if display is not None:
                display.bar.stop()  # shows the cursor again
            fail(interrupted(signum))  # printed; the process then ends with 128 + signum

        try:
            with stop_on_signals(unwound_too_slowly), display or contextlib.nullcontext():
                from flows.factory import factory

                result = factory(
                    profile=cfg.profile,
                    config=str(config) if config else None,
                    version=version,
                    root=ref.root,
                )
        except GatesFailed as exc:
            outputs = getattr(exc, "result", None)
            if outputs is not None:
                _summary(outputs, log, str(exc))
                failed = sorted(t for t, ok in outputs["types"].items() if not ok)
                message = f"quality gates failed for: {', '.join(failed) or 'the version'}"
            else:
                message = str(exc).splitlines()[0]
            raise fail(message, GATES_FAILED) from None
        except Interrupted as exc:
            raise fail(interrupted(exc.signum), exc.exit_code) from None
        except Exception as exc:
            code = exit_code_for(exc) or INFRASTRUCTURE  # a flow that crashed without a known cause
            raise fail(
                f"factory run failed: {describe(exc)} (details: {portable_path(log)})", code
            ) from None
        _summary(result, log)
        said = "all gates that ran passed" if result.get("gates_off") else "all gates passed"
        console.print(said, style="green")


def deploy(
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            "-p",
            help="Profile the factory runs (default: the one pipelines.yaml names)",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="pipelines.yaml the factory runs, relative to the worker's "
            "ANOMALY_FACTORY_HOME (default: the one there)",
        ),
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help="Replace the factory's schedule (cron, UTC)")
    ] = None,
    interval: Annotated[
        float | None,
        typer.Option(help="Replace the factory's schedule: every this many seconds", min=1),
    ] = None,
) -> None:
    """Register prefect.yaml's deployments (factory on a schedule; the GPU flows category and detect) at PREFECT_API_URL.

    It creates their work pools and the `gpu` concurrency limit first. Without options the deployments are exactly those `prefect --no-prompt deploy --all` makes from the same prefect.yaml (./prefect.yaml, else the packaged copy).
    """
    if cron and interval:
        raise fail("--cron and --interval both given: the factory has one schedule")
    _quiet_prefect()
    from prefect.settings import get_current_settings

    from flows.deploy import deployment_file, register_deployments

    if not get_current_settings().api.url:
        raise fail(
            "no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after "
            "`prefect server start`)"
        )
    # checked here when it is here too; the worker reads the copy in its home
    cfg = get_config(config if config is not None and config.is_file() else None, profile)
    parameters = {k: v for k, v in (("profile", profile), ("config", config)) if v is not None}
    parameters = {k: str(v) for k, v in parameters.items()}
    schedules = None
    if cron:
        schedules = [{"cron": cron, "timezone": "UTC", "active": True}]
    elif interval:
        schedules = [{"interval": interval, "timezone": "UTC", "active": True}]
    source = deployment_file()
    ids = register_deployments(cfg, parameters, schedules, source)
    console.print(f"deployments of {source} at {get_current_settings().api.url}:")
    for name, dep_id in ids.items():
        console.print(f"  {name}: {dep_id}")


def worker(
    pool: Annotated[str, typer.Option(help="Work pool to serve")] = "cuda",
    gpu: Annotated[
        str | None, typer.Option(help="GPU index to pin (sets CUDA_VISIBLE_DEVICES)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker name")] = None,
    limit: Annotated[int, typer.Option(help="Flow runs at once")] = 1,
) -> None:
    """Start a Prefect process worker on POOL, pinned to one GPU.

    Its flow runs work in ANOMALY_FACTORY_HOME (the folder with pipelines.yaml and data/);
    when it is unset, the worker's working directory.
    """
    from flows.deploy import HOME_ENV

    env = dict(os.environ)
    env.setdefault(HOME_ENV, os.getcwd())
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
    console.print(f"starting: {' '.join(cmd)}  ({HOME_ENV}={env[HOME_ENV]})")
    code = subprocess.run(cmd, env=env).returncode
    if code not in (0, 130, 143, -2, -15):  # not a stop by signal: the worker failed
        raise fail(f"prefect worker exited with {code}", INFRASTRUCTURE)
    raise typer.Exit(code if code >= 0 else 128 - code)


def register(app: typer.Typer) -> None:
    app.command("run", epilog=EPILOG, help=RUN_HELP)(run)
    app.command("deploy", epilog=EPILOG)(deploy)
    app.command("worker", epilog=EPILOG)(worker)
