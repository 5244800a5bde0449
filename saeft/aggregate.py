"""Aggregate evaluation JSON into tables and figures (stage ``aggregate_tables``).

Reads only the ``evaluate`` outputs on disk (never the MLflow store), builds

- a tidy long table, one row per eval JSON (:func:`load_metrics`),
- a per (model, dataset, method) summary: mean and std over seeds for every eval set plus the
  OOD average (:func:`summarize`),
- a Markdown table (:func:`to_markdown`) and an ID-vs-OOD scatter plot (:func:`plot_id_vs_ood`),

and writes them atomically with :func:`run`. Numeric summary columns stay in the metric's own units
(fractions); ``percent`` only changes how values are shown (formatted cells, tables, figure axes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from saeft.config import StageConfig, require
from saeft.io import atomic_path, read_json

logger = logging.getLogger(__name__)

# Output file names, so the Snakemake rule can declare exactly what run() writes.
METRICS_PARQUET = "metrics.parquet"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
ID_VS_OOD_PNG = "id_vs_ood.png"
ID_VS_OOD_PDF = "id_vs_ood.pdf"
TABLE_FILES = (METRICS_PARQUET, SUMMARY_CSV, SUMMARY_MD)
FIGURE_FILES = (ID_VS_OOD_PNG, ID_VS_OOD_PDF)

OOD_AVG = "OOD avg"
"""Name of the summary column holding the OOD average (per seed mean over OOD sets, then over seeds)."""

KEY_COLUMNS = ("model", "dataset", "method")
"""A summary row is one (model, dataset, method)."""

METRICS_COLUMNS = (
    "study", "model", "dataset", "method", "seed", "evalset", "role", "metric", "value", "n",
)
"""Columns of the tidy long table, in order; also the keys every eval JSON must carry."""

UNIQUE_KEY = ("model", "dataset", "method", "seed", "evalset")
"""At most one eval JSON per combination of these."""

_STR_KEYS = ("study", "model", "dataset", "method", "evalset", "metric")

DEFAULT_METHOD_ORDER = [
    "zeroshot", "lp", "ft", "lpft", "wiseft", "l2sp", "feat_mse", "feat_l1", "ldifs", "flyp",
    "sae_sparse", "sae_add", "saeft",
]
DEFAULT_METHOD_LABELS = {
    "zeroshot": "Zero-shot",
    "lp": "LP",
    "ft": "FT",
    "lpft": "LP-FT",
    "wiseft": "WiSE-FT",
    "l2sp": "L2-SP",
    "feat_mse": "Feature MSE",
    "feat_l1": "Feature L1",
    "ldifs": "LDIFS",
    "flyp": "FLYP",
    "sae_sparse": "SAE sparse",
    "sae_add": "SAE add",
    "saeft": "SAE-FT",
}
DEFAULT_METRIC_LABELS = {
    "top1": "top-1 accuracy",
    "macro_f1": "macro-F1",
    "worst_region": "worst-region accuracy",
}


@dataclasses.dataclass
class AggregateConfig(StageConfig):
    """How results are ordered, labelled and formatted in tables and figures."""

    method_order: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHOD_ORDER))
    """Display order of methods; methods not listed come after these, alphabetically."""

    method_labels: dict[str, str] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_METHOD_LABELS)
    )
    """Display name per method; a method without an entry is shown by its name."""

    metric_labels: dict[str, str] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_METRIC_LABELS)
    )
    """Display name per metric (table header, axis labels); default: the metric's name."""

    percent: bool = True
    """Show values ×100 (tables, figure axes); the numeric summary columns stay fractions."""

    decimals: int = 1
    """Decimals shown for means and stds in formatted cells."""

    def __post_init__(self) -> None:
        require(isinstance(self.decimals, int) and self.decimals >= 0, "decimals", "must be >= 0")
        require(
            len(set(self.method_order)) == len(self.method_order),
            "method_order",
            "must not list a method twice",
        )
        require(
            all(isinstance(v, str) and v for v in self.method_labels.values()),
            "method_labels",
            "labels must be non-empty strings",
        )

    def label(self, method: str) -> str:
        """Display name of ``method``."""
        return self.method_labels.get(method, method)

    def metric_label(self, metric: str) -> str:
        """Display name of ``metric``."""
        return self.metric_labels.get(metric, metric)

    def method_sort_key(self, method: str) -> tuple[int, str]:
        """Sort key: listed methods in their order, then the others alphabetically."""
        try:
            return (self.method_order.index(method), "")
        except ValueError:
            return (len(self.method_order), method)


