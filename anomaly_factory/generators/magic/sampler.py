"""MAGIC's sampler: one DDIM denoising loop with SAG, GPP and optional MGNI / paste-back.

The loop reads like ``StableDiffusionInpaintPipeline.__call__`` and reuses its
pieces (``encode_prompt``, ``prepare_latents``, ``prepare_mask_latents``, the
image/mask processors, ``scheduler.step``, VAE decode), changing only what
MAGIC changes (CONTEXT §1):

* **SAG** (§3.3): ``eps = eps_u + W * (eps_c - eps_u)`` with a per-position
  weight, ``w_in`` rising from ``w_m`` to ``w_d`` inside the mask
  (:mod:`.sag`). With ``w_m == w_d`` and ``sigma == 0`` the loop is exactly the
  stock pipeline at ``strength=1.0``.
* **GPP at inference** (§3.2): the conditional prompt embedding is perturbed
  once per generated image (seeded by that image's seed), the same draw at every
  step; the unconditional branch is untouched.
* **MGNI** (public code's final version, ``magic_ddim.py``, optional):
  per-position DDIM eta, ``eta_inside`` in the mask and ``eta_outside`` elsewhere,
  so extra noise enters only the defect. Each position's DDIM update depends only
  on that position, so two ``scheduler.step`` calls sharing one noise draw,
  blended by the binary latent mask, are exactly a per-position eta. The inside
  eta follows one of the official code's step schedules (:func:`mgni_eta`) and is
  guarded per step: DDIM's noise std ``eta * sqrt(var_t)`` must not exceed
  ``sqrt(1 - alpha_prev)``, else the update takes the square root of a negative
  number (eta 1.5 at the last of 20 steps gives NaN), so eta is clipped to
  ``guard_margin`` times the critical eta (:func:`critical_eta`) or zeroed.
* **Latent mask**: the mask on the latent grid (UNet input, SAG's map, MGNI's
  blend) is either diffusers' nearest resize or, by default, every latent cell
  the pixel mask covers (:func:`latent_mask`): a scratch thinner than a cell
  (8 px in SD) would otherwise vanish from the latent grid and never be painted.
* **Paste-back** (optional): the decoded image is blended with the normal image
  outside the mask, ``alpha`` falling linearly from 1 at the mask edge to 0 at
  ``feather_px + 1`` pixels away, so the normal region beyond it is exact (no VAE
  round trip).

Randomness is per image: image ``b`` uses ``torch.Generator().manual_seed(seeds[b])``
(CPU, so results match across devices) for its initial noise, its VAE latent
sample and any eta noise, as the stock pipeline does with a list of generators.
An image therefore depends on its own seed and not on the others in the batch,
up to the floating-point differences of batched kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from anomaly_factory.config import GenerateSection
from anomaly_factory.generators.common import derive_seed
from anomaly_factory.generators.composite import paste_back
from anomaly_factory.generators.magic.gpp import gaussian_prompt_perturbation
from anomaly_factory.generators.magic.sag import sag_schedule, spatially_adaptive_guidance


@dataclass(frozen=True)
class SamplerOptions:
    """Settings of one sampling run (``generate:`` in pipelines.yaml)."""

    steps: int = 50
    w_m: float = 4.0
    w_d: float = 7.5
    sigma: float = 0.0
    eta: float = 0.0
    mgni: bool = False
    eta_inside: float = 1.0
    eta_outside: float = 0.0
    eta_inside_min: float = 0.0
    eta_schedule: str = "constant"
    eta_power: float = 2.0
    eta_exp_k: float = 3.0
    eta_sigmoid_k: float = 8.0
    eta_stop_step: int | None = None
    eta_guard: str = "clip_to_crit"
    eta_guard_margin: float = 0.99
    paste_back: bool = False
    feather_px: int = 3
    latent_mask: str = "nearest"  # the stock pipeline's; the config's default is "coverage"
    latent_mask_min_coverage: float = 0.0
    init_latents: str = "noise"  # the stock pipeline's; "noised_image": see image_latents
    blend_known: bool = False  # the 9-channel stock pipeline's; True: see blend_known
    blend_known_margin: int = 0  # latent cells around the mask that blend_known leaves free

    @classmethod
    def from_config(cls, g: GenerateSection) -> SamplerOptions:
        return cls(
            steps=g.steps,
            w_m=g.sag.w_m,
            w_d=g.sag.w_d,
            sigma=g.gpp.sigma,
            mgni=g.mgni.enabled,
            eta_inside=g.mgni.eta_inside,
            eta_outside=g.mgni.eta_outside,
            eta_inside_min=g.mgni.eta_inside_min,
            eta_schedule=g.mgni.schedule,
            eta_power=g.mgni.power,
            eta_exp_k=g.mgni.exp_k,
            eta_sigmoid_k=g.mgni.sigmoid_k,
            eta_stop_step=g.mgni.stop_step,
            eta_guard=g.mgni.guard,
            eta_guard_margin=g.mgni.guard_margin,
            paste_back=g.paste_back.enabled,
            feather_px=g.paste_back.feather_px,
            latent_mask=g.latent_mask,
            latent_mask_min_coverage=g.latent_mask_min_coverage,
            init_latents=g.init_latents,
            blend_known=g.blend_known,
            blend_known_margin=g.blend_known_margin,
        )


# --------------------------------------------------------------------------- latent mask
def latent_mask(
    masks: torch.Tensor,
    size: int | tuple[int, int],
    mode: str = "nearest",
    min_coverage: float = 0.0,
) -> torch.Tensor:
    """A {0, 1} mask ``(B, 1, H, W)`` on the latent grid ``size``; the one place it is made.

    * ``nearest``: ``F.interpolate`` as ``StableDiffusionInpaintPipeline.prepare_mask_latents``
      (and the fine-tuning loss) do: each cell takes one pixel, so a line thinner
      than a cell can vanish;
    * ``coverage``: a cell is in the mask when the share of its pixels in the mask
      (area average) is above 0 and at least ``min_coverage``; with 0 every mask
      pixel lies in a marked cell.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if mode == "nearest":
        return F.interpolate(masks, size=size)
    if mode != "coverage":
        raise ValueError(f"generate.latent_mask: {mode!r} is not one of ['nearest', 'coverage']")
    cover = F.adaptive_avg_pool2d((masks >= 0.5).float(), size)
    return ((cover > 0) & (cover >= min_coverage)).to(masks.dtype)


