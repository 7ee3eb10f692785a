"""AnomalyControl pair generation in the factory's one output format.

For each pair: a normal ``train`` image of the category, a few-shot mask of the
target type, and a reference (text + anomaly image). The text comes from
``reference_text`` or the configured template of the target type; the image
reference may come from another category or type (``reference_category`` /
``reference_type``, non-matching references, AnomalyControl §4.4). The
reference's ASEA-enhanced CSM features enter the UNet through SGA, and
diffusers' inpainting pipeline runs with the paper's strength 0.7, 50 steps and
CFG 7 (``anomalycontrol.strength/steps/guidance_scale``). Pairs are written with
``generators/output.py``, so gates, detectors, shards and flows read them
unchanged; the reference is recorded in extra manifest columns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomaly_factory.config import FactoryConfig
from anomaly_factory.generators.anomalycontrol.asea import enhanced_features
from anomaly_factory.generators.anomalycontrol.csm import (
    Blip2Encoder,
    load_blip2,
    load_references,
    read_binary_mask,
    read_rgb,
    reference_text,
)
from anomaly_factory.generators.anomalycontrol.sga import semantic_embeds
from anomaly_factory.generators.anomalycontrol.train import (
    ADAPTER_FILE,
    load_adapter,
    prepare_pipeline,
    read_meta,
    train_adapter,
)
from anomaly_factory.generators.magic.models import resolve_device, resolve_path
from anomaly_factory.generators.output import is_done, pair_key, save_pair, write_pairs_manifest
from anomaly_factory.io import sha256_file
from anomaly_factory.manifest import GOOD, read_images, select

log = logging.getLogger(__name__)

GENERATOR = "anomalycontrol"
MASK_SOURCE = "fewshot"


def generate_pairs(
    cfg: FactoryConfig,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    n_pairs: int,
    out_dir: Path,
    checkpoint: Path | None = None,
    reference_text: str | None = None,
    reference_category: str | None = None,
    reference_type: str | None = None,
) -> Path:
    """Write ``n_pairs`` pairs of (category, anomaly_type) to ``out_dir``; return pairs.parquet.

    Without ``checkpoint`` the adapter is trained first (or reused from its
    cache folder) with the profile's settings. Finished pairs are skipped.
    """
    if n_pairs <= 0:
        raise ValueError(f"n_pairs: {n_pairs} is not > 0")
    ac = cfg.anomalycontrol
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    ref_category = reference_category or category
    ref_type = reference_type or anomaly_type
    text = reference_text or _type_text(cfg, category, anomaly_type)

    df = read_images(manifest_path)
    normals = select(df, category=category, anomaly_type=GOOD, split="train")
    masks = select(df, category=category, anomaly_type=anomaly_type, split="fewshot")
    if normals.empty:
        raise ValueError(f"{manifest_path}: no 'train' normal images of category {category!r}")
    if masks.empty:
        raise ValueError(
            f"{manifest_path}: no 'fewshot' masks of {category!r}/{anomaly_type!r} to inpaint into"
        )
    dataset = str(masks["dataset"].iloc[0])
    keys = [pair_key(dataset, category, anomaly_type, i) for i in range(n_pairs)]
    todo = [i for i, k in enumerate(keys) if not is_done(out_dir, k)]
    if not todo:
        return write_pairs_manifest(out_dir)

    device = resolve_device(cfg.model)
    encoder = load_blip2(ac.blip2, device)
    if checkpoint is None:
        checkpoint = train_adapter(cfg, manifest_path, category, encoder=encoder)
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    _check_checkpoint(cfg, meta, encoder, checkpoint)
    pipe = prepare_pipeline(cfg, manifest_path, category, encoder.feature_dim)
    load_adapter(pipe, checkpoint)
    checkpoint_hash = sha256_file(checkpoint / ADAPTER_FILE)[:16]

    res = cfg.model.resolution
    refs = load_references(manifest_path, ref_category, ref_type, res, ac.text_template, text)
    features, asea = enhanced_features(encoder, refs, ac.asea, ac.cache_dir)
    features = features.to(pipe.unet.device, pipe.unet.dtype)

    # per-index draws: pair i is the same whatever n_pairs is and however often it resumes
    picks = [np.random.default_rng([ac.seed, i, 1]) for i in range(n_pairs)]
    normal_idx = [int(r.integers(0, len(normals))) for r in picks]
    mask_idx = [int(r.integers(0, len(masks))) for r in picks]
    for start in range(0, len(todo), ac.batch_size):
        batch = todo[start : start + ac.batch_size]
        normal_imgs = [
            read_rgb(resolve_path(normals["image_path"][normal_idx[i]], manifest_path), res)
            for i in batch
        ]
        mask_imgs = [
            read_binary_mask(resolve_path(masks["mask_path"][mask_idx[i]], manifest_path), res)
            for i in batch
        ]
        ref_of = [i % len(refs) for i in batch]
        images = inpaint(
            cfg,
            pipe,
            normal_imgs,
            mask_imgs,
            [text] * len(batch),
            features[ref_of],
            [_seed(ac.seed, i) for i in batch],
        )
        for j, i in enumerate(batch):
            ref, result = refs[ref_of[j]], asea[ref_of[j]]
            save_pair(
                out_dir,
                keys[i],
                images[j],
                mask_imgs[j],
                normal_imgs[j],
                {
                    "dataset": dataset,
                    "category": category,
                    "anomaly_type": anomaly_type,
                    "generator": GENERATOR,
                    "seed": _seed(ac.seed, i),
                    "sigma": 0.0,
                    "w_m": ac.guidance_scale,
                    "w_d": ac.guidance_scale,
                    "steps": ac.steps,
                    "checkpoint_hash": checkpoint_hash,
                    "mask_source": MASK_SOURCE,
                    "strength": ac.strength,
                    "adapter_scale": ac.scale,
                    "reference_text": text,
                    "reference_category": ref.category,
                    "reference_type": ref.anomaly_type,
                    "reference_image": ref.image_path,
                    "source_normal": str(normals["image_path"][normal_idx[i]]),
                    "source_mask": str(masks["mask_path"][mask_idx[i]]),
                    "asea_mass_before": result.mass_before if result else float("nan"),
                    "asea_mass_after": result.mass_after if result else float("nan"),
                },
            )
        log.info("AnomalyControl: %d/%d pairs", start + len(batch), len(todo))
    return write_pairs_manifest(out_dir)


@torch.no_grad()
def inpaint(
    cfg: FactoryConfig,
    pipe,
    normals: list[np.ndarray],
    masks: list[np.ndarray],
    prompts: list[str],
    features: torch.Tensor,
    seeds: list[int],
) -> list[np.ndarray]:
    """One batch through diffusers' inpainting pipeline with SGA's semantic tokens (uint8 out)."""
    ac = cfg.anomalycontrol
    res = cfg.model.resolution
    guidance = ac.guidance_scale > 1.0  # the pipeline's own CFG switch
    out = pipe(
        prompt=prompts,
        image=[Image.fromarray(n) for n in normals],
        mask_image=[Image.fromarray(m) for m in masks],
        ip_adapter_image_embeds=semantic_embeds(features, guidance),
        strength=ac.strength,
        num_inference_steps=ac.steps,
        guidance_scale=ac.guidance_scale,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        height=res,
        width=res,
        output_type="np",
    ).images
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]


def _type_text(cfg: FactoryConfig, category: str, anomaly_type: str) -> str:
    return reference_text(cfg.anomalycontrol.text_template, category, anomaly_type)


def _seed(base: int, index: int) -> int:
    """One seed per pair index, so a resumed run draws what an uninterrupted one would."""
    return int(np.random.default_rng([base, index]).integers(0, 2**31 - 1))


def _check_checkpoint(cfg: FactoryConfig, meta: dict, encoder: Blip2Encoder, folder: Path) -> None:
    problems = []
    if meta.get("n_tokens") != cfg.anomalycontrol.n_tokens:
        problems.append(f"n_tokens {meta.get('n_tokens')} != {cfg.anomalycontrol.n_tokens}")
    if meta.get("feature_dim") != encoder.feature_dim:
        problems.append(f"feature_dim {meta.get('feature_dim')} != BLIP-2's {encoder.feature_dim}")
    if meta.get("blip2") != cfg.anomalycontrol.blip2.pretrained:
        problems.append(f"blip2 {meta.get('blip2')!r} != {cfg.anomalycontrol.blip2.pretrained!r}")
    if not meta.get("complete"):
        problems.append("training did not finish")
    if problems:
        raise ValueError(f"checkpoint {folder}: " + "; ".join(problems))
