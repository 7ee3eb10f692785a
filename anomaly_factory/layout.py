"""Where a run's artifacts live, in one place.

Every stage (CLI, Prefect task, DVC stage) asks this class for its paths, so a
run's folder tree is the same whichever way it was started::

    data/manifests/<dataset>.parquet            image manifests (ingest)
    data/manifests/<version>.parquet            all datasets of the version
    data/checkpoints/<profile>/<cat>/<type>/    fine-tuned weights
    data/pairs/<version>/<cat>/<type>/          generated pairs + pairs.parquet
    data/pairs/<version>/pairs.parquet          all pairs of the version
    data/reports/<version>/                     metrics, gates, report, detectors
    data/shards/<version>/<dataset>/<cat>/      webdataset shards + index + card
    data/runs/<version>/progress/               live progress of a run
    data/runs/<version>/run.log                 what libraries printed during `run`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anomaly_factory.config import FactoryConfig


@dataclass(frozen=True)
class RunLayout:
    """The paths of one version. Its name is checked first: it becomes a file and folder
    name in several places (``../evil`` would write outside ``data/manifests``)."""

    cfg: FactoryConfig
    version: str
    root: Path = Path(".")

    def __post_init__(self) -> None:
        from anomaly_factory.storage.shards import check_version

        check_version(self.version)

    def _abs(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.root / path).resolve()

    def dataset_manifest(self, dataset: str) -> Path:
        return self._abs(self.cfg.datasets.manifest_dir) / f"{dataset}.parquet"

    @property
    def manifest(self) -> Path:
        return self._abs(self.cfg.datasets.manifest_dir) / f"{self.version}.parquet"

    @property
    def raw_root(self) -> Path:
        return self._abs(self.cfg.datasets.root)

    def category_checkpoints(self, category: str) -> Path:
        return self._abs(self.cfg.finetune.out_dir) / self.cfg.profile / category

    def checkpoint(self, category: str, anomaly_type: str) -> Path:
        return self.category_checkpoints(category) / anomaly_type

    def category_pairs(self, category: str) -> Path:
        return self._abs(self.cfg.generate.out_dir) / self.version / category

    def pairs_dir(self, category: str, anomaly_type: str) -> Path:
        return self.category_pairs(category) / anomaly_type

    @property
    def pairs(self) -> Path:
        return self._abs(self.cfg.generate.out_dir) / self.version / "pairs.parquet"

    @property
    def reports(self) -> Path:
        return self._abs(self.cfg.gates.out_dir) / self.version

    @property
    def shards(self) -> Path:
        return self._abs(self.cfg.shards.out_dir)

    @property
    def progress(self) -> Path:
        return self._abs(Path("data/runs")) / self.version / "progress"

    @property
    def run_log(self) -> Path:
        return self._abs(Path("data/runs")) / self.version / "run.log"


def default_version(cfg: FactoryConfig) -> str:
    """A version name that only changes when the resolved config does."""
    return f"{cfg.profile}-{cfg.hash()[:8]}"
