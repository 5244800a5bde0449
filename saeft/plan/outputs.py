"""The file names the aggregate stage writes, known while the workflow plans.

Imports nothing heavy (no pandas, numpy, torch or matplotlib): the workflow declares the outputs
of ``aggregate_tables`` with :func:`output_names` before any result exists.
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS_PARQUET = "metrics.parquet"
"""The tidy long table: every eval result, one row each (the source of every other table)."""

TABLE_FORMATS = ("csv", "md", "tex", "html")
"""Every table is written in each of these formats."""

FIGURE_FORMATS = ("png", "pdf")
"""Every figure is written in each of these formats."""

WILDS_METRICS = ("macro_f1", "worst_region_acc")
"""Metrics that mark a WILDS dataset (its table has ID and OOD columns per dataset)."""


def table_names(dataset_metrics: dict[str, str], has_transfer: bool) -> list[str]:
    """Names of the paper tables a study writes, from its datasets' metrics and whether it has
    transfer sets: what :func:`saeft.report.paper_tables.build_tables` returns, known before any result exists."""
    names = ["shifts"]
    if any(m in WILDS_METRICS for m in dataset_metrics.values()):
        names.append("wilds")
    if has_transfer:
        names.append("transfer")
    return names + ["robustness", "selection", "comparison", "frontier"]


def figure_stems(datasets: Sequence[str]) -> list[str]:
    """Stems of the figures a study draws: the ID-vs-OOD overview, then per dataset its shifts,
    bars, training curves and ID–OOD frontier."""
    return ["id_vs_ood"] + [f"{kind}_{d}" for d in datasets for kind in ("shifts", "bars", "training", "frontier")]


def output_names(datasets: Sequence[str], dataset_metrics: dict[str, str], has_transfer: bool) -> tuple[list[str], list[str]]:
    """File names :func:`saeft.report.run` writes under the tables and the figures folder, for a
    study with these datasets (and their metrics) and, or not, transfer sets. The workflow
    declares them."""
    tables = [METRICS_PARQUET] + [
        f"{name}.{ext}" for name in [*table_names(dataset_metrics, has_transfer), "reference"] for ext in TABLE_FORMATS
    ]
    return tables, [f"{stem}.{ext}" for stem in figure_stems(datasets) for ext in FIGURE_FORMATS]


__all__ = ["FIGURE_FORMATS", "METRICS_PARQUET", "TABLE_FORMATS", "WILDS_METRICS", "figure_stems", "output_names", "table_names"]
