"""Training of the semantic guided adapter (AnomalyControl §3.3).

The base inpainting model (MAGIC's backbone: the tiny model or SD2 inpainting)
stays frozen; only SGA trains, i.e. CSM's projection and the new key/value
projections. Each few-shot anomaly image is its own reference: its ASEA-enhanced
BLIP-2 features condition the UNet, which learns the inpainting objective
(epsilon-MSE on ``[noisy latents, mask, masked-image latents]``) inside and
outside the anomaly mask. Text, image or both are dropped 5% of the time each
(empty prompt / zero features), so classifier-free guidance works at inference.

The reference text of an image is its caption when ``anomalycontrol.captions``
has one (as the official code's MVTec-Caption sentences), else the template of its
type; it is also the prompt the UNet sees in training.

``adapter.scope: category`` trains one adapter per category on its few-shot
images (folder ``<category>-<digest>``); ``all`` trains one on every category's,
once (folder ``all-<digest>``, no category in the key): every category whose base
model is the same (SD2 inpainting) finds it. The tiny preset pretrains one base
per category, so there each base gets its own ``all-`` folder.

Output: ``<dir>/adapter.safetensors`` (IP-Adapter layout, see ``sga.py``) and
``<dir>/adapter.json`` (settings, step, loss, BLIP-2 weights and feature path).
Checkpoints every ``checkpoint_every`` steps save the optimiser moments too, and
per-step seeds derive from (seed, step), so an interrupted run resumes where it
stopped. The moments are kept in safetensors rather than through accelerate's
``save_state``: the loop runs without an ``Accelerator`` (one device, float32),
``save_state`` pickles the optimiser and RNG states, and the RNG state is not
needed because every step's generator is derived from (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionInpaintPipeline
from safetensors.torch import load_file, save_file

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.generators.anomalycontrol.asea import enhanced_features
from anomaly_factory.generators.anomalycontrol.captions import Captions, read_captions
from anomaly_factory.generators.anomalycontrol.csm import (
    TEXT_FROM_TEMPLATE,
    Blip2Encoder,
    Reference,
    load_blip2,
    load_references,
)
from anomaly_factory.generators.anomalycontrol.sga import (
    adapter_parameters,
    adapter_state_dict,
    install_adapter,
    load_adapter_state_dict,
    load_adapter_weights,
)
from anomaly_factory.generators.common import resolve_device
from anomaly_factory.generators.magic import models, training
from anomaly_factory.io import atomic_path, atomic_write_json
from anomaly_factory.manifest import read_images

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "anomalycontrol-sga-v1"


@dataclass
class TrainingData:
    """Everything the loop needs, precomputed once: the base model and the BLIP-2 stay frozen."""

    latents: torch.Tensor  # (n, 4, h, w)
    masked_latents: torch.Tensor  # (n, 4, h, w)
    masks: torch.Tensor  # (n, 1, H, W)
    text_embeds: torch.Tensor  # (n, 77, d)
    empty_embeds: torch.Tensor  # (1, 77, d)
    features: torch.Tensor  # (n, D)


# --------------------------------------------------------------------------- identity
def load_captions(cfg: FactoryConfig) -> Captions | None:
    """``anomalycontrol.captions`` read, or None when not configured."""
    path = cfg.anomalycontrol.captions
    return read_captions(path) if path is not None else None


def checkpoint_dir(
    cfg: FactoryConfig, manifest_path: Path, category: str, blip2_weights: str
) -> Path:
    """``anomalycontrol.out_dir/<category or all>-<hash>``: the hash covers the base
    model, settings, BLIP-2 weights (``Blip2Encoder.weights_hash``), captions and the
    few-shot data; with ``scope: all`` it holds no category, so categories share it."""
    ac = cfg.anomalycontrol
    captions = load_captions(cfg)
    df = read_images(manifest_path)
    scope = ac.adapter.scope
    if scope == "category":
        df = df[df["category"] == category]
    shas = sorted(df.loc[df["split"] == "fewshot", "sha256"].tolist())
    key = {
        "format": FORMAT,
        "scope": scope,
        "category": category if scope == "category" else None,
        "base": models.base_model_id(cfg, category, Path(manifest_path)),
        "resolution": cfg.model.resolution,
        "blip2": ac.blip2.model_dump(mode="json"),
        "blip2_weights": blip2_weights,
        "asea": ac.asea.model_dump(mode="json", exclude={"cache"}),
        "adapter": ac.adapter.model_dump(mode="json", exclude={"checkpoint_every"}),
        "n_tokens": ac.n_tokens,
        "text_template": ac.text_template,
        "captions": captions.digest if captions is not None else None,
        "data": shas,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(ac.out_dir) / f"{category if scope == 'category' else 'all'}-{digest}"


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no AnomalyControl adapter here") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def is_complete(folder: Path) -> bool:
    try:
        return bool(read_meta(folder).get("complete"))
    except (FileNotFoundError, ValueError):
        return False


# --------------------------------------------------------------------------- data
def training_categories(cfg: FactoryConfig, manifest_path: Path, category: str) -> list[str]:
    if cfg.anomalycontrol.adapter.scope == "category":
        return [category]
    df = read_images(manifest_path)
    return sorted(df.loc[df["split"] == "fewshot", "category"].unique().tolist())


def training_references(
    cfg: FactoryConfig, manifest_path: Path, category: str, captions: Captions | None = None
) -> list[Reference]:
    """The few-shot anomaly images the adapter trains on, each its own reference, with
    its caption as reference text when ``captions`` has one (else its type's template)."""
    ac = cfg.anomalycontrol
    refs = []
    for cat in training_categories(cfg, manifest_path, category):
        refs += load_references(
            manifest_path, cat, None, cfg.model.resolution, ac.text_template, captions=captions
        )
    if captions is not None:
        fallback = [r.image_path for r in refs if r.text_source == TEXT_FROM_TEMPLATE]
        if fallback:
            log.warning(
                "captions %s: %d of %d few-shot images have no caption, using "
                "anomalycontrol.text_template for them (e.g. %s)",
                captions.path,
                len(fallback),
                len(refs),
                fallback[:3],
            )
    return refs


@torch.no_grad()
def prepare_data(
    cfg: FactoryConfig,
    pipe: StableDiffusionInpaintPipeline,
    encoder: Blip2Encoder,
    refs: list[Reference],
) -> TrainingData:
    ac = cfg.anomalycontrol
    device, dtype = pipe.unet.device, pipe.unet.dtype
    images = torch.stack([torch.from_numpy(r.image.copy()).permute(2, 0, 1) for r in refs])
    images = (images.float() / 127.5 - 1.0).to(device, dtype)
    masks = torch.stack([torch.from_numpy(r.mask > 0)[None] for r in refs]).float().to(device)
    sf = pipe.vae.config.scaling_factor
    latents = pipe.vae.encode(images).latent_dist.mean * sf
    masked = training.masked_inputs(images, masks.to(dtype))
    masked_latents = pipe.vae.encode(masked).latent_dist.mean * sf
    texts = sorted({r.text for r in refs})
    embeds = {t: training.encode_prompt(pipe, t, 1) for t in texts}
    features, results = enhanced_features(encoder, refs, ac.asea, ac.cache_dir)
    masses = [(r.mass_before, r.mass_after) for r in results if r is not None]
    if masses:
        before, after = np.mean(masses, axis=0)
        log.info("ASEA attention mass inside masks: %.3f -> %.3f", before, after)
    return TrainingData(
        latents=latents,
        masked_latents=masked_latents,
        masks=masks,
        text_embeds=torch.cat([embeds[r.text] for r in refs]),
        empty_embeds=training.encode_prompt(pipe, "", 1),
        features=features.to(device, dtype),
    )


# --------------------------------------------------------------------------- loss
def drop_conditions(
    n: int, drop_text: float, drop_image: float, drop_both: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (n,) masks of dropped text and dropped image: each case with its probability."""
    u = torch.rand(n, generator=gen)
    text_only = u < drop_text
    image_only = (u >= drop_text) & (u < drop_text + drop_image)
    both = (u >= drop_text + drop_image) & (u < drop_text + drop_image + drop_both)
    return text_only | both, image_only | both


def adapter_loss(
    pipe: StableDiffusionInpaintPipeline,
    noise_scheduler: DDPMScheduler,
    data: TrainingData,
    idx: torch.Tensor,
    drop_text: torch.Tensor,
    drop_image: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Inpainting epsilon-MSE with text and semantic tokens through the decoupled attention."""
    unet = pipe.unet
    device = unet.device
    latents = data.latents[idx]
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
    t = t.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    m = training.latent_mask(data.masks[idx], latents.shape[-1]).to(latents.dtype)
    model_input = torch.cat([noisy, m, data.masked_latents[idx]], dim=1)
    text = torch.where(
        drop_text.to(device)[:, None, None], data.empty_embeds, data.text_embeds[idx]
    )
    feats = data.features[idx] * (~drop_image).to(device, latents.dtype)[:, None]
    pred = unet(
        model_input,
        t,
        encoder_hidden_states=text,
        added_cond_kwargs={"image_embeds": [feats[:, None, :]]},
    ).sample
    return F.mse_loss(pred.float(), noise.float())


# --------------------------------------------------------------------------- training
def prepare_pipeline(
    cfg: FactoryConfig, manifest_path: Path, category: str, feature_dim: int
) -> StableDiffusionInpaintPipeline:
    """MAGIC's base pipeline with SGA installed (scale lambda from the config)."""
    pipe = models.load_base_pipeline(cfg, category, manifest_path)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    ac = cfg.anomalycontrol
    with torch.random.fork_rng(devices=[]):  # the projection's init is part of the run's seed
        torch.manual_seed(ac.adapter.seed)
        install_adapter(pipe.unet, feature_dim, ac.n_tokens, ac.scale)
    return pipe


def train_adapter(
    cfg: FactoryConfig,
    manifest_path: Path,
    category: str,
    out_dir: Path | None = None,
    encoder: Blip2Encoder | None = None,
) -> Path:
    """Train SGA for ``category``'s base model; return the folder with the weights.

    A finished folder is returned as is; a partial one resumes from its last
    checkpoint. Training runs in float32 (the adapter's Adam state in half
    precision would underflow).
    """
    ac = cfg.anomalycontrol
    a = ac.adapter
    manifest_path = Path(manifest_path)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32"})})
    device = resolve_device(cfg.model)
    encoder = encoder or load_blip2(ac.blip2, device)
    if out_dir is None:
        out_dir = checkpoint_dir(cfg, manifest_path, category, encoder.weights_hash)
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    captions = load_captions(cfg)
    refs = training_references(cfg, manifest_path, category, captions)
    pipe = prepare_pipeline(cfg, manifest_path, category, encoder.feature_dim)
    data = prepare_data(cfg, pipe, encoder, refs)
    provenance = {
        "blip2_weights": encoder.weights_hash,
        "blip2_features": encoder.features,
        "captions": str(captions.path) if captions is not None else None,
        "captions_sha256": captions.digest if captions is not None else None,
        "categories": sorted({r.category for r in refs}),
        "n_references": len(refs),
    }
    params = adapter_parameters(pipe.unet)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    start = _resume(out_dir, pipe, opt)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    n = data.latents.shape[0]
    pipe.unet.train()
    loss = torch.tensor(float("nan"))
    t0 = time.perf_counter()
    for step in range(start, a.steps):
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (min(a.batch_size, n),), generator=gen)
        drop_text, drop_image = drop_conditions(
            len(idx), a.drop_text, a.drop_image, a.drop_both, gen
        )
        loss = adapter_loss(pipe, noise_scheduler, data, idx, drop_text, drop_image, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        loss = loss.detach()
        done = step + 1
        if done % a.checkpoint_every == 0 and done < a.steps:
            _save(out_dir, cfg, pipe, opt, done, float(loss), complete=False, provenance=provenance)
    pipe.unet.eval()
    log.info("SGA training: %d steps in %.1fs", a.steps - start, time.perf_counter() - t0)
    _save(out_dir, cfg, pipe, None, a.steps, float(loss), complete=True, provenance=provenance)
    return out_dir


def _save(
    folder: Path,
    cfg: FactoryConfig,
    pipe: StableDiffusionInpaintPipeline,
    opt: torch.optim.Optimizer | None,
    step: int,
    loss: float,
    complete: bool,
    provenance: dict | None = None,
) -> None:
    """Weights, optimiser moments (partial runs only), then the JSON meta last."""
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(pipe.unet)
    with atomic_path(folder / ADAPTER_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "step": str(step)})
    if opt is not None:
        moments = {}
        for i, p in enumerate(opt.param_groups[0]["params"]):
            st = opt.state.get(p, {})
            if st:
                moments[f"exp_avg.{i}"] = st["exp_avg"].detach().cpu().contiguous()
                moments[f"exp_avg_sq.{i}"] = st["exp_avg_sq"].detach().cpu().contiguous()
                moments[f"step.{i}"] = torch.as_tensor(st["step"]).float().reshape(1)
        with atomic_path(folder / OPTIMIZER_FILE) as tmp:
            save_file(moments, str(tmp))
    else:
        (folder / OPTIMIZER_FILE).unlink(missing_ok=True)
    ac = cfg.anomalycontrol
    proj = state["image_proj.proj.weight"]
    meta = {
        "format": FORMAT,
        "complete": complete,
        "step": step,
        "loss": loss,
        "n_tokens": ac.n_tokens,
        "feature_dim": int(proj.shape[1]),
        "cross_attention_dim": int(proj.shape[0] // ac.n_tokens),
        "scale": ac.scale,
        "blip2": ac.blip2.pretrained,
        "asea": ac.asea.model_dump(mode="json"),
        "adapter": ac.adapter.model_dump(mode="json"),
        "text_template": ac.text_template,
        "resolution": cfg.model.resolution,
        "preset": cfg.model.preset,
        **(provenance or {}),
    }
    atomic_write_json(folder / META_FILE, meta)


def _resume(folder: Path, pipe: StableDiffusionInpaintPipeline, opt: torch.optim.Optimizer) -> int:
    """The step to continue from: 0, or a partial checkpoint's step with its moments."""
    try:
        meta = read_meta(folder)
    except FileNotFoundError:
        return 0
    load_adapter(pipe, folder)
    moments_path = folder / OPTIMIZER_FILE
    if moments_path.is_file():
        moments = load_file(str(moments_path))
        for i, p in enumerate(opt.param_groups[0]["params"]):
            if f"exp_avg.{i}" in moments:
                opt.state[p] = {
                    "step": moments[f"step.{i}"].reshape(()).to(p.device),
                    "exp_avg": moments[f"exp_avg.{i}"].to(p.device, p.dtype),
                    "exp_avg_sq": moments[f"exp_avg_sq.{i}"].to(p.device, p.dtype),
                }
    log.info("resuming SGA training of %s at step %d", folder, meta["step"])
    return int(meta["step"])


def load_trained_pipeline(
    cfg: FactoryConfig, manifest_path: Path, category: str, folder: Path, feature_dim: int
) -> tuple[StableDiffusionInpaintPipeline, str]:
    """The base pipeline with a finished adapter loaded (:func:`sga.load_adapter_weights`:
    diffusers' ``load_ip_adapter`` for 4 tokens) at lambda ``anomalycontrol.scale``;
    also which loader was used."""
    ac = cfg.anomalycontrol
    pipe = models.load_base_pipeline(cfg, category, manifest_path)
    pipe.set_progress_bar_config(disable=True)
    how = load_adapter_weights(
        pipe, Path(folder) / ADAPTER_FILE, feature_dim, ac.n_tokens, ac.scale
    )
    return pipe, how


def load_adapter(pipe: StableDiffusionInpaintPipeline, folder: Path) -> dict:
    """Load SGA weights into a pipeline that has the adapter installed (resuming); return meta."""
    meta = read_meta(folder)
    state = load_file(str(Path(folder) / ADAPTER_FILE))
    load_adapter_state_dict(pipe.unet, state)
    return meta
