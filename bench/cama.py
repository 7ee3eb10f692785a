"""CAMA benchmark (MAGIC §3.4): foreground IoU per method, CAMA time per image on CPU.

    .venv/bin/python bench/cama.py [--out bench/results/cama.json] [--repeats 3]

1. Foreground: IoU of each weight-free method with the demo's exact foreground
   (object categories, normal and anomaly images, 128 px), and its time.
2. Alignment: seconds per CamaAligner call at 256 and 512 px for each extractor
   (``gradient`` default; ``dinov2`` with a tiny random-config model, which times
   the pipeline, not a real ViT-S/14).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_foreground(size: int = 128, n: int = 8) -> list[dict]:
    from anomaly_factory.datasets.demo import ANOMALY_TYPES, foreground, render_category
    from anomaly_factory.generators.magic.foreground import extract_foreground, iou

    rows = []
    for method in ("border_color", "otsu", "grabcut"):
        for category in ("nut_demo", "bar_demo"):
            for kind in ("good", *ANOMALY_TYPES[category]):
                ious, seconds = [], 0.0
                for i in range(n):
                    index = i if kind == "good" else 1000 + i
                    img, _ = render_category(category, kind, size, 0, index)
                    exact = foreground(category, size, 0, index, kind)
                    t = time.perf_counter()
                    mask = extract_foreground(img, method)
                    seconds += time.perf_counter() - t
                    ious.append(iou(mask, exact))
                rows.append(
                    {
                        "method": method,
                        "image": f"{category}/{kind}",
                        "iou_mean": float(np.mean(ious)),
                        "iou_min": float(np.min(ious)),
                        "ms": 1000 * seconds / n,
                    }
                )
    return rows


def _tiny_dino(folder: Path) -> str:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


def bench_alignment(repeats: int) -> list[dict]:
    from anomaly_factory.config import FactoryConfig
    from anomaly_factory.datasets.demo import render_category
    from anomaly_factory.generators.magic.cama import CamaAligner

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dino = _tiny_dino(Path(tmp) / "dino")
        settings = {
            "gradient (res 128)": {"features": "gradient", "features_resolution": 128},
            "gradient (res = image)": {"features": "gradient", "features_resolution": None},
            "dinov2-tiny (res 448)": {
                "features": "dinov2",
                "features_model": dino,
                "features_resolution": 448,
            },
        }
        for size in (256, 512):
            reference, mask = render_category("bar_demo", "spot", size, 0, 1000)
            normal, _ = render_category("bar_demo", "good", size, 0, 0)
            for name, values in settings.items():
                cfg = FactoryConfig()
                cfg.cama.device = "cpu"
                for key, value in values.items():
                    setattr(cfg.cama, key, size if value is None else value)
                aligner = CamaAligner(cfg, "bar_demo", "spot")
                aligner(mask, reference, normal, seed=0)  # warm-up: loads models
                t = time.perf_counter()
                for r in range(repeats):
                    _, record = aligner(mask, reference, normal, seed=r)
                seconds = (time.perf_counter() - t) / repeats
                rows.append(
                    {
                        "size": size,
                        "extractor": name,
                        "s_per_image": seconds,
                        "status": record["cama_status"],
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _table import report

    report("cama_foreground", bench_foreground(), args.out_dir / "cama_foreground.json")
    print()
    report("cama", bench_alignment(args.repeats), args.out_dir / "cama.json")


if __name__ == "__main__":
    main()
