"""AnomalyControl pair generation in the factory's one output format.

Pair ``i`` inpaints a target mask on a normal ``train`` image of the category,
conditioned on two prompts (AnomalyControl §3):

* the **text-image reference prompt** goes to BLIP-2: a reference anomaly image
  with its mask (for ASEA) and a text. The image is one of the few-shot anomaly
  images of ``reference_category`` / ``reference_type`` (default: the target's),
  or any image and mask file (``reference_image`` / ``reference_mask``). Its text
  is ``reference_text``, else the image's caption (``anomalycontrol.captions``),
  else the template of its type;
* the **targeted text prompt** goes to the diffusion model: ``prompt``, else
  ``reference_text`` (the public code gives both the same sentence), else the
  template of the target type.

Reference and target may differ in object and type: that is how AnomalyControl
transfers an anomaly to a new context (§4.4). The target mask is one of the target
type's few-shot masks (``anomalycontrol.mask_source: fewshot``), one of the
``masks:`` section's (MAGIC's mask generator or ``masks.folder``; ``mask_source:
masks``), or one of a folder given as ``masks`` (``--masks``). Images and masks
are read through :mod:`anomaly_factory.images` only.

The reference's ASEA-enhanced CSM features enter the UNet through SGA (with 4
tokens loaded by diffusers' ``load_ip_adapter``); diffusers' inpainting pipeline
runs with ``anomalycontrol.strength/steps/guidance_scale`` (paper: 0.7, 50, 7); the
result is put back on the normal image by ``anomalycontrol.composite``
(:mod:`anomaly_factory.generators.composite`: the 9-channel UNet leaves the normal
region to a VAE round trip). Pairs are written with ``generators/output.py``,
references recorded by its :func:`reference_metadata`, so gates, detectors, shards
and flows read them unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.generators.anomalycontrol.asea import enhanced_features
from anomaly_factory.generators.anomalycontrol.csm import (
    Blip2Encoder,
    Reference,
    describe,
    load_blip2,
    load_reference_files,
    load_references,
    read_binary_mask,
    read_rgb,
    reference_text,
)
from anomaly_factory.generators.anomalycontrol.sga import semantic_embeds
from anomaly_factory.generators.anomalycontrol.train import (
    ADAPTER_FILE,
    load_captions,
    load_trained_pipeline,
    read_meta,
    train_adapter,
)
from anomaly_factory.generators.base import GenerationRequest, ProgressFn
from anomaly_factory.generators.common import pair_seed, resolve_device, resolve_path
from anomaly_factory.generators.composite import composite
from anomaly_factory.generators.output import (
    is_done,
    pair_key,
    pair_metadata,
    reference_params,
    save_pair,
    write_pairs_manifest,
)
from anomaly_factory.images import ImageReadError
from anomaly_factory.io import sha256_file
from anomaly_factory.manifest import GOOD, read_images, select

log = logging.getLogger(__name__)

GENERATOR = "anomalycontrol"
MASK_SOURCE = "fewshot"
MASK_GENERATOR_DIR = "mask_generator"
EXTERNAL = "external"  # reference category/type of a reference file given without them


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
    *,
    prompt: str | None = None,
    reference_image: Path | None = None,
    reference_mask: Path | None = None,
    masks: Path | None = None,
    on_pair: ProgressFn | None = None,
) -> Path:
    """Write ``n_pairs`` pairs of (category, anomaly_type) to ``out_dir``; return pairs.parquet.

    Without ``checkpoint`` the adapter is trained first (or reused from its
    cache folder) with the profile's settings. Finished pairs are skipped;
    ``on_pair(done, total)`` is called after every saved pair.
    """
    if n_pairs <= 0:
        raise InputError(f"n_pairs: {n_pairs} is not > 0")
    ac = cfg.anomalycontrol
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if masks is not None and not Path(masks).is_dir():
        raise InputError(f"masks (--masks): {masks} is not a folder")

    df = read_images(manifest_path)
    normals = select(df, category=category, anomaly_type=GOOD, split="train")
    fewshot = select(df, category=category, anomaly_type=anomaly_type, split="fewshot")
    if normals.empty:
        raise InputError(f"{manifest_path}: no 'train' normal images of category {category!r}")
    if fewshot.empty and masks is None and ac.mask_source == MASK_SOURCE:
        raise InputError(
            f"{manifest_path}: no 'fewshot' masks of {category!r}/{anomaly_type!r} to inpaint into"
        )
    refs = references(
        cfg,
        manifest_path,
        category,
        anomaly_type,
        reference_text,
        reference_category,
        reference_type,
        reference_image,
        reference_mask,
    )
    target = target_prompt(ac.text_template, category, anomaly_type, prompt, reference_text)
    dataset = str(normals["dataset"].iloc[0])
    keys = [pair_key(dataset, category, anomaly_type, i) for i in range(n_pairs)]
    todo = [i for i, k in enumerate(keys) if not is_done(out_dir, k)]
    if not todo:
        return write_pairs_manifest(out_dir)
    targets = TargetMasks(cfg, manifest_path, category, anomaly_type, fewshot, masks, out_dir)

    device = resolve_device(cfg.model)
    encoder = load_blip2(ac.blip2, device)
    if checkpoint is None:
        checkpoint = train_adapter(cfg, manifest_path, category, encoder=encoder)
    checkpoint = Path(checkpoint)
    _check_checkpoint(cfg, read_meta(checkpoint), encoder, checkpoint)
    pipe, loader = load_trained_pipeline(
        cfg, manifest_path, category, checkpoint, encoder.feature_dim
    )
    checkpoint_hash = sha256_file(checkpoint / ADAPTER_FILE)[:16]

    features, asea = enhanced_features(encoder, refs, ac.asea, ac.cache_dir)
    features = features.to(pipe.unet.device, pipe.unet.dtype)

    res = cfg.model.resolution
    # per-index draws: pair i is the same whatever n_pairs is and however often it resumes
    pair_seeds = [pair_seed(ac.seed, category, anomaly_type, i) for i in range(n_pairs)]
    picks = [np.random.default_rng(s) for s in pair_seeds]
    normal_idx = [int(r.integers(0, len(normals))) for r in picks]
    fewshot_idx = [int(r.integers(0, max(len(fewshot), 1))) for r in picks]
    done = n_pairs - len(todo)
    for start in range(0, len(todo), ac.batch_size):
        batch = todo[start : start + ac.batch_size]
        normal_paths = [str(normals["image_path"].iloc[normal_idx[i]]) for i in batch]
        normal_imgs = [read_rgb(resolve_path(p, manifest_path), res) for p in normal_paths]
        mask_imgs, mask_sources = targets.masks(batch, [fewshot_idx[i] for i in batch], n_pairs)
        ref_of = [i % len(refs) for i in batch]
        seeds = [pair_seeds[i] for i in batch]
        images = inpaint(
            cfg, pipe, normal_imgs, mask_imgs, [target] * len(batch), features[ref_of], seeds
        )
        for j, i in enumerate(batch):
            ref, result = refs[ref_of[j]], asea[ref_of[j]]
            meta = pair_metadata(
                dataset,
                category,
                anomaly_type,
                GENERATOR,
                seeds[j],
                targets.name(i),
                normal_paths[j],
                checkpoint_hash=checkpoint_hash,
                guidance_scale=ac.guidance_scale,
                steps=ac.steps,
                **reference_params(
                    reference_text=ref.text,
                    target_prompt=target,
                    reference_image=ref.image_path,
                    reference_mask=ref.mask_path,
                    reference_category=ref.category,
                    reference_type=ref.anomaly_type,
                ),
                reference_text_source=ref.text_source,
                strength=ac.strength,
                adapter_scale=ac.scale,
                adapter_loader=loader,
                blip2=encoder.name,
                blip2_features=encoder.features,
                composite=ac.composite.method,
                source_mask=mask_sources[j],
                asea_mass_before=result.mass_before if result else None,
                asea_mass_after=result.mass_after if result else None,
            )
            save_pair(out_dir, keys[i], images[j], mask_imgs[j], normal_imgs[j], meta)
            done += 1
            if on_pair is not None:
                on_pair(done, n_pairs)
        log.info("AnomalyControl: %d/%d pairs", start + len(batch), len(todo))
    return write_pairs_manifest(out_dir)


# --------------------------------------------------------------------------- prompts
def references(
    cfg: FactoryConfig,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    text: str | None = None,
    reference_category: str | None = None,
    reference_type: str | None = None,
    reference_image: Path | None = None,
    reference_mask: Path | None = None,
) -> list[Reference]:
    """The text-image reference prompts: a reference file, or the few-shot images of the
    reference (default: target) category and type, each with its text."""
    ac = cfg.anomalycontrol
    res = cfg.model.resolution
    captions = load_captions(cfg) if not text else None
    if reference_image is None and reference_mask is None:
        return load_references(
            manifest_path,
            reference_category or category,
            reference_type or anomaly_type,
            res,
            ac.text_template,
            text,
            captions,
        )
    if reference_image is None or reference_mask is None:
        given, missing = (
            ("reference_mask (--reference-mask)", "reference_image (--reference-image)")
            if reference_image is None
            else ("reference_image (--reference-image)", "reference_mask (--reference-mask)")
        )
        raise InputError(f"{given} needs {missing} too: a reference is an image and its mask")
    ref_category = reference_category or EXTERNAL
    ref_type = reference_type or EXTERNAL
    desc, source = describe(
        str(Path(reference_image).absolute()),
        reference_category or category,
        reference_type or anomaly_type,
        ac.text_template,
        text,
        captions,
    )
    try:
        ref = load_reference_files(
            Path(reference_image), Path(reference_mask), res, desc, source, ref_category, ref_type
        )
    except ValueError as exc:  # ImageReadError too; the message names the file
        raise ImageReadError(
            f"reference (--reference-image {reference_image} --reference-mask "
            f"{reference_mask}): {exc}"
        ) from exc
    return [ref]


def target_prompt(
    template: str,
    category: str,
    anomaly_type: str,
    prompt: str | None = None,
    reference: str | None = None,
) -> str:
    """The targeted text prompt: ``prompt``, else the reference text (the public code's one
    sentence for both), else the target type's template."""
    if prompt:
        return prompt
    if reference:
        return reference
    return reference_text(template, category, anomaly_type)


