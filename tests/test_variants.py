"""Method variants: naming and parsing, grids expanded from the config, and selection on ID
validation (never on the shifts)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from saeft.config import ConfigError
from saeft.config.study import validate_config
from saeft.plan.runs import PATTERN, RunId
from saeft.plan.variants import expand, format_value, grid_label, grid_values, method_of, parse_name, variant_name
from saeft.report.results import read_selections
from saeft.stages.aggregate import reported_mask
from saeft.stages.selection import choose, run as run_selection, select, variant_scores


def test_grid_points_are_named_by_their_sorted_values():
    variants = expand("saeft", {"lambda_add": 10, "grid": {"mu": [1, 100], "lambda": [10, 0.5]}})
    assert list(variants) == ["saeft@lambda=10,mu=1", "saeft@lambda=0.5,mu=1", "saeft@lambda=10,mu=100",
                              "saeft@lambda=0.5,mu=100"]
    assert variants["saeft@lambda=0.5,mu=100"] == {"lambda_add": 10, "mu": 100, "lambda": 0.5}
    # The order the grid was written in does not rename anything.
    assert set(expand("saeft", {"grid": {"lambda": [10, 0.5], "mu": [1, 100]}})) == set(variants)


def test_a_method_without_a_grid_keeps_its_name():
    assert expand("ft", {}) == {"ft": {}}
    assert expand("saeft", {"lambda": 70, "datasets": {"shapes": {"mu": 2}}}) == {"saeft": {"lambda": 70}}


def test_named_variants_follow_the_grid_and_override_the_shared_keys():
    variants = expand("feat_mse", {"lambda": 3, "grid": {"lambda": [1]}, "variants": [{"name": "strong", "lambda": 1000}]})
    assert variants == {"feat_mse@lambda=1": {"lambda": 1}, "feat_mse@strong": {"lambda": 1000}}


@pytest.mark.parametrize("entry, message", [
    ({"grid": {"lambda": [1, 1]}}, "defined twice"),
    ({"grid": {"lambda": []}}, "non-empty list"),
    ({"variants": [{"name": "Bad Name"}]}, "must match"),
    ({"grid": {"sae_inputs": ["a b"]}}, "cannot be part of a variant name"),
])
def test_bad_variants_are_refused_by_name(entry, message):
    with pytest.raises(ValueError, match=message):
        expand("saeft", entry)


def test_values_print_in_their_shortest_form():
    assert [format_value(v) for v in (10, 10.0, 0.001, 1e-5, 1e6, True, "raw")] == ["10", "10", "0.001", "1e-05", "1e+06", "true", "raw"]
    assert grid_label({"mu": 1, "lambda": 1e-3}) == "lambda=0.001,mu=1"


def test_variant_names_parse_back():
    assert parse_name("saeft@lambda=10,mu=1") == ("saeft", "lambda=10,mu=1")
    assert parse_name("feat_mse@strong") == ("feat_mse", "strong")
    assert parse_name("ft") == ("ft", None)
    assert method_of(variant_name("sae_add", "x")) == "sae_add"
    assert grid_values("saeft@lambda=1e-05,mu=1") == {"lambda": "1e-05", "mu": "1"}
    assert grid_values("saeft@strong") == {}
    for bad in ("saeft@", "saeft@lambda=", "Saeft", "saeft@a b", "saeft/x"):
        with pytest.raises(ValueError, match="not a variant name"):
            parse_name(bad)


def test_run_ids_carry_the_variant():
    import re

    run = RunId.parse("saeft@lambda=0.5,mu=1/seed2/alpha0.25")
    assert (run.method, run.seed, run.alpha) == ("saeft@lambda=0.5,mu=1", 2, 0.25)
    assert run.row == "wiseft_saeft" and run.variant == "saeft@lambda=0.5,mu=1"
    assert str(run) == "saeft@lambda=0.5,mu=1/seed2/alpha0.25"
    assert RunId.parse("ft@strong/seed0").row == "ft"
    assert RunId.parse("ft@strong/seed0/alpha0.5").row == "wiseft"
    assert re.fullmatch(PATTERN, "feat_mse@lambda=1e+06/seed0")
    assert not re.fullmatch(PATTERN, "feat_mse@lambda=/seed0") and not re.fullmatch(PATTERN, "feat_mse@/seed0")


def _config(methods):
    return {"seeds": [0, 1], "methods": methods}


def test_the_config_checks_every_variant_with_the_methods_dataclass():
    validate_config(_config({"ft": {}, "saeft": {"grid": {"lambda": [1, 10]}}}))
    with pytest.raises(ConfigError, match=r"methods.saeft.grid.lambda"):
        validate_config(_config({"ft": {}, "saeft": {"grid": {"lambda": [-1]}}}))
    with pytest.raises(ConfigError, match=r"methods.saeft.grid"):
        validate_config(_config({"ft": {}, "saeft": {"grid": {"no_such_key": [1]}}}))


def test_wiseft_takes_a_method_or_one_of_its_variants():
    methods = {"ft": {}, "saeft": {"grid": {"lambda": [1, 10]}}, "wiseft": {"base": ["saeft@lambda=10", "ft"]}}
    validate_config(_config(copy.deepcopy(methods)))
    methods["wiseft"]["base"] = ["saeft@lambda=3"]
    with pytest.raises(ConfigError, match="not a trained method or variant"):
        validate_config(_config(methods))


def test_selection_seeds_must_be_study_seeds():
    with pytest.raises(ConfigError, match="selection.seeds"):
        validate_config({"seeds": [0, 1], "selection": {"seeds": [5]}})


# -- selection -------------------------------------------------------------------------------


def _rows(variant, seed, val, ood, test=0.5):
    base = {"study": "s", "model": "m", "dataset": "d", "method": "saeft", "variant": variant, "seed": seed,
            "alpha": np.nan, "metric": "top1", "n": 10}
    return [{**base, "evalset": "val", "role": "val", "value": val}, {**base, "evalset": "test", "role": "id", "value": test},
            {**base, "evalset": "a", "role": "ood", "value": ood[0]}, {**base, "evalset": "b", "role": "ood", "value": ood[1]}]


def test_selection_takes_the_best_on_validation_even_when_another_is_best_out_of_distribution():
    df = pd.DataFrame(_rows("saeft@lambda=1", 0, 0.80, (0.30, 0.40)) + _rows("saeft@lambda=1", 1, 0.70, (0.30, 0.40))
                      + _rows("saeft@lambda=100", 0, 0.60, (0.60, 0.70)) + _rows("saeft@lambda=100", 1, 0.70, (0.50, 0.50)))
    chosen = select(df, {"saeft": ["saeft@lambda=1", "saeft@lambda=100"]})["saeft"]
    assert chosen["selected"] == "saeft@lambda=1"  # val 0.75 against 0.65
    assert chosen["scores"] == pytest.approx({"saeft@lambda=1": 0.75, "saeft@lambda=100": 0.65})
    assert chosen["oracle"]["selected"] == "saeft@lambda=100"  # OOD avg 0.575 against 0.35
    assert chosen["oracle"]["scores"]["saeft@lambda=100"] == pytest.approx(0.575)


def test_ties_go_to_the_variant_listed_first():
    scores = pd.DataFrame({"variant": ["a", "b", "c"], "score": [0.5, 0.7, 0.7]})
    assert choose(scores) == "b"


def test_a_variant_without_validation_results_is_named():
    df = pd.DataFrame(_rows("saeft@lambda=1", 0, 0.8, (0.3, 0.4)))
    with pytest.raises(ValueError, match=r"saeft@lambda=100"):
        variant_scores(df, ["saeft@lambda=1", "saeft@lambda=100"], "val")


def test_the_selection_file_records_how_it_chose(tmp_path):
    paths = []
    for variant, val in (("saeft@lambda=1", 0.4), ("saeft@lambda=100", 0.9)):
        records = {r["evalset"]: {**r, "alpha": None} for r in _rows(variant, 0, val, (0.2, 0.2))}
        path = tmp_path / f"{variant}.json"
        path.write_text(json.dumps({"dataset": "d", "evals": records}))
        paths.append(path)
    variants = {"saeft": {"saeft@lambda=1": {"lambda": 1}, "saeft@lambda=100": {"lambda": 100}}}
    record = run_selection(paths, tmp_path / "selection.json", variants, [0])
    assert record["methods"]["saeft"]["selected"] == "saeft@lambda=100"
    assert "ID validation top1 on 'val'" in record["criterion"]
    assert read_selections([tmp_path / "selection.json"])["d"]["methods"]["saeft"]["params"]["saeft@lambda=1"] == {"lambda": 1}


def test_the_tables_show_the_selected_variant_and_refuse_an_unselected_grid():
    df = pd.DataFrame(_rows("saeft@lambda=1", 0, 0.8, (0.3, 0.4)) + _rows("saeft@lambda=100", 0, 0.6, (0.6, 0.7)))
    shown = df[reported_mask(df, {("d", "saeft"): "saeft@lambda=100"})]
    assert set(shown["variant"]) == {"saeft@lambda=100"}
    with pytest.raises(ValueError, match="d/saeft: several variants"):
        reported_mask(df, {})


# -- intervals from per-image predictions ----------------------------------------------------


def _evaluation(tmp_path, method, seed, correct_on):
    """An evals.json and its predictions.parquet: 20 images per eval set, right on ``correct_on``."""
    from saeft.stages.evaluate import write_predictions

    identity = {"study": "s", "model": "m", "dataset": "d", "method": method, "variant": method, "seed": seed}
    target = np.arange(20) % 4
    predictions, records = {}, {}
    for evalset, role in (("test", "id"), ("a", "ood"), ("b", "ood")):
        predicted = np.where(np.arange(20) < correct_on, target, (target + 1) % 4)
        predictions[evalset] = {"predicted": predicted, "target": target, "group": None}
        records[evalset] = {**identity, "evalset": evalset, "role": role, "metric": "top1",
                            "value": float((predicted == target).mean()), "n": 20}
    base = tmp_path / f"{method}{seed}"
    (base.with_suffix(".json")).write_text(json.dumps({**identity, "dataset": "d", "evals": records}))
    write_predictions(base.with_suffix(".parquet"), predictions)
    return base.with_suffix(".json"), base.with_suffix(".parquet")


def test_paired_differences_and_cells_come_from_the_predictions(tmp_path):
    from saeft.config.aggregate import AggregateConfig
    from saeft.report.intervals import Evaluations, add_intervals, comparisons
    from saeft.report.results import load_metrics, summarize

    files = [_evaluation(tmp_path, m, s, n) for m, n in (("saeft", 20), ("ft", 10)) for s in (0, 1)]
    df = load_metrics([e for e, _ in files])
    ev = Evaluations([e for e, _ in files], [p for _, p in files], {("d", e): "top1" for e in ("test", "a", "b")}, 2000)
    diff = comparisons(df, ev, "saeft", ["ft", "lpft"], 0.95).iloc[0]
    # Right on every image against right on half: +0.5 exactly; no seed spread, so the se is the
    # bootstrap's of a mean of 20 paired differences in {0, 1} with p = 0.5: sqrt(0.25 / 20).
    assert diff["other"] == "ft" and diff["ΔID mean"] == 0.5 and diff["ΔOOD mean"] == 0.5
    assert diff["ΔID se"] == pytest.approx(np.sqrt(0.25 / 20), rel=0.1)
    # The OOD average of two independently resampled sets: its se is smaller by sqrt(2).
    assert diff["ΔOOD se"] == pytest.approx(np.sqrt(0.25 / 20 / 2), rel=0.1)
    summary = add_intervals(summarize(df, AggregateConfig()), df, ev, 0.95)
    ft = summary.set_index("method").loc["ft"]
    assert ft["test low"] < ft["test mean"] == 0.5 < ft["test high"]
    assert ft["test high"] - ft["test low"] == pytest.approx(2 * 1.959964 * np.sqrt(0.25 / 20), rel=0.1)
    perfect = summary.set_index("method").loc["saeft"]
    assert perfect["test low"] == perfect["test high"] == 1.0  # no resample can miss
