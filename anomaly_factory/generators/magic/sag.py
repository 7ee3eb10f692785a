"""Spatially adaptive guidance (SAG), MAGIC §3.3.

Classifier-free guidance with a per-position weight on the latent grid::

    eps_hat = eps_u + W * (eps_c - eps_u),   W = M * w_in(t) + (1 - M) * w_d

``w_d`` (7.5 in the paper) guides the normal region at every step; inside the
mask ``w_in`` rises on a cosine schedule from ``w_m`` (4.0) at the first, noisiest
step to ``w_d`` at the last, so anomaly textures vary early and sharpen late.
With ``w_m == w_d`` this is exactly standard CFG.

>>> s = sag_schedule(4.0, 7.5, 5)
>>> float(s[0]), float(s[-1])
(4.0, 7.5)
"""

from __future__ import annotations

import math

import torch


def sag_schedule(w_m: float, w_d: float, num_steps: int) -> torch.Tensor:
    """Guidance inside the mask per denoising step: cosine from ``w_m`` to ``w_d``.

    ``w_in(i) = w_d - (w_d - w_m) * (1 + cos(pi * i / (N - 1))) / 2``; the endpoints are
    set exactly, and the sequence is monotone. With one step the first-step rule
    wins (``w_m``). Returned as float64 so the endpoints survive any later cast.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: {num_steps} is not >= 1")
    if num_steps == 1:
        return torch.tensor([w_m], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    rise = (1 + torch.cos(math.pi * i / (num_steps - 1))) / 2  # 1 -> 0
    out = w_d - (w_d - w_m) * rise
    out[0], out[-1] = w_m, w_d
    return out


def guidance_map(mask_latent: torch.Tensor, w_in: float, w_d: float) -> torch.Tensor:
    """``W = M * w_in + (1 - M) * w_d`` on the latent grid (same shape as ``mask_latent``)."""
    return mask_latent * w_in + (1 - mask_latent) * w_d


def spatially_adaptive_guidance(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    mask_latent: torch.Tensor,
    w_in: float,
    w_d: float,
) -> torch.Tensor:
    """MAGIC's guided noise ``eps_u + W * (eps_c - eps_u)``.

    ``eps_*`` are (B, C, h, w); ``mask_latent`` is (B, 1, h, w) with 1 inside the
    defect and broadcasts over channels.
    """
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"eps shapes differ: {tuple(eps_uncond.shape)} vs {tuple(eps_cond.shape)}")
    weight = guidance_map(mask_latent.to(eps_cond.dtype), w_in, w_d)
    return eps_uncond + weight * (eps_cond - eps_uncond)
