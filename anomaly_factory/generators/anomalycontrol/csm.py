"""Cross-modal semantic modelling (CSM), AnomalyControl §3.1.

A frozen BLIP-2 encodes the reference, an anomaly image plus a text description,
into Q-Former query embeddings (32 x 768 for the released model). As in the
public code, the queries attend to the image tokens and to the text tokens at
once (LAVIS' "multimodal" features, the Q-Former's image-text-matching path);
the query outputs are mean-pooled to one vector per reference, and a trained
projection (:func:`semantic_projection`, diffusers' IP-Adapter ``ImageProjection``)
turns it into ``n_tokens`` extra condition tokens for the UNet.

Two BLIP-2 checkpoint families are supported (:func:`load_blip2`):

* **ITM** (``Blip2ForImageTextRetrieval``, e.g. ``Salesforce/blip2-itm-vit-g``): it
  holds the Q-Former's text path (its text embeddings and the text half of every
  layer), so the features are **multimodal**, as the paper's;
* **generation** (``Blip2ForConditionalGeneration`` / ``Blip2Model`` with OPT or
  Flan-T5, e.g. ``Salesforce/blip2-opt-2.7b``): its Q-Former was trained without
  text input (``use_qformer_text_input`` false), so the features are **image-only**:
  the queries attend the image, the reference text does not enter BLIP-2. Only the
  vision model, query tokens and Q-Former are loaded (:class:`Blip2QFormerFeatures`);
  the language model's weights are skipped.

Which path a run used is ``Blip2Encoder.features``, recorded with the adapter and
every pair (``blip2_features``).

>>> from anomaly_factory.config import Blip2Section
>>> enc = load_blip2(Blip2Section(pretrained="tiny"))
>>> import numpy as np
>>> feats = enc.semantic_features([np.zeros((32, 32, 3), np.uint8)], ["a scratch"])
>>> tuple(feats.shape) == (1, enc.feature_dim)
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import ImageProjection
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertTokenizer,
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
    BlipImageProcessor,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from anomaly_factory import images as image_io
from anomaly_factory.config import Blip2Section
from anomaly_factory.generators.anomalycontrol.captions import Captions

log = logging.getLogger(__name__)

TINY = "tiny"
TEXT_MAX_TOKENS = 32  # BLIP-2's Q-Former text length in LAVIS' feature extractor
TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
MULTIMODAL, IMAGE_ONLY = "multimodal", "image_only"
FIELD = "anomalycontrol.blip2.pretrained"
FAMILIES = (
    "BLIP-2 ITM (Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g: multimodal "
    "features) or BLIP-2 generation checkpoints (Blip2ForConditionalGeneration / Blip2Model "
    "with OPT or Flan-T5, e.g. Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl: "
    "image-only features)"
)


@dataclass
class QFormerOutput:
    """Query outputs (B, Q, D) and the per-layer cross-attention maps (B, heads, Q, 1 + N)."""

    queries: torch.Tensor
    cross_attentions: tuple[torch.Tensor, ...]


class Blip2QFormerFeatures(Blip2PreTrainedModel):
    """The parts of any BLIP-2 checkpoint that image-only Q-Former features need.

    Vision model, query tokens and Q-Former, under the names every BLIP-2 class
    gives them, so ``from_pretrained`` on an OPT or Flan-T5 checkpoint loads them
    all and skips the language model (nothing is left randomly initialised).
    """

    main_input_name = "pixel_values"
    _keep_in_fp32_modules = ["query_tokens", "qformer"]

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        hidden = config.qformer_config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.post_init()


class Blip2Encoder:
    """The frozen BLIP-2 parts CSM and ASEA need, with their tokenizer and image processor.

    ``features`` is ``multimodal`` (queries and text self-attend, queries attend the
    image) or ``image_only`` (queries attend the image; ``tokenizer`` may be None).
    """

    def __init__(
        self,
        model: Blip2ForImageTextRetrieval | Blip2QFormerFeatures,
        tokenizer: PreTrainedTokenizerBase | None,
        image_processor: BlipImageProcessor,
        name: str,
        features: str = MULTIMODAL,
    ) -> None:
        if features not in (MULTIMODAL, IMAGE_ONLY):
            raise ValueError(f"features: {features!r} is not {MULTIMODAL!r} or {IMAGE_ONLY!r}")
        if features == MULTIMODAL and (tokenizer is None or not hasattr(model, "embeddings")):
            raise ValueError(f"{name}: multimodal features need the Q-Former's text path")
        # Eager attention returns the (differentiable) cross-attention maps ASEA optimises.
        model.qformer.set_attn_implementation("eager")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.features = features

    @cached_property
    def weights_hash(self) -> str:
        """What the features depend on: a hash of the state dict, the image processor,
        the tokenizer's vocabulary and the feature path. Caches key on it, not on the
        name, so another seed of ``tiny`` or a folder whose weights changed is new."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        vocab = sorted(self.tokenizer.get_vocab().items()) if self.tokenizer is not None else []
        h.update(json.dumps([self.features, vocab]).encode())
        h.update(self.image_processor.to_json_string().encode())
        return h.hexdigest()[:24]

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    @property
    def feature_dim(self) -> int:
        """Width of the mean-pooled Q-Former features (768 for BLIP-2)."""
        return self.model.config.qformer_config.hidden_size

    @property
    def patch_grid(self) -> int:
        """Side of the vision model's patch grid (tokens are CLS + grid**2 patches)."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def to(self, device: torch.device | str) -> Blip2Encoder:
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ inputs
    def pixel_values(self, images: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        """BLIP-2's resize + normalisation of RGB uint8 images, (B, 3, S, S)."""
        pil = [im if isinstance(im, Image.Image) else Image.fromarray(_rgb(im)) for im in images]
        out = self.image_processor(images=[im.convert("RGB") for im in pil], return_tensors="pt")
        return out["pixel_values"].to(self.device, self.model.dtype)

    def text_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token ids and attention mask of ``texts``; (None, None) for image-only features."""
        if self.features == IMAGE_ONLY:
            return None, None
        tok = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=TEXT_MAX_TOKENS,
            return_tensors="pt",
        )
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ forward parts
    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen image-encoder tokens (B, 1 + N, D_v): what ASEA's prompt is added to."""
        with torch.no_grad():
            return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def qformer(
        self,
        vision_tokens: torch.Tensor,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> QFormerOutput:
        """Q-Former pass: queries cross-attend the image; in multimodal mode queries and
        text also self-attend together (image-only mode ignores the text inputs)."""
        model = self.model
        n = vision_tokens.shape[0]
        queries = model.query_tokens.expand(n, -1, -1)
        n_q = queries.shape[1]
        image_mask = torch.ones(vision_tokens.shape[:2], dtype=torch.long, device=self.device)
        text_mask = None
        if self.features == MULTIMODAL:
            queries = model.embeddings(input_ids=input_ids, query_embeds=queries)
            query_mask = torch.ones(
                n, n_q, dtype=attention_mask.dtype, device=attention_mask.device
            )
            text_mask = torch.cat([query_mask, attention_mask], dim=1)
        out = model.qformer(
            query_embeds=queries,
            query_length=n_q,
            attention_mask=text_mask,
            encoder_hidden_states=vision_tokens,
            encoder_attention_mask=image_mask,
            output_attentions=output_attentions,
        )
        cross = tuple(out.cross_attentions or ()) if output_attentions else ()
        return QFormerOutput(out.last_hidden_state[:, :n_q], cross)

    def semantic_features(
        self,
        images: Sequence[np.ndarray | Image.Image],
        texts: Sequence[str],
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean-pooled Q-Former features (B, D) of (image, text) references.

        ``prompts`` (B or 1, 1 + N, D_v) are ASEA's learned prompts, added to the
        frozen vision tokens; None means no enhancement. With image-only features
        the texts do not change the result.
        """
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} reference images but {len(texts)} texts")
        tokens = self.vision_tokens(self.pixel_values(images))
        if prompts is not None:
            tokens = tokens + prompts.to(tokens.device, tokens.dtype)
        ids, mask = self.text_inputs(texts)
        with torch.no_grad():
            return self.qformer(tokens, ids, mask).queries.mean(dim=1).float()


def semantic_projection(
    feature_dim: int, cross_attention_dim: int, n_tokens: int
) -> ImageProjection:
    """The trained projection of CSM: mean-pooled features -> ``n_tokens`` condition tokens.

    diffusers' IP-Adapter ``ImageProjection`` (linear + LayerNorm), so the UNet's
    ``encoder_hid_proj`` and ``ip_adapter_image_embeds`` path use it unchanged.
    """
    return ImageProjection(
        image_embed_dim=feature_dim,
        cross_attention_dim=cross_attention_dim,
        num_image_text_embeds=n_tokens,
    )


# --------------------------------------------------------------------------- loading
def load_blip2(section: Blip2Section, device: torch.device | str = "cpu") -> Blip2Encoder:
    """``tiny`` builds a random BLIP-2 from a config; anything else is a hub id or folder.

    The checkpoint's family decides the feature path (``features: auto``): an ITM
    checkpoint gives multimodal features, a generation one (OPT, Flan-T5) image-only
    ones. Asking for ``multimodal`` from a checkpoint without the Q-Former text path
    is an error, and so is a checkpoint that lacks any weight the path uses.
    """
    if section.pretrained == TINY:
        return build_tiny_blip2(section).to(device)
    source = section.pretrained
    if Path(source).exists() and not Path(source).is_dir():
        raise ValueError(f"{FIELD}: {source} is a file, not a folder")
    config = _blip2_config(source)
    has_text_path = bool(config.qformer_config.use_qformer_text_input)
    features = section.features
    if features == "auto":
        features = MULTIMODAL if has_text_path else IMAGE_ONLY
    if features == MULTIMODAL and not has_text_path:
        raise ValueError(
            f"anomalycontrol.blip2.features: 'multimodal' needs the Q-Former text path, which "
            f"{source!r} ({', '.join(config.architectures or ['BLIP-2'])}) does not have "
            f"(use_qformer_text_input false); use features 'image_only' or 'auto', or one of: "
            f"{FAMILIES}"
        )
    cls = Blip2ForImageTextRetrieval if features == MULTIMODAL else Blip2QFormerFeatures
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(source) if features == MULTIMODAL else None
        processor = BlipImageProcessor.from_pretrained(source)
    except OSError as exc:
        raise OSError(f"{FIELD}: cannot load BLIP-2 from {source!r}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"{FIELD}: {source!r} lacks {len(missing)} weights of the {features} Q-Former path "
            f"(e.g. {missing[:3]}); supported: {FAMILIES}"
        )
    skipped = len(info.get("unexpected_keys") or ())
    log.info("BLIP-2 %s: %s features (%d checkpoint weights not used)", source, features, skipped)
    return Blip2Encoder(model, tokenizer, processor, source, features).to(device)


def _blip2_config(source: str) -> Blip2Config:
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise OSError(f"{FIELD}: cannot load BLIP-2 from {source!r}: {exc}") from exc
    if not isinstance(config, Blip2Config):
        raise ValueError(
            f"{FIELD}: {source!r} is a {config.model_type!r} model, not BLIP-2; supported: "
            f"{FAMILIES}"
        )
    return config


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading a generation checkpoint skips its language model; transformers would print
    every skipped weight, so :func:`load_blip2` logs their count instead."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def tiny_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over letters and digits (no download), BLIP-2's tokenizer type."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_CHARS]
    vocab += [f"##{c}" for c in TINY_CHARS]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vocab.txt")
        Path(path).write_text("\n".join(vocab) + "\n")
        return BertTokenizer(path)


def build_tiny_blip2(section: Blip2Section) -> Blip2Encoder:
    """A small random BLIP-2 (seeded) with the ITM model's structure, for CPU runs."""
    tiny = section.tiny
    if tiny.image_size % tiny.patch_size:
        raise ValueError(
            f"anomalycontrol.blip2.tiny.image_size: {tiny.image_size} is not divisible by "
            f"patch_size {tiny.patch_size}"
        )
    if tiny.hidden_size % tiny.heads:
        raise ValueError(
            f"anomalycontrol.blip2.tiny.hidden_size: {tiny.hidden_size} is not divisible by "
            f"heads {tiny.heads}"
        )
    tokenizer = tiny_tokenizer()
    layers = dict(
        hidden_size=tiny.hidden_size,
        intermediate_size=4 * tiny.hidden_size,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        initializer_range=tiny.initializer_range,
    )
    config = Blip2Config(
        vision_config=dict(**layers, image_size=tiny.image_size, patch_size=tiny.patch_size),
        qformer_config=dict(
            **layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=TEXT_MAX_TOKENS,
            encoder_hidden_size=tiny.hidden_size,
            cross_attention_frequency=1,
            use_qformer_text_input=True,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=tiny.num_query_tokens,
        image_text_hidden_size=tiny.hidden_size,
        initializer_range=tiny.initializer_range,
    )
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(section.seed)
        model = Blip2ForImageTextRetrieval(config)
        # query tokens start at zero in transformers; BLIP-2 trained them, so use random ones
        model.query_tokens.data.normal_(0.0, 1.0)
    size = {"height": tiny.image_size, "width": tiny.image_size}
    features = IMAGE_ONLY if section.features == IMAGE_ONLY else MULTIMODAL
    return Blip2Encoder(model, tokenizer, BlipImageProcessor(size=size), TINY, features)


def patch_mask(mask: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """Fraction of each vision patch inside a binary mask, flattened to (grid**2,)."""
    m = torch.as_tensor(np.asarray(mask) > 0, dtype=torch.float32)
    if m.dim() == 3:
        m = m.amax(dim=-1) if m.shape[-1] in (1, 3, 4) else m[0]
    if m.dim() != 2:
        raise ValueError(f"mask: expected an HxW array, got shape {tuple(m.shape)}")
    return F.adaptive_avg_pool2d(m[None, None], grid).flatten()


def _rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"reference image: expected uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., :3]


# --------------------------------------------------------------------------- references
TEXT_FROM_CAPTION, TEXT_FROM_TEMPLATE, TEXT_GIVEN = "caption", "template", "given"


@dataclass
class Reference:
    """One (anomaly image, mask, text) reference, image and mask at the model's resolution.

    ``text_source`` says where the text came from: ``caption`` (the captions file),
    ``template`` (``text_template``) or ``given`` (``--reference-text``).
    """

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0/255
    text: str
    category: str
    anomaly_type: str
    image_path: str
    mask_path: str = ""
    text_source: str = TEXT_FROM_TEMPLATE


def reference_text(template: str, category: str, anomaly_type: str) -> str:
    """The configured description of a type, e.g. 'a photo of a bottle with a broken large defect'."""
    try:
        text = template.format(
            category=category.replace("_", " "), anomaly_type=anomaly_type.replace("_", " ")
        )
    except (KeyError, IndexError) as exc:
        raise ValueError(
            f"anomalycontrol.text_template: {template!r} may only use {{category}} and "
            f"{{anomaly_type}}: {exc}"
        ) from exc
    return text


def describe(
    image_path: str,
    category: str,
    anomaly_type: str,
    template: str,
    text: str | None = None,
    captions: Captions | None = None,
) -> tuple[str, str]:
    """A reference's text and its source: ``text`` if given, else the image's caption,
    else the template of its (category, type)."""
    if text:
        return text, TEXT_GIVEN
    caption = captions.lookup(image_path) if captions is not None else None
    if caption is not None:
        return caption, TEXT_FROM_CAPTION
    return reference_text(template, category, anomaly_type), TEXT_FROM_TEMPLATE


def load_references(
    manifest_path: Path,
    category: str,
    anomaly_type: str | None,
    resolution: int,
    template: str,
    text: str | None = None,
    captions: Captions | None = None,
) -> list[Reference]:
    """The few-shot anomaly images of a category (one type, or all when None) as references.

    ``text`` overrides every reference's description (non-matching references: the
    text may describe another type than the images show); otherwise each image has
    its caption from ``captions`` or, lacking one, the ``template`` of its type.
    """
    from anomaly_factory.generators.common import resolve_path
    from anomaly_factory.manifest import GOOD, read_images, select

    df = select(read_images(manifest_path), category=category, split="fewshot")
    df = df[df["anomaly_type"] != GOOD]
    if anomaly_type is not None:
        df = df[df["anomaly_type"] == anomaly_type]
    if df.empty:
        what = f"type {anomaly_type!r}" if anomaly_type else "any anomaly type"
        raise ValueError(f"{manifest_path}: no 'fewshot' images of category {category!r}, {what}")
    refs = []
    for row in df.itertuples():
        image_path = resolve_path(row.image_path, manifest_path)
        desc, source = describe(
            os.path.abspath(image_path), row.category, row.anomaly_type, template, text, captions
        )
        refs.append(
            Reference(
                image=read_rgb(image_path, resolution),
                mask=read_binary_mask(resolve_path(row.mask_path, manifest_path), resolution),
                text=desc,
                category=row.category,
                anomaly_type=row.anomaly_type,
                image_path=str(row.image_path),
                mask_path=str(row.mask_path),
                text_source=source,
            )
        )
    return refs


def load_reference_files(
    image_path: Path,
    mask_path: Path,
    resolution: int,
    text: str,
    text_source: str,
    category: str,
    anomaly_type: str,
) -> Reference:
    """A reference from any image and mask file (white, > 127, is defect)."""
    mask = image_io.read_mask(mask_path, resolution, source="binary")
    if not mask.any():
        raise ValueError(f"{mask_path}: the reference mask has no defect pixel (> 127)")
    return Reference(
        image=read_rgb(image_path, resolution),
        mask=mask.astype(np.uint8) * 255,
        text=text,
        category=category,
        anomaly_type=anomaly_type,
        image_path=str(image_path),
        mask_path=str(mask_path),
        text_source=text_source,
    )


def read_rgb(path: Path, size: int) -> np.ndarray:
    """The reference image at ``size`` px, bicubic as the diffusion models' input."""
    return image_io.read_rgb(path, size, "bicubic")


def read_binary_mask(path: Path, size: int) -> np.ndarray:
    """0/255 uint8 mask of a dataset's ground truth; any non-zero value is defect."""
    return image_io.read_mask(path, size, source="dataset").astype(np.uint8) * 255
