"""Intervals of a study's numbers, from the per-image predictions behind every evaluation.

:class:`Evaluations` holds each evaluated run's predictions (``predictions.parquet``, beside its
``evals.json``) and one bootstrap resample of the images per eval set, shared by every run of it
(:mod:`saeft.report.uncertainty`: the bootstrap is paired across seeds and methods). On it:

- :func:`add_intervals`: the 95% interval of every cell of the summary (``"C low"``, ``"C high"``);
- :func:`frontier_points`: every variant of every method, and every WiSE-FT curve point, as ID
  against the OOD average and each shift, each with its interval (the frontier figure and table);
- :func:`comparisons`: the paired difference of one method's reported variant against others,
  in ID and OOD average, with its interval.

A run is ``(variant, seed, alpha)`` of a dataset: ``zeroshot`` with seed and alpha None, a
fine-tuned variant (:mod:`saeft.plan.variants`) per seed, and WiSE-FT of a variant at an alpha.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from saeft.infra.io import read_json
from saeft.report import uncertainty
from saeft.report.results import OOD_AVG

logger = logging.getLogger(__name__)

Run = tuple[str, "int | None", "float | None"]
"""(variant, seed, alpha) of one evaluated model."""


def _key(value: Any) -> Any:
    """A seed or alpha as a dict key: None for null/NaN, else the number."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA else value


