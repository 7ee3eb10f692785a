"""Kernel Inception Distance per anomaly type (CONTEXT §3, "KID").

KID = unbiased MMD² between generated and real features with the polynomial
kernel ``k(x, y) = (x·y/d + 1)^3``, averaged over ``subsets`` random subsets of
``subset_size`` images per side. The estimator is torchmetrics'
``KernelInceptionDistance`` fed precomputed features (an identity feature
module), so the number is the reference implementation's by construction.

Real images are the type's real anomaly images. ``gates.kid.real_split``
selects them: ``all`` (default; the papers compare with all real anomaly images
of the type), ``fewshot`` (only what the generator saw) or ``test``.

Small types: when either side has fewer images than ``subset_size``, the subset
size shrinks to the smaller side and the result says so; with fewer than 2 images
on a side the unbiased estimator is undefined and KID is NaN with a reason.

>>> rng = np.random.default_rng(0)
>>> a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 3
>>> kid_from_features(a, a, 5, 10).mean < kid_from_features(a, b, 5, 10).mean
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

SCALE = 1e3  # papers report KID x 10^3
MIN_SUBSET = 2  # the unbiased MMD² divides by m(m-1)


@dataclass
class KIDResult:
    mean: float  # raw KID (not scaled)
    std: float
    n_real: int
    n_generated: int
    subset_size: int  # the size actually used
    subsets: int
    note: str = ""

    def as_dict(self) -> dict[str, float | int | str | None]:
        d: dict[str, float | int | str | None] = asdict(self)
        d["kid_x1e3"] = _finite_or_none(self.mean * SCALE)
        d["kid_std_x1e3"] = _finite_or_none(self.std * SCALE)
        d["mean"] = _finite_or_none(self.mean)
        d["std"] = _finite_or_none(self.std)
        return d


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def kid_from_features(
    real: np.ndarray, generated: np.ndarray, subsets: int, subset_size: int, seed: int = 0
) -> KIDResult:
    """KID between two feature sets with torchmetrics' estimator and seeded subsets."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real, n_gen = len(real), len(generated)
    size = min(subset_size, n_real, n_gen)
    note = ""
    if size < subset_size:
        note = f"subset_size reduced from {subset_size} to {size} (n_real={n_real}, n_generated={n_gen})"
    if size < MIN_SUBSET:
        note = f"KID undefined: needs >= {MIN_SUBSET} images per side (n_real={n_real}, n_generated={n_gen})"
        return KIDResult(math.nan, math.nan, n_real, n_gen, size, subsets, note)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=torch.nn.Identity(), subsets=subsets, subset_size=size
        )
    metric.update(torch.as_tensor(np.asarray(real, np.float64)), real=True)
    metric.update(torch.as_tensor(np.asarray(generated, np.float64)), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return KIDResult(float(mean), float(std), n_real, n_gen, size, subsets, note)


def mean_over_types(values: list[float | None]) -> float | None:
    """Average of the finite per-type values (the papers' 'averaged over types')."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None
