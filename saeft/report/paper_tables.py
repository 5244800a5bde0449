"""The paper's tables, built from the aggregate summary, and their renderings.

Each table is a :class:`Table`: a numeric frame (one row per method, a ``"C mean"`` and
``"C std"`` pair per value column C; the CSV is this frame) plus what it takes to show it: column
headers with optional group headers, sections (one per dataset, say) and a caption. Markdown,
LaTeX (``booktabs``, the best entry per column and section in bold) and HTML (the Snakemake
report's view) are renderings of the same frame, so the formats cannot disagree.

Tables (:func:`build_tables`):

- ``shifts``: per (model, dataset), every ID and OOD eval set and the OOD average (the
  ImageNet-style table);
- ``wilds``: datasets scored by a WILDS metric (iWildCam macro-F1, FMoW worst-region accuracy),
  ID and OOD side by side;
- ``transfer``: transfer sets, scored through their own zero-shot head, and their average;
- ``robustness``: the effective-robustness view: ID, OOD average, their change from zero-shot,
  and the effective robustness above the zero-shot–fine-tuning line (:func:`effective_robustness`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from saeft.config.aggregate import AggregateConfig
from saeft.plan.outputs import WILDS_METRICS
from saeft.report.results import OOD_AVG, format_parts, reported_results, value_columns

logger = logging.getLogger(__name__)

ER_LINE_METHOD = "ft"
"""Effective robustness is measured above the line from zero-shot to this method's point."""


@dataclasses.dataclass(frozen=True)
class Column:
    """One value column of a table."""

    key: str
    """Name in the frame: the frame holds ``"<key> mean"`` and ``"<key> std"``."""
    header: str
    """Header cell."""
    group: str | None = None
    """Group header spanning consecutive columns of the same group (LaTeX ``\\multicolumn``)."""
    signed: bool = False
    """Show a sign on positive values (differences)."""


@dataclasses.dataclass
class Table:
    """A paper table: numeric frame plus presentation."""

    name: str
    """File stem (``tables/<name>.{csv,md,tex,html}``)."""
    caption: str
    """One or two sentences: what the rows, columns and numbers are."""
    frame: pd.DataFrame
    """Key columns ``section`` and ``label`` (display), identity columns, then value columns."""
    columns: list[Column]
    """Value columns in display order."""
    row_header: str = "Method"
    """Header of the row-label column."""
    bold: bool = True
    """Bold the best mean per column and section."""

    def sections(self) -> list[tuple[str, pd.DataFrame]]:
        """(section title, rows) in order of first appearance; one untitled section if all equal."""
        return [(str(title), rows) for title, rows in self.frame.groupby("section", sort=False)]


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_tables(df: pd.DataFrame, summary: pd.DataFrame, cfg: AggregateConfig) -> list[Table]:
    """The tables that apply to these results, in a fixed order (named as :func:`saeft.plan.outputs.table_names` lists them)."""
    tables = [shifts_table(summary, df, cfg)]
    wilds = [d for d, m in _dataset_metrics(df).items() if m in WILDS_METRICS]
    if wilds:
        tables.append(wilds_table(summary, wilds, cfg))
    if (df["role"] == "transfer").any():
        tables.append(transfer_table(summary, df, cfg))
    tables.append(robustness_table(df, cfg))
    return tables


def _dataset_metrics(df: pd.DataFrame) -> dict[str, str]:
    """The metric of each dataset's ID eval set (the dataset's own metric)."""
    ids = df[df["role"] == "id"].drop_duplicates("dataset")
    return dict(zip(ids["dataset"], ids["metric"]))


def _section(model: str, dataset: str | None, several_models: bool) -> str:
    if dataset is None:
        return model if several_models else ""
    return f"{model} / {dataset}" if several_models else dataset


def shifts_table(summary: pd.DataFrame, df: pd.DataFrame, cfg: AggregateConfig) -> Table:
    """ID, each shift and the OOD average per method, one section per (model, dataset)."""
    several = summary["model"].nunique() > 1
    transfer = set(df.loc[df["role"] == "transfer", "evalset"])
    cols = [c for c in value_columns(summary) if c not in transfer]
    id_sets = {e for s in summary["id_evalsets"] for e in s.split(", ") if e}
    frames = []
    columns: dict[str, Column] = {}
    for (model, dataset), sec in summary.groupby(["model", "dataset"], sort=False):
        present = [c for c in cols if sec[f"{c} mean"].notna().any()]
        for c in present:
            columns.setdefault(c, Column(c, f"{c} (ID)" if c in id_sets else c))
        frames.append(sec.assign(section=_section(model, dataset, several)))
    frame = _frame(pd.concat(frames), list(columns.values()))
    metrics = ", ".join(dict.fromkeys(cfg.metric_label(m) for m in summary["metric"]))
    caption = (
        f"Accuracy under distribution shift ({metrics}, {cfg.scale_and_unit()[1]}): the ID eval set, each shift "
        f"and {OOD_AVG} (per seed, the mean over the shifts), {spread_phrase(frame, cfg.level)}; best per column in bold."
    )
    return Table("shifts", caption, frame, list(columns.values()))


