"""``anomaly-factory shards | publish | pull``.

Thin wrappers: ``storage.shards.write_shards`` and ``storage.publish.publish_version``
do the work, and the flows call them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_factory.cli._common import EPILOG, ConfigOpt, ProfileOpt, console, fail, get_config

PULL_HELP = """Download a published version byte-exact (every file checked against its card).

Reads s3://BUCKET/PREFIX/<version>/ into OUT/<version>/ (OUT defaults to shards.out_dir).
Only a complete version (one whose card.json exists) can be pulled.

Through DVC instead (the version's git tag pins the data):

    dvc get <repo-url> data/shards/<version> --rev <version>
"""


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
    from anomaly_factory.storage.shards import write_shards

    cfg = get_config(config, profile)
    index = write_shards(cfg, pairs, manifest, version, reports, out)
    console.print(f"wrote {index} and {index.parent / 'card.json'}")


def publish(
    version: VersionOpt,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace an already published version (it stays visible, whole, until the "
            "new one is complete)"
        ),
    ] = False,
    dvc: Annotated[
        bool | None,
        typer.Option(
            "--dvc/--no-dvc",
            help="dvc add/commit + dvc push (default publish.dvc: auto = in a DVC repo)",
        ),
    ] = None,
    tag: Annotated[
        bool | None,
        typer.Option(
            "--tag/--no-tag", help="git commit + tag (default publish.git_tag: auto = in a repo)"
        ),
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Publish a finished, publishable version: S3 (endpoint: AWS_ENDPOINT_URL), dvc push, git tag.

    The version becomes visible (its card.json appears) only after every shard and index
    has been uploaded and checked; re-run after an interruption to finish it. In a DVC
    repository the shards are also committed to DVC, pushed to its remote and tagged
    ``<version>`` in git, so ``dvc get <repo> data/shards/<version> --rev <version>`` works.
    """
    from anomaly_factory.storage.publish import publish_version

    cfg = get_config(config, profile)
    done = publish_version(cfg, version, bucket, prefix, force, dvc, tag)
    console.print(f"published {done.uri}")
    if done.dvc_pushed:
        console.print(f"dvc push  {cfg.shards.out_dir / version}")
    if done.tag:
        console.print(f"git tag   {done.tag}")
    if done.skipped:
        console.print(f"dvc push and git tag skipped: {done.skipped}")


def pull(
    version: VersionOpt,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output root (default: shards.out_dir)")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Download a published version byte-exact (see PULL_HELP for `dvc get`)."""
    from anomaly_factory.storage.s3 import S3Location, make_client, pull_version
    from anomaly_factory.storage.shards import check_version

    cfg = get_config(config, profile)
    bucket = bucket or cfg.publish.bucket
    if not bucket:
        raise fail("no bucket: pass --bucket or set publish.bucket (or use `dvc get`, see --help)")
    check_version(version)
    loc = S3Location(bucket, cfg.publish.prefix if prefix is None else prefix, version)
    dest = pull_version(make_client(cfg.publish.max_attempts), loc, out or cfg.shards.out_dir)
    console.print(f"pulled {loc.uri()} into {dest}")


def register(app: typer.Typer) -> None:
    app.command("shards", epilog=EPILOG)(shards)
    app.command("publish", epilog=EPILOG)(publish)
    app.command("pull", help=PULL_HELP, epilog=EPILOG)(pull)