# --------------------------------------------------------------------------- MGNI
def eta_shape(
    schedule: str, s: float, power: float = 2.0, exp_k: float = 3.0, sigmoid_k: float = 8.0
) -> float:
    """The official code's schedule shapes, ``s`` in [0, 1] (first to last step) -> [0, 1]."""
    s = min(max(s, 0.0), 1.0)
    shapes = {
        "constant": lambda: 1.0,
        "linear_down": lambda: 1.0 - s,
        "linear_up": lambda: s,
        "cosine_down": lambda: 0.5 * (1.0 + math.cos(math.pi * s)),
        "cosine_up": lambda: 0.5 * (1.0 - math.cos(math.pi * s)),
        "poly_down": lambda: (1.0 - s) ** power,
        "poly_up": lambda: s**power,
        "exp_down": lambda: math.exp(-exp_k * s),
        "exp_up": lambda: 1.0 - math.exp(-exp_k * s),
        # as magic_ddim.py: the upper half of a logistic, rescaled to [0, 1]
        "sigmoid_down": lambda: min(1.0, max(0.0, 2 / (1 + math.exp(sigmoid_k * (s - 0.5))) - 1)),
        "sigmoid_up": lambda: min(1.0, max(0.0, 2 / (1 + math.exp(-sigmoid_k * (s - 0.5))) - 1)),
    }
    if schedule not in shapes:
        raise ValueError(f"generate.mgni.schedule: {schedule!r} is not one of {sorted(shapes)}")
    return float(shapes[schedule]())


def mgni_eta(options: SamplerOptions, step_index: int, num_steps: int) -> float:
    """Scheduled eta inside the mask at ``step_index`` (before the guard):
    ``eta_inside_min + (eta_inside - eta_inside_min) * shape(i / (N - 1))``."""
    if options.eta_stop_step is not None and step_index >= options.eta_stop_step:
        return 0.0
    s = 0.0 if num_steps <= 1 else step_index / (num_steps - 1)
    w = eta_shape(
        options.eta_schedule, s, options.eta_power, options.eta_exp_k, options.eta_sigmoid_k
    )
    return options.eta_inside_min + (options.eta_inside - options.eta_inside_min) * w


def critical_eta(scheduler, t) -> float:
    """The eta at which DDIM's noise variance ``eta^2 var_t`` reaches ``1 - alpha_prev``.

    Beyond it ``sqrt(1 - alpha_prev - std^2)`` in ``DDIMScheduler.step`` is NaN.
    ``var_t <= 1 - alpha_prev`` always, so the critical eta is >= 1.
    """
    prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    variance = float(scheduler._get_variance(int(t), prev))
    return math.inf if variance <= 0 else math.sqrt(float(1 - alpha_prev) / variance)


