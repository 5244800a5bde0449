"""Stage ``aggregate_tables``: every paper table and figure, written from the evaluation results.

:func:`run` reads the evaluation bundles and the fine-tuning ``train.json`` (:mod:`saeft.report.results`),
writes the tidy table as Parquet, the tables of :mod:`saeft.report.paper_tables` and :mod:`saeft.report.reference`
(CSV, Markdown, LaTeX, HTML) and the figures of :mod:`saeft.report.figures` (PNG, PDF), all atomically,
under the names of :func:`saeft.plan.outputs.output_names`.

Import direction: ``outputs``/``runs`` < ``results`` < ``paper_tables`` < ``reference``, ``figures`` <
``aggregate``; nothing below imports this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from saeft.config.aggregate import AggregateConfig
from saeft.infra.io import atomic_path, read_json
from saeft.plan.outputs import METRICS_PARQUET
from saeft.report import calibration, intervals, reference, variant_tables
from saeft.report import figures as fig_mod
from saeft.report import frontier as frontier_mod
from saeft.report import paper_tables as tab_mod
from saeft.report.results import (OOD_AVG, load_metrics, read_selections, read_training_logs, reported_results, summarize,
                                  wiseft_curves)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Outputs:
    """What :func:`run` wrote, for the caller to log."""

    headline: dict[str, float]
    """``"{model}/{dataset}/{method}/id"`` and ``.../ood_avg`` means (fractions), ``n_eval_results``."""
    tables: dict[str, pd.DataFrame]
    """Each table's numeric frame (its CSV), by file stem; ``metrics``: the tidy long table."""
    figures: dict[str, Figure]
    """Each figure by file stem."""
    table_files: list[Path]
    """Every table file written (Parquet, CSV, Markdown, LaTeX, HTML)."""


def run(
    eval_paths: Iterable[str | os.PathLike],
    out_dir_tables: str | os.PathLike,
    out_dir_figures: str | os.PathLike,
    cfg: AggregateConfig,
    train_paths: Iterable[str | os.PathLike] = (),
    prediction_paths: Iterable[str | os.PathLike] = (),
    selection_paths: Iterable[str | os.PathLike] = (),
    variants: dict[str, Any] | None = None,
    calibration_paths: Iterable[str | os.PathLike] = (),
) -> Outputs:
    """Write the tidy table, every paper table in every format and every figure (the names of
    :func:`saeft.plan.outputs.output_names`), all atomically, from the eval JSONs (every variant and
    WiSE-FT curve point), the per-image predictions behind them (the intervals; none: the tables
    show stds and the frontier has no intervals), each dataset's ``selection.json`` (which
    variant the tables report; none: each method has one), the fine-tuning jobs' ``train.json``
    and each calibrated dataset's ``calibration.json`` (the calibration table; where a gate
    criterion fails, the comparison and the figures say so instead of giving a reading)."""
    tables_dir, figures_dir = Path(out_dir_tables), Path(out_dir_figures)
    eval_paths, prediction_paths = list(eval_paths), list(prediction_paths)
    everything = load_metrics(eval_paths)
    models = sorted(everything["model"].unique())
    if len(models) > 1:
        raise ValueError(f"one model per study: the results hold {', '.join(models)}")
    selections = read_selections(selection_paths)
    reported_variant = {(d, m): e["selected"] for d, rec in selections.items() for m, e in rec["methods"].items()}
    df = everything.assign(selected=reported_mask(everything, reported_variant))
    shown = df[df["selected"]].drop(columns="selected")
    ev = _evaluations(everything, eval_paths, prediction_paths, cfg)
    summary = summarize(shown, cfg)
    if ev is not None:
        summary = intervals.add_intervals(summary, reported_results(shown, cfg), ev, cfg.level)
    training = read_training_logs(train_paths)  # a bad log fails the stage before anything is written
    calibrations = [read_json(path) for path in calibration_paths]
    uncalibrated = {c["dataset"]: c["failures"] for c in calibrations if c["failures"]}

    with atomic_path(tables_dir / METRICS_PARQUET) as tmp:
        df.to_parquet(tmp, engine="pyarrow", index=False)
    points = _frontier(df, ev, reported_variant, cfg)
    diffs = intervals.comparisons(reported_results(shown, cfg), ev, cfg.compare, cfg.compare_with, cfg.level) if ev else pd.DataFrame()
    built = [*tab_mod.build_tables(shown, summary, cfg), reference.reference_table(summary, cfg),
             variant_tables.selection_table(selections, points, cfg), variant_tables.comparison_table(diffs, cfg, uncalibrated),
             variant_tables.frontier_table(points, cfg)]
    written = [tables_dir / METRICS_PARQUET, *write_tables(built, tables_dir, cfg)]
    if calibrations:
        written += write_calibration([r for c in calibrations for r in c["criteria"]], tables_dir)
    figures = draw_figures(shown, summary, cfg, figures_dir, training)
    for dataset in summary["dataset"].unique():
        stem = f"frontier_{dataset}"
        figures[stem] = frontier_mod.plot_frontier(points, dataset, cfg, figures_dir / f"{stem}.png", figures_dir / f"{stem}.pdf")
    mark_uncalibrated(figures, uncalibrated, figures_dir)
    logger.info(
        "aggregated %d results into %d tables and %d figures in %s and %s",
        len(df), len(built), len(figures), tables_dir, figures_dir,
    )
    return Outputs(headline(shown, summary), {"metrics": df, **{t.name: t.frame for t in built}}, figures, written)


