"""Which pairs a version publishes, by ``gates.on_pair_failure``.

* ``fail`` (default): every pair is published; one failing pair fails its type, so
  the version is not publishable.
* ``drop``: failing pairs are left out; each type publishes its first
  ``n_pairs`` passing pairs in key order and fails its pair count if fewer pass.
  The generator is asked for ``n_pairs * (1 + gates.extra_candidates)`` candidates
  (:func:`candidates_per_type`); every generator makes more pairs when asked for more,
  so none needs code for this.

The choice is the ``published`` column of ``pair_checks.parquet``; the shards read it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from anomaly_factory.config import FactoryConfig
from anomaly_factory.errors import InputError
from anomaly_factory.gates.pair_checks import PAIR_CHECKS_FILE

DROP = "drop"


class PublicationError(InputError):
    """The gates' record of which pairs to publish is missing or unusable."""


def candidates_per_type(cfg: FactoryConfig) -> int:
    """Pairs to generate per type: ``n_pairs``, plus the extra candidates when failing
    pairs are dropped."""
    n = cfg.generate.n_pairs
    if cfg.gates.on_pair_failure != DROP:
        return n
    return n + math.ceil(n * cfg.gates.extra_candidates)


def select_published(checks: pd.DataFrame, expected: int, mode: str) -> pd.DataFrame:
    """``checks`` with a ``published`` column: all pairs (``fail``), or the first
    ``expected`` passing pairs of each type in key order (``drop``)."""
    out = checks.sort_values("key", kind="stable").reset_index(drop=True)
    if mode != DROP:
        out["published"] = True
        return out
    rank = out[out["passed"]].groupby("type_id").cumcount()
    out["published"] = False
    out.loc[rank.index[rank < expected], "published"] = True
    return out


def published_keys(reports_dir: str | os.PathLike[str]) -> set[str]:
    """Keys the gates chose to publish: ``pair_checks.parquet`` in ``reports_dir``, or in
    every sub-folder when the gates ran per category (DVC)."""
    root = Path(reports_dir)
    paths = [root / PAIR_CHECKS_FILE] if (root / PAIR_CHECKS_FILE).is_file() else []
    paths = paths or sorted(root.rglob(PAIR_CHECKS_FILE))
    if not paths:
        raise PublicationError(
            f"{root}: no {PAIR_CHECKS_FILE}; gates.on_pair_failure is 'drop', so the shards "
            "need the gates' choice of pairs (run `anomaly-factory gates` first)"
        )
    keys: set[str] = set()
    for path in paths:
        try:
            table = pd.read_parquet(path, columns=["key", "published"])
        except (KeyError, ValueError, OSError) as exc:
            raise PublicationError(
                f"{path}: no readable 'key'/'published' columns ({exc})"
            ) from None
        keys |= set(table.loc[table["published"].astype(bool), "key"].astype(str))
    return keys
