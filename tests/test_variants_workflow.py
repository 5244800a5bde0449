"""Grids through Snakemake on the tiny study: the two-stage DAG (every variant on the selection
seed, the selected one on every seed), what the tables and the frontier hold, and that editing or
removing one grid value reruns only what it touches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_workflow import planned_jobs, snakemake

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "tests" / "data" / "tiny_grid.yaml"
# In the grid's order (lambda, then mu): a tie on ID validation goes to the first listed.
SAEFT = ["saeft@lambda=1,mu=1", "saeft@lambda=1,mu=10", "saeft@lambda=100,mu=1", "saeft@lambda=100,mu=10"]
FEAT = ["feat_mse@lambda=1", "feat_mse@lambda=100"]

pytestmark = pytest.mark.slow


def test_before_the_selection_only_the_first_stage_is_planned(tmp_path):
    shutil.copy(GRID, tmp_path / "study.yaml")
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--cores", "2"))
    # 6 variants on seed 0, ft on both seeds; one evaluation each; nothing after the checkpoint.
    assert jobs["finetune"] == 6 + 2 and jobs["evaluate_model"] == 8 and jobs["select_variants"] == 1


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("grid")
    shutil.copy(GRID, workdir / "study.yaml")
    snakemake(workdir, "--cores", "2", env={"SAEFT_TRACKING": "off"})  # MLflow is tested in test_workflow.py
    return workdir


def _results(workdir: Path) -> Path:
    return workdir / "results" / "tiny_grid"


def test_every_variant_ran_on_the_selection_seed_and_the_selected_one_on_every_seed(grid_study):
    metrics = pd.read_parquet(_results(grid_study) / "tables" / "metrics.parquet")
    trained = metrics[metrics["alpha"].isna() & (metrics["method"] != "zeroshot")]
    seeds = trained.groupby("variant")["seed"].apply(lambda s: sorted(set(s)))
    selection = json.loads((_results(grid_study) / "selection" / "saeft-tiny-rn" / "shapes" / "selection.json").read_text())
    for method, variants in (("saeft", SAEFT), ("feat_mse", FEAT)):
        chosen = selection["methods"][method]["selected"]
        assert chosen in variants
        for variant in variants:
            assert seeds[variant] == ([0, 1] if variant == chosen else [0]), variant
        # The choice is the best mean ID validation result of seed 0, recomputed from the table.
        val = trained[(trained["role"] == "val") & (trained["seed"] == 0) & trained["variant"].isin(variants)]
        best = val.groupby("variant")["value"].mean().reindex(variants)
        assert chosen == best.idxmax()
        assert metrics.loc[metrics["variant"] == chosen, "selected"].all()
        assert not metrics.loc[metrics["variant"].isin(set(variants) - {chosen}), "selected"].any()
    # WiSE-FT interpolates the selected SAE-FT variant, on both seeds.
    wiseft = metrics[metrics["method"] == "wiseft_saeft"]
    assert set(wiseft["variant"]) == {selection["methods"]["saeft"]["selected"]} and set(wiseft["seed"]) == {0, 1}


def test_tables_report_the_selected_variant_with_intervals(grid_study):
    tables = _results(grid_study) / "tables"
    selection = json.loads((_results(grid_study) / "selection" / "saeft-tiny-rn" / "shapes" / "selection.json").read_text())
    assert selection["methods"]["saeft"]["selected"] in (tables / "selection.md").read_text()
    assert "OOD oracle" in (tables / "selection.md").read_text()
    shifts = pd.read_csv(tables / "shifts.csv")
    assert (shifts["test low"] <= shifts["test mean"]).all() and (shifts["test mean"] <= shifts["test high"]).all()
    assert "interval" in (tables / "shifts.md").read_text()
    comparison = pd.read_csv(tables / "comparison.csv")
    assert set(comparison["method"]) == {"ft", "wiseft", "feat_mse"}  # LP-FT is not in this study
    assert (comparison["ΔOOD low"] <= comparison["ΔOOD high"]).all()
    frontier = pd.read_csv(tables / "frontier.csv")
    variants = set(frontier["variant text"])
    assert set(SAEFT + FEAT) <= variants and frontier["pareto"].any()
    assert (grid_study / "results" / "tiny_grid" / "figures" / "frontier_shapes.png").stat().st_size > 10_000


def _plan_with(workdir: Path, tmp_path: Path, grid: dict) -> dict[str, int]:
    config = yaml.safe_load((workdir / "study.yaml").read_text())
    config["methods"]["saeft"]["grid"] = grid
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return planned_jobs(snakemake(workdir, "-n", "--cores", "2", config=path))


def test_editing_one_grid_value_reruns_that_variant_and_the_aggregates_only(grid_study, tmp_path):
    jobs = _plan_with(grid_study, tmp_path, {"lambda": [1, 30], "mu": [1, 10]})
    # The two new variants on seed 0 (lambda=30 with each mu), then the selection and the tables;
    # the checkpoint may add the newly selected variant's seed-1 run once it has run.
    assert jobs["finetune"] == 2 and jobs["evaluate_model"] == 2
    assert jobs["select_variants"] == 1 and jobs["aggregate_tables"] == 1
    assert not {"pretrain_clip", "cache_activations", "train_sae"} & set(jobs)


def test_removing_a_grid_value_leaves_the_other_variants_untouched(grid_study, tmp_path):
    selected = json.loads((_results(grid_study) / "selection" / "saeft-tiny-rn" / "shapes" / "selection.json").read_text())
    chosen = selected["methods"]["saeft"]["selected"]
    mu = chosen.split("mu=")[1]
    jobs = _plan_with(grid_study, tmp_path, {"lambda": [1, 100], "mu": [yaml.safe_load(mu)]})  # 10, not 10.0: same params
    assert "finetune" not in jobs and "evaluate_model" not in jobs
    assert jobs["select_variants"] == 1 and jobs["aggregate_tables"] == 1