def wilds_table(summary: pd.DataFrame, datasets: Sequence[str], cfg: AggregateConfig) -> Table:
    """ID and OOD (average) of each WILDS dataset side by side, one row per (model, method)."""
    several = summary["model"].nunique() > 1
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    columns: list[Column] = []
    for dataset in datasets:
        sec = summary[summary["dataset"] == dataset]
        if sec.empty:
            continue
        id_set = next(e for e in str(sec["id_evalsets"].iloc[0]).split(", ") if e)
        group = f"{dataset} ({cfg.metric_label(sec['metric'].iloc[0])})"
        columns += [Column(f"{dataset} ID", "ID", group), Column(f"{dataset} OOD", "OOD", group)]
        for _, r in sec.iterrows():
            row = rows.setdefault((r["model"], r["method"]), {
                "model": r["model"], "method": r["method"], "label": r["label"],
                "section": _section(r["model"], None, several),
            })
            for key, source in ((f"{dataset} ID", id_set), (f"{dataset} OOD", OOD_AVG)):
                for stat in ("mean", "std", "low", "high"):
                    row[f"{key} {stat}"] = r.get(f"{source} {stat}", np.nan)
    frame = _frame(_order(pd.DataFrame(list(rows.values())), cfg), columns)
    caption = (
        f"WILDS ({cfg.scale_and_unit()[1]}): each dataset's ID test split and its OOD split(s) (the average, where "
        f"several), in the dataset's metric, {spread_phrase(frame, cfg.level)}; best per column in bold."
    )
    return Table("wilds", caption, frame, columns)


def transfer_table(summary: pd.DataFrame, df: pd.DataFrame, cfg: AggregateConfig) -> Table:
    """Transfer sets per (model, fine-tuning dataset), and their per-seed average."""
    several = summary["model"].nunique() > 1
    transfer = reported_results(df[df["role"] == "transfer"], cfg)
    sets = list(dict.fromkeys(transfer["evalset"]))
    per_seed = (
        transfer.assign(_seed=transfer["seed"].fillna(-1).astype("int64"))
        .pivot_table(index=["model", "dataset", "method", "_seed"], columns="evalset", values="value", aggfunc="first")
        .reindex(columns=sets)
    )
    per_seed["average"] = per_seed.mean(axis=1, skipna=False)
    stats = per_seed.groupby(level=["model", "dataset", "method"], sort=False).agg(["mean", "std"])
    stats.columns = [f"{c} {s}" for c, s in stats.columns]
    frame = stats.reset_index()
    frame["label"] = [cfg.label(m) for m in frame["method"]]
    frame["section"] = [_section(m, d, several) for m, d in zip(frame["model"], frame["dataset"])]
    columns = [Column(s, s) for s in sets] + [Column("average", "average")]
    frame = _order(frame, cfg)
    caption = (
        f"Transfer ({cfg.scale_and_unit()[1]}): each transfer set scored through its own zero-shot head on the image "
        "encoder fine-tuned on the section's dataset; average per seed over the sets; mean ± std over seeds."
    )
    return Table("transfer", caption, _frame(frame, columns), columns)


def robustness_table(df: pd.DataFrame, cfg: AggregateConfig) -> Table:
    """The effective-robustness view per (model, dataset): see :func:`effective_robustness`."""
    er = effective_robustness(df, cfg)
    several = er["model"].nunique() > 1
    er["section"] = [_section(m, d, several) for m, d in zip(er["model"], er["dataset"])]
    er["label"] = [cfg.label(m) for m in er["method"]]
    columns = [
        Column("ID", "ID"),
        Column(OOD_AVG, OOD_AVG),
        Column("ΔID", "ΔID vs zero-shot", signed=True),
        Column("ΔOOD", "ΔOOD vs zero-shot", signed=True),
        Column("ER", "effective robustness", signed=True),
    ]
    if er.empty:
        logger.warning("no dataset has both ID and OOD results: the effective-robustness table is empty")
    caption = (
        f"Effective robustness ({cfg.scale_and_unit()[1]}): ID (first ID eval set) and {OOD_AVG}; their change from the "
        "zero-shot model; and the effective robustness, the OOD average above the line through the zero-shot "
        f"and {cfg.label(ER_LINE_METHOD)} points in logit axes (0 on that line, positive above it). Per seed, "
        "then mean ± std over seeds."
    )
    return Table("robustness", caption, _frame(_order(er, cfg), columns), columns)


