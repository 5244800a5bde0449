"""The paper's figures, drawn from the aggregate summary, the WiSE-FT curves and training logs.

- :func:`plot_id_vs_ood`: OOD average against ID per method, a panel per (model, dataset): the
  effective-robustness overview of the study;
- :func:`plot_shifts`: one dataset, a panel per shift (and the OOD average): ID against that
  shift for zero-shot and each method, with the WiSE-FT curve over alpha;
- :func:`plot_bars`: one dataset, every eval set and the OOD average as grouped bars per method;
- :func:`plot_training`: one dataset, training loss and held-out accuracy per epoch from the
  fine-tuning jobs' ``train.json``.

Every figure is a bare :class:`~matplotlib.figure.Figure` (Agg canvas, no pyplot state), uses the
same colour and marker per method, has labelled axes with units and a legend outside the panels
(constrained layout, so nothing overlaps), and is saved atomically as PNG and PDF.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from saeft.config.aggregate import AggregateConfig
from saeft.infra.io import atomic_path
from saeft.report.results import OOD_AVG

logger = logging.getLogger(__name__)

_MARKERS = "osD^vP*Xh<>pd"


def method_styles(methods: Sequence[str], cfg: AggregateConfig) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per method, fixed by the method's place in the configured order, so a
    method looks the same in every figure of a study."""
    from matplotlib import colormaps

    ordered = sorted(set(methods), key=cfg.method_sort_key)
    cmap = colormaps["tab10" if len(ordered) <= 10 else "tab20"]
    return {m: (cmap(i % cmap.N), _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(ordered)}


def save_figure(fig: Figure, png: str | os.PathLike, pdf: str | os.PathLike | None = None) -> None:
    """Write ``fig`` atomically as PNG (150 dpi) and, given a path, PDF."""
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    if pdf is not None:
        with atomic_path(pdf) as tmp:
            fig.savefig(tmp, format="pdf")


def _new_figure(panels: int, width: float = 3.9, height: float = 3.6, legend: float = 1.9, max_cols: int = 3) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(panels, max_cols))
    nrows = max(1, math.ceil(panels / ncols))
    fig = Figure(figsize=(width * ncols + legend, height * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[panels:]:
        ax.remove()
    return fig, axes[:max(panels, 1)]


def _legend(fig: Figure, handles: Mapping[str, Any]) -> None:
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", fontsize="small", frameon=False)


def _identity_line(ax: Any, handles: dict[str, Any]) -> None:
    """A dashed y = x line that does not move the data's view limits."""
    ax.margins(0.12)
    ax.autoscale_view()
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    handles.setdefault("y = x", ax.axline((0.0, 0.0), slope=1.0, linestyle="--", color="0.6", linewidth=1.0))
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def _id_set(sec: pd.DataFrame) -> str | None:
    return next((e for e in str(sec["id_evalsets"].iloc[0]).split(", ") if e), None)


# --------------------------------------------------------------------------------------------
# Overview: OOD average against ID, every dataset
# --------------------------------------------------------------------------------------------


def plot_id_vs_ood(summary: pd.DataFrame, cfg: AggregateConfig, png: str | os.PathLike, pdf: str | os.PathLike | None = None) -> Figure:
    """OOD average (y) against the first ID eval set (x) per method, a panel per (model, dataset);
    error bars are stds over seeds. Returns the saved figure."""
    scale, unit = cfg.scale_and_unit()
    styles = method_styles(summary["method"], cfg)
    sections = []
    for (model, dataset), sec in summary.groupby(["model", "dataset"], sort=False):
        xcol = _id_set(sec)
        if xcol is None:
            logger.warning("%s/%s: no ID eval set, left out of the figure", model, dataset)
            continue
        pts = sec[sec[f"{xcol} mean"].notna() & sec[f"{OOD_AVG} mean"].notna()]
        if pts.empty:
            logger.warning("%s/%s: no method with both ID and OOD values", model, dataset)
            continue
        sections.append((model, dataset, xcol, pts))

    fig, axes = _new_figure(len(sections))
    handles: dict[str, Any] = {}
    if not sections:
        axes[0].text(0.5, 0.5, "no method with both ID and OOD results", ha="center", va="center")
        axes[0].set_xlabel(f"ID accuracy ({unit})")
        axes[0].set_ylabel(f"OOD-average accuracy ({unit})")
    several = summary["model"].nunique() > 1
    for ax, (model, dataset, xcol, pts) in zip(axes, sections):
        metric = cfg.metric_label(pts["metric"].iloc[0])
        for _, row in pts.iterrows():
            color, marker = styles[row["method"]]
            handles.setdefault(row["label"], ax.errorbar(
                row[f"{xcol} mean"] * scale, row[f"{OOD_AVG} mean"] * scale,
                xerr=np.nan_to_num(row[f"{xcol} std"]) * scale, yerr=np.nan_to_num(row[f"{OOD_AVG} std"]) * scale,
                fmt=marker, color=color, markersize=7, capsize=3, label=row["label"],
            ))
        _identity_line(ax, handles)
        ax.set_xlabel(f"ID {metric}, {xcol} ({unit})")
        ax.set_ylabel(f"OOD-average {metric} ({unit})")
        ax.set_title(f"{model} / {dataset}" if several else str(dataset), fontsize="medium")
        ax.grid(True, alpha=0.3)
    _legend(fig, handles)
    save_figure(fig, png, pdf)
    return fig


# --------------------------------------------------------------------------------------------
# One dataset: a panel per shift, with the WiSE-FT curve
# --------------------------------------------------------------------------------------------


def plot_shifts(
    summary: pd.DataFrame,
    curves: pd.DataFrame,
    dataset: str,
    cfg: AggregateConfig,
    png: str | os.PathLike,
    pdf: str | os.PathLike | None = None,
) -> Figure:
    """ID (x) against each OOD eval set (y), a panel per shift and one for the OOD average:
    a point per method (error bars: std over seeds) and, per WiSE-FT method, its curve over
    alpha from zero-shot (alpha 0) to the fine-tuned model (alpha 1), mean over seeds."""
    scale, unit = cfg.scale_and_unit()
    sec = summary[summary["dataset"] == dataset]
    if sec.empty:
        raise ValueError(f"no results for dataset {dataset!r}")
    xcol = _id_set(sec)
    ood = [c for c in _ood_sets(sec) if f"{c} mean" in sec.columns and sec[f"{c} mean"].notna().any()]
    panels = ood + [OOD_AVG] if len(ood) > 1 else ood
    styles = method_styles(summary["method"], cfg)
    metric = cfg.metric_label(sec["metric"].iloc[0])
    fig, axes = _new_figure(max(len(panels), 1))
    handles: dict[str, Any] = {}
    if xcol is None or not panels:
        axes[0].text(0.5, 0.5, f"{dataset}: no ID and OOD results", ha="center", va="center")
        axes[0].set_xlabel(f"ID {metric} ({unit})")
        axes[0].set_ylabel(f"OOD {metric} ({unit})")
    curve = curves[curves["dataset"] == dataset]
    for ax, panel in zip(axes, panels if xcol else []):
        for method, points in curve.groupby("method", sort=False):
            xy = _curve_xy(points, xcol, ood if panel == OOD_AVG else [panel])
            if xy.empty:
                continue
            color, _ = styles.get(method, ("0.3", "o"))
            label = f"{cfg.label(method)} curve (α)"
            (line,) = ax.plot(xy["x"] * scale, xy["y"] * scale, "-", color=color, alpha=0.6, linewidth=1.5, marker=".", markersize=6)
            handles.setdefault(label, line)
            for alpha, x, y in zip(xy.index, xy["x"], xy["y"]):
                if 0.0 < alpha < 1.0:
                    ax.annotate(f"{alpha:g}", (x * scale, y * scale), textcoords="offset points", xytext=(4, -9), fontsize=6, color=color)
        for _, row in sec.iterrows():
            x, y = row.get(f"{xcol} mean", np.nan), row.get(f"{panel} mean", np.nan)
            if pd.isna(x) or pd.isna(y):
                continue
            color, marker = styles[row["method"]]
            handles.setdefault(row["label"], ax.errorbar(
                x * scale, y * scale, xerr=np.nan_to_num(row[f"{xcol} std"]) * scale, yerr=np.nan_to_num(row[f"{panel} std"]) * scale,
                fmt=marker, color=color, markersize=7, capsize=3, zorder=3,
            ))
        _identity_line(ax, handles)
        ax.set_xlabel(f"ID {metric}, {xcol} ({unit})")
        ax.set_ylabel(f"{'OOD-average' if panel == OOD_AVG else panel} {metric} ({unit})")
        ax.set_title(f"{dataset}: {panel}", fontsize="medium")
        ax.grid(True, alpha=0.3)
    _legend(fig, handles)
    save_figure(fig, png, pdf)
    return fig


def _ood_sets(sec: pd.DataFrame) -> list[str]:
    """The dataset's OOD eval sets in summary column order (those between the ID sets and OOD avg)."""
    cols = [c[: -len(" mean")] for c in sec.columns if c.endswith(" mean")]
    ids = {e for e in str(sec["id_evalsets"].iloc[0]).split(", ") if e}
    ood = []
    for c in cols:
        if c == OOD_AVG:
            break
        if c not in ids:
            ood.append(c)
    return ood


def _curve_xy(points: pd.DataFrame, xcol: str, ycols: Sequence[str]) -> pd.DataFrame:
    """x = the ID mean, y = the mean over ``ycols`` of their means, per alpha (complete alphas only)."""
    wide = points.pivot_table(index="alpha", columns="evalset", values="mean", aggfunc="first")
    if xcol not in wide.columns or any(c not in wide.columns for c in ycols):
        return pd.DataFrame(columns=["x", "y"])
    xy = pd.DataFrame({"x": wide[xcol], "y": wide[list(ycols)].mean(axis=1, skipna=False)}).dropna()
    return xy.sort_index()


# --------------------------------------------------------------------------------------------
# One dataset: bars per eval set
# --------------------------------------------------------------------------------------------


def plot_bars(
    summary: pd.DataFrame,
    dataset: str,
    cfg: AggregateConfig,
    png: str | os.PathLike,
    pdf: str | os.PathLike | None = None,
    transfer: Sequence[str] = (),
) -> Figure:
    """Every ID and OOD eval set and the OOD average of one dataset, a bar per method (error
    bars: std over seeds; a value label on each bar). Transfer sets are left out."""
    scale, unit = cfg.scale_and_unit()
    sec = summary[summary["dataset"] == dataset]
    if sec.empty:
        raise ValueError(f"no results for dataset {dataset!r}")
    cols = [c[: -len(" mean")] for c in sec.columns if c.endswith(" mean")]
    groups = [c for c in cols if c not in transfer and sec[f"{c} mean"].notna().any()]
    styles = method_styles(summary["method"], cfg)
    metric = cfg.metric_label(sec["metric"].iloc[0])
    n = len(sec)
    width = 0.8 / max(n, 1)
    # Wide enough for the bars, up to a page-spread width: many methods make thinner bars.
    width_in = min(max(5.0, 1.0 + len(groups) * (0.45 * n + 0.4)), 22.0)
    fig = Figure(figsize=(width_in + 1.9, 4.0), layout="constrained")
    ax = fig.subplots()
    handles: dict[str, Any] = {}
    positions = np.arange(len(groups))
    for i, (_, row) in enumerate(sec.iterrows()):
        means = np.array([row[f"{c} mean"] for c in groups], dtype=float) * scale
        stds = np.nan_to_num(np.array([row[f"{c} std"] for c in groups], dtype=float)) * scale
        color, _ = styles[row["method"]]
        bars = ax.bar(positions - 0.4 + width * (i + 0.5), np.nan_to_num(means), width, yerr=stds, color=color,
                      capsize=2, error_kw={"linewidth": 0.8})
        if n * len(groups) <= 40:
            ax.bar_label(bars, labels=["" if np.isnan(m) else f"{m:.0f}" for m in means], fontsize=6, padding=2)
        handles.setdefault(row["label"], bars)
    ids = {e for e in str(sec["id_evalsets"].iloc[0]).split(", ") if e}
    ax.set_xticks(positions, [f"{c}\n(ID)" if c in ids else c for c in groups])
    ax.set_xlabel("eval set")
    ax.set_ylabel(f"{metric} ({unit})")
    ax.set_title(f"{dataset}: every eval set", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.1)
    _legend(fig, handles)
    save_figure(fig, png, pdf)
    return fig


# --------------------------------------------------------------------------------------------
# One dataset: training curves
# --------------------------------------------------------------------------------------------


def plot_training(
    runs: Sequence[Mapping[str, Any]],
    dataset: str,
    cfg: AggregateConfig,
    png: str | os.PathLike,
    pdf: str | os.PathLike | None = None,
    methods: Sequence[str] = (),
) -> Figure:
    """Training loss and held-out top-1 per epoch, a line per method (mean over seeds, band:
    min to max over seeds). ``runs``: the ``train.json`` contents of the dataset's jobs, each with
    ``config.method``, ``seed`` and ``history`` (one record per epoch). ``methods``: the study's
    methods (zero-shot and WiSE-FT too), so each keeps the colour it has in the other figures."""
    from matplotlib.ticker import MaxNLocator

    scale, unit = cfg.scale_and_unit()
    rows = []
    for run in runs:
        method = run["config"]["method"]
        for record in run.get("history", []):
            rows.append({"method": method, "seed": run.get("seed"), "epoch": record.get("epoch"),
                         "loss": record.get("loss", np.nan), "heldout_top1": record.get("heldout_top1", np.nan)})
    frame = pd.DataFrame(rows, columns=["method", "seed", "epoch", "loss", "heldout_top1"])
    styles = method_styles([*methods, *frame["method"].unique()], cfg)
    fig, axes = _new_figure(2, width=4.4, max_cols=2)
    handles: dict[str, Any] = {}
    panels = (("loss", "training loss (total objective)", 1.0), ("heldout_top1", f"held-out top-1 accuracy ({unit})", scale))
    for ax, (key, ylabel, factor) in zip(axes, panels):
        for method in sorted(frame["method"].unique(), key=cfg.method_sort_key):
            sub = frame[frame["method"] == method].dropna(subset=[key])
            if sub.empty:
                continue
            stats = sub.groupby("epoch")[key].agg(["mean", "min", "max"]) * factor
            color, marker = styles[method]
            (line,) = ax.plot(stats.index, stats["mean"], marker=marker, markersize=4, color=color)
            ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.15, linewidth=0)
            handles.setdefault(cfg.label(method), line)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_title(f"{dataset}: training loss", fontsize="medium")
    axes[1].set_title(f"{dataset}: held-out accuracy", fontsize="medium")
    if frame.empty:
        axes[0].text(0.5, 0.5, "no training history", ha="center", va="center", transform=axes[0].transAxes)
    _legend(fig, handles)
    save_figure(fig, png, pdf)
    return fig

