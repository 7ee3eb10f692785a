"""Anomaly-semantic enhanced attention (ASEA), AnomalyControl §3.2.

A learnable prompt P, initialised at zero, is added to BLIP-2's frozen image
tokens. It is optimised for Tg Adam steps (public code: 5 steps, lr 0.1; paper
Tg = 3) to maximise the share of the Q-Former's cross-attention that falls on
patches inside the reference's anomaly mask, so the semantic features describe
the anomaly rather than the object around it. The loss is ``-log(mass)``, with
``mass`` the attention weight on in-mask patches averaged over layers, heads and
queries. Each reference's prompt is cached on disk, keyed by a hash of the
encoder's weights (``Blip2Encoder.weights_hash``, not its name: another seed of
``tiny`` or a folder whose weights changed must not reuse a prompt), the image,
mask, text and settings. With image-only Q-Former features the text does not
enter the Q-Former, and the prompt optimises the queries' attention alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anomaly_factory.config import ASEASection
from anomaly_factory.generators.anomalycontrol.csm import Blip2Encoder, Reference, patch_mask
from anomaly_factory.io import atomic_path

EPS = 1e-8  # keeps log finite when no attention lands in the mask


@dataclass
class ASEAResult:
    """The learned prompt (1, 1 + N, D_v) and the in-mask attention mass before/after."""

    prompt: torch.Tensor
    mass_before: float
    mass_after: float


def attention_mass_inside(
    cross_attentions: tuple[torch.Tensor, ...], inside: torch.Tensor
) -> torch.Tensor:
    """Share of Q-Former cross-attention on in-mask patches, per reference (B,).

    ``cross_attentions``: per layer (B, heads, queries, 1 + N), token 0 being CLS;
    ``inside``: (B, N) or (N,) fraction of each patch inside the mask.
    """
    if not cross_attentions:
        raise ValueError("no cross-attention maps: call the Q-Former with output_attentions=True")
    maps = torch.stack([a[..., 1:] for a in cross_attentions]).float()  # (L, B, H, Q, N)
    weights = inside.to(maps.device, maps.dtype)
    if weights.dim() == 1:
        weights = weights.unsqueeze(0)
    per_token = (maps * weights[None, :, None, None, :]).sum(-1)
    return per_token.mean(dim=(0, 2, 3))


def optimise_prompt(
    encoder: Blip2Encoder,
    image: np.ndarray,
    mask: np.ndarray,
    text: str,
    steps: int,
    lr: float,
) -> ASEAResult:
    """Adam on a zero-initialised additive prompt so attention concentrates in ``mask``."""
    if not (np.asarray(mask) > 0).any():
        raise ValueError("ASEA reference mask is empty: no anomaly region to attend to")
    tokens = encoder.vision_tokens(encoder.pixel_values([image]))
    ids, text_mask = encoder.text_inputs([text])
    inside = patch_mask(mask, encoder.patch_grid).to(tokens.device)
    prompt = torch.zeros_like(tokens, requires_grad=True)
    opt = torch.optim.Adam([prompt], lr=lr)

    def mass() -> torch.Tensor:
        out = encoder.qformer(tokens + prompt, ids, text_mask, output_attentions=True)
        return attention_mass_inside(out.cross_attentions, inside)[0]

    with torch.enable_grad():
        before = float(mass().detach())
        for _ in range(steps):
            loss = -torch.log(mass() + EPS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(mass())
    return ASEAResult(prompt.detach(), before, after)


def cache_key(
    encoder: Blip2Encoder, image: np.ndarray, mask: np.ndarray, text: str, section: ASEASection
) -> str:
    """Hash of everything the prompt depends on: encoder weights, image, mask, text, steps, lr."""
    h = hashlib.sha256()
    img = np.ascontiguousarray(np.asarray(image))
    msk = np.ascontiguousarray(np.asarray(mask) > 0)
    for arr in (img, msk):
        h.update(json.dumps([list(arr.shape), str(arr.dtype)]).encode())
        h.update(arr.tobytes())
    settings = {
        "encoder": encoder.weights_hash,
        "text": text,
        "steps": section.steps,
        "lr": section.lr,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def asea_prompt(
    encoder: Blip2Encoder,
    image: np.ndarray,
    mask: np.ndarray,
    text: str,
    section: ASEASection,
    cache_dir: Path | None = None,
) -> ASEAResult:
    """The reference's ASEA prompt, from ``cache_dir/asea/<hash>.safetensors`` when cached."""
    path = None
    if section.cache and cache_dir is not None:
        key = cache_key(encoder, image, mask, text, section)
        path = Path(cache_dir) / "asea" / f"{key}.safetensors"
        if path.is_file():
            data = load_file(str(path))
            prompt = data["prompt"].to(encoder.device)
            mass = data["mass"].tolist()
            return ASEAResult(prompt, float(mass[0]), float(mass[1]))
    result = optimise_prompt(encoder, image, mask, text, section.steps, section.lr)
    if path is not None:
        tensors = {
            "prompt": result.prompt.cpu().contiguous(),
            "mass": torch.tensor([result.mass_before, result.mass_after]),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    return result


def enhanced_features(
    encoder: Blip2Encoder,
    references: list[Reference],
    section: ASEASection,
    cache_dir: Path | None = None,
) -> tuple[torch.Tensor, list[ASEAResult | None]]:
    """CSM features (B, D) of references, each with its ASEA prompt when enabled."""
    feats, results = [], []
    for ref in references:
        result = None
        if section.enabled:
            result = asea_prompt(encoder, ref.image, ref.mask, ref.text, section, cache_dir)
        prompt = result.prompt if result is not None else None
        feats.append(encoder.semantic_features([ref.image], [ref.text], prompt))
        results.append(result)
    return torch.cat(feats), results
