"""The whole pipeline through Snakemake on a reduced study, in a temporary working directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny_study.yaml"

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, config: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    extra = env
    env = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    for name in ("MLFLOW_TRACKING_URI", "SAEFT_MLFLOW_QUEUE"):  # the workdir's own store and queue
        if name not in (extra or {}):
            env.pop(name, None)
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "-d", str(workdir),
               "--replace-workflow-config", "--configfile", str(config or workdir / "study.yaml"), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}\n{logs}")
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's job stats table."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    shutil.copy(TINY, workdir / "study.yaml")
    # 8 jobs at a time: caches, checkpoints and MLflow runs written concurrently (tests below
    # check that none is lost or corrupt).
    snakemake(workdir, "--cores", "8")
    return workdir


def test_run_produces_tables_and_figure(study):
    tables = study / "results" / "tiny" / "tables"
    summary = (tables / "shifts.md").read_text()
    for label in ("Zero-shot", "FT", "SAE-FT", "test (ID)", "sketch", "rendition", "hard", "resampled", "OOD avg"):
        assert label in summary, label
    metrics = pd.read_parquet(tables / "metrics.parquet")
    # zero-shot once, two methods x two seeds; five evaluation splits and ID validation each.
    assert len(metrics) == (1 + 2 * 2) * 6
    assert set(metrics["method"]) == {"zeroshot", "ft", "saeft"}
    assert metrics["value"].between(0, 1).all()
    png = study / "results" / "tiny" / "figures" / "id_vs_ood.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The calibrate job measured the world; without a WiSE-FT curve P5 cannot be shown, so the
    # gate fails and the comparison gives no reading.
    calibration = pd.read_csv(tables / "calibration.csv").set_index("criterion")
    assert calibration.loc["P5", "status"] == "not measured" and bool(calibration.loc["P5", "gate"])
    assert "world not calibrated: " in (tables / "comparison.md").read_text()


def test_feature_analysis_writes_tables_and_cards(study):
    base = study / "results" / "tiny"
    analysis = json.loads((base / "analysis" / "saeft-tiny-rn" / "shapes" / "saeft" / "seed0" / "features.json").read_text())
    assert analysis["method"] == "saeft" and analysis["seed"] == 0 and analysis["sae"]["normalize"] == "l2"
    assert set(analysis["evalsets"]) == {"test", "resampled", "sketch", "rendition", "hard"}
    assert 0 < analysis["evalsets"]["test"]["cka"] <= 1 + 1e-9
    images = pd.read_parquet(base / "analysis" / "saeft-tiny-rn" / "shapes" / "ft" / "seed1" / "images.parquet")
    assert len(images) == 5 * 30 and (images["n_added"] == images["added"].map(len)).all()
    features = pd.read_parquet(base / "tables" / "features.parquet")
    assert len(features) == 2 * 2 * 5 and features["value"].between(0, 1).all()
    summary = (base / "tables" / "features_summary.md").read_text()
    first_cells = {line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("|")}
    assert {"FT", "SAE-FT"} <= first_cells
    cards = base / "analysis" / "saeft-tiny-rn" / "shapes" / "cards"
    for method in ("ft", "saeft"):
        assert (cards / f"{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        written = json.loads((cards / f"{method}.json").read_text())["cards"]
        assert written and all(card["top_images"] and card["label"] for card in written)
    for name in ("features_added_removed.png", "drift_vs_ood.png"):
        assert (base / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_outputs_follow_the_contracts(study):
    import h5py

    base = study / "results" / "tiny"
    with h5py.File(base / "cache" / "saeft-tiny-rn" / "shapes" / "train.h5", "r") as handle:
        assert handle["embeddings"].shape == (60, 128) and handle.attrs["split"] == "train"
    sae = json.loads((base / "sae" / "saeft-tiny-rn" / "shapes" / "sae.json").read_text())
    assert {"fvu", "l0", "dead_fraction"} <= set(sae["metrics"])
    train = json.loads((base / "finetune" / "saeft-tiny-rn" / "shapes" / "saeft" / "seed1" / "train.json").read_text())
    assert train["config"]["seed"] == 1 and len(train["history"]) == 2
    assert not list(base.rglob("*.partial")) and not list(base.rglob("checkpoint.pt"))
    assert not list(base.rglob(".*.tmp"))
    # One evaluation bundle per run: a record per eval set, in the dataset's order.
    bundle_path = base / "eval" / "saeft-tiny-rn" / "shapes" / "saeft" / "seed1" / "evals.json"
    bundle = json.loads(bundle_path.read_text())
    assert (bundle["method"], bundle["seed"], bundle["dataset"]) == ("saeft", 1, "shapes") and "environment" in bundle
    assert list(bundle["evals"]) == ["test", "resampled", "sketch", "rendition", "hard", "val"]
    assert bundle["evals"]["val"]["role"] == "val" and bundle["variant"] == "saeft"
    predictions = pd.read_parquet(bundle_path.with_name("predictions.parquet"))
    assert predictions.groupby("evalset", sort=False).size().to_dict() == {e: r["n"] for e, r in bundle["evals"].items()}
    sketch = bundle["evals"]["sketch"]
    assert (sketch["evalset"], sketch["role"], sketch["seed"]) == ("sketch", "ood", 1)
    assert sum(sketch["per_class"]["total"]) == sketch["n"] == 30


def test_mlflow_has_one_run_per_job_with_params_and_metrics(study):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    # One parent run for the study, every job's run nested under it (what the MLflow UI groups).
    [parent] = [run for run in runs if run.data.tags.get("saeft.study_parent") == "tiny"]
    runs = [run for run in runs if run is not parent]
    assert {run.data.tags.get("mlflow.parentRunId") for run in runs} == {parent.info.run_id}
    names = [run.info.run_name for run in runs]
    # logs/tiny/workflow/ holds the run's worker and MLflow sync, which are no jobs.
    jobs = len([p for p in (study / "logs" / "tiny").rglob("*.log") if p.parent.name != "workflow"])
    assert len(runs) == jobs and len(set(names)) == len(names)
    assert all(run.info.status == "FINISHED" for run in runs + [parent])
    assert not list((study / "mlflow-queue").glob("*.jsonl"))  # no job had to queue its tracking
    finetune = [r for r in runs if r.data.tags.get("rule") == "finetune"]
    assert len(finetune) == 4
    run = next(r for r in finetune if r.data.tags["wc.method"] == "saeft" and r.data.tags["wc.seed"] == "0")
    assert run.info.run_name == "finetune/model=saeft-tiny-rn,dataset=shapes,method=saeft,seed=0"
    assert run.data.params["config.method_params.lambda"] == "10" and run.data.params["config.lr"] == "0.001"
    assert "heldout_top1" in run.data.metrics and run.info.status == "FINISHED"
    assert run.data.tags["git_commit"] and run.data.tags["config_hash"]
    [aggregate] = [r for r in runs if r.data.tags.get("rule") == "aggregate_tables"]
    artifacts = {a.path for folder in ("tables", "figures") for a in client.list_artifacts(aggregate.info.run_id, folder)}
    assert {"tables/shifts.md", "tables/shifts.tex", "tables/shifts.json", "tables/metrics.parquet",
            "figures/id_vs_ood.png", "figures/shifts_shapes.png", "figures/training_shapes.png"} <= artifacts
    # Plain tags group the runs of one method across seeds in the MLflow UI; an evaluation's run
    # holds every eval set's metric.
    evaluations = [r for r in runs if r.data.tags.get("rule") == "evaluate_model" and r.data.tags["method"] == "saeft"]
    assert sorted(r.data.tags["seed"] for r in evaluations) == ["0", "1"]
    for r in evaluations:
        assert {f"{m}/{e}" for e in ("test", "resampled", "sketch", "rendition", "hard") for m in ("top1", "n")} <= set(r.data.metrics)
        assert {i.dataset.name for i in r.inputs.dataset_inputs} >= {"shapes/test", "shapes/sketch"}
    assert {r.data.tags["method"] for r in finetune} == {"ft", "saeft"}


def test_the_report_holds_every_table_and_figure(study):
    report = study / "results" / "report.html"
    snakemake(study, "--report", str(report))
    text = report.read_text()
    base = study / "results" / "tiny"
    shown = sorted(p for folder in ("tables", "figures") for p in (base / folder).iterdir() if p.suffix != ".md")
    assert len(shown) > 20
    for path in shown:  # each one embedded under its name
        assert f"filename={path.name};" in text, path.name
    for caption in ("Distribution-shift table", "Effective-robustness view", "WiSE-FT curve over alpha",
                    "Fine-tuning curves", "Feature cards"):
        assert caption in text, caption
    assert "Study tiny" in text and "shapes" in text


def test_second_run_has_nothing_to_do_even_after_a_new_commit(study):
    assert planned_jobs(snakemake(study, "-n", "--cores", "2")) == {}
    # The git commit is an MLflow tag, not a rule param: a new commit reruns nothing.
    assert planned_jobs(snakemake(study, "-n", "--cores", "2", env={"SAEFT_GIT_COMMIT": "0123abc"})) == {}


def plan_after_change(study: Path, tmp_path: Path, section: str, key: str, value: object) -> dict[str, int]:
    """The jobs a dry run plans after setting ``section.key`` to ``value`` in the study config."""
    config = yaml.safe_load((study / "study.yaml").read_text())
    config[section][key] = value
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    return planned_jobs(snakemake(study, "-n", "--cores", "2", config=changed))


def test_changing_finetune_lr_reruns_only_finetune_and_after(study, tmp_path):
    jobs = plan_after_change(study, tmp_path, "finetune", "lr", 0.0005)
    assert set(jobs) == {"finetune", "evaluate_model", "calibrate", "aggregate_tables", "analyze_features",
                         "plot_feature_cards", "aggregate_features", "all"}
    assert jobs["finetune"] == 4 and jobs["evaluate_model"] == 4 and jobs["analyze_features"] == 4
    assert jobs["calibrate"] == 1  # FT's weights changed: the world is measured again


def test_changing_sae_k_reruns_the_sae_and_its_users_only(study, tmp_path):
    jobs = plan_after_change(study, tmp_path, "sae", "k", 4)
    assert set(jobs) == {"train_sae", "finetune", "evaluate_model", "aggregate_tables", "analyze_features",
                         "plot_feature_cards", "aggregate_features", "all"}
    assert jobs["finetune"] == 2  # saeft's two seeds; ft does not use the SAE
    assert jobs["analyze_features"] == 4  # every run is read through the (new) zero-shot SAE


def test_changing_one_methods_hyperparameter_reruns_that_method_and_the_aggregates(study, tmp_path):
    config = yaml.safe_load((study / "study.yaml").read_text())
    config["methods"]["saeft"]["lambda_add"] = 5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = snakemake(study, "-n", "--cores", "2", config=changed)
    assert planned_jobs(result) == {"finetune": 2, "evaluate_model": 2, "analyze_features": 2, "plot_feature_cards": 1,
                                    "aggregate_features": 1, "aggregate_tables": 1, "all": 1}
    blocks = re.split(r"\n\[[^\]\n]+\]\n", result.stdout + result.stderr)
    trained = [block for block in blocks if block.startswith(("rule finetune:", "rule evaluate_model:"))]
    assert len(trained) == 2 + 2 and all(re.search(r"(method=saeft,|run=saeft/)", block) for block in trained)


def test_changing_the_cards_reruns_only_the_cards(study, tmp_path):
    config = yaml.safe_load((study / "study.yaml").read_text())
    config["analysis"] = {"cards": {"images": 4}}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert planned_jobs(snakemake(study, "-n", "--cores", "2", config=changed)) == {"plot_feature_cards": 1, "all": 1}


@pytest.mark.parametrize("source", ["file", "openai"])
def test_real_weights_take_pretrain_clip_out_of_the_dag(tmp_path, source):
    config = yaml.safe_load(TINY.read_text())
    if source == "file":
        weights = tmp_path / "ViT-tiny.safetensors"
        weights.write_bytes(b"")  # a dry run only checks that the input exists
        source = str(weights)
    config["model"]["pretrained"] = source
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--cores", "2", config=study))
    assert "pretrain_clip" not in jobs and jobs["prepare_model"] == 1


def test_a_method_regularises_with_the_sweep_sae_it_names(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["sae"]["sweep"] = [{"name": "x4", "expansion": 4}]
    config["methods"]["saeft"]["sae"] = "x4"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--cores", "2", config=study)
    blocks = re.split(r"\n\[[^\]\n]+\]\n", result.stdout + result.stderr)  # one per job, after its timestamp
    jobs = [block for block in blocks if block.startswith("rule finetune:")]
    assert len(jobs) == 4
    for block in jobs:
        uses_sweep = "sae/saeft-tiny-rn/shapes/x4/sae.safetensors" in block
        assert uses_sweep == ("method=saeft" in block)


def test_missing_checkpoint_fails_before_any_job(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["model"]["pretrained"] = str(tmp_path / "absent.safetensors")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config))
    with pytest.raises(AssertionError, match="model.pretrained: checkpoint .*absent.safetensors does not exist"):
        snakemake(tmp_path, "-n", "--cores", "2", config=study)


def test_fixed_seeds_give_identical_metrics(study):
    # SAE-FT (the method in question) on seed 1 trained again: its evaluations, its WiSE-FT and
    # the tables follow; every metric is bit-identical. (One run, not all four: CI time.)
    weights = study / "results" / "tiny" / "finetune" / "saeft-tiny-rn" / "shapes" / "saeft" / "seed1" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    before = pd.read_parquet(study / "results" / "tiny" / "tables" / "metrics.parquet")
    snakemake(study, "--cores", "2", "--forcerun", str(weights.relative_to(study)))
    assert weights.stat().st_mtime_ns > trained  # it really trained again
    after = pd.read_parquet(study / "results" / "tiny" / "tables" / "metrics.parquet")
    key = ["method", "seed", "evalset"]
    pd.testing.assert_frame_equal(before.sort_values(key).reset_index(drop=True), after.sort_values(key).reset_index(drop=True))


@pytest.mark.parametrize("views", [2, 0])
def test_augmented_views_have_a_views_cache_or_a_live_teacher(tmp_path, views):
    config = yaml.safe_load(TINY.read_text())
    config["finetune"].update(augment="crop_flip", views=views)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--cores", "2", config=study)
    jobs = planned_jobs(result)
    blocks = re.split(r"\n\[[^\]\n]+\]\n", result.stdout + result.stderr)
    saeft_jobs = [block for block in blocks if block.startswith("rule finetune:") and "method=saeft" in block]
    assert len(saeft_jobs) == 2
    if views:
        assert jobs["cache_views"] == 1  # one bank for every method and seed
        assert all("cache/saeft-tiny-rn/shapes/train.views.h5" in block for block in saeft_jobs)
    else:
        assert "cache_views" not in jobs  # fresh views every epoch: the teacher runs live
        assert not any("train.views.h5" in block or "train.h5" in block for block in saeft_jobs)


def test_a_dead_tracking_server_queues_runs_that_sync_mlflow_replays(study):
    import socket

    import mlflow

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = snakemake(study, "--cores", "2", "--forcerun", "aggregate_tables", env={"MLFLOW_TRACKING_URI": dead})
    assert "queued their MLflow tracking" in result.stderr
    assert len(list((study / "mlflow-queue").glob("*.jsonl"))) == 1
    client = mlflow.tracking.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    before = client.search_runs([experiment], filter_string="attributes.run_name = 'aggregate_tables'")
    # Earlier tests on the shared study may already have rerun the aggregate: count from here.
    seconds_before = len(client.get_metric_history(before[0].info.run_id, "seconds"))
    snakemake(study, "--cores", "1", "sync_mlflow")  # the target after an option: --configfile takes several values
    assert not list((study / "mlflow-queue").glob("*.jsonl"))
    after = client.search_runs([experiment], filter_string="attributes.run_name = 'aggregate_tables'")
    # Same job and config: the replay went into the aggregate run of the same key, not a new one.
    assert len(after) == len(before) == 1 and after[0].info.status == "FINISHED"
    assert len(client.get_metric_history(after[0].info.run_id, "seconds")) == seconds_before + 1