# --------------------------------------------------------------------------------------------
# Tidy table
# --------------------------------------------------------------------------------------------


def load_metrics(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Read eval JSON files into the tidy long table, one row per file, in the given order.

    Columns: :data:`METRICS_COLUMNS`; ``seed`` is nullable ``Int64`` (null for zero-shot),
    ``value`` float, ``n`` int64. Raises ``ValueError`` naming the file for a missing or invalid
    key, and naming the files for rows that repeat a :data:`UNIQUE_KEY`.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no evaluation files given")
    records = [_read_record(path) for path in paths]

    df = pd.DataFrame.from_records(records, columns=list(METRICS_COLUMNS))
    df["seed"] = pd.array([r["seed"] for r in records], dtype="Int64")
    df["value"] = df["value"].astype("float64")
    df["n"] = df["n"].astype("int64")

    dup = df.duplicated(subset=list(UNIQUE_KEY), keep=False)
    if dup.any():
        groups: dict[tuple, list[str]] = {}
        for idx in np.flatnonzero(dup.to_numpy()):
            row = df.iloc[idx]
            key = tuple("null" if pd.isna(row[k]) else str(row[k]) for k in UNIQUE_KEY)
            groups.setdefault(key, []).append(str(paths[idx]))
        lines = [f"  {'/'.join(key)}: {', '.join(files)}" for key, files in groups.items()]
        raise ValueError(
            f"duplicate evaluation results for ({', '.join(UNIQUE_KEY)}):\n" + "\n".join(lines)
        )
    logger.info("loaded %d evaluation results", len(df))
    return df


def _read_record(path: Path) -> dict[str, Any]:
    """One eval JSON as a validated flat record; every error names the file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in METRICS_COLUMNS:
        if key not in data:
            raise ValueError(f"{path}: missing key '{key}'")
    for key in _STR_KEYS:
        value = data[key]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: key '{key}' must be a non-empty string, got {value!r}")
    seed = data["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{path}: key 'seed' must be an integer or null, got {seed!r}")
    if data["role"] not in ("id", "ood", "transfer"):
        raise ValueError(f"{path}: key 'role' must be 'id', 'ood' or 'transfer', got {data['role']!r}")
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
    return {key: data[key] for key in METRICS_COLUMNS}


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
    if df.empty:
        raise ValueError("no evaluation results to summarize")
    id_cols: list[str] = []
    ood_cols: list[str] = []
    transfer_cols: list[str] = []
    rows: list[dict[str, Any]] = []

    for (model, dataset), group in df.groupby(["model", "dataset"], sort=False):
        roles = group.drop_duplicates(["evalset", "role"])
        clash = roles["evalset"][roles["evalset"].duplicated()]
        if len(clash):
            raise ValueError(
                f"{model}/{dataset}: eval set(s) {', '.join(map(str, clash.unique()))} "
                "appear with more than one role"
            )
        role_of = dict(zip(roles["evalset"], roles["role"]))
        id_sets = [e for e, r in role_of.items() if r == "id"]
        ood_sets = [e for e, r in role_of.items() if r == "ood"]
        transfer_sets = [e for e, r in role_of.items() if r == "transfer"]
        id_cols += [e for e in id_sets if e not in id_cols]
        ood_cols += [e for e in ood_sets if e not in ood_cols]
        transfer_cols += [e for e in transfer_sets if e not in transfer_cols]
        if not ood_sets:
            logger.warning("%s/%s: no OOD eval sets, so no OOD average", model, dataset)
        metric = "/".join(group["metric"].unique())

        methods = sorted(group["method"].unique(), key=cfg.method_sort_key)
        for method in methods:
            sub = group[group["method"] == method]
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
                        "%s/%s/%s: %d seed(s) lack an OOD eval set; left out of the OOD average",
                        model, dataset, method, int(per_seed_ood.isna().sum()),
                    )
            else:
                per_seed_ood = pd.Series(np.nan, index=wide.index)
            wide.insert(len(id_sets) + len(ood_sets), OOD_AVG, per_seed_ood)  # transfer sets stay outside it

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


def value_columns(summary: pd.DataFrame) -> list[str]:
    """The summary's value columns (eval sets, then ``OOD avg``), in display order."""
    cols = set(summary.columns)
    return [c for c in summary.columns if f"{c} mean" in cols and f"{c} std" in cols]


def format_cell(mean: float, std: float, cfg: AggregateConfig) -> str:
    """``"mean ± std"`` in display units; the mean alone if std is NaN; ``""`` if mean is NaN."""
    if mean is None or pd.isna(mean):
        return ""
    scale = 100.0 if cfg.percent else 1.0
    text = f"{mean * scale:.{cfg.decimals}f}"
    if std is not None and not pd.isna(std):
        text += f" ± {std * scale:.{cfg.decimals}f}"
    return text


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def to_markdown(summary: pd.DataFrame, cfg: AggregateConfig) -> str:
    """Markdown table(s): one row per method, columns = eval sets + ``OOD avg``.

    The header's first cell names the metric; ID eval sets are marked ``(ID)``. With several
    (model, dataset) pairs there is one section each, headed ``### model / dataset``; a column
    that has no value in a section is left out of it. Written by hand: pandas' ``to_markdown``
    needs ``tabulate``, which is not a dependency.
    """
    all_cols = value_columns(summary)
    sections = list(summary.groupby(["model", "dataset"], sort=False))
    unit = ", %" if cfg.percent else ""
    parts: list[str] = []
    for (model, dataset), sec in sections:
        cols = [c for c in all_cols if sec[f"{c} mean"].notna().any()]
        id_sets = {e for s in sec["id_evalsets"] for e in s.split(", ") if e}
        metric = "/".join(cfg.metric_label(m) for m in str(sec["metric"].iloc[0]).split("/"))
        header = [f"Method ({metric}{unit})"] + [f"{c} (ID)" if c in id_sets else c for c in cols]
        lines = []
        if len(sections) > 1:
            lines += [f"### {model} / {dataset}", ""]
        lines.append(_md_row(header))
        lines.append("|" + "|".join([":---"] + ["---:"] * len(cols)) + "|")
        for _, row in sec.iterrows():
            lines.append(_md_row([row["label"]] + [row[c] or "–" for c in cols]))
        parts.append("\n".join(lines))
    seeds_note = (
        "Mean ± std over seeds (std with ddof=1; a single value where there is one seed). "
        f"{OOD_AVG}: per seed, the mean over the OOD eval sets; then mean ± std over seeds."
    )
    return "\n\n".join(parts) + "\n\n" + seeds_note + "\n"


def _md_row(cells: Sequence[str]) -> str:
    # A literal pipe would split the cell.
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------

_MARKERS = "osD^vP*Xh<>pd"


def plot_id_vs_ood(
    summary: pd.DataFrame,
    path_png: str | os.PathLike,
    cfg: AggregateConfig,
    path_pdf: str | os.PathLike | None = None,
) -> Figure:
    """ID (x) vs OOD-average (y) per method, one subplot per (model, dataset); saved atomically.

    x is the dataset's first ID eval set; error bars are stds over seeds; a dashed y = x line is
    drawn for reference. Uses a bare :class:`~matplotlib.figure.Figure` (Agg canvas), never pyplot,
    so no global figure state or GUI backend is involved. Returns the figure.
    """
    scale = 100.0 if cfg.percent else 1.0
    unit = "%" if cfg.percent else "fraction"
    methods = sorted(summary["method"].unique(), key=cfg.method_sort_key)
    palette = _palette(len(methods))
    style = {m: (palette[i], _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}

    sections = []
    for (model, dataset), sec in summary.groupby(["model", "dataset"], sort=False):
        id_sets = [e for e in str(sec["id_evalsets"].iloc[0]).split(", ") if e]
        if not id_sets:
            logger.warning("%s/%s: no ID eval set, left out of the figure", model, dataset)
            continue
        xcol = id_sets[0]
        pts = sec[sec[f"{xcol} mean"].notna() & sec[f"{OOD_AVG} mean"].notna()]
        if pts.empty:
            logger.warning("%s/%s: no method with both ID and OOD values", model, dataset)
            continue
        sections.append((model, dataset, xcol, pts))

    n = max(len(sections), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols + 2.0, 3.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    several_models = summary["model"].nunique() > 1

    handles: dict[str, Any] = {}
    if not sections:
        ax = axes[0]
        ax.text(0.5, 0.5, "no method with both ID and OOD results", ha="center", va="center")
        ax.set_xlabel(f"ID accuracy ({unit})")
        ax.set_ylabel(f"OOD-average accuracy ({unit})")
    for ax, (model, dataset, xcol, pts) in zip(axes, sections):
        metric = "/".join(cfg.metric_label(m) for m in str(pts["metric"].iloc[0]).split("/"))
        for _, row in pts.iterrows():
            color, marker = style[row["method"]]
            cont = ax.errorbar(
                row[f"{xcol} mean"] * scale,
                row[f"{OOD_AVG} mean"] * scale,
                # No bar for single-seed methods: std is NaN there.
                xerr=np.nan_to_num(row[f"{xcol} std"]) * scale,
                yerr=np.nan_to_num(row[f"{OOD_AVG} std"]) * scale,
                fmt=marker,
                color=color,
                markersize=7,
                capsize=3,
                label=row["label"],
            )
            handles.setdefault(row["label"], cont)
        # Fix the limits from the data first: the infinite y = x line would otherwise pull
        # the view out to the origin.
        ax.margins(0.15)
        ax.autoscale_view()
        xlim, ylim = ax.get_xlim(), ax.get_ylim()
        ref = ax.axline((0.0, 0.0), slope=1.0, linestyle="--", color="0.6", linewidth=1.0)
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)
        handles.setdefault("y = x", ref)
        ax.set_xlabel(f"ID {metric} ({unit})")
        ax.set_ylabel(f"OOD-average {metric} ({unit})")
        name = f"{model} / {dataset}" if several_models else str(dataset)
        ax.set_title(f"{name} (ID: {xcol})", fontsize="medium")
        ax.grid(True, alpha=0.3)

    legend_w = 2.0 / fig.get_figwidth()
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - legend_w, 1.0))
    if handles:
        fig.legend(
            list(handles.values()), list(handles.keys()),
            loc="center left", bbox_to_anchor=(1.0 - legend_w, 0.5), fontsize="small", frameon=False,
        )
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    if path_pdf is not None:
        with atomic_path(path_pdf) as tmp:
            fig.savefig(tmp, format="pdf")
    return fig


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Stage entry point
# --------------------------------------------------------------------------------------------


