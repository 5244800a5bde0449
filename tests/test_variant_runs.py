"""Variants over the finetune keys of one run (``methods.<m>.grid: {lr: [...]}``), the regime
ratios a fine-tuning run records against its pretraining, and the one-standard-error selection
rule."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from saeft.config import ConfigError
from saeft.config.finetune import RUN_KEYS, FinetuneConfig, split_run_params
from saeft.config.study import _variant_schemas, validate_config
from saeft.plan.variants import study_variants
from saeft.stages.selection import choose, run as run_selection, select, standard_error, variant_scores
from test_planning import plan

# -- finetune keys in grids and named variants -----------------------------------------------


def test_split_separates_the_finetune_keys_from_the_methods_own():
    overrides, own = split_run_params({"lambda": 10, "lr": 1e-4, "epochs": 3, "sae": "wide", "mu": 1})
    assert overrides == {"lr": 1e-4, "epochs": 3}
    assert own == {"lambda": 10, "sae": "wide", "mu": 1}
    assert split_run_params({}) == ({}, {})
    assert {"lr", "epochs"} <= set(RUN_KEYS) and not {"teacher", "views", "augment", "precision"} & set(RUN_KEYS)


def test_a_grid_over_lr_names_its_variants_and_validates():
    config = validate_config({"seeds": [0], "methods": {
        "ft": {"grid": {"lr": [1.0e-4, 3.0e-4, 1.0e-3]}},
        "saeft": {"lambda_add": 10, "grid": {"lambda": [1, 10], "lr": [1.0e-4, 3.0e-4]},
                  "variants": [{"name": "long", "epochs": 20}]}}})
    variants = study_variants(config["methods"], ["ft", "saeft"])
    assert list(variants["ft"]) == ["ft@lr=0.0001", "ft@lr=0.0003", "ft@lr=0.001"]
    assert list(variants["saeft"])[:4] == ["saeft@lambda=1,lr=0.0001", "saeft@lambda=1,lr=0.0003",
                                           "saeft@lambda=10,lr=0.0001", "saeft@lambda=10,lr=0.0003"]
    assert variants["saeft"]["saeft@long"]["epochs"] == 20


@pytest.mark.parametrize("methods, key", [
    ({"ft": {"grid": {"teacher": ["live"]}}}, "methods.ft.grid.teacher"),  # a finetune key, but not a run's
    ({"ft": {"grid": {"no_such_key": [1]}}}, "methods.ft.grid.no_such_key"),
    ({"saeft": {"variants": [{"name": "big", "views": 4}]}}, "methods.saeft.variants.0.views"),
    ({"ft": {"grid": {"lr": [-1.0]}}}, "methods.ft.grid.lr.0"),
    ({"ft": {"grid": {"epochs": [1.5]}}}, "methods.ft.grid.epochs.0"),
])
def test_the_schema_refuses_a_key_that_is_neither_a_parameter_nor_a_run_key(methods, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config({"seeds": [0], "methods": methods})


def test_a_method_parameter_named_like_a_finetune_key_is_an_error_naming_it():
    params = {"type": "object", "additionalProperties": False, "properties": {"lr": {"type": "number"}}}
    with pytest.raises(ValueError, match=r"methods\.odd: parameter\(s\) lr are also finetune keys"):
        _variant_schemas(params, "odd")


def _planned_finetunes(output: str) -> dict[str, dict]:
    """The --config JSON and --pretrain-schedule of each planned finetune job, by run (variant/seed)."""
    jobs = {}
    for line in output.splitlines():
        if "saeft finetune " not in line:
            continue
        run = re.search(r"/finetune/[^/]+/[^/]+/([^/]+/seed\d+)/model\.safetensors", line)[1]
        schedule = re.search(r"--pretrain-schedule '([^']*)'", line)
        jobs[run] = {"config": json.loads(re.search(r"--config '([^']*)'", line)[1]),
                     "pretrain": json.loads(schedule[1]) if schedule else None}
    return jobs


def test_a_grid_over_lr_plans_one_finetune_per_value_with_its_lr(tmp_path):
    result = plan(tmp_path, "--config", "methods={ft: {grid: {lr: [0.0001, 0.001]}}}", "seeds=[0]", "selection={seeds: [0]}")
    assert result["code"] == 0, result["output"][-3000:]
    jobs = _planned_finetunes(result["output"])
    assert {"ft@lr=0.0001/seed0", "ft@lr=0.001/seed0"} <= set(jobs) and "ft/seed0" not in jobs
    for run, lr in (("ft@lr=0.0001/seed0", 1e-4), ("ft@lr=0.001/seed0", 1e-3)):
        config = jobs[run]["config"]
        assert config["lr"] == lr and config["method"] == "ft" and config["method_params"] == {}
        # What the job builds from it: the variant's lr, the study's other finetune keys.
        cfg = FinetuneConfig.from_dict(config, "finetune.")
        assert cfg.lr == lr and cfg.epochs == 3 and cfg.method_params == {}
    # The other methods keep the study's lr; every job gets pretrain_clip's schedule (config.yaml).
    saeft = next(job for run, job in jobs.items() if run.startswith("saeft@"))
    import yaml
    from pathlib import Path

    study = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "config.yaml").read_text())
    assert saeft["config"]["lr"] == study["finetune"]["lr"] and "lr" not in saeft["config"]["method_params"]
    schedule = {key: study["pretrain"][key] for key in ("lr", "steps", "warmup_steps")}
    assert all(job["pretrain"] == schedule for job in jobs.values())


# -- the regime against the pretraining -------------------------------------------------------


def _schedule_sum(warmup: int, total: int) -> float:
    """warmup_cosine's factor summed over a run's steps, written out independently."""
    warmup = min(warmup, total - 1)
    return sum((s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
               for s in range(total))


def test_regime_ratios_compare_peak_and_summed_learning_rates():
    from saeft.stages.finetune import regime_ratios

    cfg = FinetuneConfig(lr=1e-3, warmup_steps=5)
    ratios = regime_ratios(cfg, 40, {"lr": 1e-2, "steps": 200, "warmup_steps": 20})
    assert ratios["lr_ratio"] == pytest.approx(0.1)
    assert ratios["summed_lr_ratio"] == pytest.approx(1e-3 * _schedule_sum(5, 40) / (1e-2 * _schedule_sum(20, 200)))
    # The same schedule: the summed ratio is the peak ratio.
    same = regime_ratios(cfg, 200, {"lr": 1e-2, "steps": 200, "warmup_steps": 5})
    assert same["summed_lr_ratio"] == pytest.approx(same["lr_ratio"])
    with pytest.raises(ValueError, match="--pretrain-schedule: missing warmup_steps"):
        regime_ratios(cfg, 40, {"lr": 1e-2, "steps": 200})


def test_train_json_records_the_regime_given_the_pretraining_schedule(tmp_path, clip_file, head_file, tiny_world, monkeypatch):
    import dataclasses

    from saeft import cli

    monkeypatch.setenv("SAEFT_TRACKING", "off")
    config = {"method": "ft", "epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "seed": 0}
    out = tmp_path / "run"
    code = cli.main(["finetune", "--model", str(clip_file), "--head", str(head_file), "--dataset", "shapes",
                     "--dataset-options", json.dumps(dataclasses.asdict(tiny_world)), "--config", json.dumps(config),
                     "--pretrain-schedule", json.dumps({"lr": 1e-2, "steps": 100, "warmup_steps": 10}),
                     "--out-model", str(out / "model.safetensors"), "--out-json", str(out / "train.json"), "--nproc", "1"])
    assert code == 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["lr_ratio"] == pytest.approx(0.1)
    assert summary["summed_lr_ratio"] == pytest.approx(1e-3 * _schedule_sum(2, summary["steps"]) / (1e-2 * _schedule_sum(10, 100)))


# -- the one-standard-error rule --------------------------------------------------------------


def _val(variant, seed, value, n=100):
    base = {"study": "s", "model": "m", "dataset": "d", "method": "ft", "variant": variant, "seed": seed,
            "alpha": np.nan, "metric": "top1", "n": n}
    return [{**base, "evalset": "val", "role": "val", "value": value},
            {**base, "evalset": "a", "role": "ood", "value": 1 - value}]


# The lr grid in the config's order, the most conservative first: the best (0.80) is lr=0.001;
# lr=0.0003 is within one SE of it, lr=0.0001 is not.
GRID = ["ft@lr=0.0001", "ft@lr=0.0003", "ft@lr=0.001"]
ONE_SEED = pd.DataFrame(_val(GRID[0], 0, 0.70) + _val(GRID[1], 0, 0.78) + _val(GRID[2], 0, 0.80))


def test_the_standard_error_is_binomial_plus_the_seed_spread():
    assert standard_error(np.array([0.8]), 100) == pytest.approx(math.sqrt(0.8 * 0.2 / 100))
    # Two seeds of 100 images: binomial over 200 images, plus the variance over seeds / 2.
    assert standard_error(np.array([0.7, 0.9]), 200) == pytest.approx(math.sqrt(0.8 * 0.2 / 200 + 0.02 / 2))
    scores = variant_scores(ONE_SEED, GRID, "val")
    assert scores["se"].tolist() == pytest.approx([math.sqrt(p * (1 - p) / 100) for p in (0.70, 0.78, 0.80)])


def test_one_se_takes_the_first_listed_within_one_se_and_best_the_maximum():
    scores = variant_scores(ONE_SEED, GRID, "val")  # the best's SE: 0.04, so the bar is 0.76
    assert choose(scores, "best") == "ft@lr=0.001"
    assert choose(scores, "one_se") == "ft@lr=0.0003"
    entry = select(ONE_SEED, {"ft": GRID}, rule="one_se")["ft"]
    assert entry["selected"] == "ft@lr=0.0003" and entry["best"] == "ft@lr=0.001"
    assert entry["se"] == pytest.approx(0.04)
    assert entry["oracle"]["selected"] == "ft@lr=0.0001"  # the oracle takes the best OOD average, whatever the rule
    assert select(ONE_SEED, {"ft": GRID})["ft"]["selected"] == "ft@lr=0.001"
    # Many more images: the SE shrinks below the gap and one_se keeps the best.
    big = ONE_SEED.assign(n=100_000)
    assert choose(variant_scores(big, GRID, "val"), "one_se") == "ft@lr=0.001"


def test_seed_spread_widens_the_bar():
    # Two seeds each; the best's seeds disagree (0.70, 0.90): its SE takes the spread.
    df = pd.DataFrame(_val(GRID[0], 0, 0.70) + _val(GRID[0], 1, 0.70) + _val(GRID[1], 0, 0.72) + _val(GRID[1], 1, 0.72)
                      + _val(GRID[2], 0, 0.70) + _val(GRID[2], 1, 0.90))
    scores = variant_scores(df, GRID, "val")
    assert scores.loc[2, "se"] == pytest.approx(math.sqrt(0.8 * 0.2 / 200 + 0.02 / 2))
    assert choose(scores, "best") == GRID[2] and choose(scores, "one_se") == GRID[0]


def _val_bundles(tmp_path, variants, values):
    """An evaluation bundle per variant on seed 0 with the given ID validation top-1."""
    paths = []
    for variant, value in zip(variants, values):
        records = {r["evalset"]: {**r, "alpha": None} for r in _val(variant, 0, value)}
        path = tmp_path / f"{variant}.json"
        path.write_text(json.dumps({"dataset": "d", "evals": records}))
        paths.append(path)
    return paths


def test_the_selection_file_records_the_rule_and_the_se(tmp_path):
    paths = _val_bundles(tmp_path, GRID, (0.70, 0.78, 0.80))
    variants = {"ft": {v: {"lr": float(v.split("=")[1])} for v in GRID}}
    record = run_selection(paths, tmp_path / "selection.json", variants, [0], rule="one_se")
    written = json.loads((tmp_path / "selection.json").read_text())
    assert written["rule"] == "one_se" and written["methods"]["ft"]["selected"] == "ft@lr=0.0003"
    assert written["methods"]["ft"]["se"] == pytest.approx(0.04) and written["methods"]["ft"]["best"] == "ft@lr=0.001"
    assert "within one standard error" in record["criterion"] and "ID validation top1 on 'val'" in record["criterion"]
    assert written["methods"]["ft"]["params"]["ft@lr=0.0001"] == {"lr": 0.0001}
    best = run_selection(paths, tmp_path / "best.json", variants, [0])
    assert best["rule"] == "best" and best["methods"]["ft"]["selected"] == "ft@lr=0.001"
    assert best["criterion"].startswith("best ID validation")
    with pytest.raises(ValueError, match="selection.rule"):
        run_selection(paths, tmp_path / "x.json", variants, [0], rule="median")


def test_the_rule_is_a_config_key():
    assert validate_config({})["selection"]["rule"] == "best"
    with pytest.raises(ConfigError, match=r"selection\.rule"):
        validate_config({"selection": {"rule": "two_se"}})


def test_one_se_goes_by_the_configs_order_not_the_jsons(tmp_path):
    """``--variants`` reaches the job as JSON with sorted keys (saeft@lambda=1 before =10 before
    =100); the config lists lambda 100, 10, 1 (most conservative first): one_se must take the first
    of those within one SE, and a tie goes to it too."""
    names = ["saeft@lambda=100", "saeft@lambda=10", "saeft@lambda=1"]
    paths = _val_bundles(tmp_path, names, (0.70, 0.80, 0.80))
    variants = {"saeft": {v: {"lambda": float(v.split("=")[1])} for v in sorted(names)}}  # as the JSON arrives
    for rule in ("one_se", "best"):
        record = run_selection(paths, tmp_path / f"{rule}.json", variants, [0], rule=rule, order={"saeft": names})
        assert record["methods"]["saeft"]["selected"] == "saeft@lambda=10", rule
    assert run_selection(paths, tmp_path / "sorted.json", variants, [0], rule="one_se")["methods"]["saeft"]["selected"] == "saeft@lambda=1"
    with pytest.raises(ValueError, match="selection order of saeft"):
        run_selection(paths, tmp_path / "x.json", variants, [0], order={"saeft": names[:2]})
