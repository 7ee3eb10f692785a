"""The factory's deployments: one definition, ``prefect.yaml``, and two ways to apply it.

``prefect --no-prompt deploy --all`` reads ``prefect.yaml`` from the working directory;
``anomaly-factory deploy`` reads the same file (``./prefect.yaml``, else the copy packaged
with anomaly-factory) and applies it the way ``prefect deploy`` does, after creating the
work pools and the GPU concurrency limit. So both routes register the same deployments
with the same parameters, schedules and pull step.

A flow run of either deployment starts with :func:`enter_factory_home`, the pull step:
it enters ``$ANOMALY_FACTORY_HOME`` on the worker (the folder holding ``pipelines.yaml``
and ``data/``; ``anomaly-factory worker`` sets it to its own working directory). The
entrypoints are module paths (``flows.factory.factory``), so the worker imports the
installed package: the home can be a checkout or a bare data folder.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InfrastructureError, InputError

HOME_ENV = "ANOMALY_FACTORY_HOME"
DEPLOYMENT_FILE = "prefect.yaml"
PROJECT_NAME = "anomaly-factory"
FACTORY = "factory"


def enter_factory_home(directory: str | None = None) -> dict[str, str]:
    """Pull step: the flow run works in ``directory`` or ``$ANOMALY_FACTORY_HOME``."""
    home = directory or os.environ.get(HOME_ENV)
    if not home:
        raise InputError(
            f"{HOME_ENV} is not set on this worker: set it to the folder that holds "
            "pipelines.yaml and data/ (`anomaly-factory worker` sets it to its working "
            "directory)"
        )
    path = Path(home).expanduser()
    if not path.is_dir():
        raise InputError(f"{HOME_ENV}={home}: not a folder on this worker")
    os.chdir(path)
    return {"directory": str(path.resolve())}


def deployment_file() -> Path:
    """``./prefect.yaml`` when it defines this project's deployments, else the packaged one."""
    local = Path(DEPLOYMENT_FILE)
    if local.is_file():
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
            if (yaml.safe_load(local.read_text()) or {}).get("name") == PROJECT_NAME:
                return local
    packaged = resources.files("anomaly_factory").joinpath(DEPLOYMENT_FILE)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / DEPLOYMENT_FILE


def read_deployment_file(path: Path | None = None) -> dict[str, Any]:
    path = path or deployment_file()
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the deployments: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("deployments"), list):
        raise InputError(f"{path}: has no `deployments:` list")
    return spec


class PullSteps:
    """Hands a deployment its pull steps, as ``prefect deploy`` does (a RunnerStorage)."""

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        self.steps = steps
        self._base = Path.cwd()

    def set_base_path(self, path: Path) -> None:
        self._base = path

    @property
    def destination(self) -> Path:
        return self._base

    @property
    def pull_interval(self) -> int:
        return 60

    async def pull_code(self) -> None:
        """Nothing to fetch: the worker imports the installed package."""

    def to_pull_step(self) -> list[dict[str, Any]]:
        return self.steps


def schedule(entry: dict[str, Any]) -> Any:
    """One ``schedules:`` entry of prefect.yaml (cron or interval seconds) as a Schedule."""
    from prefect.schedules import Cron, Interval

    active = entry.get("active", True)
    timezone = entry.get("timezone")
    if entry.get("cron"):
        return Cron(entry["cron"], timezone=timezone, active=active)
    if entry.get("interval"):
        return Interval(timedelta(seconds=entry["interval"]), timezone=timezone, active=active)
    raise InputError(f"{DEPLOYMENT_FILE}: schedule {entry!r} has neither cron nor interval")


def _pool(entry: dict[str, Any]) -> dict[str, Any]:
    pool = entry.get("work_pool") or {}
    if not pool.get("name"):
        raise InputError(f"{DEPLOYMENT_FILE}: deployment {entry.get('name')!r} names no work pool")
    return pool


