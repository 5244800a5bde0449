"""The saeft command (help, config errors) and MLflow tracking that never fails a job."""

from __future__ import annotations

import logging
import os

import pytest

from saeft import cli
from saeft.infra import tracking

STAGES = ("init-tracking", "pretrain", "prepare", "head", "cache", "train-sae", "train-sae-sweep", "finetune", "evaluate", "aggregate")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([stage, "--help"])
    assert info.value.code == 0
    assert f"usage: saeft {stage}" in capsys.readouterr().out


def test_bad_stage_config_exits_2_naming_the_key(tmp_path, caplog):
    code = cli.main(["finetune", "--model", "m", "--head", "h", "--dataset", "shapes",
                     "--config", '{"lr": "fast"}', "--out-model", str(tmp_path / "m"), "--out-json", str(tmp_path / "j")])
    assert code == 2
    assert "finetune.lr" in caplog.text


def test_missing_input_file_exits_2_naming_it(tmp_path, caplog):
    missing = tmp_path / "nope.safetensors"
    code = cli.main(["head", "--model", str(missing), "--dataset", "shapes", "--out", str(tmp_path / "h")])
    assert code == 2 and "nope.safetensors" in caplog.text


def test_tracking_logs_a_run_with_params_metrics_and_tags(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.init_store("study")
    track = {"experiment": "study", "run_name": "rule/x=1", "tags": {"rule": "rule"}}
    with tracking.job_run(track, {"config": {"lr": 0.1}}) as run:
        run.log_metrics({"loss": 1.5, "nested": {"acc": 0.5}, "name": "text", "nan": float("nan")})
    client = mlflow.tracking.MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert logged.info.run_name == "rule/x=1" and logged.info.status == "FINISHED"
    assert logged.data.params == {"config.lr": "0.1"}
    assert logged.data.metrics == {"loss": 1.5, "nested.acc": 0.5}
    assert logged.data.tags["rule"] == "rule" and len(logged.data.tags["config_hash"]) == 16


def test_a_failing_job_marks_its_run_failed(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.init_store("study")
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.job_run({"experiment": "study", "run_name": "bad"}, {}):
            raise RuntimeError("boom")
    client = mlflow.tracking.MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert logged.info.status == "FAILED"


def test_unreachable_store_warns_and_the_job_goes_on(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("the store's folder cannot be created under a file")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")
    caplog.set_level(logging.WARNING)
    done = []
    with tracking.job_run({"experiment": "study", "run_name": "r"}, {"a": 1}) as run:
        run.log_metrics({"x": 1.0})
        run.log_artifact(tmp_path / "nothing.txt")
        done.append(True)
    assert done == [True]
    assert "MLflow run could not be started" in caplog.text
    assert not tracking.init_store("study")


@pytest.mark.parametrize("switch, tracked", [("off", False), ("on", True)])
def test_saeft_tracking_off_leaves_mlflow_alone(tmp_path, switch, tracked):
    """SAEFT_TRACKING=off: a job's run logs nothing, creates no store and never imports MLflow
    (its ~3 s import is most of a short job's start-up); on (the default) it does all three."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from saeft.infra.tracking import job_run, init_store\n"
            "init_store('e', 'study')\n"
            "with job_run({'experiment': 'e', 'run_name': 'r', 'tags': {'study': 'study'}}, {'a': 1}) as run:\n"
            "    run.log_metrics({'x': 1.0})\n"
            "print('mlflow' in sys.modules, os.path.exists('mlflow.db'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SAEFT_MLFLOW_QUEUE")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**env, "SAEFT_TRACKING": switch}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == [str(tracked), str(tracked)]
