"""Captions files (``anomalycontrol.captions``): lookup by trailing path, errors with file:line."""

from __future__ import annotations

import json

import pytest

from anomaly_factory.generators.anomalycontrol.captions import read_captions


def test_csv_and_jsonl_give_the_same_captions(tmp_path) -> None:
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text(
        'image_path,text\nbottle/test/crack/000.png,"a crack, thin"\n./crack/001.png,a dent\n'
    )
    jsonl = tmp_path / "captions.jsonl"
    rows = [
        {"image_path": "bottle/test/crack/000.png", "text": "a crack, thin"},
        {"image_path": "./crack/001.png", "text": "a dent"},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for path in (csv_path, jsonl):
        captions = read_captions(path)
        assert captions.lookup("/data/mvtec/bottle/test/crack/000.png") == "a crack, thin"
        assert captions.lookup("C:\\data\\bottle\\test\\crack\\001.png") == "a dent"
        assert captions.lookup("/data/mvtec/bottle/test/crack/002.png") is None
        assert captions.lookup("/data/bottle/test/scratch/000.png") is None


def test_longest_matching_path_wins(tmp_path) -> None:
    path = tmp_path / "captions.csv"
    path.write_text("image_path,text\n000.png,any first image\nscrew/test/000.png,a screw\n")
    captions = read_captions(path)
    assert captions.lookup("/d/screw/test/000.png") == "a screw"
    assert captions.lookup("/d/grid/test/000.png") == "any first image"


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("c.csv", "image_path,caption\nx.png,a cut\n", r"c\.csv:1: header"),
        ("c.csv", "image_path,text\nx.png,a cut\ny.png,\n", r"c\.csv:3: text is missing"),
        ("c.csv", "image_path,text\nx.png,a cut,extra\n", r"c\.csv:2: more fields"),
        ("c.csv", "image_path,text\nx.png,a cut\nx.png,a dent\n", r"c\.csv:3: .*line 2"),
        ("c.jsonl", '{"image_path": "x.png", "text": "a"}\n{"image_path": "y.png"\n', r":2: not"),
        ("c.jsonl", '["x.png", "a cut"]\n', r"c\.jsonl:1: expected an object"),
        ("c.jsonl", "\n\n", r"c\.jsonl: holds no captions"),
        ("c.txt", "x.png a cut\n", r"anomalycontrol\.captions: .*c\.txt"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, name, content, where) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=where):
        read_captions(path)


def test_missing_file_names_the_field_and_file(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"anomalycontrol\.captions: .*nope\.csv"):
        read_captions(tmp_path / "nope.csv")