# --------------------------------------------------------------------------- target masks
class TargetMasks:
    """The masks pairs inpaint: the target type's few-shot masks, or a MAGIC mask source
    (its mask generator, ``masks.folder``, or the ``masks`` folder given)."""

    def __init__(
        self,
        cfg: FactoryConfig,
        manifest_path: Path,
        category: str,
        anomaly_type: str,
        fewshot: pd.DataFrame,
        folder: Path | None,
        out_dir: Path,
    ):
        from anomaly_factory.generators.magic.masks import mask_source

        self.manifest_path, self.fewshot = manifest_path, fewshot
        self.size = cfg.model.resolution
        self.source = None
        if folder is not None or cfg.anomalycontrol.mask_source == "masks":
            try:
                self.source = mask_source(
                    cfg.masks,
                    manifest_path,
                    category,
                    anomaly_type,
                    Path(out_dir) / MASK_GENERATOR_DIR,
                    folder=folder,
                )
            except (FileNotFoundError, ValueError) as exc:
                if folder is None:
                    raise
                raise InputError(f"masks (--masks): {exc}") from exc

    def name(self, index: int) -> str:
        """The pair's ``mask_source``: fewshot, folder, generator (+fewshot_fallback)."""
        if self.source is None:
            return MASK_SOURCE
        fallback = index in getattr(self.source, "fallback_used", ())
        return self.source.name + ("+fewshot_fallback" if fallback else "")

    def masks(
        self, indices: list[int], fewshot_picks: list[int], n_pairs: int
    ) -> tuple[list[np.ndarray], list[str]]:
        """Bool masks of pairs ``indices`` at model resolution, and where each came from."""
        if self.source is None:
            paths = [str(self.fewshot["mask_path"].iloc[k]) for k in fewshot_picks]
            found = [
                read_binary_mask(resolve_path(p, self.manifest_path), self.size) > 0 for p in paths
            ]
            return found, paths
        found = self.source.masks_for(indices, n_pairs, self.size)
        where = str(getattr(self.source, "folder", self.source.name))
        return [np.asarray(found[i], bool) for i in indices], [f"{where}#{i}" for i in indices]