def effective_robustness(df: pd.DataFrame, cfg: AggregateConfig) -> pd.DataFrame:
    """Per (model, dataset, method): mean and std over seeds of ID, OOD avg, ΔID and ΔOOD (from
    the zero-shot mean) and ER.

    ER follows Taori et al. (2020) with a two-point baseline: in logit coordinates, the line through
    the mean (ID, OOD avg) of zero-shot and of :data:`ER_LINE_METHOD`; a seed's ER is its OOD avg
    minus the line's OOD at its ID, mapped back to accuracy. A study without both points, or with
    both at the same ID, has no ER (NaN). The line stands in for the testbed of standard models
    that Taori et al. fit: this pipeline trains one model per method.
    """
    df = reported_results(df, cfg)
    rows = []
    for (model, dataset), group in df[df["role"] != "transfer"].groupby(["model", "dataset"], sort=False):
        id_sets = list(dict.fromkeys(group.loc[group["role"] == "id", "evalset"]))
        ood_sets = list(dict.fromkeys(group.loc[group["role"] == "ood", "evalset"]))
        if not id_sets or not ood_sets:
            continue
        wide = (
            group.assign(_seed=group["seed"].fillna(-1).astype("int64"))
            .pivot_table(index=["method", "_seed"], columns="evalset", values="value", aggfunc="first")
        )
        points = pd.DataFrame({"ID": wide[id_sets[0]], OOD_AVG: wide.reindex(columns=ood_sets).mean(axis=1, skipna=False)})
        means = points.groupby(level="method").mean()
        anchor = means.loc["zeroshot"] if "zeroshot" in means.index else None
        line = _logit_line(anchor, means.loc[ER_LINE_METHOD] if ER_LINE_METHOD in means.index else None)
        points["ΔID"] = points["ID"] - (anchor["ID"] if anchor is not None else np.nan)
        points["ΔOOD"] = points[OOD_AVG] - (anchor[OOD_AVG] if anchor is not None else np.nan)
        points["ER"] = [_er(line, i, o) for i, o in zip(points["ID"], points[OOD_AVG])]
        stats = points.groupby(level="method", sort=False).agg(["mean", "std"])
        stats.columns = [f"{c} {s}" for c, s in stats.columns]
        stats = stats.reset_index().assign(model=model, dataset=dataset)
        rows.append(stats)
    if not rows:  # e.g. a study of datasets without shifts: an empty view, not a failed aggregate
        numeric = [f"{c} {s}" for c in ("ID", OOD_AVG, "ΔID", "ΔOOD", "ER") for s in ("mean", "std")]
        return pd.DataFrame(columns=["method", *numeric, "model", "dataset"]).astype({c: "float64" for c in numeric})
    return pd.concat(rows, ignore_index=True)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _logit_line(a: pd.Series | None, b: pd.Series | None) -> tuple[float, float] | None:
    """(slope, intercept) of the line through points a and b in logit axes, or None."""
    if a is None or b is None:
        return None
    dx = _logit(b["ID"]) - _logit(a["ID"])
    if abs(dx) < 1e-9 or any(pd.isna(v) for v in (*a, *b)):
        return None
    slope = (_logit(b[OOD_AVG]) - _logit(a[OOD_AVG])) / dx
    return slope, _logit(a[OOD_AVG]) - slope * _logit(a["ID"])


def _er(line: tuple[float, float] | None, id_value: float, ood_value: float) -> float:
    if line is None or pd.isna(id_value) or pd.isna(ood_value):
        return np.nan
    slope, intercept = line
    return ood_value - 1.0 / (1.0 + math.exp(-(slope * _logit(id_value) + intercept)))


def _order(frame: pd.DataFrame, cfg: AggregateConfig) -> pd.DataFrame:
    """Rows by section (first appearance), then methods in the configured order."""
    sections = {s: i for i, s in enumerate(dict.fromkeys(frame["section"]))}
    key = [(sections[s], cfg.method_sort_key(m)) for s, m in zip(frame["section"], frame["method"])]
    return frame.iloc[sorted(range(len(frame)), key=key.__getitem__)].reset_index(drop=True)


