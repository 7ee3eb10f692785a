"""AnomalyControl vs MAGIC on the same tiny backbone: training steps/s and generation pairs/s.

    .venv/bin/python bench/anomalycontrol.py [--out bench/results/anomalycontrol.json]
        [--steps 8] [--pairs 4] [--profile tiny] [--pretrain-steps 20]

Both generators share one pretrained tiny inpainting model (MAGIC's ``build_tiny_pipeline``
preset). Setup (loading, BLIP-2, ASEA, VAE encoding) is excluded from the rates by
differencing: steps/s = N / (T(2N steps) - T(N steps)), each run from scratch, and
pairs/s likewise with N and 2N pairs. MAGIC fine-tunes the whole UNet; AnomalyControl
trains only the adapter (projection + IP key/value), but still back-propagates
through the UNet. Generation uses each generator's configured settings: MAGIC runs
``generate.steps`` DDIM steps from noise with SAG; AnomalyControl runs
``anomalycontrol.steps`` x strength steps with plain CFG.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def _config(root: Path, profile: str, steps: int, pretrain_steps: int):
    from anomaly_factory.config import load_config

    repo = Path(__file__).resolve().parents[1]
    overrides = {
        "model": {
            "cache_dir": str(root / "models"),
            # speed does not depend on how well the backbone is pretrained
            "tiny": {"pretrain_vae_steps": pretrain_steps, "pretrain_unet_steps": pretrain_steps},
        },
        "finetune": {"steps": steps, "out_dir": str(root / "magic"), "checkpoint_every": steps},
        "anomalycontrol": {
            "cache_dir": str(root / "ac-cache"),
            "out_dir": str(root / "ac"),
            "adapter": {"steps": steps, "checkpoint_every": steps},
        },
    }
    return load_config(repo / "pipelines.yaml", profile, overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=8, help="N training steps (runs N and 2N)")
    parser.add_argument("--pairs", type=int, default=4, help="N pairs (runs N and 2N)")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--pretrain-steps", type=int, default=20, help="tiny backbone pretraining")
    parser.add_argument("--category", default="carpet_demo")
    parser.add_argument("--anomaly-type", default="cut")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _table import report

    from anomaly_factory.config import DemoSection
    from anomaly_factory.datasets.ingest import ingest
    from anomaly_factory.generators.anomalycontrol.pairs import generate_pairs as ac_pairs
    from anomaly_factory.generators.anomalycontrol.train import train_adapter
    from anomaly_factory.generators.magic.finetune import finetune
    from anomaly_factory.generators.magic.models import load_base_pipeline
    from anomaly_factory.generators.magic.pairs import generate_pairs as magic_pairs

    cat, kind, n, k = args.category, args.anomaly_type, args.steps, args.pairs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = root / "manifest.parquet"
        demo = DemoSection(seed=0, size=64, n_train=12, n_test_good=4, n_per_type=6)
        ingest("demo", None, manifest, root=root / "raw", demo=demo, show_progress=False)
        cfg_n = _config(root, args.profile, n, args.pretrain_steps)
        cfg_2n = _config(root, args.profile, 2 * n, args.pretrain_steps)
        load_base_pipeline(cfg_n, cat, manifest)  # pretrain the shared tiny backbone once

        magic_t = [
            _timed(finetune, c, manifest, cat, kind, root / f"magic-{i}")
            for i, c in enumerate((cfg_n, cfg_2n))
        ]
        ac_t = [
            _timed(train_adapter, c, manifest, cat, root / f"ac-{i}")
            for i, c in enumerate((cfg_n, cfg_2n))
        ]
        ckpt = root / "ac-0"
        # warm caches that belong to setup (MAGIC's mask generator, ASEA prompts)
        magic_pairs(cfg_n, manifest, cat, kind, 1, root / "mp-warm", root / "magic-0")
        ac_pairs(cfg_n, manifest, cat, kind, 1, root / "ap-warm", ckpt)
        magic_g = [
            _timed(magic_pairs, cfg_n, manifest, cat, kind, m, root / f"mp-{m}", root / "magic-0")
            for m in (k, 2 * k)
        ]
        ac_g = [
            _timed(ac_pairs, cfg_n, manifest, cat, kind, m, root / f"ap-{m}", ckpt)
            for m in (k, 2 * k)
        ]
        ac = cfg_n.anomalycontrol
        rows = [
            {
                "generator": "magic",
                "trains": "UNet",
                "train_steps_per_s": n / max(magic_t[1] - magic_t[0], 1e-9),
                "train_setup_s": magic_t[0] - (magic_t[1] - magic_t[0]),
                "denoise_steps": cfg_n.generate.steps,
                "pairs_per_s": k / max(magic_g[1] - magic_g[0], 1e-9),
                "gen_call_s": magic_g[0],
            },
            {
                "generator": "anomalycontrol",
                "trains": "adapter",
                "train_steps_per_s": n / max(ac_t[1] - ac_t[0], 1e-9),
                "train_setup_s": ac_t[0] - (ac_t[1] - ac_t[0]),
                "denoise_steps": int(ac.steps * ac.strength),
                "pairs_per_s": k / max(ac_g[1] - ac_g[0], 1e-9),
                "gen_call_s": ac_g[0],
            },
        ]
    report(
        "anomalycontrol",
        rows,
        args.out,
        settings={"profile": args.profile, "steps": n, "pairs": k, "resolution": 64},
    )


if __name__ == "__main__":
    main()
