"""Mixed precision for the small models trained on CPU.

bfloat16 autocast keeps the weights and the optimiser in float32 and runs the convs
in bfloat16, which AVX512-BF16 CPUs do faster (bench/RESULTS.md (l)): 0.63x the time
of a VAE-decoder step, 0.86x of a mask-DDPM step. Without native bfloat16 it is
emulated and slower, so it is only switched on where the CPU has it.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_bf16_autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bfloat16 autocast for a training step on ``device`` when asked for and useful."""
    if enabled and torch.device(device).type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
