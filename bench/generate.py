"""Benchmark of MAGIC's sampler against the stock diffusers inpainting pipeline.

Same model, same process, same inputs and steps: pairs/s and peak memory of

* ``stock``     — ``StableDiffusionInpaintPipeline.__call__`` (CFG, strength 1.0),
* ``magic_cfg`` — :func:`magic_inpaint` with ``w_m == w_d`` and ``sigma == 0`` (plain CFG),
* ``magic_sag`` — :func:`magic_inpaint` with SAG (``w_m`` 4.0) and GPP (``sigma`` 1.0),

at batch 1 and larger. The headline is the SAG+GPP overhead over plain CFG at
equal batch (target <= 3 %). Runs are interleaved and the minimum of the repeats
is kept, which is the least noisy estimate on a shared machine.

    python bench/generate.py                         # tiny preset, CPU
    python bench/generate.py --preset sd2 --res 512  # SD2-size UNet, random weights (GPU)

Peak memory is ``torch.cuda.max_memory_allocated`` above the pre-call level on GPU
and the process's peak resident set size during the call (sampled every 2 ms) on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a photo of sks defect"


def build_pipeline(preset: str, res: int, device: str):
    from anomaly_factory.config import FactoryConfig
    from anomaly_factory.generators.magic import components

    cfg = FactoryConfig()
    model = cfg.model.model_copy(update={"resolution": res})
    torch.manual_seed(0)
    pipe = components.build_tiny_pipeline(model, cfg.finetune, cfg.generate.scheduler)
    if preset == "sd2":
        # SD2-inpainting shapes (865M-parameter UNet, SD VAE), random weights, tiny text encoder
        from diffusers import AutoencoderKL, UNet2DConditionModel

        hidden = pipe.text_encoder.config.hidden_size
        pipe.unet = UNet2DConditionModel(
            sample_size=res // 8,
            in_channels=9,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=hidden,
            use_linear_projection=True,
        )
        pipe.vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=res,
        )
        pipe.vae_scale_factor = 8
        pipe.image_processor.config.vae_scale_factor = 8
        pipe.mask_processor.config.vae_scale_factor = 8
    if device == "cuda":  # fp16 on GPU as deployed; CPU stays fp32 (the equivalence setting)
        pipe = pipe.to(device=device, dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PeakRSS:
    """Peak resident memory above the level at entry, sampled in a thread (CPU runs)."""

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        """Peak resident set size of the process during the call (weights included)."""
        return self.peak / 2**20


def run_once(pipe, kind: str, images, masks, seeds, steps: int, res: int):
    from anomaly_factory.generators.magic.gpp import anomaly_token_positions
    from anomaly_factory.generators.magic.sampler import (
        SamplerOptions,
        cpu_generators,
        magic_inpaint,
    )

    if kind == "stock":
        return pipe(
            prompt=[PROMPT] * len(images),
            image=[Image.fromarray(i) for i in images],
            mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks],
            height=res,
            width=res,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=cpu_generators(seeds),
            output_type="np",
        ).images
    if kind == "magic_cfg":
        opts = SamplerOptions(steps=steps, w_m=7.5, w_d=7.5, sigma=0.0)
        return magic_inpaint(pipe, images, masks, seeds, PROMPT, opts, height=res, width=res)
    positions = anomaly_token_positions(pipe.tokenizer, PROMPT, "sks")
    opts = SamplerOptions(steps=steps, w_m=4.0, w_d=7.5, sigma=1.0)
    return magic_inpaint(pipe, images, masks, seeds, PROMPT, opts, positions, height=res, width=res)


def measure(pipe, kind, batch, steps, res, device) -> tuple[float, float]:
    """Seconds and peak MiB of one call."""
    rng = np.random.default_rng(batch)
    images = [rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(batch)]
    masks = [np.zeros((res, res), bool) for _ in range(batch)]
    for m in masks:
        m[res // 4 : res // 2, res // 3 : 2 * res // 3] = True
    seeds = list(range(batch))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        run_once(pipe, kind, images, masks, seeds, steps, res)
        torch.cuda.synchronize()
        return time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakRSS() as mem:
        t = time.perf_counter()
        run_once(pipe, kind, images, masks, seeds, steps, res)
        dt = time.perf_counter() - t
    return dt, mem.mib


def _per_call(fn, min_s: float = 1.0) -> float:
    """Median seconds of ``fn()`` over enough calls to fill ``min_s`` (after a warm-up)."""
    fn()
    runs: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_s or len(runs) < 5:
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return sorted(runs)[len(runs) // 2]


def component_costs(pipe, batch: int, res: int, steps: int) -> dict[str, float]:
    """Seconds of what SAG and GPP add, next to one UNet call, timed op by op.

    The whole-call ratio above is at the mercy of machine noise (several % here); the
    extra work is a few element-wise ops per step and one Gaussian draw per image, so
    timing those directly gives the overhead with far less noise.
    """
    from anomaly_factory.generators.magic.gpp import anomaly_token_positions
    from anomaly_factory.generators.magic.sag import spatially_adaptive_guidance
    from anomaly_factory.generators.magic.sampler import perturb_conditional

    lat = res // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c = (torch.randn(batch, 4, lat, lat, generator=g) for _ in range(2))
    mask = (torch.rand(batch, 1, lat, lat, generator=g) > 0.7).float()
    cond, uncond = pipe.encode_prompt(PROMPT, torch.device("cpu"), batch, True, "")
    positions = anomaly_token_positions(pipe.tokenizer, PROMPT, "sks")
    model_input = torch.randn(2 * batch, pipe.unet.config.in_channels, lat, lat, generator=g)
    embeds = torch.cat([uncond, cond])
    t = pipe.scheduler.timesteps[0] if len(pipe.scheduler.timesteps) else torch.tensor(999)
    with torch.no_grad():
        unet = _per_call(lambda: pipe.unet(model_input, t, encoder_hidden_states=embeds), 3.0)
        cfg = _per_call(lambda: eps_u + 7.5 * (eps_c - eps_u))
        sag = _per_call(lambda: spatially_adaptive_guidance(eps_u, eps_c, mask, 4.0, 7.5))
        gpp = _per_call(lambda: perturb_conditional(cond, 1.0, positions, list(range(batch))))
    extra_per_step = sag - cfg + gpp / steps  # GPP is drawn once per call
    return {
        "unet_call_s": unet,
        "cfg_combine_s": cfg,
        "sag_combine_s": sag,
        "gpp_per_call_s": gpp,
        "overhead_ops_pct": 100 * extra_per_step / unet,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "sd2"], default="tiny")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/generate.json"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build_pipeline(args.preset, args.res, device)
    kinds = ("stock", "magic_cfg", "magic_sag")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for batch in batches:
        for kind in kinds:  # warm-up
            measure(pipe, kind, batch, args.steps, args.res, device)
        times = {k: [] for k in kinds}
        mems = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                dt, mib = measure(pipe, kind, batch, args.steps, args.res, device)
                times[kind].append(dt)
                mems[kind].append(mib)
        for kind in kinds:
            best = min(times[kind])
            rows.append(
                {
                    "kind": kind,
                    "batch": batch,
                    "seconds": best,
                    "pairs_per_s": batch / best,
                    "peak_mib": max(mems[kind]),
                    "all_seconds": times[kind],
                }
            )
        if device == "cpu":
            rows.append(
                {
                    "kind": "components",
                    "batch": batch,
                    **component_costs(pipe, batch, args.res, args.steps),
                }
            )
        cfg_t, sag_t = min(times["magic_cfg"]), min(times["magic_sag"])
        # each repeat runs CFG and SAG back to back: the median of their ratios is the
        # estimate least moved by load that drifts over the run
        paired = sorted(s / c for s, c in zip(times["magic_sag"], times["magic_cfg"], strict=True))
        rows.append(
            {
                "kind": "overhead_sag_gpp_pct",
                "batch": batch,
                "value": 100 * (sag_t / cfg_t - 1),
                "median_paired": 100 * (paired[len(paired) // 2] - 1),
            }
        )

    print(f"device={device} preset={args.preset} res={args.res} steps={args.steps}")
    print(f"{'kind':<12} {'batch':>5} {'pairs/s':>9} {'s/call':>8} {'peak MiB':>9}")
    for r in rows:
        if r["kind"] == "components":
            print(
                f"{'  ops: UNet call':<32} batch {r['batch']}: {1e3 * r['unet_call_s']:.2f} ms; "
                f"SAG combine {1e6 * r['sag_combine_s']:.1f} us vs CFG "
                f"{1e6 * r['cfg_combine_s']:.1f} us; GPP {1e6 * r['gpp_per_call_s']:.1f} us/call"
                f" -> {r['overhead_ops_pct']:+.3f} % of a UNet call per step"
            )
        elif "value" in r:
            print(
                f"{'SAG+GPP overhead vs plain CFG':<32} batch {r['batch']}: "
                f"{r['value']:+.2f} % (min/min), {r['median_paired']:+.2f} % (median of pairs)"
            )
        else:
            print(
                f"{r['kind']:<12} {r['batch']:>5} {r['pairs_per_s']:>9.3f} "
                f"{r['seconds']:>8.3f} {r['peak_mib']:>9.1f}"
            )
    result = {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "preset": args.preset,
        "res": args.res,
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
