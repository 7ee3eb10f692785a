"""IC-LPIPS: the cluster arithmetic by hand, and the lpips network wired without downloads."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch

from anomaly_factory.metrics.ic_lpips import (
    LPIPSError,
    ic_lpips,
    ic_lpips_from_distances,
    load_lpips,
    to_tensor,
)


def test_hand_computed_case() -> None:
    # 5 generated images, 2 few-shot images. Clusters: {0, 1, 3} -> 0, {2, 4} -> 1.
    d = np.array(
        [
            [0.0, 0.2, 0.9, 0.4, 0.9],
            [0.2, 0.0, 0.9, 0.6, 0.9],
            [0.9, 0.9, 0.0, 0.9, 0.3],
            [0.4, 0.6, 0.9, 0.0, 0.9],
            [0.9, 0.9, 0.3, 0.9, 0.0],
        ]
    )
    res = ic_lpips_from_distances(np.array([0, 0, 1, 0, 1]), lambda i, j: d[i, j], 50)
    # cluster 0: (0.2 + 0.4 + 0.6) / 3 = 0.4; cluster 1: 0.3; mean = 0.35
    assert res.cluster_scores == pytest.approx([0.4, 0.3])
    assert res.score == pytest.approx(0.35)
    assert res.cluster_sizes == [3, 2]
    # cap of 2 per cluster keeps images 0 and 1 of cluster 0: (0.2 + 0.3) / 2 = 0.25
    assert ic_lpips_from_distances(
        np.array([0, 0, 1, 0, 1]), lambda i, j: d[i, j], 2
    ).score == pytest.approx(0.25)


def test_singleton_and_empty_clusters_are_skipped() -> None:
    res = ic_lpips_from_distances(np.array([0, 2]), lambda i, j: 1.0, 50, n_clusters=3)
    assert math.isnan(res.score) and res.cluster_sizes == [1, 0, 1] and res.note


@pytest.fixture(scope="module")
def model():
    return load_lpips("alex", pretrained=False, weights=None, seed=0)


def test_ic_lpips_matches_direct_lpips_calls(model) -> None:
    net, label = model
    assert label["backbone"] == "lpips=alex, pretrained=False"
    assert "RANDOM_INIT" in label["trunk"]
    rng = np.random.default_rng(0)
    shots = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    gen = [
        np.clip(shots[i % 2] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        for i in range(5)
    ]
    res = ic_lpips(net, gen, shots, resolution=32, max_per_cluster=50)

    g, s = to_tensor(gen, 32), to_tensor(shots, 32)
    with torch.no_grad():
        to_shot = np.array(
            [[float(net(g[i : i + 1], s[f : f + 1])) for f in range(2)] for i in range(5)]
        )
        assign = to_shot.argmin(axis=1)
        scores = []
        for c in range(2):
            members = np.flatnonzero(assign == c)
            pairs = list(combinations(members, 2))
            if pairs:
                scores.append(np.mean([float(net(g[i : i + 1], g[j : j + 1])) for i, j in pairs]))
    assert res.cluster_sizes == [int((assign == c).sum()) for c in range(2)]
    assert res.score == pytest.approx(float(np.mean(scores)), abs=1e-6)


def test_pretrained_trunk_never_downloads(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LPIPSError, match="alexnet-owt-7be5be79.pth"):
        load_lpips("alex", pretrained=True, weights=None)


def test_pretrained_trunk_loads_from_local_file(tmp_path) -> None:
    import torchvision

    torch.manual_seed(1)
    trunk = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(trunk.state_dict(), path)
    net, label = load_lpips("alex", pretrained=True, weights=path)
    assert torch.equal(net.net.slice1._modules["0"].weight, trunk.features[0].weight)
    assert torch.equal(net.net.slice5._modules["10"].weight, trunk.features[10].weight)
    assert label["trunk"] == "imagenet (alexnet.pth)"
