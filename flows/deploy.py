"""Registering the factory's deployments, work pool and GPU concurrency limit."""

from __future__ import annotations

import contextlib
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from anomaly_factory.config import FactoryConfig
from tasks.dispatch import GPU_CONCURRENCY


def ensure_pool_and_limit(cfg: FactoryConfig) -> None:
    """Create the process work pool and the GPU global concurrency limit if missing."""
    orch = cfg.orchestration
    with get_client(sync_client=True) as client:
        for pool in (orch.work_pool, orch.factory_work_pool):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        try:
            client.read_global_concurrency_limit_by_name(GPU_CONCURRENCY)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_CONCURRENCY, limit=orch.gpu_concurrency_limit)
            )


def register_deployments(
    cfg: FactoryConfig, cron: str | None, config_path: str | None = None
) -> dict[str, UUID]:
    """The GPU stage on the GPU pool, and the scheduled factory on the factory pool."""
    from flows.factory import factory
    from flows.gpu_stage import gpu_stage

    ensure_pool_and_limit(cfg)
    pool = cfg.orchestration.work_pool
    gpu = gpu_stage.to_deployment(
        name="gpu-stage",
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["gpu"],
        description="GPU stages (finetune, generate, detectors) of one category",
    )
    fac = factory.to_deployment(
        name="factory",
        work_pool_name=cfg.orchestration.factory_work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        cron=cron,
        parameters={"profile": cfg.profile, "config": config_path},
        description="Scheduled regeneration of one dataset version",
    )
    return {"gpu-stage": gpu.apply(), "factory": fac.apply()}
