"""pipelines.yaml schema: profiles, field-path errors, unknown keys, CLI exit codes."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.config import ConfigError, load_config, read_config_file
from tests.conftest import REPO

runner = CliRunner()


def _write(tmp_path, data) -> str:
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_profiles_resolve_to_paper_values():
    tiny = load_config(REPO / "pipelines.yaml", "tiny")
    paper = load_config(REPO / "pipelines.yaml", "paper")
    assert tiny.profile == "tiny" and tiny.model.preset == "tiny"
    assert paper.model.preset == "sd2_inpainting" and paper.model.resolution == 512
    assert paper.model.pretrained == "stabilityai/stable-diffusion-2-inpainting"
    assert (paper.generate.sag.w_m, paper.generate.sag.w_d) == (4.0, 7.5)
    assert paper.generate.steps == 50 and paper.generate.n_pairs == 500
    assert paper.finetune.gpp.sigma == 1.0 and paper.generate.gpp.sigma == 1.0
    assert (paper.finetune.lr, paper.finetune.steps, paper.finetune.batch_size) == (5e-6, 5000, 4)
    assert paper.finetune.weight_decay == 0.01 and paper.finetune.grad_clip == 1.0
    assert paper.generate.scheduler.steps_offset == 1
    assert tiny.hash() != paper.hash()


def test_the_hash_names_what_is_made_not_where_or_how_it_runs():
    """A version's name is the same in any store and under any orchestration; a setting
    that changes the pairs (a thread count: float rounding) renames it."""
    tiny = load_config(REPO / "pipelines.yaml", "tiny")
    moved = tiny.model_copy(
        update={
            "data_root": "s3://bucket/runs",
            "store": tiny.store.model_copy(update={"sync_every_s": 1}),
            "orchestration": tiny.orchestration.model_copy(
                update={"dispatch": "work_pool", "fan_out": "type", "retries": 0}
            ),
        }
    )
    assert moved.hash() == tiny.hash()
    threads = tiny.orchestration.model_copy(update={"torch_threads": 1})
    assert tiny.model_copy(update={"orchestration": threads}).hash() != tiny.hash()
    seeded = tiny.model_copy(update={"seed": 1})
    assert seeded.hash() != tiny.hash()


def test_bad_value_names_field_path_value_and_bound(tmp_path):
    raw = read_config_file(REPO / "pipelines.yaml")
    raw["generate"]["sag"]["w_m"] = -1.0
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, raw), "tiny")
    assert "generate.sag.w_m: -1.0 is not > 0" in str(err.value)


def test_unknown_key_is_an_error(tmp_path):
    raw = read_config_file(REPO / "pipelines.yaml")
    raw["generate"]["sag"]["w_mm"] = 4.0
    with pytest.raises(ConfigError, match=r"generate\.sag\.w_mm: unknown key"):
        load_config(_write(tmp_path, raw), "tiny")


def test_error_inside_a_profile_is_reported_with_profile(tmp_path):
    raw = read_config_file(REPO / "pipelines.yaml")
    raw["profiles"]["paper"]["generate"]["steps"] = 0
    path = _write(tmp_path, raw)
    load_config(path, "tiny")  # tiny is unaffected
    with pytest.raises(ConfigError, match=r"profiles\.paper: generate\.steps: 0 is not > 0"):
        load_config(path, "paper")


def test_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="'nope' is not one of"):
        load_config(REPO / "pipelines.yaml", "nope")


def test_literal_error_lists_allowed_values(tmp_path):
    raw = read_config_file(REPO / "pipelines.yaml")
    raw["finetune"]["gpp"]["target"] = "everything"
    with pytest.raises(ConfigError, match=r"finetune\.gpp\.target: 'everything' is not one of"):
        load_config(_write(tmp_path, raw), "tiny")


def test_cli_validate_exit_codes(tmp_path):
    ok = runner.invoke(app, ["config", "validate", str(REPO / "pipelines.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "paper" in ok.output and "tiny" in ok.output
    raw = read_config_file(REPO / "pipelines.yaml")
    raw["profiles"]["paper"]["generate"]["sag"]["w_d"] = -2
    bad = runner.invoke(app, ["config", "validate", _write(tmp_path, raw)])
    assert bad.exit_code == 2  # bad configuration
    assert "generate.sag.w_d: -2 is not > 0" in bad.output


def test_cli_show_and_schema():
    shown = runner.invoke(
        app, ["config", "show", str(REPO / "pipelines.yaml"), "--profile", "paper"]
    )
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.output)["generate"]["steps"] == 50
    schema = runner.invoke(app, ["config", "schema"])
    assert schema.exit_code == 0
    props = json.loads(schema.output)["properties"]
    for section in (
        "datasets",
        "split",
        "masks",
        "finetune",
        "cama",
        "generate",
        "gates",
        "detector",
        "shards",
        "publish",
        "orchestration",
    ):
        assert section in props
