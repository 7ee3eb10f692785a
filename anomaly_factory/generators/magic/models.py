"""Model presets of MAGIC's backbone: SD2 inpainting (``paper``) and a tiny stand-in (``tiny``).

Both presets give a :class:`diffusers.StableDiffusionInpaintPipeline` whose UNet
takes MAGIC's 9 input channels (CONTEXT §1): the noisy latent (4), the mask on
the latent grid (1) and the latent of the masked image (4). ``sd2_inpainting``
loads ``stabilityai/stable-diffusion-2-inpainting`` (or a local folder in the
same diffusers layout); ``tiny`` builds the same components from small configs
and briefly pretrains them on a category's normal images, standing in for
SD2's own pretraining so that CPU demos produce images rather than noise.

>>> from anomaly_factory.config import FactoryConfig
>>> cfg = FactoryConfig()
>>> pipe = build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)
>>> pipe.unet.config.in_channels
9
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from anomaly_factory.config import (
    FactoryConfig,
    FinetuneSection,
    ModelSection,
    SchedulerSection,
    TinyModelSection,
)
from anomaly_factory.errors import InputError
from anomaly_factory.generators.common import resolve_device, resolve_dtype, resolve_path
from anomaly_factory.manifest import read_images, select

log = logging.getLogger(__name__)

MAX_TOKENS = 77  # CLIP's context length, as in SD
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_SUBDIR = "tiny"


# --------------------------------------------------------------------------- tiny components
def ddim_scheduler(scheduler: SchedulerSection) -> DDIMScheduler:
    """MAGIC's sampler settings (CONTEXT §1): scaled-linear betas, eps, steps_offset 1."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=scheduler.beta_start,
        beta_end=scheduler.beta_end,
        beta_schedule=scheduler.beta_schedule,
        steps_offset=scheduler.steps_offset,
        prediction_type=scheduler.prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def tokenizer_words(finetune: FinetuneSection, tiny: TinyModelSection) -> list[str]:
    """Whole words the tiny tokenizer knows, anomaly token first so it is one token."""
    words = [finetune.anomaly_token, *finetune.prompt.split(), *tiny.pretrain_prompt.split()]
    words += tiny.vocab_words
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w.lower(), None)
    return list(seen)


