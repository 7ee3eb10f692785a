"""Typed schema of ``pipelines.yaml``, the one place a user configures a run.

The file holds one section per stage (its values are the ``tiny`` profile) and a
``profiles:`` mapping whose entries override those values. Profiles differ only
in values, never in code paths. Every model forbids unknown keys, so a typo is an
error that names its field path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from anomaly_factory.datasets.formats import FORMATS
from anomaly_factory.errors import InputError
from anomaly_factory.generators.registry import GENERATORS

DEFAULT_PROFILE = "tiny"
CONFIG_ENV = "ANOMALY_FACTORY_CONFIG"

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
PositiveInt = Annotated[int, Field(gt=0)]


def _scalar_types(annotation: Any) -> set[type]:
    """The scalar types a field annotation accepts (through Annotated, unions, Optional)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _scalar_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in typing.get_args(annotation)))
    if origin is Literal:
        return {type(a) for a in typing.get_args(annotation)}
    return {annotation} if isinstance(annotation, type) else set()


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are validated on assignment.

    Numbers are strict: a boolean (``n_pairs: true``) or a string is never a number, and
    an integer field takes no float, where pydantic's lax mode would convert them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        accepted = _scalar_types(cls.model_fields[info.field_name].annotation)
        numbers = accepted & {int, float}
        if not numbers:
            return value
        if isinstance(value, bool) and bool not in accepted:
            raise PydanticCustomError("strict_number", "a boolean where a number is expected")
        if isinstance(value, str) and str not in accepted:
            raise PydanticCustomError("strict_number", "a string where a number is expected")
        if isinstance(value, float) and numbers == {int}:
            raise PydanticCustomError("strict_number", "not an integer")
        return value


# --------------------------------------------------------------------------- datasets
# the names of the dataset formats' registry (datasets/formats.py), as one Literal
DatasetName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
GeneratorName = Literal[tuple(GENERATORS)]  # type: ignore[valid-type]


class DatasetSpec(Section):
    name: DatasetName
    source: str | None = Field(
        default=None, description="Folder, archive or http(s) URL; None uses the default URL"
    )
    sha256: str | None = Field(default=None, description="Overrides the known archive checksum")
    categories: list[str] | None = Field(default=None, description="None keeps all categories")


class DatasetsSection(Section):
    root: Path = Path("data/raw")
    manifest_dir: Path = Path("data/manifests")
    on_bad_input: Literal["fail", "quarantine"] = "fail"
    alpha: Literal["refuse", "composite"] = Field(
        default="refuse",
        description="Images with transparent pixels: refuse them (named) or composite them "
        "over black",
    )
    items: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(name="demo")])


class DemoSection(Section):
    """The procedural demo dataset (the embedded default)."""

    seed: int = 0
    size: Annotated[int, Field(ge=64, le=512)] = 128
    n_train: PositiveInt = 50
    n_test_good: PositiveInt = 8
    n_per_type: Annotated[int, Field(ge=3)] = 12
    categories: list[str] = Field(
        default_factory=lambda: ["carpet_demo", "tile_demo", "nut_demo", "bar_demo"]
    )


class SplitSection(Section):
    fewshot_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=1 / 3, description="First floor(n * fraction) anomaly images per type are fewshot"
    )


# --------------------------------------------------------------------------- model
class TinyModelSection(Section):
    """Shapes of the small inpainting model built from configs for CPU runs."""

    base: Literal["bundled", "scratch"] = Field(
        default="scratch",
        description="bundled: start from the pretrained tiny base shipped in "
        "anomaly_factory/assets/tiny_inpaint (built by scripts/build_tiny_base.py, the "
        "tiny stand-in for SD2's pretraining); scratch: random weights. Either way the "
        "pretrain_* steps then train on the category's normal images",
    )
    base_folder: Path | None = Field(
        default=None,
        description="base: bundled: the folder holding one <digest>/ snapshot "
        "(None: anomaly_factory/assets/tiny_inpaint)",
    )
    unet_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 64])
    vae_channels: list[PositiveInt] = Field(
        default_factory=lambda: [16, 32, 32],
        description="One block per entry; the latent is 2^(n-1) times smaller than the image",
    )
    vae_mid_attention: bool = Field(
        default=True, description="Self-attention in the VAE's middle block (SD's VAE has it)"
    )
    unet_cross_attention: list[bool] | None = Field(
        default=None,
        description="Per UNet level, whether it has cross-attention blocks; None: every level "
        "but the deepest (SD's layout). Attention at the full latent grid dominates CPU time",
    )
    latent_channels: Literal[4] = 4
    vae_layers_per_block: PositiveInt = 1
    unet_layers_per_block: PositiveInt = 1
    attention_head_dim: PositiveInt = 8
    norm_num_groups: PositiveInt = Field(default=8, description="Must divide every channel count")
    text_hidden_size: PositiveInt = 64
    text_layers: PositiveInt = 2
    text_heads: PositiveInt = 2
    cross_attention_dim: PositiveInt = 64
    vocab_words: list[str] = Field(
        default_factory=list,
        description="Extra whole-word tokens; the prompt's words are always in the vocabulary",
    )
    seed: int = 0
    pretrain_vae_steps: Annotated[int, Field(ge=0)] = 60
    pretrain_unet_steps: Annotated[int, Field(ge=0)] = 100
    pretrain_lr: Positive = 3e-3
    pretrain_batch_size: PositiveInt = 8
    pretrain_kl_weight: NonNegative = Field(
        default=1e-6, description="base: scratch: KL weight of the VAE pretraining (SD's 1e-6)"
    )
    pretrain_bf16_autocast: bool = Field(
        default=False,
        description="base: bundled: adapt the decoder under CPU bfloat16 autocast (weights "
        "stay float32): 1.6x faster a step on AVX512-BF16 CPUs; off where the CPU lacks it",
    )
    pretrain_defect_weight: Annotated[float, Field(ge=1)] = Field(
        default=1.0,
        description="base: bundled: loss weight of the few-shot defect pixels in the decoder "
        "adaptation (1: unweighted); a defect covers 1-3% of its image",
    )
    pretrain_defect_share: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0,
        description="base: bundled: share of each decoder-adaptation batch drawn from the "
        "few-shot images with a defect (0: every image alike)",
    )
    pretrain_defect_crops: bool = Field(
        default=False,
        description="base: bundled: a few-shot image's crop in the decoder adaptation holds "
        "its defect (false: anywhere, missing a small defect most of the time)",
    )
    pretrain_crop: PositiveInt | None = Field(
        default=64, description="VAE pretraining on random crops of this size (None: whole)"
    )
    pretrain_prompt: str = Field(default="", description="Prompt of the inpainting pretraining")
    pretrain_mask_max: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.5, description="Largest side of a random pretraining mask, as an image fraction"
    )


