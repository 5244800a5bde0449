"""The ID-OOD frontier: which variants of which methods are Pareto-optimal, and its figure.

- :func:`pareto_mask`: the points no other point beats in both ID and OOD accuracy;
- :func:`mark_pareto`: that mask per (model, dataset, axis) of a points frame, as a ``pareto``
  column;
- :func:`plot_frontier`: one dataset, a panel per y axis (the OOD average, then each shift): every
  variant of every method with its 95% intervals, the WiSE-FT curves over alpha, the Pareto front
  as a dashed step line, the selected variants highlighted and labelled with their parameters.

The points frame holds one row per plotted point and y axis: ``model``, ``dataset``, ``method``,
``label``, ``variant``, ``alpha`` (NaN except on WiSE-FT curves), ``selected``, ``n_seeds``,
``metric``, ``axis`` ("OOD avg" or a shift's eval set), and ``x_mean``/``x_low``/``x_high`` (ID) and
``y_mean``/``y_low``/``y_high`` (the axis' quantity), all fractions. Figures follow
:mod:`saeft.report.figures`: bare :class:`~matplotlib.figure.Figure`, constrained layout, legend outside,
saved atomically as PNG and PDF.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from saeft.config.aggregate import AggregateConfig
from saeft.report.figures import _legend, _new_figure, method_styles, save_figure
from saeft.report.results import OOD_AVG

logger = logging.getLogger(__name__)

GROUP = ["model", "dataset", "axis"]
"""The columns a Pareto front is computed within."""

FRONT_COLOR = "0.35"
PARETO_LABEL = "Pareto front"
SELECTED_LABEL = "selected variant (large, black edge)"
OTHER_LABEL = "other variants"

_SELECTED = {"markersize": 8.0, "markeredgecolor": "black", "markeredgewidth": 0.9, "elinewidth": 1.0,
             "capsize": 2.5, "zorder": 4}
_OTHER = {"markersize": 5.5, "markeredgewidth": 0.0, "elinewidth": 0.7, "capsize": 0.0, "alpha": 0.5, "zorder": 3}


# --------------------------------------------------------------------------------------------
# Pareto front
# --------------------------------------------------------------------------------------------


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where no other point dominates, both x and y maximised: a point dominates another if
    it is >= in both and > in at least one. Exact duplicates are both on the front; a point with
    a NaN coordinate is never on it (nor dominates). Quadratic in the number of points."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of the same length, got shapes {x.shape} and {y.shape}")
    valid = ~(np.isnan(x) | np.isnan(y))
    xs, ys = x[valid], y[valid]
    # [i, j]: point j is at least as good as point i in both and better in one.
    at_least = (xs[None, :] >= xs[:, None]) & (ys[None, :] >= ys[:, None])
    better = (xs[None, :] > xs[:, None]) | (ys[None, :] > ys[:, None])
    mask = np.zeros(x.shape, dtype=bool)
    mask[valid] = ~(at_least & better).any(axis=1)
    return mask


def mark_pareto(points: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``points`` with a bool ``pareto`` column: on the front of its (model, dataset,
    axis) group, over every point of the group (each variant, WiSE-FT curve point, zero-shot)."""
    out = points.copy()
    mask = np.zeros(len(out), dtype=bool)
    if len(out):
        for rows in out.groupby(GROUP, sort=False, dropna=False).indices.values():
            mask[rows] = pareto_mask(out["x_mean"].to_numpy(float)[rows], out["y_mean"].to_numpy(float)[rows])
    out["pareto"] = mask
    return out


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------


def plot_frontier(
    points: pd.DataFrame,
    dataset: str,
    cfg: AggregateConfig,
    png: str | os.PathLike,
    pdf: str | os.PathLike | None = None,
) -> Figure:
    """ID (x) against each y axis of ``dataset``, a panel per axis ("OOD avg" first, then the
    shifts in order of first appearance; per model too when the dataset has several): every
    point with its 95% intervals, WiSE-FT curves, the Pareto front, the selected variants
    labelled with their parameters. Returns the saved figure."""
    scale, unit = cfg.scale_and_unit()
    styles = method_styles(points["method"], cfg)
    sec = mark_pareto(points[points["dataset"] == dataset])
    missing = sec["x_mean"].isna() | sec["y_mean"].isna()
    if missing.any():
        logger.warning("%s: %d point(s) without an ID or y value left out of the frontier figure", dataset, int(missing.sum()))
    sec = sec[~missing]
    panels = _panels(sec)
    fig, axes = _new_figure(max(len(panels), 1), width=4.2, height=3.8, legend=2.4)
    if not panels:
        logger.warning("%s: no points for the frontier figure", dataset)
        _empty_panel(axes[0], dataset, unit)
    several = sec["model"].nunique() > 1
    multi = _multi_variant_methods(sec)
    for ax, (model, axis, frame) in zip(axes, panels):
        _draw_panel(ax, frame, styles, scale, multi)
        metric = cfg.metric_label(frame["metric"].iloc[0])
        ax.set_xlabel(f"ID {metric} ({unit})")
        ax.set_ylabel(f"{'OOD-average' if axis == OOD_AVG else axis} {metric} ({unit})")
        ax.set_title(f"{model}: {axis}" if several else str(axis), fontsize="medium")
        ax.grid(True, alpha=0.3)
    fig.suptitle(str(dataset))
    _legend(fig, _legend_handles(sec, styles, cfg))
    save_figure(fig, png, pdf)
    return fig


