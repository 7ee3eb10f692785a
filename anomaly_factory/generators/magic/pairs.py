"""MAGIC pair generation for one (category, anomaly type): MAGIC §3, CONTEXT §1 "Output".

For pair ``i`` (seed ``common.pair_seed(generate.seed, category, type, i)``):

1. take mask ``i`` of the type's mask source (:mod:`.masks`: the trained mask
   generator or a folder of masks);
2. pick a normal ``train`` image of the category and a ``fewshot`` reference
   image of the type (with its ground-truth mask), both at random from the pair's seed;
3. align the mask on the normal image (:func:`make_aligner`: CAMA, or identity).
   CAMA reads its keypoints from the reference's own defect (its ground-truth
   mask), where the reference really shows one, and moves mask ``i``'s
   components to the matched centres (MAGIC §3.4, as the official code);
4. inpaint it with the MAGIC sampler (:mod:`.sampler`), ``generate.batch_size``
   pairs per UNet call.

Everything happens at ``model.resolution``: the normal image is resized to it
(bicubic) before generation, and the saved image, mask and normal image all
have that size, so the mask indexes both images pixel for pixel. Each image is
decoded and resized once per run, however many pairs use it.

Every pair records the reference mask it was aligned with, and the GPP the
checkpoint was fine-tuned with beside the inference GPP; inference GPP unlike
the training GPP is refused (``generate.gpp_mismatch``).

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
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.generators.base import GenerationRequest, ProgressFn
from anomaly_factory.generators.common import derive_seed, pair_seed
from anomaly_factory.generators.magic.masks import load_or_train_generator, mask_source
from anomaly_factory.generators.output import (
    PAIRS_FILE,
    is_done,
    pair_key,
    pair_metadata,
    save_pair,
    write_pairs_manifest,
)
from anomaly_factory.images import read_mask, read_rgb
from anomaly_factory.io import atomic_write_json
from anomaly_factory.manifest import read_images, select

log = logging.getLogger(__name__)

GENERATOR_NAME = "magic"
SETTINGS_FILE = "generate.json"
MASK_GENERATOR_DIR = "mask_generator"

# aligner(mask, reference_image, normal_image, seed, reference_mask=...) -> (mask, record)
Aligner = Callable[..., tuple[np.ndarray, dict]]


def identity_aligner(
    mask: np.ndarray,
    reference_image: np.ndarray,
    normal_image: np.ndarray,
    seed: int,
    reference_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """No alignment: the mask stays where the mask source put it."""
    return mask, {"cama_status": "disabled"}


def make_aligner(cfg: FactoryConfig, category: str, anomaly_type: str) -> Aligner:
    """The one place the mask aligner is chosen: CAMA (MAGIC §3.4) when enabled, else identity."""
    if cfg.cama.enabled and importlib.util.find_spec("anomaly_factory.generators.magic.cama"):
        from anomaly_factory.generators.magic.cama import CamaAligner

        return CamaAligner(cfg, category, anomaly_type)
    return identity_aligner


class ImageCache:
    """Images and reference masks of one run at model resolution, each decoded once.

    Every pair draws a reference from the type's few ``fewshot`` images, so without
    it a run decoded the same full-resolution files once per pair. The most
    recently used ``max_items`` images are kept (about 100 MB at 512 px).
    """

    def __init__(self, manifest_path: Path | None, size: int, max_items: int = 128):
        self.manifest_path, self.size, self.max_items = manifest_path, size, max_items
        self._rgb: OrderedDict[str, np.ndarray] = OrderedDict()
        self._masks: OrderedDict[str, np.ndarray] = OrderedDict()

    def _remember(self, store: OrderedDict, key: str, value: np.ndarray) -> np.ndarray:
        store[key] = value
        if len(store) > self.max_items:
            store.popitem(last=False)
        return value

    def _path(self, path: str) -> Path:
        from anomaly_factory.generators.common import resolve_path

        return resolve_path(path, self.manifest_path)

    def rgb(self, path: str) -> np.ndarray:
        """RGB uint8 at ``size`` x ``size`` (bicubic, as the pipeline's image processor)."""
        if path in self._rgb:
            self._rgb.move_to_end(path)
            return self._rgb[path]
        return self._remember(self._rgb, path, read_rgb(self._path(path), self.size, "bicubic"))

    def mask(self, path: str) -> np.ndarray:
        """A ground-truth mask at ``size`` x ``size``, thin defects kept (area coverage)."""
        from anomaly_factory.generators.magic.cama import resize_mask

        if path in self._masks:
            self._masks.move_to_end(path)
            return self._masks[path]
        full = read_mask(self._path(path), source="dataset")
        return self._remember(self._masks, path, resize_mask(full, (self.size, self.size)))


def normal_index(cfg: FactoryConfig, category: str, anomaly_type: str, index: int, n: int) -> int:
    """Which of ``n`` normal images pair ``index`` is drawn on: a seeded permutation, so a
    type's pairs use distinct normals until all ``n`` are used.

    Independent draws put 2 of 6 pairs on the same normal one time in four, and with the
    same mask those pairs are near-duplicates (the gates' ``no_duplicate`` check).

    >>> from anomaly_factory.config import FactoryConfig
    >>> cfg = FactoryConfig()
    >>> sorted(normal_index(cfg, "c", "t", i, 6) for i in range(6))
    [0, 1, 2, 3, 4, 5]
    """
    order = np.random.default_rng(derive_seed(cfg.generate.seed, category, anomaly_type, "normals"))
    return int(order.permutation(n)[index % n])


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
        "generate": cfg.generate.model_dump(
            mode="json", exclude={"n_pairs", "out_dir", "gpp_mismatch"}
        ),
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
            raise InputError(
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
) -> Path:
    """Generate ``n_pairs`` MAGIC pairs into ``out_dir``; return ``out_dir/pairs.parquet``.

    ``checkpoint`` is a fine-tuned checkpoint folder (issue 3); None uses the base
    pipeline. ``on_pair(done, total)`` is called after every saved pair.
    ``aligner`` overrides :func:`make_aligner`.
    """
    from anomaly_factory.generators.magic.checkpoints import read_meta
    from anomaly_factory.generators.magic.gpp import (
        anomaly_token_positions,
        check_gpp_consistency,
    )
    from anomaly_factory.generators.magic.sampler import SamplerOptions, magic_inpaint

    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if n_pairs < 1:
        raise InputError(f"n_pairs: {n_pairs} is not >= 1")
    images = read_images(manifest_path)
    normals = select(images, category, split="train")
    refs = select(images, category, anomaly_type, "fewshot")
    if normals.empty:
        raise InputError(f"{manifest_path}: category {category!r} has no train images")
    if refs.empty:
        raise InputError(
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
    train_sigma, train_target = check_gpp_consistency(
        read_meta(Path(checkpoint)) if checkpoint is not None else None,
        g.gpp.sigma,
        g.gpp.target,
        g.gpp_mismatch,
        str(checkpoint),
    )
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
    cache = ImageCache(manifest_path, res)
    done = n_pairs - len(todo)
    if on_pair is not None:
        on_pair(done, n_pairs)

    batches = sorted({i // g.batch_size for i in todo})
    for b in batches:
        idx = list(range(b * g.batch_size, min(n_pairs, (b + 1) * g.batch_size)))
        batch_masks = masks.masks_for(idx, n_pairs, res)
        seeds, normal_imgs, aligned, metas = [], [], [], []
        for i in idx:
            seed, normal, mask, record = align_pair(
                cfg, category, anomaly_type, i, batch_masks[i], normals, refs, cache, aligner
            )
            seeds.append(seed)
            normal_imgs.append(normal)
            aligned.append(mask)
            source = masks.name
            if i in getattr(masks, "fallback_used", ()):
                source += "+fewshot_fallback"
            metas.append(
                pair_metadata(
                    dataset,
                    category,
                    anomaly_type,
                    GENERATOR_NAME,
                    seed,
                    source,
                    record.pop("normal_source"),
                    checkpoint_hash=ckpt_hash,
                    sigma=options.sigma,
                    w_m=options.w_m,
                    w_d=options.w_d,
                    steps=options.steps,
                    **record,
                    gpp_target=g.gpp.target,
                    train_sigma=train_sigma,
                    train_gpp_target=train_target,
                    mask_index=i,
                    mgni=options.mgni,
                    latent_mask=options.latent_mask,
                    paste_back=options.paste_back,
                    resolution=res,
                )
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


def align_pair(
    cfg: FactoryConfig,
    category: str,
    anomaly_type: str,
    index: int,
    mask: np.ndarray,
    normals: pd.DataFrame,
    refs: pd.DataFrame,
    cache: ImageCache,
    aligner: Aligner,
) -> tuple[int, np.ndarray, np.ndarray, dict]:
    """Pair ``index``'s seed, normal image, aligned mask and alignment record (steps 2-3).

    The reference's keypoints come from its own ground-truth mask (``mask_path``),
    which the record names (``reference_mask_source``).
    """
    res = cache.size
    seed = pair_seed(cfg.generate.seed, category, anomaly_type, index)
    rng = np.random.default_rng(seed)
    normal_row = normals.iloc[normal_index(cfg, category, anomaly_type, index, len(normals))]
    ref_row = refs.iloc[int(rng.integers(len(refs)))]
    normal = cache.rgb(str(normal_row["image_path"]))
    reference = cache.rgb(str(ref_row["image_path"]))
    reference_mask = cache.mask(str(ref_row["mask_path"]))
    aligned, record = aligner(mask, reference, normal, seed, reference_mask=reference_mask)
    aligned = np.asarray(aligned, bool)
    if aligned.shape != (res, res):
        raise InputError(f"aligner returned a {aligned.shape} mask, expected {(res, res)}")
    record = {
        **record,
        "normal_source": str(normal_row["image_path"]),
        "reference_source": str(ref_row["image_path"]),
        "reference_mask_source": str(ref_row["mask_path"]),
    }
    return seed, normal, aligned, record


def read_generated(out_dir: Path) -> pd.DataFrame:
    """The pairs manifest of a folder written by :func:`generate_pairs`."""
    from anomaly_factory.manifest import read_pairs

    return read_pairs(Path(out_dir) / PAIRS_FILE)


class Magic:
    """MAGIC (few-shot mask-guided anomaly inpainting) as the factory runs it."""

    name = GENERATOR_NAME
    fewshot_typed = True

    def prepare_category(self, cfg: FactoryConfig, manifest: Path, category: str) -> None:
        """The tiny preset's adaptation of the bundled base to the category (cached); SD2
        needs none."""
        if cfg.model.preset == "tiny":
            from anomaly_factory.generators.magic.models import pretrained_tiny_pipeline

            pretrained_tiny_pipeline(cfg, category, Path(manifest))

    def shared_dirs(self, cfg: FactoryConfig, manifest: Path, category: str) -> list[Path]:
        if cfg.model.preset != "tiny":
            return []
        from anomaly_factory.generators.magic.models import tiny_cache_dir

        return [tiny_cache_dir(cfg, category, Path(manifest))]

    def prepare(self, request: GenerationRequest) -> Path | None:
        """The type's GPP fine-tune into ``request.train_dir`` (None: no fine-tune, the
        base pipeline; a given ``request.checkpoint`` is used as is), and its mask
        generator into the pairs folder (when masks come from the generator). Both are
        cached: a finished training is loaded, an interrupted fine-tune resumes."""
        from anomaly_factory.generators.magic.finetune import finetune

        cfg = request.cfg
        checkpoint = request.checkpoint
        if checkpoint is None and request.train_dir is not None:
            checkpoint = finetune(
                cfg, request.manifest, request.category, request.anomaly_type, request.train_dir
            )
        if cfg.masks.source == "generator":
            load_or_train_generator(
                cfg.masks,
                request.manifest,
                request.category,
                request.anomaly_type,
                Path(request.out_dir) / MASK_GENERATOR_DIR,
            )
        return checkpoint

    def generate(self, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path:
        """:func:`generate_pairs` of the request (a mask generator ``prepare`` did not
        train is trained here, once)."""
        return generate_pairs(
            request.cfg,
            request.manifest,
            request.category,
            request.anomaly_type,
            request.n_pairs,
            request.out_dir,
            request.checkpoint,
            on_pair=on_pair,
        )
