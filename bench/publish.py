"""Publishing benchmark (issue 11 e): shards + S3 upload MB/s against raw boto3 ``upload_file``.

    .venv/bin/python bench/publish.py [--pairs 300] [--reps 3] [--size 256]

A loopback moto S3 server runs in this process (dummy credentials, 127.0.0.1 only).
One local version of ``--pairs`` pairs of ``--size`` px PNGs is written once; then,
``--reps`` times and interleaved (the order rotates each repetition), the same bytes
(every file of the version: shards, indexes, card) are uploaded by:

* ``raw boto3``: ``client.upload_file`` per file, same TransferConfig, nothing else;
* ``raw boto3 + SHA256``: the same with ``ChecksumAlgorithm=SHA256`` (the transport
  checksum our upload asks for);
* ``publish (upload only)``: ``publish_dir`` (verify the local version, check the
  bucket, upload each file with checksums, head + compare each object after upload);
* ``shards + publish``: ``write_shards`` of the pairs, then ``publish_dir``.

MB/s is the version's bytes over the wall time; the table reports the median over
repetitions and the ratio to raw. Then one cProfile of ``publish_dir`` shows where its
time goes. moto shares this process (and its GIL), so absolute MB/s are the client and
the server together; ratios are what the numbers are for.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import report  # noqa: E402

CATEGORIES = ("nut_demo", "bar_demo")
VERSION = "bench-v1"


# --------------------------------------------------------------------------- data
def build_pairs(root: Path, n: int, size: int) -> tuple[Path, Path, Path]:
    """``n`` pairs of ``size`` px PNGs (smooth textures + noise), their
    demo manifest and a publishable reports folder."""
    from anomaly_factory.config import DemoSection
    from anomaly_factory.datasets.ingest import ingest
    from anomaly_factory.generators.output import (
        pair_key,
        pair_metadata,
        save_pair,
        write_pairs_manifest,
    )
    from anomaly_factory.io import atomic_write_json

    demo = DemoSection(seed=0, size=64, n_train=4, n_test_good=4, n_per_type=3)
    demo.categories = list(CATEGORIES)
    manifest = root / "manifest.parquet"
    ingest("demo", None, manifest, root=root / "raw", demo=demo, show_progress=False)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = root / "pairs"
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([np.sin(6 * xx + 4 * yy + p) for p in phase], axis=2) * 80 + 128
        image = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
        normal = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        c = rng.integers(size // 4, 3 * size // 4, 2)
        mask[c[0] - 12 : c[0] + 12, c[1] - 12 : c[1] + 12] = 255
        meta = pair_metadata(
            "demo", category, "scratch", "bench_synthetic", i, "real", sigma=1.0, w_m=4.0, w_d=7.5
        )
        save_pair(out, pair_key("demo", category, "scratch", i), image, mask, normal, meta)
    reports = root / "reports"
    atomic_write_json(reports / "metrics.json", {"bench": True})
    atomic_write_json(reports / "gates.json", {"passed": True, "publishable": True})
    return write_pairs_manifest(out), manifest, reports


# --------------------------------------------------------------------------- server
def start_moto(tmp: Path):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "AKIABENCHKEY",
            "AWS_SECRET_ACCESS_KEY": "bench-dummy-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
    )
    return server


def empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


# --------------------------------------------------------------------------- variants
def raw_upload(client, bucket, version_dir, files, transfer, extra, prefix=None) -> None:
    prefix = prefix or uuid.uuid4().hex
    for rel in files:
        client.upload_file(
            str(version_dir / rel), bucket, f"{prefix}/{rel}", ExtraArgs=extra, Config=transfer
        )


def verification_costs(client, bucket, version_dir, files, pub, reps) -> dict[str, float]:
    """Median seconds of what checking adds beyond the transport checksum: the local
    sha256 passes and one HEAD per uploaded object."""
    from anomaly_factory.storage.s3 import checked_files

    raw_upload(client, bucket, version_dir, files, None, None, prefix="heads")
    hashing, heads = [], []
    for _ in range(reps):
        t = time.perf_counter()
        checked_files(version_dir, pub.multipart_chunksize)
        hashing.append(time.perf_counter() - t)
        t = time.perf_counter()
        for rel in files:
            client.head_object(Bucket=bucket, Key=f"heads/{rel}", ChecksumMode="ENABLED")
        heads.append(time.perf_counter() - t)
    empty_bucket(client, bucket)
    return {"local_sha256_s": statistics.median(hashing), "heads_s": statistics.median(heads)}


def main(argv: list[str] | None = None) -> None:
    from boto3.s3.transfer import TransferConfig

    from anomaly_factory.config import load_config
    from anomaly_factory.storage.s3 import S3Location, Uploader, make_client, publish_dir
    from anomaly_factory.storage.shards import write_shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=12)
    args = parser.parse_args(argv)

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "pipelines.yaml", "tiny")
    pub = cfg.publish
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        pairs, manifest, reports = build_pairs(tmp, args.pairs, args.size)
        version_dir = Path(write_shards(cfg, pairs, manifest, VERSION, reports, tmp / "v")).parent
        print(f"built {args.pairs} pairs + shards in {time.perf_counter() - t:.1f}s", flush=True)
        from anomaly_factory.storage.s3 import upload_order

        files = upload_order(version_dir)
        total = sum((version_dir / f).stat().st_size for f in files)
        mb = total / 1e6
        server = start_moto(tmp)
        try:
            client = make_client(pub.max_attempts)
            bucket = "bench"
            client.create_bucket(Bucket=bucket)
            uploader = Uploader(
                client,
                bucket,
                pub.multipart_threshold,
                pub.multipart_chunksize,
                pub.max_attempts,
                pub.retry_backoff_s,
            )
            transfer = TransferConfig(
                multipart_threshold=pub.multipart_threshold,
                multipart_chunksize=pub.multipart_chunksize,
            )

            def ours_upload(rep: int) -> None:
                publish_dir(uploader, version_dir, S3Location(bucket, f"up{rep}", VERSION))

            def ours_shards_upload(rep: int) -> None:
                out = tmp / f"rep{rep}"
                index = write_shards(cfg, pairs, manifest, VERSION, reports, out)
                publish_dir(uploader, index.parent, S3Location(bucket, f"su{rep}", VERSION))

            variants = {
                "raw boto3 upload_file": lambda rep: raw_upload(
                    client, bucket, version_dir, files, transfer, None
                ),
                "raw boto3 + ChecksumAlgorithm=SHA256": lambda rep: raw_upload(
                    client, bucket, version_dir, files, transfer, {"ChecksumAlgorithm": "SHA256"}
                ),
                "publish_dir (upload only)": ours_upload,
                "write_shards + publish_dir": ours_shards_upload,
            }
            names = list(variants)
            times: dict[str, list[float]] = {k: [] for k in names}
            raw_upload(client, bucket, version_dir, files, transfer, None)  # warm-up
            empty_bucket(client, bucket)
            for rep in range(args.reps):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    t = time.perf_counter()
                    variants[name](rep)
                    times[name].append(time.perf_counter() - t)
                    empty_bucket(client, bucket)
                print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
            overhead = verification_costs(client, bucket, version_dir, files, pub, args.reps)
            prof = cProfile.Profile()
            prof.runcall(publish_dir, uploader, version_dir, S3Location(bucket, "prof", VERSION))
        finally:
            server.stop()
    raw = statistics.median(times[names[0]])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "MB": mb,
                "median_s": med,
                "MB/s": mb / med,
                "vs_raw": raw / med,
                "runs_s": [round(x, 3) for x in times[name]],
            }
        )
    ours = statistics.median(times["publish_dir (upload only)"])
    raw_sha = statistics.median(times["raw boto3 + ChecksumAlgorithm=SHA256"])
    costs = {
        "transport SHA256 checksum (raw+SHA256 - raw)": raw_sha - raw,
        "local sha256 pass (checked_files)": overhead["local_sha256_s"],
        f"HEAD after upload x {len(files)} objects": overhead["heads_s"],
    }
    for name, seconds in costs.items():
        rows.append(
            {"variant": f"  cost: {name}", "median_s": seconds, "of_publish": seconds / ours}
        )
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_top)
    top = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-(args.profile_top + 1) :]
    print("cProfile of publish_dir (upload only), top by tottime:")
    print("\n".join(top), "\n")
    report(
        "publish",
        rows,
        pairs=args.pairs,
        size_px=args.size,
        files=len(files),
        bytes=total,
        reps=args.reps,
        multipart_chunksize=pub.multipart_chunksize,
        target="publish >= 0.8 x raw",
        profile_top_tottime=top,
    )


if __name__ == "__main__":
    main()
