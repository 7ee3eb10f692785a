"""Cross-modal semantic modelling (CSM), AnomalyControl §3.1.

A frozen BLIP-2 encodes the reference, an anomaly image plus a text description,
into Q-Former query embeddings (32 x 768 for the released model). As in the
public code, the queries attend to the image tokens and to the text tokens at
once (LAVIS' "multimodal" features, the Q-Former's image-text-matching path);
the query outputs are mean-pooled to one vector per reference, and a trained
projection (:func:`semantic_projection`, diffusers' IP-Adapter ``ImageProjection``)
turns it into ``n_tokens`` extra condition tokens for the UNet.

``Blip2ForImageTextRetrieval`` is the transformers class that holds exactly
these parts (``Blip2VisionModel``, ``query_tokens``, the Q-Former's text
embeddings and ``Blip2QFormerModel``); ``Salesforce/blip2-itm-vit-g`` ships it.

>>> from anomaly_factory.config import Blip2Section
>>> enc = load_blip2(Blip2Section(pretrained="tiny"))
>>> import numpy as np
>>> feats = enc.semantic_features([np.zeros((32, 32, 3), np.uint8)], ["a scratch"])
>>> tuple(feats.shape) == (1, enc.feature_dim)
True
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import ImageProjection
from PIL import Image
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    Blip2Config,
    Blip2ForImageTextRetrieval,
    BlipImageProcessor,
    PreTrainedTokenizerBase,
)

from anomaly_factory import images as image_io
from anomaly_factory.config import Blip2Section

TINY = "tiny"
TEXT_MAX_TOKENS = 32  # BLIP-2's Q-Former text length in LAVIS' feature extractor
TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class QFormerOutput:
    """Query outputs (B, Q, D) and the per-layer cross-attention maps (B, heads, Q, 1 + N)."""

    queries: torch.Tensor
    cross_attentions: tuple[torch.Tensor, ...]


class Blip2Encoder:
    """The frozen BLIP-2 parts CSM and ASEA need, with their tokenizer and image processor."""

    def __init__(
        self,
        model: Blip2ForImageTextRetrieval,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BlipImageProcessor,
        name: str,
    ) -> None:
        # Eager attention returns the (differentiable) cross-attention maps ASEA optimises.
        model.qformer.set_attn_implementation("eager")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name

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

    def text_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
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
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> QFormerOutput:
        """Multimodal Q-Former pass: queries and text self-attend, queries cross-attend the image."""
        model = self.model
        n = vision_tokens.shape[0]
        queries = model.query_tokens.expand(n, -1, -1)
        n_q = queries.shape[1]
        embeds = model.embeddings(input_ids=input_ids, query_embeds=queries)
        query_mask = torch.ones(n, n_q, dtype=attention_mask.dtype, device=attention_mask.device)
        image_mask = torch.ones(vision_tokens.shape[:2], dtype=torch.long, device=self.device)
        out = model.qformer(
            query_embeds=embeds,
            query_length=n_q,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
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
        """Mean-pooled multimodal Q-Former features (B, D) of (image, text) references.

        ``prompts`` (B or 1, 1 + N, D_v) are ASEA's learned prompts, added to the
        frozen vision tokens; None means no enhancement.
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
    """``tiny`` builds a random BLIP-2 from a config; anything else is a hub id or folder."""
    if section.pretrained == TINY:
        return build_tiny_blip2(section).to(device)
    source = section.pretrained
    if Path(source).exists() and not Path(source).is_dir():
        raise ValueError(f"anomalycontrol.blip2.pretrained: {source} is a file, not a folder")
    try:
        model = Blip2ForImageTextRetrieval.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = BlipImageProcessor.from_pretrained(source)
    except OSError as exc:
        raise OSError(
            f"anomalycontrol.blip2.pretrained: cannot load BLIP-2 from {source!r}: {exc}"
        ) from exc
    return Blip2Encoder(model, tokenizer, processor, source).to(device)


def tiny_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over letters and digits (no download), BLIP-2's tokenizer type."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_CHARS]
    vocab += [f"##{c}" for c in TINY_CHARS]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vocab.txt")
        Path(path).write_text("\n".join(vocab) + "\n")
        return BertTokenizer(path)


def build_tiny_blip2(section: Blip2Section) -> Blip2Encoder:
    """A small random BLIP-2 (seeded) with the released model's structure, for CPU runs."""
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
    return Blip2Encoder(model, tokenizer, BlipImageProcessor(size=size), TINY)


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
@dataclass
class Reference:
    """One (anomaly image, mask, text) reference, image and mask at the model's resolution."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0/255
    text: str
    category: str
    anomaly_type: str
    image_path: str


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


def load_references(
    manifest_path: Path,
    category: str,
    anomaly_type: str | None,
    resolution: int,
    template: str,
    text: str | None = None,
) -> list[Reference]:
    """The few-shot anomaly images of a category (one type, or all when None) as references.

    ``text`` overrides the per-type description from ``template`` (non-matching
    references: the text may describe another type than the images show).
    """
    from anomaly_factory.generators.magic.models import resolve_path
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
        refs.append(
            Reference(
                image=read_rgb(resolve_path(row.image_path, manifest_path), resolution),
                mask=read_binary_mask(resolve_path(row.mask_path, manifest_path), resolution),
                text=text or reference_text(template, row.category, row.anomaly_type),
                category=row.category,
                anomaly_type=row.anomaly_type,
                image_path=str(row.image_path),
            )
        )
    return refs


def read_rgb(path: Path, size: int) -> np.ndarray:
    """The reference image at ``size`` px, bicubic as the diffusion models' input."""
    return image_io.read_rgb(path, size, "bicubic")


def read_binary_mask(path: Path, size: int) -> np.ndarray:
    """0/255 uint8 mask of a dataset's ground truth; any non-zero value is defect."""
    return image_io.read_mask(path, size, source="dataset").astype(np.uint8) * 255
