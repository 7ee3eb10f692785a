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
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PROFILE = "tiny"
CONFIG_ENV = "ANOMALY_FACTORY_CONFIG"

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- datasets
DatasetName = Literal["mvtec_ad", "visa", "mvtec_3d_ad", "demo"]


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

    unet_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    vae_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    latent_channels: Literal[4] = 4
    text_hidden_size: PositiveInt = 64
    text_layers: PositiveInt = 2
    cross_attention_dim: PositiveInt = 64
    pretrain_vae_steps: Annotated[int, Field(ge=0)] = 200
    pretrain_unet_steps: Annotated[int, Field(ge=0)] = 300
    pretrain_lr: Positive = 1e-3
    pretrain_batch_size: PositiveInt = 8


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
    seed: int = 0
    gpp: GPPSection = Field(default_factory=GPPSection)
    out_dir: Path = Path("data/checkpoints")


class MaskGeneratorSection(Section):
    resolution: PositiveInt = 32
    steps: PositiveInt = 200
    sample_steps: PositiveInt = 25
    threshold: Fraction = 0.5
    lr: Positive = 1e-3


class MasksSection(Section):
    source: Literal["generator", "folder"] = "generator"
    folder: Path | None = None
    n_masks: PositiveInt = 8
    min_area: Fraction = 0.0005
    max_area: Fraction = 0.35
    max_border_fraction: Fraction = Field(default=1 / 3, description="Reject masks covering more")
    max_tries_per_mask: PositiveInt = 50
    seed: int = 0
    generator: MaskGeneratorSection = Field(default_factory=MaskGeneratorSection)


class CamaSection(Section):
    """Context-aware mask alignment (MAGIC §3.4)."""

    enabled: bool = True
    foreground: str = "border_color"
    foreground_model: str | None = None
    features: str = "gradient"
    features_model: str = "facebook/dinov2-small"
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


class MGNISection(Section):
    enabled: bool = False
    eta_inside: NonNegative = 1.0
    eta_outside: NonNegative = 0.0


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
    out_dir: Path = Path("data/pairs")


# --------------------------------------------------------------------------- gates
class KIDSection(Section):
    extractor: str = Field(
        default="pixel_stats",
        description="'inception' (torch-fidelity weights), 'module:<path>' or an offline name",
    )
    weights: Path | None = None
    resolution: PositiveInt = 299
    subset_size: PositiveInt = 10
    subsets: PositiveInt = 10


class LPIPSSection(Section):
    net: Literal["vgg", "alex", "squeeze"] = "alex"
    pretrained: bool = False
    weights: Path | None = None
    resolution: PositiveInt = 64
    max_per_cluster: PositiveInt = 50


class GatesSection(Section):
    kid_max: Positive | None = None
    ic_lpips_min: NonNegative | None = None
    mask_area_min: Fraction = 0.0005
    mask_area_max: Fraction = 0.5
    kid: KIDSection = Field(default_factory=KIDSection)
    lpips: LPIPSSection = Field(default_factory=LPIPSSection)
    out_dir: Path = Path("data/reports")


# --------------------------------------------------------------------------- detector
class DetectorSection(Section):
    enabled: bool = True
    resolution: PositiveInt = 64
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 8
    lr: Positive = 1e-4
    seed: int = 0
    selection: Literal["fixed_schedule", "validation"] = "fixed_schedule"
    classifier_epochs: PositiveInt = 3
    classifier_weights: Path | None = None
    reference_model: Literal["patchcore", "padim", "none"] = "padim"
    reference_pre_trained: bool = False
    baselines: list[Literal["perlin", "cutpaste", "none"]] = Field(
        default_factory=lambda: ["perlin", "cutpaste", "none"]
    )


# --------------------------------------------------------------------------- publishing
class ShardsSection(Section):
    maxcount: PositiveInt = 1000
    maxsize: PositiveInt = 1 << 30
    out_dir: Path = Path("data/shards")


class PublishSection(Section):
    enabled: bool = False
    bucket: str | None = None
    prefix: str = "anomaly-factory"
    version: str | None = None
    multipart_threshold: PositiveInt = 8 << 20
    multipart_chunksize: PositiveInt = 8 << 20
    max_attempts: PositiveInt = 5
    dvc: bool = False
    git_tag: bool = False


class OrchestrationSection(Section):
    work_pool: str = "cuda"
    gpu_deployment: str = "gpu-stage/gpu-stage"
    dispatch: Literal["local", "work_pool"] = "local"
    gpu_concurrency_limit: PositiveInt = 1
    retries: Annotated[int, Field(ge=0)] = 2
    retry_delay_s: NonNegative = 5
    cache: bool = True
    schedule_cron: str = "0 3 * * 0"


class FactoryConfig(Section):
    """The resolved configuration of one run (one profile)."""

    profile: str = DEFAULT_PROFILE
    seed: int = 0
    generator: Literal["magic", "anomalycontrol", "perlin", "cutpaste"] = "magic"
    datasets: DatasetsSection = Field(default_factory=DatasetsSection)
    demo: DemoSection = Field(default_factory=DemoSection)
    split: SplitSection = Field(default_factory=SplitSection)
    model: ModelSection = Field(default_factory=ModelSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    masks: MasksSection = Field(default_factory=MasksSection)
    cama: CamaSection = Field(default_factory=CamaSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    gates: GatesSection = Field(default_factory=GatesSection)
    detector: DetectorSection = Field(default_factory=DetectorSection)
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

    def hash(self) -> str:
        """Stable hash of the resolved values (excluding the profile name)."""
        data = self.model_dump(mode="json", exclude={"profile"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
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


def read_config_file(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else default_config_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
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
    profile = profile or base.pop("profile", None) or DEFAULT_PROFILE
    base.pop("profile", None)
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
    if errors:
        raise ConfigError("\n".join(errors))
    return names
