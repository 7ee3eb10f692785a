"""Spatially adaptive guidance (MAGIC §3.3): the formula and the cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_factory.generators.magic.sag import sag_schedule, spatially_adaptive_guidance


def test_guidance_matches_formula_at_every_position():
    g = torch.Generator().manual_seed(0)
    eps_u = torch.randn(2, 4, 5, 6, generator=g)
    eps_c = torch.randn(2, 4, 5, 6, generator=g)
    mask = (torch.rand(2, 1, 5, 6, generator=g) > 0.5).float()
    w_in, w_d = 4.0, 7.5
    out = spatially_adaptive_guidance(eps_u, eps_c, mask, w_in, w_d)
    for b in range(2):
        for y in range(5):
            for x in range(6):
                w = w_in if mask[b, 0, y, x] == 1 else w_d
                expected = eps_u[b, :, y, x] + w * (eps_c[b, :, y, x] - eps_u[b, :, y, x])
                torch.testing.assert_close(out[b, :, y, x], expected, rtol=0, atol=1e-6)


def test_equal_weights_is_standard_cfg():
    g = torch.Generator().manual_seed(1)
    eps_u, eps_c = torch.randn(2, 1, 4, 8, 8, generator=g)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.3).float()
    out = spatially_adaptive_guidance(eps_u, eps_c, mask, 7.5, 7.5)
    assert torch.equal(out, eps_u + 7.5 * (eps_c - eps_u))


@pytest.mark.parametrize(("w_m", "w_d", "n"), [(4.0, 7.5, 50), (2.5, 7.5, 7), (0.1, 0.3, 20)])
def test_schedule_endpoints_and_monotone(w_m, w_d, n):
    s = sag_schedule(w_m, w_d, n)
    assert s.shape == (n,)
    assert s[0].item() == w_m and s[-1].item() == w_d
    assert torch.all(s[1:] >= s[:-1])
    # cosine shape: halfway through the steps it is halfway between the endpoints
    mid = w_m + (w_d - w_m) * (1 - math.cos(math.pi * 0.5)) / 2
    if n % 2 == 1:
        assert s[n // 2].item() == pytest.approx(mid)


def test_schedule_edge_cases():
    assert sag_schedule(4.0, 7.5, 1).tolist() == [4.0]
    assert sag_schedule(5.0, 5.0, 4).tolist() == [5.0] * 4
    with pytest.raises(ValueError, match="num_steps"):
        sag_schedule(4.0, 7.5, 0)
