"""great-expectations suites over a pairs manifest, its files and its metrics.

Three tables are validated, each by one Checkpoint that also renders Data Docs
into the version's reports folder:

* **pairs** (one row per pair): unique keys; each file exists and decodes;
  image, mask and normal sizes agree; the mask is non-empty with an area
  fraction inside ``gates.mask_area_min/max``; the metadata is complete.
* **pair_checks** (one row per pair, ``gates/pair_checks.py``): the pixels were
  readable, and every enabled pixel check reaches its ``gates.pair_checks``
  threshold (background kept, anomaly present, mask on the object, no
  memorisation, no near-duplicate).
* **types** (one row per expected anomaly type): the exact pair count; KID and
  IC-LPIPS are finite; the defect regions' KID is not above each reference set's
  (within the tie band of ``gates.type_gates.kid_tie_se``); IC-LPIPS reaches its floor; ``gates.kid_max`` and
  ``gates.ic_lpips_min`` hold where the weights make them comparable.

Every expectation carries ``meta.check`` (a stable name) and results are read
back per anomaly type through ``unexpected_index_list``, so one bad type does
not hide the others' results.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from anomaly_factory.config import GatesSection
from anomaly_factory.manifest import PAIR_COLUMNS

ROLES = ("image", "mask", "normal")
OK = "ok"
DOCS_DIR = "data_docs"
SITE_PREFIX = "anomaly_factory_"
EXAMPLES = 3  # failing keys quoted per reason


@dataclass
class CheckOutcome:
    """One expectation's result, attributed to anomaly types."""

    check: str
    expectation: str
    table: str
    success: bool
    failed_types: dict[str, str] = field(default_factory=dict)  # type_id -> reason


@dataclass
class ExpectationReport:
    checks: list[CheckOutcome]
    data_docs: Path | None  # index.html

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)


# --------------------------------------------------------------------------- tables
def type_id(dataset: str, category: str, anomaly_type: str) -> str:
    return f"{dataset}/{category}/{anomaly_type}"


def _inspect(path: Any, role: str) -> dict[str, Any]:
    """Status, size and (for masks) foreground pixels of one file."""
    out: dict[str, Any] = {f"{role}_status": OK, f"{role}_size": None}
    if path is None or (isinstance(path, float) and np.isnan(path)) or str(path) == "":
        out[f"{role}_status"] = "no_path"
        return out
    if not os.path.isfile(path):
        out[f"{role}_status"] = "missing"
        return out
    try:
        with Image.open(path) as im:
            im.load()
            out[f"{role}_size"] = f"{im.width}x{im.height}"
            if role == "mask":
                fg = int((np.asarray(im.convert("L")) > 0).sum())
                out["mask_pixels"] = fg
                out["mask_area_fraction"] = fg / (im.width * im.height)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        out[f"{role}_status"] = f"undecodable: {type(exc).__name__}"
    return out