def reported_mask(df: pd.DataFrame, reported_variant: dict[tuple[str, str], str]) -> pd.Series:
    """True for the rows the paper tables show: zero-shot, WiSE-FT, and each fine-tuned method's
    reported variant (``reported_variant``: (dataset, method) -> variant; a method absent from it
    must have a single variant, else a ValueError names it)."""
    trained = df["alpha"].isna() & (df["method"] != "zeroshot")
    several = df[trained].groupby(["dataset", "method"])["variant"].nunique()
    unselected = [f"{d}/{m}" for (d, m), n in several.items() if n > 1 and (d, m) not in reported_variant]
    if unselected:
        raise ValueError(f"{', '.join(unselected)}: several variants but no selection.json says which one to report")
    chosen = [reported_variant.get((d, m), v) == v for d, m, v in zip(df["dataset"], df["method"], df["variant"])]
    return ~trained | pd.Series(chosen, index=df.index)


def _evaluations(df: pd.DataFrame, eval_paths: list[Any], prediction_paths: list[Any], cfg: AggregateConfig) -> intervals.Evaluations | None:
    if not prediction_paths:
        logger.warning("no per-image predictions given: the tables show stds over seeds, without intervals")
        return None
    metrics = {(d, e): m for d, e, m in zip(df["dataset"], df["evalset"], df["metric"])}
    return intervals.Evaluations(eval_paths, prediction_paths, metrics, cfg.bootstrap)


def _frontier(df: pd.DataFrame, ev: intervals.Evaluations | None, reported_variant: dict[tuple[str, str], str],
              cfg: AggregateConfig) -> pd.DataFrame:
    """The frontier's points with their Pareto flags (empty without predictions)."""
    if ev is None:
        return frontier_mod.mark_pareto(pd.DataFrame(columns=intervals.FRONTIER_COLUMNS))
    points = intervals.frontier_points(df[df["role"].isin(["id", "ood"])], ev, reported_variant, cfg.wiseft_alpha, cfg.label, cfg.level)
    return frontier_mod.mark_pareto(points)


def write_calibration(records: list[dict[str, Any]], tables_dir: Path) -> list[Path]:
    """``calibration.csv`` and ``calibration.md``: every calibrated dataset's criteria."""
    with atomic_path(tables_dir / "calibration.csv") as tmp:
        calibration.calibration_frame(records).to_csv(tmp, index=False, encoding="utf-8")
    with atomic_path(tables_dir / "calibration.md") as tmp:
        tmp.write_text(calibration.calibration_markdown(records), encoding="utf-8")
    return [tables_dir / "calibration.csv", tables_dir / "calibration.md"]


