"""Compact per-type checkpoints of MAGIC's fine-tuning, and the state to resume it.

A full fp32 SD2 pipeline is about 5 GB per anomaly type (CONTEXT §1); only the
fine-tuned part is saved, in the standard diffusers formats so that any
diffusers user can load it:

* ``save: unet`` -> ``unet/`` (``UNet2DConditionModel.save_pretrained``, safetensors);
* ``save: lora`` -> ``pytorch_lora_weights.safetensors`` (``save_lora_weights``,
  loaded by ``pipe.load_lora_weights``).

``checkpoint.json`` says what produced the weights (base model, config hash,
steps, sigma, target, category, anomaly type) and is written last, so a folder
is a finished checkpoint exactly when it exists. Resume state lives in
``train_state-<step>/`` folders (trainable weights, optimizer, RNG state).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.io import atomic_write_json, sha256_file

META_FILE = "checkpoint.json"
UNET_DIR = "unet"
LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_PREFIX = "train_state-"


class CheckpointError(InputError):
    """A checkpoint folder is missing files or does not match the configuration."""


# --------------------------------------------------------------------------- final weights
def is_lora(unet: UNet2DConditionModel) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_checkpoint(unet_or_lora: UNet2DConditionModel, out_dir: Path, meta: dict) -> Path:
    """Save the fine-tuned UNet (or its LoRA, when the UNet carries a peft adapter).

    The old ``checkpoint.json`` is removed first and the new one written last,
    so an interrupted save never looks finished. Returns the ``checkpoint.json`` path.
    """
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out_dir))
    try:
        if is_lora(unet_or_lora):
            layers = get_peft_model_state_dict(unet_or_lora)
            from diffusers.utils import convert_state_dict_to_diffusers

            StableDiffusionInpaintPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=convert_state_dict_to_diffusers(layers),
                safe_serialization=True,
                unet_lora_adapter_metadata=unet_or_lora.peft_config["default"].to_dict(),
            )
            name, kind = LORA_FILE, "lora"
        else:
            unet_or_lora.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
            name, kind = UNET_DIR, "unet"
        for stale in (out_dir / UNET_DIR, out_dir / LORA_FILE):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    full = {**meta, "save": kind, "weights_hash": checkpoint_hash(out_dir)}
    return atomic_write_json(out_dir / META_FILE, full)


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The final weight files of a checkpoint (not the resume state), sorted."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted((checkpoint_dir / UNET_DIR).glob("*.safetensors"))
    if (checkpoint_dir / LORA_FILE).is_file():
        files.append(checkpoint_dir / LORA_FILE)
    return files


def checkpoint_hash(checkpoint_dir: Path) -> str:
    """Stable hash of a checkpoint's weight files (their relative names and contents)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = weight_files(checkpoint_dir)
    if not files:
        raise CheckpointError(f"{checkpoint_dir}: no {UNET_DIR}/*.safetensors or {LORA_FILE}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(checkpoint_dir).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


def read_meta(checkpoint_dir: Path) -> dict[str, Any] | None:
    """``checkpoint.json`` of a finished checkpoint, or None."""
    path = Path(checkpoint_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc


def load_finetuned_pipeline(
    cfg: FactoryConfig,
    checkpoint_dir: Path,
    category: str | None = None,
    manifest_path: Path | None = None,
) -> StableDiffusionInpaintPipeline:
    """The base pipeline of ``cfg`` with a checkpoint's fine-tuned UNet or LoRA applied.

    For the tiny preset without a manifest, the base is the cached folder that
    ``checkpoint.json`` names.
    """
    from anomaly_factory.generators.magic.models import from_folder, load_base_pipeline

    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    if meta is None:
        raise CheckpointError(f"{checkpoint_dir}: no {META_FILE} (training unfinished?)")
    category = category or meta.get("category")
    if cfg.model.preset == "tiny" and manifest_path is None:
        base = Path(meta.get("base_model", ""))
        if not (base / "model_index.json").is_file():
            raise CheckpointError(
                f"{checkpoint_dir / META_FILE}: base_model {str(base)!r} is not a model folder; "
                "pass the image manifest to rebuild it"
            )
        pipe = from_folder(base, cfg.model, cfg.generate.scheduler)
    else:
        pipe = load_base_pipeline(cfg, category, manifest_path)
    if meta.get("save") == "lora":
        if not (checkpoint_dir / LORA_FILE).is_file():
            raise CheckpointError(
                f"{checkpoint_dir}: {META_FILE} says lora but {LORA_FILE} is missing"
            )
        pipe.load_lora_weights(checkpoint_dir, weight_name=LORA_FILE)
    else:
        if not (checkpoint_dir / UNET_DIR).is_dir():
            raise CheckpointError(
                f"{checkpoint_dir}: {META_FILE} says unet but {UNET_DIR}/ is missing"
            )
        unet = UNet2DConditionModel.from_pretrained(
            checkpoint_dir / UNET_DIR, dtype=pipe.unet.dtype
        )
        pipe.unet = unet.to(pipe.device).eval()
    return pipe


# --------------------------------------------------------------------------- resume state
@dataclass
class TrainState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor


def save_train_state(
    out_dir: Path,
    step: int,
    key: str,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> Path:
    """Write ``train_state-<step>/`` atomically (temp folder + rename), then drop older ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{STATE_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".state-", dir=out_dir))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
        save_file(tensors, tmp / "trainable.safetensors")
        save_file({"rng": generator.get_state()}, tmp / "rng.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "key": key})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in state_dirs(out_dir):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def state_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob(f"{STATE_PREFIX}*") if p.is_dir())


def load_train_state(out_dir: Path, key: str) -> TrainState | None:
    """The latest resume state written under the same training key, or None."""
    for folder in reversed(state_dirs(out_dir)):
        info_path = folder / "state.json"
        if not info_path.is_file():
            continue
        info = json.loads(info_path.read_text())
        if info.get("key") != key:
            return None
        return TrainState(
            step=int(info["step"]),
            trainable=load_file(folder / "trainable.safetensors"),
            optimizer=torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"),
            rng=load_file(folder / "rng.safetensors")["rng"],
        )
    return None


def clear_train_state(out_dir: Path) -> None:
    for folder in state_dirs(out_dir):
        shutil.rmtree(folder, ignore_errors=True)
