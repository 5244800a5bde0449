"""What a researcher sees in MLflow: a study's runs nested under one parent, metrics named metric /
eval set, eval sets as dataset inputs, per-step training curves, and the fine-tuned model
referenced so that it loads back."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import socket

import h5py
import numpy as np
import pytest
import torch

from saeft import cli
from saeft.infra import tracking

ARCH = "saeft-tiny-rn"


def _client(uri):
    import mlflow

    return mlflow.tracking.MlflowClient(uri)


def _runs(uri, experiment="study"):
    client = _client(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def _parents(runs):
    return [r for r in runs if tracking.PARENT_TAG in r.data.tags]


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.init_store("study")  # the experiment only: the jobs below make the parent
    return uri


def _track(run_name, rule="r"):
    return {"experiment": "study", "run_name": run_name, "tags": {"rule": rule, "study": "study"}}


def _job(uri, queue, index, barrier):
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["SAEFT_MLFLOW_QUEUE"] = queue
    from saeft.infra import tracking as spawned

    barrier.wait()  # every job looks for the study's parent at the same moment
    with spawned.job_run(_track(f"job{index}"), {"i": index}) as run:
        run.log_metrics({"x": float(index)})


def test_concurrent_jobs_nest_under_one_parent(store, tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    jobs = [context.Process(target=_job, args=(store, str(tmp_path / "queue"), i, barrier)) for i in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert not list((tmp_path / "queue").glob("*.jsonl"))
    runs = _runs(store)
    [parent] = _parents(runs)
    assert parent.info.run_name == "study" and parent.info.status == "FINISHED"
    children = [r for r in runs if r is not parent]
    assert sorted(r.info.run_name for r in children) == ["job0", "job1"]
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent.info.run_id}
    # The workflow's onstart (init-tracking --study) finds that parent instead of making another.
    assert tracking.init_store("study", "study")
    assert len(_parents(_runs(store))) == 1


def test_init_tracking_makes_the_parent_and_a_retried_job_keeps_it(store):
    assert cli.main(["init-tracking", "--experiment", "study", "--study", "study"]) == 0
    [parent] = _parents(_runs(store))
    for _ in range(2):  # the same job twice: one run, still nested
        with tracking.job_run(_track("finetune/seed=0"), {"lr": 0.1}):
            pass
    [child] = [r for r in _runs(store) if r.info.run_id != parent.info.run_id]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # A run without a study (a stage run by hand) stays at the top level.
    with tracking.job_run({"experiment": "study", "run_name": "by-hand"}, {}):
        pass
    [by_hand] = [r for r in _runs(store) if r.info.run_name == "by-hand"]
    assert "mlflow.parentRunId" not in by_hand.data.tags


def test_a_local_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    (tmp_path / "store").mkdir()
    assert tracking.init_store("my study")
    experiment = _client(tracking.tracking_uri()).get_experiment_by_name("my study")
    assert experiment.artifact_location.removeprefix("file://") == str(tmp_path / "store" / "mlruns" / "my_study")
    assert not (elsewhere / "mlruns").exists()


def test_evaluation_names_its_metrics_and_logs_its_eval_sets(store, tiny_world, clip_file, head_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFT_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        code = cli.main(["evaluate", "--model", str(clip_file), "--head", str(head_file), "--dataset", "shapes",
                         "--dataset-options", json.dumps(tiny_world.to_dict()), "--split", "test", "sketch",
                         "--out", str(tmp_path / "evals.json"), "--threads", "1",
                         "--identity", json.dumps({"study": "study", "model": "m", "method": "zeroshot", "seed": None}),
                         "--track", json.dumps(_track("evaluate/zeroshot", "evaluate"))])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    records = json.loads((tmp_path / "evals.json").read_text())["evals"]
    runs = _runs(store)
    [parent] = _parents(runs)
    [run] = [r for r in runs if r is not parent]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for name, record in records.items():
        assert run.data.metrics[f"top1/{name}"] == record["value"] and run.data.metrics[f"n/{name}"] == record["n"]
    assert not [key for key in run.data.metrics if "." in key]  # no `<set>.<metric>` names left
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"shapes/test", "shapes/sketch"}
    for name, logged in inputs.items():
        split = name.split("/")[1]
        profile = json.loads(logged.dataset.profile)
        assert profile["num_images"] == records[split]["n"] and profile["role"] == records[split]["role"]
        assert logged.dataset.source_type == "code" and json.loads(logged.dataset.source) == {"uri": f"generated:{name}"}
        assert len(logged.dataset.digest) == 16 and [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "eval")]
    assert inputs["shapes/test"].dataset.digest != inputs["shapes/sketch"].dataset.digest


def _write_cache(path, data):
    with h5py.File(path, "w") as handle:
        handle.create_dataset("embeddings", data=data.astype(np.float32), chunks=(32, data.shape[1]))
        handle.create_dataset("labels", data=(data[:, 0] > 0).astype(np.int64))


def test_sae_training_logs_step_curves(store, tmp_path):
    data = np.random.default_rng(0).standard_normal((160, 8))
    _write_cache(tmp_path / "train.h5", data[:128])
    _write_cache(tmp_path / "heldout.h5", data[128:])
    config = {"epochs": 2, "batch_size": 32, "expansion": 2, "k": 2}
    assert cli.main(["train-sae", "--train", str(tmp_path / "train.h5"), "--heldout", str(tmp_path / "heldout.h5"),
                     "--config", json.dumps(config), "--out-weights", str(tmp_path / "sae.safetensors"),
                     "--out-json", str(tmp_path / "sae.json"), "--track", json.dumps(_track("train_sae", "train_sae"))]) == 0
    [run] = [r for r in _runs(store) if tracking.PARENT_TAG not in r.data.tags]
    client = _client(store)
    for name in ("train/loss", "train/fvu", "train/dead_fraction"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, 9)), name  # 4 batches x 2 epochs, a point per step
        assert all(math.isfinite(m.value) and m.value >= 0 for m in history)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    fvus = [m.value for m in client.get_metric_history(run.info.run_id, "train/fvu")]
    assert len(set(losses)) == 8  # each step's own value
    ratios = [fvu / loss for fvu, loss in zip(fvus, losses)]  # the same squared error, scaled by d / variance
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)


def test_pretraining_hands_its_curve_to_the_sink(tiny_world, tmp_path):
    from saeft.config.stages import PretrainConfig
    from saeft.stages import pretrain

    points = []
    cfg = PretrainConfig.from_dict({"steps": 3, "warmup_steps": 1, "lr": 0.003})
    pretrain.run(ARCH, tiny_world, cfg, tmp_path / "clip.safetensors", curve=lambda step, values: points.append((step, values)))
    assert [step for step, _ in points] == [1, 2, 3]
    assert all(set(values) == {"loss", "lr"} and math.isfinite(values["loss"]) for _, values in points)


def test_a_curve_averages_windows_of_steps():
    from saeft.nn.training import Curve

    points = []
    curve = Curve(lambda step, values: points.append((step, values["x"])), total_steps=10, points=3)
    for step in range(1, 11):
        curve.add(step, x=float(step))
    assert points == [(4, 2.5), (8, 6.5), (10, 9.5)]  # windows of ceil(10 / 3) = 4 steps, then the rest
    curve.flush()  # nothing pending: no point
    short = Curve(lambda step, values: points.append((step, values["x"])), total_steps=10, points=3)
    for step in range(1, 6):  # the loop ran fewer steps than planned: flush sends the cut window
        short.add(step, x=1.0)
    short.flush()
    assert points[3:] == [(4, 1.0), (5, 1.0)]


def test_curve_points_wait_and_go_in_batches(store, monkeypatch):
    monkeypatch.setattr(tracking, "CURVE_FLUSH_SECONDS", 3600.0)
    client = _client(store)
    with tracking.job_run(_track("pretrain"), {}) as run:
        for step in range(1, tracking.MAX_METRICS_PER_CALL):
            run.log_curve({"train/loss": 1.0 / step}, step)
        run_id = run._run_id
        assert client.get_metric_history(run_id, "train/loss") == []  # buffered, not one call per step
        run.log_curve({"train/loss": 0.0}, tracking.MAX_METRICS_PER_CALL)
        assert len(client.get_metric_history(run_id, "train/loss")) == tracking.MAX_METRICS_PER_CALL
        run.log_curve({"train/loss": 0.5, "train/lr": float("nan")}, tracking.MAX_METRICS_PER_CALL + 1)
    history = client.get_metric_history(run_id, "train/loss")  # the rest went when the run ended
    assert [m.step for m in history] == list(range(1, tracking.MAX_METRICS_PER_CALL + 2))
    assert client.get_metric_history(run_id, "train/lr") == []  # not finite: not logged


def _classifier_file(clip_file, head_file, path):
    from saeft.infra.io import load_tensors
    from saeft.nn.models import ImageClassifier, load_clip, save_classifier

    clip, arch = load_clip(clip_file)
    save_classifier(path, ImageClassifier(clip.visual, load_tensors(head_file)[0]["weight"]), arch,
                    {"method": "ft", "seed": 0, "dataset": "shapes"})
    return path


def test_the_fine_tuned_model_is_referenced_and_loads_back(store, clip_file, head_file, tmp_path):
    from saeft.nn.models import load_classifier

    weights = _classifier_file(clip_file, head_file, tmp_path / "model.safetensors")
    reference = tracking.model_reference(weights, tmp_path / "train.json")
    for _ in range(2):  # a retried job: still one logged model
        with tracking.job_run(_track("finetune/seed=0", "finetune"), {"lr": 0.1}) as run:
            run.log_model_reference("classifier", reference, params={"lr": 0.1, "method": "ft"})
    [job] = [r for r in _runs(store) if tracking.PARENT_TAG not in r.data.tags]
    client = _client(store)
    local = client.download_artifacts(job.info.run_id, "model/reference.json", str(tmp_path / "dl"))
    logged = json.loads(open(local).read())
    assert logged["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() and logged["bytes"] == weights.stat().st_size
    assert logged["metadata"]["arch"] == ARCH and logged["metadata"]["method"] == "ft"
    assert not [f for f in client.list_artifacts(job.info.run_id, "model") if f.path.endswith(".safetensors")]  # no copy
    [model] = client.search_logged_models([job.info.experiment_id])
    assert model.name == "classifier" and model.source_run_id == job.info.run_id and model.params["lr"] == "0.1"
    assert [o.model_id for o in client.get_run(job.info.run_id).outputs.model_outputs] == [model.model_id]
    loaded, meta = load_classifier(logged["weights"])  # the reference alone rebuilds the model
    x = torch.randn(2, 3, 32, 32)
    expected, _ = load_classifier(weights)
    assert torch.equal(loaded(x)[0], expected(x)[0]) and meta["seed"] == 0


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_server_queues_curves_inputs_and_model_for_the_replay(store, clip_file, head_file, tmp_path, monkeypatch):
    weights = _classifier_file(clip_file, head_file, tmp_path / "model.safetensors")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    with tracking.job_run(_track("finetune/seed=0", "finetune"), {}) as run:  # finishes although nothing answers
        run.log_curve({"train/loss": 1.0}, 1)
        run.log_curve({"train/loss": 0.5}, 2)
        run.log_inputs([tracking.dataset_record("shapes/test", "generated:shapes/test", "0123456789abcdef", {"num_images": 4})])
        run.log_model_reference("classifier", tracking.model_reference(weights))
    assert run.queued
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.replay_queue()["failed"] == 0
    runs = _runs(store)
    [parent] = _parents(runs)
    [job] = [r for r in runs if r is not parent]
    assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
    client = _client(store)
    assert [(m.step, m.value) for m in client.get_metric_history(job.info.run_id, "train/loss")] == [(1, 1.0), (2, 0.5)]
    assert [i.dataset.name for i in job.inputs.dataset_inputs] == ["shapes/test"]
    assert len(job.outputs.model_outputs) == 1


def test_a_finetune_job_references_its_model(store, tiny_world, clip_file, head_file, tmp_path, monkeypatch):
    from saeft.nn.models import load_classifier

    monkeypatch.setenv("SAEFT_THREADS", "1")
    out = tmp_path / "ft" / "model.safetensors"
    config = {"method": "ft", "epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "seed": 0}
    threads = torch.get_num_threads()
    try:
        code = cli.main(["finetune", "--model", str(clip_file), "--head", str(head_file), "--dataset", "shapes",
                         "--dataset-options", json.dumps(tiny_world.to_dict()), "--config", json.dumps(config),
                         "--out-model", str(out), "--out-json", str(tmp_path / "ft" / "train.json"), "--threads", "1",
                         "--track", json.dumps(_track("finetune/method=ft,seed=0", "finetune"))])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    [job] = [r for r in _runs(store) if tracking.PARENT_TAG not in r.data.tags]
    client = _client(store)
    assert 1 in [m.step for m in client.get_metric_history(job.info.run_id, "heldout_top1")]  # the epoch's record
    reference = json.loads(open(client.download_artifacts(job.info.run_id, "model/reference.json", str(tmp_path / "dl"))).read())
    assert reference["weights"] == str(out) and reference["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    [model] = client.search_logged_models([job.info.experiment_id])
    assert model.source_run_id == job.info.run_id and model.params["method"] == "ft"
    assert load_classifier(reference["weights"])[1]["method"] == "ft"

    # Its evaluation (another job) links each eval set's metrics to the model and the dataset.
    try:
        code = cli.main(["evaluate", "--model", str(out), "--dataset", "shapes", "--dataset-options", json.dumps(tiny_world.to_dict()),
                         "--split", "test", "--out", str(tmp_path / "evals.json"), "--threads", "1",
                         "--identity", json.dumps({"study": "study", "model": "m", "method": "ft", "seed": 0}),
                         "--track", json.dumps(_track("evaluate/ft", "evaluate"))])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads((tmp_path / "evals.json").read_text())["evals"]["test"]
    linked = {m.key: m for m in client.get_logged_model(model.model_id).metrics}
    assert linked["top1/test"].value == record["value"] and linked["n/test"].value == record["n"]
    assert linked["top1/test"].dataset_name == "shapes/test" and "seconds" not in linked