class ModelSection(Section):
    preset: Literal["tiny", "sd2_inpainting"] = "tiny"
    pretrained: str = Field(
        default="stabilityai/stable-diffusion-2-inpainting",
        description="Hugging Face id or local diffusers folder (sd2_inpainting preset)",
    )
    resolution: PositiveInt = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    cache_dir: Path = Path("data/models")
    tiny: TinyModelSection = Field(default_factory=TinyModelSection)


# --------------------------------------------------------------------------- MAGIC
class GPPSection(Section):
    """Gaussian prompt perturbation (MAGIC §3.2)."""

    sigma: NonNegative = 1.0
    target: Literal["anomaly_token", "all_tokens"] = "anomaly_token"


class FinetuneSection(Section):
    prompt: str = "a photo of sks defect"
    anomaly_token: str = "sks"
    optimizer: Literal["adamw"] = "adamw"
    lr: Positive = 1e-4
    lr_scheduler: Literal["constant"] = "constant"
    weight_decay: NonNegative = 1e-2
    grad_clip: Positive = 1.0
    batch_size: PositiveInt = 4
    steps: PositiveInt = 60
    resolution: PositiveInt = 64
    prior_preservation: Literal[False] = False
    save: Literal["unet", "lora"] = "unet"
    lora_rank: PositiveInt = 8
    checkpoint_every: PositiveInt = 20
    keep_train_state: bool = Field(
        default=False, description="Keep optimizer/RNG state after the last step (to extend later)"
    )
    gradient_checkpointing: bool = False
    mask_loss_weight: Annotated[float, Field(ge=1)] = Field(
        default=1.0,
        description="Weight of the defect's latent cells in the loss (1 = the paper's plain MSE)",
    )
    latent_mask: Literal["nearest", "coverage"] = Field(
        default="nearest",
        description="How the defect mask goes onto the latent grid in the loss: nearest "
        "(diffusers' fine-tuning) or coverage (as generate.latent_mask samples thin defects; "
        "not the tiny default: unmeasured on the main job)",
    )
    log_every: PositiveInt = 10
    seed: int = 0
    gpp: GPPSection = Field(default_factory=GPPSection)
    out_dir: Path = Path("data/checkpoints")


class MaskGeneratorSection(Section):
    """Small DDPM over a type's few-shot masks (MAGIC §3.1; generators/magic/masks.py)."""

    resolution: PositiveInt = 32
    steps: PositiveInt = 400
    sample_steps: PositiveInt = 25
    threshold: Fraction = 0.5
    lr: Positive = 2e-3
    batch_size: PositiveInt = Field(default=8, description="Training batch and sampling chunk")
    channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32])
    norm_num_groups: PositiveInt = 8
    mid_attention: bool = Field(
        default=True,
        description="Self-attention in the UNet's mid block (diffusers' default). At 64 px with "
        "2 levels it attends over 1024 positions: a step costs 2.8x one without it",
    )
    attention_head_dim: PositiveInt | None = Field(
        default=8,
        description="Channels per head of the mid-block attention (diffusers' default 8); null "
        "is one head over all channels, whose CPU kernel is about 3x faster at 8-wide heads",
    )
    bf16_autocast: bool = Field(
        default=False,
        description="Train under CPU bfloat16 autocast (weights stay float32): 1.2x faster a "
        "step on AVX512-BF16 CPUs; off where the CPU lacks bfloat16",
    )
    train_timesteps: PositiveInt = 1000
    prediction_type: Literal["sample", "epsilon"] = Field(
        default="sample", description="x0-prediction gives clean masks after few training steps"
    )
    augment_flip: bool = True
    augment_rot90: bool = True
    augment_shift: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.25, description="Largest random shift, as a fraction of the mask side"
    )
    window: Literal["image", "defect"] = Field(
        default="image",
        description="What the DDPM draws: the whole image (image) or a square around the "
        "defect (defect), which a sample is then placed from: at a few-shot mask's centre "
        "moved by up to place_shift. At the same resolution, defect-window masks are drawn "
        "at several times the detail, and the DDPM learns shapes rather than positions",
    )
    window_margin: Annotated[float, Field(ge=1.0)] = Field(
        default=1.25,
        description="defect window: side = this x the largest few-shot mask extent (capped "
        "at the image side)",
    )
    place_shift: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.25,
        description="defect window: largest random shift of a placed sample from the few-shot "
        "centre, fraction of the image side (CAMA then moves it on objects)",
    )


class MasksSection(Section):
    source: Literal["generator", "folder"] = "generator"
    folder: Path | None = None
    n_masks: PositiveInt = 8
    min_area: Fraction = 0.0005
    max_area: Fraction = 0.35
    max_border_fraction: Fraction = Field(default=1 / 3, description="Reject masks covering more")
    max_tries_per_mask: PositiveInt = 50
    min_area_vs_fewshot: Fraction = Field(
        default=0.0,
        description="Reject generated masks smaller than this fraction of the type's smallest "
        "few-shot mask: a speck too small to hold a defect of the type (0: off)",
    )
    max_pieces_vs_fewshot: bool = Field(
        default=False,
        description="Reject generated masks with more connected components than any few-shot "
        "mask of the type has (a stroke broken into fragments)",
    )
    min_elongation_vs_fewshot: Fraction = Field(
        default=0.0,
        description="Reject generated masks less elongated (length over width) than this "
        "fraction of the type's least elongated few-shot mask: a stub where the type's "
        "defects are strokes (0: off)",
    )
    fallback_to_fewshot: bool = Field(
        default=True,
        description="After max_tries_per_mask rejections, use an augmented few-shot mask "
        "(recorded as mask_source 'generator+fewshot_fallback') instead of failing",
    )
    seed: int = 0
    generator: MaskGeneratorSection = Field(default_factory=MaskGeneratorSection)


