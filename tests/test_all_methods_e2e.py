"""Every method of docs/methods.md through the whole pipeline on a tiny one-seed study: each
gets a row of the summary table (slow: about 80 short jobs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from saeft.methods import trained_methods
from test_workflow import snakemake

pytestmark = pytest.mark.slow

STUDY = Path(__file__).resolve().parent / "data" / "all_methods_study.yaml"


def test_every_method_gets_a_table_row(tmp_path):
    shutil.copy(STUDY, tmp_path / "study.yaml")
    snakemake(tmp_path, "--cores", "2", env={"SAEFT_TRACKING": "off"})  # MLflow is tested in test_workflow.py
    results = tmp_path / "results" / "allmethods"
    summary = pd.read_csv(results / "tables" / "shifts.csv")
    assert set(summary["method"]) == {"zeroshot", "wiseft", *trained_methods()}
    metrics = pd.read_parquet(results / "tables" / "metrics.parquet")
    assert len(metrics) == (2 + len(trained_methods())) * 6  # five evaluation splits and ID validation each
    # The per-dataset override reached the job; the views cache fed the SAE methods.
    train = json.loads((results / "finetune" / "saeft-tiny-rn" / "shapes" / "saeft" / "seed0" / "train.json").read_text())
    assert train["config"]["method_params"]["lambda"] == 20 and train["teacher"] == "cache"
    assert train["config"]["augment"] == "crop_flip" and train["config"]["views"] == 2
    assert (results / "cache" / "saeft-tiny-rn" / "shapes" / "train.views.h5").exists()
