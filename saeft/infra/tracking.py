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

What a researcher sees: every job of a study (its ``study`` tag) is nested under one parent run
named after the study (tag ``saeft.study_parent``), found by that tag or created once, under a
lock for a local store (two jobs starting together make one parent); metrics are named by what
they are (``top1/sketch``: metric / eval set); evaluations log their eval sets as dataset inputs
(name, source, digest and counts, never the images); pretraining and SAE training log per-step
curves, buffered and sent in batches (:meth:`JobRun.log_curve`); fine-tuning logs a reference to
its weights (``model/reference.json`` and an MLflow logged model holding it), not a copy. A local
SQLite store keeps its artifacts beside it (``mlruns/<experiment>`` next to ``mlflow.db``), not in
whichever working directory created the experiment.
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

from saeft.infra.io import config_hash, process_alive, read_metadata
from saeft.infra.mlflow_store import (  # noqa: F401 (the store's names, re-exported for callers of tracking)
    DEFAULT_STORE,
    MAX_METRICS_PER_CALL,
    MAX_PARAMS_PER_CALL,
    PARENT_RUN_TAG,
    PARENT_TAG,
    RUN_KEY_TAG,
    WEIGHTS_TAG,
    artifact_location,
    local_store,
    tracking_enabled,
    tracking_mode,
    tracking_uri,
)
from saeft.infra.mlflow_store import Store as _Store
from saeft.infra.mlflow_store import open_mlflow as _mlflow
from saeft.plan.runs import RunId
from saeft.plan.variants import grid_values, method_of

logger = logging.getLogger(__name__)

DEFAULT_QUEUE = "mlflow-queue"
CURVE_FLUSH_SECONDS = 30.0
"""A job's buffered curve points go to the store at least this often (and when 1000 wait)."""




def queue_dir() -> Path:
    """Where jobs queue the tracking calls that failed: ``SAEFT_MLFLOW_QUEUE`` or ./mlflow-queue."""
    return Path(os.environ.get("SAEFT_MLFLOW_QUEUE") or DEFAULT_QUEUE).resolve()




def init_store(experiment: str, study: str | None = None) -> bool:
    """Create the tracking store and ``experiment`` if missing and, given ``study``, the study's
    parent run; False (and a warning) on failure. Nothing (True) when tracking is off."""
    if not tracking_enabled():
        logger.info("MLflow tracking is off (SAEFT_TRACKING): no store prepared")
        return True
    try:
        store = _Store(_mlflow())
        experiment_id = store.experiment_id(experiment)
        if study:
            store.study_parent(experiment_id, study)
        logger.info("MLflow store %s ready, experiment %r", tracking_uri(), experiment)
        return True
    except Exception as exc:  # tracking must never stop the pipeline
        logger.warning("MLflow store %s could not be prepared: %s", tracking_uri(), exc)
        return False


