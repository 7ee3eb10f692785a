"""The generators the factory knows, selected by ``generator:`` in pipelines.yaml.

Every generator is a function with one signature and one output format
(``generators/output.py``: pair files plus ``pairs.parquet``), so gates,
detectors, shards and flows treat them alike::

    generate_pairs(
        cfg: FactoryConfig,
        manifest_path: Path,          # image manifest from ingestion
        category: str,
        anomaly_type: str,
        n_pairs: int,
        out_dir: Path,                # writes out_dir/pairs.parquet + files
        checkpoint: Path | None = None,
        reference_text: str | None = None,      # AnomalyControl only
        reference_category: str | None = None,  # AnomalyControl only
        reference_type: str | None = None,      # AnomalyControl only
        **options,                    # AnomalyControl: prompt, reference_image, reference_mask,
                                      # masks; the other generators accept and ignore them
    ) -> Path                         # the pairs.parquet path

Entries are import paths, resolved lazily so that choosing a generator imports
only its own code. Every route (CLI, Prefect task) runs a generator through
:func:`run_generator`, which makes the pairs folder one writer's at a time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

GENERATORS: dict[str, str] = {
    "magic": "anomaly_factory.generators.magic.pairs:generate_pairs",
    "anomalycontrol": "anomaly_factory.generators.anomalycontrol.pairs:generate_pairs",
    "perlin": "anomaly_factory.generators.baselines.perlin:generate_pairs",
    "cutpaste": "anomaly_factory.generators.baselines.cutpaste:generate_pairs",
    "oracle": "anomaly_factory.generators.oracle:generate_pairs",  # demo datasets only
}
# Generators whose pairs copy a few-shot type of the category: an --anomaly-type the
# manifest lacks is an error (AnomalyControl may transfer a type to a new category).
FEWSHOT_TYPED = {"magic", "perlin", "cutpaste", "oracle"}


def get_generator(name: str) -> Callable[..., object]:
    """The ``generate_pairs`` function of generator ``name``."""
    if name not in GENERATORS:
        from anomaly_factory.errors import InputError

        raise InputError(f"generator: {name!r} is not one of {sorted(GENERATORS)}")
    module, _, attr = GENERATORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def run_generator(
    name: str,
    cfg: Any,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    n_pairs: int,
    out_dir: Path,
    checkpoint: Path | None = None,
    **options: Any,
) -> Path:
    """The generate stage: generator ``name`` into ``out_dir``, one run at a time.

    Holds the folder's lock (a second run into it fails with Busy, exit 3), removes the
    temporary files a killed run left, and refuses a folder that holds other pairs
    (``output.check_existing_pairs``) before the generator resumes it.
    """
    from anomaly_factory.generators.output import check_existing_pairs
    from anomaly_factory.io import folder_lock, remove_stale, stale_temp_files

    generate = get_generator(name)
    if name in FEWSHOT_TYPED:
        check_anomaly_type(manifest_path, category, anomaly_type)
    out_dir = Path(out_dir)
    with folder_lock(out_dir, "generate"):
        remove_stale(stale_temp_files(out_dir))
        check_existing_pairs(out_dir, category, anomaly_type, n_pairs)
        return Path(
            generate(
                cfg, manifest_path, category, anomaly_type, n_pairs, out_dir, checkpoint, **options
            )
        )


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
