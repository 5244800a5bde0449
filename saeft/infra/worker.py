"""A warm worker for the jobs of a local workflow run: one process imports torch, open_clip and
the stage modules once, then forks a child per ``saeft`` command, so a job pays milliseconds of
start-up instead of seconds of imports.

The workflow starts it (``saeft worker``) before the first job and points ``SAEFT_WORKER`` at
its socket. ``saeft <stage>`` then sends its argv, working directory, environment, umask and
standard streams (the file descriptors themselves) over that Unix socket; the worker forks, the
child adopts them and runs the command as a fresh process would, and the client exits with the
child's status, or dies of the same signal. Signals the client receives are passed to the child;
a client killed outright makes the worker kill its child.

A fresh process is used instead (the client runs the command itself) whenever the worker cannot
stand in for one exactly: no worker, another interpreter or checkout, saeft's source changed
since the worker imported it, or an environment variable read at import time (``HF_*``,
``TORCH*``, ``PYTHON*``, ...) differs. Linux only (fork, ``SOCK_SEQPACKET``); the worker never
initialises CUDA or an OpenMP pool before forking, so children can.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from saeft.infra.io import process_alive

logger = logging.getLogger(__name__)

ENV = "SAEFT_WORKER"
"""Environment variable: the worker's socket path; unset (or no worker there), jobs start fresh."""

IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TORCH", "PYTORCH", "PYTHON", "LD_", "KMP_", "CUBLAS", "CUDA_LAUNCH",
                        "NVIDIA_TF32", "TRANSFORMERS", "OPEN_CLIP", "ATEN_", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                        "ONEDNN_", "DNNL_")
"""Variables that libraries read when imported or at their first call: a job whose values differ
from the worker's starts fresh. They include the numerical code path (torch's
``ATEN_CPU_CAPABILITY``, MKL's and oneDNN's instruction sets: docs/reproducibility.md). Thread
counts (``OMP_NUM_THREADS``, ...) are applied in the child instead."""

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MAX_MESSAGE = 1 << 20


def available() -> bool:
    """Whether this platform can run a worker (fork and Unix sequenced-packet sockets)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SOCK_SEQPACKET") and hasattr(socket, "send_fds")


def _import_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def _source_files() -> dict[str, int]:
    """saeft's source files and their modification times: an edit makes the worker stale."""
    root = Path(__file__).resolve().parent
    return {str(path): path.stat().st_mtime_ns for path in root.rglob("*.py")}


def _identity() -> dict[str, Any]:
    """What a job and the worker must share: the interpreter (a virtual environment's ``python``
    and ``python3`` are one) and the saeft checkout."""
    return {"executable": os.path.realpath(sys.executable), "prefix": sys.prefix, "saeft": str(Path(__file__).resolve().parent)}


# --- client -------------------------------------------------------------------------------------


