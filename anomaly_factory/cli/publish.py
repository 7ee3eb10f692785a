"""``anomaly-factory shards | publish | pull`` (+ the per-category commands dvc.yaml runs).

The plain functions ``write_shards`` and ``publish_version`` are what the flows call;
the commands are thin wrappers around them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from anomaly_factory.cli._common import ConfigOpt, ProfileOpt, console, fail, get_config

if TYPE_CHECKING:
    from anomaly_factory.config import FactoryConfig

PULL_HELP = """Download a published version byte-exact (every file checked against its card).

Reads s3://BUCKET/PREFIX/<version>/ into OUT/<version>/ (OUT defaults to shards.out_dir).
Only a complete version (one whose card.json exists) can be pulled.

Through DVC instead (the version's git tag pins the data):

    dvc get <repo-url> data/shards/<version> --rev <version>
"""


def write_shards(
    cfg: FactoryConfig,
    pairs_path: Path | list[Path],
    manifest_path: Path | list[Path],
    version: str,
    reports_dir: Path | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Shards + index + card of ``version`` under ``out_dir`` (default ``shards.out_dir``)."""
    from anomaly_factory.storage.shards import write_shards as _write

    return _write(cfg, pairs_path, manifest_path, version, reports_dir, out_dir)


def _dvc_root(start: Path) -> Path:
    from anomaly_factory.storage.dvc_ops import DVCError

    for folder in (start.resolve(), *start.resolve().parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise DVCError(f"{start}: not inside a DVC repository (run `dvc init`)")


def check_publishable(cfg: FactoryConfig, version: str) -> dict[str, Any]:
    """The version's card, if it and the gate reports say it may be published."""
    from anomaly_factory.storage.card import is_publishable, read_reports
    from anomaly_factory.storage.s3 import PublishError, verify_local

    version_dir = Path(cfg.shards.out_dir) / version
    card = verify_local(version_dir)
    if not is_publishable(card):
        raise PublishError(
            f"{version_dir / 'card.json'}: gates say the version is not publishable "
            f"(gates: {card.get('gates')})"
        )
    reports = read_reports(Path(cfg.gates.out_dir) / version)
    if reports["gates"] is not None and not is_publishable(reports):
        raise PublishError(f"{Path(cfg.gates.out_dir) / version}: gates.json says not publishable")
    return card


def publish_version(
    cfg: FactoryConfig,
    version: str,
    bucket: str | None = None,
    prefix: str | None = None,
    force: bool = False,
    dvc: bool | None = None,
    git_tag: bool | None = None,
    on_uploaded: Callable[[str], None] | None = None,
) -> str:
    """Publish a local version: ``dvc push`` (optional), S3 upload, git tag (optional).

    The git tag comes last, so a tag always names a version that is on S3 and (with DVC)
    in the DVC remote. Returns the version's S3 URI.
    """
    from anomaly_factory.storage import dvc_ops
    from anomaly_factory.storage.s3 import (
        PublishError,
        S3Location,
        Uploader,
        make_client,
        publish_dir,
    )

    pub = cfg.publish
    bucket = bucket or pub.bucket
    if not bucket:
        raise PublishError("no bucket: pass --bucket or set publish.bucket in pipelines.yaml")
    prefix = pub.prefix if prefix is None else prefix
    dvc = pub.dvc if dvc is None else dvc
    git_tag = pub.git_tag if git_tag is None else git_tag
    check_publishable(cfg, version)
    version_dir = Path(cfg.shards.out_dir) / version
    tracked: list[Path] = []
    if dvc or git_tag:
        root = _dvc_root(Path.cwd())
        tracked = dvc_ops.track(root, [version_dir])
        if dvc:
            dvc_ops.push(root, [version_dir], remote=pub.dvc_remote)
    client = make_client(pub.max_attempts)
    uploader = Uploader(
        client,
        bucket,
        pub.multipart_threshold,
        pub.multipart_chunksize,
        pub.max_attempts,
        pub.retry_backoff_s,
    )
    uri = publish_dir(
        uploader, version_dir, S3Location(bucket, prefix, version), force, on_uploaded
    )
    if git_tag:
        dvc_ops.tag_version(root, version, tracked, force=force)
    return uri


PairsOpt = Annotated[
    list[Path],
    typer.Option("--pairs", help="pairs.parquet, or a folder of them (repeatable)"),
]
ManifestOpt = Annotated[
    list[Path], typer.Option("--manifest", help="Image manifest, or a folder of them (repeatable)")
]
VersionOpt = Annotated[str, typer.Option("--version", help="Version name (a git tag)")]
BucketOpt = Annotated[str | None, typer.Option(help="S3 bucket (default: publish.bucket)")]
PrefixOpt = Annotated[str | None, typer.Option(help="Key prefix (default: publish.prefix)")]


def shards(
    pairs: PairsOpt,
    manifest: ManifestOpt,
    version: VersionOpt,
    reports: Annotated[
        Path | None,
        typer.Option(help="metrics.json + gates.json folder (default: gates.out_dir/<version>)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output root (default: shards.out_dir)")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Write webdataset shards, a wids index and the dataset card of one version."""
    from anomaly_factory.manifest import ManifestError
    from anomaly_factory.storage.shards import ShardError

    cfg = get_config(config, profile)
    try:
        index = write_shards(cfg, pairs, manifest, version, reports, out)
    except (ShardError, ManifestError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"wrote {index} and {index.parent / 'card.json'}")


def publish(
    version: VersionOpt,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an already published version")] = False,
    dvc: Annotated[
        bool | None, typer.Option("--dvc/--no-dvc", help="dvc add/commit + push (publish.dvc)")
    ] = None,
    tag: Annotated[
        bool | None, typer.Option("--tag/--no-tag", help="git commit + tag (publish.git_tag)")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Publish a finished, publishable version to S3 (endpoint: AWS_ENDPOINT_URL).

    The version becomes visible (its card.json appears) only after every shard and index
    has been uploaded and checked; re-run after an interruption to finish it.
    """
    from anomaly_factory.storage.dvc_ops import DVCError
    from anomaly_factory.storage.s3 import PublishError
    from anomaly_factory.storage.shards import ShardError

    cfg = get_config(config, profile)
    try:
        uri = publish_version(cfg, version, bucket, prefix, force, dvc, tag)
    except (PublishError, DVCError, ShardError) as exc:
        raise fail(str(exc)) from None
    console.print(f"published {uri}")


def pull(
    version: VersionOpt,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output root (default: shards.out_dir)")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Download a published version byte-exact (see PULL_HELP for `dvc get`)."""
    from anomaly_factory.storage.s3 import PublishError, S3Location, make_client, pull_version
    from anomaly_factory.storage.shards import ShardError, check_version

    cfg = get_config(config, profile)
    bucket = bucket or cfg.publish.bucket
    if not bucket:
        raise fail("no bucket: pass --bucket or set publish.bucket (or use `dvc get`, see --help)")
    try:
        check_version(version)
        loc = S3Location(bucket, cfg.publish.prefix if prefix is None else prefix, version)
        dest = pull_version(make_client(cfg.publish.max_attempts), loc, out or cfg.shards.out_dir)
    except (PublishError, ShardError) as exc:
        raise fail(str(exc)) from None
    console.print(f"pulled {loc.uri()} into {dest}")


def _run_command(args: list[str]) -> None:
    """Run another anomaly-factory command in this process (what the flows run too)."""
    from anomaly_factory.cli import app

    command = typer.main.get_command(app)
    console.print(f"$ anomaly-factory {subprocess.list2cmdline(args)}")
    code = command.main(args=args, prog_name="anomaly-factory", standalone_mode=False)
    if code not in (None, 0):
        raise typer.Exit(code)


def _types(manifest: Path, category: str) -> list[str]:
    from anomaly_factory.manifest import anomaly_types, read_images

    types = anomaly_types(read_images(manifest), category)
    if not types:
        raise fail(f"{manifest}: category {category!r} has no few-shot anomaly types")
    return types


def _common_args(config: Path | None, profile: str | None) -> list[str]:
    return [
        *(["--config", str(config)] if config else []),
        *(["--profile", profile] if profile else []),
    ]


def category_finetune(
    manifest: Annotated[Path, typer.Option(help="Image manifest")],
    category: Annotated[str, typer.Option(help="Category")],
    out: Annotated[Path, typer.Option(help="Checkpoints folder; one sub-folder per type")],
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """`finetune` every anomaly type of a category (dvc.yaml's per-category stage)."""
    for anomaly_type in _types(manifest, category):
        _run_command(
            ["finetune", "--manifest", str(manifest), "--category", category]
            + ["--anomaly-type", anomaly_type, "--out", str(out / anomaly_type)]
            + _common_args(config, profile)
        )


def category_generate(
    manifest: Annotated[Path, typer.Option(help="Image manifest")],
    category: Annotated[str, typer.Option(help="Category")],
    checkpoints: Annotated[Path, typer.Option(help="category-finetune's --out")],
    out: Annotated[Path, typer.Option(help="Pairs folder (pairs.parquet inside)")],
    n_pairs: Annotated[
        int | None, typer.Option(help="Pairs per type (default: generate.n_pairs)")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """`generate` pairs for every anomaly type of a category (``out/<type>``), then merge
    them into ``out/pairs.parquet``."""
    from anomaly_factory.generators.output import PAIRS_FILE, merge_pairs

    n = n_pairs or get_config(config, profile).generate.n_pairs
    parts = []
    for anomaly_type in _types(manifest, category):
        _run_command(
            ["generate", "--manifest", str(manifest), "--category", category]
            + ["--anomaly-type", anomaly_type, "--checkpoint", str(checkpoints / anomaly_type)]
            + ["--n-pairs", str(n), "--out", str(out / anomaly_type)]
            + _common_args(config, profile)
        )
        parts.append(out / anomaly_type / PAIRS_FILE)
    merge_pairs(parts, out / PAIRS_FILE)


def register(app: typer.Typer) -> None:
    app.command("shards")(shards)
    app.command("publish")(publish)
    app.command("pull", help=PULL_HELP)(pull)
    app.command("category-finetune")(category_finetune)
    app.command("category-generate")(category_generate)
