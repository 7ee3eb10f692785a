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


def polynomial_mmd2(real: np.ndarray, generated: np.ndarray) -> float:
    """Unbiased MMD² with KID's kernel ``(x·y/d + 1)^3`` over ALL images of both sets.

    The average of the subset estimates converges to this value (each subset estimate
    is an unbiased estimate of the same quantity), so comparing two generated sets
    against one real set with it has no subset-sampling noise. Sizes may differ.
    """
    x, y = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    m, n = len(x), len(y)
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid_all_images(real: np.ndarray, generated: np.ndarray) -> KIDResult:
    """KID as :func:`polynomial_mmd2` over all images (``subsets`` 0: none drawn)."""
    n_real, n_gen = len(real), len(generated)
    if min(n_real, n_gen) < MIN_SUBSET:
        note = f"KID undefined: needs >= {MIN_SUBSET} images per side (n_real={n_real}, n_generated={n_gen})"
        return KIDResult(math.nan, math.nan, n_real, n_gen, 0, 0, note)
    value = polynomial_mmd2(real, generated)
    return KIDResult(value, math.nan, n_real, n_gen, 0, 0, "all images, no subsets")


def _poly(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid_difference(
    real: np.ndarray, generated: np.ndarray, reference: np.ndarray
) -> tuple[float, float]:
    """``KID(generated) - KID(reference)`` against one real set, and its standard error.

    ``generated`` and ``reference`` are paired (row ``i`` of both comes from the same
    normal image and mask). Both KIDs are :func:`polynomial_mmd2` over all images, so the
    real-real term cancels. The standard error is the delete-one jackknife over the
    pairs plus that over the real images (independent samples, variances add); it is 0
    when the two sets are identical, so "doing nothing" never ties with the normals.
    """
    r, g, c = (np.asarray(a, np.float64) for a in (real, generated, reference))
    n, m = len(g), len(r)
    kg, kc = _poly(g, g), _poly(c, c)
    rg, rc = _poly(r, g), _poly(r, c)  # m x n

    def within(k: np.ndarray, rowsum: np.ndarray, size: int) -> np.ndarray:
        off = k.sum() - np.trace(k)
        full = off / (size * (size - 1))
        loo = (off - 2 * rowsum) / ((size - 1) * (size - 2)) if size > 2 else np.full(size, full)
        return np.append(loo, full)  # leave-one-out values, then the full value

    off_g = kg.sum(1) - np.diag(kg)
    off_c = kc.sum(1) - np.diag(kc)
    wg, wc = within(kg, off_g, n), within(kc, off_c, n)
    cross_g_pairs = (rg.sum() - rg.sum(0)) / (m * (n - 1))
    cross_c_pairs = (rc.sum() - rc.sum(0)) / (m * (n - 1))
    d_pairs = (wg[:-1] - wc[:-1]) - 2 * (cross_g_pairs - cross_c_pairs)
    d = float((wg[-1] - wc[-1]) - 2 * (rg.mean() - rc.mean()))
    cross_real = ((rg.sum() - rg.sum(1)) - (rc.sum() - rc.sum(1))) / ((m - 1) * n)
    d_real = (wg[-1] - wc[-1]) - 2 * cross_real

    def jackknife_var(values: np.ndarray) -> float:
        k = len(values)
        return float((k - 1) / k * ((values - values.mean()) ** 2).sum()) if k > 1 else 0.0

    se = math.sqrt(jackknife_var(d_pairs) + jackknife_var(d_real)) if n > 2 else 0.0
    return d, se


def mean_over_types(values: list[float | None]) -> float | None:
    """Average of the finite per-type values (the papers' 'averaged over types')."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None
