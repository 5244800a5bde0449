"""MLflow tracking: one run per job, never a failed job because of tracking, and no run lost.

Jobs log to ``MLFLOW_TRACKING_URI`` or, by default, to the SQLite store ``mlflow.db`` in the
working directory. Creating a new SQLite store from several processes at once races, so the
workflow creates the store and the study's experiment once (``saeft init-tracking``) before
parallel jobs start.

Each job's run carries a stable key (tag ``saeft.run_key``: experiment, run name and config), so
a retried job reopens its run instead of adding a second one. When a tracking call fails (server
down, store locked, disk full), the job logs one warning and writes that call and every later one
to a queue file, ``mlflow-queue/<run key>.jsonl`` in the working directory (``SAEFT_MLFLOW_QUEUE``
moves it); ``saeft sync-tracking`` (rule ``sync_mlflow``) replays the queue later into the run of
the same key. Replaying is idempotent: metrics keep the timestamps they were logged with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from saeft.io import config_hash
from saeft.runs import RunId
from saeft.variants import grid_values, method_of

logger = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
DEFAULT_QUEUE = "mlflow-queue"
RUN_KEY_TAG = "saeft.run_key"
MAX_PARAMS_PER_CALL = 100  # MLflow's limit per log_batch


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def queue_dir() -> Path:
    """Where jobs queue the tracking calls that failed: ``SAEFT_MLFLOW_QUEUE`` or ./mlflow-queue."""
    return Path(os.environ.get("SAEFT_MLFLOW_QUEUE") or DEFAULT_QUEUE).resolve()


def _mlflow() -> Any:
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # A dead server must cost a job seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def init_store(experiment: str) -> bool:
    """Create the tracking store and ``experiment`` if missing; False (and a warning) on failure."""
    try:
        mlflow = _mlflow()
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment)
        logger.info("MLflow store %s ready, experiment %r", tracking_uri(), experiment)
        return True
    except Exception as exc:  # tracking must never stop the pipeline
        logger.warning("MLflow store %s could not be prepared: %s", tracking_uri(), exc)
        return False


def run_key(track: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """The job's stable identity: the same job (same experiment, run name and inputs) gets the same
    key on every attempt; a changed config gets a new one. Thread counts do not count."""
    identity = {"experiment": track.get("experiment"), "run_name": track.get("run_name"),
                "params": {k: v for k, v in params.items() if k != "threads"}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Store:
    """The live MLflow calls of one run, through the client API (no global active run)."""

    def __init__(self, mlflow: Any) -> None:
        self.client = mlflow.tracking.MlflowClient(tracking_uri())

    def open_run(self, experiment: str, run_name: str | None, key: str, tags: Mapping[str, str]) -> str:
        """The run of ``key`` in ``experiment``, reopened as RUNNING, or a new one."""
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        existing = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: key}).info.run_id
        for name, value in tags.items():
            self.client.set_tag(run_id, name, value)
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
            metrics = [Metric(k, v, op["timestamp"], op.get("step") or 0) for k, v in op["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics)
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
            self.client.set_terminated(run_id, status=op["status"])
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")


class JobRun:
    """The MLflow run of one job. Calls go to the store while it answers; after the first failure
    they go to the job's queue file, to be replayed by ``saeft sync-tracking``."""

    def __init__(self, track: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> None:
        self.enabled = bool(track)
        self.key = run_key(track, params or {}) if track else ""
        self._header = {"op": "open", "experiment": (track or {}).get("experiment"), "run_name": (track or {}).get("run_name"),
                        "key": self.key, "tags": {}}
        self._store: _Store | None = None
        self._run_id: str | None = None
        self.queued = False

    @property
    def queue_file(self) -> Path:
        return queue_dir() / f"{self.key}.jsonl"

    def open(self, tags: Mapping[str, str], params: Mapping[str, str]) -> None:
        self._header["tags"] = dict(tags)
        try:
            self._store = _Store(_mlflow())
            self._run_id = self._store.open_run(self._header["experiment"], self._header["run_name"], self.key, tags)
        except Exception as exc:  # tracking must never fail a job
            self._fall_back(f"MLflow run could not be started at {tracking_uri()}: {exc}")
        self._do({"op": "params", "params": dict(params)})

    def _fall_back(self, reason: str) -> None:
        logger.warning("%s; queueing this job's tracking in %s (replay: saeft sync-tracking)", reason, self.queue_file)
        self.queued = True
        self._append(self._header)

    def _append(self, op: Mapping[str, Any]) -> None:
        try:
            self.queue_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.queue_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(op, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            logger.warning("tracking queue %s not writable, dropping %s: %s", self.queue_file, op.get("op"), exc)

    def _do(self, op: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self.queued:
            try:
                assert self._store is not None and self._run_id is not None
                self._store.apply(self._run_id, op)
                return
            except Exception as exc:
                self._fall_back(f"MLflow {op['op']} failed: {exc}")
        if op["op"] == "figure":  # a figure object cannot be queued: its PNG can
            copy = self.queue_file.with_suffix("") / op["artifact_file"]
            try:
                copy.parent.mkdir(parents=True, exist_ok=True)
                op["figure"].savefig(copy)
            except (OSError, ValueError) as exc:
                logger.warning("figure %s not queued: %s", op["artifact_file"], exc)
                return
            op = {"op": "artifact", "path": str(copy), "artifact_path": os.path.dirname(op["artifact_file"]) or None}
        elif op["op"] == "artifact":  # keep a copy: the file may change before the replay
            copy = self.queue_file.with_suffix("") / Path(op["path"]).name
            try:
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(op["path"], copy)
                op = {**op, "path": str(copy)}
            except OSError as exc:
                logger.warning("artifact %s not queued: %s", op["path"], exc)
                return
        self._append(op)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numeric entries of ``metrics``."""
        numeric = {k: float(v) for k, v in _flatten(metrics).items() if _is_number(v)}
        if numeric:
            self._do({"op": "metrics", "metrics": numeric, "step": step, "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Attach a file to the run (under the folder ``artifact_path`` of its artifacts)."""
        self._do({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_table(self, frame: Any, artifact_file: str) -> None:
        """Log a pandas DataFrame as an MLflow table (``artifact_file`` ends in ``.json``), which
        the UI's artifact view and ``mlflow.load_table`` read."""
        plain = frame.astype(object).where(frame.notna(), None)  # pd.NA and NaN as JSON null
        self._do({"op": "table", "artifact_file": artifact_file,
                  "data": {"columns": [str(c) for c in plain.columns], "data": plain.to_numpy().tolist()}})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image artifact (``artifact_file``: e.g. ``figures/x.png``)."""
        self._do({"op": "figure", "figure": figure, "artifact_file": artifact_file})

    def end(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        """End the run with ``status``, first setting ``tags``."""
        self._do({"op": "end", "status": status, "tags": dict(tags or {})})


@contextlib.contextmanager
def job_run(track: Mapping[str, Any] | None, params: Mapping[str, Any]) -> Iterator[JobRun]:
    """Open the MLflow run described by ``track`` (experiment, run_name, tags) with ``params``.

    ``track`` None disables tracking. The run ends FINISHED when the body succeeds and FAILED
    when it raises; the body's exception always propagates, tracking errors never do. The run's
    ``env.*`` tags record the job's environment (:func:`saeft.environment.runtime_tags`): set when
    it opens, and again when it ends, with the thread count and device the stage ended up using.
    """
    run = JobRun(track, params)
    if track:
        tags = {**track.get("tags", {}), **comparison_tags(track.get("tags", {})), "config_hash": config_hash(params),
                "git_commit": os.environ.get("SAEFT_GIT_COMMIT", "unknown"), **_environment_tags()}
        run.open(tags, {k: str(v)[:6000] for k, v in _flatten(params).items()})
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run.end(status, _environment_tags() if track else None)


def _environment_tags() -> dict[str, str]:
    """The ``env.*`` tags, or none (and a warning) if they cannot be read: never a failed job."""
    from saeft.environment import runtime_tags

    try:
        return runtime_tags()
    except Exception as exc:  # tracking must never fail a job
        logger.warning("environment not recorded in MLflow: %s", exc)
        return {}


def comparison_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Plain ``model``, ``dataset``, ``method``, ``variant``, ``seed`` and ``alpha`` tags from a
    job's wildcard tags (``wc.<name>``), so the MLflow UI can group one method's runs across seeds
    and variants: an evaluated run ``<variant>/seed<N>[/alpha<a>]`` is split into its parts, and a
    grid variant's values become ``param.<key>`` tags (saeft.variants). (An evaluation's run
    covers every eval set: its metrics are named ``<eval set>.<metric>``.)"""
    wildcards = {key[3:]: value for key, value in tags.items() if key.startswith("wc.")}
    out = {key: wildcards[key] for key in ("model", "dataset", "seed") if key in wildcards}
    try:
        if "method" in wildcards:  # a fine-tuning job: the wildcard is the variant
            out.update(method=method_of(wildcards["method"]), variant=wildcards["method"])
            out.update({f"param.{k}": v for k, v in grid_values(wildcards["method"]).items()})
        if "run" in wildcards:
            run = RunId.parse(wildcards["run"])
            out.update(method=run.row, variant=run.variant, seed="none" if run.seed is None else str(run.seed),
                       alpha="none" if run.alpha is None else f"{run.alpha:g}")
            out.update({f"param.{k}": v for k, v in grid_values(run.variant).items()} if not run.zeroshot else {})
    except ValueError as exc:  # tracking must never fail a job
        logger.warning("no comparison tags: %s", exc)
    return out


def replay_queue(folder: str | os.PathLike | None = None) -> dict[str, int]:
    """Replay every queued job into the store; a replayed file is removed, a failing one kept
    (and named in the warning) for the next attempt. Returns counts of runs and operations."""
    folder = Path(folder) if folder is not None else queue_dir()
    counts = {"runs": 0, "operations": 0, "failed": 0}
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        logger.info("no queued tracking in %s", folder)
        return counts
    store = _Store(_mlflow())
    for path in files:
        ops = _read_queue(path)
        try:
            run_id = None
            for op in ops:
                if op["op"] == "open":
                    run_id = store.open_run(op["experiment"], op["run_name"], op["key"], op["tags"])
                elif run_id is None:
                    raise ValueError("no 'open' record before the first operation")
                else:
                    store.apply(run_id, op)
        except Exception as exc:
            counts["failed"] += 1
            logger.warning("replaying %s failed, kept for the next sync: %s", path, exc)
            continue
        counts["runs"] += 1
        counts["operations"] += len(ops)
        shutil.rmtree(path.with_suffix(""), ignore_errors=True)
        path.unlink()
        logger.info("replayed %s (%d operations)", path.name, len(ops))
    return counts


def _read_queue(path: Path) -> list[dict[str, Any]]:
    """The operations of a queue file; a torn last line (a job killed mid-write) is skipped."""
    ops = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: skipping a torn last line", path)
                continue
            raise ValueError(f"{path}:{number}: not a JSON record") from None
    return ops


_KEY_CHARS = str.maketrans({"@": "/", "=": ":", ",": " "})
"""MLflow param names take letters, digits, _ - . space : / only: a variant's name
(``saeft@lambda=1,mu=10``) as a key part reads ``saeft/lambda:1 mu:10``."""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{str(key).translate(_KEY_CHARS)}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