def build_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over letters, digits and ``words`` (each merged to one token).

    transformers 5 ignores ``vocab_file=``, so the vocabulary and merges are passed in
    memory. Characters outside ``[a-z0-9]`` map to the unknown token.
    """
    chars = string.ascii_lowercase + string.digits
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        if not word or any(c not in chars for c in word):
            raise InputError(f"tokenizer word {word!r}: only [a-z0-9] words are supported")
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = MAX_TOKENS
    return tok


def build_tiny_text_encoder(tiny: TinyModelSection, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.text_hidden_size,
        intermediate_size=4 * tiny.text_hidden_size,
        num_hidden_layers=tiny.text_layers,
        num_attention_heads=tiny.text_heads,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=tiny.text_hidden_size,
    )
    return CLIPTextModel(config)


def build_tiny_vae(tiny: TinyModelSection, resolution: int) -> AutoencoderKL:
    n = len(tiny.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(tiny.vae_channels),
        layers_per_block=tiny.vae_layers_per_block,
        latent_channels=tiny.latent_channels,
        norm_num_groups=tiny.norm_num_groups,
        sample_size=resolution,
        mid_block_add_attention=tiny.vae_mid_attention,
    )


def build_tiny_unet(tiny: TinyModelSection, sample_size: int) -> UNet2DConditionModel:
    """SD-style UNet: cross-attention in every level but the deepest, 9 input channels."""
    n = len(tiny.unet_channels)
    attn = tiny.unet_cross_attention
    if attn is None:
        attn = [True] * (n - 1) + [False] if n > 1 else [True]
    if len(attn) != n:
        raise InputError(
            f"model.tiny.unet_cross_attention: {len(attn)} entries for "
            f"{n} levels of model.tiny.unet_channels"
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=2 * tiny.latent_channels + 1,
        out_channels=tiny.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(tiny.unet_channels),
        layers_per_block=tiny.unet_layers_per_block,
        cross_attention_dim=tiny.cross_attention_dim,
        attention_head_dim=tiny.attention_head_dim,
        norm_num_groups=tiny.norm_num_groups,
        use_linear_projection=True,  # as SD2
    )


def _check_tiny(model: ModelSection) -> None:
    tiny = model.tiny
    for field in ("vae_channels", "unet_channels"):
        for c in getattr(tiny, field):
            if c % tiny.norm_num_groups:
                raise InputError(
                    f"model.tiny.{field}: {c} is not divisible by "
                    f"model.tiny.norm_num_groups {tiny.norm_num_groups}"
                )
    factor = 2 ** (len(tiny.vae_channels) - 1)
    if model.resolution % (factor * 2 ** (len(tiny.unet_channels) - 1)):
        raise InputError(
            f"model.resolution: {model.resolution} is not divisible by the VAE and UNet "
            f"downsampling ({factor} x {2 ** (len(tiny.unet_channels) - 1)})"
        )
    if tiny.text_hidden_size != tiny.cross_attention_dim:
        raise InputError(
            f"model.tiny.cross_attention_dim: {tiny.cross_attention_dim} must equal "
            f"model.tiny.text_hidden_size {tiny.text_hidden_size}"
        )


def build_tiny_pipeline(
    model: ModelSection, finetune: FinetuneSection, scheduler: SchedulerSection
) -> StableDiffusionInpaintPipeline:
    """The ``tiny`` preset with random weights (deterministic under ``torch.manual_seed``)."""
    _check_tiny(model)
    tiny = model.tiny
    tokenizer = build_tokenizer(tokenizer_words(finetune, tiny))
    text_encoder = build_tiny_text_encoder(tiny, tokenizer)
    vae = build_tiny_vae(tiny, model.resolution)
    unet = build_tiny_unet(tiny, _latent_size(model))
    return StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- image loading
def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB image as a (3, size, size) tensor in [-1, 1] (SD's input range)."""
    from anomaly_factory.images import read_rgb, rgb_to_tensor

    return rgb_to_tensor(read_rgb(path, size, "bicubic"))


def load_mask(path: Path, size: int) -> torch.Tensor:
    """Binary (1, size, size) float mask of a dataset's ground truth (any non-zero is defect)."""
    from anomaly_factory.images import read_mask

    return torch.from_numpy(read_mask(path, size, source="dataset").astype(np.float32))[None]


def masked_inputs(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The masked image the inpainting UNet sees: defect pixels zeroed, as the pipeline does."""
    return images * (masks < 0.5)


def latent_mask(
    masks: torch.Tensor, latent_size: int, mode: str = "nearest", min_coverage: float = 0.0
) -> torch.Tensor:
    """Mask on the latent grid: ``nearest`` as ``StableDiffusionInpaintPipeline`` does, or
    ``coverage`` (``generate.latent_mask``), made by the sampler's one implementation."""
    from anomaly_factory.generators.magic.sampler import latent_mask as on_grid

    return on_grid(masks, latent_size, mode, min_coverage)


# --------------------------------------------------------------------------- tiny pretraining
def random_box_masks(
    n: int, size: int, max_frac: float, generator: torch.Generator
) -> torch.Tensor:
    """``n`` random axis-aligned rectangles, (n, 1, size, size) in {0, 1}."""
    out = torch.zeros(n, 1, size, size)
    lo = max(1, size // 16)
    hi = max(lo + 1, int(size * max_frac))
    for i in range(n):
        h, w = torch.randint(lo, hi + 1, (2,), generator=generator).tolist()
        y = int(torch.randint(0, size - h + 1, (1,), generator=generator))
        x = int(torch.randint(0, size - w + 1, (1,), generator=generator))
        out[i, :, y : y + h, x : x + w] = 1.0
    return out


def draw_ellipse(canvas: np.ndarray, rng: np.random.Generator, c: tuple[int, int], r: int) -> None:
    """A filled ellipse of half-axis ``r`` at ``c``, random aspect and angle, drawn as 1s."""
    import cv2

    axes = (r, max(1, int(r * rng.uniform(0.3, 1.0))))
    cv2.ellipse(canvas, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)


def draw_stroke(
    canvas: np.ndarray, rng: np.random.Generator, c: tuple[int, int], r: int, max_width: int
) -> None:
    """A brush stroke of 1-4 bending segments of length ``r`` from ``c``, drawn as 1s."""
    import cv2

    pts = [c]
    a = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(1, 5))):
        a += rng.uniform(-1, 1)
        pts.append((int(pts[-1][0] + r * np.cos(a)), int(pts[-1][1] + r * np.sin(a))))
    cv2.polylines(canvas, [np.array(pts, np.int32)], False, 1, int(rng.integers(1, max_width + 1)))


