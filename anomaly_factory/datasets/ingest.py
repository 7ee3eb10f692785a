"""Ingestion: any supported dataset source into one validated image manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from anomaly_factory.config import DemoSection
from anomaly_factory.datasets.demo import build_demo
from anomaly_factory.datasets.formats import FORMATS, get_format
from anomaly_factory.datasets.sources import find_root, materialize
from anomaly_factory.datasets.split import assign_splits, check_no_leak
from anomaly_factory.datasets.validate import BadInputError, Problem, inspect_files
from anomaly_factory.errors import InputError
from anomaly_factory.io import TMP_SUFFIX, atomic_path, remove_stale
from anomaly_factory.manifest import GOOD, IMAGE_COLUMNS, validate_images, write_images

DATASETS = tuple(FORMATS)


@dataclass
class IngestResult:
    manifest_path: Path
    manifest: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    quarantine_path: Path | None = None


def quarantine_path_for(manifest_out: Path) -> Path:
    return manifest_out.with_name(manifest_out.stem + ".quarantine.csv")


def _groups(df: pd.DataFrame) -> set[str]:
    """``category/type`` of every anomaly type, and ``category/good`` of train normals."""
    kept = df[(df["anomaly_type"] != GOOD) | (df["source_split"] == "train")]
    return set((kept["category"] + "/" + kept["anomaly_type"]).tolist())


def check_nothing_vanished(
    before: pd.DataFrame, after: pd.DataFrame, problems: list[Problem]
) -> None:
    """Quarantine may drop files, never a whole anomaly type or a category's normals."""
    lost = sorted(_groups(before) - _groups(after))
    if lost:
        lines = "\n".join(f"  {p}" for p in problems)
        raise InputError(
            f"quarantine would remove every image of {', '.join(lost)}, so it would vanish "
            f"from the manifest; fix or remove these files:\n{lines}"
        )


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
    alpha: str = "refuse",
) -> IngestResult:
    """Fetch, read, validate and split a dataset, then write its manifest.

    With ``on_bad_input="fail"`` any problem raises :class:`BadInputError` listing
    every offending file, and nothing is written. With ``"quarantine"`` the
    offending images are left out and listed in ``<manifest>.quarantine.csv``
    (a clean run removes an older one); a quarantine that would remove a whole
    anomaly type is an error. ``alpha`` is ``datasets.alpha``.
    """
    fmt = get_format(dataset)
    if on_bad_input not in ("fail", "quarantine"):
        raise InputError(f"on_bad_input: {on_bad_input!r} is not one of ['fail', 'quarantine']")
    root, manifest_out = Path(root), Path(manifest_out)
    for name in (manifest_out.name, quarantine_path_for(manifest_out).name):
        if manifest_out.parent.is_dir():  # what a killed ingest left half-written
            remove_stale(manifest_out.parent.glob(f".{name}.*{TMP_SUFFIX}"))
    if fmt.built_in:
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
    folder = find_root(folder, fmt.root_marker)
    raw = fmt.read(folder)
    if categories:
        unknown = sorted(set(categories) - set(raw["category"]))
        if unknown:
            found = sorted(set(raw["category"]))
            raise InputError(f"categories: {unknown} not found in {folder} (found {found})")
        raw = raw[raw["category"].isin(categories)].reset_index(drop=True)
    inspected, problems = inspect_files(raw, alpha)
    quarantine = None
    if problems:
        if on_bad_input == "fail":
            raise BadInputError(problems)
        bad_paths = {p.path for p in problems}
        bad = inspected["image_path"].isin(bad_paths) | inspected["mask_path"].isin(bad_paths)
        bad |= inspected["xyz_path"].isin(bad_paths)
        kept = inspected[~bad]
        check_nothing_vanished(inspected, kept, problems)
        quarantine = quarantine_path_for(manifest_out)
        with atomic_path(quarantine) as tmp:
            pd.DataFrame([p.__dict__ for p in problems]).to_csv(tmp, index=False)
        inspected = kept
    df = assign_splits(inspected, fewshot_fraction)
    check_no_leak(df)
    columns = list(IMAGE_COLUMNS) + [c for c in df.columns if c not in IMAGE_COLUMNS]
    df = validate_images(
        df[columns].sort_values(["category", "split", "anomaly_type", "image_path"])
    )
    write_images(df, manifest_out)
    if quarantine is None:  # a clean run: an older run's list no longer applies
        quarantine_path_for(manifest_out).unlink(missing_ok=True)
    return IngestResult(manifest_out, df.reset_index(drop=True), problems, quarantine)