def mark_uncalibrated(figures: dict[str, Figure], failures: dict[str, list[str]], figures_dir: Path) -> None:
    """Stamp "world not calibrated: <criteria>" on the figures that compare methods (the overview,
    and per uncalibrated dataset its shifts and frontier) and save them again."""
    if not failures:
        return
    text = "; ".join(f"{dataset}: {calibration.not_calibrated_text(f)}" for dataset, f in failures.items())
    stems = ["id_vs_ood"] + [f"{kind}_{d}" for d in failures for kind in ("shifts", "frontier")]
    for stem in [s for s in stems if s in figures]:
        # As the suptitle (above any there was), so that the constrained layout makes room for it.
        title = "\n".join(part for part in (text, figures[stem].get_suptitle()) if part)
        figures[stem].suptitle(title, color="firebrick", fontsize=9, weight="bold")
        fig_mod.save_figure(figures[stem], figures_dir / f"{stem}.png", figures_dir / f"{stem}.pdf")


def write_tables(built: list[tab_mod.Table], tables_dir: Path, cfg: AggregateConfig) -> list[Path]:
    """Write each table as CSV (its numeric frame), Markdown, LaTeX and HTML; the paths written."""
    renderers = {"md": tab_mod.to_markdown, "tex": tab_mod.to_latex, "html": tab_mod.to_html}
    written = []
    for table in built:
        with atomic_path(tables_dir / f"{table.name}.csv") as tmp:
            table.frame.to_csv(tmp, index=False, encoding="utf-8")
        for ext, render in renderers.items():
            with atomic_path(tables_dir / f"{table.name}.{ext}") as tmp:
                tmp.write_text(render(table, cfg), encoding="utf-8")
        written += [tables_dir / f"{table.name}.{ext}" for ext in ("csv", *renderers)]
    return written


def draw_figures(
    df: pd.DataFrame,
    summary: pd.DataFrame,
    cfg: AggregateConfig,
    figures_dir: Path,
    training: dict[str, list[dict[str, Any]]],
) -> dict[str, Figure]:
    """Draw and save every figure (PNG and PDF) of the study; the figures by stem."""
    curves = wiseft_curves(df)

    def paths(stem: str) -> tuple[Path, Path]:
        return figures_dir / f"{stem}.png", figures_dir / f"{stem}.pdf"

    figures = {"id_vs_ood": fig_mod.plot_id_vs_ood(summary, cfg, *paths("id_vs_ood"))}
    transfer = sorted(set(df.loc[df["role"] == "transfer", "evalset"]))
    for dataset in summary["dataset"].unique():
        figures[f"shifts_{dataset}"] = fig_mod.plot_shifts(summary, curves, dataset, cfg, *paths(f"shifts_{dataset}"))
        figures[f"bars_{dataset}"] = fig_mod.plot_bars(summary, dataset, cfg, *paths(f"bars_{dataset}"), transfer=transfer)
        figures[f"training_{dataset}"] = fig_mod.plot_training(
            training.get(dataset, []), dataset, cfg, *paths(f"training_{dataset}"), methods=list(summary["method"])
        )
    return figures


def headline(df: pd.DataFrame, summary: pd.DataFrame) -> dict[str, float]:
    """The numbers the stage logs: ``n_eval_results``, and per summary row its first ID eval set's
    mean (``<model>/<dataset>/<method>/id``) and OOD average (``.../ood_avg``)."""
    out: dict[str, float] = {"n_eval_results": float(len(df))}
    for _, row in summary.iterrows():
        key = f"{row['model']}/{row['dataset']}/{row['method']}"
        id_sets = [e for e in row["id_evalsets"].split(", ") if e]
        if id_sets and pd.notna(row[f"{id_sets[0]} mean"]):
            out[f"{key}/id"] = float(row[f"{id_sets[0]} mean"])
        if pd.notna(row[f"{OOD_AVG} mean"]):
            out[f"{key}/ood_avg"] = float(row[f"{OOD_AVG} mean"])
    return out


__all__ = ["Outputs", "draw_figures", "headline", "run", "write_tables"]
