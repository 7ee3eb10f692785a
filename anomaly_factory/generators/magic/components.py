"""The pipeline's components built from config: the DDIM scheduler of both presets, and
the ``tiny`` preset's tokenizer, text encoder, VAE and 9-channel UNet (small configs of
SD2's classes, so the same pipeline code runs both presets).

>>> from anomaly_factory.config import FactoryConfig
>>> cfg = FactoryConfig()
>>> pipe = build_tiny_pipeline(cfg.model, cfg.finetune, cfg.generate.scheduler)
>>> pipe.unet.config.in_channels
9
"""

from __future__ import annotations

import string

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from anomaly_factory.config import (
    FinetuneSection,
    ModelSection,
    SchedulerSection,
    TinyModelSection,
)
from anomaly_factory.errors import InputError

MAX_TOKENS = 77  # CLIP's context length, as in SD
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def ddim_scheduler(scheduler: SchedulerSection) -> DDIMScheduler:
    """MAGIC's sampler settings (CONTEXT §1): scaled-linear betas, eps, steps_offset 1."""
    return DDIMScheduler(num_train_timesteps=1000, **ddim_settings(scheduler))


def ddim_settings(scheduler: SchedulerSection) -> dict[str, object]:
    """The DDIM settings of ``generate.scheduler`` (SD2's: no clipping, no final alpha 1)."""
    return {
        "beta_start": scheduler.beta_start,
        "beta_end": scheduler.beta_end,
        "beta_schedule": scheduler.beta_schedule,
        "steps_offset": scheduler.steps_offset,
        "prediction_type": scheduler.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


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


def _latent_size(model: ModelSection) -> int:
    return model.resolution // 2 ** (len(model.tiny.vae_channels) - 1)