def guard_eta(eta: float, critical: float, guard: str, margin: float) -> float:
    """Keep ``eta`` below ``margin * critical`` (clip), or drop it to 0 above (zero)."""
    limit = margin * critical
    if eta <= limit:
        return eta
    if guard == "clip_to_crit":
        return limit
    if guard == "zero_before_neg":
        return 0.0
    raise ValueError(
        f"generate.mgni.guard: {guard!r} is not one of ['clip_to_crit', 'zero_before_neg']"
    )


def cpu_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def perturb_conditional(
    cond: torch.Tensor, sigma: float, positions: torch.Tensor | None, seeds: list[int]
) -> torch.Tensor:
    """GPP on the conditional embeddings: row ``b`` gets its own draw from ``seeds[b]``."""
    if sigma == 0:
        return cond
    rows = [
        gaussian_prompt_perturbation(
            cond[b : b + 1], sigma, positions, torch.Generator().manual_seed(derive_seed(s, "gpp"))
        )
        for b, s in enumerate(seeds)
    ]
    return torch.cat(rows)


def _to_pil(images: list[np.ndarray] | np.ndarray, masks: list[np.ndarray]):
    pil_images = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
    pil_masks = [
        m if isinstance(m, Image.Image) else Image.fromarray(np.asarray(m, np.uint8) * 255)
        for m in masks
    ]
    return pil_images, pil_masks


