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
only its own code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

GENERATORS: dict[str, str] = {
    "magic": "anomaly_factory.generators.magic.pairs:generate_pairs",
    "anomalycontrol": "anomaly_factory.generators.anomalycontrol.pairs:generate_pairs",
    "perlin": "anomaly_factory.generators.baselines.perlin:generate_pairs",
    "cutpaste": "anomaly_factory.generators.baselines.cutpaste:generate_pairs",
    "oracle": "anomaly_factory.generators.oracle:generate_pairs",  # demo datasets only
}


def get_generator(name: str) -> Callable[..., object]:
    """The ``generate_pairs`` function of generator ``name``."""
    if name not in GENERATORS:
        raise ValueError(f"generator: {name!r} is not one of {sorted(GENERATORS)}")
    module, _, attr = GENERATORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
