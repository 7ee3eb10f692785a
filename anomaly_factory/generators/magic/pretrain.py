"""Pretraining loops of the tiny inpainting model: its autoencoder, then its UNet.

SD2 inpainting comes pretrained; the ``tiny`` preset has to make its own stand-in.
Two loops serve both the bundled base (``tiny_base.py``, built once offline) and
the per-category pretraining on a category's normal images (:func:`pretrain_tiny`,
called by ``models.py``'s cache):

* :func:`train_autoencoder` trains the VAE as a deterministic autoencoder on
  random crops (the encoder's mean is decoded, as SD's VAE is used at sampling
  time), then :func:`make_deterministic` pins its posterior variance near zero, so
  diffusers' ``latent_dist.sample()`` returns the mean. With the KL objective and
  posterior sampling a small VAE's std stayed near 0.9 and its latents were mostly
  noise (bench/RESULTS.md (h)).
* :func:`train_inpainting` trains the 9-channel UNet to inpaint random masks of the
  images from ``[noisy latents, mask, masked-image latents]``, the input MAGIC's
  fine-tuning and sampler use.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionInpaintPipeline

from anomaly_factory.config import TinyModelSection
from anomaly_factory.generators.magic.precision import cpu_bf16_autocast
from anomaly_factory.generators.magic.sampler import latent_mask
from anomaly_factory.generators.magic.training import (
    _randn,
    encode_prompt,
    inpainting_loss,
    masked_inputs,
)

LOGVAR_MIN = -30.0  # diffusers clamps the log-variance here: std = 3e-7
L1_WEIGHT = 0.1  # a little L1 keeps flat colours exact where MSE tolerates a tint


def random_batch(
    images: torch.Tensor, n: int, gen: torch.Generator, crop: int | None = None
) -> torch.Tensor:
    """``n`` random images (horizontally flipped at random), cropped to ``crop`` px."""
    idx = torch.randint(0, len(images), (n,), generator=gen)
    batch = images[idx]
    flip = torch.rand(n, generator=gen) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    size = images.shape[-1]
    if crop is None or crop >= size:
        return batch
    y, x = torch.randint(0, size - crop + 1, (2,), generator=gen).tolist()
    return batch[..., y : y + crop, x : x + crop]


def _lr_schedule(opt: torch.optim.Optimizer, lr: float, steps: int):
    """One-cycle: a short warm-up, then cosine decay (small models train noisily at a fixed lr)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05
    )


def train_autoencoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    crop: int | None,
    gen: torch.Generator,
    progress=None,
) -> float:
    """Reconstruct ``images`` ((N, 3, H, W) in [-1, 1]) through the encoder's mean; last loss."""
    if steps == 0:
        return float("nan")
    device = next(vae.parameters()).device
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = _lr_schedule(opt, lr, steps)
    vae.train().requires_grad_(True)
    task = progress.add_task("pretrain VAE", total=steps) if progress else None
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = random_batch(images, batch_size, gen, crop).to(device)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        loss = reconstruction_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if progress:
            progress.advance(task)
    vae.eval().requires_grad_(False)
    return float(loss.detach())