def _frame(frame: pd.DataFrame, columns: Sequence[Column]) -> pd.DataFrame:
    ident = [c for c in ("section", "model", "dataset", "method", "variant", "label", "n_seeds") if c in frame.columns]
    stats = ("mean", "std", "low", "high") if any(f"{c.key} low" in frame.columns for c in columns) else ("mean", "std")
    numeric = [f"{c.key} {s}" for c in columns for s in stats]
    out = frame.reindex(columns=ident + numeric).reset_index(drop=True)
    out[numeric] = out[numeric].astype("float64")
    return out


# --------------------------------------------------------------------------------------------
# Rendering: the shown cells as a frame, written by pandas (tabulate for Markdown, Styler for
# LaTeX and HTML)
# --------------------------------------------------------------------------------------------


def shown(row: pd.Series, column: Column, cfg: AggregateConfig) -> tuple[str, str]:
    """The (mean, spread) a row shows in a column: the half-width of its interval where the row
    has one (``"<key> low"``, ``"<key> high"``), else the std; a ``"<key> text"`` entry
    overrides the numbers."""
    text = row.get(f"{column.key} text")
    if isinstance(text, str) and text:
        return text, ""
    low, high = row.get(f"{column.key} low"), row.get(f"{column.key} high")
    spread = (high - low) / 2 if low is not None and high is not None and pd.notna(low) and pd.notna(high) else row[f"{column.key} std"]
    return format_parts(row[f"{column.key} mean"], spread, cfg, column.signed)


def spread_phrase(frame: pd.DataFrame, level: float = 0.95) -> str:
    """What the ± of a table's cells is: the interval's half-width, or the std over seeds."""
    if any(c.endswith(" low") and frame[c].notna().any() for c in frame.columns):
        return (f"mean ± the half-width of its {level:.0%} interval (bootstrap over the eval images, with the "
                "spread over seeds)")
    return "mean ± std over seeds"


def has_values(rows: pd.DataFrame, column: Column) -> bool:
    """Whether any of ``rows`` shows something in ``column`` (a mean, or a text entry)."""
    text = rows.get(f"{column.key} text")
    return bool(rows[f"{column.key} mean"].notna().any() or (text is not None and text.fillna("").astype(bool).any()))


def best_rows(rows: pd.DataFrame, column: Column, cfg: AggregateConfig) -> set[int]:
    """Positions of the rows holding the column's best mean, compared as shown (ties all bold)."""
    shown = [format_parts(m, np.nan, cfg)[0] for m in rows[f"{column.key} mean"]]
    values = [float(v) if v else -math.inf for v in shown]
    top = max(values, default=-math.inf)
    return set() if top == -math.inf else {i for i, v in enumerate(values) if v == top}


def _header(column: Column) -> str:
    return f"{column.group} {column.header}" if column.group else column.header


