"""Tiny local BLIP-2 checkpoints of each family, saved with ``save_pretrained`` (no download).

* ``itm``: ``Blip2ForImageTextRetrieval`` with the Q-Former text path (the tiny encoder's
  own model, so it has its tokenizer);
* ``opt`` / ``flan_t5``: ``Blip2ForConditionalGeneration`` with a tiny OPT or T5 language
  model and ``use_qformer_text_input`` false, as ``Salesforce/blip2-opt-2.7b`` and
  ``Salesforce/blip2-flan-t5-xl`` are. Like them it ships a tokenizer (here the tiny
  WordPiece one; the real ones ship their language model's), which the Q-Former
  never sees.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor

from anomaly_factory.config import Blip2Section
from anomaly_factory.generators.anomalycontrol.csm import (
    TEXT_MAX_TOKENS,
    build_tiny_blip2,
    tiny_tokenizer,
)

HIDDEN, IMAGE, PATCH, QUERIES = 32, 32, 4, 8
LANGUAGE_MODELS = {
    "opt": dict(
        model_type="opt",
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    ),
    "flan_t5": dict(
        model_type="t5",
        d_model=16,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        d_kv=8,
        vocab_size=64,
    ),
}
FAMILIES = ("itm", *LANGUAGE_MODELS)


def save_itm(folder: Path, seed: int = 0) -> Path:
    """The tiny ITM encoder (seeded) as a checkpoint folder: model, tokenizer, processor."""
    enc = build_tiny_blip2(Blip2Section(pretrained="tiny", seed=seed))
    enc.model.save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    enc.image_processor.save_pretrained(folder)
    return Path(folder)


def save_generation(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny ``Blip2ForConditionalGeneration`` (OPT or Flan-T5), tokenizer, image processor."""
    layers = dict(
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        initializer_range=0.2,  # a random model's attention is flat at BLIP-2's 0.02
    )
    config = Blip2Config(
        vision_config=dict(**layers, image_size=IMAGE, patch_size=PATCH),
        qformer_config=dict(
            **layers,
            vocab_size=128,
            max_position_embeddings=TEXT_MAX_TOKENS,
            encoder_hidden_size=HIDDEN,
            cross_attention_frequency=1,
        ),
        text_config=LANGUAGE_MODELS[family],
        num_query_tokens=QUERIES,
        initializer_range=0.2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        model.query_tokens.data.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return Path(folder)


def save_family(folder: Path, family: str, seed: int = 0) -> Path:
    return save_itm(folder, seed) if family == "itm" else save_generation(folder, family, seed)
