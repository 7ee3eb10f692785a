"""Shared fixtures: a small demo dataset and its manifest, built once per session."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from anomaly_factory.config import DemoSection, FactoryConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_config() -> FactoryConfig:
    """The repo's pipelines.yaml, tiny profile."""
    return load_config(REPO / "pipelines.yaml", "tiny")


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> DemoSection:
    """A smaller demo than the tiny profile's, for fast tests (64 px)."""
    return DemoSection(seed=0, size=64, n_train=12, n_test_good=4, n_per_type=6)


@pytest.fixture(scope="session")
def demo_manifest_path(tmp_path_factory, small_demo) -> Path:
    """Ingested small demo dataset (4 categories x 2 types, 64 px)."""
    from anomaly_factory.datasets.ingest import ingest

    root = tmp_path_factory.mktemp("demo")
    out = root / "manifest.parquet"
    ingest("demo", None, out, root=root / "raw", demo=small_demo, show_progress=False)
    return out


@pytest.fixture(scope="session")
def demo_manifest(demo_manifest_path) -> pd.DataFrame:
    from anomaly_factory.manifest import read_images

    return read_images(demo_manifest_path)
