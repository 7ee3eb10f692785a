"""KID: torchmetrics' estimator on our features equals torch-fidelity and the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomaly_factory.metrics.features import FeatureExtractorError, load_extractor
from anomaly_factory.metrics.kid import kid_from_features


def _unbiased_poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """KID written out from CONTEXT §3: k(a, b) = (a.b/d + 1)^3, unbiased MMD²."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 16)), rng.normal(0.5, 1.2, size=(12, 16))


def test_kid_equals_torch_fidelity_and_formula_on_full_subsets(features) -> None:
    # With subset_size == n every subset is a permutation of all samples, and MMD² is
    # permutation invariant, so both libraries must give the same number.
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    real, gen = features
    ours = kid_from_features(real, gen, subsets=3, subset_size=12).mean
    ref = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(gen),
        kid_subsets=3,
        kid_subset_size=12,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        rng_seed=0,
        verbose=False,
    )[KEY_METRIC_KID_MEAN]
    assert ours == pytest.approx(ref, abs=1e-6)
    assert ours == pytest.approx(_unbiased_poly_mmd2(real, gen), abs=1e-9)


def test_kid_subsets_are_seeded_and_separate_distributions() -> None:
    rng = np.random.default_rng(1)
    real, twin, shifted = (rng.normal(size=(40, 8)) for _ in range(3))
    shifted += 2.0
    a = kid_from_features(real, shifted, subsets=5, subset_size=10, seed=1)
    b = kid_from_features(real, shifted, subsets=5, subset_size=10, seed=1)
    same = kid_from_features(real, twin, subsets=5, subset_size=10, seed=1)
    assert (a.mean, a.std) == (b.mean, b.std)
    assert a.mean > 10 * abs(same.mean)


def test_small_types_shrink_subsets_or_are_nan(features) -> None:
    real, gen = features
    small = kid_from_features(real, gen[:4], subsets=2, subset_size=10)
    assert small.subset_size == 4 and "reduced" in small.note
    undefined = kid_from_features(real, gen[:1], subsets=2, subset_size=10)
    assert math.isnan(undefined.mean) and "undefined" in undefined.note
    assert undefined.as_dict()["kid_x1e3"] is None


def test_pixel_stats_is_deterministic_and_labelled() -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (32, 40, 3), dtype=np.uint8) for _ in range(3)]
    ext = load_extractor("pixel_stats")
    assert np.array_equal(ext.features(imgs), ext.features(imgs))
    assert ext.provenance()["standard"] is False and len(ext.weights_sha256) == 64


def test_inception_without_weights_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FeatureExtractorError, match="weights-inception-2015-12-05"):
        load_extractor("inception")
    with pytest.raises(FeatureExtractorError, match="does not exist"):
        load_extractor("inception", weights=tmp_path / "nope.pth")


def test_unknown_extractor_names_the_choices() -> None:
    with pytest.raises(FeatureExtractorError, match="pixel_stats"):
        load_extractor("inceptoin")


def test_local_torchscript_module_is_hashed_by_file(tmp_path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    path = tmp_path / "feat.pt"
    torch.jit.script(net).save(str(path))
    ext = load_extractor(f"module:{path}", resolution=32)
    feats = ext.features([np.zeros((20, 20, 3), np.uint8), np.full((20, 20, 3), 255, np.uint8)])
    assert feats.shape == (2, 4)
    import hashlib

    assert ext.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
