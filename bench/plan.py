"""Planning model: what the paper profile costs on MVTec-AD + VisA + MVTec 3D-AD, on N GPUs.

Prints job counts, GPU-hours per stage, store traffic and the expected wall time for
1, 8 and 64 GPUs (``--gpus``), each figure computed from per-step costs whose source is
printed beside it: *measured* (this machine, ``--measure``), *paper* (``CONTEXT.md``),
or *assumed*. Nothing here runs the pipeline; it is arithmetic over the paper profile's
settings (``pipelines.yaml``), which it reads, so a changed profile changes the plan::

    .venv/bin/python bench/plan.py                       # uses the last measured costs
    .venv/bin/python bench/plan.py --measure             # times SD2-size UNet steps on CPU first
    .venv/bin/python bench/plan.py --gpus 1,8,64 --save lora

Scheduling: with ``orchestration.fan_out: type`` each (category, type) is one GPU job
(fine-tune, mask generator, CAMA, generation, one after another on one GPU); jobs are
alike, so N GPUs finish in ``ceil(jobs / N)`` rounds of one job. The per-category shared
job is empty in the paper profile (``shared_dirs`` returns nothing for SD2). The gates
of each type run on the factory's CPU pool as the types finish, so only the last round's
gates add to the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MEASURED = REPO / "bench" / "results" / "plan_cpu_costs.json"


@dataclass(frozen=True)
class Dataset:
    name: str
    categories: int
    types: int
    source: str


DATASETS = [
    Dataset("MVTec-AD", 15, 73, "paper (CONTEXT.md)"),
    # the 10 categories' test folders: bagel 4, cable_gland 5, carrot 5, cookie 4, dowel 4,
    # foam 4, peach 4, potato 4, rope 3, tire 4
    Dataset("MVTec 3D-AD", 10, 41, "dataset layout"),
    # VisA names its types only in each category's image_anno.csv, not on this machine
    Dataset("VisA", 12, 48, "assumed: 4 per category"),
]

# Per-step figures not measurable here, with where they come from.
PAPER_FINETUNE_H = 1.5  # one 5,000-step fine-tune, batch 4, 512 px, one GPU (paper)
PAPER_CAMA_S = 4.0  # CAMA per image on a GPU (paper)
GATES_CPU_S = 54.0 + 366.0  # KID InceptionV3 + IC-LPIPS VGG, 500 pairs, 2 cores: RESULTS (d)
PAIR_MB = 0.45  # one 512 px RGB PNG pair + mask: assumed from the 128 px demo's ratio
SD2_UNET_PARAMS = 865_910_724  # stable-diffusion-2-inpainting unet/config.json


def measure_cpu(res: int = 512) -> dict[str, float]:
    """Seconds for one SD2-size UNet call on this CPU: a CFG pair forward (one sampling
    step) and a batch-1 forward + backward (a quarter of a batch-4 training step)."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.finetune import SD2_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD2_UNET, "sample_size": res // 8})
    params = sum(p.numel() for p in unet.parameters())
    lat, text = res // 8, torch.randn(2, 77, 1024)
    x = torch.randn(2, 9, lat, lat)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        unet(x, t, text)  # warm-up: first-call allocations
        t0 = time.perf_counter()
        unet(x, t, text)
        sample_step = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = unet(x[:1], t[:1], text[:1]).sample
    out.float().pow(2).mean().backward()
    train_sample = time.perf_counter() - t0
    return {
        "resolution": res,
        "unet_params": params,
        "sample_step_s": sample_step,
        "train_sample_s": train_sample,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def paper_settings() -> dict[str, float]:
    from anomaly_factory.config import load_config

    cfg = load_config(REPO / "pipelines.yaml", "paper")
    ft, gen = cfg.finetune, cfg.generate
    return {
        "finetune_steps": ft.steps,
        "batch": ft.batch_size,
        "checkpoint_every": ft.checkpoint_every,
        "n_pairs": gen.n_pairs,
        "sample_steps": gen.steps,
        "save": ft.save,
        "lora_rank": ft.lora_rank,
    }


def plan(
    costs: dict[str, float], gpus: list[int], s: dict[str, float], save: str
) -> tuple[list[dict], list[dict]]:
    jobs = sum(d.types for d in DATASETS)
    # GPU: the paper's fine-tune anchors the GPU speed; one training sample is a forward
    # + backward, so the same GPU's CFG sampling step costs the CPU ratio of the two
    gpu_train_step = PAPER_FINETUNE_H * 3600 / s["finetune_steps"]
    gpu_sample_step = gpu_train_step / s["batch"] * costs["sample_step_s"] / costs["train_sample_s"]
    per_type_gpu_s = {
        "fine-tune (paper)": PAPER_FINETUNE_H * 3600,
        "CAMA (paper)": s["n_pairs"] * PAPER_CAMA_S,
        "generate (derived)": s["n_pairs"] * s["sample_steps"] * gpu_sample_step,
    }
    per_type_cpu_s = {
        "fine-tune": s["finetune_steps"] * s["batch"] * costs["train_sample_s"],
        "generate": s["n_pairs"] * s["sample_steps"] * costs["sample_step_s"],
    }
    job_h = sum(per_type_gpu_s.values()) / 3600

    # store traffic per type: resume states while training, the checkpoint, the pairs
    unet_gb = SD2_UNET_PARAMS * 4 / 1e9
    trainable_gb = unet_gb if save == "unet" else lora_params(s["lora_rank"]) * 4 / 1e9
    state_gb = trainable_gb * 3  # weights + AdamW's two moments
    states = s["finetune_steps"] // s["checkpoint_every"]
    traffic = {
        "resume states (up)": states * state_gb,
        "checkpoint (up)": trainable_gb,
        "pairs (up)": s["n_pairs"] * PAIR_MB / 1000,
    }
    stages = [
        {"stage": k, "per type": _h(v), f"{jobs} types, GPU-h": f"{v * jobs / 3600:.0f}"}
        for k, v in per_type_gpu_s.items()
    ]
    stages += [
        {"stage": f"{k} on this CPU (measured)", "per type": _h(v), f"{jobs} types, GPU-h": "-"}
        for k, v in per_type_cpu_s.items()
    ]
    stages.append(
        {
            "stage": "gates on 2 CPU cores (measured)",
            "per type": _h(GATES_CPU_S),
            f"{jobs} types, GPU-h": "- (CPU pool)",
        }
    )
    for k, v in traffic.items():
        stages.append(
            {"stage": f"store: {k}", "per type": f"{v:.2f} GB", f"{jobs} types, GPU-h": ""}
        )
    total_gb = sum(traffic.values()) * jobs
    stages.append(
        {
            "stage": "store: all uploads",
            "per type": "",
            f"{jobs} types, GPU-h": f"{total_gb / 1000:.2f} TB",
        }
    )
    walls = []
    for n in gpus:
        rounds = math.ceil(jobs / n)
        wall_h = rounds * job_h + GATES_CPU_S / 3600
        walls.append(
            {
                "GPUs": n,
                "jobs": jobs,
                "rounds": rounds,
                "GPU busy": f"{jobs / (rounds * n):.0%}",
                "wall": _h(wall_h * 3600),
                "store upload rate": f"{_rate_mb_s(traffic, min(n, jobs), job_h):.1f} MB/s",
            }
        )
    return stages, walls


def lora_params(rank: int) -> int:
    """LoRA on the SD2 UNet's attention projections (q, k, v, out of every attention)."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.finetune import SD2_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_UNET)
    total = 0
    for name, mod in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            total += rank * (mod.in_features + mod.out_features)
    return total


def _rate_mb_s(traffic: dict[str, float], running: int, job_h: float) -> float:
    """Mean upload rate (MB/s) of ``running`` jobs at once, each uploading ``traffic`` GB."""
    return sum(traffic.values()) * 1000 * running / (job_h * 3600)


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    from bench._table import report

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="time SD2-size UNet steps on CPU")
    ap.add_argument("--gpus", default="1,8,64")
    ap.add_argument("--save", choices=["unet", "lora"], default=None, help="default: the profile's")
    args = ap.parse_args()
    if args.measure or not MEASURED.exists():
        costs = measure_cpu()
        MEASURED.parent.mkdir(parents=True, exist_ok=True)
        MEASURED.write_text(json.dumps(costs, indent=2))
    costs = json.loads(MEASURED.read_text())
    print(
        f"CPU costs ({costs['date']}, {costs['threads']} threads, SD2-size UNet at "
        f"{costs['resolution']} px): sampling step (CFG pair) {costs['sample_step_s']:.1f} s, "
        f"training sample (fwd+bwd) {costs['train_sample_s']:.1f} s"
    )
    for d in DATASETS:
        print(f"  {d.name}: {d.categories} categories, {d.types} types ({d.source})")
    settings = paper_settings()
    save = args.save or settings["save"]
    stages, walls = plan(costs, [int(g) for g in args.gpus.split(",")], settings, save)
    report("plan_stages", stages, save=save)
    print()
    report("plan_wall", walls, save=save)


if __name__ == "__main__":
    main()