class CamaSection(Section):
    """Context-aware mask alignment (MAGIC §3.4)."""

    enabled: bool = True
    foreground: Literal["border_color", "otsu", "grabcut", "model"] = Field(
        default="border_color",
        description="Weight-free method, or 'model' (U²-Net-like, see foreground_model)",
    )
    foreground_model: str | None = Field(
        default=None, description="Local TorchScript file, or HF id / folder (foreground: model)"
    )
    foreground_resolution: PositiveInt = Field(
        default=256, description="Long side the foreground is computed at"
    )
    foreground_min_ratio: Fraction = Field(
        default=0.01, description="An object foreground covering less is reported 'empty'"
    )
    foreground_max_ratio: Fraction = Field(
        default=0.95, description="An object foreground covering more is reported 'full'"
    )
    foreground_model_resolution: PositiveInt = Field(
        default=320, description="Side the learned segmenter sees (U²-Net 320, BiRefNet/RMBG 1024)"
    )
    foreground_model_mean: Annotated[list[float], Field(min_length=3, max_length=3)] = Field(
        default_factory=lambda: [0.0, 0.0, 0.0],
        description="Per-channel mean subtracted from the [0, 1] input (ImageNet for BiRefNet)",
    )
    foreground_model_std: Annotated[list[Positive], Field(min_length=3, max_length=3)] = Field(
        default_factory=lambda: [1.0, 1.0, 1.0], description="Per-channel divisor after the mean"
    )
    foreground_model_output: int = Field(
        default=0, description="Element of a list output holding the final map (BiRefNet: -1)"
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Let a Hugging Face foreground_model run its own code (BiRefNet, RMBG)",
    )
    features: Literal["gradient", "dinov2"] = "gradient"
    features_model: str = "facebook/dinov2-small"
    features_resolution: PositiveInt = Field(
        default=128, description="Long side the dense features are computed at"
    )
    grid_stride: PositiveInt = Field(default=4, description="Pixels per cell (gradient features)")
    min_inside: Fraction = Field(
        default=0.95, description="Least fraction of a moved component on the foreground"
    )
    inpaint_reference: bool = Field(
        default=True, description="Read keypoint features with the defect inpainted away"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    texture_categories: list[str] = Field(
        default_factory=lambda: [
            "carpet",
            "grid",
            "leather",
            "tile",
            "wood",
            "carpet_demo",
            "tile_demo",
        ]
    )
    outside_object_types: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "cable": ["*"],
            "toothbrush": ["*"],
            "screw": ["manipulated_front"],
            "metal_nut": ["bent"],
            "capsule": ["squeeze"],
        }
    )
    min_similarity: Fraction = 0.0
    seed: int = 0


class SAGSection(Section):
    """Spatially adaptive guidance (MAGIC §3.3)."""

    w_m: Positive = 4.0
    w_d: Positive = 7.5
    schedule: Literal["cosine"] = "cosine"


# The critical DDIM eta (where the variance exceeds 1 - alpha_prev) of SD's scaled-linear
# schedule peaks at 2.85 (50 steps; 1.89 at 20): a larger eta_inside is clipped at every step.
ETA_INSIDE_MAX = 3.0
EtaSchedule = Literal[
    "constant",
    "linear_down",
    "linear_up",
    "cosine_down",
    "cosine_up",
    "poly_down",
    "poly_up",
    "exp_down",
    "exp_up",
    "sigmoid_down",
    "sigmoid_up",
]


class MGNISection(Section):
    """Mask-guided noise injection: a per-position DDIM eta (the public MAGIC code's final
    version, ``magic_ddim.py``). The schedule runs from ``eta_inside`` at the first step
    to ``eta_inside_min`` at the last (``*_down``), or the other way (``*_up``)."""

    enabled: bool = False
    eta_inside: Annotated[float, Field(ge=0, le=ETA_INSIDE_MAX)] = Field(
        default=1.0, description="Eta inside the mask (the schedule's maximum)"
    )
    eta_inside_min: Annotated[float, Field(ge=0, le=ETA_INSIDE_MAX)] = Field(
        default=0.0, description="The schedule's minimum (unused by 'constant')"
    )
    eta_outside: Fraction = Field(default=0.0, description="Eta outside the mask (<= 1: valid)")
    schedule: EtaSchedule = "constant"
    power: Positive = Field(default=2.0, description="Exponent of poly_* schedules")
    exp_k: Positive = Field(default=3.0, description="Rate of exp_* schedules")
    sigmoid_k: Positive = Field(default=8.0, description="Slope of sigmoid_* schedules")
    stop_step: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="From this step index on, eta_inside is 0; null: never"
    )
    guard: Literal["clip_to_crit", "zero_before_neg"] = Field(
        default="clip_to_crit",
        description="Where eta_inside would make the DDIM variance invalid (NaN): clip it to "
        "guard_margin x the critical eta, or set it to 0",
    )
    guard_margin: Annotated[float, Field(gt=0, le=1)] = 0.99

    @model_validator(mode="after")
    def _check_range(self) -> MGNISection:
        if self.eta_inside_min > self.eta_inside:
            raise ValueError(
                f"generate.mgni.eta_inside_min: {self.eta_inside_min} is not <= eta_inside "
                f"({self.eta_inside})"
            )
        return self


class PasteBackSection(Section):
    enabled: bool = False
    feather_px: Annotated[int, Field(ge=0)] = 3


class SchedulerSection(Section):
    beta_start: Positive = 0.00085
    beta_end: Positive = 0.012
    beta_schedule: Literal["scaled_linear"] = "scaled_linear"
    steps_offset: Annotated[int, Field(ge=0)] = 1
    prediction_type: Literal["epsilon"] = "epsilon"


