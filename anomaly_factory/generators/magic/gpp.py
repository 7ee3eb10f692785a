"""Gaussian prompt perturbation (GPP), MAGIC §3.2.

delta ~ N(0, sigma^2 I) is added to the encoded prompt so that the fine-tuned
model learns a smooth neighbourhood of the anomaly concept instead of a few
memorised images. The paper perturbs the anomaly token's output vectors
(``target="anomaly_token"``); the public code perturbs all 77 vectors
(``target="all_tokens"``). Training draws fresh noise every step; the sampler
draws once per generated image and perturbs only the conditional branch.
"""

from __future__ import annotations

import logging

import torch

from anomaly_factory.errors import InputError

log = logging.getLogger(__name__)


def anomaly_token_positions(tokenizer, prompt: str, anomaly_token: str) -> torch.Tensor:
    """Bool mask over the tokenizer's padded sequence marking the anomaly token's pieces.

    >>> # positions of "sks" in "a photo of sks defect" (after the BOS token)
    """
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    token_ids = tokenizer(anomaly_token, add_special_tokens=False).input_ids
    if not token_ids:
        raise ValueError(f"anomaly token {anomaly_token!r} encodes to no token")
    positions = torch.zeros(len(ids), dtype=torch.bool)
    n = len(token_ids)
    found = False
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == token_ids:
            positions[i : i + n] = True
            found = True
    if not found:
        raise ValueError(f"anomaly token {anomaly_token!r} does not occur in prompt {prompt!r}")
    return positions


def gaussian_prompt_perturbation(
    prompt_embeds: torch.Tensor,
    sigma: float,
    positions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``prompt_embeds + delta`` with delta ~ N(0, sigma^2) at ``positions``.

    ``prompt_embeds`` is (batch, tokens, dim); ``positions`` is a bool (tokens,)
    or (batch, tokens) mask, or None for every token. One independent draw per
    batch row. ``sigma == 0`` returns the input unchanged (same object).
    """
    if sigma < 0:
        raise ValueError(f"sigma: {sigma} is not >= 0")
    if sigma == 0:
        return prompt_embeds
    noise = torch.randn(
        prompt_embeds.shape,
        generator=generator,
        device=generator.device if generator is not None else prompt_embeds.device,
        dtype=torch.float32,
    ).to(device=prompt_embeds.device, dtype=prompt_embeds.dtype)
    if positions is not None:
        pos = positions.to(prompt_embeds.device)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        noise = noise * pos.unsqueeze(-1).to(noise.dtype)
    return prompt_embeds + sigma * noise


# --------------------------------------------------------------------------- consistency
class GPPMismatchError(InputError):
    """Inference GPP differs from the GPP the checkpoint was fine-tuned with."""


def training_gpp(checkpoint_meta: dict | None) -> tuple[float, str]:
    """(sigma, target) of a checkpoint's fine-tuning, from its ``checkpoint.json``.

    ``(nan, "none")`` for the base model (no checkpoint) and ``(nan, "unknown")`` for a
    checkpoint written before these were recorded.
    """
    if checkpoint_meta is None:
        return float("nan"), "none"
    if "sigma" not in checkpoint_meta or "target" not in checkpoint_meta:
        return float("nan"), "unknown"
    return float(checkpoint_meta["sigma"]), str(checkpoint_meta["target"])


def gpp_mismatch(train: tuple[float, str], inference: tuple[float, str]) -> str | None:
    """Why inference GPP differs from training GPP (MAGIC §3.2 ablation), or None.

    The paper's ablation: GPP at inference without it in training raises KID by
    about 15 points and costs about 8 points of accuracy. The target only matters
    where both sides perturb.
    """
    (train_sigma, train_target), (sigma, target) = train, inference
    if train_target in ("none", "unknown"):
        return None
    if train_sigma != sigma:
        return f"sigma {sigma} at inference, {train_sigma} in training"
    if sigma > 0 and train_target != target:
        return f"target {target!r} at inference, {train_target!r} in training"
    return None


def check_gpp_consistency(
    checkpoint_meta: dict | None,
    sigma: float,
    target: str,
    on_mismatch: str = "error",
    where: str = "checkpoint",
) -> tuple[float, str]:
    """Refuse (``error``) or log (``warn``) inference GPP unlike the checkpoint's training GPP.

    Returns the training (sigma, target) for the pair metadata.
    """
    train = training_gpp(checkpoint_meta)
    if train[1] == "unknown":
        log.warning(
            "%s: checkpoint.json does not record its training GPP (sigma, target); "
            "cannot check generate.gpp against it",
            where,
        )
    why = gpp_mismatch(train, (sigma, target))
    if why is not None:
        message = (
            f"generate.gpp differs from the GPP {where} was fine-tuned with ({why}); "
            f"MAGIC's ablation says inference GPP unlike training hurts (KID +15, "
            f"accuracy -8). Set generate.gpp to finetune's values, or "
            f"generate.gpp_mismatch: warn to go ahead"
        )
        if on_mismatch == "error":
            raise GPPMismatchError(message)
        log.warning(message)
    return train