def pair_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per pair: metadata (blank strings as null) plus file checks."""
    df = pairs.copy()
    for col in PAIR_COLUMNS:
        if col not in df.columns:
            df[col] = None
    df = df.astype(object).where(df.notna(), None)
    df = df.map(lambda v: None if isinstance(v, str) and not v.strip() else v)
    df["type_id"] = [
        type_id(*(str(r[c]) for c in ("dataset", "category", "anomaly_type")))
        for _, r in df.iterrows()
    ]
    files = [
        {k: v for role in ROLES for k, v in _inspect(row[f"{role}_path"], role).items()}
        for _, row in df.iterrows()
    ]
    checks = pd.DataFrame(files, index=df.index)
    for col in ("mask_pixels", "mask_area_fraction"):
        if col not in checks.columns:
            checks[col] = None
    out = pd.concat([df, checks], axis=1)
    out["mask_pixels"] = pd.to_numeric(out["mask_pixels"], errors="coerce")
    out["mask_area_fraction"] = pd.to_numeric(out["mask_area_fraction"], errors="coerce")
    return out.reset_index(drop=True)


TYPE_COLUMNS = [
    "type_id",
    "n_pairs",
    "kid_x1e3",
    "ic_lpips",
    "kid_region_x1e3",
    "kid_normals_x1e3",
    "kid_cutpaste_x1e3",
    "kid_normals_bound_x1e3",
    "kid_cutpaste_bound_x1e3",
    "ic_lpips_real",
    "ic_lpips_floor",
]


def type_table(
    type_ids: list[str],
    pairs: pd.DataFrame,
    metrics: dict[str, Any],
    ic_lpips_ratio_min: float | None = None,
) -> pd.DataFrame:
    """One row per expected type: pair count and its metrics (None when not finite).

    ``kid_<ref>_bound_x1e3`` is the reference's KID plus the tie band
    (``type_gates.kid_tie_se`` standard errors); ``ic_lpips_floor`` is
    ``ic_lpips_ratio_min`` times the real test anomalies' own IC-LPIPS
    (``ic_lpips_real``); each is null when unknown.
    """
    counts = pairs["type_id"].value_counts() if len(pairs) else pd.Series(dtype=int)
    kid = metrics.get("kid", {}).get("per_type", {})
    lp = metrics.get("ic_lpips", {}).get("per_type", {})
    region = metrics.get("kid_region", {}).get("per_type", {})
    rows = []
    for t in type_ids:
        reg = region.get(t) or {}
        real = (lp.get(t) or {}).get("real_score")
        rows.append(
            {
                "type_id": t,
                "n_pairs": int(counts.get(t, 0)),
                "kid_x1e3": (kid.get(t) or {}).get("kid_x1e3"),
                "ic_lpips": (lp.get(t) or {}).get("score"),
                "kid_region_x1e3": (reg.get("generated") or {}).get("kid_x1e3"),
                "kid_normals_x1e3": (reg.get("normals") or {}).get("kid_x1e3"),
                "kid_cutpaste_x1e3": (reg.get("cutpaste") or {}).get("kid_x1e3"),
                "kid_normals_bound_x1e3": (reg.get("normals") or {}).get("bound_x1e3"),
                "kid_cutpaste_bound_x1e3": (reg.get("cutpaste") or {}).get("bound_x1e3"),
                "ic_lpips_real": real,
                "ic_lpips_floor": (
                    ic_lpips_ratio_min * real
                    if ic_lpips_ratio_min is not None and real is not None
                    else None
                ),
            }
        )
    df = pd.DataFrame(rows, columns=TYPE_COLUMNS)
    for col in TYPE_COLUMNS[2:]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


# --------------------------------------------------------------------------- suites
def pair_expectations(gates: GatesSection) -> list[Any]:
    import great_expectations.expectations as gxe

    required = (
        gates.required_metadata if gates.required_metadata is not None else list(PAIR_COLUMNS)
    )
    exps: list[Any] = [
        gxe.ExpectColumnValuesToBeUnique(column="key", meta={"check": "unique_keys"})
    ]
    exps += [
        gxe.ExpectColumnValuesToBeInSet(
            column=f"{role}_status", value_set=[OK], meta={"check": f"{role}_file_readable"}
        )
        for role in ROLES
    ]
    exps += [
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="image_size",
            column_B=f"{other}_size",
            ignore_row_if="either_value_is_missing",  # a missing file is its own check
            meta={"check": f"size_image_vs_{other}"},
        )
        for other in ("mask", "normal")
    ]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(
            column="mask_pixels", min_value=1, meta={"check": "mask_non_empty"}
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="mask_area_fraction",
            min_value=gates.mask_area_min,
            max_value=gates.mask_area_max,
            meta={"check": "mask_area_fraction"},
        ),
    ]
    exps += [
        gxe.ExpectColumnValuesToNotBeNull(column=col, meta={"check": f"metadata_{col}"})
        for col in required
    ]
    return exps


def pair_check_expectations(gates: GatesSection) -> list[Any]:
    """One expectation per enabled pixel check on the ``pair_checks`` table."""
    import great_expectations.expectations as gxe

    from anomaly_factory.gates import pair_checks as pc

    exps: list[Any] = [
        gxe.ExpectColumnValuesToBeInSet(
            column="status", value_set=[pc.OK], meta={"check": pc.READABLE_CHECK}
        )
    ]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(
            column=b.column, min_value=b.min_value, meta={"check": b.check}
        )
        for b in pc.pair_bounds(gates.pair_checks)
        if b.enabled
    ]
    if gates.pair_checks.duplicate_iou_min is not None:
        exps.append(
            gxe.ExpectColumnValuesToBeNull(
                column="duplicate_of", meta={"check": pc.DUPLICATE_CHECK}
            )
        )
    return exps


def type_expectations(
    gates: GatesSection, expected_per_type: int, absolute_off: dict[str, str | None] | None = None
) -> list[Any]:
    """Type-level expectations; ``absolute_off`` says which absolute thresholds are off
    and why (``type_gates.absolute_gates_apply``); None applies them as configured."""
    import great_expectations.expectations as gxe

    off = absolute_off or {}
    exps: list[Any] = [
        gxe.ExpectColumnValuesToBeBetween(
            column="n_pairs",
            min_value=expected_per_type,
            max_value=expected_per_type,
            meta={"check": "pair_count"},
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="kid_x1e3", meta={"check": "kid_finite"}),
        gxe.ExpectColumnValuesToNotBeNull(column="ic_lpips", meta={"check": "ic_lpips_finite"}),
    ]
    if gates.type_gates.kid_references:
        exps.append(
            gxe.ExpectColumnValuesToNotBeNull(
                column="kid_region_x1e3", meta={"check": "kid_region_finite"}
            )
        )
    exps += [
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A=f"kid_{ref}_bound_x1e3",
            column_B="kid_region_x1e3",
            or_equal=False,
            ignore_row_if="either_value_is_missing",  # undefined KID is kid_region_finite's
            meta={"check": f"kid_vs_{ref}"},
        )
        for ref in gates.type_gates.kid_references
    ]
    if gates.type_gates.ic_lpips_ratio_min is not None:
        exps.append(
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="ic_lpips",
                column_B="ic_lpips_floor",
                or_equal=True,
                ignore_row_if="either_value_is_missing",
                meta={"check": "ic_lpips_vs_real"},
            )
        )
    if gates.kid_max is not None and not off.get("kid_max"):
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="kid_x1e3", max_value=gates.kid_max, meta={"check": "kid_max"}
            )
        )
    if gates.ic_lpips_min is not None and not off.get("ic_lpips_min"):
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="ic_lpips", min_value=gates.ic_lpips_min, meta={"check": "ic_lpips_min"}
            )
        )
    return exps


# --------------------------------------------------------------------------- running
def new_context() -> Any:
    """An in-memory great-expectations context without analytics or progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def _add_docs_site(ctx: Any, docs_dir: Path) -> str:
    name = SITE_PREFIX + uuid.uuid4().hex[:8]
    ctx.add_data_docs_site(
        site_name=name,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return name


def _run_checkpoint(
    ctx: Any, table: str, df: pd.DataFrame, exps: list[Any], index_cols: list[str], site: str
) -> Any:
    import great_expectations as gx

    token = uuid.uuid4().hex[:8]  # a shared context may validate many versions
    source = ctx.data_sources.add_pandas(f"{table}_{token}")
    batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"anomaly_factory.{table}.{token}"))
    for exp in exps:
        suite.add_expectation(exp)
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{table}_{token}", data=batch, suite=suite)
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name=f"anomaly_factory_{table}_{token}",
            validation_definitions=[vd],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[site])],
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": index_cols,
            },
        )
    )
    return checkpoint.run(batch_parameters={"dataframe": df})


