"""The generators the factory knows, selected by ``generator:`` in pipelines.yaml.

Each entry names an object that follows :class:`~anomaly_factory.generators.base.Generator`
(``prepare`` a type, ``generate`` its pairs in the one pairs format), so gates,
detectors, shards and flows treat every generator alike. Entries are import paths,
resolved lazily so that choosing a generator imports only its own code. Every route
(CLI, Prefect task, DVC stage) runs ``generate`` through :func:`run_generator`, which
makes the pairs folder one writer's at a time.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py reads GENERATORS: no import of the config here
    from anomaly_factory.config import FactoryConfig
    from anomaly_factory.generators.base import GenerationRequest, Generator, ProgressFn

GENERATORS: dict[str, str] = {
    "magic": "anomaly_factory.generators.magic.pairs:Magic",
    "anomalycontrol": "anomaly_factory.generators.anomalycontrol.pairs:AnomalyControl",
    "perlin": "anomaly_factory.generators.baselines.perlin:Perlin",
    "cutpaste": "anomaly_factory.generators.baselines.cutpaste:CutPaste",
    "oracle": "anomaly_factory.generators.oracle:Oracle",  # demo datasets only
}


def get_generator(name: str) -> Generator:
    """Generator ``name`` (an instance of its registered class)."""
    from anomaly_factory.errors import InputError
    from anomaly_factory.generators.base import Generator

    if name not in GENERATORS:
        raise InputError(f"generator: {name!r} is not one of {sorted(GENERATORS)}")
    module, _, attr = GENERATORS[name].partition(":")
    generator = getattr(importlib.import_module(module), attr)()
    if not isinstance(generator, Generator):
        raise InputError(f"generator: {GENERATORS[name]} does not follow generators.base.Generator")
    return generator


def prepare_category(name: str, cfg: FactoryConfig, manifest: Path, category: str) -> None:
    """What the types of ``category`` share, trained once (cached) by generator ``name``."""
    get_generator(name).prepare_category(cfg, manifest, category)


def shared_dirs(name: str, cfg: FactoryConfig, manifest: Path, category: str) -> list[Path]:
    """The folders ``prepare_category`` of generator ``name`` writes for ``category``."""
    return get_generator(name).shared_dirs(cfg, manifest, category)


def prepare_generator(name: str, request: GenerationRequest) -> Path | None:
    """The prepare stage: generator ``name``'s training for the request's type (cached)."""
    generator = get_generator(name)
    if generator.fewshot_typed:
        check_anomaly_type(request.manifest, request.category, request.anomaly_type)
    return generator.prepare(request)


def run_generator(name: str, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path:
    """The generate stage: generator ``name`` into ``request.out_dir``, one run at a time.

    Holds the folder's lock (a second run into it fails with Busy, exit 3), removes the
    temporary files a killed run left, and refuses a folder that holds other pairs
    (``output.check_existing_pairs``) before the generator resumes it.
    """
    from anomaly_factory.generators.output import check_existing_pairs
    from anomaly_factory.io import folder_lock, remove_stale, stale_temp_files

    generator = get_generator(name)
    if generator.fewshot_typed:
        check_anomaly_type(request.manifest, request.category, request.anomaly_type)
    out_dir = Path(request.out_dir)
    with folder_lock(out_dir, "generate"):
        remove_stale(stale_temp_files(out_dir))
        check_existing_pairs(out_dir, request.category, request.anomaly_type, request.n_pairs)
        return Path(generator.generate(request, on_pair))


def check_anomaly_type(manifest_path: Path, category: str, anomaly_type: str) -> None:
    """The category and type must exist in the manifest with few-shot images."""
    from anomaly_factory.errors import InputError
    from anomaly_factory.manifest import anomaly_types, read_images

    images = read_images(manifest_path)
    if category not in set(images["category"]):
        raise InputError(
            f"--category: {category!r} is not in {manifest_path} "
            f"(categories: {sorted(set(images['category']))})"
        )
    known = anomaly_types(images, category)
    if anomaly_type not in known:
        raise InputError(
            f"--anomaly-type: {anomaly_type!r} is not a few-shot anomaly type of category "
            f"{category!r} in {manifest_path} (types: {known})"
        )