# --------------------------------------------------------------------------- sampling
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
    """One batch through diffusers' inpainting pipeline with SGA's semantic tokens, put
    back on the normal images by ``anomalycontrol.composite`` (uint8 out)."""
    ac = cfg.anomalycontrol
    res = cfg.model.resolution
    binary = [np.asarray(m) > 0 for m in masks]
    guidance = ac.guidance_scale > 1.0  # the pipeline's own CFG switch
    out = pipe(
        prompt=prompts,
        image=[Image.fromarray(n) for n in normals],
        mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in binary],
        ip_adapter_image_embeds=semantic_embeds(features, guidance),
        strength=ac.strength,
        num_inference_steps=ac.steps,
        guidance_scale=ac.guidance_scale,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        height=res,
        width=res,
        output_type="np",
    ).images
    c = ac.composite
    normal = np.stack(normals).astype(np.float64) / 255.0
    out = composite(out, normal, binary, c.method, c.feather_px, c.blur_sigma)
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]


def _check_checkpoint(cfg: FactoryConfig, meta: dict, encoder: Blip2Encoder, folder: Path) -> None:
    problems = []
    if meta.get("n_tokens") != cfg.anomalycontrol.n_tokens:
        problems.append(f"n_tokens {meta.get('n_tokens')} != {cfg.anomalycontrol.n_tokens}")
    if meta.get("feature_dim") != encoder.feature_dim:
        problems.append(f"feature_dim {meta.get('feature_dim')} != BLIP-2's {encoder.feature_dim}")
    if meta.get("blip2") != cfg.anomalycontrol.blip2.pretrained:
        problems.append(f"blip2 {meta.get('blip2')!r} != {cfg.anomalycontrol.blip2.pretrained!r}")
    for key, ours in (
        ("blip2_weights", encoder.weights_hash),
        ("blip2_features", encoder.features),
    ):
        if key in meta and meta[key] != ours:  # checkpoints from before these were recorded
            problems.append(f"{key} {meta[key]!r} != this BLIP-2's {ours!r}")
    if not meta.get("complete"):
        problems.append("training did not finish")
    if problems:
        raise InputError(f"checkpoint {folder}: " + "; ".join(problems))


