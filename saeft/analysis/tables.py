"""Stage ``aggregate_features``: the feature analysis of every run as tables and figures, joined
with the evaluation results (built from the stage outputs on disk only).

Writes under the study's ``tables/``:

- ``features.parquet``: one row per (model, dataset, method, seed, eval set) with the analysis
  measures and that run's metric value on the eval set (``value``);
- ``features_summary.csv`` and ``features_summary.md``: per method, the ID eval set and the OOD
  average of each measure, mean ± std over seeds;
- ``features_top.csv``: per method and role (ID / OOD), the features most often added and
  removed, pooled over seeds and eval sets (share of images);

and under ``figures/``: ``features_added_removed.{png,pdf}`` (features added and removed per
image, per method, ID and OOD) and ``drift_vs_ood.{png,pdf}`` (CKA and FVU under the zero-shot
SAE per method against OOD-average accuracy; the zero-shot model at CKA 1).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from saeft.config.aggregate import AggregateConfig
from saeft.infra.io import atomic_path, read_json
from saeft.report.results import load_metrics

logger = logging.getLogger(__name__)

FEATURES_PARQUET = "features.parquet"
FEATURES_SUMMARY_CSV = "features_summary.csv"
FEATURES_SUMMARY_MD = "features_summary.md"
FEATURES_TOP_CSV = "features_top.csv"
ADDED_REMOVED_PNG = "features_added_removed.png"
ADDED_REMOVED_PDF = "features_added_removed.pdf"
DRIFT_PNG = "drift_vs_ood.png"
DRIFT_PDF = "drift_vs_ood.pdf"
TABLE_FILES = (FEATURES_PARQUET, FEATURES_SUMMARY_CSV, FEATURES_SUMMARY_MD, FEATURES_TOP_CSV)
FIGURE_FILES = (ADDED_REMOVED_PNG, ADDED_REMOVED_PDF, DRIFT_PNG, DRIFT_PDF)

MEASURES = {
    "mean_added": "added / image",
    "mean_removed": "removed / image",
    "mean_mass_added": "mass added",
    "mean_mass_removed": "mass removed",
    "changed_fraction": "images changed",
    "cka": "CKA",
    "fvu_tuned": "FVU",
    "cosine_drift": "cosine drift",
    "span_share": "span share",
    "residual_share": "residual share",
}
"""Per-eval-set measures of the analysis JSON that the tables carry, with their display names."""

SUMMARY_MEASURES = ("mean_added", "mean_removed", "cka", "fvu_tuned", "cosine_drift", "span_share", "residual_share")
"""Measures of the Markdown summary (the CSV has all of :data:`MEASURES`)."""


def load_analyses(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (analysis JSON, eval set): identity, role, the :data:`MEASURES`, the SAE's own
    FVU on the zero-shot embeddings (``fvu_zeroshot``)."""
    rows = []
    for path in paths:
        data = read_json(path)
        for key in ("model", "dataset", "method", "seed", "evalsets"):
            if key not in data:
                raise ValueError(f"{path}: missing key '{key}'")
        for evalset, result in data["evalsets"].items():
            missing = [m for m in (*MEASURES, "role", "fvu_zeroshot") if m not in result]
            if missing:
                raise ValueError(f"{path}: eval set {evalset} lacks {', '.join(missing)}")
            rows.append({
                "model": data["model"], "dataset": data["dataset"], "method": data["method"],
                "seed": data["seed"], "evalset": evalset, "role": result["role"], "n": result["n"],
                **{m: result[m] for m in MEASURES}, "fvu_zeroshot": result["fvu_zeroshot"],
            })
    if not rows:
        raise ValueError("no feature analyses to aggregate")
    return pd.DataFrame(rows)


