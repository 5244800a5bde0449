"""The background processes of a workflow run (``workflow/rules/tracking.smk`` starts them
before the first job and stops them after the last): the MLflow sync (``saeft sync-tracking
--follow``), which prepares the store and sends each job's spooled tracking within seconds of its
end, and the warm worker (:mod:`saeft.worker`), which runs the jobs of a local run without their
start-up imports. Each logs to ``<logs>/<name>.log``."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from saeft.mlflow_store import tracking_mode
from saeft.worker import ENV as WORKER_ENV
from saeft.worker import available

logger = logging.getLogger(__name__)

STOP_SECONDS = 600
"""How long stopping waits for the sync process to send what is queued before killing it."""

_running: dict[str, tuple[subprocess.Popen, str | None]] = {}


def start(study: str, queue: str, logs: str | os.PathLike, local: bool) -> None:
    """Start the MLflow sync when jobs spool their tracking (``SAEFT_TRACKING``), and the worker
    when jobs run on this machine (``local``: not under a cluster executor), unless
    ``SAEFT_WORKER=off`` or the platform cannot fork one; jobs find it through ``SAEFT_WORKER``.
    Jobs that start before the worker listens start fresh."""
    if tracking_mode() == "spool":
        _start("tracking", ["sync-tracking", "--follow", "--queue", queue, "--parent", str(os.getpid()),
                            "--experiment", study, "--study", study, "--log-level", "INFO"], logs)
    if os.environ.get(WORKER_ENV, "").lower() == "off" or not local or not available():
        os.environ.pop(WORKER_ENV, None)
        return
    folder = tempfile.mkdtemp(prefix="saeft-worker-")  # short: a socket path has at most 107 bytes
    os.environ[WORKER_ENV] = os.path.join(folder, "socket")
    _start("worker", ["worker", "--socket", os.environ[WORKER_ENV], "--parent", str(os.getpid())], logs, folder)


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


def _start(name: str, args: list[str], logs: str | os.PathLike, folder: str | None = None) -> None:
    Path(logs).mkdir(parents=True, exist_ok=True)
    with open(Path(logs) / f"{name}.log", "ab") as log:
        # A session of its own: Ctrl-C reaches the workflow, which then stops these.
        process = subprocess.Popen([sys.executable, "-m", "saeft.cli", *args], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    _running[name] = (process, folder)
