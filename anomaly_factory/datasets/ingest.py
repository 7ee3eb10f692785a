"""Ingestion: any supported dataset source into one validated image manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from anomaly_factory.config import DemoSection
from anomaly_factory.datasets.demo import build_demo
from anomaly_factory.datasets.layouts import READERS
from anomaly_factory.datasets.sources import find_root, materialize
from anomaly_factory.datasets.split import assign_splits, check_no_leak
from anomaly_factory.datasets.validate import BadInputError, Problem, inspect_files
from anomaly_factory.io import atomic_path
from anomaly_factory.manifest import IMAGE_COLUMNS, validate_images, write_images

DATASETS = tuple(READERS)
# What the dataset root holds; archives often wrap it in one extra folder.
ROOT_MARKERS = {
    "mvtec_ad": "*/train/good",
    "demo": "*/train/good",
    "visa": "split_csv/1cls.csv",
    "mvtec_3d_ad": "*/train/good/rgb",
}


@dataclass
class IngestResult:
    manifest_path: Path
    manifest: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    quarantine_path: Path | None = None


def quarantine_path_for(manifest_out: Path) -> Path:
    return manifest_out.with_name(manifest_out.stem + ".quarantine.csv")


def ingest(
    dataset: str,
    source: str | Path | None,
    manifest_out: str | Path,
    root: str | Path = "data/raw",
    sha256: str | None = None,
    categories: list[str] | None = None,
    on_bad_input: str = "fail",
    fewshot_fraction: float = 1 / 3,
    demo: DemoSection | None = None,
    show_progress: bool = True,
) -> IngestResult:
    """Fetch, read, validate and split a dataset, then write its manifest.

    With ``on_bad_input="fail"`` any problem raises :class:`BadInputError` listing
    every offending file, and nothing is written. With ``"quarantine"`` the
    offending images are left out and listed in ``<manifest>.quarantine.csv``.
    """
    if dataset not in READERS:
        raise ValueError(f"dataset: {dataset!r} is not one of {list(READERS)}")
    if on_bad_input not in ("fail", "quarantine"):
        raise ValueError(f"on_bad_input: {on_bad_input!r} is not one of ['fail', 'quarantine']")
    root, manifest_out = Path(root), Path(manifest_out)
    if dataset == "demo":
        d = demo or DemoSection()
        folder = Path(source) if source else root / "demo"
        build_demo(
            folder,
            d.seed,
            d.size,
            d.n_train,
            d.n_test_good,
            d.n_per_type,
            categories or d.categories,
        )
    else:
        folder = materialize(dataset, source, root, sha256, show_progress)
    folder = find_root(folder, ROOT_MARKERS[dataset])
    raw = READERS[dataset](folder)
    if categories:
        unknown = sorted(set(categories) - set(raw["category"]))
        if unknown:
            found = sorted(set(raw["category"]))
            raise ValueError(f"categories: {unknown} not found in {folder} (found {found})")
        raw = raw[raw["category"].isin(categories)].reset_index(drop=True)
    inspected, problems = inspect_files(raw)
    quarantine = None
    if problems:
        if on_bad_input == "fail":
            raise BadInputError(problems)
        bad_paths = {p.path for p in problems}
        bad = inspected["image_path"].isin(bad_paths) | inspected["mask_path"].isin(bad_paths)
        bad |= inspected["xyz_path"].isin(bad_paths)
        inspected = inspected[~bad]
        quarantine = quarantine_path_for(manifest_out)
        with atomic_path(quarantine) as tmp:
            pd.DataFrame([p.__dict__ for p in problems]).to_csv(tmp, index=False)
    df = assign_splits(inspected, fewshot_fraction)
    check_no_leak(df)
    columns = list(IMAGE_COLUMNS) + [c for c in df.columns if c not in IMAGE_COLUMNS]
    df = validate_images(
        df[columns].sort_values(["category", "split", "anomaly_type", "image_path"])
    )
    write_images(df, manifest_out)
    return IngestResult(manifest_out, df.reset_index(drop=True), problems, quarantine)