def _short(value: Any) -> str:
    """A value as a reason quotes it: numbers to 4 significant digits, no numpy reprs."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _attribute(result: Any, table: str) -> list[CheckOutcome]:
    """Per expectation, the failing types with a short reason quoting example rows."""
    outcomes = []
    for vr in result.run_results.values():
        for r in vr.results:
            cfg = r.expectation_config
            check = (cfg.meta or {}).get("check", cfg.type)
            rows = (r.result or {}).get("unexpected_index_list") or []
            per_type: dict[str, list[str]] = {}
            for row in rows:
                values = ", ".join(
                    f"{k}={_short(v)}" for k, v in row.items() if k not in ("type_id", "key")
                )
                label = row.get("key", row.get("type_id"))
                per_type.setdefault(str(row.get("type_id")), []).append(f"{label}: {values}")
            failed = {
                t: f"{check}: {len(ex)} unexpected ({'; '.join(ex[:EXAMPLES])})"
                for t, ex in per_type.items()
            }
            if not r.success and not failed:  # a table-level failure without row indices
                failed = {"*": f"{check}: failed ({r.exception_info or r.result})"}
            outcomes.append(CheckOutcome(check, cfg.type, table, bool(r.success), failed))
    return outcomes


def run_expectations(
    pairs: pd.DataFrame,
    types: pd.DataFrame,
    gates: GatesSection,
    expected_per_type: int,
    out_dir: Path,
    context: Any | None = None,
    pair_checks: pd.DataFrame | None = None,
    absolute_off: dict[str, str | None] | None = None,
) -> ExpectationReport:
    """Validate the tables as Checkpoints; Data Docs go to ``out_dir/data_docs``.

    ``pair_checks`` (from ``gates.pair_checks``) is validated when given.
    """
    ctx = context if context is not None else new_context()
    docs_dir = Path(out_dir) / DOCS_DIR
    site = _add_docs_site(ctx, docs_dir)
    checks = []
    pair_result = _run_checkpoint(
        ctx, "pairs", pairs, pair_expectations(gates), ["key", "type_id"], site
    )
    checks += _attribute(pair_result, "pairs")
    if pair_checks is not None:
        table = pair_checks.drop(columns=["reasons", "passed"], errors="ignore")
        result = _run_checkpoint(
            ctx, "pair_checks", table, pair_check_expectations(gates), ["key", "type_id"], site
        )
        checks += _attribute(result, "pair_checks")
    type_result = _run_checkpoint(
        ctx,
        "types",
        types,
        type_expectations(gates, expected_per_type, absolute_off),
        ["type_id"],
        site,
    )
    checks += _attribute(type_result, "types")
    index = docs_dir / "index.html"
    return ExpectationReport(checks, index if index.is_file() else None)
