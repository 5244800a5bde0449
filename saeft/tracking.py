"""MLflow tracking: one run per job, and never a failed job because of tracking.

Jobs log to ``MLFLOW_TRACKING_URI`` or, by default, to the SQLite store ``mlflow.db`` in the
working directory. Creating a new SQLite store from several processes at once races, so the
workflow creates the store and the study's experiment once (``saeft init-tracking``) before
parallel jobs start. Every MLflow call is guarded: a failure logs a warning and the job goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from saeft.io import config_hash

logger = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def _mlflow() -> Any:
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
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


class JobRun:
    """The MLflow run of one job; each method swallows tracking errors with a warning."""

    def __init__(self, mlflow: Any | None) -> None:
        self._mlflow = mlflow

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._mlflow is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # tracking must never fail a job
            logger.warning("MLflow %s failed: %s", what, exc)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numeric entries of ``metrics``."""
        numeric = {k: float(v) for k, v in _flatten(metrics).items() if _is_number(v)}
        if self._mlflow is not None and numeric:
            self._guard("log_metrics", self._mlflow.log_metrics, numeric, step=step)

    def log_artifact(self, path: str | os.PathLike) -> None:
        """Attach a file to the run."""
        if self._mlflow is not None:
            self._guard("log_artifact", self._mlflow.log_artifact, str(path))


@contextlib.contextmanager
def job_run(track: Mapping[str, Any] | None, params: Mapping[str, Any]) -> Iterator[JobRun]:
    """Open the MLflow run described by ``track`` (experiment, run_name, tags) with ``params``.

    ``track`` None disables tracking. The run ends FINISHED when the body succeeds and FAILED
    when it raises; the body's exception always propagates, tracking errors never do.
    """
    if not track:
        yield JobRun(None)
        return
    mlflow = None
    try:
        mlflow = _mlflow()
        mlflow.set_experiment(track["experiment"])
        tags = {**track.get("tags", {}), "config_hash": config_hash(params),
                "git_commit": os.environ.get("SAEFT_GIT_COMMIT", "unknown")}
        mlflow.start_run(run_name=track.get("run_name"), tags=tags)
        flat = {k: str(v)[:6000] for k, v in _flatten(params).items()}
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(list(flat.items())[start:start + 100]))
    except Exception as exc:
        logger.warning("MLflow run could not be started at %s: %s", tracking_uri(), exc)
        _end(mlflow, "FAILED")
        mlflow = None
    status = "FAILED"
    try:
        yield JobRun(mlflow)
        status = "FINISHED"
    finally:
        _end(mlflow, status)


def _end(mlflow: Any | None, status: str) -> None:
    if mlflow is None:
        return
    try:
        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)
    except Exception as exc:
        logger.warning("MLflow run could not be ended: %s", exc)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
