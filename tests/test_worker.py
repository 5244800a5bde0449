"""The warm worker (saeft.infra.worker): a ``saeft`` command sent to it runs in a forked child exactly as
in a fresh process (output, exit status, death by signal), signals reach the child, a killed
client takes its child with it, and a job the worker cannot stand in for runs fresh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saeft.infra import worker

pytestmark = pytest.mark.skipif(not worker.available(), reason="the worker needs Linux (fork, SOCK_SEQPACKET)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A running worker: (environment whose saeft commands it serves, its log, its process)."""
    folder = tmp_path_factory.mktemp("worker")
    path = folder / "socket"
    log = folder / "worker.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAEFT_TRACKING": "off"}
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "saeft.cli", "worker", "--socket", str(path)], env=env,
                                   stdout=handle, stderr=handle, start_new_session=True)
    deadline = time.monotonic() + 120
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), log.read_text()
    yield {**env, worker.ENV: str(path)}, log, process
    process.terminate()
    process.wait(60)
    assert not path.exists()  # removed on the way out


def _saeft(env, *args, **kwargs):
    return subprocess.run([sys.executable, "-c", "import sys; from saeft.cli import main; sys.exit(main())", *args],
                          env=env, capture_output=True, text=True, timeout=120, **kwargs)


def _children(pid):
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_a_command_runs_in_the_worker_as_in_a_fresh_process(served, tmp_path):
    env, log, _ = served
    fresh = _saeft({k: v for k, v in env.items() if k != worker.ENV}, "schema", cwd=tmp_path)
    warm = _saeft(env, "schema", cwd=tmp_path)
    assert warm.returncode == fresh.returncode == 0
    assert warm.stdout == fresh.stdout and '"$schema"' in warm.stdout  # its stdout is the client's
    assert "schema (pid" in log.read_text()  # the worker ran it
    # The job's directory, environment and exit status are the client's.
    code = ["check-data", "--dataset", "no_such_dataset", "--split", "test", "--out", "out.json"]
    failed = _saeft({**env, "SAEFT_PROBE": "1"}, *code, cwd=tmp_path)
    assert failed.returncode == _saeft({k: v for k, v in env.items() if k != worker.ENV}, *code, cwd=tmp_path).returncode != 0
    assert "no_such_dataset" in failed.stderr
    usage = _saeft(env, "finetune", "--no-such-flag", cwd=tmp_path)
    assert usage.returncode == 2 and "the following arguments are required: --model" in usage.stderr


def test_signals_reach_the_child_and_a_killed_child_kills_the_client(served, tmp_path):
    env, _, process = served
    queue = tmp_path / "queue"
    command = [sys.executable, "-c", "import sys; from saeft.cli import main; sys.exit(main())", "sync-tracking",
               "--follow", "--interval", "0.2", "--queue", str(queue)]
    for how in ("forwarded", "killed"):
        client = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while not _children(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        [child] = _children(process.pid)
        time.sleep(0.5)  # the child has installed its SIGTERM handler
        if how == "forwarded":
            client.send_signal(signal.SIGTERM)  # Snakemake stopping the job: the child ends cleanly
            assert client.wait(60) == 0, client.stdout.read()
        else:
            os.kill(child, signal.SIGKILL)  # an OOM kill: the job dies of the same signal
            assert client.wait(60) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while child in _children(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child not in _children(process.pid)


def test_a_client_killed_outright_takes_its_child_with_it(served, tmp_path):
    env, log, process = served
    client = subprocess.Popen([sys.executable, "-c", "import sys; from saeft.cli import main; sys.exit(main())",
                               "sync-tracking", "--follow", "--queue", str(tmp_path / "queue")], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not _children(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    [child] = _children(process.pid)
    client.kill()
    client.wait(60)
    deadline = time.monotonic() + 10
    while child in _children(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child not in _children(process.pid)
    assert "lost its client" in log.read_text()


def test_a_job_the_worker_cannot_stand_in_for_runs_fresh(served, tmp_path):
    env, log, _ = served
    other = _saeft({**env, "HF_HUB_OFFLINE": "0"}, "schema", cwd=tmp_path)  # read by huggingface_hub at import
    assert other.returncode == 0 and '"$schema"' in other.stdout
    assert "refused schema: environment variables read at import differ: HF_HUB_OFFLINE" in log.read_text()
    # The numerical code path is chosen when torch first runs a kernel: the worker's is fixed.
    portable = _saeft({**env, "ATEN_CPU_CAPABILITY": "default"}, "schema", cwd=tmp_path)
    assert portable.returncode == 0 and "import differ: ATEN_CPU_CAPABILITY" in log.read_text()
    gone = _saeft({**env, worker.ENV: str(tmp_path / "no-socket")}, "schema", cwd=tmp_path)
    assert gone.returncode == 0 and '"$schema"' in gone.stdout


def test_an_edited_source_file_makes_the_worker_refuse(tmp_path, monkeypatch):
    server = worker._Server(tmp_path / "socket", None, lambda argv: 0, {}, {})
    request = {**worker._identity(), "env": {}}
    assert server._refusal(request) is None
    server.sources = {**server.sources, next(iter(server.sources)): 0}  # as if edited since
    assert server._refusal(request) == "saeft's source changed since the worker started"
    assert server._refusal({**request, "executable": "/other/python"}) == "another interpreter or checkout"


def test_the_workflow_starts_the_worker_ready_and_stops_it(tmp_path, monkeypatch):
    from saeft.infra import background

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAEFT_TRACKING", "off")  # the worker alone
    monkeypatch.delenv(worker.ENV, raising=False)
    background.start("study", str(tmp_path / "queue"), tmp_path / "logs", local=False)  # a cluster run: none
    assert worker.ENV not in os.environ and not (tmp_path / "logs").exists()
    monkeypatch.setattr(background, "gpu_present", lambda: False)
    background.start("study", str(tmp_path / "queue"), tmp_path / "logs", local=True)
    try:
        socket_path = Path(os.environ[worker.ENV])
        assert socket_path.exists()  # ready before the first job
        warm = _saeft({**os.environ}, "schema", cwd=tmp_path)
        assert warm.returncode == 0 and "schema (pid" in (tmp_path / "logs" / "worker.log").read_text()
    finally:
        background.stop()
    assert worker.ENV not in os.environ and not socket_path.parent.exists()
    assert "stopped" in (tmp_path / "logs" / "worker.log").read_text()
    monkeypatch.setattr(background, "gpu_present", lambda: True)  # untested with CUDA: off unless asked
    background.start("study", str(tmp_path / "queue"), tmp_path / "logs", local=True)
    assert worker.ENV not in os.environ


def test_a_malformed_request_or_a_silent_client_leaves_the_worker_serving(served, tmp_path):
    import socket

    env, log, _ = served
    for payload, answer in ((b"not JSON", b""), (b'{"argv": ["schema"]}', b'{"refused": "another interpreter or checkout"}')):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(env[worker.ENV])
            socket.send_fds(sock, [payload], [0, 1, 2])
            assert sock.recv(1024) == answer  # hung up on, or refused
    assert "bad request" in log.read_text()
    warm = _saeft(env, "schema", cwd=tmp_path)
    assert warm.returncode == 0 and '"$schema"' in warm.stdout
