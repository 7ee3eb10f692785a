"""Per-type DreamBooth-inpainting fine-tuning with Gaussian prompt perturbation (MAGIC §3.1-3.2).

One fine-tune per (category, anomaly type) on that type's ``fewshot`` images and
masks. The UNet learns to inpaint the anomaly region given the image with that
region masked out (``[noisy latents, mask, masked-image latents]``, epsilon
target, ``DDPMScheduler.add_noise``), prompted with ``a photo of sks defect``.
The text encoder and VAE stay frozen; GPP adds fresh N(0, sigma^2) noise to the
encoded prompt every step. No prior-preservation loss, as in the official code.

Training is resumable: ``train_state-<step>/`` holds the trainable weights, the
optimizer and the state of the one generator that draws every random number,
so an interrupted and resumed run reaches exactly the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.generators.magic.checkpoints import (
    clear_train_state,
    load_train_state,
    read_meta,
    save_checkpoint,
    save_train_state,
)
from anomaly_factory.generators.magic.gpp import (
    anomaly_token_positions,
    gaussian_prompt_perturbation,
)
from anomaly_factory.generators.magic.models import base_model_id, resolve_device, resolve_path
from anomaly_factory.generators.magic.pretrain import _progress
from anomaly_factory.generators.magic.training import (
    encode_prompt,
    inpainting_loss,
    load_image,
    load_mask,
    masked_inputs,
)
from anomaly_factory.io import sha256_file
from anomaly_factory.manifest import read_images, select

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's attention projections


@dataclass
class FewshotLatents:
    """VAE posteriors of the few-shot images and of the same images with the defect masked out.

    The VAE is frozen, so encoding once and sampling each step equals encoding each step.
    """

    mean: torch.Tensor
    std: torch.Tensor
    masked_mean: torch.Tensor
    masked_std: torch.Tensor
    masks: torch.Tensor


def load_fewshot(
    manifest_path: Path, category: str, anomaly_type: str, size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Few-shot images in [-1, 1], their binary masks, and content hashes of both."""
    df = select(read_images(manifest_path), category, anomaly_type, "fewshot")
    if df.empty:
        raise InputError(
            f"{manifest_path}: no 'fewshot' images for category {category!r}, "
            f"anomaly_type {anomaly_type!r}"
        )
    image_paths = [resolve_path(p, manifest_path) for p in df["image_path"]]
    mask_paths = [resolve_path(p, manifest_path) for p in df["mask_path"]]
    images = torch.stack([load_image(p, size) for p in image_paths])
    masks = torch.stack([load_mask(p, size) for p in mask_paths])
    hashes = [*df["sha256"].tolist(), *(sha256_file(p) for p in mask_paths)]
    return images, masks, hashes


def encode_fewshot(
    pipe: StableDiffusionInpaintPipeline, images: torch.Tensor, masks: torch.Tensor
) -> FewshotLatents:
    vae = pipe.vae
    x = images.to(vae.device, vae.dtype)
    m = masks.to(vae.device, vae.dtype)
    with torch.no_grad():
        full = vae.encode(x).latent_dist
        masked = vae.encode(masked_inputs(x, m)).latent_dist
    return FewshotLatents(
        mean=full.mean.float(),
        std=full.std.float(),
        masked_mean=masked.mean.float(),
        masked_std=masked.std.float(),
        masks=masks.to(vae.device).float(),
    )


