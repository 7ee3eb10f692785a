"""What every task shares: the cache policy and config round trip."""

from __future__ import annotations

import http.client
import socket
from typing import Any

from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from prefect.cache_policies import INPUTS, TASK_SOURCE

from anomaly_factory.config import FactoryConfig
from tasks.heartbeat import StageCrashed

# A task's cache key: its source (TASK_SOURCE) and its inputs (INPUTS), among them the
# run's RunRef: the resolved config, version, data root and the package's code hash
# (provenance.code_hash()). A change of any of these re-runs the task.
CACHE = INPUTS + TASK_SOURCE


# Errors worth retrying: the network, the file system, a dead worker. A bad value
# or a bug fails the same way every time, so it fails at once.
TRANSIENT = (
    ConnectionError,
    TimeoutError,
    socket.timeout,
    http.client.HTTPException,
    OSError,
    StageCrashed,
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(exc, TRANSIENT)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for Prefect tasks: retry only transient failures."""
    try:
        state.result()
    except BaseException as exc:  # the task's own exception is re-raised here
        return is_transient(exc)
    return False


def configured(task: Any, cfg: FactoryConfig) -> Any:
    """``task`` with the config's retries (transient failures only) and caching.

    Every task of the flows goes through here, so ``orchestration.retries``,
    ``retry_delay_s`` and ``cache`` mean the same for each.
    """
    orch = cfg.orchestration
    options: dict[str, Any] = {
        "retries": orch.retries,
        "retry_delay_seconds": orch.retry_delay_s,
        "retry_condition_fn": retry_transient,
    }
    if not orch.cache:
        options["refresh_cache"] = True
    return task.with_options(**options)