def display_cells(table: Table, rows: pd.DataFrame, columns: Sequence[Column], cfg: AggregateConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cells ``rows`` show, one column per value column (``"mean ± std"``, the mean alone, or
    ``–`` when empty; positional index), and a same-shaped frame of booleans: bold (the best
    mean per column of these rows, when the table bolds)."""
    cells = pd.DataFrame(index=range(len(rows)), columns=[c.key for c in columns], dtype=object)
    bold = pd.DataFrame(False, index=cells.index, columns=cells.columns)
    for c in columns:
        parts = [shown(row, c, cfg) for _, row in rows.iterrows()]
        cells[c.key] = [f"{mean} ± {std}" if std else (mean or "–") for mean, std in parts]
        for i in best_rows(rows, c, cfg) if table.bold else ():
            bold.loc[i, c.key] = True
    return cells, bold


def to_markdown(table: Table, cfg: AggregateConfig) -> str:
    """Markdown (``DataFrame.to_markdown``): a ``###`` heading per section when there are several,
    best per column in bold, then the caption."""
    parts = []
    sections = table.sections()
    for title, rows in sections:
        present = [c for c in table.columns if has_values(rows, c)]
        cells, bold = display_cells(table, rows, present, cfg)
        cells = cells.where(~bold, "**" + cells + "**")
        cells.columns = [_header(c) for c in present]
        cells.insert(0, table.row_header, list(rows["label"]))
        cells = cells.map(lambda v: str(v).replace("|", "\\|"))
        text = cells.to_markdown(index=False, colalign=("left",) + ("right",) * len(present), disable_numparse=True)
        parts.append((f"### {title}\n\n" if len(sections) > 1 and title else "") + text)
    return "\n\n".join(parts) + "\n\n" + table.caption + "\n"


def _shown_frame(table: Table, cfg: AggregateConfig) -> tuple[pd.DataFrame, pd.DataFrame, list[Column]]:
    """One frame of every section (LaTeX and HTML): the row label then the shown cells, a title
    row before each section when there are several (or a 'no rows' row); and its CSS per cell
    (bold best, italic titles)."""
    cols = [c for c in table.columns if has_values(table.frame, c)] or list(table.columns)
    sections = table.sections() or [("", table.frame)]
    frames, styles = [], []
    for title, rows in sections:
        if len(sections) > 1 and title or rows.empty:
            frames.append(pd.DataFrame([[title or "no rows"] + [""] * len(cols)]))
            styles.append(pd.DataFrame([["font-style: italic;"] + [""] * len(cols)]))
        if rows.empty:
            continue
        cells, bold = display_cells(table, rows, cols, cfg)
        cells.insert(0, "label", list(rows["label"]))
        css = bold.map(lambda b: "font-weight: bold;" if b else "")
        css.insert(0, "label", "")
        frames.append(cells.set_axis(range(len(cols) + 1), axis=1))
        styles.append(css.set_axis(range(len(cols) + 1), axis=1))
    frame = pd.concat(frames, ignore_index=True)
    style = pd.concat(styles, ignore_index=True)
    headers = [(None, table.row_header)] + [(c.group, c.header) for c in cols]
    if any(group for group, _ in headers):
        frame.columns = style.columns = pd.MultiIndex.from_tuples([(g or "", h) for g, h in headers])
    else:
        frame.columns = style.columns = [h for _, h in headers]
    return frame, style, cols


_LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "–": "--", "−": "$-$"}


def _latex_symbols(text: Any) -> str:
    """Escaped ``text`` with ±, Δ and dashes as LaTeX (applied after the Styler's escaping)."""
    text = str(text)
    for symbol, latex in _LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIALS))


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped, for the caption (the Styler escapes the
    cells), and ±, Δ and dashes as LaTeX."""
    return _latex_symbols(_LATEX_RE.sub(lambda m: _LATEX_SPECIALS[m.group(0)], str(text)))


def to_latex(table: Table, cfg: AggregateConfig) -> str:
    """A ``table`` float with a ``booktabs`` ``tabular`` (``Styler.to_latex``): group headers as
    ``\\multicolumn`` with a ``\\cmidrule`` under each, an italic title row per section when
    there are several, the best mean per column and section in bold. Needs
    ``\\usepackage{booktabs}``."""
    frame, style, cols = _shown_frame(table, cfg)
    styler = (
        frame.style.hide(axis="index")
        .format(escape="latex", formatter=_latex_symbols)
        .format_index(escape="latex", formatter=_latex_symbols, axis="columns")
        .apply(lambda _: style, axis=None)
    )
    tex = styler.to_latex(
        hrules=True, environment="table", position="t", position_float="centering", label=f"tab:{table.name}",
        caption=latex_escape(table.caption), column_format="l" + "r" * len(cols), multicol_align="c", convert_css=True,
    )
    rules, start = [], 2
    for group, n in _groups(cols):
        if group:
            rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    if rules:  # booktabs rules under the group headers (Styler draws none)
        lines = tex.splitlines()
        at = next(i for i, line in enumerate(lines) if "\\multicolumn" in line) + 1
        tex = "\n".join([*lines[:at], " ".join(rules), *lines[at:]]) + "\n"
    return "% Generated by saeft (tables.to_latex); needs \\usepackage{booktabs}.\n" + tex


def _groups(cols: Sequence[Column]) -> list[tuple[str | None, int]]:
    """Consecutive columns of the same group, as (group, count)."""
    out: list[tuple[str | None, int]] = []
    for c in cols:
        if out and out[-1][0] == c.group:
            out[-1] = (c.group, out[-1][1] + 1)
        else:
            out.append((c.group, 1))
    return out


def to_html(table: Table, cfg: AggregateConfig) -> str:
    """A standalone HTML page (``Styler.to_html``; the Snakemake report's view of the table)."""
    frame, style, _ = _shown_frame(table, cfg)
    styler = (
        frame.style.hide(axis="index")
        .format(escape="html")
        .format_index(escape="html", axis="columns")
        .apply(lambda _: style, axis=None)
        .set_caption(table.caption)
        .set_table_styles([
            {"selector": "", "props": "border-collapse: collapse; margin: 0.5em 0 1.5em; font-family: sans-serif; font-size: 14px;"},
            {"selector": "th, td", "props": "padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right;"},
            {"selector": "td.col0, th.col0", "props": "text-align: left;"},
            {"selector": "caption", "props": "caption-side: bottom; text-align: left;"},
        ])
    )
    return styler.to_html(doctype_html=True, encoding="utf-8")
