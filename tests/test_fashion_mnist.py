"""The Fashion-MNIST study end to end through Snakemake, reduced (tests/data/fashion_mnist_ci.yaml):
the pipeline pretrains its own CLIP on the captioned Fashion-MNIST corpus, then every stage runs.
Needs Debian's dataset-fashion-mnist (``.ci/run`` installs it) and the imagecorruptions package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from saeft.data import fashion_mnist
from test_workflow import planned_jobs, snakemake

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(fashion_mnist.DEFAULT_ROOT).is_dir(),
                       reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"),
]

ROOT = Path(__file__).resolve().parent.parent
CI_STUDY = ROOT / "tests" / "data" / "fashion_mnist_ci.yaml"
EVALSETS = {"test", "corrupted", "inverted", "sketch"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fmnist")
    shutil.copy(CI_STUDY, workdir / "study.yaml")
    snakemake(workdir, "--cores", "2", env={"SAEFT_TRACKING": "off"})  # MLflow is tested in test_workflow.py
    return workdir


def test_reduced_study_tabulates_zero_shot_ft_and_saeft(study):
    tables = study / "results" / "fmnist_ci" / "tables"
    metrics = pd.read_parquet(tables / "metrics.parquet")
    assert set(metrics["method"]) == {"zeroshot", "ft", "saeft"}
    assert set(metrics["evalset"]) == EVALSETS | {"val"}  # val: the ID validation split variants are selected on
    assert set(metrics["variant"]) == {"zeroshot", "ft", "saeft@lambda=1", "saeft@lambda=100"}
    assert len(metrics) == 4 * (len(EVALSETS) + 1)  # one seed, both variants of the grid
    assert metrics.groupby("method")["selected"].sum().to_dict() == {"ft": 5, "saeft": 5, "zeroshot": 5}
    assert metrics["value"].between(0, 1).all()
    summary = (tables / "shifts.md").read_text()
    for label in ("Zero-shot", "FT", "SAE-FT", "test (ID)", "corrupted", "inverted", "sketch", "OOD avg"):
        assert label in summary, label


def test_pretraining_gave_real_zero_shot_ability(study):
    metrics = pd.read_parquet(study / "results" / "fmnist_ci" / "tables" / "metrics.parquet")
    zeroshot = metrics[metrics["method"] == "zeroshot"].set_index("evalset")["value"]
    # Ten classes: chance is 0.1; 200 ID test images make 0.25 far outside chance.
    assert zeroshot["test"] > 0.25, zeroshot.to_dict()
    assert zeroshot.mean() > 0.15, zeroshot.to_dict()
    log = next((study / "logs" / "fmnist_ci" / "pretrain_clip").glob("*.log")).read_text()
    assert "captioned images of fashion_mnist" in log


def test_second_run_has_nothing_to_do(study):
    assert planned_jobs(snakemake(study, "-n", "--cores", "2")) == {}
