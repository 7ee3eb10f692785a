"""Download (local http.server on 127.0.0.1), resume, checksums and safe extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from anomaly_factory.datasets.sources import (
    ChecksumMismatch,
    UnsafeArchiveMember,
    download,
    extract,
    materialize,
)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (the stdlib handler ignores Range)."""

    served: list[str] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        type(self).served.append(rng or "full")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    def handler(*a, **kw):
        return RangeHandler(*a, directory=str(root), **kw)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RangeHandler.served = []
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_sha256_and_resumes(http_root, tmp_path):
    root, base = http_root
    payload = bytes(range(256)) * 4000
    (root / "data.tar").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "dl" / "data.tar"
    # a previous, interrupted download left the first 1000 bytes
    dest.parent.mkdir()
    (dest.parent / "data.tar.part").write_bytes(payload[:1000])
    download(f"{base}/data.tar", dest, digest, show_progress=False)
    assert dest.read_bytes() == payload
    assert RangeHandler.served == ["bytes=1000-"]
    assert not (dest.parent / "data.tar.part").exists()


def test_download_checksum_mismatch_shows_both_hashes(http_root, tmp_path):
    root, base = http_root
    (root / "x.tar").write_bytes(b"hello")
    wrong = "ab" * 32
    with pytest.raises(ChecksumMismatch) as err:
        download(f"{base}/x.tar", tmp_path / "x.tar", wrong, show_progress=False)
    assert wrong in str(err.value) and hashlib.sha256(b"hello").hexdigest() in str(err.value)
    assert not (tmp_path / "x.tar").exists()


def test_url_source_is_downloaded_and_extracted(http_root, tmp_path):
    from tests.layouts import make_mvtec_ad

    root, base = http_root
    src = make_mvtec_ad(tmp_path / "src" / "mvtec", categories=("bottle",))
    with tarfile.open(root / "mvtec.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="mvtec")
    digest = hashlib.sha256((root / "mvtec.tar.gz").read_bytes()).hexdigest()
    folder = materialize("mvtec_ad", f"{base}/mvtec.tar.gz", tmp_path / "raw", digest, False)
    assert (folder / "mvtec" / "bottle" / "train" / "good" / "000.png").exists()


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize(
    "name,kind,linkname",
    [
        ("/etc/evil", tarfile.REGTYPE, ""),
        ("../evil", tarfile.REGTYPE, ""),
        ("ok/../../evil", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("link2", tarfile.SYMTYPE, "../../outside"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
)
def test_extraction_refuses_escaping_members(tmp_path, name, kind, linkname):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    archive = _tar_with(tmp_path, info)
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveMember) as err:
        extract(archive, target)
    assert repr(name) in str(err.value)
    assert not target.exists()
    assert not (tmp_path / "evil").exists()


def test_extraction_is_skipped_when_complete(tmp_path):
    info = tarfile.TarInfo("a/b.txt")
    info.size = 1
    archive = _tar_with(tmp_path, info)
    out = extract(archive, tmp_path / "out")
    assert (out / "a" / "b.txt").read_bytes() == b"x"
    (out / "a" / "b.txt").write_bytes(b"kept")
    extract(archive, tmp_path / "out")
    assert (out / "a" / "b.txt").read_bytes() == b"kept"
