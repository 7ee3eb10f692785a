"""Semantic guided adapter (SGA), AnomalyControl §3.3.

Decoupled cross-attention as in IP-Adapter::

    out = Attn(q, K_text, V_text) + lambda * Attn(q, K_sem, V_sem)

built on diffusers' own machinery rather than by hand: every cross-attention
layer of the UNet gets an ``IPAdapterAttnProcessor2_0`` whose new key/value
projections (``to_k_ip``, ``to_v_ip``) start as copies of the text ones, and the
UNet's ``encoder_hid_proj`` becomes a ``MultiIPAdapterImageProjection`` holding
CSM's trained projection (features -> ``n_tokens`` semantic tokens). The
pipeline's ``ip_adapter_image_embeds`` argument then carries the mean-pooled
Q-Former features, and ``set_ip_adapter_scale`` sets lambda. Only these modules
train. Weights are kept in IP-Adapter's layout (``image_proj.*``,
``ip_adapter.<id>.to_{k,v}_ip.weight``); with 4 tokens (the public code's) trained
weights are loaded by diffusers' own ``load_ip_adapter`` (:func:`load_adapter_weights`),
which builds its projection with 4 tokens; other token counts use
:func:`install_adapter` + :func:`load_adapter_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from safetensors.torch import load_file
from torch import nn

from anomaly_factory.generators.anomalycontrol.csm import semantic_projection

PROCESSOR_SUFFIX = ".processor"
# diffusers' load_ip_adapter reads an ``image_proj.proj`` layout as ImageProjection with 4 tokens
IP_ADAPTER_TOKENS = 4


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """The UNet's cross-attention modules by processor name, in ``attn_processors`` order."""
    layers = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(PROCESSOR_SUFFIX))
        if isinstance(module, Attention) and module.is_cross_attention:
            layers[name] = module
    return layers


def install_adapter(
    unet: UNet2DConditionModel, feature_dim: int, n_tokens: int, scale: float = 1.0
) -> None:
    """Add SGA to ``unet`` in place; the base weights are untouched.

    ``to_k_ip`` / ``to_v_ip`` are initialised from each layer's text ``to_k`` /
    ``to_v`` (the paper's initialisation), the projection randomly.
    """
    if has_adapter(unet):
        raise ValueError("UNet already has an IP-Adapter / SGA installed")
    cross = cross_attention_layers(unet)
    if not cross:
        raise ValueError("UNet has no cross-attention layers to add SGA to")
    processors = dict(unet.attn_processors)
    for name, attn in cross.items():
        proc = IPAdapterAttnProcessor2_0(
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features,
            num_tokens=(n_tokens,),
            scale=scale,
        )
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
        processors[name] = proc.to(attn.to_k.weight.device, attn.to_k.weight.dtype)
    unet.set_attn_processor(processors)
    projection = semantic_projection(feature_dim, unet.config.cross_attention_dim, n_tokens)
    projection.to(unet.device, unet.dtype)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"  # as diffusers' own IP-Adapter loader


def has_adapter(unet: UNet2DConditionModel) -> bool:
    return any(isinstance(p, IPAdapterAttnProcessor2_0) for p in unet.attn_processors.values())


def adapter_processors(unet: UNet2DConditionModel) -> dict[str, IPAdapterAttnProcessor2_0]:
    procs = {
        n: p for n, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)
    }
    if not procs:
        raise ValueError("UNet has no SGA: call install_adapter first")
    return procs


def projection_layer(unet: UNet2DConditionModel) -> ImageProjection:
    proj = unet.encoder_hid_proj
    if not isinstance(proj, MultiIPAdapterImageProjection):
        raise ValueError("UNet has no SGA projection: call install_adapter first")
    return proj.image_projection_layers[0]


def adapter_parameters(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    """What trains: the projection and the new key/value projections."""
    params = list(projection_layer(unet).parameters())
    for proc in adapter_processors(unet).values():
        params += list(proc.to_k_ip.parameters()) + list(proc.to_v_ip.parameters())
    return params


def adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """SGA weights in IP-Adapter's flat layout (cross-attention ids 1, 3, 5, ...)."""
    proj = projection_layer(unet)
    out = {
        "image_proj.proj.weight": proj.image_embeds.weight,
        "image_proj.proj.bias": proj.image_embeds.bias,
        "image_proj.norm.weight": proj.norm.weight,
        "image_proj.norm.bias": proj.norm.bias,
    }
    for i, proc in enumerate(adapter_processors(unet).values()):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def load_adapter_state_dict(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`adapter_state_dict` output into an installed adapter (shapes must match)."""
    own = adapter_state_dict(unet)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"SGA weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"SGA weights: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    proj = projection_layer(unet)
    with torch.no_grad():
        proj.image_embeds.weight.copy_(state["image_proj.proj.weight"])
        proj.image_embeds.bias.copy_(state["image_proj.proj.bias"])
        proj.norm.weight.copy_(state["image_proj.norm.weight"])
        proj.norm.bias.copy_(state["image_proj.norm.bias"])
        for i, proc in enumerate(adapter_processors(unet).values()):
            proc.to_k_ip[0].weight.copy_(state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
            proc.to_v_ip[0].weight.copy_(state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])


def load_adapter_weights(
    pipe: DiffusionPipeline, path: Path, feature_dim: int, n_tokens: int, scale: float
) -> str:
    """Put trained SGA weights (``path``, IP-Adapter layout) into ``pipe`` at lambda ``scale``.

    With :data:`IP_ADAPTER_TOKENS` tokens diffusers' ``load_ip_adapter`` does it (no image
    encoder: the pipeline gets ``ip_adapter_image_embeds``); other counts install the
    adapter here. Returns which path loaded it (``load_ip_adapter`` or ``install_adapter``).
    """
    path = Path(path)
    if n_tokens == IP_ADAPTER_TOKENS:
        pipe.load_ip_adapter(
            str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None
        )
        how = "load_ip_adapter"
    else:
        install_adapter(pipe.unet, feature_dim, n_tokens)
        load_adapter_state_dict(pipe.unet, load_file(str(path)))
        how = "install_adapter"
    pipe.set_ip_adapter_scale(scale)
    return how


def semantic_embeds(
    features: torch.Tensor, guidance: bool, negative: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for the pipeline from (B, D) CSM features.

    With classifier-free guidance the unconditional half comes first, as the
    pipeline's ``prepare_ip_adapter_image_embeds`` expects; it defaults to zeros,
    the same "no reference" input the adapter sees when training drops the image.
    """
    pos = features[:, None, :]
    if not guidance:
        return [pos]
    neg = torch.zeros_like(pos) if negative is None else negative[:, None, :]
    return [torch.cat([neg, pos])]