def join_metrics(analyses: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """The analyses with each run's metric ``value`` on the same eval set (NaN if not evaluated)."""
    key = ["model", "dataset", "method", "seed", "evalset"]
    values = metrics[key + ["value"]].astype({"seed": "float64"})
    joined = analyses.astype({"seed": "float64"}).merge(values, on=key, how="left")
    return joined.astype({"seed": "int64"})


def summarize(table: pd.DataFrame, cfg: AggregateConfig) -> pd.DataFrame:
    """Per (model, dataset, method): for each measure and the metric value, the ID eval set's and
    the OOD average's mean and std over seeds (columns ``"{measure} {ID|OOD} mean|std"``)."""
    rows = []
    for (model, dataset), group in table.groupby(["model", "dataset"], sort=False):
        for method in sorted(group["method"].unique(), key=cfg.method_sort_key):
            sub = group[group["method"] == method]
            row: dict[str, Any] = {"model": model, "dataset": dataset, "method": method,
                                   "label": cfg.label(method), "n_seeds": int(sub["seed"].nunique())}
            for measure in (*MEASURES, "value"):
                for role, name in (("id", "ID"), ("ood", "OOD")):
                    per_seed = sub[sub["role"] == role].groupby("seed")[measure].mean()
                    row[f"{measure} {name} mean"] = per_seed.mean() if len(per_seed) else np.nan
                    row[f"{measure} {name} std"] = per_seed.std(ddof=1) if len(per_seed) > 1 else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, scale: float = 1.0, decimals: int = 2) -> str:
    if pd.isna(mean):
        return "–"
    text = f"{mean * scale:.{decimals}f}"
    return text + (f" ± {std * scale:.{decimals}f}" if not pd.isna(std) else "")


def to_markdown(summary: pd.DataFrame, top: pd.DataFrame, cfg: AggregateConfig) -> str:
    """The summary as Markdown (``DataFrame.to_markdown``), one table per (model, dataset), then
    the most changed features."""
    parts = []
    several = summary[["model", "dataset"]].drop_duplicates().shape[0] > 1
    scale = cfg.scale_and_unit()[0]
    for (model, dataset), sec in summary.groupby(["model", "dataset"], sort=False):
        if several:
            parts += [f"### {model} / {dataset}", ""]
        shown = pd.DataFrame({"Method": list(sec["label"])})
        for m in SUMMARY_MEASURES:
            for r in ("ID", "OOD"):
                shown[f"{MEASURES[m]} {r}"] = [_cell(a, b) for a, b in zip(sec[f"{m} {r} mean"], sec[f"{m} {r} std"])]
        for r in ("ID", "OOD"):
            shown[f"acc {r}"] = [_cell(a, b, scale, cfg.decimals) for a, b in zip(sec[f"value {r} mean"], sec[f"value {r} std"])]
        parts += [_markdown(shown, ("left",) + ("right",) * (shown.shape[1] - 1)), ""]
        sub = top[(top["model"] == model) & (top["dataset"] == dataset)]
        if len(sub):
            parts += ["Most often changed features (share of images, pooled over seeds and eval sets):", ""]
            changed = [
                {"Method": cfg.label(method), "role": role.upper(), **{
                    d: ", ".join(f"{int(r.feature)} ({r.fraction:.0%})" for r in rows[rows["direction"] == d].itertuples()) or "–"
                    for d in ("added", "removed")
                }}
                for (method, role), rows in sub.groupby(["method", "role"], sort=False)
            ]
            parts += [_markdown(pd.DataFrame(changed), ("left",) * 4), ""]
    note = (
        "Per image, features added (active after fine-tuning only) and removed (active zero-shot "
        "only) under the zero-shot SAE; CKA (linear) between zero-shot and fine-tuned embeddings; "
        "FVU of the fine-tuned embeddings under the zero-shot SAE; cosine drift 1 − cos; span "
        "share: part of the embedding change in the span of the decoder columns active before or "
        "after; residual share: part not carried by the code change (SAE-FT's alignment residual). "
        "ID: the ID eval set; OOD: the mean over the shifts; mean ± std over seeds."
    )
    return "\n".join(parts) + "\n" + note + "\n"


def _markdown(frame: pd.DataFrame, align: Sequence[str]) -> str:
    """``frame`` as a Markdown pipe table, cells as given (no number parsing)."""
    return frame.map(lambda v: str(v).replace("|", "\\|")).to_markdown(index=False, colalign=tuple(align), disable_numparse=True)