def _panels(sec: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(model, axis, its points) per panel: models in order of appearance, and within each the
    OOD average first, then the other axes in order of first appearance."""
    panels = []
    for model, by_model in sec.groupby("model", sort=False):
        axes = list(dict.fromkeys(by_model["axis"]))
        axes.sort(key=lambda a: a != OOD_AVG)  # stable: the OOD average first, the rest in order
        panels.extend((str(model), str(axis), by_model[by_model["axis"] == axis]) for axis in axes)
    return panels


def _multi_variant_methods(sec: pd.DataFrame) -> set[str]:
    """The methods of ``sec`` with more than one variant (whose selected point gets labelled)."""
    counts = sec.groupby("method")["variant"].nunique()
    return set(counts.index[counts > 1])


def _empty_panel(ax: Any, dataset: str, unit: str) -> None:
    ax.text(0.5, 0.5, f"{dataset}: no ID and OOD points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"ID accuracy ({unit})")
    ax.set_ylabel(f"OOD-average accuracy ({unit})")
    ax.set_xticks([])
    ax.set_yticks([])


def _interval(mean: pd.Series, low: pd.Series, high: pd.Series, scale: float) -> np.ndarray:
    """Asymmetric error bars (2 x n) from an interval; a missing or inverted side draws none."""
    m = mean.to_numpy(float)
    below = np.clip(np.nan_to_num(m - low.to_numpy(float)), 0.0, None)
    above = np.clip(np.nan_to_num(high.to_numpy(float) - m), 0.0, None)
    return np.vstack([below, above]) * scale


def _draw_panel(ax: Any, frame: pd.DataFrame, styles: dict[str, tuple[Any, str]], scale: float, multi: set[str]) -> None:
    """One panel: WiSE-FT curves, points (a container per method and selected/other), the
    Pareto front and rings, and the labels of the selected variants."""
    curves = frame[frame["alpha"].notna()]
    for method, curve in curves.groupby("method", sort=False):
        curve = curve.sort_values("alpha")
        color, _ = styles[method]
        ax.plot(curve["x_mean"] * scale, curve["y_mean"] * scale, "-", color=color, alpha=0.7, linewidth=1.4,
                zorder=2, gid=f"curve:{method}")
    for (method, selected), group in frame.groupby(["method", "selected"], sort=False):
        color, marker = styles[method]
        ax.errorbar(group["x_mean"] * scale, group["y_mean"] * scale,
                    xerr=_interval(group["x_mean"], group["x_low"], group["x_high"], scale),
                    yerr=_interval(group["y_mean"], group["y_low"], group["y_high"], scale),
                    fmt=marker, color=color, linestyle="none", **(_SELECTED if selected else _OTHER),
                    gid=f"{'selected' if selected else 'other'}:{method}")
    _draw_front(ax, frame[frame["pareto"]], scale)
    for _, row in frame[frame["selected"] & frame["method"].isin(multi)].iterrows():
        variant = str(row["variant"])
        if "@" not in variant:
            continue
        ax.annotate(variant.split("@", 1)[1].replace(",", ", "), (row["x_mean"] * scale, row["y_mean"] * scale),
                    textcoords="offset points", xytext=(9, 7), fontsize=6.5, color=styles[row["method"]][0], zorder=6,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.7})
    ax.margins(0.1)


def _draw_front(ax: Any, front: pd.DataFrame, scale: float) -> None:
    """The front as a dashed step line (x ascending, so y descending) and a ring per point."""
    if front.empty:
        return
    front = front.sort_values(["x_mean", "y_mean"], ascending=[True, False])
    x, y = front["x_mean"].to_numpy(float) * scale, front["y_mean"].to_numpy(float) * scale
    ax.step(x, y, where="pre", linestyle="--", color=FRONT_COLOR, linewidth=1.1, zorder=1, gid="pareto-front")
    ax.scatter(x, y, s=170, facecolors="none", edgecolors=FRONT_COLOR, linewidths=1.0, zorder=5, gid="pareto-rings")


def _legend_handles(sec: pd.DataFrame, styles: dict[str, tuple[Any, str]], cfg: AggregateConfig) -> dict[str, Any]:
    """One entry per method label (a line too for a WiSE-FT curve), then the front and the two
    marker sizes."""
    handles: dict[str, Any] = {}
    curved = set(sec.loc[sec["alpha"].notna(), "method"])
    labels = sec.drop_duplicates("method").set_index("method")["label"]
    for method in sorted(labels.index, key=cfg.method_sort_key):
        color, marker = styles[method]
        handles.setdefault(str(labels[method]), Line2D([], [], color=color, marker=marker, markersize=7,
                                                       linestyle="-" if method in curved else "none"))
    if sec.empty:
        return handles
    handles[PARETO_LABEL] = Line2D([], [], color=FRONT_COLOR, linestyle="--", marker="o", markersize=11,
                                   markerfacecolor="none", markeredgecolor=FRONT_COLOR)
    handles[SELECTED_LABEL] = Line2D([], [], color="0.6", marker="o", markersize=8, markeredgecolor="black",
                                     markeredgewidth=0.9, linestyle="none")
    handles[OTHER_LABEL] = Line2D([], [], color="0.6", marker="o", markersize=5.5, alpha=0.5, linestyle="none")
    return handles