@torch.no_grad()
def magic_inpaint(
    pipe,
    images: list[np.ndarray] | list[Image.Image],
    masks: list[np.ndarray] | list[Image.Image],
    seeds: list[int],
    prompt: str,
    options: SamplerOptions,
    gpp_positions: torch.Tensor | None = None,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """Inpaint ``masks`` on ``images`` (one UNet call per step for the whole batch).

    ``images`` are uint8 HxWx3 arrays (or PIL), ``masks`` bool HxW arrays (or PIL,
    white = defect); ``seeds`` one per image. Returns (B, H, W, 3) float32 in
    [0, 1], as the stock pipeline's ``output_type="np"``.
    """
    n = len(images)
    if not n == len(masks) == len(seeds):
        raise ValueError(f"{n} images, {len(masks)} masks and {len(seeds)} seeds differ in number")
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    generators = cpu_generators(seeds)
    pil_images, pil_masks = _to_pil(images, masks)

    # 1. prompts: unconditional untouched, GPP on the conditional branch only
    cond, uncond = pipe.encode_prompt(prompt, device, n, True, negative_prompt)
    cond = perturb_conditional(cond, options.sigma, gpp_positions, seeds)
    prompt_embeds = torch.cat([uncond, cond])

    # 2. timesteps: DDIM from pure noise (strength 1.0)
    pipe.scheduler.set_timesteps(options.steps, device=device)
    timesteps = pipe.scheduler.timesteps

    # 3. latents, then mask and masked-image latents (the stock order of generator use)
    init_image = pipe.image_processor.preprocess(pil_images, height=height, width=width)
    init_image = init_image.to(dtype=torch.float32)
    (latents,) = pipe.prepare_latents(
        n, pipe.vae.config.latent_channels, height, width, prompt_embeds.dtype, device, generators
    )
    mask_condition = pipe.mask_processor.preprocess(pil_masks, height=height, width=width)
    masked_image = init_image * (mask_condition < 0.5)
    mask, masked_image_latents = pipe.prepare_mask_latents(
        mask_condition,
        masked_image,
        n,
        height,
        width,
        prompt_embeds.dtype,
        device,
        generators,
        True,
    )
    if options.latent_mask != "nearest":  # prepare_mask_latents resized by nearest
        grid = latent_mask(
            mask_condition, mask.shape[-2:], options.latent_mask, options.latent_mask_min_coverage
        )
        mask = torch.cat([grid.to(device=mask.device, dtype=mask.dtype)] * 2)
    mask_latent = mask[:n]  # binary, on the latent grid
    noise = latents
    z0 = None
    if options.init_latents == "noised_image" or options.blend_known:
        z0 = image_latents(pipe, init_image.to(device)).to(noise.dtype)
    if options.init_latents == "noised_image":
        latents = pipe.scheduler.add_noise(z0, noise, timesteps[:1])

    if options.blend_known:  # the cells it leaves to the UNet
        drawn = grow_cells(mask_latent, options.blend_known_margin)
    # 4. denoising loop
    w_in = sag_schedule(options.w_m, options.w_d, len(timesteps)).tolist()
    for i, t in enumerate(timesteps):
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        model_input = torch.cat([model_input, mask, masked_image_latents], dim=1)
        noise_pred = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
        eps_u, eps_c = noise_pred.chunk(2)
        eps = spatially_adaptive_guidance(eps_u, eps_c, mask_latent, w_in[i], options.w_d)
        latents = _ddim_step(pipe.scheduler, eps, t, latents, mask_latent, options, generators, i)
        if options.blend_known:
            latents = blend_known(pipe.scheduler, latents, z0, noise, drawn, timesteps, i)

    # 5. decode, optional paste-back
    decoded = pipe.vae.decode(
        latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generators
    )[0]
    out = pipe.image_processor.postprocess(decoded, output_type="np")
    if options.paste_back:
        normal = ((init_image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        binary = [m[0].cpu().numpy() >= 0.5 for m in mask_condition]
        out = paste_back(out, normal, binary, options.feather_px).astype(np.float32)
    return out


@torch.no_grad()
def image_latents(pipe, image: torch.Tensor) -> torch.Tensor:
    """The image's scaled latents (posterior mode): the known content of inpainting.

    ``init_latents: noised_image`` starts from them noised to the first timestep, x_T as
    training made it. With SD's schedule x_T keeps sqrt(alpha_bar_T) ~ 0.07 of the signal,
    and a UNet reads the latents' channel means from it. The tiny VAE's latents have means
    of up to 1.1 (scaled), so from pure noise the tiny UNet drew the whole latent, the
    defect included, shifted towards zero: tile cracks came out pink, not dark grey
    (bench/RESULTS.md (k)). The normal image's latents under the mask weigh 0.07 and the
    defect is still drawn there. The noise is the one ``prepare_latents`` drew, so the
    generator streams stay as in the stock order.
    """
    vae = pipe.vae
    return vae.encode(image.to(dtype=vae.dtype)).latent_dist.mode() * vae.config.scaling_factor


def grow_cells(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """A binary (B, 1, h, w) latent mask grown by ``cells`` in every direction (square)."""
    if cells <= 0:
        return mask
    return F.max_pool2d(mask, 2 * cells + 1, stride=1, padding=cells)


def blend_known(
    scheduler,
    latents: torch.Tensor,
    z0: torch.Tensor,
    noise: torch.Tensor,
    drawn: torch.Tensor,
    timesteps: torch.Tensor,
    i: int,
) -> torch.Tensor:
    """Latents after step ``i`` with the cells outside ``drawn`` replaced by the known image's.

    This is diffusers' inpainting loop for 4-channel UNets (and blended latent diffusion):
    the known latents ``z0`` noised with the run's first ``noise`` to the next timestep, or
    ``z0`` itself after the last step. The 9-channel UNet otherwise redraws the whole latent
    and, on a few-shot fine-tune, spreads a thin crack into a blob over the neighbouring
    cells, of which paste-back keeps a grey-olive line. Held, the cracks come out darker,
    but on the demo the region KIDs did not move, so the tiny profile leaves it off
    (bench/RESULTS.md (s)). ``drawn`` is the latent mask, grown by ``blend_known_margin``.
    """
    known = (
        z0 if i + 1 >= len(timesteps) else scheduler.add_noise(z0, noise, timesteps[i + 1 : i + 2])
    )
    return drawn * latents + (1 - drawn) * known


def _ddim_step(
    scheduler, eps, t, latents, mask_latent, options, generators, step_index: int | None = None
) -> torch.Tensor:
    """One DDIM step; with MGNI, eta is the guarded ``mgni_eta`` in the mask, ``eta_outside`` out."""
    if not options.mgni:
        return scheduler.step(
            eps, t, latents, eta=options.eta, generator=generators, return_dict=False
        )[0]
    if step_index is None:
        step_index = int((scheduler.timesteps == t).nonzero()[0, 0])
    eta_in = guard_eta(
        mgni_eta(options, step_index, len(scheduler.timesteps)),
        critical_eta(scheduler, t),
        options.eta_guard,
        options.eta_guard_margin,
    )
    noise = randn_tensor(eps.shape, generator=generators, device=eps.device, dtype=eps.dtype)
    inside = scheduler.step(eps, t, latents, eta=eta_in, variance_noise=noise, return_dict=False)[0]
    if options.eta_outside == eta_in:
        return inside
    outside = scheduler.step(
        eps, t, latents, eta=options.eta_outside, variance_noise=noise, return_dict=False
    )[0]
    return mask_latent * inside + (1 - mask_latent) * outside
