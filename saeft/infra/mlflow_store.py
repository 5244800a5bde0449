"""Where the MLflow store is and the live calls of one run against it (through the client API, no
global active run): the half of :mod:`saeft.infra.tracking` that talks to MLflow. A local SQLite store
keeps its artifacts beside it; a lock beside a local store serialises the lookup or creation of a
study's parent run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

logger = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
RUN_KEY_TAG = "saeft.run_key"
PARENT_TAG = "saeft.study_parent"
"""Tag of a study's parent run; its value is the study's name."""
PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's tag of a nested run: the id of its parent (the UI nests runs by it)."""
WEIGHTS_TAG = "saeft.nn.weights"
"""Tag of a logged model: the absolute path of its weights file, by which evaluations link to it."""
MAX_PARAMS_PER_CALL = 100  # MLflow's limit per log_batch
MAX_METRICS_PER_CALL = 1000  # MLflow's limit per log_batch


TRACKING_SWITCH = "SAEFT_TRACKING"
"""Environment variable: ``off`` (or ``0``, ``false``, ``no``) and jobs log nothing to MLflow and
never import it; ``spool`` (what the workflow sets unless it is ``off`` or ``live``) and jobs
write their tracking to the queue folder, cheaply and without MLflow, for the workflow's sync
process to send; anything else, or unset, and jobs log to the store themselves."""


def tracking_mode() -> str:
    """``off``, ``spool`` or ``live`` (:data:`TRACKING_SWITCH`)."""
    value = os.environ.get(TRACKING_SWITCH, "on").strip().lower()
    return "off" if value in {"off", "0", "false", "no"} else "spool" if value == "spool" else "live"


def tracking_enabled() -> bool:
    """Whether jobs log to MLflow (:data:`TRACKING_SWITCH`), live or spooled."""
    return tracking_mode() != "off"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def local_store() -> Path | None:
    """The file of a local SQLite store or the folder of a local file store; None for a server."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if uri.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(uri).path)
    return Path(uri) if "://" not in uri else None


def artifact_location(experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a SQLite store ``mlruns/<experiment>``
    beside the store, so the store and its artifacts stay together whatever directory a job
    runs in; None (MLflow's default) for a file store (already beside it) or a server, whose
    ``mlflow-artifacts:/`` locations are relative to its ``--artifacts-destination``."""
    store = local_store()
    if store is None or not tracking_uri().startswith("sqlite:"):
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "experiment"
    return str(store.resolve().parent / "mlruns" / safe)


