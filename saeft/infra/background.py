"""The background processes of a workflow run (``workflow/rules/tracking.smk`` starts them
before the first job and stops them after the last): the MLflow sync (``saeft sync-tracking
--follow``), which prepares the store and sends each job's spooled tracking within seconds of its
end, and the warm worker (:mod:`saeft.infra.worker`), which runs the jobs of a local run without their
start-up imports. Each logs to ``<logs>/<name>.log``."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from saeft.infra.mlflow_store import tracking_mode
from saeft.infra.worker import ENV as WORKER_ENV
from saeft.infra.worker import available

logger = logging.getLogger(__name__)

READY_SECONDS = 60
"""How long starting waits for the worker to listen (its imports take seconds): the first jobs
then run in it too. A worker not ready by then is left to start; jobs run fresh meanwhile."""
STOP_SECONDS = 600
"""How long stopping waits for the sync process to send what is queued before killing it."""

_running: dict[str, tuple[subprocess.Popen, str | None]] = {}


def start(study: str, queue: str, logs: str | os.PathLike, local: bool) -> None:
    """Start the MLflow sync when jobs spool their tracking (``SAEFT_TRACKING``), and the worker
    when jobs run on this machine (``local``: not under a cluster executor), unless
    ``SAEFT_WORKER=off``, the platform cannot fork one or a GPU is present (unless
    ``SAEFT_WORKER=on``); waits until it listens, then points ``SAEFT_WORKER`` at it."""
    if tracking_mode() == "spool":
        _start("tracking", ["sync-tracking", "--follow", "--queue", queue, "--parent", str(os.getpid()),
                            "--experiment", study, "--study", study, "--log-level", "INFO"], logs)
    asked = os.environ.pop(WORKER_ENV, "").lower()
    reason = ("SAEFT_WORKER=off" if asked == "off" else "jobs run on a cluster" if not local
              else "this platform cannot fork one" if not available()
              else "a GPU is present (forking CUDA jobs is untested: SAEFT_WORKER=on to try)" if gpu_present() and asked != "on"
              else None)
    if reason:
        logger.info("no warm worker: %s; every job starts a fresh Python", reason)
        return
    folder = tempfile.mkdtemp(prefix="saeft-worker-")  # short: a socket path has at most 107 bytes
    socket_path = os.path.join(folder, "socket")
    process = _start("worker", ["worker", "--socket", socket_path, "--parent", str(os.getpid())], logs, folder)
    deadline = time.monotonic() + READY_SECONDS
    while not os.path.exists(socket_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is not None:
        logger.warning("the warm worker exited (see %s): every job starts a fresh Python", Path(logs) / "worker.log")
        return
    os.environ[WORKER_ENV] = socket_path


def stop() -> None:
    """Stop the worker, and the sync process once it has sent every queued run it can."""
    os.environ.pop(WORKER_ENV, None)
    for name, (process, folder) in list(_running.items()):
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("saeft %s did not stop within %d s: killed", name, STOP_SECONDS)
            process.kill()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        del _running[name]


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU (its device files), without initialising CUDA."""
    return os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/nvidia[0-9]*"))


def _start(name: str, args: list[str], logs: str | os.PathLike, folder: str | None = None) -> subprocess.Popen:
    Path(logs).mkdir(parents=True, exist_ok=True)
    with open(Path(logs) / f"{name}.log", "ab") as log:
        # A session of its own: Ctrl-C reaches the workflow, which then stops these.
        process = subprocess.Popen([sys.executable, "-m", "saeft.cli", *args], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    _running[name] = (process, folder)
    return process
