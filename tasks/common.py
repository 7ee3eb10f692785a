"""What every task shares: the cache policy and config round trip."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE

from anomaly_factory.config import FactoryConfig

# Inputs include the resolved config and the package's code hash, so a change of
# either re-runs the task; TASK_SOURCE covers the wrapper itself.
CACHE = INPUTS + TASK_SOURCE


def config_from(cfg_json: dict[str, Any]) -> FactoryConfig:
    return FactoryConfig.model_validate(cfg_json)
