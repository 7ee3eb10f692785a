"""MAGIC sampler: stock-CFG equivalence, GPP on the conditional branch, MGNI, paste-back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_factory.config import FactoryConfig
from anomaly_factory.generators import composite as C
from anomaly_factory.generators.magic import sampler as S
from anomaly_factory.generators.magic.components import build_tiny_pipeline
from anomaly_factory.generators.magic.gpp import anomaly_token_positions

RES = 32
PROMPT = "a photo of sks defect"


@pytest.fixture(scope="module")
def pipe():
    cfg = FactoryConfig()
    model = cfg.model.model_copy(update={"resolution": RES})
    torch.manual_seed(0)
    p = build_tiny_pipeline(model, cfg.finetune, cfg.generate.scheduler)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.zeros((RES, RES), bool) for _ in range(2)]
    masks[0][8:20, 10:22] = True
    masks[1][2:9, 3:30] = True
    return images, masks, [11, 22]


def test_reduces_to_stock_cfg(pipe, inputs):
    """w_m == w_d and sigma == 0: the stock diffusers inpaint pipeline, to 1e-5."""
    images, masks, seeds = inputs
    opts = S.SamplerOptions(steps=4, w_m=5.0, w_d=5.0, sigma=0.0)
    ours = S.magic_inpaint(pipe, images, masks, seeds, PROMPT, opts)
    ref = pipe(
        prompt=[PROMPT] * 2,
        image=[Image.fromarray(i) for i in images],
        mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks],
        height=RES,
        width=RES,
        strength=1.0,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=S.cpu_generators(seeds),
        output_type="np",
    ).images
    assert ours.shape == ref.shape == (2, RES, RES, 3)
    assert np.abs(ours - ref).max() <= 1e-5


def test_sag_uses_cosine_schedule_and_changes_output(pipe, inputs, monkeypatch):
    images, masks, seeds = inputs
    seen = []
    real = S.spatially_adaptive_guidance

    def spy(eps_u, eps_c, mask, w_in, w_d):
        seen.append((w_in, w_d))
        return real(eps_u, eps_c, mask, w_in, w_d)

    monkeypatch.setattr(S, "spatially_adaptive_guidance", spy)
    sag = S.magic_inpaint(pipe, images, masks, seeds, PROMPT, S.SamplerOptions(steps=5, w_m=2.0))
    assert [w for w, _ in seen] == S.sag_schedule(2.0, 7.5, 5).tolist()
    assert all(w_d == 7.5 for _, w_d in seen)
    cfg = S.magic_inpaint(pipe, images, masks, seeds, PROMPT, S.SamplerOptions(steps=5, w_m=7.5))
    assert np.abs(sag - cfg).max() > 1e-4


def test_gpp_perturbs_conditional_branch_once_per_image(pipe, inputs):
    images, masks, seeds = inputs
    calls: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        calls.append(kwargs["encoder_hidden_states"].clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    positions = anomaly_token_positions(pipe.tokenizer, PROMPT, "sks")
    try:
        S.magic_inpaint(
            pipe, images, masks, seeds, PROMPT, S.SamplerOptions(steps=3, sigma=1.0), positions
        )
    finally:
        handle.remove()
    cond_clean, uncond_clean = pipe.encode_prompt(PROMPT, "cpu", 2, True, "")
    assert len(calls) == 3
    for emb in calls:
        uncond, cond = emb.chunk(2)
        assert torch.equal(uncond, uncond_clean)  # unconditional branch untouched
        assert torch.equal(cond - cond_clean, calls[0].chunk(2)[1] - cond_clean)  # same draw
    delta = calls[0].chunk(2)[1] - cond_clean
    assert torch.all(delta[:, ~positions] == 0)  # only the anomaly token (paper's target)
    assert torch.all(delta[:, positions].abs().sum(-1) > 0)
    assert not torch.allclose(delta[0], delta[1])  # one draw per image
    # the draw of an image depends on its seed only
    alone = S.perturb_conditional(cond_clean[:1], 1.0, positions, seeds[1:])
    torch.testing.assert_close(alone[0] - cond_clean[0], delta[1])


def test_image_depends_on_its_seed_not_the_batch(pipe, inputs):
    images, masks, seeds = inputs
    opts = S.SamplerOptions(steps=3, sigma=1.0, mgni=True)
    both = S.magic_inpaint(pipe, images, masks, seeds, PROMPT, opts)
    second = S.magic_inpaint(pipe, images[1:], masks[1:], seeds[1:], PROMPT, opts)
    diff = np.abs(both[1] - second[0]).max()
    print(f"batch-of-2 vs batch-of-1 max abs diff: {diff:.2e}")
    assert diff <= 1e-4
    again = S.magic_inpaint(pipe, images, masks, seeds, PROMPT, opts)
    assert np.array_equal(both, again)


def test_mgni_is_per_position_ddim_eta(pipe):
    """MGNI step == the DDIM update with eta(x) = eta_in on the mask, eta_out elsewhere."""
    sched = pipe.scheduler
    sched.set_timesteps(10)
    t = sched.timesteps[3]
    g = torch.Generator().manual_seed(0)
    latents, eps = torch.randn(2, 1, 4, 8, 8, generator=g)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    opts = S.SamplerOptions(mgni=True, eta_inside=1.0, eta_outside=0.2)
    out = S._ddim_step(sched, eps, t, latents, mask, opts, S.cpu_generators([5]))

    z = torch.randn(eps.shape, generator=torch.Generator().manual_seed(5))
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    eta = mask * 1.0 + (1 - mask) * 0.2
    std = eta * var.sqrt()
    x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps + std * z
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    plain = S._ddim_step(sched, eps, t, latents, mask, S.SamplerOptions(), None)
    zero = S._ddim_step(
        sched, eps, t, latents, mask, S.SamplerOptions(mgni=True, eta_inside=0.0), [g]
    )
    assert torch.equal(plain, zero)  # eta 0 everywhere is plain DDIM
    assert torch.allclose(out * (1 - mask), expected * (1 - mask))


def test_feather_alpha_and_paste_back():
    mask = np.zeros((16, 16), bool)
    mask[6:10, 6:10] = True
    alpha = C.feather_alpha(mask, 3)
    assert np.all(alpha[mask] == 1)
    assert alpha[8, 10] == pytest.approx(0.75) and alpha[8, 12] == pytest.approx(0.25)
    assert np.all(alpha[:, 14:] == 0) and np.all(alpha[:2] == 0)
    assert np.array_equal(C.feather_alpha(mask, 0), mask.astype(np.float32))
    gen = np.random.default_rng(0).random((1, 16, 16, 3))
    normal = np.random.default_rng(1).random((1, 16, 16, 3))
    out = C.paste_back(gen, normal, [mask], 3)
    assert np.array_equal(out[0][mask], gen[0][mask])
    assert np.array_equal(out[0][alpha == 0], normal[0][alpha == 0])


def test_paste_back_keeps_normal_region_exact(pipe, inputs):
    images, masks, seeds = inputs
    opts = S.SamplerOptions(steps=2, paste_back=True, feather_px=2)
    out = S.magic_inpaint(pipe, images, masks, seeds, PROMPT, opts)
    for b in range(2):
        far = C.feather_alpha(masks[b], 2) == 0
        np.testing.assert_allclose(out[b][far], images[b][far] / 255.0, atol=1e-6)


# --------------------------------------------------------------------------- MGNI guard, schedules
def _last_step(pipe, steps: int = 20):
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    latents, eps = torch.randn(2, 1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    return sched, sched.timesteps[-1], latents, eps, mask


def test_large_eta_inside_no_longer_gives_nan(pipe):
    """eta 1.5 at the last of 20 DDIM steps: the variance exceeds 1 - alpha_prev and the
    stock update is NaN; MGNI clips eta to 0.99 x the critical eta instead."""
    sched, t, latents, eps, mask = _last_step(pipe)
    raw = sched.step(eps, t, latents, eta=1.5, variance_noise=torch.zeros_like(eps)).prev_sample
    assert torch.isnan(raw).any()  # the failure MGNI used to hand on
    opts = S.SamplerOptions(mgni=True, eta_inside=1.5)
    out = S._ddim_step(sched, eps, t, latents, mask, opts, S.cpu_generators([3]))
    assert torch.isfinite(out).all()
    crit = S.critical_eta(sched, t)
    clipped = S.SamplerOptions(mgni=True, eta_inside=0.99 * crit)
    same = S._ddim_step(sched, eps, t, latents, mask, clipped, S.cpu_generators([3]))
    torch.testing.assert_close(out, same)
    zero = S.SamplerOptions(mgni=True, eta_inside=1.5, eta_guard="zero_before_neg")
    plain = S.SamplerOptions(mgni=True, eta_inside=0.0)
    torch.testing.assert_close(
        S._ddim_step(sched, eps, t, latents, mask, zero, S.cpu_generators([3])),
        S._ddim_step(sched, eps, t, latents, mask, plain, S.cpu_generators([3])),
    )


def test_large_eta_inside_images_are_finite(pipe, inputs):
    images, masks, seeds = inputs
    opts = S.SamplerOptions(steps=20, mgni=True, eta_inside=1.5)
    out = S.magic_inpaint(pipe, images, masks, seeds, PROMPT, opts)
    assert np.isfinite(out).all()


def test_critical_eta_zeroes_the_ddim_direction(pipe):
    """At the critical eta, sqrt(1 - alpha_prev - std^2) is 0: every eta below is valid."""
    sched = pipe.scheduler
    sched.set_timesteps(20)
    for t in sched.timesteps:
        crit = S.critical_eta(sched, t)
        prev = int(t) - 1000 // 20
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        std2 = crit**2 * float(sched._get_variance(int(t), prev))
        assert crit >= 1.0 and std2 == pytest.approx(float(1 - a_prev), rel=1e-5)


@pytest.mark.parametrize(
    ("schedule", "first", "middle", "last"),
    [
        ("constant", 2.0, 2.0, 2.0),
        ("linear_down", 2.0, 1.25, 0.5),
        ("linear_up", 0.5, 1.25, 2.0),
        ("cosine_down", 2.0, 1.25, 0.5),
        ("cosine_up", 0.5, 1.25, 2.0),
        ("poly_down", 2.0, 0.875, 0.5),
        ("exp_up", 0.5, 0.5 + 1.5 * (1 - np.exp(-1.5)), 0.5 + 1.5 * (1 - np.exp(-3))),
        ("sigmoid_down", 0.5 + 1.5 * (2 / (1 + np.exp(-4)) - 1), 0.5, 0.5),
    ],
)
def test_mgni_schedules_follow_the_official_shapes(schedule, first, middle, last):
    opts = S.SamplerOptions(mgni=True, eta_inside=2.0, eta_inside_min=0.5, eta_schedule=schedule)
    got = [S.mgni_eta(opts, i, 5) for i in (0, 2, 4)]
    assert got == pytest.approx([first, middle, last])


def test_mgni_stop_step_and_bad_names():
    opts = S.SamplerOptions(mgni=True, eta_inside=1.0, eta_stop_step=3)
    assert [S.mgni_eta(opts, i, 5) for i in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="generate.mgni.schedule"):
        S.mgni_eta(S.SamplerOptions(eta_schedule="zigzag"), 0, 5)
    with pytest.raises(ValueError, match="generate.mgni.guard"):
        S.guard_eta(5.0, 1.2, "ignore", 0.99)


def test_mgni_config_is_bounded():
    from anomaly_factory.config import ConfigError, load_config

    for bad, match in (
        ({"eta_inside": 3.5}, r"generate.mgni.eta_inside: 3.5 is not <= 3"),
        ({"eta_inside": 1.0, "eta_inside_min": 2.0}, "eta_inside_min: 2.0 is not <= eta_inside"),
        ({"eta_outside": 1.2}, r"generate.mgni.eta_outside: 1.2 is not <= 1"),
        ({"schedule": "zigzag"}, "generate.mgni.schedule"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(overrides={"generate": {"mgni": bad}})
    cfg = load_config(
        overrides={"generate": {"mgni": {"enabled": True, "schedule": "cosine_down"}}}
    )
    opts = S.SamplerOptions.from_config(cfg.generate)
    assert opts.mgni and opts.eta_schedule == "cosine_down" and opts.eta_guard == "clip_to_crit"


# --------------------------------------------------------------------------- thin masks
@pytest.mark.parametrize("width", [1, 4])
def test_thin_lines_survive_coverage_and_vanish_with_nearest(width):
    """A scratch thinner than a latent cell (8 px, as SD's VAE): nearest keeps nothing."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10 : 10 + width, 5:60] = 1  # rows 10.. of the cell rows 8..15
    nearest = S.latent_mask(mask, 8, "nearest")
    coverage = S.latent_mask(mask, 8, "coverage")
    assert nearest.sum() == 0
    assert coverage[0, 0, 1].sum() == 8 and coverage.sum() == 8  # the one row of cells it crosses
    assert torch.equal(nearest, torch.nn.functional.interpolate(mask, size=(8, 8)))
    # a share threshold drops cells the line only grazes
    assert S.latent_mask(mask, 8, "coverage", min_coverage=0.6).sum() == 0


def test_coverage_mask_reaches_the_unet_and_sag(pipe, inputs, monkeypatch):
    images, _, seeds = inputs
    line = np.zeros((RES, RES), bool)
    line[5:7, 2:30] = True  # 2 px, inside latent rows 4..7 (4 px per cell): nearest misses it
    seen: dict[str, list[float]] = {}
    real = S.spatially_adaptive_guidance

    def spy(eps_u, eps_c, mask, w_in, w_d):
        seen.setdefault(mode, []).append(float(mask.sum()))
        return real(eps_u, eps_c, mask, w_in, w_d)

    monkeypatch.setattr(S, "spatially_adaptive_guidance", spy)
    for mode in ("nearest", "coverage"):
        opts = S.SamplerOptions(steps=2, latent_mask=mode)
        S.magic_inpaint(pipe, images[:1], [line], seeds[:1], PROMPT, opts)
    assert seen["nearest"] == [0.0, 0.0]
    assert seen["coverage"][0] > 0


def test_config_default_latent_mask_is_coverage():
    assert S.SamplerOptions.from_config(FactoryConfig().generate).latent_mask == "coverage"


def test_noised_image_start_is_x_t_of_the_image_latents(pipe, inputs, monkeypatch):
    """init_latents noised_image: the first UNet input holds the image's latents noised to
    the first timestep (scheduler.add_noise of the same noise), not pure noise."""
    images, masks = inputs[0][:1], inputs[1][:1]
    seen = []
    real = pipe.unet.forward

    def spy(sample, t, **kw):
        seen.append(sample[:1, :4].clone())
        return real(sample, t, **kw)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    S.magic_inpaint(pipe, images, masks, [5], "a photo of sks defect", S.SamplerOptions(steps=2))
    pure = seen[0]
    seen.clear()
    opts = S.SamplerOptions(steps=2, init_latents="noised_image")
    S.magic_inpaint(pipe, images, masks, [5], "a photo of sks defect", opts)
    image = pipe.image_processor.preprocess([Image.fromarray(images[0])], height=32, width=32)
    with torch.no_grad():
        z0 = pipe.vae.encode(image).latent_dist.mode() * pipe.vae.config.scaling_factor
    t0 = pipe.scheduler.timesteps[:1]
    want = pipe.scheduler.add_noise(z0, pure, t0)
    assert torch.allclose(seen[0], want, atol=1e-5)
    assert not torch.allclose(seen[0], pure, atol=1e-3)


@pytest.mark.slow
def test_noised_image_start_keeps_the_background_with_the_bundled_base(tiny_config):
    """The bundled tiny base, from pure noise, redraws the whole image shifted in colour
    (its latents' channel means are large); started from the noised normal it keeps it.
    Outside the mask, paste-back off, mean error in grey levels."""
    from anomaly_factory.datasets.demo import render_category
    from anomaly_factory.generators.magic import models

    cfg = tiny_config
    pipe = models.tiny_start(cfg)
    pipe.set_progress_bar_config(disable=True)
    img, _ = render_category("bar_demo", "good", cfg.model.resolution, 0, 0)
    m = np.zeros(img.shape[:2], bool)
    m[48:80, 48:80] = True
    err = {}
    for init in ("noise", "noised_image"):
        opts = S.SamplerOptions(steps=10, init_latents=init)
        out = S.magic_inpaint(pipe, [img, img], [m, m], [1, 2], "a photo of sks defect", opts)
        err[init] = float(np.abs(out * 255 - img[None])[:, ~m].mean())
    print(f"outside-mask error (grey levels): {err}")
    assert err["noised_image"] < 15 and err["noise"] > 40


def _spy_unet(pipe, monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = pipe.unet.forward

    def spy(sample, t, **kw):
        seen.append(sample[:, :4].clone())
        return real(sample, t, **kw)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    return seen


@pytest.mark.parametrize("margin", [0, 1])
def test_blend_known_holds_the_noised_normal_outside_the_mask_every_step(
    pipe, inputs, monkeypatch, margin
):
    """blend_known: after each step the cells outside the mask (grown by ``margin`` cells)
    are the image's latents noised to the next timestep with the run's first noise
    (diffusers' 4-channel loop), and the decoded latents are the image's own there; the
    mask's cells and the margin's ring are sampled. Off, nothing is held."""
    images, masks = inputs[0][:1], inputs[1][:1]
    decoded = []
    real_decode = pipe.vae.decode

    def spy_decode(z, *a, **kw):
        decoded.append(z.clone())
        return real_decode(z, *a, **kw)

    monkeypatch.setattr(pipe.vae, "decode", spy_decode)
    seen = _spy_unet(pipe, monkeypatch)
    image = pipe.image_processor.preprocess([Image.fromarray(images[0])], height=RES, width=RES)
    z0 = S.image_latents(pipe, image)
    cells = S.latent_mask(torch.from_numpy(masks[0]).float()[None, None], z0.shape[-2:], "coverage")
    grown = S.grow_cells(cells, margin)[0, 0] > 0.5
    ring = (grown & (cells[0, 0] < 0.5)).expand_as(z0[0])
    outside = (~grown).expand_as(z0[0])
    assert ring.any() == bool(margin)
    for blend in (True, False):
        seen.clear()
        decoded.clear()
        opts = S.SamplerOptions(
            steps=3, latent_mask="coverage", blend_known=blend, blend_known_margin=margin
        )
        S.magic_inpaint(pipe, images, masks, [5], PROMPT, opts)
        noise, timesteps = seen[0][:1], pipe.scheduler.timesteps
        final = decoded[0] * pipe.vae.config.scaling_factor
        for i in (1, 2):
            want = pipe.scheduler.add_noise(z0, noise, timesteps[i : i + 1])
            close = torch.allclose(seen[i][0][outside], want[0][outside], atol=1e-5)
            assert close == blend
        assert torch.allclose(final[0][outside], z0[0][outside], atol=1e-5) == blend
        assert not torch.allclose(
            final[0][grown.expand_as(z0[0])], z0[0][grown.expand_as(z0[0])], atol=1e-2
        )
        if margin:
            assert not torch.allclose(final[0][ring], z0[0][ring], atol=1e-2)


def test_grow_cells_is_a_square_dilation():
    m = torch.zeros(1, 1, 6, 6)
    m[0, 0, 2, 3] = 1
    grown = S.grow_cells(m, 1)[0, 0]
    assert grown.sum() == 9 and grown[1:4, 2:5].all()
    assert torch.equal(S.grow_cells(m, 0), m)
