#!/usr/bin/env python
"""Rebuild the bundled tiny base inpainting model (anomaly_factory/assets/tiny_inpaint/).

The recipe (data, steps, seeds) is ``tiny_base.BaseRecipe`` and is written to the
snapshot's ``recipe.json``; the shapes come from ``model.tiny`` in pipelines.yaml.
Run it after changing either, then commit the new snapshot folder:

    .venv/bin/python scripts/build_tiny_base.py
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from anomaly_factory.config import load_config
from anomaly_factory.generators.magic.tiny_base import ASSETS_DIR, BaseRecipe, build_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="pipelines.yaml (default: the repo's)")
    parser.add_argument("--out", default=str(ASSETS_DIR), help="snapshot root folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, "tiny")
    start = time.perf_counter()
    folder = build_base(cfg, args.out, BaseRecipe())
    print(f"built {folder} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