class GenerateSection(Section):
    n_pairs: PositiveInt = 6
    steps: PositiveInt = 20
    batch_size: PositiveInt = 4
    seed: int = 0
    sag: SAGSection = Field(default_factory=SAGSection)
    gpp: GPPSection = Field(default_factory=lambda: GPPSection(target="anomaly_token"))
    mgni: MGNISection = Field(default_factory=MGNISection)
    paste_back: PasteBackSection = Field(default_factory=PasteBackSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    latent_mask: Literal["nearest", "coverage"] = Field(
        default="coverage",
        description="Mask on the latent grid (UNet input, SAG, MGNI): 'nearest' as diffusers "
        "(a scratch thinner than a latent cell vanishes), or 'coverage' (cells the mask covers)",
    )
    latent_mask_min_coverage: Fraction = Field(
        default=0.0,
        description="coverage: least share of a cell's pixels in the mask (0: any pixel)",
    )
    init_latents: Literal["noise", "noised_image"] = Field(
        default="noise",
        description="Start of sampling: pure noise (the stock pipeline), or the normal image's "
        "latents noised to the first timestep, as training saw x_T (a latent space with large "
        "channel means, as the tiny VAE's, otherwise comes out shifted in colour)",
    )
    blend_known: bool = Field(
        default=False,
        description="After every DDIM step, set the latent cells outside the mask to the normal's "
        "latents noised to the next timestep (diffusers' 4-channel inpainting; blended latent "
        "diffusion): the defect stays in the mask's cells and the UNet sees the exact context",
    )
    blend_known_margin: Annotated[int, Field(ge=0, le=8)] = Field(
        default=0,
        description="blend_known: latent cells around the mask left to the UNet as well, so a "
        "small defect is not squeezed into its own cells (paste-back still keeps the mask only)",
    )
    gpp_mismatch: Literal["error", "warn"] = Field(
        default="error",
        description="When generate.gpp differs from the checkpoint's training GPP (the paper's "
        "ablation: inference-only GPP hurts)",
    )
    out_dir: Path = Path("data/pairs")


# --------------------------------------------------------------------------- AnomalyControl
class TinyBlip2Section(Section):
    """Shapes of the small random BLIP-2 built from a config for CPU runs."""

    hidden_size: PositiveInt = 32
    layers: PositiveInt = 2
    heads: PositiveInt = 2
    image_size: PositiveInt = 32
    patch_size: PositiveInt = 4
    num_query_tokens: PositiveInt = 8
    initializer_range: Positive = Field(
        default=0.2, description="Weight std; BLIP-2's 0.02 leaves a random model's attention flat"
    )


class Blip2Section(Section):
    """The frozen vision-language model of CSM (AnomalyControl §3.1)."""

    pretrained: str = Field(
        default="tiny",
        description="'tiny' (random, from config) or a Hugging Face id / local folder",
    )
    seed: int = 0
    features: Literal["auto", "multimodal", "image_only"] = Field(
        default="auto",
        description="Q-Former features: 'multimodal' (queries attend the image and the text; "
        "needs the Q-Former text path of an ITM checkpoint), 'image_only' (queries attend the "
        "image; what BLIP-2 OPT / Flan-T5 checkpoints have), or 'auto' (from the checkpoint)",
    )
    tiny: TinyBlip2Section = Field(default_factory=TinyBlip2Section)


class ASEASection(Section):
    """Anomaly-semantic enhanced attention (AnomalyControl §3.2)."""

    enabled: bool = True
    steps: PositiveInt = Field(default=5, description="Adam steps (public code 5; paper Tg = 3)")
    lr: Positive = 0.1
    cache: bool = True


class AdapterSection(Section):
    """Training of the semantic guided adapter (AnomalyControl §3.3); only it trains."""

    lr: Positive = 1e-4
    weight_decay: NonNegative = 1e-2
    grad_clip: Positive = 1.0
    steps: PositiveInt = 40
    batch_size: PositiveInt = 4
    drop_text: Fraction = 0.05
    drop_image: Fraction = 0.05
    drop_both: Fraction = 0.05
    scope: Literal["category", "all"] = Field(
        default="category",
        description="category: one adapter per category, on its few-shot images; all: one "
        "adapter on every category's, trained once and shared by the categories that share "
        "a base model (sd2_inpainting; the tiny preset pretrains one base per category)",
    )
    checkpoint_every: PositiveInt = 20
    seed: int = 0

    @model_validator(mode="after")
    def _check_drops(self) -> AdapterSection:
        total = self.drop_text + self.drop_image + self.drop_both
        if total > 1:
            raise ValueError(f"anomalycontrol.adapter: drop probabilities sum to {total} > 1")
        return self


class CompositeSection(Section):
    """How the generated image is put back on its normal image (``generators/composite.py``).

    The 9-channel inpainting UNet repaints the whole image and diffusers restores the
    unmasked pixels only with ``padding_mask_crop``, so without a composite the normal
    region goes through a VAE round trip."""

    method: Literal["paste_back", "blurred_mask", "none"] = Field(
        default="paste_back",
        description="paste_back (MAGIC's feathered paste: exact beyond feather_px + 1 px), "
        "blurred_mask (the public AnomalyControl code: Gaussian-blurred mask), or none",
    )
    feather_px: Annotated[int, Field(ge=0)] = Field(
        default=3, description="paste_back: alpha falls from 1 at the mask to 0 over this many px"
    )
    blur_sigma: Positive = Field(
        default=5.0, description="blurred_mask: Gaussian sigma in px (public code: 5 at 512 px)"
    )


class AnomalyControlSection(Section):
    """AnomalyControl (arXiv 2412.06510): CSM + ASEA + SGA on MAGIC's inpainting backbone."""

    blip2: Blip2Section = Field(default_factory=Blip2Section)
    n_tokens: PositiveInt = Field(default=4, description="Semantic condition tokens")
    text_template: str = Field(
        default="a photo of a {category} with a {anomaly_type} defect",
        description="Reference text when none is given; {category} and {anomaly_type} filled in",
    )
    captions: Path | None = Field(
        default=None,
        description="Per-image reference texts (csv or jsonl with image_path, text; e.g. "
        "MVTec-Caption); images without one use text_template. None: text_template only",
    )
    asea: ASEASection = Field(default_factory=ASEASection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    mask_source: Literal["fewshot", "masks"] = Field(
        default="fewshot",
        description="Target masks: the target type's few-shot masks, or the masks: section "
        "(MAGIC's mask generator, or masks.folder); --masks DIR overrides both",
    )
    composite: CompositeSection = Field(default_factory=CompositeSection)
    scale: NonNegative = Field(default=1.0, description="lambda of Attn(text) + lambda Attn(sem)")
    strength: Annotated[float, Field(gt=0, le=1)] = 0.7
    steps: PositiveInt = 20
    guidance_scale: Positive = 7.0
    batch_size: PositiveInt = 4
    seed: int = 0
    cache_dir: Path = Path("data/models/anomalycontrol")
    out_dir: Path = Path("data/checkpoints/anomalycontrol")


# --------------------------------------------------------------------------- gates
class KIDSection(Section):
    """Kernel Inception Distance (CONTEXT §3): features, subsets, real reference set."""

    extractor: str = Field(
        default="pixel_stats",
        description="'inception' (torch-fidelity weights), 'module:<path>' or an offline name",
    )
    weights: Path | None = Field(
        default=None, description="Local weights file; None looks in the torch hub cache"
    )
    resolution: PositiveInt = Field(
        default=299, description="Input size for module: extractors (inception resizes itself)"
    )
    subset_size: PositiveInt = 10
    subsets: PositiveInt = 10
    real_split: Literal["all", "fewshot", "test"] = Field(
        default="all", description="Real anomaly images KID compares with (papers: all of the type)"
    )
    seed: int = Field(default=0, description="Seeds subset sampling and random-init extractors")


class LPIPSSection(Section):
    """IC-LPIPS diversity (CONTEXT §3): the lpips network and the cluster cap."""

    net: Literal["vgg", "alex", "squeeze"] = "alex"
    pretrained: bool = Field(default=False, description="ImageNet trunk weights (never downloaded)")
    weights: Path | None = Field(
        default=None,
        description="torchvision trunk weights file; None looks in the torch hub cache",
    )
    resolution: PositiveInt = 64
    max_per_cluster: PositiveInt = 50
    seed: int = Field(default=0, description="Seeds the random trunk when pretrained is false")


class PairChecksSection(Section):
    """Weight-free pixel checks computed for every pair (``gates/pair_checks.py``).

    A threshold set to null turns its check off; the report says which are off.
    """

    dilation_px: Annotated[int, Field(ge=0)] = Field(
        default=4,
        description="The mask is dilated by this before 'outside' is measured (covers "
        "MAGIC's 3 px paste-back feather)",
    )
    psnr_min: NonNegative | None = Field(
        default=30.0, description="Background kept: PSNR (dB) outside the dilated mask"
    )
    ssim_min: Annotated[float, Field(ge=-1, le=1)] | None = Field(
        default=0.9, description="Background kept: mean SSIM outside the dilated mask"
    )
    change_min: NonNegative | None = Field(
        default=8.0, description="Anomaly present: mean |anomaly - normal| inside the mask (0-255)"
    )
    concentration_min: NonNegative | None = Field(
        default=3.0, description="Anomaly present: change inside / (change outside + 1)"
    )
    foreground_share_min: Fraction | None = Field(
        default=0.9, description="Mask placement: share of mask pixels on the normal's object"
    )
    memorisation_min: NonNegative | None = Field(
        default=2.0,
        description="No memorisation: least distance (0-255) of the defect crop to every "
        "few-shot defect crop of the type (and their flips / 90-degree turns)",
    )
    crop_size: Annotated[int, Field(ge=8)] = Field(
        default=32,
        description="Side defect crops of different shapes are compared at (memorisation); "
        "crops of one shape are compared pixel for pixel",
    )
    duplicate_iou_min: Fraction | None = Field(
        default=0.9, description="Near-duplicate: mask IoU at least this ..."
    )
    duplicate_difference_max: NonNegative = Field(
        default=2.0, description="... and mean |difference| (0-255) over the masks at most this"
    )


class TypeGatesSection(Section):
    """Per-type distribution gates that calibrate themselves against reference sets."""

    kid_references: list[Literal["normals", "cutpaste"]] = Field(
        default_factory=lambda: ["normals", "cutpaste"],
        description="KID of the defect regions must not be above that of each reference set "
        "built from the same normals and masks (see kid_tie_se); [] turns the gate off",
    )
    kid_tie_se: NonNegative = Field(
        default=2.0,
        description="A defect-region KID within this many standard errors (paired jackknife) "
        "above a reference's ties and passes; 0 = strictly below. Identical sets have no "
        "error, so 'doing nothing' never ties with the normals",
    )
    region_size: Annotated[int, Field(ge=16)] = Field(
        default=64, description="Side of the defect-region crops fed to the KID extractor"
    )
    region_context: NonNegative = Field(
        default=0.5, description="Margin around the mask's box, as a fraction of its side"
    )
    region_window: Literal["inside", "centred"] = Field(
        default="inside",
        description="inside: the crop window is moved to stay within the image (the defect "
        "off-centre); centred: centred on the defect, zero outside the image. Zero padding "
        "made KID measure how near the border a defect lies (bench/RESULTS.md (t))",
    )
    ic_lpips_ratio_min: NonNegative | None = Field(
        default=0.1,
        description="IC-LPIPS must reach this fraction of the real test anomalies' own IC-LPIPS",
    )


class GatesSection(Section):
    """Quality gates a generated version must pass before it is publishable."""

    kid_max: Positive | None = Field(
        default=None,
        description="Absolute KID x1e3 ceiling; applied only with the standard Inception",
    )
    ic_lpips_min: NonNegative | None = Field(
        default=None, description="Absolute IC-LPIPS floor; applied only with ImageNet LPIPS-VGG"
    )
    mask_area_min: Fraction = 0.0005
    mask_area_max: Fraction = 0.5
    required_metadata: list[str] | None = Field(
        default=None, description="Pair columns that must be non-null; None = all PAIR_COLUMNS"
    )
    on_pair_failure: Literal["fail", "drop"] = Field(
        default="fail",
        description="fail: a failing pair fails its type; drop: failing pairs stay out of the "
        "shards and the type needs its full count from the rest",
    )
    extra_candidates: NonNegative = Field(
        default=0.25,
        description="With on_pair_failure: drop, the generator makes n_pairs * (1 + this) "
        "candidates per type",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    report_samples: PositiveInt = Field(default=4, description="Sample rows per type in report")
    pair_checks: PairChecksSection = Field(default_factory=PairChecksSection)
    type_gates: TypeGatesSection = Field(default_factory=TypeGatesSection)
    kid: KIDSection = Field(default_factory=KIDSection)
    lpips: LPIPSSection = Field(default_factory=LPIPSSection)
    out_dir: Path = Path("data/reports")


# --------------------------------------------------------------------------- detector
class PerlinSection(Section):
    """DRAEM-style Perlin-noise anomalies (Zavrtanik et al. 2021, §3.1.1): a thresholded
    Perlin mask filled with another image's augmented texture."""

    blend_min: Fraction = Field(default=0.2, description="Lower bound of the blend factor beta")
    blend_max: Fraction = Field(default=1.0, description="Upper bound of the blend factor beta")
    texture_dir: Path | None = Field(
        default=None, description="Texture images (e.g. DTD); None uses other categories' normals"
    )
    max_tries: PositiveInt = 10


class CutPasteSection(Section):
    """CutPaste anomalies (Li et al. 2021, §3.1): a jittered patch pasted elsewhere."""

    area_min: Fraction = 0.02
    area_max: Fraction = 0.15
    aspect_max: Annotated[float, Field(ge=1)] = Field(
        default=3.3, description="Aspect ratio is log-uniform in [1/aspect_max, aspect_max]"
    )
    rotation_deg: Annotated[float, Field(ge=0, le=180)] = Field(
        default=45.0, description="Patch rotation range +/- degrees; 0 disables"
    )
    jitter: Fraction = Field(default=0.1, description="Brightness/contrast/saturation jitter")


class BaselinesSection(Section):
    """Settings of the baseline generators (``generator: perlin | cutpaste``)."""

    perlin: PerlinSection = Field(default_factory=PerlinSection)
    cutpaste: CutPasteSection = Field(default_factory=CutPasteSection)


class DetectorSection(Section):
    """Downstream detectors trained on the pairs and scored on the real test split (CONTEXT §3)."""

    enabled: bool = True
    resolution: PositiveInt = 64
    base_width: PositiveInt = Field(
        default=16, description="Width of DRAEM's discriminative network (64 in DRAEM)"
    )
    epochs: PositiveInt = 3
    steps_per_epoch: PositiveInt | None = Field(
        default=None, description="None: an epoch is one pass over the generated pairs"
    )
    batch_size: Annotated[int, Field(ge=2)] = 8
    lr: Positive = 1e-4
    focal_gamma: NonNegative = 2.0
    seed: int = 0
    selection: Literal["fixed_schedule", "validation"] = "fixed_schedule"
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.2,
        description="Share of train normals and pairs held out when selection=validation",
    )
    score_pool: PositiveInt = Field(
        default=21, description="Image score = max of the map after this k x k average pooling"
    )
    aupro_fpr_limit: Annotated[float, Field(gt=0, le=1)] = 0.3
    classifier_epochs: PositiveInt = 3
    classifier_lr: Positive = 1e-3
    classifier_weights: Path | None = None
    classifier_arch: Literal["resnet34", "resnet18"] = Field(
        default="resnet34",
        description="resnet34: the papers' classifier; resnet18: half the "
        "parameters, so about half the CPU time a step at small inputs",
    )
    classifier_batch_size: PositiveInt | None = Field(
        default=None, description="Training batch of the classifier (null: batch_size)"
    )
    classifier_input: Literal["image", "defect_crop"] = Field(
        default="image",
        description="image: the whole image at `resolution` (the papers); defect_crop: a "
        "square around the mask's box (generated mask / real ground truth), for small "
        "defects a from-scratch ResNet cannot find in a whole image from a few examples",
    )
    classifier_crop_size: PositiveInt = Field(default=32, description="defect_crop: px side")
    classifier_crop_context: NonNegative = Field(
        default=0.5, description="defect_crop: margin around the mask's box, fraction of its side"
    )
    classifier_augment: bool = Field(
        default=False,
        description="Random flips and right-angle turns of each training image, every epoch",
    )
    reference_model: Literal["patchcore", "padim", "none"] = "padim"
    reference_backbone: str = "resnet18"
    reference_pre_trained: bool = False
    baselines: list[Literal["perlin", "cutpaste", "none"]] = Field(
        default_factory=lambda: ["perlin", "cutpaste", "none"]
    )
    num_threads: Annotated[int, Field(ge=0)] = Field(
        default=0, description="CPU threads for torch while detecting; 0 keeps torch's default"
    )
    workers: PositiveInt = Field(
        default=1,
        description="Categories detected at once, each in its own process on num_threads "
        "threads (same rows as one after another)",
    )
    out_dir: Path = Path("data/detectors")


# --------------------------------------------------------------------------- publishing
class ShardsSection(Section):
    """webdataset shards: one shard set per (dataset, category) under ``out_dir/<version>``."""

    maxcount: PositiveInt = Field(default=1000, description="Samples per shard at most")
    maxsize: PositiveInt = Field(
        default=1 << 30, description="Bytes per shard; a shard closes once it reaches this"
    )
    val_fraction: Fraction = Field(
        default=0.1, description="Pairs assigned to the 'val' split, by a hash of their key"
    )
    out_dir: Path = Path("data/shards")


class PublishSection(Section):
    enabled: bool = False
    bucket: str | None = None
    prefix: str = "anomaly-factory"
    version: str | None = None
    multipart_threshold: PositiveInt = 8 << 20
    multipart_chunksize: PositiveInt = 8 << 20
    max_attempts: PositiveInt = Field(
        default=5, description="Attempts per request (botocore) and per object (upload loop)"
    )
    retry_backoff_s: NonNegative = Field(
        default=1.0, description="First wait between object attempts; doubles each time"
    )
    lease_ttl_s: Positive = Field(
        default=900.0,
        description="A publisher's lease on its version expires this long after its last "
        "renewal (a killed publisher's lease frees after this; it renews every quarter)",
    )
    dvc: bool | Literal["auto"] = Field(
        default="auto",
        description="publish also runs dvc add/commit + dvc push; auto = when in a DVC repo",
    )
    dvc_remote: str | None = Field(default=None, description="DVC remote name; None = default")
    git_tag: bool | Literal["auto"] = Field(
        default="auto",
        description="publish also commits the DVC metadata and tags git; auto = in a repo",
    )


class GPUDeploymentsSection(Section):
    """``<flow name>/<deployment name>`` of each GPU flow (``flows.gpu``) on the work pool."""

    category: str = "category/category"
    detect: str = "detect/detect"

    def for_flow(self, name: str) -> str:
        return str(getattr(self, name))


class OrchestrationSection(Section):
    """Prefect: where GPU stages run, retries, caching. The deployments themselves (pools,
    schedule, pull step) are defined once, in prefect.yaml."""

    work_pool: str = Field(
        default="cuda", description="Process pool of GPU workers (prefect.yaml's GPU flows' pool)"
    )
    gpu_deployments: GPUDeploymentsSection = Field(default_factory=lambda: GPUDeploymentsSection())
    dispatch: Literal["local", "work_pool"] = Field(
        default="local",
        description="local: on this machine (local_workers); work_pool: run_deployment to workers",
    )
    local_workers: PositiveInt = Field(
        default=1,
        description="local dispatch: GPU runs (categories, or types with fan_out: type) at once, "
        "each in its own process with an "
        "equal share of the CPU cores (several small models train faster side by side than "
        "one on all cores); 1 runs them in order in the flow's process",
    )
    fan_out: Literal["category", "type"] = Field(
        default="category",
        description="One GPU run per category (its types in order), or per (category, type) "
        "after one run per category for what its types share (MAGIC's tiny base model, "
        "AnomalyControl's adapter): more runs at once on a cluster of GPUs",
    )
    torch_threads: PositiveInt | None = Field(
        default=None,
        description="CPU threads of the generator's trainings and sampling; null: under local "
        "dispatch the cores divided by local_workers, in every route (the bytes of MAGIC's "
        "pairs depend on it), else torch's default",
    )
    gpu_concurrency_limit: PositiveInt = 1
    retries: Annotated[int, Field(ge=0)] = 2
    retry_delay_s: NonNegative = 5
    heartbeat_timeout_s: Positive = Field(
        default=60, description="A GPU run silent this long is marked crashed and retried"
    )
    start_timeout_s: Positive = Field(
        default=3600, description="A GPU run no worker picks up in this time is abandoned"
    )
    cache: bool = True

    @model_validator(mode="before")
    @classmethod
    def _moved_to_prefect_yaml(cls, data: Any) -> Any:
        for key in ("schedule_cron", "factory_work_pool"):
            if isinstance(data, dict) and key in data:
                raise ValueError(
                    f"orchestration.{key}: moved to prefect.yaml, the one definition of the "
                    "deployments (`anomaly-factory deploy --cron ...` replaces the schedule)"
                )
        return data


class StoreSection(Section):
    """How a store data root (``data_root: s3://…``) is mirrored; see ``storage/store.py``."""

    sync_every_s: Positive = Field(
        default=60,
        description="A GPU run pushes what it has made (fine-tune resume states, pairs) this "
        "often, so a retry on another machine resumes from it",
    )


# Where the files live and how the run is orchestrated (pools, fan-out, retries), not what
# it makes: a version's name and bytes are the same in any store and on any number of
# workers (the two-worker test checks it), so these stay out of the config hash. Only an
# explicit thread count is kept: it changes the float rounding of MAGIC's pairs.
NOT_HASHED = {"profile", "data_root", "store", "orchestration"}


class FactoryConfig(Section):
    """The resolved configuration of one run (one profile)."""

    profile: str = DEFAULT_PROFILE
    data_root: str | None = Field(
        default=None,
        description="Where the run's data/ lives: null is the working directory; a folder, "
        "or an fsspec URL such as s3://bucket/prefix (credentials: the standard AWS "
        "mechanisms); `anomaly-factory run --data-root` overrides it",
    )
    store: StoreSection = Field(default_factory=StoreSection)
    seed: int = 0
    generator: GeneratorName = "magic"
    datasets: DatasetsSection = Field(default_factory=DatasetsSection)
    demo: DemoSection = Field(default_factory=DemoSection)
    split: SplitSection = Field(default_factory=SplitSection)
    model: ModelSection = Field(default_factory=ModelSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    masks: MasksSection = Field(default_factory=MasksSection)
    cama: CamaSection = Field(default_factory=CamaSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    anomalycontrol: AnomalyControlSection = Field(default_factory=AnomalyControlSection)
    gates: GatesSection = Field(default_factory=GatesSection)
    detector: DetectorSection = Field(default_factory=DetectorSection)
    baselines: BaselinesSection = Field(default_factory=BaselinesSection)
    shards: ShardsSection = Field(default_factory=ShardsSection)
    publish: PublishSection = Field(default_factory=PublishSection)
    orchestration: OrchestrationSection = Field(default_factory=OrchestrationSection)

    @model_validator(mode="after")
    def _check_consistency(self) -> FactoryConfig:
        if self.finetune.anomaly_token not in self.finetune.prompt.split():
            raise ValueError(
                f"finetune.prompt: {self.finetune.prompt!r} does not contain "
                f"finetune.anomaly_token {self.finetune.anomaly_token!r}"
            )
        if self.masks.min_area >= self.masks.max_area:
            raise ValueError(
                f"masks.min_area: {self.masks.min_area} is not < masks.max_area "
                f"{self.masks.max_area}"
            )
        return self

    @model_validator(mode="after")
    def _check_metrics_possible(self) -> FactoryConfig:
        """Combinations that leave the gates nothing to measure."""
        from anomaly_factory.metrics.kid import MIN_SUBSET

        if self.generate.n_pairs < MIN_SUBSET:
            raise ValueError(
                f"generate.n_pairs: {self.generate.n_pairs} leaves KID and IC-LPIPS nothing to "
                f"measure (they need >= {MIN_SUBSET} pairs per type)"
            )
        if self.gates.kid.subset_size < MIN_SUBSET:
            raise ValueError(
                f"gates.kid.subset_size: {self.gates.kid.subset_size} is not >= {MIN_SUBSET} "
                "(the unbiased KID divides by m(m-1))"
            )
        if self.gates.mask_area_min >= self.gates.mask_area_max:
            raise ValueError(
                f"gates.mask_area_min: {self.gates.mask_area_min} is not < gates.mask_area_max "
                f"{self.gates.mask_area_max} (no pair could pass)"
            )
        from anomaly_factory.metrics.ic_lpips import MIN_CLUSTER

        if self.gates.lpips.max_per_cluster < MIN_CLUSTER:
            raise ValueError(
                f"gates.lpips.max_per_cluster: {self.gates.lpips.max_per_cluster} is not >= "
                f"{MIN_CLUSTER} (IC-LPIPS is a mean distance within a cluster)"
            )
        if any(d.name == "demo" for d in self.datasets.items):
            fewshot = int(self.demo.n_per_type * self.split.fewshot_fraction)
            if fewshot < 1:
                raise ValueError(
                    f"demo.n_per_type: {self.demo.n_per_type} with split.fewshot_fraction "
                    f"{self.split.fewshot_fraction} gives no few-shot image per anomaly type"
                )
            # IC-LPIPS clusters the pairs by their nearest few-shot image and needs one
            # cluster with two pairs: only more pairs than clusters guarantee it
            if self.generate.n_pairs <= fewshot:
                raise ValueError(
                    f"generate.n_pairs: {self.generate.n_pairs} cannot measure IC-LPIPS: the "
                    f"demo's {fewshot} few-shot images per type make {fewshot} clusters, and "
                    f"a cluster needs >= {MIN_CLUSTER} pairs (n_pairs > {fewshot} guarantees one)"
                )
        return self

    def hash(self) -> str:
        """Stable hash of the resolved values (excluding the profile name, where the files
        live and how the run is orchestrated: :data:`NOT_HASHED`)."""
        data = self.model_dump(mode="json", exclude=NOT_HASHED)
        data["orchestration"] = {"torch_threads": self.orchestration.torch_threads}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(InputError):
    """A configuration problem, with one line per offending field."""


# --------------------------------------------------------------------------- loading
def _format_error(err: dict[str, Any], prefix: str = "") -> str:
    path = prefix + ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    ctx = err.get("ctx") or {}
    kind = err["type"]
    comparisons = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in comparisons:
        key, op = comparisons[kind]
        return f"{path}: {value!r} is not {op} {ctx.get(key)}"
    if kind == "extra_forbidden":
        return f"{path}: unknown key (value {value!r})"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "literal_error":
        return f"{path}: {value!r} is not one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{path}: {value!r} is invalid ({err['msg']})"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (lists are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_config_path() -> Path:
    """The config used when none is given: $ANOMALY_FACTORY_CONFIG, ./pipelines.yaml, packaged."""
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    local = Path("pipelines.yaml")
    if local.is_file():
        return local
    packaged = resources.files("anomaly_factory").joinpath("pipelines.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / "pipelines.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML
    silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (line {line}; first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else default_config_path()
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def available_profiles(raw: dict[str, Any]) -> list[str]:
    return sorted({DEFAULT_PROFILE, *(raw.get("profiles") or {})})


def resolve(raw: dict[str, Any], profile: str | None = None) -> FactoryConfig:
    """Merge the base sections with one profile's overrides and validate the result."""
    base = {k: v for k, v in raw.items() if k != "profiles"}
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"profiles: {profiles!r} is not a mapping")
    named = base.pop("profile", None)
    if named is not None and (not isinstance(named, str) or named not in available_profiles(raw)):
        raise ConfigError(f"profile: {named!r} is not one of {available_profiles(raw)}")
    profile = profile or named or DEFAULT_PROFILE
    if profile != DEFAULT_PROFILE and profile not in profiles:
        raise ConfigError(f"profile: {profile!r} is not one of {available_profiles(raw)}")
    override = profiles.get(profile) or {}
    merged = deep_merge(base, override)
    merged["profile"] = profile
    try:
        return FactoryConfig.model_validate(merged)
    except ValidationError as exc:
        prefix = f"profiles.{profile}: " if override else ""
        lines = [prefix + _format_error(e) for e in exc.errors(include_url=False)]
        raise ConfigError("\n".join(lines)) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> FactoryConfig:
    """Load ``pipelines.yaml`` (or the packaged default) for one profile.

    >>> cfg = load_config(profile="paper")
    >>> cfg.generate.sag.w_m, cfg.generate.steps
    (4.0, 50)
    """
    raw = read_config_file(path)
    cfg = resolve(raw, profile)
    if overrides:
        merged = deep_merge(cfg.model_dump(mode="python"), overrides)
        try:
            cfg = FactoryConfig.model_validate(merged)
        except ValidationError as exc:
            lines = [_format_error(e) for e in exc.errors(include_url=False)]
            raise ConfigError("\n".join(lines)) from None
    return cfg


def validate_all_profiles(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Validate every profile of a file; return the profile names or raise ConfigError."""
    raw = read_config_file(path)
    names = available_profiles(raw)
    errors = []
    for name in names:
        try:
            resolve(raw, name)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:  # an error of the shared sections shows up once, not once per profile
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    return names
