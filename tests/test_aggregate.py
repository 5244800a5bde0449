"""Tests for saeft.report.results (under the aggregate stage): tidy table, summary statistics, input validation (the paper's
tables, figures and run() are tested in test_paper_outputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saeft.config import ConfigError
from saeft.config.aggregate import AggregateConfig
from saeft.report import results
from saeft.report.paper_tables import shifts_table, to_markdown
from saeft.report.results import OOD_AVG, load_metrics, summarize

EVALSETS = {"test": "id", "sketch": "ood", "rendition": "ood"}
SEEDS = (0, 1, 2)


def _value(method: str, seed: int | None, evalset: str) -> float:
    """Distinct, deterministic fractions (multiples of 1/400, as from n=400 examples)."""
    base = {"zeroshot": 0.60, "ft": 0.85, "saeft": 0.83}[method]
    shift = {"test": 0.0, "sketch": -0.20, "rendition": -0.10}[evalset]
    if method == "ft":
        shift *= 1.5  # FT loses more under shift
    jitter = 0.0 if seed is None else [0.0, 0.0125, -0.0075][seed] * (1 + len(evalset) % 3)
    return round((base + shift + jitter) * 400) / 400


def _write_eval(folder: Path, **overrides) -> Path:
    rec = {
        "study": "default",
        "model": "saeft-tiny",
        "dataset": "shapes",
        "method": "ft",
        "seed": 0,
        "evalset": "test",
        "role": "id",
        "metric": "top1",
        "value": 0.5,
        "n": 400,
        "per_class": {"correct": [100, 100], "total": [200, 200]},
        "classnames": ["circle", "square"],
    }
    rec.update(overrides)
    seed = "none" if rec["seed"] is None else rec["seed"]
    path = folder / rec["model"] / rec["dataset"] / rec["method"] / f"seed{seed}" / (
        f"{rec['evalset']}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture
def eval_paths(tmp_path: Path) -> list[Path]:
    paths = []
    # Written saeft-first so the configured order, not file order, must decide the table rows.
    for method, seeds in (("saeft", SEEDS), ("zeroshot", (None,)), ("ft", SEEDS)):
        for seed in seeds:
            for evalset, role in EVALSETS.items():
                paths.append(
                    _write_eval(
                        tmp_path / "eval",
                        method=method,
                        seed=seed,
                        evalset=evalset,
                        role=role,
                        value=_value(method, seed, evalset),
                    )
                )
    return paths


@pytest.fixture
def cfg() -> AggregateConfig:
    return AggregateConfig()


def test_tidy_table_columns_dtypes_rows(eval_paths: list[Path]) -> None:
    df = load_metrics(eval_paths)
    assert list(df.columns) == [
        "study", "model", "dataset", "method", "variant", "seed", "alpha", "evalset", "role", "metric", "value", "n",
    ]
    assert len(df) == len(eval_paths) == (3 + 1 + 3) * 3
    assert df["seed"].dtype == "Int64"
    assert df["value"].dtype == np.float64
    assert df["n"].dtype == np.int64
    for col in ("study", "model", "dataset", "method", "evalset", "role", "metric"):
        assert pd.api.types.is_string_dtype(df[col]), col
    zs = df[df["method"] == "zeroshot"]
    assert zs["seed"].isna().all() and len(zs) == 3
    assert df.loc[df["method"] == "ft", "seed"].notna().all()


def test_summary_matches_hand_computation(eval_paths: list[Path], cfg: AggregateConfig) -> None:
    summary = summarize(load_metrics(eval_paths), cfg)
    assert len(summary) == 3
    assert results.value_columns(summary) == ["test", "sketch", "rendition", OOD_AVG]
    for col in ("test", "sketch", "rendition", OOD_AVG):
        for suffix in (" mean", " std", ""):
            assert col + suffix in summary.columns

    row = summary.set_index("method").loc["ft"]
    sketch = np.array([_value("ft", s, "sketch") for s in SEEDS])
    assert row["sketch mean"] == pytest.approx(sketch.mean())
    assert row["sketch std"] == pytest.approx(sketch.std(ddof=1))
    assert row["sketch"] == f"{sketch.mean() * 100:.1f} ± {sketch.std(ddof=1) * 100:.1f}"

    # OOD avg: per seed over the OOD sets first, then over seeds.
    per_seed = np.array(
        [np.mean([_value("ft", s, e) for e in ("sketch", "rendition")]) for s in SEEDS]
    )
    assert row[f"{OOD_AVG} mean"] == pytest.approx(per_seed.mean())
    assert row[f"{OOD_AVG} std"] == pytest.approx(per_seed.std(ddof=1))
    assert row["n_seeds"] == 3

    zs = summary.set_index("method").loc["zeroshot"]
    assert zs["n_seeds"] == 1
    assert np.isnan(zs["test std"])
    assert zs["test"] == f"{_value('zeroshot', None, 'test') * 100:.1f}"  # mean alone
    assert "±" not in zs[OOD_AVG]


def test_markdown_rows_in_configured_order(eval_paths: list[Path], cfg: AggregateConfig) -> None:
    df = load_metrics(eval_paths)
    summary = summarize(df, cfg)
    md = to_markdown(shifts_table(summary, df, cfg), cfg)
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Method", "test (ID)", "sketch", "rendition", OOD_AVG]
    assert "top-1 accuracy" in md
    assert set(lines[1].replace("|", "").replace(":", "").replace("-", "")) <= {" ", ""}
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in body] == ["Zero-shot", "FT", "SAE-FT"]
    ft = summary.set_index("method").loc["ft"]
    assert body[1][2].strip("*") == ft["sketch"]
    assert body[1][4].strip("*") == ft[OOD_AVG]
    # One section only: no per-(model, dataset) headings.
    assert "###" not in md


def test_markdown_sections_and_unlisted_methods(tmp_path: Path) -> None:
    paths = []
    for dataset in ("shapes", "digits"):
        for method in ("zz_custom", "aa_custom", "ft"):
            for evalset, role in EVALSETS.items():
                paths.append(
                    _write_eval(tmp_path, dataset=dataset, method=method, evalset=evalset,
                                role=role, value=0.5)
                )
    cfg = AggregateConfig(decimals=2, percent=False)
    df = load_metrics(paths)
    summary = summarize(df, cfg)
    assert list(summary["method"][:3]) == ["ft", "aa_custom", "zz_custom"]
    md = to_markdown(shifts_table(summary, df, cfg), cfg)
    assert "### shapes" in md and "### digits" in md
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    assert ["aa_custom", "**0.50**", "**0.50**", "**0.50**", "**0.50**"] in rows  # ties: every best is bold


def test_missing_key_names_file(tmp_path: Path) -> None:
    good = _write_eval(tmp_path)
    bad = tmp_path / "broken.json"
    rec = json.loads(good.read_text())
    del rec["role"]
    bad.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=r"broken\.json.*'role'"):
        load_metrics([good, bad])


def test_invalid_value_names_file(tmp_path: Path) -> None:
    bad = _write_eval(tmp_path, value=83.4)  # a percentage, not a fraction
    with pytest.raises(ValueError, match=r"test\.json.*'value'"):
        load_metrics([bad])


def test_duplicates_raise(tmp_path: Path) -> None:
    a = _write_eval(tmp_path / "a", value=0.5)
    b = _write_eval(tmp_path / "b", value=0.6)
    with pytest.raises(ValueError, match="duplicate") as info:
        load_metrics([a, b])
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_zeroshot_null_seed_duplicates_raise(tmp_path: Path) -> None:
    a = _write_eval(tmp_path / "a", method="zeroshot", seed=None)
    b = _write_eval(tmp_path / "b", method="zeroshot", seed=None)
    with pytest.raises(ValueError, match="duplicate"):
        load_metrics([a, b])


def _bundle(folder: Path, paths: list[Path]) -> list[Path]:
    """The per-eval-set JSONs as evaluate writes them: one bundle per run, records by eval set."""
    runs: dict[Path, list[dict]] = {}
    for path in paths:
        runs.setdefault(path.parent, []).append(json.loads(path.read_text()))
    out = []
    for run, records in runs.items():
        bundle = folder / run.relative_to(run.parents[3]) / "evals.json"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        identity = {k: records[0][k] for k in ("study", "model", "method", "seed")}
        bundle.write_text(json.dumps({**identity, "dataset": records[0]["dataset"], "evals": {r["evalset"]: r for r in records},
                                      "environment": {"torch": "x"}}))
        out.append(bundle)
    return out


def test_bundles_give_the_same_rows_as_one_file_per_eval_set(eval_paths: list[Path], tmp_path: Path) -> None:
    bundles = _bundle(tmp_path / "bundles", eval_paths)
    assert len(bundles) == 3 + 1 + 3
    pd.testing.assert_frame_equal(load_metrics(bundles), load_metrics(eval_paths))
    [(label, record)] = [item for item in results.eval_records(bundles[0]) if item[1]["evalset"] == "sketch"]
    assert label == f"{bundles[0]}[sketch]" and record["environment"] == {"torch": "x"}


def test_bundle_errors_name_the_file_and_eval_set(tmp_path: Path) -> None:
    [bundle] = _bundle(tmp_path / "bundles", [_write_eval(tmp_path / "eval"), _write_eval(tmp_path / "eval", evalset="sketch",
                                                                                          role="ood", value=1.5)])
    with pytest.raises(ValueError, match=r"evals\.json\[sketch\].*'value'"):
        load_metrics([bundle])
    data = json.loads(bundle.read_text())
    data["evals"]["sketch"]["evalset"] = "rendition"
    bundle.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\[sketch\]: the record is of eval set 'rendition'"):
        load_metrics([bundle])
    a = _bundle(tmp_path / "a", [_write_eval(tmp_path / "x")])[0]
    b = _bundle(tmp_path / "b", [_write_eval(tmp_path / "x")])[0]
    with pytest.raises(ValueError, match="duplicate") as info:
        load_metrics([a, b])
    assert f"{a}[test]" in str(info.value) and f"{b}[test]" in str(info.value)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="decimals"):
        AggregateConfig(decimals=-1)
    with pytest.raises(ConfigError, match="unknown"):
        AggregateConfig.from_dict({"decimal": 2})
    assert AggregateConfig.from_dict({"decimals": 2, "percent": False}).decimals == 2


def test_transfer_sets_follow_the_ood_average_outside_it(tmp_path: Path, cfg: AggregateConfig) -> None:
    paths = [
        _write_eval(tmp_path, evalset="test", role="id", value=0.8),
        _write_eval(tmp_path, evalset="sketch", role="ood", value=0.4),
        _write_eval(tmp_path, evalset="rendition", role="ood", value=0.6),
        _write_eval(tmp_path, evalset="cifar100", role="transfer", value=0.1, metric="top1"),
    ]
    summary = results.summarize(results.load_metrics(paths), cfg)
    assert results.value_columns(summary) == ["test", "sketch", "rendition", OOD_AVG, "cifar100"]
    row = summary.iloc[0]
    assert row[f"{OOD_AVG} mean"] == pytest.approx(0.5)  # the transfer set's 0.1 stays out
    assert row["cifar100 mean"] == pytest.approx(0.1)
