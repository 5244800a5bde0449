"""The calibration stage's verdicts: a world that reproduces robust fine-tuning's effects passes
its gate and the comparison gives a reading; one where WiSE-FT does not bow fails, and the
comparison and figures say "world not calibrated" instead."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from saeft.report import calibration
from saeft.report.intervals import Evaluations
from saeft.report.results import load_metrics
from saeft.stages.evaluate import write_predictions

N = 400  # images per eval set: intervals of about +-5 points per model, tighter when paired
SETS = (("test", "id"), ("resampled", "ood"), ("sketch", "ood"), ("val", "val"))
CLASSES = 10


def _evaluation(folder, method, seed, accuracy, alpha=None, variant=None):
    """An evals.json and predictions.parquet with the given accuracy per eval set (correct on a
    fixed, seeded subset of the images, so models with nested accuracies agree where both are
    right, as related models do)."""
    identity = {"study": "s", "model": "m", "dataset": "shapes", "method": method, "variant": variant or method, "seed": seed}
    if alpha is not None:
        identity["alpha"] = alpha
    target = np.arange(N) % CLASSES
    order = np.random.default_rng(7).permutation(N)
    predictions, records = {}, {}
    for evalset, role in SETS:
        right = np.zeros(N, bool)
        right[order[: int(round(accuracy[evalset] * N))]] = True
        if seed is not None:  # seeds differ a little on which images they get right
            swap = np.random.default_rng(100 + seed).choice(N, 8, replace=False)
            right[swap] = ~right[swap]
        predicted = np.where(right, target, (target + 1) % CLASSES)
        predictions[evalset] = {"predicted": predicted, "target": target, "group": None}
        records[evalset] = {**identity, "evalset": evalset, "role": role, "metric": "top1",
                            "value": float((predicted == target).mean()), "n": N}
    name = f"{variant or method}-{seed}-{alpha}"
    evals, preds = folder / f"{name}.json", folder / f"{name}.parquet"
    evals.write_text(json.dumps({**identity, "dataset": "shapes", "evals": records}))
    write_predictions(preds, predictions)
    return evals, preds


def _acc(id_, ood, val=None):
    return {"test": id_, "resampled": ood, "sketch": ood, "val": id_ if val is None else val}


def _world(folder, wise_ood, wise25_ood=None, seeds=(0, 1, 2)):
    """ZS 60/50, FT 72/44 on three seeds, WiSE-FT 0.5 at 73/``wise_ood``, its output ensemble
    beside it, a soup of the seeds, LP-FT and FLYP."""
    files = [_evaluation(folder, "zeroshot", None, _acc(0.60, 0.50))]
    for seed in seeds:
        files += [_evaluation(folder, "ft", seed, _acc(0.72, 0.44)),
                  _evaluation(folder, "wiseft", seed, _acc(0.73, wise_ood), alpha=0.5, variant="ft"),
                  _evaluation(folder, "wiseft", seed, _acc(0.68, wise25_ood or 0.51), alpha=0.25, variant="ft"),
                  _evaluation(folder, "ensemble", seed, _acc(0.73, wise_ood), alpha=0.5),
                  _evaluation(folder, "lpft", seed, _acc(0.72, 0.49)),
                  _evaluation(folder, "flyp", seed, _acc(0.72, 0.47))]
    files.append(_evaluation(folder, "soup", None, _acc(0.74, 0.45)))
    df = load_metrics([e for e, _ in files])
    ev = Evaluations([e for e, _ in files], [p for _, p in files], {("shapes", s): "top1" for s, _ in SETS}, 500)
    return df, ev


def _inputs(**kw):
    base = {"dataset": "shapes", "chance": 1 / CLASSES, "ensemble": "ensemble", "soup": "soup",
            "path_loss": {0.0: 1.2, 0.25: 0.95, 0.5: 0.85, 0.75: 0.86, 1.0: 0.9}, "lr_ratio": 0.05,
            "lr_detail": "ft@lr=1e-4", "linear_probe": 0.70}
    return calibration.Inputs(**{**base, **kw})


def _by_key(records):
    return {r["criterion"]: r for r in records}


def test_a_calibrated_world_passes_its_gate(tmp_path):
    df, ev = _world(tmp_path, wise_ood=0.56)
    records = calibration.assess(df, ev, _inputs(), gate=["P2", "P3", "P5", "P6"])
    got = _by_key(records)
    assert [r["criterion"] for r in records] == list(calibration.PHENOMENA)
    for key in ("P2", "P3", "P4", "P5", "P6", "P7", "P8"):
        assert got[key]["status"] == calibration.PASS, (key, got[key]["measured"])
    assert got["P1"]["status"] == calibration.UNMEASURED  # no ID-only models given
    assert calibration.gate_failures(records) == []
    # The bow, measured paired against the better endpoint (zero-shot here): +6 points.
    assert got["P5"]["value"] == pytest.approx(0.06, abs=0.005)
    assert got["P5"]["low"] > 0
    assert got["P2"]["measured"].startswith("ZS/FT ID 0.8")


def test_a_world_where_wiseft_does_not_bow_fails_P5(tmp_path):
    # Today's default study: WiSE-FT 0.5 is no better OOD than FT, below zero-shot.
    df, ev = _world(tmp_path, wise_ood=0.44, wise25_ood=0.45)
    records = calibration.assess(df, ev, _inputs(), gate=["P2", "P3", "P5", "P6"])
    got = _by_key(records)
    assert got["P5"]["status"] == calibration.FAIL
    assert "WiSE(0.25) − ZS OOD" in got["P5"]["measured"]
    assert calibration.gate_failures(records) == ["P5"]
    assert calibration.not_calibrated_text(["P5"]) == "world not calibrated: P5"
    markdown = calibration.calibration_markdown(records)
    assert "### shapes: world not calibrated: P5 (gate: P2, P3, P5, P6)" in markdown
    assert "| P5 (gate) | WiSE-FT bows |" in markdown


def test_each_part_can_fail_a_criterion(tmp_path):
    df, ev = _world(tmp_path, wise_ood=0.56)
    # Fine-tuning at 5x the pretraining lr (P4), a loss barrier on the path (P6), a probe far
    # above zero-shot (P2): each fails its criterion, and only gate criteria block the reading.
    inputs = _inputs(lr_ratio=5.0, linear_probe=0.82, path_loss={0.0: 1.2, 0.5: 1.6, 1.0: 0.9})
    records = calibration.assess(df, ev, inputs, gate=["P2", "P3", "P5", "P6"])
    got = _by_key(records)
    assert got["P4"]["status"] == got["P6"]["status"] == got["P2"]["status"] == calibration.FAIL
    assert "barrier +0.550 at α 0.5" in got["P6"]["measured"]
    assert calibration.gate_failures(records) == ["P2", "P6"]


def test_missing_runs_are_not_measured_and_block_a_gate(tmp_path):
    df, ev = _world(tmp_path, wise_ood=0.56)
    df = df[~df["method"].isin(["wiseft", "lpft"])]
    records = calibration.assess(df, ev, _inputs(lr_ratio=None), gate=["P5"])
    got = _by_key(records)
    assert got["P5"]["status"] == got["P7"]["status"] == got["P4"]["status"] == calibration.UNMEASURED
    assert calibration.gate_failures(records) == ["P5"]  # a gate criterion must be shown, not assumed


def test_one_seed_pairs_with_the_zero_shot_model(tmp_path):
    df, ev = _world(tmp_path, wise_ood=0.56, seeds=(0,))
    got = _by_key(calibration.assess(df, ev, _inputs(soup=None), gate=["P5", "P6"]))
    assert got["P5"]["status"] == calibration.PASS and got["P5"]["value"] == pytest.approx(0.06, abs=0.01)
    assert "soup of FT seeds: needs at least 2 seeds" in got["P6"]["measured"]


def test_the_world_needs_zero_shot_and_the_baseline(tmp_path):
    df, ev = _world(tmp_path, wise_ood=0.56)
    with pytest.raises(ValueError, match="no ft results"):
        calibration.assess(df[df["method"] != "ft"], ev, _inputs(), gate=[])


def test_the_comparison_gives_no_reading_in_an_uncalibrated_world():
    from saeft.config.aggregate import AggregateConfig
    from saeft.report.variant_tables import comparison_table

    diffs = pd.DataFrame([{"model": "m", "dataset": d, "method": "saeft", "other": "ft", "n_seeds": 3,
                           "ΔID mean": 0.01, "ΔID low": -0.02, "ΔID high": 0.04, "ΔID se": 0.015,
                           "ΔOOD mean": 0.05, "ΔOOD low": 0.02, "ΔOOD high": 0.08, "ΔOOD se": 0.015} for d in ("a", "b")])
    table = comparison_table(diffs, AggregateConfig(), {"a": ["P5", "P6"]})
    readings = dict(zip(table.frame["dataset"], table.frame["reading text"]))
    assert readings == {"a": "world not calibrated: P5, P6", "b": "ID not resolved; OOD higher"}


def test_the_aggregate_writes_the_calibration_table_and_stamps_the_figures(tmp_path):
    from saeft.config.aggregate import AggregateConfig
    from saeft.stages import aggregate

    df, ev = _world(tmp_path, wise_ood=0.44, wise25_ood=0.45)
    records = calibration.assess(df, ev, _inputs(), gate=["P5"])
    record = tmp_path / "calibration.json"
    record.write_text(json.dumps({"dataset": "shapes", "failures": calibration.gate_failures(records), "criteria": records}))
    evals = sorted(str(p) for p in tmp_path.glob("*.json") if p.name != "calibration.json" and "ensemble" not in p.name
                   and "soup" not in p.name)
    out = aggregate.run(evals, tmp_path / "tables", tmp_path / "figures", AggregateConfig(compare="flyp", compare_with=["ft"], wiseft_alpha=0.5),
                        prediction_paths=[p.replace(".json", ".parquet") for p in evals], calibration_paths=[record])
    table = pd.read_csv(tmp_path / "tables" / "calibration.csv")
    assert list(table["criterion"]) == list(calibration.PHENOMENA)
    assert table.set_index("criterion").loc["P5", "status"] == "fail"
    comparison = out.tables["comparison"]
    assert set(comparison["reading text"]) == {"world not calibrated: P5"}
    assert (tmp_path / "tables" / "calibration.md").read_text().startswith("### shapes: world not calibrated: P5")


def test_a_value_exactly_on_a_threshold_meets_it_whatever_the_rounding():
    """Accuracies are counts over images: 30.0% - 28.0% is exactly the +2 points P5 asks, but
    comes out 0.019999999999999962 in floating point; the default study's bow was such a value
    (a fresh clone of 7d0a3bb printed "+2.0 [+1.2, +2.8]" and failed it)."""
    bow = 0.30 - 0.28
    assert bow < 0.02  # the rounding error the comparison must not see
    assert calibration._ge(bow, 0.02) and calibration._le(-bow, -0.02)
    assert not calibration._ge(0.0199, 0.02)  # a real shortfall still fails
    # Strict comparisons ("resolved", "interval > 0") are not met by a rounding error above 0.
    assert not calibration._gt(0.1 + 0.2 - 0.3, 0.0) and not calibration._lt(0.3 - 0.1 - 0.2, 0.0)
    assert calibration._gt(0.001, 0.0) and calibration._lt(-0.001, 0.0)
