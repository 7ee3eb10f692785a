"""Publishing to a real (moto) S3 server: byte-exact, complete-or-invisible, clear errors."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anomaly_factory.cli import app
from anomaly_factory.io import sha256_file
from anomaly_factory.storage.publish import publish_version
from anomaly_factory.storage.s3 import (
    LEASE,
    BucketNotFound,
    CredentialsError,
    PublishError,
    S3Location,
    Uploader,
    VersionExists,
    VersionNotFound,
    is_visible,
    make_client,
    pull_version,
)
from anomaly_factory.storage.shards import write_shards
from tests.test_shards import make_pairs, write_reports

SECRET = "s3cr3t-" + uuid.uuid4().hex  # must never show up in logs or files


def start_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def moto_server():
    server, url = start_server()
    yield url
    server.stop()


def use_moto(monkeypatch, tmp_path: Path, url: str, secret: str = SECRET) -> None:
    """Dummy credentials and the moto endpoint, through the standard AWS variables."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTINGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)


@pytest.fixture
def s3_bucket(monkeypatch, tmp_path):
    """Its own moto server and a fresh bucket (moto's store outlives a server: a new name)."""
    server, url = start_server()
    use_moto(monkeypatch, tmp_path, url)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=bucket)
    yield bucket
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path, moto_server) -> str:
    use_moto(monkeypatch, tmp_path, moto_server)
    return moto_server


@pytest.fixture
def bucket(aws_env) -> str:
    name = f"af-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory, demo_manifest) -> Path:
    return make_pairs(demo_manifest, tmp_path_factory.mktemp("pairs"))


@pytest.fixture
def cfg(tmp_path, tiny_config, bucket):
    """Tiny config with local outputs in tmp, the test bucket, and fast failure."""
    cfg = tiny_config.model_copy(deep=True)
    cfg.shards.out_dir = tmp_path / "shards"
    cfg.gates.out_dir = tmp_path / "reports"
    cfg.publish.bucket = bucket
    cfg.publish.prefix = "datasets/af"
    cfg.publish.max_attempts = 1
    cfg.publish.retry_backoff_s = 0.0
    cfg.publish.multipart_threshold = 5 << 20
    cfg.publish.multipart_chunksize = 5 << 20
    return cfg


@pytest.fixture
def version(cfg, pairs_path, demo_manifest_path) -> str:
    """A finished, publishable local version 'v1'."""
    reports = write_reports(Path(cfg.gates.out_dir) / "v1")
    write_shards(cfg, pairs_path, demo_manifest_path, "v1", reports)
    return "v1"


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def test_publish_then_pull_is_byte_exact(cfg, version, tmp_path):
    uri = publish_version(cfg, version).uri
    assert uri == f"s3://{cfg.publish.bucket}/datasets/af/v1/"
    client = make_client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=cfg.publish.bucket)["Contents"]]
    assert "datasets/af/v1/card.json" in keys
    assert any(k.endswith("/shard-000000.tar") and k.count("/") == 5 for k in keys)
    loc = S3Location(cfg.publish.bucket, "datasets/af", version)
    dest = pull_version(client, loc, tmp_path / "pulled")
    assert tree(dest) == tree(Path(cfg.shards.out_dir) / version)


def test_multipart_upload_is_checked(aws_env, bucket, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(uuid.uuid4().bytes * (700 << 10))  # 11.2 MB: 3 parts of 5 MiB
    uploader = Uploader(make_client(), bucket, 5 << 20, 5 << 20, attempts=1, backoff_s=0)
    assert uploader.upload(big, "x/big.bin") is True
    head = make_client().head_object(Bucket=bucket, Key="x/big.bin")
    assert head["ETag"].endswith('-3"')  # really multipart
    assert uploader.upload(big, "x/big.bin") is False  # intact copy is skipped


def test_transient_failures_are_retried(aws_env, bucket, tmp_path):
    class Flaky:
        """The real client, but the first upload fails like a dropped connection."""

        def __init__(self, client):
            self.client, self.failures = client, 1

        def __getattr__(self, name):
            return getattr(self.client, name)

        def upload_file(self, *args, **kw):
            if self.failures:
                from botocore.exceptions import EndpointConnectionError

                self.failures -= 1
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
            return self.client.upload_file(*args, **kw)

    f = tmp_path / "f.bin"
    f.write_bytes(b"payload")
    flaky = Flaky(make_client())
    assert Uploader(flaky, bucket, attempts=2, backoff_s=0).upload(f, "f.bin") is True
    assert flaky.failures == 0
    with pytest.raises(PublishError, match="after 1 attempts"):
        flaky.failures = 1
        Uploader(flaky, bucket, attempts=1, backoff_s=0).upload(f, "g.bin")


def test_interrupted_upload_is_invisible_and_a_retry_completes_it(
    cfg, version, tmp_path, monkeypatch
):
    server, url = start_server()
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    uploaded: list[str] = []

    def stop_after_two(rel: str) -> None:
        uploaded.append(rel)
        if len(uploaded) == 2:
            server.stop()  # the store goes away mid-publish

    try:
        with pytest.raises(PublishError):
            publish_version(cfg, version, on_uploaded=stop_after_two)
    finally:
        server.stop()
    assert len(uploaded) == 2
    server, url = start_server()  # same in-process store, new endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    try:
        client = make_client()
        loc = S3Location(cfg.publish.bucket, "datasets/af", version)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=loc.bucket)["Contents"]]
        data = [k for k in keys if not k.endswith(LEASE)]  # the dead publisher's lease stays
        assert len(data) == 2 and not is_visible(client, loc)  # partial objects, no version
        with pytest.raises(VersionNotFound, match="no published version"):
            pull_version(client, loc, tmp_path / "early")
        publish_version(cfg, version)
        assert is_visible(client, loc)
        dest = pull_version(client, loc, tmp_path / "pulled")
        assert tree(dest) == tree(Path(cfg.shards.out_dir) / version)
    finally:
        server.stop()