class Evaluations:
    """Per-image predictions of every evaluated run, by dataset, and the bootstrap resamples."""

    def __init__(self, eval_paths: Iterable[str | os.PathLike], prediction_paths: Iterable[str | os.PathLike],
                 metrics: Mapping[tuple[str, str], str], n_boot: int) -> None:
        """``metrics``: (dataset, eval set) -> its metric; ``n_boot`` resamples per eval set."""
        self.arrays: dict[tuple[str, str, Any, Any, str], tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self.metrics = dict(metrics)
        self.n_boot = n_boot
        self._indices: dict[tuple[str, str], np.ndarray] = {}
        for eval_path, path in zip(eval_paths, prediction_paths):
            identity = read_json(eval_path)
            variant = identity.get("variant") or identity["method"]
            run = (identity["dataset"], variant, _key(identity.get("seed")), _key(identity.get("alpha")))
            table = pd.read_parquet(path)
            for evalset, rows in table.groupby("evalset", sort=False):
                group = rows["group"].to_numpy(dtype=object) if rows["group"].notna().any() else None
                self.arrays[(*run, str(evalset))] = (rows["predicted"].to_numpy(), rows["target"].to_numpy(), group)

    def indices(self, dataset: str, evalset: str, n_images: int) -> np.ndarray:
        """The resamples of one eval set: seeded by its name, so a rerun draws the same ones."""
        if (dataset, evalset) not in self._indices:
            seed = zlib.crc32(f"{dataset}/{evalset}".encode())
            self._indices[(dataset, evalset)] = uncertainty.bootstrap_indices(n_images, self.n_boot, seed)
        return self._indices[(dataset, evalset)]

    def replicates(self, dataset: str, runs: Sequence[Run], evalset: str) -> uncertainty.Replicates:
        """The eval set's metric per run (its seeds) on the whole set and on every resample."""
        arrays = []
        for variant, seed, alpha in runs:
            key = (dataset, variant, _key(seed), _key(alpha), evalset)
            if key not in self.arrays:
                raise ValueError(f"no predictions for {dataset}/{variant} seed {seed} alpha {alpha} on {evalset}")
            arrays.append((_key(seed), *self.arrays[key]))
        indices = self.indices(dataset, evalset, len(arrays[0][2]))
        return uncertainty.replicates(self.metrics[(dataset, evalset)], arrays, indices)

    def column(self, dataset: str, runs: Sequence[Run], column: str, ood_sets: Sequence[str]) -> uncertainty.Replicates:
        """An eval set's replicates, or the OOD average's (per seed, the mean over ``ood_sets``)."""
        if column == OOD_AVG:
            return uncertainty.average([self.replicates(dataset, runs, evalset) for evalset in ood_sets])
        return self.replicates(dataset, runs, column)


def runs_of(rows: pd.DataFrame) -> list[Run]:
    """The distinct runs of some rows of the tidy table, in order of appearance."""
    unique = rows.drop_duplicates(["variant", "seed", "alpha"])
    return [(str(v), _key(s), _key(a)) for v, s, a in zip(unique["variant"], unique["seed"], unique["alpha"])]


def _sets(group: pd.DataFrame, role: str) -> list[str]:
    return list(dict.fromkeys(group.loc[group["role"] == role, "evalset"]))


def add_intervals(summary: pd.DataFrame, reported: pd.DataFrame, ev: Evaluations, level: float) -> pd.DataFrame:
    """``summary`` with ``"C low"`` and ``"C high"`` beside every value column C that has a mean
    (the interval of :func:`saeft.report.uncertainty.interval`, over the row's seeds)."""
    out = summary.copy()
    columns = [c[:-5] for c in summary.columns if c.endswith(" mean")]
    for c in columns:
        out[f"{c} low"], out[f"{c} high"] = np.nan, np.nan
    for (model, dataset), group in reported.groupby(["model", "dataset"], sort=False):
        ood_sets = _sets(group, "ood")
        for index in out.index[(out["model"] == model) & (out["dataset"] == dataset)]:
            runs = runs_of(group[group["method"] == out.at[index, "method"]])
            for c in columns:
                if pd.isna(out.at[index, f"{c} mean"]) or (c == OOD_AVG and not ood_sets):
                    continue
                bounds = uncertainty.interval(ev.column(dataset, runs, c, ood_sets), level)
                out.at[index, f"{c} low"], out.at[index, f"{c} high"] = bounds.low, bounds.high
    return out


def frontier_points(selected_rows: pd.DataFrame, ev: Evaluations, reported_variant: Mapping[tuple[str, str], str],
                    wiseft_alpha: float | None, label: Any, level: float) -> pd.DataFrame:
    """Long: Every evaluated point of every dataset, one row per y axis (``OOD avg``, then
    each shift): zero-shot, every variant of every method, and WiSE-FT at every alpha; the
    columns :func:`saeft.report.frontier.plot_frontier` reads (x: the first ID eval set; intervals;
    ``selected``: the reported variant, or WiSE-FT at the reported alpha)."""
    rows = []
    for (model, dataset), group in selected_rows.groupby(["model", "dataset"], sort=False):
        id_sets, ood_sets = _sets(group, "id"), _sets(group, "ood")
        if not id_sets or not ood_sets:
            continue
        for (method, variant, alpha), point in group.groupby(["method", "variant", "alpha"], sort=False, dropna=False):
            runs = runs_of(point)
            x = uncertainty.interval(ev.column(dataset, runs, id_sets[0], ood_sets), level)
            if pd.isna(alpha):
                # Zero-shot and single-variant methods are absent from the selection: reported.
                chosen = reported_variant.get((dataset, method), variant) == variant
            else:
                chosen = wiseft_alpha is not None and bool(np.isclose(alpha, wiseft_alpha))
            for axis in [OOD_AVG, *ood_sets]:
                y = uncertainty.interval(ev.column(dataset, runs, axis, ood_sets), level)
                rows.append({"model": model, "dataset": dataset, "method": method, "label": label(method),
                             "variant": variant, "alpha": alpha, "selected": bool(chosen), "n_seeds": len(runs),
                             "metric": str(point["metric"].iloc[0]), "axis": axis,
                             "x_mean": x.mean, "x_low": x.low, "x_high": x.high,
                             "y_mean": y.mean, "y_low": y.low, "y_high": y.high})
    return pd.DataFrame(rows, columns=FRONTIER_COLUMNS)


FRONTIER_COLUMNS = ["model", "dataset", "method", "label", "variant", "alpha", "selected", "n_seeds", "metric", "axis",
                    "x_mean", "x_low", "x_high", "y_mean", "y_low", "y_high"]
"""Columns of :func:`frontier_points` (the ``pareto`` column is added by saeft.report.frontier.mark_pareto)."""


def comparisons(reported: pd.DataFrame, ev: Evaluations, method: str, others: Sequence[str], level: float) -> pd.DataFrame:
    """Per (model, dataset) and each of ``others`` the study has: ``method`` minus it in ID (first
    ID eval set) and the OOD average, paired by seed (the seeds both have) and by image; columns
    model, dataset, method, other, n_seeds, then mean, low, high and se of ``ΔID`` and ``ΔOOD``."""
    rows = []
    for (model, dataset), group in reported.groupby(["model", "dataset"], sort=False):
        id_sets, ood_sets = _sets(group, "id"), _sets(group, "ood")
        if method not in set(group["method"]) or not id_sets:
            continue
        ours = runs_of(group[group["method"] == method])
        for other in [o for o in others if o in set(group["method"]) and o != method]:
            theirs = runs_of(group[group["method"] == other])
            row: dict[str, Any] = {"model": model, "dataset": dataset, "method": method, "other": other}
            for name, column in (("ΔID", id_sets[0]), ("ΔOOD", OOD_AVG if ood_sets else None)):
                if column is None:
                    continue
                diff = uncertainty.difference(ev.column(dataset, ours, column, ood_sets), ev.column(dataset, theirs, column, ood_sets))
                bounds = uncertainty.interval(diff, level)
                row.update({f"{name} mean": bounds.mean, f"{name} low": bounds.low, f"{name} high": bounds.high,
                            f"{name} se": bounds.se, "n_seeds": bounds.n_seeds})
            rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["Evaluations", "FRONTIER_COLUMNS", "add_intervals", "comparisons", "frontier_points", "runs_of"]
