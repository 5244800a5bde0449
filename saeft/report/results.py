"""Evaluation results as tables of numbers: the data layer under the aggregate stage.

Reads only the ``evaluate`` outputs and the fine-tuning ``train.json`` on disk (never the MLflow
store) and builds

- the tidy long table, one row per eval result (:func:`load_metrics`; an evaluation job's bundle
  holds one per eval set, :func:`eval_records`), written as Parquet: the source of everything else;
- a per (model, dataset, method) summary: mean and std over seeds of every eval set plus the
  OOD average (:func:`summarize`), WiSE-FT at its reported alpha (:func:`reported_results`);
- the WiSE-FT curves over alpha (:func:`wiseft_curves`);
- the training logs by dataset (:func:`read_training_logs`).

:mod:`saeft.report.paper_tables`, :mod:`saeft.report.reference` and :mod:`saeft.report.figures` build on these;
:mod:`saeft.stages.aggregate` writes them all. Numeric columns stay in the metric's own units
(fractions); ``percent`` only changes how values are shown (:func:`format_parts`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saeft.config.aggregate import AggregateConfig
from saeft.infra.environment import ENVIRONMENT_KEY
from saeft.infra.io import read_json
from saeft.plan.runs import wiseft_base

logger = logging.getLogger(__name__)

EVALS_KEY = "evals"
"""The key of an evaluation bundle (``saeft evaluate``'s output) holding a record per eval set."""

OOD_AVG = "OOD avg"
"""Name of the summary column holding the OOD average (per seed mean over OOD sets, then over seeds)."""

KEY_COLUMNS = ("model", "dataset", "method")
"""A summary row is one (model, dataset, method)."""

METRICS_COLUMNS = (
    "study", "model", "dataset", "method", "variant", "seed", "alpha", "evalset", "role", "metric", "value", "n",
)
"""Columns of the tidy long table, in order; every eval record carries these keys (``alpha``, the
WiSE-FT mixing weight, only for interpolated models: null elsewhere; ``variant``, the fine-tuned
variant (saeft.plan.variants; the base's for WiSE-FT, ``zeroshot`` for zero-shot), defaults to the
method)."""

OPTIONAL_KEYS = ("alpha", "variant")

ROLES = ("id", "ood", "transfer", "val")
"""Roles of eval sets: ID test, shift, transfer set, and the ID validation split that variants are
selected on (never in a table's cells)."""

UNIQUE_KEY = ("model", "dataset", "method", "variant", "seed", "alpha", "evalset")
"""At most one eval record per combination of these."""

_STR_KEYS = ("study", "model", "dataset", "method", "variant", "evalset", "metric")



# --------------------------------------------------------------------------------------------
# Tidy table
# --------------------------------------------------------------------------------------------


def load_metrics(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Read eval JSON files into the tidy long table, one row per eval record (:func:`eval_records`:
    every eval set of a bundle, in its order), files in the given order.

    Columns: :data:`METRICS_COLUMNS`; ``seed`` is nullable ``Int64`` (null for zero-shot),
    ``value`` float, ``n`` int64. Raises ``ValueError`` naming the file (and eval set) for a
    missing or invalid key, and naming them for rows that repeat a :data:`UNIQUE_KEY`.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no evaluation files given")
    labelled = [item for path in paths for item in eval_records(path)]
    labels = [label for label, _ in labelled]
    records = [_read_record(label, data) for label, data in labelled]

    df = pd.DataFrame.from_records(records, columns=list(METRICS_COLUMNS))
    df["seed"] = pd.array([r["seed"] for r in records], dtype="Int64")
    df["alpha"] = df["alpha"].astype("float64")
    df["value"] = df["value"].astype("float64")
    df["n"] = df["n"].astype("int64")

    dup = df.duplicated(subset=list(UNIQUE_KEY), keep=False)
    if dup.any():
        groups: dict[tuple, list[str]] = {}
        for idx in np.flatnonzero(dup.to_numpy()):
            row = df.iloc[idx]
            key = tuple("null" if pd.isna(row[k]) else f"{row[k]:g}" if k == "alpha" else str(row[k]) for k in UNIQUE_KEY)
            groups.setdefault(key, []).append(labels[idx])
        lines = [f"  {'/'.join(key)}: {', '.join(files)}" for key, files in groups.items()]
        raise ValueError(
            f"duplicate evaluation results for ({', '.join(UNIQUE_KEY)}):\n" + "\n".join(lines)
        )
    logger.info("loaded %d evaluation results", len(df))
    return df


def eval_records(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The eval records of one JSON file, each with the label errors name it by: an evaluation
    bundle (:data:`EVALS_KEY`: eval set -> record, as ``saeft evaluate`` writes it) gives each
    record in order, labelled ``<path>[<eval set>]``, with the bundle's ``environment``; a file
    holding one record gives it, labelled by the path."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if EVALS_KEY not in data:
        return [(str(path), data)]
    evals = data[EVALS_KEY]
    if not isinstance(evals, dict) or not evals:
        raise ValueError(f"{path}: key '{EVALS_KEY}' must be a non-empty object (eval set -> record)")
    out = []
    for name, record in evals.items():
        label = f"{path}[{name}]"
        if not isinstance(record, dict):
            raise ValueError(f"{label}: expected a JSON object, got {type(record).__name__}")
        if record.get("evalset") != name:
            raise ValueError(f"{label}: the record is of eval set {record.get('evalset')!r}")
        if ENVIRONMENT_KEY in data and ENVIRONMENT_KEY not in record:
            record = {**record, ENVIRONMENT_KEY: data[ENVIRONMENT_KEY]}
        out.append((label, record))
    return out


def _read_record(path: str, data: dict[str, Any]) -> dict[str, Any]:
    """One eval record as a validated flat record; every error names ``path`` (its label)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in METRICS_COLUMNS:
        if key not in data and key not in OPTIONAL_KEYS:
            raise ValueError(f"{path}: missing key '{key}'")
    if data.get("variant") is None and isinstance(data.get("method"), str):
        data = {**data, "variant": data["method"]}
    for key in _STR_KEYS:
        value = data[key]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: key '{key}' must be a non-empty string, got {value!r}")
    seed = data["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{path}: key 'seed' must be an integer or null, got {seed!r}")
    if data["role"] not in ROLES:
        raise ValueError(f"{path}: key 'role' must be one of {', '.join(ROLES)}, got {data['role']!r}")
    value = data["value"]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ValueError(f"{path}: key 'value' must be a fraction in [0, 1], got {value!r}")
    n = data["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{path}: key 'n' must be a positive integer, got {n!r}")
    alpha = data.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0):
        raise ValueError(f"{path}: key 'alpha' must be null or in [0, 1], got {alpha!r}")
    return {key: data.get(key) for key in METRICS_COLUMNS}


# --------------------------------------------------------------------------------------------
# Reported rows and the WiSE-FT curve
# --------------------------------------------------------------------------------------------


def reported_results(df: pd.DataFrame, cfg: AggregateConfig) -> pd.DataFrame:
    """The rows the tables show: every result without an alpha, and WiSE-FT at the reported alpha.

    Raises ``ValueError`` naming the method when, without ``cfg.wiseft_alpha``, a method carries
    several alphas (the table would not know which to show).
    """
    has_alpha = df["alpha"].notna()
    if cfg.wiseft_alpha is not None:
        keep = ~has_alpha | np.isclose(df["alpha"].fillna(-1.0), cfg.wiseft_alpha)
        return df[keep]
    several = df[has_alpha].groupby("method")["alpha"].nunique()
    if (several > 1).any():
        raise ValueError(
            f"method(s) {', '.join(several[several > 1].index)} have results at several alphas; "
            "set aggregate wiseft_alpha to the one the tables report"
        )
    return df

def wiseft_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, dataset, WiSE-FT method, alpha, evalset): mean and std over seeds of every
    curve point, with alpha 0 the zero-shot model and alpha 1 the base fine-tuned method where
    the grid did not evaluate those ends itself.

    Columns: model, dataset, method, alpha, evalset, role, mean, std, n_seeds; sorted by alpha.
    Empty when there is no WiSE-FT result.
    """
    columns = ["model", "dataset", "method", "alpha", "evalset", "role", "mean", "std", "n_seeds"]
    parts = []
    for method in df.loc[df["alpha"].notna(), "method"].unique():
        base = wiseft_base(method)
        points = [df[df["method"] == method]]
        evaluated = set(points[0]["alpha"])
        # The ends, unless the grid evaluated them itself (alpha 0 and 1 in methods.wiseft.alphas).
        if base is not None and 1.0 not in evaluated:
            points.append(df[df["method"] == base].assign(alpha=1.0))
        if 0.0 not in evaluated:
            points.append(df[df["method"] == "zeroshot"].assign(alpha=0.0))
        parts.append(pd.concat(points).assign(method=method))
    if not parts:
        return pd.DataFrame(columns=columns)
    stats = (
        pd.concat(parts)
        .groupby(["model", "dataset", "method", "alpha", "evalset", "role"], sort=False)["value"]
        .agg(mean="mean", std="std", n_seeds="count")
        .reset_index()
    )
    return stats.sort_values(["model", "dataset", "method", "alpha"], kind="stable")[columns].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def summarize(df: pd.DataFrame, cfg: AggregateConfig) -> pd.DataFrame:
    """Mean and std over seeds per (model, dataset, method), one row each.

    Columns, in order: ``model``, ``dataset``, ``method``, ``label`` (display name), ``metric``
    (``/``-joined if eval sets differ), ``id_evalsets`` (``, ``-joined ID eval sets of the dataset),
    ``n_seeds``; then for every value column C — ID eval sets, then OOD eval sets in order of first
    appearance, then :data:`OOD_AVG`, then transfer eval sets (role 'transfer', outside the average) — the numeric ``"C mean"`` and ``"C std"`` (fractions, std with
    ddof=1, NaN for a single seed); then the formatted cells, one column named C each
    (``"83.4 ± 1.2"``, the mean alone when std is NaN, ``""`` when there is no value).

    ``OOD avg`` is, per seed, the mean over the dataset's OOD eval sets (NaN for a seed missing one
    of them, so no average silently covers fewer sets), then mean and std over seeds.
    Rows: (model, dataset) in order of first appearance, methods in the configured order.
    """
    df = reported_results(df, cfg)
    if df.empty:
        raise ValueError("no evaluation results to summarize")
    id_cols: list[str] = []
    ood_cols: list[str] = []
    transfer_cols: list[str] = []
    rows: list[dict[str, Any]] = []

    for (model, dataset), group in df.groupby(["model", "dataset"], sort=False):
        id_sets, ood_sets, transfer_sets = _evalsets_by_role(group, model, dataset)
        id_cols += [e for e in id_sets if e not in id_cols]
        ood_cols += [e for e in ood_sets if e not in ood_cols]
        transfer_cols += [e for e in transfer_sets if e not in transfer_cols]
        if not ood_sets:
            logger.warning("%s/%s: no OOD eval sets, so no OOD average", model, dataset)
        metric = "/".join(group["metric"].unique())
        for method in sorted(group["method"].unique(), key=cfg.method_sort_key):
            wide = _per_seed(group[group["method"] == method], id_sets, ood_sets, transfer_sets, f"{model}/{dataset}/{method}")
            row: dict[str, Any] = {
                "model": model,
                "dataset": dataset,
                "method": method,
                "label": cfg.label(method),
                "metric": metric,
                "id_evalsets": ", ".join(id_sets),
                "n_seeds": len(wide),
            }
            for col in wide.columns:
                values = wide[col].dropna()
                row[f"{col} mean"] = values.mean() if len(values) else np.nan
                row[f"{col} std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            rows.append(row)

    value_cols = id_cols + ood_cols + [OOD_AVG] + transfer_cols
    numeric = [f"{c} {stat}" for c in value_cols for stat in ("mean", "std")]
    head = ["model", "dataset", "method", "label", "metric", "id_evalsets", "n_seeds"]
    summary = pd.DataFrame(rows).reindex(columns=head + numeric)
    summary[numeric] = summary[numeric].astype("float64")
    summary["n_seeds"] = summary["n_seeds"].astype("int64")
    for col in value_cols:
        summary[col] = [
            format_cell(m, s, cfg) for m, s in zip(summary[f"{col} mean"], summary[f"{col} std"])
        ]
    return summary


def _evalsets_by_role(group: pd.DataFrame, model: str, dataset: str) -> tuple[list[str], list[str], list[str]]:
    """The (ID, OOD, transfer) eval sets of one (model, dataset), in order of first appearance;
    a ValueError names an eval set that appears with more than one role."""
    roles = group.drop_duplicates(["evalset", "role"])
    clash = roles["evalset"][roles["evalset"].duplicated()]
    if len(clash):
        raise ValueError(
            f"{model}/{dataset}: eval set(s) {', '.join(map(str, clash.unique()))} "
            "appear with more than one role"
        )
    role_of = dict(zip(roles["evalset"], roles["role"]))
    return tuple([e for e, r in role_of.items() if r == role] for role in ("id", "ood", "transfer"))  # type: ignore[return-value]


def _per_seed(sub: pd.DataFrame, id_sets: list[str], ood_sets: list[str], transfer_sets: list[str], key: str) -> pd.DataFrame:
    """One method's values with seeds as rows and eval sets as columns (ID, OOD, :data:`OOD_AVG`,
    then transfer sets, which stay outside the average)."""
    # Seeds as the row index; a null seed (zero-shot) needs a placeholder to index by.
    wide = (
        sub.assign(_seed=sub["seed"].fillna(-1).astype("int64"))
        .set_index(["_seed", "evalset"])["value"]
        .unstack("evalset")
        .reindex(columns=id_sets + ood_sets + transfer_sets)
    )
    if ood_sets:
        per_seed_ood = wide[ood_sets].mean(axis=1, skipna=False)
        if per_seed_ood.isna().any():
            logger.warning(
                "%s: %d seed(s) lack an OOD eval set; left out of the OOD average",
                key, int(per_seed_ood.isna().sum()),
            )
    else:
        per_seed_ood = pd.Series(np.nan, index=wide.index)
    wide.insert(len(id_sets) + len(ood_sets), OOD_AVG, per_seed_ood)  # transfer sets stay outside it
    return wide


def value_columns(summary: pd.DataFrame) -> list[str]:
    """The summary's value columns (eval sets, then ``OOD avg``), in display order."""
    cols = set(summary.columns)
    return [c for c in summary.columns if f"{c} mean" in cols and f"{c} std" in cols]


def format_parts(mean: float, std: float, cfg: AggregateConfig, signed: bool = False) -> tuple[str, str]:
    """(mean, std) in display units, ``""`` for a missing one; ``signed`` shows a + on positive
    means (differences). A value that rounds to zero never shows as -0.0."""
    if mean is None or pd.isna(mean):
        return "", ""
    scale = cfg.scale_and_unit()[0]
    value = round(mean * scale, cfg.decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = f"{value:{'+' if signed else ''}.{cfg.decimals}f}"
    return text, "" if std is None or pd.isna(std) else f"{std * scale:.{cfg.decimals}f}"


def format_cell(mean: float, std: float, cfg: AggregateConfig) -> str:
    """``"mean ± std"`` in display units; the mean alone if std is NaN; ``""`` if mean is NaN."""
    text, spread = format_parts(mean, std, cfg)
    return f"{text} ± {spread}" if spread else text


def read_training_logs(paths: Iterable[str | os.PathLike]) -> dict[str, list[dict[str, Any]]]:
    """``train.json`` files by dataset; each must hold ``dataset``, ``config.method``, ``seed`` and
    a ``history`` list (errors name the file)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("history"), list):
            raise ValueError(f"{path}: expected a fine-tuning summary with a 'history' list")
        if not isinstance(data.get("config"), dict) or "method" not in data["config"] or "dataset" not in data:
            raise ValueError(f"{path}: missing 'dataset' or 'config.method'")
        runs.setdefault(str(data["dataset"]), []).append(data)
    return runs


def read_selections(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """``selection.json`` files (the ``select_variants`` stage's) by dataset (errors name the file)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or "dataset" not in data:
            raise ValueError(f"{path}: expected a selection with 'dataset' and 'methods'")
        out[str(data["dataset"])] = data
    return out
