"""DVC round trip in a real git + DVC repo with an S3 (moto) remote: push, pull, get by tag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import filelock
import pytest
import yaml
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.storage import dvc_ops
from anomaly_factory.storage.shards import write_shards
from tests import test_s3_publish as s3t
from tests.test_s3_publish import tree, write_reports

# the S3 fixtures, shared with test_s3_publish
moto_server, aws_env, bucket, pairs_path = s3t.moto_server, s3t.aws_env, s3t.bucket, s3t.pairs_path

REPO = Path(__file__).resolve().parents[1]


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def workspace(tmp_path, monkeypatch, bucket) -> Path:
    """A git + DVC repo with the project's ignore rules and no DVC remote yet."""
    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "t")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "t@example.com")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "t")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@example.com")
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    Repo.init(str(root)).close()
    # the project's own ignore rules: data/ is ignored except what DVC must commit
    ignores = [".gitignore", "data/.gitignore", "data/shards/.gitignore"]
    for name in ignores:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text((REPO / name).read_text())
    git(root, "add", ".dvc", ".dvcignore", *ignores)
    git(root, "commit", "-q", "-m", "init")
    return root


def test_push_pull_in_a_fresh_clone_and_get_by_tag(
    workspace, tmp_path, monkeypatch, tiny_config, pairs_path, demo_manifest_path, bucket
):
    """``anomaly-factory publish --version v1`` in the repo that made v1: S3, dvc push, tag."""
    monkeypatch.chdir(workspace)
    cfg = tiny_config.model_copy(deep=True)
    write_reports(Path(cfg.gates.out_dir) / "v1")  # relative: data/reports/v1 in the workspace
    write_shards(cfg, pairs_path, demo_manifest_path, "v1")
    config = workspace / "pipelines.yaml"
    config.write_text(yaml.safe_dump({"publish": {"prefix": "pub", "max_attempts": 1}}))
    res = CliRunner().invoke(
        app, ["publish", "--version", "v1", "--bucket", bucket, "--config", str(config)]
    )
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # rich wraps long lines
    assert "git tag v1" in said and f"s3://{bucket}/pub/v1" in said
    original = tree(workspace / "data/shards/v1")
    assert git(workspace, "tag", "--list").split() == ["v1"]
    assert "data/shards/v1.dvc" in git(workspace, "show", "--name-only", "v1")
    # no remote was configured: publish set the bucket's and committed it with the tag
    assert f"url = s3://{bucket}/pub/dvc" in git(workspace, "show", "v1:.dvc/config")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(workspace), str(clone))
    assert not (clone / "data/shards/v1").exists()
    dvc_ops.pull(clone)
    assert tree(clone / "data/shards/v1") == original

    git(workspace, "rm", "-q", "data/shards/v1.dvc")  # HEAD no longer has it; the tag does
    git(workspace, "commit", "-q", "-m", "drop v1")
    got = dvc_ops.get(str(workspace), "data/shards/v1", tmp_path / "got", rev="v1")
    assert tree(got) == original
    with pytest.raises(dvc_ops.DVCError, match="already exists"):
        dvc_ops.tag_version(workspace, "v1", [])


def test_dvc_commands_are_serialised(workspace):
    with (
        dvc_ops.dvc_lock(workspace),
        pytest.raises(filelock.Timeout),
        dvc_ops.dvc_lock(workspace, timeout=0.05),
    ):
        pass
    with (
        pytest.raises(dvc_ops.DVCError, match="not a DVC repository"),
        dvc_ops.dvc_lock(workspace / "data"),
    ):
        pass


def test_dvc_yaml_stages_name_their_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    config = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    assert stages["generate"]["foreach"] == config["demo"]["categories"]  # one per category
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        for entry in stage.get("params", []):
            for key in entry["pipelines.yaml"]:
                node = config
                for part in key.split("."):
                    node = node[part]  # KeyError names a params key pipelines.yaml lacks
        assert stage["cmd"].startswith(f"anomaly-factory stage {name} "), name