@contextlib.contextmanager
def store_lock() -> Iterator[None]:
    """An exclusive lock beside a local store (none for a server): jobs that start together
    look up or create a study's parent run one at a time."""
    store = local_store()
    if store is None:
        yield
        return
    path = store.with_name(store.name + ".saeft-lock") if not store.is_dir() else store / ".saeft-lock"
    # A FileLock per call opens its own file, so threads exclude each other as processes do.
    lock = FileLock(path, preserve_lock_file=True)
    try:
        lock.acquire()
    except OSError as exc:
        logger.debug("no lock at %s: %s", path, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def open_mlflow() -> Any:
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # A dead server must cost a job seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


class Store:
    """The live MLflow calls of one run, through the client API (no global active run)."""

    def __init__(self, mlflow: Any) -> None:
        self.client = mlflow.tracking.MlflowClient(tracking_uri())

        self._parents: dict[tuple[str, str], str] = {}
        self._models: dict[str, str | None] = {}

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (artifacts at :func:`artifact_location`) if missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(name))
        except Exception:  # another job created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def study_parent(self, experiment_id: str, study: str) -> str:
        """The id of the parent run of ``study``: the oldest run tagged ``saeft.study_parent`` =
        ``study``, created (and marked FINISHED: it only groups) if there is none. Under a lock for
        a local store, so concurrent jobs make one; with a server, where no lock is shared, a job
        that finds an older parent than the one it just made deletes its own (the workflow makes
        the parent before any job starts, in ``saeft init-tracking``)."""
        if (experiment_id, study) in self._parents:
            return self._parents[experiment_id, study]
        with store_lock():
            parents = self._find_parents(experiment_id, study)
            if not parents:
                note = f"Study {study}: every job's run of this study is nested under this run."
                created = self.client.create_run(experiment_id, run_name=study, tags={
                    PARENT_TAG: study, "study": study, "mlflow.note.content": note}).info.run_id
                self.client.set_terminated(created, status="FINISHED")
                parents = self._find_parents(experiment_id, study) or [created]
                if parents[0] != created:
                    self.client.delete_run(created)
            run_id = parents[0]
        self._parents[experiment_id, study] = run_id
        return run_id

    def _find_parents(self, experiment_id: str, study: str) -> list[str]:
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{study}'", max_results=100)
        return [run.info.run_id for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]

    def open_run(self, experiment: str, run_name: str | None, key: str, tags: Mapping[str, str],
                 start_time: int | None = None) -> str:
        """The run of ``key`` in ``experiment``, reopened as RUNNING, or a new one started at
        ``start_time`` (ms; now by default); a run tagged with a ``study`` is nested under that
        study's parent run."""
        from mlflow.entities import RunTag

        experiment_id = self.experiment_id(experiment)
        if tags.get("study"):
            tags = {**tags, PARENT_RUN_TAG: self.study_parent(experiment_id, tags["study"])}
        existing = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: key},
                                            start_time=start_time).info.run_id
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return run_id

    def apply(self, run_id: str, op: Mapping[str, Any]) -> None:
        """Carry out one queued or live operation on ``run_id``."""
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "params":
            params = [Param(k, v) for k, v in op["params"].items()]
            for start in range(0, len(params), MAX_PARAMS_PER_CALL):
                self.client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_CALL])
        elif kind == "metrics":
            links = op.get("links") or {}
            model_id = self._model_of(run_id, op["model_weights"]) if op.get("model_weights") and links else None
            metrics = [Metric(k, v, op["timestamp"], op.get("step") or 0, model_id=model_id if k in links else None,
                              dataset_name=links[k][0] if k in links else None,
                              dataset_digest=links[k][1] if k in links else None) for k, v in op["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics)
        elif kind == "curve":
            metrics = [Metric(k, v, timestamp, step) for k, v, step, timestamp in op["points"]]
            for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
                self.client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_CALL])
        elif kind == "inputs":
            self._log_inputs(run_id, op["datasets"], op["context"])
        elif kind == "dict":
            self.client.log_dict(run_id, op["data"], op["artifact_file"])
        elif kind == "model":
            self._log_model(run_id, op)
        elif kind == "artifact":
            self.client.log_artifact(run_id, op["path"], op.get("artifact_path"))
        elif kind == "table":
            import pandas as pd

            frame = pd.DataFrame(op["data"]["data"], columns=op["data"]["columns"])
            self.client.log_table(run_id, data=frame, artifact_file=op["artifact_file"])
        elif kind == "figure":  # live only: a queued figure is an artifact (its PNG)
            self.client.log_figure(run_id, op["figure"], op["artifact_file"])
        elif kind == "end":
            if op.get("tags"):  # the environment as the job ended
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
            self.client.set_terminated(run_id, status=op["status"], end_time=op.get("end_time"))
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")

    def _model_of(self, run_id: str, weights: str) -> str | None:
        """The id of the logged model of the weights file ``weights`` (tag ``saeft.nn.weights``, its
        absolute path) in the run's experiment; None when no job logged one (a zero-shot model)."""
        if weights not in self._models:
            experiment_id = self.client.get_run(run_id).info.experiment_id
            found = self.client.search_logged_models([experiment_id], max_results=1,
                                                     filter_string=f"tags.`{WEIGHTS_TAG}` = '{weights}'")
            self._models[weights] = found[0].model_id if found else None
        return self._models[weights]

    def _log_inputs(self, run_id: str, datasets: list[Mapping[str, Any]], context: str) -> None:
        """Dataset inputs described by metadata (MLflow keeps one per name and digest)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], json.dumps(d["source"], sort_keys=True),
                                       None, json.dumps(d["profile"], sort_keys=True)),
                               [InputTag("mlflow.data.context", context)]) for d in datasets]
        self.client.log_inputs(run_id, datasets=inputs)

    def _log_model(self, run_id: str, op: Mapping[str, Any]) -> None:
        """A logged model of the run (one per name, a replay or retry reuses it) that holds the
        reference to the weights, ``reference.json``, as its artifact; the run lists it as output."""
        import tempfile

        from mlflow.entities import LoggedModelOutput

        run = self.client.get_run(run_id)
        name = op["name"]
        found = self.client.search_logged_models([run.info.experiment_id], max_results=1,
                                                 filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
        model = found[0] if found else self.client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id, params=op["params"], tags=op["tags"], model_type=op["model_type"])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "reference.json"
            path.write_text(json.dumps(op["reference"], indent=1, sort_keys=True), encoding="utf-8")
            self.client.log_model_artifact(model.model_id, str(path))
        self.client.finalize_logged_model(model.model_id, "READY")
        if model.model_id not in {m.model_id for m in run.outputs.model_outputs}:
            self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
