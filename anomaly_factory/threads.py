"""How many CPU threads torch uses in a stage.

PyTorch's CPU kernels split sums over threads, so a model trained on 1 thread and the
same model trained on 2 differ in their last bits, and MAGIC's masks and pairs with
them. Every route (``anomaly-factory run`` in order or side by side, ``anomaly-factory
stage`` under DVC) therefore sets the generator's threads by the same rule.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from anomaly_factory.config import FactoryConfig


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` CPU threads inside (0 keeps torch's setting); restore them after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generation_threads(cfg: FactoryConfig) -> int:
    """``orchestration.torch_threads``, else (local dispatch) each of the
    ``local_workers`` processes' share of this machine's cores; 0 (torch's default)
    on a work pool."""
    orch = cfg.orchestration
    if orch.torch_threads is not None:
        return orch.torch_threads
    if orch.dispatch != "local":
        return 0
    return max(1, len(os.sched_getaffinity(0)) // orch.local_workers)
