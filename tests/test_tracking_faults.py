"""MLflow faults never fail a job and lose nothing: calls that fail wait in a queue file that
``saeft sync-tracking`` replays once, idempotently, into the run of the job's stable key."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import threading

import pytest

from saeft import cli
from saeft.infra import tracking

TRACK = {"experiment": "study", "run_name": "finetune/seed=0", "tags": {"rule": "finetune"}}


def _client(uri):
    import mlflow

    return mlflow.tracking.MlflowClient(uri)


def _runs(uri):
    client = _client(uri)
    experiment = client.get_experiment_by_name("study")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SAEFT_MLFLOW_QUEUE", str(tmp_path / "queue"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.init_store("study")
    return uri


def _job(artifact, fail=False):
    with tracking.job_run(TRACK, {"config": {"lr": 0.1}}) as run:
        for epoch in (1, 2):
            run.log_metrics({"loss": 1.0 / epoch}, step=epoch)
        run.log_artifact(artifact)
        if fail:
            raise RuntimeError("killed")


def test_server_down_queues_the_job_and_sync_replays_it_once(store, tmp_path, monkeypatch, caplog):
    artifact = tmp_path / "table.csv"
    artifact.write_text("a,b\n1,2\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    _job(artifact)  # finishes although no server answers
    assert "queueing this job's tracking" in caplog.text
    [queued] = list((tmp_path / "queue").glob("*.jsonl"))
    artifact.write_text("changed after the job\n")  # the queue kept the job's own copy
    spare = tmp_path / "spare"
    shutil.copytree(tmp_path / "queue", spare)  # as a sync that crashed before its clean-up left it

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert cli.main(["sync-tracking"]) == 0
    assert not list((tmp_path / "queue").glob("*.jsonl"))
    [run] = _runs(store)
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune/seed=0"
    assert run.data.params == {"config.lr": "0.1"} and run.data.tags["rule"] == "finetune"
    history = _client(store).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    files = [f.path for f in _client(store).list_artifacts(run.info.run_id)]
    assert files == ["table.csv"]
    local = _client(store).download_artifacts(run.info.run_id, "table.csv", str(tmp_path / "dl"))
    assert open(local).read() == "a,b\n1,2\n"

    # Replaying the same queue again (a sync retried after a crash) duplicates nothing.
    shutil.rmtree(tmp_path / "queue")
    shutil.copytree(spare, tmp_path / "queue")
    assert tracking.replay_queue()["runs"] == 1
    [run] = _runs(store)
    assert len(_client(store).get_metric_history(run.info.run_id, "loss")) == 2


def test_a_retried_job_reopens_its_run(store, tmp_path):
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with pytest.raises(RuntimeError):
        _job(artifact, fail=True)
    assert [r.info.status for r in _runs(store)] == ["FAILED"]
    _job(artifact)
    [run] = _runs(store)  # the same run, not a second one
    assert run.info.status == "FINISHED"
    # Another config is another job: its own run.
    with tracking.job_run(TRACK, {"config": {"lr": 0.2}}):
        pass
    assert len(_runs(store)) == 2


def test_a_locked_store_queues_and_the_job_finishes(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store + "?timeout=1")
    db = sqlite3.connect(tmp_path / "mlflow.db", timeout=1, check_same_thread=False)
    db.execute("BEGIN EXCLUSIVE")  # another writer holds the store
    try:
        with tracking.job_run(TRACK, {"config": {"lr": 0.1}}) as run:
            run.log_metrics({"loss": 0.3}, step=1)
        assert run.queued
    finally:
        db.rollback()
        db.close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.replay_queue() == {"runs": 1, "operations": 4, "failed": 0}
    [logged] = _runs(store)
    assert logged.data.metrics == {"loss": 0.3} and logged.info.status == "FINISHED"


def test_a_torn_last_line_is_skipped_and_a_failed_replay_keeps_the_file(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    with tracking.job_run(TRACK, {"config": {"lr": 0.1}}) as run:
        run.log_metrics({"loss": 0.3}, step=1)
    [queued] = list((tmp_path / "queue").glob("*.jsonl"))
    with open(queued, "a") as handle:
        handle.write('{"op": "metr')  # the job was killed mid-write
    # The store is still down: the sync fails, names the problem and keeps the queue.
    assert cli.main(["sync-tracking"]) == 2 and queued.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.replay_queue()["runs"] == 1 and not queued.exists()


def test_parallel_jobs_lose_no_run(store):
    errors = []

    def job(i):
        try:
            with tracking.job_run({**TRACK, "run_name": f"job{i}"}, {"i": i}) as run:
                run.log_metrics({"x": float(i)}, step=0)
        except Exception as exc:  # pragma: no cover - a failure is what the test looks for
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    tracking.replay_queue()  # whatever a busy store made a job queue
    runs = _runs(store)
    assert sorted(r.info.run_name for r in runs) == sorted(f"job{i}" for i in range(8))
    assert all(r.info.status == "FINISHED" and r.data.metrics["x"] == float(r.data.params["i"]) for r in runs)