def top_changed(image_tables: Sequence[tuple[dict[str, Any], pd.DataFrame]], roles: dict[tuple[str, str], str], top: int) -> pd.DataFrame:
    """Per (model, dataset, method, role, direction), the ``top`` features on the largest share of
    images, pooled over seeds and eval sets. ``image_tables``: (identity, per-image table) pairs;
    ``roles``: (dataset, eval set) -> role."""
    pooled: dict[tuple, Counter] = {}
    totals: Counter = Counter()
    for ident, images in image_tables:
        for evalset, rows in images.groupby("evalset", sort=False):
            role = roles[(ident["dataset"], evalset)]
            for direction in ("added", "removed"):
                key = (ident["model"], ident["dataset"], ident["method"], role, direction)
                counter = pooled.setdefault(key, Counter())
                counter.update(int(f) for row in rows[direction] for f in row)
                totals[key] += len(rows)
    out = []
    for key, counter in pooled.items():
        for rank, (feature, count) in enumerate(sorted(counter.items(), key=lambda i: (-i[1], i[0]))[:top], 1):
            out.append({**dict(zip(("model", "dataset", "method", "role", "direction"), key)),
                        "rank": rank, "feature": feature, "count": count, "fraction": count / totals[key]})
    return pd.DataFrame(out, columns=["model", "dataset", "method", "role", "direction", "rank", "feature", "count", "fraction"])