def dataset_record(name: str, source: str, digest: str, profile: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata of one dataset input (:meth:`JobRun.log_inputs`): ``source`` a path (MLflow
    source type ``local``) or, for images made in memory, a description such as
    ``generated:shapes/test`` (type ``code``); ``profile``: counts such as the number of images."""
    generated = not source or source.startswith("generated:")
    return {"name": name, "digest": digest, "source_type": "code" if generated else "local",
            "source": {"uri": source}, "profile": dict(profile)}


def model_reference(weights: str | os.PathLike, summary: str | os.PathLike | None = None) -> dict[str, Any]:
    """What MLflow keeps of a fine-tuned classifier instead of a copy of its weights: their path
    (as the job named it, relative to the workflow's directory, and absolute), size and SHA-256,
    the architecture and run identity from the file's metadata, and how to load it back."""
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    meta = read_metadata(weights)
    return {"weights": str(weights), "weights_absolute": os.path.abspath(weights), "bytes": os.path.getsize(weights),
            "sha256": digest.hexdigest(), "format": "safetensors", "metadata": meta,
            "summary": str(summary) if summary else None,
            "load": "saeft.nn.models.load_classifier(weights) -> (ImageClassifier: visual tower + head, metadata)",
            "export": f"saeft export --run {weights} --out <folder> (an open_clip checkpoint folder)"}


def run_key(track: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """The job's stable identity: the same job (same experiment, run name and inputs) gets the same
    key on every attempt; a changed config gets a new one. Thread counts do not count."""
    identity = {"experiment": track.get("experiment"), "run_name": track.get("run_name"),
                "params": {k: v for k, v in params.items() if k != "threads"}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]




class JobRun:
    """The MLflow run of one job. Calls go to the store while it answers; after the first failure
    they go to the job's queue file, to be replayed by ``saeft sync-tracking``."""

    def __init__(self, track: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> None:
        self.enabled = bool(track)
        self.key = run_key(track, params or {}) if track else ""
        self._header = {"op": "open", "experiment": (track or {}).get("experiment"), "run_name": (track or {}).get("run_name"),
                        "key": self.key, "tags": {}, "start_time": int(time.time() * 1000)}
        # A spooled job writes a file per attempt (the key and this process), complete once it
        # holds the run's end: the sync process sends complete files while others are written.
        self.spooled = self.enabled and tracking_mode() == "spool"
        self._queue_name = f"{self.key}.{os.getpid()}" if self.spooled else self.key
        self._store: _Store | None = None
        self._run_id: str | None = None
        self.queued = False
        self._curve: list[list[Any]] = []
        self._links: dict[str, list[str]] = {}
        self._model_weights: str | None = None
        self._curve_sent = time.monotonic()

    @property
    def queue_file(self) -> Path:
        return queue_dir() / f"{self._queue_name}.jsonl"

    def open(self, tags: Mapping[str, str], params: Mapping[str, str]) -> None:
        self._header["tags"] = dict(tags)
        if self.spooled:  # no MLflow in this job: the workflow's sync process sends the file
            self.queued = True
            self._append(self._header)
        else:
            try:
                self._store = _Store(_mlflow())
                self._run_id = self._store.open_run(self._header["experiment"], self._header["run_name"], self.key, tags,
                                                    start_time=self._header["start_time"])
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

    def link_metrics(self, datasets: Mapping[str, tuple[str, str]], model_weights: str | os.PathLike | None = None) -> None:
        """Link the metrics logged from now on: each key of ``datasets`` to that dataset (name and
        digest, as logged by :meth:`log_inputs`) and, with ``model_weights``, to the logged model
        of that weights file (:meth:`log_model_reference` of the job that wrote it), so MLflow
        shows them per dataset and on the model's page."""
        self._links = {key: [name, digest] for key, (name, digest) in datasets.items()}
        self._model_weights = os.path.abspath(model_weights) if model_weights else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numeric entries of ``metrics`` (linked as :meth:`link_metrics` says)."""
        numeric = {k: float(v) for k, v in _flatten(metrics).items() if _is_number(v)}
        if numeric:
            op: dict[str, Any] = {"op": "metrics", "metrics": numeric, "step": step, "timestamp": int(time.time() * 1000)}
            links = {k: self._links[k] for k in numeric if k in self._links}
            if links:
                op.update(links=links, model_weights=self._model_weights)
            self._do(op)

    def log_curve(self, metrics: Mapping[str, Any], step: int) -> None:
        """Add one point at ``step`` to each curve of ``metrics`` (finite numbers only). Points wait
        in memory and go to the store in batches (1000 points, or every 30 s, and when the run
        ends), so a training loop may call this every step at no cost to its speed."""
        if not self.enabled:
            return
        timestamp = int(time.time() * 1000)
        self._curve.extend([k, float(v), int(step), timestamp] for k, v in _flatten(metrics).items() if _is_number(v))
        if len(self._curve) >= MAX_METRICS_PER_CALL or time.monotonic() - self._curve_sent >= CURVE_FLUSH_SECONDS:
            self.flush_curves()

    def flush_curves(self) -> None:
        """Send the buffered curve points now."""
        if self._curve:
            points, self._curve = self._curve, []
            self._do({"op": "curve", "points": points})
        self._curve_sent = time.monotonic()

    def log_inputs(self, datasets: list[Mapping[str, Any]], context: str = "eval") -> None:
        """Log datasets as the run's inputs from their metadata (:func:`dataset_record`): MLflow
        shows name, digest, source and profile; no data is copied."""
        if datasets:
            self._do({"op": "inputs", "datasets": [dict(d) for d in datasets], "context": context})

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Log ``data`` as a JSON artifact ``artifact_file`` (e.g. ``model/reference.json``)."""
        self._do({"op": "dict", "data": dict(data), "artifact_file": artifact_file})

    def log_model_reference(self, name: str, reference: Mapping[str, Any], params: Mapping[str, Any] | None = None,
                            model_type: str = "saeft") -> None:
        """Reference a model written elsewhere (its weights are not copied): ``reference`` (the
        weights' path, digest and how to load them) as ``model/reference.json`` of the run and
        as the artifact of an MLflow logged model ``name`` with ``params``, output of the run."""
        flat = {k: str(v)[:6000] for k, v in _flatten(params or {}).items()}
        self.log_dict(reference, "model/reference.json")
        self._do({"op": "model", "name": name, "reference": dict(reference), "params": flat, "model_type": model_type,
                  "tags": {WEIGHTS_TAG: str(reference.get("weights_absolute", ""))}})

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
        """End the run with ``status``, first sending the buffered curves and setting ``tags``."""
        self.flush_curves()
        self._do({"op": "end", "status": status, "tags": dict(tags or {}), "end_time": int(time.time() * 1000)})


@contextlib.contextmanager
def job_run(track: Mapping[str, Any] | None, params: Mapping[str, Any]) -> Iterator[JobRun]:
    """Open the MLflow run described by ``track`` (experiment, run_name, tags) with ``params``.

    ``track`` None, or ``SAEFT_TRACKING=off`` in the environment, disables tracking (MLflow is
    then never imported). The run ends FINISHED when the body succeeds and FAILED
    when it raises; the body's exception always propagates, tracking errors never do. The run's
    ``env.*`` tags record the job's environment (:func:`saeft.infra.environment.runtime_tags`): set when
    it opens, and again when it ends, with the thread count and device the stage ended up using.
    """
    if not tracking_enabled():
        track = None
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
    from saeft.infra.environment import runtime_tags

    try:
        return runtime_tags()
    except Exception as exc:  # tracking must never fail a job
        logger.warning("environment not recorded in MLflow: %s", exc)
        return {}


def comparison_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Plain ``model``, ``dataset``, ``method``, ``variant``, ``seed`` and ``alpha`` tags from a
    job's wildcard tags (``wc.<name>``), so the MLflow UI can group one method's runs across seeds
    and variants: an evaluated run ``<variant>/seed<N>[/alpha<a>]`` is split into its parts, and a
    grid variant's values become ``param.<key>`` tags (saeft.plan.variants). (An evaluation's run
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


def replay_queue(folder: str | os.PathLike | None = None, finished_only: bool = False,
                 store: _Store | None = None) -> dict[str, int]:
    """Replay every queued job into the store, oldest file first (a fine-tuning's logged model
    before the evaluations whose metrics link to it); a replayed file is removed, a failing one
    kept (and named in the warning) for the next attempt. ``finished_only``: only files that end
    with their run's end (jobs still running are left). Returns counts of runs and operations."""
    folder = Path(folder) if folder is not None else queue_dir()
    counts = {"runs": 0, "operations": 0, "failed": 0}
    files = _queued_files(folder)
    if not files:
        logger.debug("no queued tracking in %s", folder)
        return counts
    for path in files:
        try:
            ops = _read_queue(path)
        except FileNotFoundError:  # replayed meanwhile by another sync
            continue
        if finished_only and (not ops or ops[-1]["op"] != "end"):
            continue
        claimed = path.with_name(f"{path.name}.{os.getpid()}.sending")
        try:  # claim it: two syncs (the run's and `snakemake sync_mlflow`) never send one file twice
            os.rename(path, claimed)
        except FileNotFoundError:
            continue
        try:
            store = store or _Store(_mlflow())
            run_id = None
            for op in ops:
                if op["op"] == "open":
                    run_id = store.open_run(op["experiment"], op["run_name"], op["key"], op["tags"], op.get("start_time"))
                elif run_id is None:
                    raise ValueError("no 'open' record before the first operation")
                else:
                    store.apply(run_id, op)
        except Exception as exc:
            counts["failed"] += 1
            logger.warning("replaying %s failed, kept for the next sync: %s", path, exc)
            os.rename(claimed, path)
            continue
        counts["runs"] += 1
        counts["operations"] += len(ops)
        shutil.rmtree(path.with_suffix(""), ignore_errors=True)
        claimed.unlink()
        logger.info("replayed %s (%d operations)", path.name, len(ops))
    return counts


def _queued_files(folder: Path) -> list[Path]:
    """The queue files of ``folder``, in the order they were last written; a file claimed by a
    sync that died meanwhile is released first."""
    for claimed in folder.glob("*.jsonl.*.sending") if folder.is_dir() else []:
        owner = claimed.name.rsplit(".", 2)[-2]
        if owner.isdigit() and not process_alive(int(owner)):
            with contextlib.suppress(FileNotFoundError):
                os.rename(claimed, claimed.with_name(claimed.name.rsplit(".", 2)[0]))
    stamped = []
    for path in folder.glob("*.jsonl") if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # replayed meanwhile by another sync
            stamped.append((path.stat().st_mtime_ns, path.name, path))
    return [path for *_, path in sorted(stamped)]


def follow_queue(folder: str | os.PathLike | None = None, parent: int | None = None, interval: float = 5.0) -> dict[str, int]:
    """The workflow's sync process: prepare the store, then send every finished job's queue file
    every ``interval`` seconds (the UI shows a job within seconds of its end) until SIGTERM, when
    it sends what is left, or until process ``parent`` (the workflow) is gone, when it sends the
    finished files only (jobs it started may still be writing). Returns the summed counts."""
    import signal

    stop = {"asked": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(asked=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the workflow, which stops this
    totals = {"runs": 0, "operations": 0, "failed": 0}
    store = None

    def sync(finished_only: bool) -> None:
        nonlocal store
        try:
            store = store or _Store(_mlflow())
        except Exception as exc:  # the store may come back: the files wait
            logger.warning("MLflow store %s not reachable: %s", tracking_uri(), exc)
            return
        counts = replay_queue(folder, finished_only=finished_only, store=store)
        for name, value in counts.items():
            totals[name] += value

    while not stop["asked"] and (parent is None or process_alive(parent)):
        sync(finished_only=True)
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and not stop["asked"]:
            time.sleep(0.2)
    sync(finished_only=not stop["asked"])
    logger.info("sent %d runs (%d operations); %d kept", totals["runs"], totals["operations"], totals["failed"])
    return totals


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