def run(
    eval_paths: Iterable[str | os.PathLike],
    out_dir_tables: str | os.PathLike,
    out_dir_figures: str | os.PathLike,
    cfg: AggregateConfig,
) -> dict[str, float]:
    """Write :data:`TABLE_FILES` under ``out_dir_tables`` and :data:`FIGURE_FILES` under
    ``out_dir_figures``, all atomically; return headline numbers for logging.

    The returned dict maps ``"{model}/{dataset}/{method}/id"`` and ``".../ood_avg"`` to mean values
    (fractions; the first ID eval set for ``id``), plus ``n_eval_results``.
    """
    tables = Path(out_dir_tables)
    figures = Path(out_dir_figures)
    df = load_metrics(eval_paths)
    summary = summarize(df, cfg)

    with atomic_path(tables / METRICS_PARQUET) as tmp:
        df.to_parquet(tmp, engine="pyarrow", index=False)
    with atomic_path(tables / SUMMARY_CSV) as tmp:
        summary.to_csv(tmp, index=False, encoding="utf-8")
    with atomic_path(tables / SUMMARY_MD) as tmp:
        tmp.write_text(to_markdown(summary, cfg), encoding="utf-8")
    plot_id_vs_ood(summary, figures / ID_VS_OOD_PNG, cfg, path_pdf=figures / ID_VS_OOD_PDF)

    headline: dict[str, float] = {"n_eval_results": float(len(df))}
    for _, row in summary.iterrows():
        key = f"{row['model']}/{row['dataset']}/{row['method']}"
        id_sets = [e for e in row["id_evalsets"].split(", ") if e]
        if id_sets and pd.notna(row[f"{id_sets[0]} mean"]):
            headline[f"{key}/id"] = float(row[f"{id_sets[0]} mean"])
        if pd.notna(row[f"{OOD_AVG} mean"]):
            headline[f"{key}/ood_avg"] = float(row[f"{OOD_AVG} mean"])
    logger.info(
        "aggregated %d results into %d summary rows; tables in %s, figures in %s",
        len(df), len(summary), tables, figures,
    )
    return headline