def run_command(argv: Sequence[str]) -> int | None:
    """Run ``saeft <argv>`` in the worker named by ``SAEFT_WORKER`` and return its exit status
    (or die of the child's signal); None when no worker can take it (the caller runs it)."""
    path = os.environ.get(ENV)
    if not path or not available():
        return None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
    except OSError:
        return None
    with sock:
        request = {**_identity(), "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask()}
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
            reply = _receive(sock)
        except (OSError, ValueError):
            return None
        if reply is None or "pid" not in reply:
            return None  # refused (stale code, other environment): run it here
        return _wait_for(sock, reply["pid"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _receive(sock: socket.socket) -> dict[str, Any] | None:
    data = sock.recv(MAX_MESSAGE)
    return json.loads(data) if data else None


def _wait_for(sock: socket.socket, pid: int) -> int:
    """Pass the signals a job gets (Snakemake stopping it, Ctrl-C) to the child; end as it ended."""
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    for signum in forwarded:
        signal.signal(signum, lambda received, _frame: _kill(pid, received))
    reply = None
    while reply is None:
        try:
            reply = _receive(sock) or {"status": 1, "error": "the worker went away"}
        except InterruptedError:
            continue
        except OSError as exc:
            reply = {"status": 1, "error": str(exc)}
    if "error" in reply:
        sys.stderr.write(f"saeft worker: {reply['error']}\n")
    status = int(reply["status"])
    if status < 0:  # the child died of a signal: so does this process, as a fresh job would have
        for signum in forwarded:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        time.sleep(1)  # not reached for a deadly signal
        return 128 - status
    return status


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


# --- worker -------------------------------------------------------------------------------------


def serve(path: str | os.PathLike, parent: int | None, run: Callable[[list[str]], int], preload: Sequence[str]) -> None:
    """Import ``preload``, listen at ``path`` and fork a child per request, which calls ``run``
    (``saeft.cli.run``) with the request's argv, until SIGTERM, or until process ``parent`` (the
    workflow) is gone; then remove the socket. Children still running when it stops finish on
    their own; their clients get no status."""
    started, before = time.monotonic(), dict(os.environ)
    for name in preload:
        importlib.import_module(name)
    logger.info("imported %d modules in %.1fs", len(preload), time.monotonic() - started)
    # What the imports set (torch's inductor cache folder, ...): a fresh process sets it too.
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    import torch

    if torch.cuda.is_initialized():  # a forked child could not use CUDA
        raise RuntimeError("CUDA was initialised while importing the stage modules: the worker cannot fork jobs")
    server = _Server(Path(path), parent, run, _import_environment(before), added)
    with server.listening():
        server.loop()
    server.finish()


class _Server:
    def __init__(self, path: Path, parent: int | None, run: Callable[[list[str]], int], environment: dict[str, str],
                 added: dict[str, str]) -> None:
        self.path = path
        self.parent = parent
        self.run = run
        self.sources = _source_files()
        self.environment = environment
        self.added = added
        self.identity = _identity()
        self.children: dict[int, socket.socket] = {}
        self.commands: dict[int, tuple[str, float]] = {}
        self.stopping = False

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        temporary = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        self.listener.bind(str(temporary))
        self.listener.listen(128)
        os.replace(temporary, self.path)  # clients never see a socket that does not accept yet
        self.wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the workflow, which stops this
        logger.info("listening at %s", self.path)
        try:
            yield
        finally:
            self.listener.close()  # no new jobs; the running ones still get their status
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def finish(self) -> None:
        """After the last accepted job: wait for the running children (their clients wait for
        their status) unless the workflow is gone."""
        while self.children and (self.parent is None or process_alive(self.parent)):
            self._reap()
            if self.children:
                time.sleep(0.05)
        signal.set_wakeup_fd(-1)
        logger.info("stopped")

    def loop(self) -> None:
        while not self.stopping and (self.parent is None or process_alive(self.parent)):
            watched = [self.listener, self.wakeup_read, *self.children.values()]
            try:
                readable, _, _ = select.select(watched, [], [], 1.0)
            except InterruptedError:
                readable = []
            for item in readable:
                if item is self.listener:
                    self._accept()
                elif item == self.wakeup_read:
                    os.read(self.wakeup_read, 512)
                else:  # a client went away before its child ended: it was killed
                    pid = next(p for p, s in self.children.items() if s is item)
                    logger.warning("job %d lost its client: killing it", pid)
                    _kill(pid, signal.SIGKILL)
            self._reap()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)  # a client that connects and sends nothing must not stall the others
        fds: list[int] = []
        try:
            message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
            request = json.loads(message)
            reason = self._refusal(request) if len(fds) == 3 else "no standard streams"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("bad request: %r", exc)
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        conn.settimeout(None)
        if reason:
            logger.info("refused %s: %s", " ".join(request.get("argv", [])[:1]), reason)
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"refused": reason}).encode())
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_job(conn, fds, request)  # never returns
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.commands[pid] = (" ".join(request["argv"][:1]), time.monotonic())
        with contextlib.suppress(OSError):  # a client gone already: the loop sees its socket close
            conn.send(json.dumps({"pid": pid}).encode())

    def _refusal(self, request: dict[str, Any]) -> str | None:
        if {k: request.get(k) for k in self.identity} != self.identity:
            return "another interpreter or checkout"
        theirs = _import_environment(request["env"])
        if theirs != self.environment:
            differing = sorted(k for k in {*theirs, *self.environment} if theirs.get(k) != self.environment.get(k))
            return f"environment variables read at import differ: {', '.join(differing)}"
        if _source_files() != self.sources:
            return "saeft's source changed since the worker started"
        return None

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 1 << 8
            if done:
                conn = self.children.pop(pid)
                command, started = self.commands.pop(pid)
                logger.info("%s (pid %d) ended with status %d after %.1fs", command, pid,
                            os.waitstatus_to_exitcode(status), time.monotonic() - started)
                with contextlib.suppress(OSError):
                    conn.send(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())
                conn.close()

    def _become_job(self, conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
        """In the forked child: take the client's streams, directory, environment and umask, and run
        the command as ``saeft`` would in a fresh process; exit with its status."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sock in (self.listener, conn, *self.children.values()):
                sock.close()
            os.close(self.wakeup_read)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update({**self.added, **request["env"]})
            os.umask(request["umask"])
            sys.argv = ["saeft", *request["argv"]]
            _fresh_process_state()
            status = self.run(request["argv"])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                sys.stderr.write(f"{exc.code}\n")
        except BaseException:  # noqa: BLE001 (reported as a fresh process would, then exit)
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)


def _fresh_process_state() -> None:
    """What a fresh process would start with: no logging handlers, new random seeds, the job's
    thread counts (libraries read OMP_NUM_THREADS and friends when loaded, before the fork)."""
    import random

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for flt in list(root.filters):
        root.removeFilter(flt)
    root.setLevel(logging.WARNING)
    random.seed()
    threads = next((int(os.environ[k]) for k in THREAD_VARIABLES if os.environ.get(k, "").isdigit()), 0)
    if threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(threads)
