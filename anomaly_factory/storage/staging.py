"""What each part of a run reads from and writes to a store data root (``storage/store.py``).

The Prefect tasks and GPU flows call these around the stage functions. With a local data
root (``RunRef.store`` None) every function here does nothing: the stages already work
in the data root itself. With ``s3://…`` a task pulls what its stage reads into this
machine's cache, and pushes what the stage wrote, before the task counts as done; GPU
runs push while they work (``store.sync_every_s``), so a retry on another machine
resumes from the fine-tune's last resume state and the pairs already made.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pandas as pd

from anomaly_factory.errors import InputError
from anomaly_factory.stages import RunRef

DATASET_FILE_COLUMNS = ("image_path", "mask_path", "xyz_path")


def rel(ref: RunRef, path: Path) -> Path:
    """``path`` (a layout path) relative to the workspace: its key in the store."""
    return Path(path).resolve().relative_to(ref.workspace.resolve())


def dataset_files(ref: RunRef, images: pd.DataFrame) -> set[str]:
    """The dataset files (images, masks, point clouds) a manifest's rows name."""
    files: set[str] = set()
    for column in DATASET_FILE_COLUMNS:
        for value in images[column].dropna():
            path = Path(value)
            if path.is_absolute() or ".." in path.parts:
                raise InputError(
                    f"{column} {value!r}: lies outside the data root; with a store data root "
                    f"({ref.root}) every dataset file must be under datasets.root"
                )
            files.add(path.as_posix())
    return files


def _folder_of(files: set[str]) -> str:
    return os.path.commonpath(sorted(files)) if len(files) > 1 else next(iter(files))


def _pull_files(ref: RunRef, files: set[str]) -> None:
    """Pull exactly ``files``, with one listing of the folder they share."""
    if ref.store is not None and files:
        ref.store.pull([_folder_of(files)], only=files)


def _push_files(ref: RunRef, files: set[str]) -> None:
    if ref.store is not None and files:
        ref.store.push([_folder_of(files)], only=files)


def _images(ref: RunRef, category: str | None = None) -> pd.DataFrame:
    from anomaly_factory.manifest import read_images

    images = read_images(ref.layout.manifest)
    return images if category is None else images[images["category"] == category]


def pull_manifest(ref: RunRef, category: str | None = None) -> None:
    """The version's manifest and the dataset files it names (of ``category`` only)."""
    store = ref.store
    if store is None:
        return
    store.pull([rel(ref, ref.layout.manifest)])
    _pull_files(ref, dataset_files(ref, _images(ref, category)))


def push_dataset(ref: RunRef, manifest: Path) -> None:
    """An ingested dataset: its manifest and the files it names."""
    from anomaly_factory.manifest import read_images

    store = ref.store
    if store is None:
        return
    _push_files(ref, dataset_files(ref, read_images(manifest)))
    store.push([rel(ref, manifest)])  # last: the manifest says the files are there


def pull(ref: RunRef, paths: Iterable[Path]) -> None:
    """Layout folders or files, where the store has them."""
    if ref.store is not None:
        ref.store.pull([rel(ref, p) for p in paths])


def push(ref: RunRef, paths: Iterable[Path]) -> None:
    if ref.store is not None:
        ref.store.push([rel(ref, p) for p in paths if p.exists()])


@contextlib.contextmanager
def pulled_and_pushed(ref: RunRef, paths: list[Path], periodic: bool = False) -> Iterator[None]:
    """Pull ``paths`` (what a resumable stage left there), run the body, push them back;
    ``periodic``: also every ``store.sync_every_s`` while it runs, and mirrored (files
    the stage removed, such as older resume states, leave the store too)."""
    from anomaly_factory.storage.store import pushing

    store = ref.store
    if store is None:
        yield
        return
    keys = [rel(ref, p) for p in paths]
    store.pull(keys)
    if periodic:
        with pushing(store, keys, ref.cfg.store.sync_every_s):
            yield
    else:
        yield
        store.push(keys)


def pull_version(ref: RunRef) -> None:
    """Everything a version-wide stage reads: manifest, dataset files, pairs, reports."""
    if ref.store is None:
        return
    pull_manifest(ref)
    pull(ref, [ref.layout.pairs.parent, ref.layout.reports])


def progress_sync(ref: RunRef) -> Callable[[], object] | None:
    """What brings the progress records of GPU jobs on other machines into this one's
    progress folder (each job pushes its type's record): a pull of that folder, for the
    run's display. None with a local data root or local dispatch. An earlier run's
    records leave the store first, as ``progress.clear`` does here."""
    store = ref.store
    if store is None or ref.cfg.orchestration.dispatch != "work_pool":
        return None
    folder = rel(ref, ref.layout.progress)
    ref.layout.progress.mkdir(parents=True, exist_ok=True)
    try:
        store.push([folder], mirror=True)
    except Exception as exc:  # the run itself reports an unreachable store
        logging.getLogger(__name__).warning("progress records in %s: %s", store.url, exc)
    return functools.partial(store.pull, [folder])
