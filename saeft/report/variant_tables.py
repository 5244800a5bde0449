"""The tables about variants: which one each method reports (``selection``), the paired
comparison of one method with the others (``comparison``), and every point of the ID–OOD
frontier (``frontier``). Each is a :class:`saeft.report.paper_tables.Table`, so it is written in every format
like the paper tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from saeft.config.aggregate import AggregateConfig
from saeft.plan.variants import parse_name
from saeft.report.calibration import not_calibrated_text
from saeft.report.paper_tables import Column, Table, _order, _section
from saeft.report.results import format_parts


def _params_text(variant: str, params: Mapping[str, Any]) -> str:
    """A variant's own values as ``key=value`` (a grid point's label; a named variant's keys)."""
    label = parse_name(variant)[1]
    if label is not None and "=" in label:
        return label.replace(",", ", ")
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "(defaults)"


def selection_table(selections: Mapping[str, Mapping[str, Any]], frontier: pd.DataFrame, cfg: AggregateConfig) -> Table:
    """Per dataset and method with several variants: the variant selected on ID validation, its
    values and validation score, how many were tried on which seeds, and, labelled as an upper
    bound, the OOD oracle's choice; the OOD average of both (from ``frontier``)."""
    columns = [Column("selected", "selected (ID validation)"), Column("params", "its values"), Column("val", "ID val"),
               Column("ood", "its OOD avg"), Column("tried", "variants tried"), Column("oracle", "OOD oracle (peeks)"),
               Column("oracle_ood", "oracle's OOD avg"), Column("reported_ood", "reported OOD avg, every seed")]
    ood = frontier[(frontier["axis"] == "OOD avg") & frontier["alpha"].isna()].set_index(["dataset", "variant"])["y_mean"]
    rows = []
    for dataset, record in selections.items():
        for method, entry in record["methods"].items():
            chosen, oracle = entry["selected"], entry.get("oracle", {})
            ood_scores = oracle.get("scores", {})  # on the selection seeds, like the validation scores
            row = {"section": dataset, "dataset": dataset, "method": method, "label": cfg.label(method),
                   "selected text": chosen, "params text": _params_text(chosen, entry["params"].get(chosen, {})),
                   "val mean": entry["scores"][chosen], "ood mean": ood_scores.get(chosen, np.nan),
                   "tried text": f"{len(entry['scores'])} on seed(s) {', '.join(map(str, record['seeds']))}",
                   "oracle text": oracle.get("selected", ""),
                   "oracle_ood mean": ood_scores.get(oracle.get("selected"), np.nan),
                   "reported_ood mean": ood.get((dataset, chosen), np.nan)}
            rows.append(row)
    frame = _with_stats(pd.DataFrame(rows), columns)
    criterion = next(iter(selections.values()))["criterion"] if selections else "no method has several variants"
    caption = (f"Variant selection ({cfg.scale_and_unit()[1]}): per method with several variants, the one reported: "
               f"{criterion}. ID val, its OOD avg and the oracle's are on the selection seeds; the last column is the "
               "reported variant on every seed. The OOD oracle column picks on the shifts themselves: an upper bound "
               "that peeks, never a reported result.")
    return Table("selection", caption, _order(frame, cfg) if len(frame) else frame, columns, bold=False)