def training_key(
    cfg: FactoryConfig, base_model: str, category: str, anomaly_type: str, data: list[str]
) -> str:
    """Hash of everything that determines the trained weights (not where or how often we save)."""
    key = {
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir", "device"}),
        "finetune": cfg.finetune.model_dump(
            mode="json", exclude={"out_dir", "checkpoint_every", "keep_train_state", "log_every"}
        ),
        "scheduler": cfg.generate.scheduler.model_dump(mode="json"),
        "base_model": base_model,
        "category": category,
        "anomaly_type": anomaly_type,
        "data": data,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def add_lora(unet, rank: int) -> None:
    """Freeze the UNet and attach a peft LoRA to its attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    )


def finetune(
    cfg: FactoryConfig,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    out_dir: Path,
    max_steps: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Fine-tune the preset's UNet on one anomaly type; return the checkpoint folder.

    ``max_steps`` stops early at that global step (state is saved, so a later
    call continues). A folder whose ``checkpoint.json`` already records
    ``finetune.steps`` steps under the same training key is returned as is.
    """
    ft = cfg.finetune
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    target_steps = ft.steps
    stop = target_steps if max_steps is None else min(max_steps, target_steps)

    images, masks, data = load_fewshot(manifest_path, category, anomaly_type, ft.resolution)
    base = base_model_id(cfg, category, manifest_path)
    key = training_key(cfg, base, category, anomaly_type, data)
    meta = read_meta(out_dir)
    if meta and meta.get("config_hash") == key and meta.get("steps", 0) >= stop:
        log.info("%s: already fine-tuned (%d steps)", out_dir, meta["steps"])
        return out_dir

    from anomaly_factory.generators.magic.models import load_base_pipeline

    pipe = load_base_pipeline(cfg, category, manifest_path)
    device = resolve_device(cfg.model)
    fewshot = encode_fewshot(pipe, images, masks)
    with torch.no_grad():
        prompt_embeds = encode_prompt(pipe, ft.prompt, 1).float()
    positions = None
    if ft.gpp.target == "anomaly_token":
        positions = anomaly_token_positions(pipe.tokenizer, ft.prompt, ft.anomaly_token)

    torch.manual_seed(ft.seed)  # LoRA initialisation
    unet = pipe.unet.to(device)
    if unet.dtype != torch.float32:  # train fp32 master weights; autocast does half math
        unet = unet.to(dtype=torch.float32)
    if ft.save == "lora":
        add_lora(unet, ft.lora_rank)
    else:
        unet.requires_grad_(True)
    if ft.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        list(trainable.values()), lr=ft.lr, weight_decay=ft.weight_decay
    )  # constant lr: no scheduler (the paper's setting)
    gen = torch.Generator().manual_seed(ft.seed)
    step = 0

    state = load_train_state(out_dir, key)
    if state is not None:
        missing = set(trainable) - set(state.trainable)
        if missing:
            raise InputError(f"{out_dir}: resume state lacks parameters {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state.trainable[name])
        optimizer.load_state_dict(state.optimizer)
        gen.set_state(state.rng)
        step = state.step
        log.info("%s: resuming at step %d", out_dir, step)
    resumed_from = step

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sf = pipe.vae.config.scaling_factor
    autocast = torch.autocast(
        device.type,
        dtype=pipe.vae.dtype,
        enabled=device.type == "cuda" and pipe.vae.dtype != torch.float32,
    )
    unet.train()
    n = len(images)
    loss_value = float("nan")
    with _progress(show_progress) as progress:
        task = progress.add_task(f"finetune {category}/{anomaly_type}", total=stop, completed=step)
        while step < stop:
            idx = torch.randint(0, n, (ft.batch_size,), generator=gen)
            with autocast:
                loss = fewshot_batch_loss(
                    unet,
                    noise_scheduler,
                    fewshot,
                    idx,
                    prompt_embeds,
                    ft.gpp.sigma,
                    positions,
                    sf,
                    gen,
                    ft.mask_loss_weight,
                    ft.latent_mask,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), ft.grad_clip)
            optimizer.step()
            step += 1
            loss_value = float(loss.detach())
            progress.update(task, advance=1, description=f"finetune loss {loss_value:.4f}")
            if step % ft.log_every == 0:
                log.info("%s/%s step %d loss %.5f", category, anomaly_type, step, loss_value)
            if step % ft.checkpoint_every == 0 or step == stop:
                save_train_state(out_dir, step, key, trainable, optimizer, gen)

    unet.eval()
    meta = {
        "base_model": base,
        "preset": cfg.model.preset,
        "config_hash": key,
        "steps": step,
        "resumed_from": resumed_from,  # this call trained steps - resumed_from
        "target_steps": target_steps,
        "complete": step >= target_steps,
        "sigma": ft.gpp.sigma,
        "target": ft.gpp.target,
        "prompt": ft.prompt,
        "anomaly_token": ft.anomaly_token,
        "category": category,
        "anomaly_type": anomaly_type,
        "resolution": ft.resolution,
        "last_loss": loss_value,
    }
    save_checkpoint(unet, out_dir, meta)
    if step >= target_steps and not ft.keep_train_state:
        clear_train_state(out_dir)
    return out_dir


def fewshot_batch_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    fewshot: FewshotLatents,
    idx: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigma: float,
    positions: torch.Tensor | None,
    scaling_factor: float,
    gen: torch.Generator,
    mask_weight: float = 1.0,
    mask_mode: str = "nearest",
    min_coverage: float = 0.0,
) -> torch.Tensor:
    """One fine-tuning batch's loss: posterior samples of the cached few-shot latents,
    GPP on the prompt, then the inpainting objective (what ``bench/finetune.py`` times)."""
    latents = _sample(fewshot.mean[idx], fewshot.std[idx], gen) * scaling_factor
    masked = _sample(fewshot.masked_mean[idx], fewshot.masked_std[idx], gen) * scaling_factor
    cond = gaussian_prompt_perturbation(
        prompt_embeds.expand(len(idx), -1, -1), sigma, positions, gen
    )
    return inpainting_loss(
        unet,
        noise_scheduler,
        latents,
        fewshot.masks[idx],
        masked,
        cond,
        gen,
        mask_weight,
        mask_mode,
        min_coverage,
    )


def _sample(mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Posterior sample with noise from the CPU generator (device-independent, resumable)."""
    return mean + std * torch.randn(mean.shape, generator=gen).to(mean.device)


def fewshot_loss(
    pipe: StableDiffusionInpaintPipeline,
    cfg: FactoryConfig,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    seed: int = 0,
    repeats: int = 4,
) -> float:
    """Mean training objective of ``pipe``'s UNet on one type's few-shot set, under a fixed seed.

    Uses the un-perturbed prompt, so two UNets are compared on identical noise and timesteps.
    """
    ft = cfg.finetune
    images, masks, _ = load_fewshot(Path(manifest_path), category, anomaly_type, ft.resolution)
    fewshot = encode_fewshot(pipe, images, masks)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sf = pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    with torch.no_grad():
        cond = encode_prompt(pipe, ft.prompt, 1).to(unet.dtype)
        total = 0.0
        for _ in range(repeats):
            latents = _sample(fewshot.mean, fewshot.std, gen) * sf
            masked_latents = _sample(fewshot.masked_mean, fewshot.masked_std, gen) * sf
            total += float(
                inpainting_loss(
                    unet,
                    noise_scheduler,
                    latents.to(unet.dtype),
                    fewshot.masks,
                    masked_latents.to(unet.dtype),
                    cond,
                    gen,
                )
            )
    return total / repeats
