"""Per-image reference texts (``anomalycontrol.captions``), as the official code's MVTec-Caption.

AnomalyControl pairs every reference image with a sentence that describes its
defect. With no captions file, the text of an image is the configured template of
its (category, type); with one, each image that has a caption uses it.

A captions file is a ``.csv`` with an ``image_path,text`` header, or a ``.jsonl``
with one ``{"image_path": ..., "text": ...}`` object per line. ``image_path`` is
matched against the manifest's image paths by whole trailing path components, so
``bottle/test/broken_large/000.png`` names ``/data/mvtec/bottle/test/broken_large/000.png``
whatever the dataset root; the longest match wins.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "captions.csv")
>>> _ = open(path, "w").write("image_path,text\\nbottle/test/crack/000.png,a thin crack\\n")
>>> read_captions(path).lookup("/data/mvtec/bottle/test/crack/000.png")
'a thin crack'
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from anomaly_factory.errors import InputError

FIELDS = ("image_path", "text")
FIELD = "anomalycontrol.captions"


def path_parts(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """A path's components, separators normalised and ``.`` components dropped."""
    parts = PurePosixPath(str(path).replace("\\", "/")).parts
    return tuple(p for p in parts if p not in ("", "."))


@dataclass(frozen=True)
class Captions:
    """The captions of one file, keyed by the components of their image path."""

    path: Path
    texts: dict[tuple[str, ...], str]
    digest: str  # sha256 of the file: part of the adapter checkpoint's identity

    def lookup(self, image_path: str | os.PathLike[str]) -> str | None:
        """The caption whose path is the longest trailing part of ``image_path``, or None."""
        parts = path_parts(image_path)
        for start in range(len(parts)):
            text = self.texts.get(parts[start:])
            if text is not None:
                return text
        return None


def read_captions(path: str | os.PathLike[str]) -> Captions:
    """Read a ``.csv`` or ``.jsonl`` captions file; a ValueError names the file and line."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise InputError(f"{FIELD}: {path} is neither a .csv nor a .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{FIELD}: cannot read {path}: {exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {exc}") from exc
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    texts: dict[tuple[str, ...], str] = {}
    first_line: dict[tuple[str, ...], int] = {}
    for line, image_path, caption in rows:
        key = path_parts(image_path)
        if key in texts and texts[key] != caption:
            raise InputError(
                f"{path}:{line}: {image_path!r} already has another caption "
                f"(line {first_line[key]})"
            )
        texts[key] = caption
        first_line.setdefault(key, line)
    if not texts:
        raise InputError(f"{path}: holds no captions")
    return Captions(path, texts, hashlib.sha256(raw).hexdigest())


def _checked(path: Path, line: int, image_path: object, text: object) -> tuple[int, str, str]:
    for name, value in zip(FIELDS, (image_path, text), strict=True):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}:{line}: {name} is missing or empty ({value!r})")
    return line, str(image_path).strip(), str(text).strip()


def _csv_rows(path: Path, text: str) -> list[tuple[int, str, str]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    missing = [f for f in FIELDS if f not in header]
    if missing:
        raise InputError(f"{path}:1: header {header} lacks {missing}")
    rows = []
    try:
        for record in reader:
            if None in record:  # more fields than the header names
                raise InputError(f"{path}:{reader.line_num}: more fields than the header")
            rows.append(
                _checked(path, reader.line_num, record.get("image_path"), record.get("text"))
            )
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: {exc}") from exc
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, str, str]]:
    rows = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{line}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line}: expected an object with {list(FIELDS)}")
        rows.append(_checked(path, line, record.get("image_path"), record.get("text")))
    return rows
