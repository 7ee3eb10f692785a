"""Gaussian prompt perturbation (GPP), MAGIC §3.2.

delta ~ N(0, sigma^2 I) is added to the encoded prompt so that the fine-tuned
model learns a smooth neighbourhood of the anomaly concept instead of a few
memorised images. The paper perturbs the anomaly token's output vectors
(``target="anomaly_token"``); the public code perturbs all 77 vectors
(``target="all_tokens"``). Training draws fresh noise every step; the sampler
draws once per generated image and perturbs only the conditional branch.
"""

from __future__ import annotations

import torch


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
