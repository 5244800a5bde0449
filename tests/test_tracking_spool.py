"""Spooled tracking (what jobs of a workflow do): a job writes its MLflow calls to a file without
importing MLflow, the run's sync process sends finished files, and the store ends up with what a
job logging live leaves there: the same runs, params, tags, metrics, curves, dataset inputs,
model references and artifacts, with the job's own start and end times."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import matplotlib
import pandas as pd
import pytest

from saeft.infra import tracking

matplotlib.use("Agg")


def _client(uri):
    import mlflow

    return mlflow.tracking.MlflowClient(uri)


def _job(tmp_path, name, weights):
    """One job exercising every kind of tracking call."""
    import matplotlib.pyplot as plt

    track = {"experiment": "study", "run_name": name, "tags": {"rule": "finetune", "study": "study", "wc.method": "saeft@lambda=1",
                                                                "wc.seed": "0"}}
    artifact = tmp_path / name / "table.csv"
    artifact.parent.mkdir()
    artifact.write_text("a,b\n1,2\n")
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    with tracking.job_run(track, {"config": {"lr": 0.001, "epochs": 2}, "dataset": "shapes"}) as run:
        run.log_inputs([tracking.dataset_record("shapes/test", "generated:shapes/test", "abc123", {"images": 30})])
        run.link_metrics({"top1/test": ("shapes/test", "abc123")}, weights)
        for step in range(5):
            run.log_curve({"train/loss": 1.0 / (step + 1)}, step)
        run.log_metrics({"top1/test": 0.5, "n": 30, "nested": {"a": 1.0}})
        run.log_model_reference("classifier", tracking.model_reference(weights), {"lr": 0.001})
        run.log_artifact(artifact, "tables")
        run.log_table(pd.DataFrame({"x": [1, 2], "y": [None, "b"]}), "tables/frame.json")
        run.log_figure(figure, "figures/curve.png")
        run.log_dict({"k": 1}, "extra/data.json")
    plt.close(figure)


def _snapshot(uri, run_name):
    client = _client(uri)
    experiment = client.get_experiment_by_name("study")
    [run] = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k != tracking.RUN_KEY_TAG}
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]

    def listing(path=None):
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            out += listing(item.path) if item.is_dir else [item.path]
        return sorted(out)

    models = client.search_logged_models([experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    return {"status": run.info.status, "params": run.data.params, "tags": tags,
            "metrics": {k: v for k, v in run.data.metrics.items() if k != "seconds"}, "curve": history,
            "inputs": sorted((i.dataset.name, i.dataset.digest, i.dataset.source) for i in run.inputs.dataset_inputs),
            "artifacts": listing(), "models": [(m.name, m.status) for m in models],
            "outputs": len(run.outputs.model_outputs), "times": (run.info.start_time, run.info.end_time)}


@pytest.fixture
def weights(tmp_path):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"arch": json.dumps("tiny")})
    return path


def test_a_spooled_job_leaves_in_mlflow_what_a_live_one_does(tmp_path, monkeypatch, weights):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SAEFT_MLFLOW_QUEUE", str(tmp_path / "queue"))
    assert tracking.init_store("study", "study")
    monkeypatch.setenv("SAEFT_TRACKING", "live")
    _job(tmp_path, "live", weights)
    monkeypatch.setenv("SAEFT_TRACKING", "spool")
    before = time.time() * 1000
    _job(tmp_path, "spooled", weights)
    after = time.time() * 1000
    [spooled] = list((tmp_path / "queue").glob("*.jsonl"))
    assert json.loads(spooled.read_text().splitlines()[-1])["op"] == "end"  # complete: the sync may send it
    counts = tracking.replay_queue(tmp_path / "queue", finished_only=True)
    assert counts == {"runs": 1, "operations": counts["operations"], "failed": 0} and counts["operations"] >= 10
    assert not list((tmp_path / "queue").glob("*"))  # the file and its copies of artifacts are gone
    live, replayed = _snapshot(uri, "live"), _snapshot(uri, "spooled")
    live_times, spooled_times = live.pop("times"), replayed.pop("times")
    assert replayed == live
    assert replayed["status"] == "FINISHED" and replayed["outputs"] == 1 and "figures/curve.png" in replayed["artifacts"]
    # The run keeps the job's own times, not the moment the sync sent it.
    assert before <= spooled_times[0] <= spooled_times[1] <= after
    assert live_times[1] >= live_times[0]


def test_a_spooling_job_never_imports_mlflow(tmp_path):
    code = ("import sys; from saeft.infra import tracking\n"
            "with tracking.job_run({'experiment': 'e', 'run_name': 'r', 'tags': {}}, {'a': 1}) as run:\n"
            "    run.log_metrics({'x': 1.0})\n"
            "assert 'mlflow' not in sys.modules, 'imported MLflow'\n")
    env = {**os.environ, "SAEFT_TRACKING": "spool", "SAEFT_MLFLOW_QUEUE": str(tmp_path / "queue")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    [spooled] = list((tmp_path / "queue").glob("*.jsonl"))
    assert [json.loads(line)["op"] for line in spooled.read_text().splitlines()] == ["open", "params", "metrics", "end"]


def test_the_sync_process_sends_finished_jobs_only_and_the_rest_when_stopped(tmp_path):
    queue = tmp_path / "queue"
    queue.mkdir()
    header = {"op": "open", "experiment": "study", "tags": {"study": "study"}, "start_time": 1_700_000_000_000}
    (queue / "a.1.jsonl").write_text("\n".join(json.dumps(op) for op in [
        {**header, "run_name": "finished", "key": "a"}, {"op": "metrics", "metrics": {"x": 1.0}, "step": 0, "timestamp": 1},
        {"op": "end", "status": "FINISHED", "tags": {}, "end_time": 1_700_000_001_000}]) + "\n")
    (queue / "b.2.jsonl").write_text(json.dumps({**header, "run_name": "running", "key": "b"}) + "\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sync = subprocess.Popen([sys.executable, "-m", "saeft.cli", "sync-tracking", "--follow", "--interval", "0.5",
                             "--queue", str(queue), "--experiment", "study", "--study", "study"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while (queue / "a.1.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (queue / "a.1.jsonl").exists() and (queue / "b.2.jsonl").exists()  # a running job waits
    finally:
        sync.send_signal(signal.SIGTERM)
        output = sync.communicate(timeout=120)[0]
    assert sync.returncode == 0, output
    assert not (queue / "b.2.jsonl").exists()  # stopped after the workflow: everything is sent
    client = _client(env["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("study").experiment_id])}
    assert runs["finished"].info.status == "FINISHED" and runs["finished"].data.metrics == {"x": 1.0}
    assert (runs["finished"].info.start_time, runs["finished"].info.end_time) == (1_700_000_000_000, 1_700_000_001_000)
    assert runs["running"].info.status == "RUNNING"  # as a job killed mid-run leaves a live run
    parent = runs["study"].info.run_id
    assert {runs[n].data.tags["mlflow.parentRunId"] for n in ("finished", "running")} == {parent}