def random_inpaint_masks(
    n: int, size: int, max_frac: float, generator: torch.Generator
) -> torch.Tensor:
    """``n`` random masks, (n, 1, size, size) in {0, 1}: boxes, ellipses and brush strokes.

    Boxes alone taught the tiny UNet nothing about thin or round regions, which is
    what the mask generator produces (scratches, cracks, spots).
    """
    boxes = random_box_masks(n, size, max_frac, generator)
    seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        kind = int(rng.integers(3))
        if kind == 0:
            continue
        m = np.zeros((size, size), np.uint8)
        c = (int(rng.integers(size)), int(rng.integers(size)))
        r = max(2, int(rng.uniform(0.04, max_frac / 2) * size))
        if kind == 1:
            draw_ellipse(m, rng, c, r)
        else:
            draw_stroke(m, rng, c, r, max_width=4)
        boxes[i, 0] = torch.from_numpy(m.astype(np.float32))
    return boxes


def encode_prompt(pipe: StableDiffusionInpaintPipeline, prompt: str, n: int) -> torch.Tensor:
    """Text-encoder output (n, 77, dim) for a prompt, through the pipeline's own encoder."""
    embeds, _ = pipe.encode_prompt(
        prompt, pipe.text_encoder.device, n, do_classifier_free_guidance=False
    )
    return embeds


def pretrain_tiny(
    pipe: StableDiffusionInpaintPipeline,
    images: torch.Tensor,
    tiny: TinyModelSection,
    device: torch.device,
    show_progress: bool = False,
    masks: torch.Tensor | None = None,
) -> dict[str, float]:
    """Train the autoencoder, then the UNet's inpainting, on a category's normal images.

    Stands in for SD2's pretraining (from random weights, ``base: scratch``) or adapts
    the bundled base to the category (``base: bundled``: its decoder only, so the
    latent space stays the one its UNet knows); see ``pretrain.py``. The VAE stays
    deterministic and its ``scaling_factor`` is 1/std of the latents. ``masks``
    ((N, 1, H, W), the few-shot defects; zeros for normals) weigh the decoder
    adaptation by ``pretrain_defect_weight``. Returns the final losses.
    """
    from anomaly_factory.generators.magic import pretrain

    if tiny.base == "scratch":
        return _pretrain_from_scratch(pipe, images, tiny, device, show_progress)
    gen = torch.Generator().manual_seed(tiny.seed)
    pipe.vae.to(device)
    pipe.unet.to(device)
    pipe.text_encoder.to(device)
    bs = tiny.pretrain_batch_size
    with _progress(show_progress) as progress:
        if tiny.base == "scratch":
            vae_loss = pretrain.train_autoencoder(
                pipe.vae,
                images,
                tiny.pretrain_vae_steps,
                tiny.pretrain_lr,
                bs,
                tiny.pretrain_crop,
                gen,
                progress,
            )
            pretrain.make_deterministic(pipe.vae)
            pretrain.set_latent_scale(pipe.vae, images)
        else:  # the bundled base's latent space is what its UNet knows: adapt the decoder only
            weights = None
            if masks is not None and tiny.pretrain_defect_weight != 1.0:
                weights = pretrain.defect_weights(masks, tiny.pretrain_defect_weight)
            vae_loss = pretrain.adapt_decoder(
                pipe.vae,
                images,
                tiny.pretrain_vae_steps,
                tiny.pretrain_lr,
                bs,
                tiny.pretrain_crop,
                gen,
                progress,
                weights,
                tiny.pretrain_bf16_autocast,
            )
        unet_loss = pretrain.train_inpainting(
            pipe,
            images,
            tiny.pretrain_unet_steps,
            tiny.pretrain_lr,
            bs,
            tiny.pretrain_mask_max,
            tiny.pretrain_prompt,
            gen,
            progress,
        )
    pipe.text_encoder.requires_grad_(False)
    return {"vae_loss": vae_loss, "unet_loss": unet_loss}


