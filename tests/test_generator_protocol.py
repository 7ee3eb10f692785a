"""The generator recipe of ``anomaly_factory.generators``, followed with a toy generator.

The toy "trains" (the mean colour of its type's few-shot defect pixels, cached in the
run's checkpoint folder) and paints that colour into a square on a train normal. It is
added as the recipe says (a class, one registry line, one config section), then run by
the factory's own stage functions, which know nothing of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pydantic
import pytest

from anomaly_factory import stages
from anomaly_factory.config import FactoryConfig, Section
from anomaly_factory.gates.publication import candidates_per_type
from anomaly_factory.generators import registry
from anomaly_factory.generators.base import GenerationRequest, Generator, ProgressFn
from anomaly_factory.generators.common import pair_seed
from anomaly_factory.generators.output import (
    is_done,
    pair_key,
    pair_metadata,
    record_path,
    save_pair,
    write_pairs_manifest,
)
from anomaly_factory.images import read_mask, read_rgb
from anomaly_factory.io import atomic_write_json
from anomaly_factory.manifest import PAIR_COLUMNS, pair_params, read_images, read_pairs, select

CATEGORY, TYPE = "nut_demo", "rust"
TRAININGS: list[Path] = []  # every training the toy ran (the cache must spare repeats)


class ToySection(Section):
    """The toy's config section (step 3 of the recipe)."""

    seed: int = 0
    side: int = 12


class Toy:
    """Step 1 of the recipe: the generator object."""

    name = "toy"
    fewshot_typed = True

    def prepare_category(self, cfg: FactoryConfig, manifest: Path, category: str) -> None:
        """Nothing is shared between the toy's types."""

    def shared_dirs(self, cfg: FactoryConfig, manifest: Path, category: str) -> list[Path]:
        return []

    def prepare(self, request: GenerationRequest) -> Path | None:
        out = Path(request.train_dir) / "toy.json"
        if out.is_file():
            return out.parent
        images = read_images(request.manifest)
        pixels = [
            read_rgb(row.image_path)[read_mask(row.mask_path, source="dataset")]
            for row in select(
                images, request.category, request.anomaly_type, "fewshot"
            ).itertuples()
        ]
        colour = np.concatenate(pixels).mean(axis=0).round().astype(int).tolist()
        TRAININGS.append(out)
        atomic_write_json(out, {"colour": colour})
        return out.parent

    def generate(self, request: GenerationRequest, on_pair: ProgressFn | None = None) -> Path:
        cfg, toy = request.cfg, request.cfg.toy  # type: ignore[attr-defined]
        colour = json.loads((Path(request.checkpoint) / "toy.json").read_text())["colour"]
        images = read_images(request.manifest)
        normals = select(images, request.category, "good", "train")
        size = cfg.model.resolution
        for i in range(request.n_pairs):
            key = pair_key("demo", request.category, request.anomaly_type, i)
            if not is_done(request.out_dir, key):
                seed = pair_seed(toy.seed, request.category, request.anomaly_type, i)
                rng = np.random.default_rng(seed)
                source = str(normals["image_path"].iloc[int(rng.integers(len(normals)))])
                normal = read_rgb(source, size)
                y, x = rng.integers(0, size - toy.side, 2)
                mask = np.zeros((size, size), bool)
                mask[y : y + toy.side, x : x + toy.side] = True
                image = normal.copy()
                image[mask] = colour
                meta = pair_metadata(
                    "demo",
                    request.category,
                    request.anomaly_type,
                    self.name,
                    seed,
                    "square",
                    source,
                    checkpoint_hash="toy",
                    colour=colour,
                    side=toy.side,
                )
                save_pair(request.out_dir, key, image, mask, normal, meta)
            if on_pair is not None:
                on_pair(i + 1, request.n_pairs)
        return write_pairs_manifest(request.out_dir)


class ToyConfig(FactoryConfig):
    """Step 3: the section on the config (here on a subclass; in the package, a field of
    FactoryConfig) and the name among the generators ``generator:`` accepts."""

    generator: Literal["magic", "toy"] = "toy"
    toy: ToySection = pydantic.Field(default_factory=ToySection)


@pytest.fixture
def toy_run(tmp_path, monkeypatch, demo_manifest_path) -> stages.RunRef:
    # step 2: one registry line
    monkeypatch.setitem(registry.GENERATORS, "toy", f"{__name__}:Toy")
    TRAININGS.clear()
    cfg = ToyConfig(toy={"side": 10}, model={"resolution": 64}, generate={"n_pairs": 5})
    ref = stages.RunRef.make(cfg, "toy-v1", tmp_path)
    ref.layout.manifest.parent.mkdir(parents=True)
    shutil.copy(demo_manifest_path, ref.layout.manifest)
    return ref


def test_a_generator_added_by_the_recipe_runs_through_the_stage_functions(toy_run) -> None:
    ref = toy_run
    assert isinstance(registry.get_generator("toy"), Generator)
    checkpoint = stages.prepare(ref, CATEGORY, TYPE)
    assert checkpoint == ref.layout.checkpoint(CATEGORY, TYPE) and TRAININGS
    assert stages.prepare(ref, CATEGORY, TYPE) == checkpoint and len(TRAININGS) == 1  # cached

    path = stages.generate_type(ref, CATEGORY, TYPE, checkpoint)
    assert path == ref.layout.pairs_dir(CATEGORY, TYPE) / "pairs.parquet"
    pairs = read_pairs(path)
    n = candidates_per_type(ref.cfg)  # n_pairs and the extras the gates may drop
    assert len(pairs) == n and sorted(pairs.columns) == sorted(PAIR_COLUMNS)  # the core only
    assert set(pairs["generator"]) == {"toy"} and pairs["seed"].nunique() == n
    colour = json.loads((checkpoint / "toy.json").read_text())["colour"]
    for row in pairs.to_dict("records"):
        assert pair_params(row) == {"colour": colour, "side": 10}  # its options, in params
        image, normal = read_rgb(row["image_path"]), read_rgb(row["normal_path"])
        mask = read_mask(row["mask_path"], source="binary")
        assert mask.sum() == 10 * 10 and (image[mask] == colour).all()
        assert np.array_equal(image[~mask], normal[~mask])  # the normal kept outside

    # a lost pair is made again, to the same bytes (the one seeding scheme)
    before = path.read_bytes()
    lost = pairs["key"].iloc[2]
    record_path(path.parent, lost).unlink()
    assert stages.generate_type(ref, CATEGORY, TYPE, checkpoint).read_bytes() == before
    progress = json.loads(next(ref.layout.progress.glob("*.json")).read_text())
    assert (progress["done"], progress["total"]) == (n, n)


def test_the_toy_section_is_validated_like_every_section() -> None:
    with pytest.raises(pydantic.ValidationError, match="toy.sidee"):
        ToyConfig(toy={"sidee": 3})
    with pytest.raises(pydantic.ValidationError, match="generator"):
        ToyConfig(generator="nope")