def plot_added_removed(summary: pd.DataFrame, path_png: str | os.PathLike, path_pdf: str | os.PathLike) -> None:
    """Grouped bars per method: features added and removed per image, ID and OOD average."""
    sections = list(summary.groupby(["model", "dataset"], sort=False))
    fig = Figure(figsize=(6.5, 3.4 * len(sections)))
    axes = fig.subplots(len(sections), 1, squeeze=False).ravel()
    bars = [("mean_added", "ID", "added, ID", "#2b7bba", None), ("mean_added", "OOD", "added, OOD", "#9ecae1", "//"),
            ("mean_removed", "ID", "removed, ID", "#d6604d", None), ("mean_removed", "OOD", "removed, OOD", "#f4a582", "//")]
    for ax, ((model, dataset), sec) in zip(axes, sections):
        x = np.arange(len(sec))
        width = 0.8 / len(bars)
        for i, (measure, role, label, color, hatch) in enumerate(bars):
            ax.bar(x + (i - 1.5) * width, sec[f"{measure} {role} mean"], width,
                   yerr=np.nan_to_num(sec[f"{measure} {role} std"].to_numpy(dtype=float)),
                   color=color, hatch=hatch, label=label, capsize=2, edgecolor="white")
        ax.set_xticks(x, sec["label"])
        ax.set_ylabel("SAE features per image")
        ax.set_title(f"{model} / {dataset}: features fine-tuning added and removed", fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    _save(fig, path_png, path_pdf)


def plot_drift_vs_ood(summary: pd.DataFrame, zeroshot: pd.DataFrame, path_png: str | os.PathLike, path_pdf: str | os.PathLike, cfg: AggregateConfig) -> None:
    """OOD-average accuracy (y) against the OOD-average CKA and FVU (x), a point per method;
    the zero-shot model (CKA 1, its own FVU) for reference."""
    scale = cfg.scale_and_unit()[0]
    sections = list(summary.groupby(["model", "dataset"], sort=False))
    fig = Figure(figsize=(9.0, 3.6 * len(sections)))
    axes = fig.subplots(len(sections), 2, squeeze=False)
    for (ax_cka, ax_fvu), ((model, dataset), sec) in zip(axes, sections):
        zs = zeroshot[(zeroshot["model"] == model) & (zeroshot["dataset"] == dataset)]
        for ax, measure, name in ((ax_cka, "cka", "CKA with zero-shot embeddings"), (ax_fvu, "fvu_tuned", "FVU under the zero-shot SAE")):
            for _, row in sec.iterrows():
                ax.errorbar(row[f"{measure} OOD mean"], row["value OOD mean"] * scale,
                            xerr=np.nan_to_num(row[f"{measure} OOD std"]), yerr=np.nan_to_num(row["value OOD std"]) * scale,
                            fmt="o", capsize=3, label=row["label"])
                ax.annotate(row["label"], (row[f"{measure} OOD mean"], row["value OOD mean"] * scale),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
            if len(zs):
                x = 1.0 if measure == "cka" else float(zs["fvu_zeroshot"].iloc[0])
                ax.plot([x], [float(zs["value"].iloc[0]) * scale], "k*", markersize=10, label=cfg.label("zeroshot"))
            ax.set_xlabel(f"{name} (OOD average)")
            ax.set_ylabel(f"OOD-average accuracy ({'%' if cfg.percent else 'fraction'})")
            ax.set_title(f"{model} / {dataset}", fontsize="medium")
            ax.grid(True, alpha=0.3)
        ax_cka.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path_png, path_pdf)


def _save(fig: Figure, path_png: str | os.PathLike, path_pdf: str | os.PathLike) -> None:
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    with atomic_path(path_pdf) as tmp:
        fig.savefig(tmp, format="pdf")


def _zeroshot_reference(metrics: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, dataset): the zero-shot OOD-average metric and the SAE's FVU on the zero-shot
    OOD embeddings (the same in every analysis of the dataset)."""
    zs = metrics[(metrics["method"] == "zeroshot") & (metrics["role"] == "ood")]
    value = zs.groupby(["model", "dataset"])["value"].mean().rename("value")
    fvu = table[table["role"] == "ood"].groupby(["model", "dataset", "evalset"])["fvu_zeroshot"].first()
    fvu = fvu.groupby(["model", "dataset"]).mean()
    return pd.concat([value, fvu], axis=1, join="inner").reset_index()


def run(
    analysis_paths: Sequence[str | os.PathLike],
    image_paths: Sequence[str | os.PathLike],
    eval_paths: Sequence[str | os.PathLike],
    out_dir_tables: str | os.PathLike,
    out_dir_figures: str | os.PathLike,
    cfg: AggregateConfig,
    top: int,
) -> dict[str, float]:
    """Write :data:`TABLE_FILES` and :data:`FIGURE_FILES`; ``image_paths`` are the per-image tables
    of ``analysis_paths``, in the same order. Returns headline means for the job's log."""
    if len(analysis_paths) != len(image_paths):
        raise ValueError(f"aggregate_features: {len(analysis_paths)} analyses but {len(image_paths)} image tables")
    tables, figures = Path(out_dir_tables), Path(out_dir_figures)
    analyses = load_analyses(analysis_paths)
    metrics = load_metrics(eval_paths)
    table = join_metrics(analyses, metrics)
    summary = summarize(table, cfg)
    roles = {(d, e): r for d, e, r in table[["dataset", "evalset", "role"]].drop_duplicates().itertuples(index=False)}
    idents = [read_json(p) for p in analysis_paths]
    top_table = top_changed([(i, pd.read_parquet(p, columns=["evalset", "added", "removed"])) for i, p in zip(idents, image_paths)], roles, top)

    with atomic_path(tables / FEATURES_PARQUET) as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=False)
    with atomic_path(tables / FEATURES_SUMMARY_CSV) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(tables / FEATURES_TOP_CSV) as tmp:
        top_table.to_csv(tmp, index=False)
    with atomic_path(tables / FEATURES_SUMMARY_MD) as tmp:
        tmp.write_text(to_markdown(summary, top_table, cfg), encoding="utf-8")
    plot_added_removed(summary, figures / ADDED_REMOVED_PNG, figures / ADDED_REMOVED_PDF)
    plot_drift_vs_ood(summary, _zeroshot_reference(metrics, table), figures / DRIFT_PNG, figures / DRIFT_PDF, cfg)

    headline = {"n_analyses": float(len(analysis_paths))}
    for _, row in summary.iterrows():
        key = f"{row['model']}/{row['dataset']}/{row['method']}"
        for measure in ("mean_added", "mean_removed", "cka", "fvu_tuned"):
            for role in ("ID", "OOD"):
                if pd.notna(row[f"{measure} {role} mean"]):
                    headline[f"{key}/{measure}_{role.lower()}"] = float(row[f"{measure} {role} mean"])
    logger.info("aggregated %d feature analyses (%d rows) into %s and %s", len(analysis_paths), len(table), tables, figures)
    return headline
