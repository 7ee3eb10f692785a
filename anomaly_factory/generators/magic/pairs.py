"""MAGIC pair generation for one (category, anomaly type): MAGIC §3, CONTEXT §1 "Output".

For pair ``i`` (seed ``derive_seed(generate.seed, category, type, i)``):

1. take mask ``i`` of the type's mask source (:mod:`.masks`: the trained mask
   generator or a folder of masks);
2. pick a normal ``train`` image of the category and a ``fewshot`` reference
   image of the type, both at random from the pair's seed;
3. align the mask on the normal image (:func:`make_aligner`: CAMA, or identity);
4. inpaint it with the MAGIC sampler (:mod:`.sampler`), ``generate.batch_size``
   pairs per UNet call.

Everything happens at ``model.resolution``: the normal image is resized to it
(bicubic) before generation, and the saved image, mask and normal image all
have that size, so the mask indexes both images pixel for pixel.

Output is :mod:`anomaly_factory.generators.output`'s format. Batches cover fixed
index ranges ``[k*B, (k+1)*B)``; a resumed run recomputes a partly saved batch
whole and saves only its missing pairs, so an interrupted and resumed run gives
the same bytes as an uninterrupted one (batched kernels are not bit-identical
across batch compositions). ``generate.json`` in the output folder records the
settings; a rerun with different settings is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_factory.config import FactoryConfig
from anomaly_factory.generators.magic.masks import derive_seed, mask_source
from anomaly_factory.generators.output import (
    PAIRS_FILE,
    is_done,
    pair_key,
    save_pair,
    write_pairs_manifest,
)
from anomaly_factory.io import atomic_write_json
from anomaly_factory.manifest import read_images, select

log = logging.getLogger(__name__)

GENERATOR_NAME = "magic"
SETTINGS_FILE = "generate.json"
MASK_GENERATOR_DIR = "mask_generator"

Aligner = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, dict]]
ProgressFn = Callable[[int, int], None]


def identity_aligner(
    mask: np.ndarray, reference_image: np.ndarray, normal_image: np.ndarray, seed: int
) -> tuple[np.ndarray, dict]:
    """No alignment: the mask stays where the mask source put it."""
    return mask, {"cama_status": "disabled"}


def make_aligner(cfg: FactoryConfig, category: str, anomaly_type: str) -> Aligner:
    """The one place the mask aligner is chosen: CAMA (MAGIC §3.4) when enabled, else identity."""
    if cfg.cama.enabled and importlib.util.find_spec("anomaly_factory.generators.magic.cama"):
        from anomaly_factory.generators.magic.cama import CamaAligner

        return CamaAligner(cfg, category, anomaly_type)
    return identity_aligner


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """An RGB uint8 image resized (bicubic) to ``size`` x ``size``."""
    try:
        img = Image.open(path).convert("RGB")
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"{path}: cannot read image: {exc}") from exc
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def pair_seed(cfg: FactoryConfig, category: str, anomaly_type: str, index: int) -> int:
    return derive_seed(cfg.generate.seed, category, anomaly_type, index)


def _pipeline_and_hash(
    cfg: FactoryConfig, category: str, manifest_path: Path, checkpoint: Path | None, load: bool
):
    """The pipeline (if ``load``) and the hash naming its weights."""
    from anomaly_factory.generators.magic import checkpoints, models

    if checkpoint is None:
        base = models.base_model_id(cfg, category, manifest_path)
        digest = "base-" + hashlib.sha256(base.encode()).hexdigest()[:16]
        pipe = models.load_base_pipeline(cfg, category, manifest_path) if load else None
    else:
        digest = checkpoints.checkpoint_hash(Path(checkpoint))
        pipe = (
            checkpoints.load_finetuned_pipeline(cfg, Path(checkpoint), category, manifest_path)
            if load
            else None
        )
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
    return pipe, digest


def _settings(cfg: FactoryConfig, category: str, anomaly_type: str, ckpt_hash: str) -> dict:
    """What determines the outputs of a pairs folder (n_pairs excluded: runs may extend)."""
    return {
        "category": category,
        "anomaly_type": anomaly_type,
        "checkpoint_hash": ckpt_hash,
        "generate": cfg.generate.model_dump(mode="json", exclude={"n_pairs", "out_dir"}),
        "masks": cfg.masks.model_dump(mode="json", exclude={"n_masks"}),
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir", "device"}),
        "cama": cfg.cama.model_dump(mode="json"),
        "prompt": cfg.finetune.prompt,
    }


def _check_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            raise ValueError(
                f"{path}: the folder holds pairs made with other settings (differ: {diff}); "
                f"use another --out or delete the folder"
            )
    else:
        atomic_write_json(path, settings)


def generate_pairs(
    cfg: FactoryConfig,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    n_pairs: int,
    out_dir: Path,
    checkpoint: Path | None = None,
    *,
    on_pair: ProgressFn | None = None,
    aligner: Aligner | None = None,
    **_ignored_reference_options: Any,
) -> Path:
    """Generate ``n_pairs`` MAGIC pairs into ``out_dir``; return ``out_dir/pairs.parquet``.

    ``checkpoint`` is a fine-tuned checkpoint folder (issue 3); None uses the base
    pipeline. ``on_pair(done, total)`` is called after every saved pair.
    ``aligner`` overrides :func:`make_aligner`. Reference options
    (AnomalyControl's) are accepted and ignored.
    """
    from anomaly_factory.generators.magic.gpp import anomaly_token_positions
    from anomaly_factory.generators.magic.models import resolve_path
    from anomaly_factory.generators.magic.sampler import SamplerOptions, magic_inpaint

    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if n_pairs < 1:
        raise ValueError(f"n_pairs: {n_pairs} is not >= 1")
    images = read_images(manifest_path)
    normals = select(images, category, split="train")
    refs = select(images, category, anomaly_type, "fewshot")
    if normals.empty:
        raise ValueError(f"{manifest_path}: category {category!r} has no train images")
    if refs.empty:
        raise ValueError(
            f"{manifest_path}: no fewshot images for category {category!r}, type {anomaly_type!r}"
        )
    dataset = str(normals["dataset"].iloc[0])
    keys = [pair_key(dataset, category, anomaly_type, i) for i in range(n_pairs)]
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, k in enumerate(keys) if not is_done(out_dir, k)]
    _, ckpt_hash = _pipeline_and_hash(cfg, category, manifest_path, checkpoint, load=False)
    _check_settings(out_dir, _settings(cfg, category, anomaly_type, ckpt_hash))
    if not todo:
        return write_pairs_manifest(out_dir)

    res = cfg.model.resolution
    g = cfg.generate
    options = SamplerOptions.from_config(g)
    masks = mask_source(
        cfg.masks, manifest_path, category, anomaly_type, out_dir / MASK_GENERATOR_DIR
    )
    pipe, _ = _pipeline_and_hash(cfg, category, manifest_path, checkpoint, load=True)
    prompt, token = cfg.finetune.prompt, cfg.finetune.anomaly_token
    positions = (
        anomaly_token_positions(pipe.tokenizer, prompt, token)
        if g.gpp.target == "anomaly_token"
        else None
    )
    aligner = aligner or make_aligner(cfg, category, anomaly_type)
    done = n_pairs - len(todo)
    if on_pair is not None:
        on_pair(done, n_pairs)

    batches = sorted({i // g.batch_size for i in todo})
    for b in batches:
        idx = list(range(b * g.batch_size, min(n_pairs, (b + 1) * g.batch_size)))
        batch_masks = masks.masks_for(idx, n_pairs, res)
        seeds, normal_imgs, aligned, metas = [], [], [], []
        for i in idx:
            seed = pair_seed(cfg, category, anomaly_type, i)
            rng = np.random.default_rng(seed)
            normal_row = normals.iloc[int(rng.integers(len(normals)))]
            ref_row = refs.iloc[int(rng.integers(len(refs)))]
            normal = load_rgb(resolve_path(normal_row["image_path"], manifest_path), res)
            ref = load_rgb(resolve_path(ref_row["image_path"], manifest_path), res)
            mask, record = aligner(batch_masks[i], ref, normal, seed)
            mask = np.asarray(mask, bool)
            if mask.shape != (res, res):
                raise ValueError(f"aligner returned a {mask.shape} mask, expected {(res, res)}")
            seeds.append(seed)
            normal_imgs.append(normal)
            aligned.append(mask)
            metas.append(
                {
                    **record,
                    "dataset": dataset,
                    "category": category,
                    "anomaly_type": anomaly_type,
                    "generator": GENERATOR_NAME,
                    "seed": seed,
                    "sigma": options.sigma,
                    "w_m": options.w_m,
                    "w_d": options.w_d,
                    "steps": options.steps,
                    "checkpoint_hash": ckpt_hash,
                    "mask_source": (
                        f"{masks.name}+fewshot_fallback"
                        if i in getattr(masks, "fallback_used", ())
                        else masks.name
                    ),
                    "mask_index": i,
                    "normal_source": str(normal_row["image_path"]),
                    "reference_source": str(ref_row["image_path"]),
                    "mgni": options.mgni,
                    "paste_back": options.paste_back,
                    "resolution": res,
                }
            )
        out = magic_inpaint(
            pipe, normal_imgs, aligned, seeds, prompt, options, positions, height=res, width=res
        )
        out_u8 = (out * 255).round().clip(0, 255).astype(np.uint8)  # as diffusers' numpy_to_pil
        for j, i in enumerate(idx):
            if is_done(out_dir, keys[i]):
                continue
            save_pair(out_dir, keys[i], out_u8[j], aligned[j], normal_imgs[j], metas[j])
            done += 1
            if on_pair is not None:
                on_pair(done, n_pairs)
    return write_pairs_manifest(out_dir)


def read_generated(out_dir: Path) -> pd.DataFrame:
    """The pairs manifest of a folder written by :func:`generate_pairs`."""
    from anomaly_factory.manifest import read_pairs

    return read_pairs(Path(out_dir) / PAIRS_FILE)
