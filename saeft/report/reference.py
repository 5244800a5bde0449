"""Published numbers beside ours: the comparison table of the aggregate stage.

The published cells live in ``saeft/assets/reference_results.csv`` (transcribed from
``docs/reference_results.md``): model, pretrained weights, dataset, method, eval set, a value or a range
(``low``..``high``: values read off plots, or a best point whose alpha is not stated), metric and
source. ``*`` as the model or the weights matches any (the source does not state them); ``*`` as
the dataset matches the eval set as a transfer set of any dataset, or as the ID test set of the
dataset of that name. A study whose weights differ from a cell's (``aggregate`` config
``pretrained``, set from ``model.pretrained``) is not compared with it.
"""

from __future__ import annotations

import logging
from importlib import resources

import numpy as np
import pandas as pd

from saeft.config.aggregate import AggregateConfig
from saeft.report.paper_tables import Column, Table

logger = logging.getLogger(__name__)

REFERENCE_COLUMNS = ("model", "pretrained", "dataset", "method", "evalset", "low", "high", "metric", "source")


def load_reference(path: str | None = None) -> pd.DataFrame:
    """The published cells (the packaged CSV unless ``path``); checks columns and ranges."""
    source = path or resources.files("saeft") / "assets" / "reference_results.csv"
    ref = pd.read_csv(source, dtype={"model": str, "pretrained": str, "dataset": str, "method": str, "evalset": str})
    missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")
    bad = ~((0 <= ref["low"]) & (ref["low"] <= ref["high"]) & (ref["high"] <= 1))
    if bad.any():
        raise ValueError(f"{source}: rows {list(np.flatnonzero(bad.to_numpy()) + 2)} need 0 <= low <= high <= 1")
    return ref


def reference_table(summary: pd.DataFrame, cfg: AggregateConfig, ref: pd.DataFrame | None = None) -> Table:
    """One row per published cell that this study has a result for: ours (mean ± std over
    seeds), the published value (or range), and ours minus it (0 inside a range)."""
    ref = load_reference() if ref is None else ref
    rows = []
    several = summary["model"].nunique() > 1
    for _, r in ref.iterrows():
        if r["pretrained"] != "*" and cfg.pretrained is not None and cfg.pretrained != r["pretrained"]:
            continue  # other weights: not the same experiment
        for _, ours in summary[_matches(summary, r)].iterrows():
            column = _column(ours, r)
            if r["metric"] not in str(ours["metric"]).split("/") or column is None or pd.isna(ours.get(f"{column} mean", np.nan)):
                continue
            mean, std = ours[f"{column} mean"], ours[f"{column} std"]
            low, high = float(r["low"]), float(r["high"])
            diff = mean - high if mean > high else mean - low if mean < low else 0.0
            scale = cfg.scale_and_unit()[0]
            shown = f"{low * scale:.1f}" if low == high else f"{low * scale:.1f}–{high * scale:.1f}"
            section = f"{ours['model']} / {ours['dataset']}" if several or r["model"] != "*" else str(ours["dataset"])
            rows.append({
                "section": section, "model": ours["model"], "dataset": ours["dataset"], "method": ours["method"],
                "evalset": column, "label": f"{ours['label']}: {column}",
                "ours mean": mean, "ours std": std,
                "reference mean": (low + high) / 2, "reference std": np.nan, "reference text": shown,
                "difference mean": diff, "difference std": np.nan,
                "source": r["source"],
            })
    columns = [Column("ours", "ours"), Column("reference", "published"), Column("difference", "ours − published", signed=True)]
    frame = pd.DataFrame(rows, columns=[
        "section", "model", "dataset", "method", "evalset", "label", "ours mean", "ours std",
        "reference mean", "reference std", "reference text", "difference mean", "difference std", "source",
    ])
    unit = cfg.scale_and_unit()[1]
    caption = (
        f"Ours beside published numbers ({unit}), where a cell has one: mean ± std over seeds; the published "
        "value, or a range (values read off plots are ±0.5; the WiSE-FT row is the best-OOD point of its curve, "
        "ours the reported alpha); the difference is 0 inside a range. Sources in the CSV's source column."
    )
    if frame.empty:
        models = ", ".join(sorted(summary["model"].unique()))
        datasets = ", ".join(sorted(summary["dataset"].unique()))
        caption += (
            f" No published value applies to this study (model {models}; datasets {datasets}): published cells "
            f"exist for {', '.join(sorted(set(ref['model']) - {'*'}))} ({', '.join(sorted(set(ref['pretrained']) - {'*'}))} "
            f"weights) and unstated backbones on {', '.join(sorted(set(ref['dataset']) - {'*'}))}."
        )
    logger.info("reference comparison: %d cell(s) with a published value", len(frame))
    return Table("reference", caption, frame, columns, row_header="Method: eval set", bold=False)


def _matches(summary: pd.DataFrame, r: pd.Series) -> pd.Series:
    keep = summary["method"] == r["method"]
    if r["model"] != "*":
        keep &= summary["model"] == r["model"]
    if r["dataset"] != "*":
        keep &= summary["dataset"] == r["dataset"]
    return keep


def _column(ours: pd.Series, r: pd.Series) -> str | None:
    """The summary column of the published cell in this row of ours, if any."""
    if r["dataset"] != "*":
        return r["evalset"] if f"{r['evalset']} mean" in ours.index else None
    if f"{r['evalset']} mean" in ours.index and pd.notna(ours[f"{r['evalset']} mean"]):
        return r["evalset"]  # a transfer set of that name
    if ours["dataset"] == r["evalset"]:  # fine-tuned on the dataset itself: its ID test set
        return next(e for e in str(ours["id_evalsets"]).split(", ") if e)
    return None
