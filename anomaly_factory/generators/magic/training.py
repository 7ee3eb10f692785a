"""What MAGIC's training loops share (the tiny pretraining, the GPP fine-tune and the
AnomalyControl adapter): image and mask tensors in SD's ranges, the masked-image input,
the mask on the latent grid, prompt embeddings and the inpainting loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDPMScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)


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


def encode_prompt(pipe: StableDiffusionInpaintPipeline, prompt: str, n: int) -> torch.Tensor:
    """Text-encoder output (n, 77, dim) for a prompt, through the pipeline's own encoder."""
    embeds, _ = pipe.encode_prompt(
        prompt, pipe.text_encoder.device, n, do_classifier_free_guidance=False
    )
    return embeds


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
