"""Sending the GPU flows (``flows.gpu``) to the CUDA work pool and waiting for them, with heartbeats.

A GPU flow runs as a deployment on a process work pool (one worker per GPU).
``run_deployment`` creates the run; we then poll it ourselves because a worker
that dies takes its flow run with it and leaves the run ``Running`` forever.
The GPU flow sets a Prefect Variable as a heartbeat; when it goes stale the
run is marked crashed and the task retries, creating a new run that resumes
from the files the dead one finished.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import SetStateStatus
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed
from prefect.task_runners import ProcessPoolTaskRunner
from prefect.tasks import Task
from prefect.variables import Variable

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.stages import RunRef
from tasks.common import CACHE
from tasks.heartbeat import StageCrashed, heartbeat_name

GPU_CONCURRENCY = "gpu"  # global concurrency limit bounding GPU stages in flight
POLL_S = 2.0
LEASE_S = 60.0  # seconds a GPU slot stays held without renewal


def _wait(flow_run_id: Any, heartbeat_timeout: float, start_timeout: float) -> None:
    logger = get_run_logger()
    created = time.time()
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is not None and state.is_final():
                if state.is_completed():
                    return
                raise StageCrashed(f"GPU run {run.name} ended {state.name}: {state.message}")
            if state is not None and state.is_running():
                beat = Variable.get(heartbeat_name(flow_run_id), default=None)
                started = run.start_time.timestamp() if run.start_time else created
                last = float(beat) if beat is not None else started
                if time.time() - last > heartbeat_timeout:
                    # not forced: a run that finished since it was read keeps its final state
                    result = client.set_flow_run_state(
                        flow_run_id, Crashed(message="heartbeat lost: worker gone")
                    )
                    if result.status != SetStateStatus.ACCEPT:  # it ended on its own
                        time.sleep(POLL_S)
                        continue
                    raise StageCrashed(
                        f"GPU run {run.name}: no heartbeat for {heartbeat_timeout:.0f}s"
                    )
            elif time.time() - created > start_timeout:
                result = client.set_flow_run_state(
                    flow_run_id, Crashed(message="never started: no worker")
                )
                if result.status != SetStateStatus.ACCEPT:
                    time.sleep(POLL_S)
                    continue
                raise StageCrashed(f"GPU run {run.name}: no worker picked it up")
            logger.debug("waiting for %s (%s)", run.name, state.name if state else "?")
            time.sleep(POLL_S)


@task(name="gpu", cache_policy=CACHE, persist_result=True)  # retries: configured()
def dispatch_gpu(ref: RunRef, flow_name: str, params: dict[str, Any]) -> list[str]:
    """Run GPU flow ``flow_name`` (``flows.gpu.GPU_FLOWS``) with ``params``, in-process or
    on the work pool (its deployment: ``orchestration.gpu_deployments``)."""
    from flows.gpu import GPU_FLOWS, flow_outputs

    if flow_name not in GPU_FLOWS:
        raise InputError(f"GPU flow {flow_name!r} is not one of {sorted(GPU_FLOWS)}")
    orch = ref.cfg.orchestration
    if orch.dispatch == "local":
        return GPU_FLOWS[flow_name](ref=ref, **params)
    label = "-".join([flow_name, *_label_parts(params)])
    # A short lease (renewed while held) frees the slot quickly if a failed dispatch
    # leaves it behind, as was seen when a killed worker's run was marked crashed.
    with concurrency(GPU_CONCURRENCY, occupy=1, lease_duration=LEASE_S):
        run = run_deployment(
            orch.gpu_deployments.for_flow(flow_name),
            parameters={**params, "ref": ref.model_dump(mode="json")},
            timeout=0,
            flow_run_name=label,
            tags=["gpu", flow_name],
        )
        get_run_logger().info("dispatched %s (%s) to pool %s", run.name, label, orch.work_pool)
        try:
            _wait(run.id, orch.heartbeat_timeout_s, orch.start_timeout_s)
        finally:
            Variable.unset(heartbeat_name(run.id))
    return flow_outputs(ref, flow_name, params)


def _label_parts(params: dict[str, Any]) -> list[str]:
    """What names a GPU run on the pool beside its flow's name.

    >>> _label_parts({"category": "nut", "anomaly_types": ["rust", "scratch"]})
    ['nut']
    >>> _label_parts({"category": "nut", "anomaly_types": ["rust"]})
    ['nut', 'rust']
    >>> _label_parts({"category": "nut", "anomaly_types": []}), _label_parts({})
    (['nut', 'shared'], [])
    """
    if "category" not in params:
        return []
    types = params.get("anomaly_types")
    if types is not None and len(types) == 1:
        return [params["category"], types[0]]
    return [params["category"], "shared"] if types == [] else [params["category"]]


def run_stages(
    cfg: FactoryConfig, stage_task: Task, calls: dict[str, dict[str, Any]]
) -> Iterator[tuple[str, list[str]]]:
    """Run ``stage_task`` once per key of ``calls`` (its keyword arguments); yield each
    key with its result as it finishes.

    ``work_pool``: every call at once, each a thread waiting on its worker, yielded in the
    order they finish (so progress shows a type done when it is). ``local`` with
    ``local_workers`` > 1: that many at once in a process pool. Otherwise one after another
    in this process. Callers that need the results in ``calls``' order reorder them.
    """
    orch = cfg.orchestration
    if orch.dispatch == "work_pool":
        futures = [stage_task.submit(**kw) for kw in calls.values()]
        keys = {f.task_run_id: key for f, key in zip(futures, calls, strict=True)}
        for future in as_completed(futures):
            yield keys[future.task_run_id], future.result()
    elif orch.local_workers > 1 and len(calls) > 1:
        with local_process_pool(min(orch.local_workers, len(calls))) as runner:
            futures = {key: runner.submit(stage_task, kw) for key, kw in calls.items()}
            for key, future in futures.items():
                yield key, future.result()
    else:
        for key, kw in calls.items():
            yield key, stage_task(**kw)


@contextlib.contextmanager
def local_process_pool(workers: int) -> Iterator[ProcessPoolTaskRunner]:
    """``workers`` processes that report to this flow's Prefect API, sharing the cores."""
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    # each stage sets its torch threads itself (anomaly_factory.threads)
    runner = ProcessPoolTaskRunner(max_workers=workers)
    # An ephemeral API (no PREFECT_API_URL) would otherwise make each spawned process
    # start a server of its own, and its runs would not show in this one.
    with temporary_settings({PREFECT_API_URL: api_url}), runner:
        yield runner