class AnomalyControl:
    """AnomalyControl (cross-modal reference, adapter with decoupled cross-attention).

    ``request.options`` may hold the reference of one call: ``reference_text``,
    ``reference_category``, ``reference_type``, ``prompt``, ``reference_image``,
    ``reference_mask``, ``masks`` (see :func:`generate_pairs`).
    """

    name = GENERATOR
    fewshot_typed = False  # a type may be transferred to a category that lacks it

    def prepare_category(self, cfg: FactoryConfig, manifest: Path, category: str) -> None:
        """The category's adapter (its types share it), trained once into its cache."""
        from anomaly_factory.generators.anomalycontrol.train import train_adapter

        train_adapter(cfg, Path(manifest), category)

    def shared_dirs(self, cfg: FactoryConfig, manifest: Path, category: str) -> list[Path]:
        """None kept in a store: the adapter's folder is named by the BLIP-2 weights' hash,
        known only once they are loaded, so each machine trains (and caches) its own."""
        return []

    def prepare(self, request: GenerationRequest) -> Path | None:
        """The category's adapter (SGA), trained once into its cache folder and resumed
        there (``anomalycontrol.out_dir``); a given ``request.checkpoint`` as is."""
        if request.checkpoint is not None:
            return request.checkpoint
        from anomaly_factory.generators.anomalycontrol.train import train_adapter

        return train_adapter(request.cfg, request.manifest, request.category)

    def generate(self, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path:
        return generate_pairs(
            request.cfg,
            request.manifest,
            request.category,
            request.anomaly_type,
            request.n_pairs,
            request.out_dir,
            request.checkpoint,
            **dict(request.options),
            on_pair=on_pair,
        )