def reconstruction_loss(
    recon: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE plus a little L1, each pixel weighted by ``weights`` (normalised by their mean).

    >>> x = torch.zeros(1, 3, 2, 2); r = x.clone(); r[..., 0, 0] = 1.0
    >>> w = torch.ones(1, 1, 2, 2); w[..., 0, 0] = 3.0
    >>> round(float(reconstruction_loss(r, x, w)), 4)  # (0.25 + 0.1 * 0.25) * 3 / 1.5
    0.55
    """
    err = (recon - target) ** 2 + L1_WEIGHT * (recon - target).abs()
    if weights is None:
        return err.mean()
    return (weights * err).mean() / weights.mean()


def defect_weights(masks: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights: ``weight`` inside the defect masks, 1 elsewhere.

    >>> defect_weights(torch.tensor([[[[0.0, 1.0]]]]), 10.0).tolist()
    [[[[1.0, 10.0]]]]
    """
    return 1.0 + (weight - 1.0) * (masks > 0.5).float()


def defect_batch(
    has_defect: torch.Tensor, n: int, share: float, gen: torch.Generator
) -> torch.Tensor:
    """Indices of one batch: ``round(n * share)`` images with a defect, the rest without.

    Uniform over every image when ``share`` is 0 or one group is empty. Drawn
    uniformly, the 8 few-shot images among the demo's 58 fill 14% of a batch.

    >>> has = torch.tensor([False, False, False, True])
    >>> idx = defect_batch(has, 4, 0.5, torch.Generator().manual_seed(0))
    >>> sorted(has[idx].tolist())
    [False, False, True, True]
    """
    pos, neg = torch.nonzero(has_defect)[:, 0], torch.nonzero(~has_defect)[:, 0]
    k = int(round(n * share))
    if k == 0 or len(pos) == 0 or len(neg) == 0:
        return torch.randint(0, len(has_defect), (n,), generator=gen)
    return torch.cat(
        [
            pos[torch.randint(0, len(pos), (k,), generator=gen)],
            neg[torch.randint(0, len(neg), (n - k,), generator=gen)],
        ]
    )


def crop_origin(
    cells: torch.Tensor | None, size: int, cell: int, gen: torch.Generator
) -> tuple[int, int]:
    """Top-left latent cell of a ``cell``-wide crop of a ``size``-wide latent grid.

    With ``cells`` ((size, size) bool, the image's defect cells) the crop holds a
    random one of them, placed anywhere in the crop: at 64 px of 128 a uniform crop
    misses a 1-3% defect three times in four.
    """
    if cells is None or not bool(cells.any()):
        y, x = torch.randint(0, size - cell + 1, (2,), generator=gen).tolist()
        return y, x
    ys, xs = torch.nonzero(cells, as_tuple=True)
    k = int(torch.randint(0, len(ys), (1,), generator=gen))

    def around(c: int) -> int:
        lo, hi = max(0, c - cell + 1), min(size - cell, c)
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    return around(int(ys[k])), around(int(xs[k]))


def adapt_decoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    crop: int | None,
    gen: torch.Generator,
    progress=None,
    weights: torch.Tensor | None = None,
    bf16_autocast: bool = False,
    masks: torch.Tensor | None = None,
    defect_share: float = 0.0,
    defect_crops: bool = False,
) -> float:
    """Fine-tune only the decoder to reconstruct ``images`` from their frozen latents; last loss.

    The encoder, and so the latent space the UNet was trained in, stays as it is
    (as SD's ft-MSE decoder was fine-tuned), while the small base's colours are
    corrected for one category's images. Crops are aligned to the latent grid.
    ``weights`` ((N, 1, H, W), optional) weigh each pixel's error: a few-shot defect
    covers 1-3% of its image, and unweighted the decoder renders it in the
    background's colours (:func:`defect_weights`). With ``masks`` (the defects,
    (N, 1, H, W)), ``defect_share`` of each batch are images with a defect
    (:func:`defect_batch`) and, with ``defect_crops``, their crops hold it
    (:func:`crop_origin`): weighting alone left thin dark cracks grey smears
    (bench/RESULTS.md (r)).
    """
    if steps == 0:
        return float("nan")
    device = next(vae.parameters()).device
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(images[i : i + 32].to(device)).latent_dist.mean
                for i in range(0, len(images), 32)
            ]
        )
    size = latents.shape[-1]
    cell = size if crop is None else max(1, min(size, crop // factor))
    cells = None if masks is None else latent_mask(masks, size, "coverage")[:, 0] > 0
    has_defect = torch.zeros(len(images), dtype=torch.bool)
    if cells is not None:
        has_defect = cells.flatten(1).any(1)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=lr, weight_decay=0.0)
    schedule = _lr_schedule(opt, lr, steps)
    vae.decoder.train().requires_grad_(True)
    task = progress.add_task("adapt VAE decoder", total=steps) if progress else None
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        zs, targets, ws = [], [], []
        idx = defect_batch(has_defect, batch_size, defect_share, gen).tolist()
        shared = None if defect_crops and cells is not None else crop_origin(None, size, cell, gen)
        for i in idx:  # uniform crops share one window, as they always did
            y, x = shared or crop_origin(cells[i], size, cell, gen)
            zs.append(latents[i, :, y : y + cell, x : x + cell])
            window = (
                ...,
                slice(y * factor, (y + cell) * factor),
                slice(x * factor, (x + cell) * factor),
            )
            targets.append(images[i][window])
            if weights is not None:
                ws.append(weights[i][window])
        target = torch.stack(targets).to(device)
        with cpu_bf16_autocast(bf16_autocast, device):
            recon = vae.decode(torch.stack(zs)).sample
        w = torch.stack(ws).to(device) if ws else None
        loss = reconstruction_loss(recon.float(), target, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if progress:
            progress.advance(task)
    vae.eval().requires_grad_(False)
    return float(loss.detach())


@torch.no_grad()
def make_deterministic(vae: AutoencoderKL) -> None:
    """Pin the posterior's log-variance to its floor: ``sample()`` becomes the mean."""
    conv = vae.quant_conv
    if conv is None:
        raise ValueError("the VAE has no quant_conv to pin its log-variance")
    c = vae.config.latent_channels
    conv.weight[c:] = 0.0
    conv.bias[c:] = LOGVAR_MIN


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, images: torch.Tensor, chunk: int = 32) -> float:
    """``scaling_factor = 1 / std`` of the latents, as SD chose 0.18215 for its VAE."""
    device = next(vae.parameters()).device
    means = [
        vae.encode(images[i : i + chunk].to(device)).latent_dist.mean.cpu()
        for i in range(0, len(images), chunk)
    ]
    std = float(torch.cat(means).std())
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    return vae.config.scaling_factor


def train_inpainting(
    pipe: StableDiffusionInpaintPipeline,
    images: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    mask_max: float,
    prompt: str,
    gen: torch.Generator,
    progress=None,
) -> float:
    """Teach the UNet to inpaint random masks of ``images`` with ``prompt``; last loss."""
    if steps == 0:
        return float("nan")
    vae, unet = pipe.vae, pipe.unet
    device = next(unet.parameters()).device
    sf = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        cond = encode_prompt(pipe, prompt, 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    schedule = _lr_schedule(opt, lr, steps)
    unet.train().requires_grad_(True)
    size = images.shape[-1]
    task = progress.add_task("pretrain UNet", total=steps) if progress else None
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = random_batch(images, batch_size, gen).to(device)
        masks = random_inpaint_masks(batch_size, size, mask_max, gen).to(device)
        with torch.no_grad():
            both = vae.encode(torch.cat([x, masked_inputs(x, masks)])).latent_dist.mean * sf
        latents, masked_latents = both.chunk(2)
        loss = inpainting_loss(unet, noise_scheduler, latents, masks, masked_latents, cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        schedule.step()
        if progress:
            progress.advance(task)
    unet.eval().requires_grad_(False)
    return float(loss.detach())


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

    if tiny.base == "scratch":
        return _pretrain_from_scratch(pipe, images, tiny, device, show_progress)
    gen = torch.Generator().manual_seed(tiny.seed)
    pipe.vae.to(device)
    pipe.unet.to(device)
    pipe.text_encoder.to(device)
    bs = tiny.pretrain_batch_size
    with _progress(show_progress) as progress:
        if tiny.base == "scratch":
            vae_loss = train_autoencoder(
                pipe.vae,
                images,
                tiny.pretrain_vae_steps,
                tiny.pretrain_lr,
                bs,
                tiny.pretrain_crop,
                gen,
                progress,
            )
            make_deterministic(pipe.vae)
            set_latent_scale(pipe.vae, images)
        else:  # the bundled base's latent space is what its UNet knows: adapt the decoder only
            weights = None
            if masks is not None and tiny.pretrain_defect_weight != 1.0:
                weights = defect_weights(masks, tiny.pretrain_defect_weight)
            vae_loss = adapt_decoder(
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
                masks,
                tiny.pretrain_defect_share,
                tiny.pretrain_defect_crops,
            )
        unet_loss = train_inpainting(
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


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