def check_consistent(cfg: FactoryConfig, spec: dict[str, Any]) -> None:
    """Each deployment the factory dispatches a GPU flow to must be one the file defines,
    of that flow, on the pool the config names."""
    orch = cfg.orchestration
    names = [d.get("name") for d in spec["deployments"]]
    for flow_name in ("category", "detect"):
        wanted = orch.gpu_deployments.for_flow(flow_name)
        dep_name = wanted.partition("/")[2]
        found = [d for d in spec["deployments"] if d.get("name") == dep_name]
        field = f"orchestration.gpu_deployments.{flow_name}"
        if not found:
            raise InputError(
                f"{field}: {wanted!r} is not a deployment of {DEPLOYMENT_FILE} ({names})"
            )
        entrypoint = str(found[0].get("entrypoint", ""))
        if entrypoint != f"flows.gpu.{flow_name}":
            raise InputError(
                f"{field}: {DEPLOYMENT_FILE}'s {dep_name!r} runs {entrypoint!r}, "
                f"not the {flow_name!r} flow (flows.gpu.{flow_name})"
            )
        pool = _pool(found[0])["name"]
        if pool != orch.work_pool:
            raise InputError(
                f"orchestration.work_pool: {orch.work_pool!r} differs from the pool of "
                f"{DEPLOYMENT_FILE}'s {dep_name!r} deployment ({pool!r})"
            )


def ensure_pools_and_limit(cfg: FactoryConfig, pools: list[str]) -> None:
    """Create the process work pools and the GPU global concurrency limit if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    from tasks.dispatch import GPU_CONCURRENCY

    with get_client(sync_client=True) as client:
        for pool in dict.fromkeys(pools):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        try:
            client.read_global_concurrency_limit_by_name(GPU_CONCURRENCY)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=GPU_CONCURRENCY, limit=cfg.orchestration.gpu_concurrency_limit
                )
            )


def register_deployments(
    cfg: FactoryConfig,
    parameters: dict[str, Any] | None = None,
    schedules: list[dict[str, Any]] | None = None,
    path: Path | None = None,
) -> dict[str, UUID]:
    """Apply every deployment of ``prefect.yaml``; returns their ids by name.

    ``parameters`` update the factory deployment's parameters and ``schedules`` (entries
    as in prefect.yaml) replace its schedules; without them the deployments are exactly
    those ``prefect deploy --all`` makes from the same file.
    """
    import httpx

    spec = read_deployment_file(path)
    try:
        return _register(cfg, spec, parameters or {}, schedules)
    except (httpx.TransportError, ConnectionError) as exc:  # the API is down or unreachable
        raise InfrastructureError(f"Prefect API: {exc}") from exc


def _register(
    cfg: FactoryConfig,
    spec: dict[str, Any],
    parameters: dict[str, Any],
    schedules: list[dict[str, Any]] | None,
) -> dict[str, UUID]:
    from prefect.deployments.runner import EntrypointType
    from prefect.flows import load_flow_from_entrypoint

    check_consistent(cfg, spec)
    entries = spec["deployments"]
    ensure_pools_and_limit(cfg, [_pool(d)["name"] for d in entries])
    ids = {}
    for entry in entries:
        flow = load_flow_from_entrypoint(entry["entrypoint"])
        params = dict(entry.get("parameters") or {})
        entry_schedules = entry.get("schedules") or []
        if entry["name"] == FACTORY:
            params.update(parameters)
            entry_schedules = entry_schedules if schedules is None else schedules
        pool = _pool(entry)
        deployment = flow.to_deployment(
            name=entry["name"],
            work_pool_name=pool["name"],
            job_variables=pool.get("job_variables"),
            entrypoint_type=EntrypointType.MODULE_PATH,
            parameters=params,
            description=entry.get("description") or flow.description,
            tags=entry.get("tags"),
            schedules=[schedule(s) for s in entry_schedules],
        )
        if deployment.entrypoint != entry["entrypoint"]:
            raise InputError(
                f"{DEPLOYMENT_FILE}: entrypoint {entry['entrypoint']!r} must be the module "
                f"path {deployment.entrypoint!r} (workers import the installed package)"
            )
        deployment.storage = PullSteps(spec.get("pull") or [])
        ids[entry["name"]] = deployment.apply()
    return ids
