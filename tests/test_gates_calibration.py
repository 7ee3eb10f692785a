"""Gate calibration: the demo's oracle passes every gate; each saboteur fails its check.

The oracle (``generators/oracle.py``) paints true defects on train normals, so a gate
it fails is miscalibrated. Each saboteur (``tests/gates_pairs.py``) breaks the oracle's
pairs in one way; the check meant for it must fail on every broken pair, named in
``reasons``, and nothing else may fail beyond the collateral listed here with its
cause. The table of outcomes is printed (``-s``) and kept in bench/RESULTS.md:

    .venv/bin/python -m pytest tests/test_gates_calibration.py -s -m slow
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from anomaly_factory.gates.expectations import pair_table, type_table
from anomaly_factory.gates.pair_checks import compute_pair_checks, failure_counts
from anomaly_factory.gates.run import compute_metrics, read_pairs_lenient, run_gates
from anomaly_factory.manifest import read_images
from tests.gates_pairs import SABOTEURS, build_pairs, sabotage, tiny_config

CATEGORIES = ("carpet_demo", "tile_demo", "nut_demo", "bar_demo")
PER_TYPE = 6  # the tiny profile's generate.n_pairs
# table columns: one question each, answered by one or two checks
GROUPS = {
    "background kept": ("background_psnr", "background_ssim"),
    "anomaly present": ("anomaly_change", "anomaly_concentration"),
    "mask on object": ("mask_on_object",),
    "no memorisation": ("no_memorisation",),
    "no duplicate": ("no_duplicate",),
}
TYPE_GATES = ("kid_vs_normals", "kid_vs_cutpaste", "ic_lpips_vs_real")
MEANT = {
    "identity": {"anomaly present", "kid_vs_normals"},
    "whole-image blur": {"background kept"},
    "defect outside mask": {"anomaly present"},
    "mask off object": {"mask on object"},
    "few-shot copy": {"no memorisation"},
    "same image repeated": {"no duplicate", "ic_lpips_vs_real"},
}
COLLATERAL = {
    "whole-image blur": {"anomaly present"},  # the blur also changes the outside: concentration
    "defect outside mask": {"background kept"},  # the misplaced defect is a background change
}
# type gates judge whole distributions: a saboteur may fail them too (not asserted)


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def oracle(demo_manifest_path, tmp_path_factory, cfg) -> Path:
    out = tmp_path_factory.mktemp("oracle")
    return build_pairs(demo_manifest_path, out, PER_TYPE, CATEGORIES, cfg)


@pytest.fixture(scope="module")
def sabotaged(oracle, demo_manifest_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saboteurs")
    return {
        name: sabotage(name, oracle, demo_manifest_path, root / name.replace(" ", "_"))
        for name in SABOTEURS
    }


def type_failures(cfg, metrics: dict, pairs_path: Path) -> dict[str, int]:
    """Types failing each self-calibrating type gate (the comparisons the expectations make:
    below the reference's tie bound; IC-LPIPS at least its floor)."""
    table = pair_table(read_pairs_lenient(pairs_path))
    types = type_table(metrics["types"], table, metrics, cfg.gates.type_gates.ic_lpips_ratio_min)
    fails = dict.fromkeys(TYPE_GATES, 0)
    for row in types.itertuples(index=False):
        for ref in ("normals", "cutpaste"):
            ours, theirs = row.kid_region_x1e3, getattr(row, f"kid_{ref}_bound_x1e3")
            fails[f"kid_vs_{ref}"] += not (math.isnan(ours) or math.isnan(theirs)) and not (
                theirs > ours
            )
        floor = row.ic_lpips_floor
        fails["ic_lpips_vs_real"] += not math.isnan(floor) and not row.ic_lpips >= floor
    return fails


def outcome_row(cfg, pairs_path: Path, manifest_path: Path, metrics: dict | None) -> dict:
    checks = compute_pair_checks(cfg, read_pairs_lenient(pairs_path), read_images(manifest_path))
    counts = failure_counts(checks)
    row: dict = {"pairs": len(checks)}
    for group, names in GROUPS.items():
        failed = checks["reasons"].str.contains("|".join(f"{n}:" for n in names), regex=True)
        row[group] = int(failed.sum())
    row["types"] = checks["type_id"].nunique()
    row.update(type_failures(cfg, metrics, pairs_path) if metrics else dict.fromkeys(TYPE_GATES))
    row["_counts"] = counts
    return row


def print_table(rows: dict[str, dict]) -> None:
    cols = [*GROUPS, *TYPE_GATES]
    head = "| saboteur | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, row in rows.items():
        cells = []
        for c in cols:
            n = row["pairs"] if c in GROUPS else row["types"]
            value = row[c]
            mark = "**" if name in MEANT and c in MEANT[name] else ""
            cells.append("n/a" if value is None else f"{mark}{value}/{n}{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\nfailing pairs (pixel checks) / failing types (type gates); bold = the check meant")
    print("\n".join(lines))


def check_saboteur(name: str, row: dict, pairs: pd.DataFrame) -> None:
    meant = MEANT[name]
    allowed = meant | COLLATERAL.get(name, set())
    for group in GROUPS:
        if group in meant:
            # every broken pair fails; a repeat leaves the first pair of each type alone
            want = row["pairs"] - (row["types"] if name == "same image repeated" else 0)
            assert row[group] == want, f"{name}: {group} failed {row[group]}/{row['pairs']}"
        elif group not in allowed:
            assert row[group] == 0, f"{name}: {group} failed {row[group]} pairs, not meant"
    for gate in TYPE_GATES:
        if gate in meant and row[gate] is not None:
            assert row[gate] == row["types"], f"{name}: {gate} failed {row[gate]}/{row['types']}"


# --------------------------------------------------------------------------- the oracle
def test_oracle_passes_every_pair_check_and_type_gate(
    cfg, oracle, demo_manifest_path, tmp_path
) -> None:
    result = run_gates(cfg, oracle, demo_manifest_path, tmp_path, PER_TYPE)
    failed = {t: g.reasons for t, g in result.types.items() if not g.passed}
    assert result.passed and not failed, failed
    assert len(result.types) == 2 * len(CATEGORIES)
    checks = pd.read_parquet(tmp_path / "pair_checks.parquet")
    assert len(checks) == PER_TYPE * 2 * len(CATEGORIES) and checks["passed"].all()
    assert (checks["bg_psnr"] == math.inf).all() and (checks["bg_ssim"] == 1.0).all()
    gates = json.loads((tmp_path / "gates.json").read_text())
    state = {g["gate"]: (g["on"], g["why_off"]) for g in gates["gates"]}
    assert all(on for name, (on, _) in state.items() if name not in ("kid_max", "ic_lpips_min"))
    assert state["kid_max"] == (False, "gates.kid_max is null")  # tiny: off, and says why
    for tid, gate in gates["types"].items():
        v = gate["values"]
        assert v["kid_region_x1e3"] < v["kid_normals_x1e3"], tid  # beats doing nothing outright
        assert v["kid_region_x1e3"] < v["kid_cutpaste_bound_x1e3"], tid
        assert gate["pairs"]["passed"] == PER_TYPE


# --------------------------------------------------------------------------- saboteurs
def meant_type_gate(cfg, name: str, pairs_path: Path, manifest_path: Path) -> dict:
    """Only the type gate meant for a saboteur, from the functions ``compute_metrics``
    uses (the full metrics of every saboteur are the slow table's)."""
    from anomaly_factory.gates.run import _real_table, region_kids
    from anomaly_factory.images import read_rgb
    from anomaly_factory.metrics.features import load_extractor
    from anomaly_factory.metrics.ic_lpips import ic_lpips, load_lpips

    g = cfg.gates
    pairs = read_pairs_lenient(pairs_path)
    pairs["type_id"] = pairs["dataset"] + "/" + pairs["category"] + "/" + pairs["anomaly_type"]
    images = read_images(manifest_path)
    fails = dict.fromkeys(TYPE_GATES)
    if name == "identity":
        extractor = load_extractor(g.kid.extractor, g.kid.weights, g.kid.resolution, g.kid.seed)
        fails["kid_vs_normals"] = 0
        for tid, rows in pairs.groupby("type_id"):
            kids = region_kids(cfg, extractor, rows, _real_table(images, tid, ("fewshot", "test")))
            fails["kid_vs_normals"] += not (
                kids["normals"]["bound_x1e3"] > kids["generated"]["kid_x1e3"]
            )
    if name == "same image repeated":
        model, _ = load_lpips(g.lpips.net, g.lpips.pretrained, g.lpips.weights, g.lpips.seed)
        fails["ic_lpips_vs_real"] = 0

        def load(table: pd.DataFrame) -> list:
            return [read_rgb(p) for p in sorted(table["image_path"])]

        for tid, rows in pairs.groupby("type_id"):
            shots = load(_real_table(images, tid, ("fewshot",)))
            real = load(_real_table(images, tid, ("test",)))
            ours = ic_lpips(model, load(rows), shots, g.lpips.resolution, g.lpips.max_per_cluster)
            theirs = ic_lpips(model, real, shots, g.lpips.resolution, g.lpips.max_per_cluster)
            floor = g.type_gates.ic_lpips_ratio_min * theirs.score
            fails["ic_lpips_vs_real"] += not ours.score >= floor
    return fails


@pytest.mark.parametrize("name", list(SABOTEURS))
def test_saboteur_fails_the_check_meant_for_it(name, cfg, sabotaged, demo_manifest_path) -> None:
    path = sabotaged[name]
    row = outcome_row(cfg, path, demo_manifest_path, None)
    row.update(meant_type_gate(cfg, name, path, demo_manifest_path))
    print_table({name: row})
    check_saboteur(name, row, pd.read_parquet(path))
    checks = compute_pair_checks(cfg, read_pairs_lenient(path), read_images(demo_manifest_path))
    names = {n for g in MEANT[name] if g in GROUPS for n in GROUPS[g]}
    broken = checks[~checks["passed"]]
    assert len(broken) and broken["reasons"].str.contains("|".join(names)).all()  # named


@pytest.mark.slow
def test_calibration_table(cfg, oracle, sabotaged, demo_manifest_path) -> None:
    """Every saboteur x every check, type gates included (about a minute on 2 cores)."""
    rows = {"oracle": outcome_row(cfg, oracle, demo_manifest_path, compute_metrics(
        cfg, oracle, demo_manifest_path))}  # fmt: skip
    for name, path in sabotaged.items():
        metrics = compute_metrics(cfg, path, demo_manifest_path)
        rows[name] = outcome_row(cfg, path, demo_manifest_path, metrics)
    print_table(rows)
    assert all(v == 0 for k, v in rows["oracle"].items() if k in (*GROUPS, *TYPE_GATES))
    for name in SABOTEURS:
        check_saboteur(name, rows[name], pd.read_parquet(sabotaged[name]))
