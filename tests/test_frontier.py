"""The ID-OOD frontier: Pareto mask, per-group marking and the frontier figure (saeft.report.frontier)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from saeft.config.aggregate import AggregateConfig
from saeft.report.frontier import OTHER_LABEL, PARETO_LABEL, SELECTED_LABEL, mark_pareto, pareto_mask, plot_frontier
from saeft.report.results import OOD_AVG

NAN = float("nan")
AXES = (OOD_AVG, "sketch", "rendition")


def test_pareto_mask_on_a_hand_made_set():
    x = np.array([1, 2, 3, 2, 1, 0, NAN, 2.5])
    y = np.array([5, 4, 1, 3, 5, 0, 9, NAN])
    # (1,5) twice: duplicates, both on the front; (2,3) dominated by (2,4); (0,0) by all; NaNs never.
    expected = [True, True, True, False, True, False, False, False]
    assert pareto_mask(x, y).tolist() == expected
    assert pareto_mask(np.array([]), np.array([])).tolist() == []
    assert pareto_mask(np.array([NAN]), np.array([1.0])).tolist() == [False]
    # Equal in one coordinate, better in the other: dominated.
    assert pareto_mask(np.array([1.0, 1.0]), np.array([2.0, 3.0])).tolist() == [False, True]
    with pytest.raises(ValueError):
        pareto_mask(np.zeros(2), np.zeros(3))


def test_mark_pareto_is_per_model_dataset_and_axis():
    rows = [
        # sketch: b dominates a; rendition: a is alone on its own front despite b's sketch value.
        ("m", "d", "sketch", "a", 0.5, 0.5), ("m", "d", "sketch", "b", 0.9, 0.9),
        ("m", "d", "rendition", "a", 0.5, 0.5), ("m", "d", "rendition", "c", 0.4, 0.6),
        ("m", "e", "sketch", "a", 0.1, 0.1),  # another dataset: its own front
        ("n", "d", "sketch", "a", 0.2, 0.2),  # another model: its own front
    ]
    points = pd.DataFrame(rows, columns=["model", "dataset", "axis", "method", "x_mean", "y_mean"], index=[5, 5, 3, 3, 0, 1])
    marked = mark_pareto(points)
    assert marked["pareto"].tolist() == [False, True, True, True, True, True]
    assert marked["pareto"].dtype == bool
    assert "pareto" not in points.columns  # a copy
    assert mark_pareto(points.iloc[:0])["pareto"].tolist() == []


def _point(method: str, label: str, variant: str, x: float, y: float, *, alpha: float = NAN, selected: bool = True,
           axis: str = OOD_AVG, half: float = 0.01) -> dict:
    return {"model": "m", "dataset": "shapes", "method": method, "label": label, "variant": variant, "alpha": alpha,
            "selected": selected, "n_seeds": 1 if method == "zeroshot" else 3, "metric": "top1", "axis": axis,
            "x_mean": x, "x_low": x - half, "x_high": x + half, "y_mean": y, "y_low": y - 1.5 * half, "y_high": y + 1.5 * half}


def synthetic_points() -> pd.DataFrame:
    """Zero-shot, FT, SAE-FT with 3 variants (one selected), a WiSE-FT curve of 3 alphas (0.5
    reported); a y axis per shift and the OOD average, shifts listed before the average."""
    rows = []
    for i, axis in enumerate(("sketch", "rendition", OOD_AVG)):
        drop = [0.25, 0.12, 0.185][i]
        zs_x, ft_x = 0.62, 0.86
        zs_y, ft_y = 0.62 - drop / 2, 0.86 - 1.6 * drop
        rows.append(_point("zeroshot", "Zero-shot", "zeroshot", zs_x, zs_y, axis=axis, half=0.0))
        rows.append(_point("ft", "FT", "ft", ft_x, ft_y, axis=axis))
        for (lam, mu), dx, dy, selected in (((1, 1), 0.0, 0.0, True), ((10, 1), -0.03, 0.035, False), ((0.1, 0.1), 0.01, -0.03, False)):
            rows.append(_point("saeft", "SAE-FT", f"saeft@lambda={lam},mu={mu}", 0.84 + dx, ft_y + 0.05 + dy, axis=axis, selected=selected))
        for alpha in (0.25, 0.5, 0.75):
            x = (1 - alpha) * zs_x + alpha * ft_x
            y = (1 - alpha) * zs_y + alpha * ft_y + 0.05 * math.sin(math.pi * alpha)
            rows.append(_point("wiseft", "WiSE-FT", "ft", x, y, alpha=alpha, axis=axis, selected=alpha == 0.5))
    return pd.DataFrame(rows)


def _legend(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def _looked_at(png: Path) -> None:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0


def test_frontier_figure(tmp_path):
    points = synthetic_points()
    cfg = AggregateConfig(wiseft_alpha=0.5)
    png = Path(os.environ.get("SAEFT_FRONTIER_PNG", tmp_path / "f.png"))
    fig = plot_frontier(points, "shapes", cfg, png, tmp_path / "f.pdf")
    _looked_at(png)
    assert (tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    assert fig._suptitle.get_text() == "shapes"
    assert [ax.get_title() for ax in fig.axes] == [OOD_AVG, "sketch", "rendition"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["OOD-average top-1 accuracy (%)", "sketch top-1 accuracy (%)",
                                                     "rendition top-1 accuracy (%)"]
    marked = mark_pareto(points)
    for ax, axis in zip(fig.axes, AXES):
        assert ax.get_xlabel() == "ID top-1 accuracy (%)"
        # Error-bar containers: zero-shot, FT, SAE-FT selected + others, WiSE-FT selected + others.
        gids = sorted(c.lines[0].get_gid() for c in ax.containers)
        assert gids == sorted(["selected:zeroshot", "selected:ft", "selected:saeft", "other:saeft", "selected:wiseft", "other:wiseft"])
        other_saeft = next(c for c in ax.containers if c.lines[0].get_gid() == "other:saeft")
        assert len(other_saeft.lines[0].get_xdata()) == 2
        # One WiSE-FT curve through its 3 alphas in alpha order; the front through the Pareto points.
        [curve] = [line for line in ax.get_lines() if line.get_gid() == "curve:wiseft"]
        wise = points[(points["axis"] == axis) & points["alpha"].notna()].sort_values("alpha")
        np.testing.assert_allclose(curve.get_xdata(), wise["x_mean"] * 100)
        [front] = [line for line in ax.get_lines() if line.get_gid() == "pareto-front"]
        expected = marked[(marked["axis"] == axis) & marked["pareto"]].sort_values("x_mean")
        np.testing.assert_allclose(front.get_xdata(), expected["x_mean"] * 100)
        assert 2 <= len(expected) < len(points[points["axis"] == axis])
        # Only SAE-FT (3 variants) has its selected variant labelled.
        assert [t.get_text() for t in ax.texts] == ["lambda=1, mu=1"]
    assert _legend(fig) == ["Zero-shot", "FT", "WiSE-FT", "SAE-FT", PARETO_LABEL, SELECTED_LABEL, OTHER_LABEL]
    # Nothing overlaps the legend outside the panels.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend_box = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not ax.get_tightbbox(renderer).overlaps(legend_box)


def test_frontier_of_a_dataset_without_points(tmp_path):
    points = synthetic_points()
    fig = plot_frontier(points, "elsewhere", AggregateConfig(), tmp_path / "e.png", tmp_path / "e.pdf")
    _looked_at(tmp_path / "e.png")
    assert len(fig.axes) == 1 and "no ID and OOD points" in fig.axes[0].texts[0].get_text()
    fig = plot_frontier(points.iloc[:0], "shapes", AggregateConfig(percent=False), tmp_path / "z.png")
    assert fig.axes[0].get_xlabel() == "ID accuracy (fraction)"


def test_points_without_values_are_left_out(tmp_path):
    points = synthetic_points()
    points.loc[points["method"] == "ft", "y_mean"] = NAN
    points.loc[points["method"] == "zeroshot", ["x_low", "x_high"]] = NAN  # no interval: no bar, still drawn
    fig = plot_frontier(points, "shapes", AggregateConfig(), tmp_path / "n.png")
    gids = {c.lines[0].get_gid() for c in fig.axes[0].containers}
    assert "selected:ft" not in gids and "selected:zeroshot" in gids
