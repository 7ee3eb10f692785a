"""``anomaly-factory ingest`` for every dataset, and its error exits."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from anomaly_factory.cli import app
from tests.layouts import make_mvtec_3d_ad, make_mvtec_ad, make_visa

runner = CliRunner()


@pytest.mark.parametrize(
    "dataset,maker",
    [("mvtec_ad", make_mvtec_ad), ("visa", make_visa), ("mvtec_3d_ad", make_mvtec_3d_ad)],
)
def test_ingest_each_layout(tmp_path, dataset, maker):
    src = maker(tmp_path / dataset)
    out = tmp_path / "m.parquet"
    res = runner.invoke(
        app,
        [
            "ingest",
            "--dataset",
            dataset,
            "--source",
            str(src),
            "--manifest-out",
            str(out),
            "--root",
            str(tmp_path / "raw"),
        ],
    )
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert set(df.split) == {"train", "fewshot", "test"}
    assert (df.dataset == dataset).all()


def test_ingest_demo_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        [
            "ingest",
            "--dataset",
            "demo",
            "--manifest-out",
            "m.parquet",
            "--categories",
            "nut_demo,carpet_demo",
        ],
    )
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(tmp_path / "m.parquet")
    assert set(df.category) == {"nut_demo", "carpet_demo"}
    assert (tmp_path / "data" / "raw" / "demo" / "nut_demo" / "train" / "good").is_dir()


def test_ingest_errors_exit_nonzero(tmp_path):
    res = runner.invoke(app, ["ingest", "--dataset", "imagenet", "--manifest-out", "m.parquet"])
    assert res.exit_code == 2 and "'imagenet' is not one of" in res.output
    res = runner.invoke(
        app,
        [
            "ingest",
            "--dataset",
            "mvtec_ad",
            "--source",
            str(tmp_path / "none"),
            "--manifest-out",
            str(tmp_path / "m.parquet"),
        ],
    )
    assert res.exit_code == 2 and "none" in res.output and "does not exist" in res.output
