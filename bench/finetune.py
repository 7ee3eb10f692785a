"""Benchmark of MAGIC's training side: tiny pretraining and per-type fine-tuning speed.

Prints a table and writes JSON (``--out``). On CPU it times the ``tiny`` preset
(pretraining of one demo category, our training step against a plain diffusers
DreamBooth-inpaint step on the same UNet, then fine-tuning of one anomaly type) with
the configured shapes. With ``--sd2`` and a CUDA GPU it also times the
SD2-inpainting-size UNet (random weights, built from its config, no download)
at 512 px (64 px latent), batch 4, AdamW, as the paper profile trains it::

    .venv/bin/python bench/finetune.py --threads 2                 # CPU, tiny preset
    .venv/bin/python bench/finetune.py --sd2 --skip-tiny           # GPU, SD2-size UNet
    .venv/bin/python bench/finetune.py --sd2 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Stable Diffusion 2 inpainting's UNet config (unet/config.json of the hub folder)
SD2_UNET = {
    "sample_size": 64,
    "in_channels": 9,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_tiny(config: Path | None, category: str, anomaly_type: str) -> list[dict]:
    """Pretrain one demo category and fine-tune one type with the tiny profile."""
    from anomaly_factory.config import DemoSection, load_config
    from anomaly_factory.datasets.ingest import ingest
    from anomaly_factory.generators.magic.finetune import finetune
    from anomaly_factory.generators.magic.models import pretrained_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(config or REPO / "pipelines.yaml", "tiny")
        cfg.model.cache_dir = tmp / "models"
        cfg.model.device = "cpu"
        demo = DemoSection(seed=0, size=cfg.model.resolution, n_train=cfg.demo.n_train)
        manifest = tmp / "manifest.parquet"
        ingest("demo", None, manifest, root=tmp / "raw", demo=demo, show_progress=False)

        tiny = cfg.model.tiny
        t0 = time.perf_counter()
        folder = pretrained_tiny_pipeline(cfg, category, manifest)
        dt = time.perf_counter() - t0
        steps = tiny.pretrain_vae_steps + tiny.pretrain_unet_steps
        losses = json.loads((folder / "pretrain.json").read_text())
        rows.append(
            {
                "what": f"tiny pretrain {category} ({cfg.model.resolution} px)",
                "steps": steps,
                "seconds": dt,
                "steps_per_s": steps / dt,
                "peak_mb": peak_rss_mb(),
                "loss": losses["unet_loss"],
            }
        )
        from anomaly_factory.generators.magic.finetune import load_fewshot
        from anomaly_factory.generators.magic.models import load_base_pipeline

        pipe = load_base_pipeline(cfg, category, manifest)
        pipe.vae.requires_grad_(False)
        images, masks, _ = load_fewshot(manifest, category, anomaly_type, cfg.finetune.resolution)
        rows += bench_step_vs_plain(
            pipe, images, masks, cfg.finetune.prompt, cfg.finetune.batch_size, 10, 5
        )
        t0 = time.perf_counter()
        out = finetune(cfg, manifest, category, anomaly_type, tmp / "ck")
        dt = time.perf_counter() - t0
        meta = json.loads((out / "checkpoint.json").read_text())
        rows.append(
            {
                "what": f"tiny finetune {category}/{anomaly_type} (batch {cfg.finetune.batch_size})",
                "steps": meta["steps"],
                "seconds": dt,
                "steps_per_s": meta["steps"] / dt,
                "peak_mb": peak_rss_mb(),
                "loss": meta["last_loss"],
            }
        )
    return rows


def bench_step_vs_plain(
    pipe,
    images: torch.Tensor,
    masks: torch.Tensor,
    prompt: str,
    batch: int,
    steps: int,
    rounds: int,
) -> list[dict]:
    """Our fine-tuning step against a plain diffusers DreamBooth-inpaint step, interleaved.

    Plain: what ``train_dreambooth_inpaint.py`` does per step (VAE-encode image and
    masked image, add noise, UNet forward/backward, AdamW). Ours: the same UNet and
    objective, with the few-shot latents encoded once (``encode_fewshot``) and GPP on
    the prompt. Each gets its own copy of the UNet and optimizer; ``rounds`` alternate.
    """
    import copy

    from diffusers import DDPMScheduler

    from anomaly_factory.generators.magic.finetune import encode_fewshot, fewshot_batch_loss
    from anomaly_factory.generators.magic.training import encode_prompt, latent_mask, masked_inputs

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        embeds = encode_prompt(pipe, prompt, 1).float()
    n = len(images)

    def make(kind: str):
        unet = copy.deepcopy(pipe.unet).train().requires_grad_(True)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
        gen = torch.Generator().manual_seed(0)
        fewshot = encode_fewshot(pipe, images, masks) if kind == "ours" else None

        def step() -> None:
            idx = torch.randint(0, n, (batch,), generator=gen)
            if kind == "plain":
                x, m = images[idx], masks[idx]
                with torch.no_grad():
                    latents = pipe.vae.encode(x).latent_dist.sample(gen) * sf
                    masked = pipe.vae.encode(masked_inputs(x, m)).latent_dist.sample(gen) * sf
                noise = torch.randn(latents.shape, generator=gen)
                t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
                noisy = sched.add_noise(latents, noise, t)
                lm = latent_mask(m, latents.shape[-1])
                pred = unet(
                    torch.cat([noisy, lm, masked], 1),
                    t,
                    encoder_hidden_states=embeds.expand(batch, -1, -1),
                ).sample
                loss = torch.nn.functional.mse_loss(pred, noise)
            else:  # exactly the fine-tuning loop's loss
                loss = fewshot_batch_loss(unet, sched, fewshot, idx, embeds, 1.0, None, sf, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()

        return step

    kinds = {"plain": make("plain"), "ours": make("ours")}
    for step in kinds.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind, step in kinds.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[kind].append(time.perf_counter() - t0)
    rows = []
    for kind, ts in times.items():
        best = min(ts)
        rows.append(
            {
                "what": f"{kind} step: tiny UNet, batch {batch}"
                + (" (VAE encode each step)" if kind == "plain" else " (cached latents + GPP)"),
                "steps": steps,
                "seconds": best,
                "steps_per_s": steps / best,
                "peak_mb": peak_rss_mb(),
                "loss": float("nan"),
                "vs_plain": min(times["plain"]) / best,
                "runs_s": [round(t, 3) for t in ts],
            }
        )
    return rows


def bench_sd2_unet(steps: int, batch: int, gradient_checkpointing: bool) -> dict:
    """One AdamW training step loop of the SD2-size UNet on random 64x64 latents (512 px)."""
    from diffusers import UNet2DConditionModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_UNET).to(device)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, weight_decay=1e-2)
    x = torch.randn(batch, 9, 64, 64, device=device)
    text = torch.randn(batch, 77, 1024, device=device)
    target = torch.randn(batch, 4, 64, 64, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=text).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

    step()  # warm-up: allocator, cuDNN autotuning, optimizer state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "what": f"SD2-size UNet fp32 512 px batch {batch}"
        + (" (grad ckpt)" if gradient_checkpointing else ""),
        "steps": steps,
        "seconds": dt,
        "steps_per_s": steps / dt,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        "loss": float("nan"),
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "gpu": torch.cuda.get_device_name(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--category", default="nut_demo")
    parser.add_argument("--anomaly-type", default="rust")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--sd2", action="store_true", help="also time the SD2-size UNet (GPU)")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--sd2-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "finetune.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[dict] = []
    if not args.skip_tiny:
        rows += bench_tiny(args.config, args.category, args.anomaly_type)
    if args.sd2:
        if torch.cuda.is_available():
            rows.append(bench_sd2_unet(args.sd2_steps, args.batch, args.gradient_checkpointing))
        else:
            print("--sd2: no CUDA device; skipped", file=sys.stderr)

    print(f"{'what':<52} {'steps':>6} {'s':>8} {'steps/s':>8} {'peak MB':>9} {'loss':>7}")
    for r in rows:
        ratio = f"  {r['vs_plain']:.2f}x plain" if "vs_plain" in r else ""
        print(
            f"{r['what']:<52} {r['steps']:>6} {r['seconds']:>8.1f} {r['steps_per_s']:>8.2f} "
            f"{r['peak_mb']:>9.0f} {r['loss']:>7.4f}{ratio}"
        )
    env = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
