"""The generator contract: what the factory asks of every generator.

A generator is an object with a ``name`` and two methods, both given one
:class:`GenerationRequest` (which run, which category and type, how many pairs, where):

``prepare_category(cfg, manifest, category) -> None``
    Train what every type of the category shares (MAGIC's tiny preset: the category's
    adaptation of the base model; AnomalyControl: the category's adapter), cached. The
    factory runs it once per category before the types, so that types prepared side
    by side (``orchestration.fan_out: type``) do not each redo it.
``prepare(request) -> Path | None``
    Train what the type needs (MAGIC: its GPP fine-tune and its mask generator;
    AnomalyControl: its adapter), cached and resumable: a finished training is returned
    as is, an interrupted one continues. Returns the checkpoint folder ``generate`` reads,
    or None when the generator learns nothing (the baselines, the oracle).
``generate(request, on_pair) -> Path``
    Write ``request.n_pairs`` pairs into ``request.out_dir`` in the one pairs format
    (:mod:`anomaly_factory.generators.output`: files, a record per pair written last,
    ``pairs.parquet``), skipping pairs already there, and call ``on_pair(done, total)``
    after each. Pair ``i`` is seeded by ``common.pair_seed`` of the generator's section
    seed, so a resumed run makes the same bytes as an uninterrupted one.

Its options are the fields of its own config section (``cfg.<section>``); options of one
call that are not configuration (AnomalyControl's reference text or image) come in
``request.options``. :func:`anomaly_factory.generators.registry.run_generator` is the
one way every route runs ``generate`` (it holds the folder's lock); the package
docstring of :mod:`anomaly_factory.generators` is the recipe for adding one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from anomaly_factory.config import FactoryConfig

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationRequest:
    """One (category, anomaly type) of one run, as a generator is asked to make it.

    ``checkpoint`` is what ``generate`` reads (what ``prepare`` returned, or a folder
    the user gave); ``train_dir`` is where ``prepare`` keeps a per-type training (the
    run layout's checkpoint folder; None: the generator's own cache, or no fine-tune).
    """

    cfg: FactoryConfig
    manifest: Path
    category: str
    anomaly_type: str
    n_pairs: int
    out_dir: Path
    checkpoint: Path | None = None
    train_dir: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def with_checkpoint(self, checkpoint: Path | None) -> GenerationRequest:
        """The same request, reading ``checkpoint`` (what ``prepare`` returned)."""
        return replace(self, checkpoint=checkpoint)


@runtime_checkable
class Generator(Protocol):
    """What :data:`~anomaly_factory.generators.registry.GENERATORS` entries resolve to."""

    name: str
    # True: pairs copy a few-shot type of the category, so a type the manifest lacks is
    # an error (AnomalyControl may transfer a type to a new category: False).
    fewshot_typed: bool

    def prepare_category(self, cfg: FactoryConfig, manifest: Path, category: str) -> None: ...

    def shared_dirs(self, cfg: FactoryConfig, manifest: Path, category: str) -> list[Path]:
        """The folders ``prepare_category`` writes: a store data root keeps them, so the
        category's per-type runs on other machines reuse them."""
        ...

    def prepare(self, request: GenerationRequest) -> Path | None: ...

    def generate(self, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path: ...


class Untrained:
    """Base of generators that learn nothing: ``prepare`` returns None."""

    fewshot_typed = True

    def prepare_category(self, cfg: FactoryConfig, manifest: Path, category: str) -> None:
        return None

    def shared_dirs(self, cfg: FactoryConfig, manifest: Path, category: str) -> list[Path]:
        return []

    def prepare(self, request: GenerationRequest) -> Path | None:
        return None
