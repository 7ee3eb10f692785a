"""bfloat16 autocast for the small models trained on CPU: on only where asked and native."""

from __future__ import annotations

import torch

from anomaly_factory.generators.magic.precision import cpu_bf16_autocast, cpu_has_bf16


def test_autocast_runs_convs_in_bf16_only_when_asked_and_the_cpu_has_it():
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    with cpu_bf16_autocast(False):
        assert conv(x).dtype == torch.float32
    with cpu_bf16_autocast(True):
        assert conv(x).dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert conv.weight.dtype == torch.float32  # the weights stay float32


def test_autocast_leaves_other_devices_alone():
    with cpu_bf16_autocast(True, "meta"):
        assert not torch.is_autocast_enabled("cpu")