def test_republish_needs_force_and_repairs_objects(cfg, version, tmp_path):
    publish_version(cfg, version)
    with pytest.raises(VersionExists, match="--force"):
        publish_version(cfg, version)
    client = make_client()
    shard = next(
        o["Key"]
        for o in client.list_objects_v2(Bucket=cfg.publish.bucket)["Contents"]
        if o["Key"].endswith(".tar")
    )
    client.put_object(Bucket=cfg.publish.bucket, Key=shard, Body=b"corrupted")
    client.put_object(Bucket=cfg.publish.bucket, Key="datasets/af/v1/stale.tar", Body=b"old")
    publish_version(cfg, version, force=True)
    loc = S3Location(cfg.publish.bucket, "datasets/af", version)
    dest = pull_version(client, loc, tmp_path / "pulled")
    assert tree(dest) == tree(Path(cfg.shards.out_dir) / version)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=cfg.publish.bucket)["Contents"]]
    assert "datasets/af/v1/stale.tar" not in keys


def test_unpublishable_or_incomplete_versions_are_refused(cfg, pairs_path, demo_manifest_path):
    reports = write_reports(Path(cfg.gates.out_dir) / "bad", publishable=False)
    write_shards(cfg, pairs_path, demo_manifest_path, "bad", reports)
    with pytest.raises(PublishError, match="not publishable"):
        publish_version(cfg, "bad")
    with pytest.raises(PublishError, match="incomplete"):
        publish_version(cfg, "never-written")
    assert "Contents" not in make_client().list_objects_v2(Bucket=cfg.publish.bucket)


def test_missing_bucket_is_a_clear_cli_error(cfg, version, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        f"shards:\n  out_dir: {cfg.shards.out_dir}\ngates:\n  out_dir: {cfg.gates.out_dir}\n"
    )
    result = CliRunner().invoke(
        app, ["publish", "--version", version, "--bucket", "no-such-bucket", "-c", str(config)]
    )
    assert result.exit_code == 2  # the bucket named does not exist: usage
    assert "no-such-bucket" in result.output and "does not exist" in result.output


def test_wrong_credentials_are_a_clear_error(cfg, version):
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication(), pytest.raises(CredentialsError, match="rejected"):
        publish_version(cfg, version)


def test_no_secret_in_logs_or_artifacts(cfg, version, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    publish_version(cfg, version)
    client = make_client()
    loc = S3Location(cfg.publish.bucket, "datasets/af", version)
    pull_version(client, loc, tmp_path / "pulled")
    with pytest.raises(BucketNotFound):
        publish_version(cfg, version, bucket="no-such-bucket")
    out = capsys.readouterr()
    assert caplog.records and SECRET not in caplog.text
    assert SECRET not in out.out + out.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for obj in client.list_objects_v2(Bucket=cfg.publish.bucket)["Contents"]:
        body = client.get_object(Bucket=cfg.publish.bucket, Key=obj["Key"])["Body"].read()
        assert SECRET.encode() not in body


def test_cli_publish_then_pull(cfg, version, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        f"shards:\n  out_dir: {cfg.shards.out_dir}\ngates:\n  out_dir: {cfg.gates.out_dir}\n"
        f"publish:\n  bucket: {cfg.publish.bucket}\n  prefix: cli\n"
    )
    runner = CliRunner()
    first = runner.invoke(app, ["publish", "--version", version, "-c", str(config)])
    assert first.exit_code == 0, first.output
    said = " ".join(first.output.split())  # rich wraps long paths
    assert "skipped" in said and "not in a DVC repository" in said
    forced = ["publish", "--version", version, "--dvc", "-c", str(config)]
    explicit = runner.invoke(app, forced)  # asked for DVC where there is none
    assert explicit.exit_code == 2
    assert "not inside a DVC repository" in " ".join(explicit.output.split())
    again = runner.invoke(app, ["publish", "--version", version, "-c", str(config)])
    assert again.exit_code == 2 and "--force" in again.output
    pulled = runner.invoke(
        app, ["pull", "--version", version, "--out", str(tmp_path / "p"), "-c", str(config)]
    )
    assert pulled.exit_code == 0, pulled.output
    assert tree(tmp_path / "p" / version) == tree(Path(cfg.shards.out_dir) / version)
