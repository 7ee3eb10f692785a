"""MAGIC pair generation: outputs, background/defect, determinism, resume, CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from anomaly_factory.config import load_config
from anomaly_factory.generators.magic.pairs import generate_pairs
from anomaly_factory.io import save_png
from anomaly_factory.manifest import PAIR_COLUMNS, pair_params, read_images, read_pairs, select

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CATEGORY, TYPE = "carpet_demo", "stain"
RES = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pairs")


@pytest.fixture(scope="module")
def mask_folder(workdir, demo_manifest_path) -> Path:
    """The type's few-shot masks as a mask folder (MAGIC's public-code mask source)."""
    df = select(read_images(demo_manifest_path), CATEGORY, TYPE, "fewshot")
    folder = workdir / "given_masks"
    for i, p in enumerate(df["mask_path"]):
        save_png(folder / f"{i:03d}.png", np.asarray(Image.open(p).convert("L")))
    return folder


@pytest.fixture(scope="module")
def overrides(workdir, mask_folder) -> dict:
    return {
        "model": {
            "resolution": RES,
            "device": "cpu",
            "cache_dir": str(workdir / "models"),
            "tiny": {"pretrain_vae_steps": 40, "pretrain_unet_steps": 10, "pretrain_batch_size": 4},
        },
        "masks": {"source": "folder", "folder": str(mask_folder)},
        "generate": {"steps": 3, "batch_size": 2},
        "cama": {"enabled": False},
    }


@pytest.fixture(scope="module")
def cfg(overrides):
    return load_config(REPO / "pipelines.yaml", "tiny", overrides)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_pairs_outputs_and_resume(cfg, demo_manifest_path, workdir):
    out = workdir / "run"
    seen = []
    path = generate_pairs(
        cfg, demo_manifest_path, CATEGORY, TYPE, 3, out, on_pair=lambda d, t: seen.append((d, t))
    )
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    df = read_pairs(path)
    assert list(df["key"]) == sorted(df["key"]) and len(df) == 3
    assert set(PAIR_COLUMNS) <= set(df.columns)
    row = df.iloc[0]
    params = [pair_params(r) for r in df.to_dict("records")]
    assert (row["category"], row["anomaly_type"], row["generator"]) == (CATEGORY, TYPE, "magic")
    assert [params[0][k] for k in ("w_m", "w_d", "steps", "sigma")] == [4.0, 7.5, 3, 1.0]
    assert row["mask_source"] == "folder" and row["checkpoint_hash"].startswith("base-")
    assert params[0]["cama_status"] == "disabled"
    # the normal comes from the train split; the reference mask and the GPP of the
    # weights travel with every pair
    images = read_images(demo_manifest_path)
    assert set(df["source_path"]) <= set(select(images, CATEGORY, "good", "train")["image_path"])
    fewshot = select(images, CATEGORY, TYPE, "fewshot")
    assert {p["reference_mask_source"] for p in params} <= set(fewshot["mask_path"])
    assert all(p["train_gpp_target"] == "none" and p["train_sigma"] is None for p in params)
    assert all(p["gpp_target"] == "anomaly_token" for p in params)
    assert all(p["latent_mask"] == "coverage" for p in params)
    assert df["seed"].nunique() == 3
    for col in ("image_path", "mask_path", "normal_path"):
        for p in df[col]:
            assert Image.open(p).size == (RES, RES)
    full = _files(out)

    # killed after the first pair (mid-batch), then resumed: same files and manifest
    shutil.rmtree(out)

    def die(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_pairs(cfg, demo_manifest_path, CATEGORY, TYPE, 3, out, on_pair=die)
    assert len(list((out / "records").glob("*.json"))) == 1
    assert not (out / "pairs.parquet").exists()
    generate_pairs(cfg, demo_manifest_path, CATEGORY, TYPE, 3, out)
    assert _files(out) == full

    # other settings in the same folder are refused, not mixed in
    other = cfg.model_copy(deep=True)
    other.generate.sag.w_m = 2.0
    with pytest.raises(ValueError, match="other settings"):
        generate_pairs(other, demo_manifest_path, CATEGORY, TYPE, 3, out)


def test_background_kept_and_defect_changed(cfg, demo_manifest_path, workdir):
    report = {}
    for paste in (False, True):
        c = cfg.model_copy(deep=True)
        c.generate.paste_back.enabled = paste
        c.generate.paste_back.feather_px = 2
        df = read_pairs(
            generate_pairs(c, demo_manifest_path, CATEGORY, TYPE, 2, workdir / f"bg{paste}")
        )
        outside, inside_change, far_equal = [], [], []
        for _, r in df.iterrows():
            img = np.asarray(Image.open(r["image_path"]))
            normal = np.asarray(Image.open(r["normal_path"]))
            mask = np.asarray(Image.open(r["mask_path"])) > 0
            diff = np.abs(img.astype(float) - normal.astype(float))
            outside.append(_psnr(img[~mask], normal[~mask]))
            inside_change.append(float(diff[mask].mean()))
            if paste:
                from anomaly_factory.generators.composite import feather_alpha

                far = feather_alpha(mask, 2) == 0
                far_equal.append(bool(np.array_equal(img[far], normal[far])))
        report[paste] = (outside, inside_change)
        print(
            f"paste_back={paste}: PSNR outside {np.round(outside, 2).tolist()} dB, "
            f"mean |change| inside {np.round(inside_change, 2).tolist()} (of 255)"
        )
        if paste:
            assert all(far_equal)  # beyond the feather band the normal image is exact
            assert min(outside) > 30
        assert min(inside_change) > 5  # the defect region is repainted
    # without paste-back the background still goes through the tiny VAE/UNet: report only
    assert min(report[True][0]) > max(report[False][0]) - 1e-9


def test_generate_cli(cfg, demo_manifest_path, workdir, overrides):
    from typer.testing import CliRunner

    from anomaly_factory.cli import app

    raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    raw["profiles"]["tiny"] = overrides
    config = workdir / "pipelines.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = workdir / "cli"
    runner = CliRunner()
    args = [
        "generate",
        "--manifest",
        str(demo_manifest_path),
        "--category",
        CATEGORY,
        "--anomaly-type",
        TYPE,
        "--n-pairs",
        "2",
        "--out",
        str(out),
        "--config",
        str(config),
    ]
    misrouted = runner.invoke(app, [*args, "--reference-text", "a deep cut"])
    assert misrouted.exit_code == 2 and "--reference-text" in misrouted.output  # not ignored
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(pd.read_parquet(out / "pairs.parquet")) == 2
    bad = runner.invoke(app, [*args, "--generator", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output
    res = runner.invoke(
        app,
        [
            "masks",
            "--manifest",
            str(demo_manifest_path),
            "--category",
            CATEGORY,
            "--anomaly-type",
            TYPE,
            "--n",
            "3",
            "--out",
            str(workdir / "m"),
            "--folder",
            str(overrides["masks"]["folder"]),
            "--config",
            str(config),
        ],
    )
    assert res.exit_code == 0, res.output
    masks = pd.read_parquet(workdir / "m" / "masks.parquet")
    assert len(masks) == 3 and (masks["mask_source"] == "folder").all()