def comparison_table(diffs: pd.DataFrame, cfg: AggregateConfig, uncalibrated: Mapping[str, Sequence[str]] | None = None) -> Table:
    """``cfg.compare`` minus each other method, in ID and OOD average, paired by seed and image:
    the difference, its interval, and what the interval says; on a dataset of ``uncalibrated``
    (dataset -> the gate criteria it fails) no reading, but "world not calibrated: <criteria>"."""
    uncalibrated = uncalibrated or {}
    columns = [Column("ΔID", "ΔID", signed=True), Column("ΔOOD", "ΔOOD avg", signed=True), Column("reading", "reading")]
    rows = []
    several = diffs["model"].nunique() > 1 if len(diffs) else False
    for _, d in diffs.iterrows():
        row: dict[str, Any] = {"section": _section(d["model"], d["dataset"], several), "model": d["model"],
                               "dataset": d["dataset"], "method": d["other"], "n_seeds": d.get("n_seeds"),
                               "label": f"{cfg.label(d['method'])} − {cfg.label(d['other'])}"}
        for key in ("ΔID", "ΔOOD"):
            for stat in ("mean", "low", "high", "se"):
                row[f"{key} {stat}"] = d.get(f"{key} {stat}", np.nan)
            row[f"{key} text"] = _with_interval(row[f"{key} mean"], row[f"{key} low"], row[f"{key} high"], cfg)
        row["reading text"] = "; ".join(_reading(k, row[f"Δ{k} low"], row[f"Δ{k} high"]) for k in ("ID", "OOD"))
        if uncalibrated.get(d["dataset"]):
            row["reading text"] = not_calibrated_text(uncalibrated[d["dataset"]])
        rows.append(row)
    frame = _with_stats(pd.DataFrame(rows), columns)
    caption = (f"{cfg.label(cfg.compare)} (its reported variant) minus each method ({cfg.scale_and_unit()[1]}): the mean over "
               f"seeds of the paired difference, with its {cfg.level:.0%} interval (the same eval images and seeds, "
               "bootstrap over images plus the spread over seeds). An interval that excludes 0 is a difference this "
               "study resolves; one that holds 0 is not. Where the world fails a calibration gate criterion "
               "(tables/calibration.md), the reading says so instead: that world cannot judge the method.")
    return Table("comparison", caption, _order(frame, cfg) if len(frame) else frame, columns, bold=False)


def _with_interval(mean: float, low: float, high: float, cfg: AggregateConfig) -> str:
    if pd.isna(mean):
        return ""
    text = [format_parts(v, np.nan, cfg, signed=True)[0] for v in (mean, low, high)]
    return f"{text[0]} [{text[1]}, {text[2]}]"


def _reading(what: str, low: float, high: float) -> str:
    if pd.isna(low) or pd.isna(high):
        return f"{what}: n/a"
    if low > 0:
        return f"{what} higher"
    if high < 0:
        return f"{what} lower"
    return f"{what} not resolved"


def _with_stats(frame: pd.DataFrame, columns: list[Column]) -> pd.DataFrame:
    """Every column's ``mean`` and ``std`` present (NaN where it has only text), as the renderers
    read them; an empty frame gets the identity columns."""
    if frame.empty:
        frame = pd.DataFrame(columns=["section", "dataset", "method", "label"])
    for c in columns:
        for stat in ("mean", "std"):
            if f"{c.key} {stat}" not in frame.columns:
                frame[f"{c.key} {stat}"] = np.nan
        frame[f"{c.key} mean"] = frame[f"{c.key} mean"].astype("float64")
    return frame


def frontier_table(points: pd.DataFrame, cfg: AggregateConfig) -> Table:
    """Every frontier point (every variant, WiSE-FT curve point and zero-shot) on the OOD average:
    ID and OOD with intervals, whether it is the reported one and on the Pareto front."""
    columns = [Column("ID", "ID"), Column("OOD avg", "OOD avg"), Column("variant", "variant"), Column("flags", "")]
    rows = []
    for _, p in points[points["axis"] == "OOD avg"].iterrows():
        alpha = "" if pd.isna(p["alpha"]) else f" (α={p['alpha']:g})"
        flags = ", ".join(f for f, on in (("reported", p["selected"]), ("Pareto", p.get("pareto", False))) if on)
        rows.append({"section": p["dataset"], "model": p["model"], "dataset": p["dataset"], "method": p["method"],
                     "label": p["label"], "n_seeds": p["n_seeds"], "variant text": p["variant"] + alpha, "flags text": flags,
                     "alpha": p["alpha"], "selected": p["selected"], "pareto": p.get("pareto", False),
                     "ID mean": p["x_mean"], "ID low": p["x_low"], "ID high": p["x_high"],
                     "OOD avg mean": p["y_mean"], "OOD avg low": p["y_low"], "OOD avg high": p["y_high"]})
    frame = _with_stats(pd.DataFrame(rows), columns)
    caption = (f"The ID–OOD frontier ({cfg.scale_and_unit()[1]}): every variant of every method (on the seeds it ran), "
               f"WiSE-FT at every α, and zero-shot; mean ± the half-width of the {cfg.level:.0%} interval. 'reported': "
               "the variant the tables show; 'Pareto': no other point is at least as good in both ID and OOD.")
    return Table("frontier", caption, frame, columns, bold=False)


__all__ = ["comparison_table", "frontier_table", "selection_table"]