def _batch(images: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, len(images), (n,), generator=generator)
    batch = images[idx]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def _pretrain_from_scratch(
    pipe: StableDiffusionInpaintPipeline,
    images: torch.Tensor,
    tiny: TinyModelSection,
    device: torch.device,
    show_progress: bool = False,
) -> dict[str, float]:
    """VAE reconstruction, then UNet inpainting of random boxes on normal images.

    Stands in for SD2's pretraining: the UNet learns to inpaint a category's
    normal appearance from ``[noisy latents, mask, masked-image latents]``, the
    same input that MAGIC's fine-tuning and sampler use. Sets the VAE's
    ``scaling_factor`` to 1/std of the latents, as SD chose 0.18215 for its VAE.
    Returns the final losses.
    """
    gen = torch.Generator().manual_seed(tiny.seed)
    images = images.to(device)
    vae, unet = pipe.vae.to(device), pipe.unet.to(device)
    pipe.text_encoder.to(device)
    bs = tiny.pretrain_batch_size
    losses = {"vae_loss": float("nan"), "unet_loss": float("nan")}

    with _progress(show_progress) as progress:
        opt = torch.optim.AdamW(vae.parameters(), lr=tiny.pretrain_lr)
        vae.train()
        task = progress.add_task("pretrain VAE", total=tiny.pretrain_vae_steps)
        for _ in range(tiny.pretrain_vae_steps):
            x = _batch(images, bs, gen)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * _randn(posterior.mean.shape, gen, device)
            recon = vae.decode(z).sample
            loss = F.mse_loss(recon, x) + tiny.pretrain_kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses["vae_loss"] = float(loss.detach())
            progress.advance(task)
        vae.eval().requires_grad_(False)

        with torch.no_grad():
            std = float(vae.encode(images).latent_dist.mean.std())
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
        sf = vae.config.scaling_factor

        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        with torch.no_grad():
            cond = encode_prompt(pipe, tiny.pretrain_prompt, 1)
        opt = torch.optim.AdamW(unet.parameters(), lr=tiny.pretrain_lr)
        unet.train()
        size = images.shape[-1]
        task = progress.add_task("pretrain UNet", total=tiny.pretrain_unet_steps)
        for _ in range(tiny.pretrain_unet_steps):
            x = _batch(images, bs, gen)
            masks = random_inpaint_masks(bs, size, tiny.pretrain_mask_max, gen).to(device)
            with torch.no_grad():
                both = vae.encode(torch.cat([x, masked_inputs(x, masks)])).latent_dist.mean * sf
            latents, masked_latents = both.chunk(2)
            loss = inpainting_loss(unet, noise_scheduler, latents, masks, masked_latents, cond, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            losses["unet_loss"] = float(loss.detach())
            progress.advance(task)
    unet.eval().requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return losses


def _randn(shape: torch.Size, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Noise drawn on the CPU generator, so runs match across devices and resumes."""
    return torch.randn(shape, generator=gen).to(device)


def inpainting_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    masks: torch.Tensor,
    masked_latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    gen: torch.Generator,
    mask_weight: float = 1.0,
    mask_mode: str = "nearest",
    min_coverage: float = 0.0,
) -> torch.Tensor:
    """Epsilon-prediction MSE of the inpainting UNet (diffusers' DreamBooth-inpaint objective).

    The UNet input is ``[noisy latents, mask, masked-image latents]`` (9 channels);
    ``masks`` are at image resolution and resized to the latent grid here. With
    ``mask_weight`` w > 1 the squared error on the mask's latent cells counts w
    times (normalised by the mean weight): a defect covering 2% of a few-shot image
    otherwise contributes 2% of the gradient, and a small model needs many more
    steps to learn it. w = 1 is the paper's plain MSE. ``mask_mode`` puts the mask on
    the latent grid as the sampler does (``generate.latent_mask``), so a thin defect
    is trained on the cells it is generated in.
    """
    n = latents.shape[0]
    device = latents.device
    noise = _randn(latents.shape, gen, device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
    t = t.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    m = latent_mask(masks, latents.shape[-1], mask_mode, min_coverage).to(latents.dtype)
    model_input = torch.cat([noisy, m, masked_latents], dim=1)
    if encoder_hidden_states.shape[0] != n:
        encoder_hidden_states = encoder_hidden_states.expand(n, -1, -1)
    pred = unet(model_input, t, encoder_hidden_states=encoder_hidden_states).sample
    if mask_weight == 1.0:
        return F.mse_loss(pred.float(), noise.float())
    weight = 1.0 + (mask_weight - 1.0) * m.float()
    return (weight * (pred.float() - noise.float()) ** 2).mean() / weight.mean()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


# --------------------------------------------------------------------------- tiny cache
def tiny_cache_dir(cfg: FactoryConfig, category: str, manifest_path: Path) -> Path:
    """``cache_dir/tiny/<category>-<hash of model config + pretraining images>``."""
    df = pretrain_rows(manifest_path, category, cfg.model.tiny.base == "bundled")
    key = {
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir", "device", "pretrained"}),
        "words": tokenizer_words(cfg.finetune, cfg.model.tiny),
        "scheduler": cfg.generate.scheduler.model_dump(mode="json"),
        "data": sorted(df["sha256"].tolist()),
        "base": _base_digest(cfg),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.model.cache_dir) / TINY_SUBDIR / f"{category}-{digest}"


def _base_digest(cfg: FactoryConfig) -> str | None:
    """The bundled base's weights digest (its folder name), or None from scratch."""
    if cfg.model.tiny.base == "scratch":
        return None
    from anomaly_factory.generators.magic.tiny_base import bundled_folder

    return bundled_folder(cfg.model.tiny.base_folder).name


def tiny_start(cfg: FactoryConfig) -> StableDiffusionInpaintPipeline:
    """The weights a category's tiny model starts from: the bundled base, or random ones."""
    if cfg.model.tiny.base == "scratch":
        return build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)
    from anomaly_factory.generators.magic.tiny_base import (
        bundled_folder,
        check_shapes,
        verify_digest,
    )

    folder = bundled_folder(cfg.model.tiny.base_folder)
    check_shapes(cfg, folder)
    verify_digest(folder)
    cpu = cfg.model.model_copy(update={"device": "cpu", "dtype": "float32"})
    pipe = from_folder(folder, cpu, cfg.generate.scheduler)
    pipe.unet.register_to_config(sample_size=_latent_size(cfg.model))
    pipe.vae.register_to_config(sample_size=cfg.model.resolution)
    return pipe


def _latent_size(model: ModelSection) -> int:
    return model.resolution // 2 ** (len(model.tiny.vae_channels) - 1)


def pretrain_rows(manifest_path: Path, category: str, with_fewshot: bool) -> pd.DataFrame:
    """The images a category's tiny model is pretrained on: its ``train`` normals and its
    few-shot anomalies (every type's; the fine-tuning data, never a test image), so the
    decoder learns the defects' colours as well as the object's."""
    images = read_images(manifest_path)
    train = select(images, category=category, split="train")
    if train.empty:
        raise InputError(f"{manifest_path}: no 'train' images for category {category!r}")
    if not with_fewshot:
        return train
    return pd.concat([train, select(images, category=category, split="fewshot")])


def train_images(
    manifest_path: Path, category: str, size: int, with_fewshot: bool = False
) -> torch.Tensor:
    df = pretrain_rows(manifest_path, category, with_fewshot)
    paths = [resolve_path(p, manifest_path) for p in df["image_path"]]
    return torch.stack([load_image(p, size) for p in paths])


def train_masks(
    manifest_path: Path, category: str, size: int, with_fewshot: bool = False
) -> torch.Tensor:
    """The defect masks of :func:`train_images`' rows (all zeros for a normal image)."""
    df = pretrain_rows(manifest_path, category, with_fewshot)
    empty = torch.zeros(1, size, size)
    return torch.stack(
        [
            load_mask(resolve_path(p, manifest_path), size) if isinstance(p, str) and p else empty
            for p in df["mask_path"]
        ]
    )


def pretrained_tiny_pipeline(
    cfg: FactoryConfig, category: str, manifest_path: Path, show_progress: bool = False
) -> Path:
    """Build and pretrain the category's tiny model unless cached; return its folder.

    The cache is written to a temporary folder and renamed into place, so an
    interrupted pretraining never leaves a half-written model behind.
    """
    target = tiny_cache_dir(cfg, category, manifest_path)
    if (target / "model_index.json").is_file():
        return target
    device = resolve_device(cfg.model)
    torch.manual_seed(cfg.model.tiny.seed)
    pipe = tiny_start(cfg)
    bundled = cfg.model.tiny.base == "bundled"
    images = train_images(manifest_path, category, cfg.model.resolution, bundled)
    masks = train_masks(manifest_path, category, cfg.model.resolution, bundled)
    losses = pretrain_tiny(pipe, images, cfg.model.tiny, device, show_progress, masks)
    log.info("tiny pretraining of %s: %s", category, losses)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps(losses, sort_keys=True) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- loading
def from_folder(
    folder: str | Path, model: ModelSection, scheduler: SchedulerSection
) -> StableDiffusionInpaintPipeline:
    """Load a diffusers inpainting folder (or hub id), switch to DDIM, move to device/dtype.

    The same call serves the full SD2-inpainting checkpoint and the tiny cache,
    which is saved in the same layout (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, model_index.json).
    """
    device = resolve_device(model)
    dtype = resolve_dtype(model, device)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(folder),
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config,
        beta_start=scheduler.beta_start,
        beta_end=scheduler.beta_end,
        beta_schedule=scheduler.beta_schedule,
        steps_offset=scheduler.steps_offset,
        prediction_type=scheduler.prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_base_pipeline(
    cfg: FactoryConfig,
    category: str | None = None,
    manifest_path: Path | None = None,
) -> StableDiffusionInpaintPipeline:
    """The preset's pipeline: SD2 inpainting from ``model.pretrained``, or the category's
    pretrained tiny model (built and pretrained on its ``train`` images if not cached)."""
    if cfg.model.preset == "sd2_inpainting":
        return from_folder(cfg.model.pretrained, cfg.model, cfg.generate.scheduler)
    if category is None or manifest_path is None:
        raise InputError("model.preset 'tiny' needs a category and an image manifest to pretrain")
    folder = pretrained_tiny_pipeline(cfg, category, Path(manifest_path))
    return from_folder(folder, cfg.model, cfg.generate.scheduler)


def base_model_id(cfg: FactoryConfig, category: str | None, manifest_path: Path | None) -> str:
    """What identifies the base weights: the hub id / folder, or the tiny cache folder."""
    if cfg.model.preset == "sd2_inpainting":
        return cfg.model.pretrained
    if category is None or manifest_path is None:
        raise InputError("model.preset 'tiny' needs a category and an image manifest")
    return str(tiny_cache_dir(cfg, category, Path(manifest_path)))
