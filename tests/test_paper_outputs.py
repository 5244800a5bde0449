"""The paper's tables (tidy schema, mean ± std, LaTeX), figures, the reference comparison, the
aggregate stage's outputs and its MLflow tables and figures, on hand-made eval results."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from saeft.config.aggregate import AggregateConfig
from saeft.infra import tracking
from saeft.plan.outputs import output_names, table_names
from saeft.report import figures, reference, paper_tables as tables
from saeft.report.results import OOD_AVG, load_metrics, summarize, wiseft_curves
from saeft.stages import aggregate

SEEDS = (0, 1, 2)
SHIFTS = ("sketch", "rendition")


def _value(method: str, seed: int | None, evalset: str, alpha: float | None = None) -> float:
    """Distinct fractions; WiSE-FT lies between zero-shot and FT, above their line under shift."""
    if method == "wiseft":
        a = alpha
        zs, ft = _value("zeroshot", None, evalset), _value("ft", seed, evalset)
        bonus = 0.0 if evalset == "test" else 0.04 * math.sin(math.pi * a)
        return round(((1 - a) * zs + a * ft + bonus) * 400) / 400
    base = {"zeroshot": 0.60, "ft": 0.85, "saeft": 0.83}[method]
    shift = {"test": 0.0, "sketch": -0.20, "rendition": -0.10}[evalset] * (1.5 if method == "ft" else 1.0)
    jitter = 0.0 if seed is None else [0.0, 0.0125, -0.0075][seed] * (1 + len(evalset) % 3)
    return round((base + shift + jitter) * 400) / 400


def _write(folder: Path, **fields) -> Path:
    rec = {"study": "s", "model": "m", "dataset": "shapes", "method": "ft", "seed": 0, "evalset": "test",
           "role": "id", "metric": "top1", "value": 0.5, "n": 400}
    rec.update(fields)
    name = "_".join(str(rec[k]) for k in ("model", "dataset", "method", "seed", "evalset")) + f"_{rec.get('alpha')}"
    path = folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def _study(folder: Path, alphas=(0.25, 0.5, 0.75)) -> list[Path]:
    paths = []
    roles = {"test": "id", **{s: "ood" for s in SHIFTS}}
    for evalset, role in roles.items():
        paths.append(_write(folder, method="zeroshot", seed=None, evalset=evalset, role=role,
                            value=_value("zeroshot", None, evalset)))
        for method in ("ft", "saeft"):
            for seed in SEEDS:
                paths.append(_write(folder, method=method, seed=seed, evalset=evalset, role=role,
                                    value=_value(method, seed, evalset)))
        for alpha in alphas:
            for seed in SEEDS:
                paths.append(_write(folder, method="wiseft", seed=seed, alpha=alpha, evalset=evalset, role=role,
                                    value=_value("wiseft", seed, evalset, alpha)))
    return paths


@pytest.fixture
def cfg() -> AggregateConfig:
    return AggregateConfig(wiseft_alpha=0.5)


@pytest.fixture
def paths(tmp_path: Path) -> list[Path]:
    return _study(tmp_path / "eval")


# --------------------------------------------------------------------------------------------
# Tidy table, reported alpha and the WiSE-FT curve
# --------------------------------------------------------------------------------------------


def test_tidy_table_schema(paths):
    df = load_metrics(paths)
    assert list(df.columns) == ["study", "model", "dataset", "method", "variant", "seed", "alpha", "evalset", "role",
                                "metric", "value", "n"]
    assert df["seed"].dtype == "Int64" and df["alpha"].dtype == np.float64
    assert df["value"].dtype == np.float64 and df["n"].dtype == np.int64
    assert df.loc[df["method"] != "wiseft", "alpha"].isna().all()
    assert sorted(df.loc[df["method"] == "wiseft", "alpha"].unique()) == [0.25, 0.5, 0.75]
    assert len(df) == 3 * (1 + 2 * 3 + 3 * 3)


def test_summary_keeps_wiseft_at_the_reported_alpha_only(paths, cfg):
    summary = summarize(load_metrics(paths), cfg).set_index("method")
    wise = np.array([_value("wiseft", s, "sketch", 0.5) for s in SEEDS])
    assert summary.loc["wiseft", "sketch mean"] == pytest.approx(wise.mean())
    assert summary.loc["wiseft", "sketch std"] == pytest.approx(wise.std(ddof=1))
    assert summary.loc["wiseft", "n_seeds"] == 3
    with pytest.raises(ValueError, match="wiseft.*several alphas.*wiseft_alpha"):
        summarize(load_metrics(paths), AggregateConfig())


def test_wiseft_curve_runs_from_zeroshot_to_ft(paths):
    curves = wiseft_curves(load_metrics(paths))
    sketch = curves[(curves["method"] == "wiseft") & (curves["evalset"] == "sketch")].set_index("alpha")
    assert list(sketch.index) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sketch.loc[0.0, "mean"] == pytest.approx(_value("zeroshot", None, "sketch"))
    ft = np.array([_value("ft", s, "sketch") for s in SEEDS])
    assert sketch.loc[1.0, "mean"] == pytest.approx(ft.mean())
    assert sketch.loc[1.0, "std"] == pytest.approx(ft.std(ddof=1))
    wise = np.array([_value("wiseft", s, "sketch", 0.25) for s in SEEDS])
    assert sketch.loc[0.25, "mean"] == pytest.approx(wise.mean())


def test_a_grid_with_its_own_ends_is_not_mixed_with_zeroshot_and_ft(tmp_path):
    curves = wiseft_curves(load_metrics(_study(tmp_path, alphas=(0.0, 0.5, 1.0))))
    sketch = curves[curves["evalset"] == "sketch"].set_index("alpha")
    assert list(sketch.index) == [0.0, 0.5, 1.0] and (sketch["n_seeds"] == 3).all()
    wise = np.array([_value("wiseft", s, "sketch", 1.0) for s in SEEDS])
    assert sketch.loc[1.0, "mean"] == pytest.approx(wise.mean())


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _md_body(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_shifts_table_mean_std_and_bold_best(paths, cfg):
    df = load_metrics(paths)
    table = tables.shifts_table(summarize(df, cfg), df, cfg)
    rows = _md_body(tables.to_markdown(table, cfg))
    assert rows[0] == ["Method", "test (ID)", "sketch", "rendition", OOD_AVG]
    body = {r[0]: r[1:] for r in rows[2:]}
    assert list(body) == ["Zero-shot", "FT", "WiSE-FT", "SAE-FT"]  # configured order
    ft_test = np.array([_value("ft", s, "test") for s in SEEDS]) * 100
    expected = f"{ft_test.mean():.1f} ± {ft_test.std(ddof=1):.1f}"
    assert body["FT"][0] == f"**{expected}**"  # FT has the best ID accuracy
    per_seed = np.array([np.mean([_value("ft", s, e) for e in SHIFTS]) for s in SEEDS]) * 100
    assert body["FT"][3] == f"{per_seed.mean():.1f} ± {per_seed.std(ddof=1):.1f}"
    bold = [name for name, cells in body.items() if cells[3].startswith("**")]
    assert bold == ["SAE-FT"]  # 0.83 - 0.15 on average: the others lose more under shift
    assert body["Zero-shot"][0] == f"{_value('zeroshot', None, 'test') * 100:.1f}"  # one seed: no std
    csv = table.frame
    assert csv.loc[csv["method"] == "ft", "test mean"].item() == pytest.approx(ft_test.mean() / 100)


def _check_latex(tex: str, columns: int) -> list[str]:
    """Structure checks of a booktabs table; returns the body rows."""
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 1
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    depth = 0
    for char in re.sub(r"\\[{}]", "", tex):  # escaped braces are text
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0
    body = tex[tex.index("\\midrule"):tex.index("\\bottomrule")]
    rows = [r for r in body.split("\\\\") if "&" in r]
    for row in rows:
        assert len(re.findall(r"(?<!\\)&", row)) == columns - 1, row
    # Outside math, every special character is escaped.
    text = re.sub(r"\$[^$]*\$", "", tex)
    for special in "_%#":
        assert not re.search(rf"(?<!\\){special}", re.sub(r"^%.*$", "", text, flags=re.M)), special
    return rows


def test_latex_is_well_formed_escaped_and_bold(paths):
    cfg = AggregateConfig(wiseft_alpha=0.5, method_labels={"saeft": "SAE-FT & co_2 #1 100%"})
    df = load_metrics(paths)
    table = tables.shifts_table(summarize(df, cfg), df, cfg)
    tex = tables.to_latex(table, cfg)
    rows = _check_latex(tex, columns=5)
    assert len(rows) == 4  # four methods
    assert "Method & test (ID) & sketch & rendition & OOD avg" in tex
    assert r"SAE-FT \& co\_2 \#1 100\%" in tex
    assert r"\bfseries" in [r for r in rows if r.strip().startswith("FT")][0]
    assert "\\usepackage{booktabs}" in tex.splitlines()[0]


def test_wilds_table_groups_id_and_ood_per_dataset(tmp_path):
    paths = []
    for dataset, metric in (("iwildcam", "macro_f1"), ("fmow", "worst_region_acc")):
        for method, seeds in (("zeroshot", (None,)), ("ft", (0, 1))):
            for seed in seeds:
                paths.append(_write(tmp_path, dataset=dataset, method=method, seed=seed, evalset="id_test", role="id",
                                    metric=metric, value=0.5 + 0.1 * (seed or 0)))
                paths.append(_write(tmp_path, dataset=dataset, method=method, seed=seed, evalset="test", role="ood",
                                    metric=metric, value=0.3 + 0.05 * (seed or 0)))
    cfg = AggregateConfig()
    df = load_metrics(paths)
    built = {t.name: t for t in tables.build_tables(df, summarize(df, cfg), cfg)}
    assert list(built) == ["shifts", "wilds", "robustness"]
    assert table_names({"iwildcam": "macro_f1", "fmow": "worst_region_acc"}, False) == list(built) + ["selection", "comparison", "frontier"]
    wilds = built["wilds"]
    assert [c.key for c in wilds.columns] == ["iwildcam ID", "iwildcam OOD", "fmow ID", "fmow OOD"]
    ft = wilds.frame.set_index("method").loc["ft"]
    assert ft["fmow ID mean"] == pytest.approx(0.55) and ft["fmow ID std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    tex = tables.to_latex(wilds, cfg)
    assert r"\multicolumn{2}{c}{iwildcam (macro-F1)}" in tex and r"\cmidrule(lr){2-3}" in tex
    assert r"\multicolumn{2}{c}{fmow (worst-region accuracy)}" in tex and r"\cmidrule(lr){4-5}" in tex
    _check_latex(tex, columns=5)


def test_transfer_table_averages_per_seed(tmp_path):
    paths = [_write(tmp_path, method="zeroshot", seed=None, evalset="test", value=0.7),
             _write(tmp_path, method="zeroshot", seed=None, evalset="sketch", role="ood", value=0.5)]
    for seed, (a, b) in enumerate(((0.2, 0.4), (0.3, 0.7))):
        paths += [_write(tmp_path, seed=seed, evalset="test", value=0.9),
                  _write(tmp_path, seed=seed, evalset="sketch", role="ood", value=0.4),
                  _write(tmp_path, seed=seed, evalset="cifar100", role="transfer", value=a),
                  _write(tmp_path, seed=seed, evalset="dtd", role="transfer", value=b)]
    cfg = AggregateConfig()
    df = load_metrics(paths)
    built = {t.name: t for t in tables.build_tables(df, summarize(df, cfg), cfg)}
    assert list(built) == ["shifts", "transfer", "robustness"]
    assert "cifar100" not in [c.key for c in built["shifts"].columns]  # transfer sets have their own table
    ft = built["transfer"].frame.set_index("method").loc["ft"]
    assert ft["average mean"] == pytest.approx(np.mean([0.3, 0.5]))
    assert ft["average std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))


def test_effective_robustness_is_zero_on_the_zeroshot_ft_line(paths, cfg):
    er = tables.effective_robustness(load_metrics(paths), cfg).set_index("method")
    assert er.loc["zeroshot", "ER mean"] == pytest.approx(0.0, abs=1e-12)
    assert er.loc["ft", "ER mean"] == pytest.approx(0.0, abs=0.01)  # per-seed ERs around the mean point
    assert er.loc["wiseft", "ER mean"] > 0.02  # the curve bulges above the line
    # Hand computation for one WiSE-FT seed.
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    zs = (_value("zeroshot", None, "test"), np.mean([_value("zeroshot", None, e) for e in SHIFTS]))
    ft = (np.mean([_value("ft", s, "test") for s in SEEDS]),
          np.mean([np.mean([_value("ft", s, e) for e in SHIFTS]) for s in SEEDS]))
    slope = (logit(ft[1]) - logit(zs[1])) / (logit(ft[0]) - logit(zs[0]))
    ers = []
    for s in SEEDS:
        x, y = _value("wiseft", s, "test", 0.5), np.mean([_value("wiseft", s, e, 0.5) for e in SHIFTS])
        ers.append(y - 1 / (1 + math.exp(-(logit(zs[1]) + slope * (logit(x) - logit(zs[0]))))))
    assert er.loc["wiseft", "ER mean"] == pytest.approx(np.mean(ers))
    assert er.loc["wiseft", "ER std"] == pytest.approx(np.std(ers, ddof=1))
    assert er.loc["ft", "ΔID mean"] == pytest.approx(ft[0] - zs[0])


# --------------------------------------------------------------------------------------------
# Reference comparison
# --------------------------------------------------------------------------------------------


def test_reference_table_compares_matching_cells(tmp_path):
    cfg = AggregateConfig(wiseft_alpha=0.5)
    paths = []
    for seed, value in ((0, 0.80), (1, 0.82)):
        paths.append(_write(tmp_path, model="ViT-B-16", dataset="imagenet", seed=seed, evalset="val", value=value))
        paths.append(_write(tmp_path, model="ViT-B-16", dataset="imagenet", seed=seed, evalset="imagenet_r",
                            role="ood", value=0.6))
        paths.append(_write(tmp_path, model="ViT-B-16", dataset="imagenet", method="wiseft", alpha=0.5, seed=seed,
                            evalset="val", value=0.79))
        paths.append(_write(tmp_path, model="ViT-B-16", dataset="imagenet", method="saeft", seed=seed,
                            evalset="imagenet_r", role="ood", value=0.8))
        paths.append(_write(tmp_path, model="ViT-B-16", dataset="imagenet", method="saeft", seed=seed,
                            evalset="val", value=0.8))
    summary = summarize(load_metrics(paths), cfg)
    table = reference.reference_table(summary, cfg)
    frame = table.frame.set_index("label")
    assert frame.loc["FT: val", "ours mean"] == pytest.approx(0.81)
    assert frame.loc["FT: val", "difference mean"] == pytest.approx(0.81 - 0.813)
    assert frame.loc["FT: imagenet_r", "difference mean"] == pytest.approx(0.6 - 0.656)
    assert frame.loc["WiSE-FT: val", "difference mean"] == 0.0  # inside the published 78.7-80.6 range
    assert frame.loc["WiSE-FT: val", "reference text"] == "78.7–80.6"
    assert frame.loc["SAE-FT: imagenet_r", "difference mean"] == pytest.approx(0.8 - 0.785)  # backbone unstated
    md = tables.to_markdown(table, cfg)
    assert ["FT: val", "81.0 ± 1.4", "81.3", "-0.3"] in _md_body(md)
    _check_latex(tables.to_latex(table, cfg), columns=4)
    # Other weights of the same architecture: only the cells whose weights are not stated remain.
    laion = reference.reference_table(summary, AggregateConfig(wiseft_alpha=0.5, pretrained="laion2b_s34b_b88k"), None)
    assert set(laion.frame["label"]) == {"SAE-FT: imagenet_r"}
    assert set(reference.reference_table(summary, AggregateConfig(wiseft_alpha=0.5, pretrained="openai")).frame["label"]) == set(frame.index)


def test_reference_table_of_an_unrelated_study_says_so(paths, cfg):
    table = reference.reference_table(summarize(load_metrics(paths), cfg), cfg)
    assert table.frame.empty
    assert "No published value applies to this study (model m; datasets shapes)" in table.caption
    tex = tables.to_latex(table, cfg)
    assert "no rows" in tex
    _check_latex(tex, columns=4)


def test_packaged_reference_values_match_figures_md():
    ref = reference.load_reference().set_index(["model", "method", "evalset"])
    assert ref.loc[("ViT-B-16", "zeroshot", "val"), "low"] == pytest.approx(0.683)
    assert ref.loc[("ViT-B-16", "ft", "imagenet_a"), "low"] == pytest.approx(0.367)
    assert ref.loc[("ViT-B-32", "ft", "imagenet_sketch"), "low"] == pytest.approx(0.393)
    assert tuple(ref.loc[("ViT-B-16", "wiseft", "val"), ["low", "high"]]) == pytest.approx((0.787, 0.806))
    assert ref.loc[("*", "saeft", "test"), "low"] == pytest.approx(0.381)
    raw = reference.load_reference()
    assert set(raw.loc[raw["model"] == "ViT-B-16", "pretrained"]) == {"openai"}  # the WiSE-FT paper's weights


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _looked_at(png: Path) -> np.ndarray:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0
    return image


def _legend(fig) -> set[str]:
    return {t.get_text() for leg in fig.legends for t in leg.get_texts()}


def test_shift_figure_has_a_panel_per_shift_and_the_wiseft_curve(paths, cfg, tmp_path):
    df = load_metrics(paths)
    fig = figures.plot_shifts(summarize(df, cfg), wiseft_curves(df), "shapes", cfg, tmp_path / "s.png", tmp_path / "s.pdf")
    _looked_at(tmp_path / "s.png")
    assert (tmp_path / "s.pdf").read_bytes()[:5] == b"%PDF-"
    assert [ax.get_title() for ax in fig.axes] == ["shapes: sketch", "shapes: rendition", f"shapes: {OOD_AVG}"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "ID top-1 accuracy, test (%)"
        assert ax.get_ylabel().endswith("top-1 accuracy (%)")
    assert {"Zero-shot", "FT", "WiSE-FT", "SAE-FT", "WiSE-FT curve (α)", "y = x"} <= _legend(fig)
    [curve] = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 5]
    assert curve.get_xdata()[0] == pytest.approx(_value("zeroshot", None, "test") * 100)  # alpha 0
    # The figure's elements do not overlap: the legend is outside every panel.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend_box = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not ax.get_tightbbox(renderer).overlaps(legend_box)


def test_bars_and_training_figures(paths, cfg, tmp_path):
    summary = summarize(load_metrics(paths), cfg)
    fig = figures.plot_bars(summary, "shapes", cfg, tmp_path / "b.png")
    _looked_at(tmp_path / "b.png")
    [ax] = fig.axes
    assert ax.get_ylabel() == "top-1 accuracy (%)" and ax.get_xlabel() == "eval set"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["test\n(ID)", "sketch", "rendition", OOD_AVG]
    runs = [{"config": {"method": m}, "seed": s, "dataset": "shapes",
             "history": [{"epoch": e, "loss": 1.0 / e + s * 0.01, "heldout_top1": 0.5 + 0.1 * e} for e in (1, 2, 3)]}
            for m in ("ft", "saeft") for s in (0, 1)]
    fig = figures.plot_training(runs, "shapes", cfg, tmp_path / "t.png")
    _looked_at(tmp_path / "t.png")
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "epoch"]
    assert fig.axes[1].get_ylabel() == "held-out top-1 accuracy (%)"
    [ft_line] = [line for line in fig.axes[0].get_lines() if line.get_color() == fig.axes[0].get_lines()[0].get_color()]
    assert list(ft_line.get_ydata()) == pytest.approx([1.005, 0.505, 1 / 3 + 0.005])  # mean over seeds
    assert {"FT", "SAE-FT"} == _legend(fig)


# --------------------------------------------------------------------------------------------
# The stage and its MLflow run
# --------------------------------------------------------------------------------------------


def _train_json(folder: Path, method: str, seed: int) -> Path:
    path = folder / f"{method}{seed}" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"dataset": "shapes", "seed": seed, "config": {"method": method},
                                "history": [{"epoch": 1, "loss": 1.0, "heldout_top1": 0.6}]}))
    return path


def test_run_writes_every_declared_output(paths, cfg, tmp_path):
    train = [_train_json(tmp_path / "train", m, s) for m in ("ft", "saeft") for s in SEEDS]
    out = aggregate.run(paths, tmp_path / "tables", tmp_path / "figures", cfg, train_paths=train)
    names_tables, names_figures = output_names(["shapes"], {"shapes": "top1"}, False)
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == sorted(names_tables)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(names_figures)
    assert sorted(p.name for p in out.table_files) == sorted(names_tables)
    back = pd.read_parquet(tmp_path / "tables" / "metrics.parquet")
    assert back["selected"].all()  # one variant per method: every row is shown
    pd.testing.assert_frame_equal(back.drop(columns="selected"), load_metrics(paths))
    html = (tmp_path / "tables" / "shifts.html").read_text()
    assert html.count("<tr>") == 5 and "font-weight: bold" in html
    assert set(out.figures) == {Path(n).stem for n in names_figures}
    ft = pd.read_csv(tmp_path / "tables" / "shifts.csv").set_index("method").loc["ft"]
    assert out.headline["m/shapes/ft/ood_avg"] == pytest.approx(ft[f"{OOD_AVG} mean"])


def test_a_bad_training_log_names_the_file(paths, cfg, tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps({"dataset": "shapes", "config": {"method": "ft"}}))
    with pytest.raises(ValueError, match=r"train\.json.*history"):
        aggregate.run(paths, tmp_path / "t", tmp_path / "f", cfg, train_paths=[bad])


@pytest.mark.parametrize("server", ["up", "down"])
def test_aggregate_run_logs_tables_and_figures_to_mlflow(paths, cfg, tmp_path, monkeypatch, server):
    import socket

    import mlflow

    from saeft import cli

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SAEFT_MLFLOW_QUEUE", str(tmp_path / "queue"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.init_store("s")
    if server == "down":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    track = json.dumps({"experiment": "s", "run_name": "aggregate_tables", "tags": {"rule": "aggregate_tables"}})
    argv = ["aggregate", "--evals", *map(str, paths), "--tables", str(tmp_path / "tables"),
            "--figures", str(tmp_path / "figures"), "--config", json.dumps({"wiseft_alpha": 0.5}), "--track", track]
    assert cli.main(argv) == 0
    if server == "down":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        assert cli.main(["sync-tracking"]) == 0
    client = mlflow.tracking.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    listed = {a.path for folder in ("tables", "figures") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"tables/shifts.json", "tables/metrics.json", "tables/shifts.tex", "tables/reference.csv",
            "figures/id_vs_ood.png", "figures/shifts_shapes.png", "figures/training_shapes.png"} <= listed
    local = client.download_artifacts(run.info.run_id, "tables/shifts.json", str(tmp_path / "dl"))
    logged = json.loads(Path(local).read_text())  # MLflow's table format: columns and rows
    rows = pd.DataFrame(logged["data"], columns=logged["columns"])
    assert set(rows["method"]) == {"zeroshot", "ft", "wiseft", "saeft"}


def test_comparison_tags_split_an_evaluated_run():
    tags = {"rule": "evaluate_model", "wc.model": "m", "wc.dataset": "shapes", "wc.run": "saeft/seed2/alpha0.5"}
    assert tracking.comparison_tags(tags) == {"model": "m", "dataset": "shapes", "method": "wiseft_saeft",
                                              "variant": "saeft", "seed": "2", "alpha": "0.5"}
    assert tracking.comparison_tags({"wc.run": "zeroshot"}) == {"method": "zeroshot", "variant": "zeroshot", "seed": "none",
                                                                "alpha": "none"}
    assert tracking.comparison_tags({"wc.method": "ft", "wc.seed": "0"}) == {"method": "ft", "variant": "ft", "seed": "0"}
    # A grid variant: its method, its name, and each grid value as a tag the UI can group by.
    assert tracking.comparison_tags({"wc.method": "saeft@lambda=10,mu=1", "wc.seed": "0"}) == {
        "method": "saeft", "variant": "saeft@lambda=10,mu=1", "param.lambda": "10", "param.mu": "1", "seed": "0"}
    assert tracking.comparison_tags({"wc.run": "saeft@strong/seed1"})["variant"] == "saeft@strong"


def test_a_study_without_shifts_still_gets_every_output(tmp_path):
    paths = [_write(tmp_path / "eval", dataset="dtd", method=m, seed=s, evalset="test", value=v)
             for m, s, v in (("zeroshot", None, 0.4), ("ft", 0, 0.7), ("ft", 1, 0.72))]
    cfg = AggregateConfig()
    out = aggregate.run(paths, tmp_path / "tables", tmp_path / "figures", cfg)
    names_tables, names_figures = output_names(["dtd"], {"dtd": "top1"}, False)
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == sorted(names_tables)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(names_figures)
    assert out.tables["robustness"].empty
    assert ["FT", "**71.0 ± 1.4**"] in _md_body((tmp_path / "tables" / "shifts.md").read_text())
    _check_latex((tmp_path / "tables" / "robustness.tex").read_text(), columns=6)
