"""Reproducible installs and version records: the lock pins every dependency, CI installs it, and
every output JSON and MLflow run records the job's software and device."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from saeft.infra import environment, tracking

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
KEYS = ("python", "saeft", "torch", "torch_cuda", "open_clip", "numpy", "torch_threads", "device", "gpu")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """The lock as {canonical name: version}; every non-comment line must be ``name==version``."""
    pins: dict[str, str] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
        assert match, f"requirements.lock:{number}: not an exact pin: {line!r}"
        name = _canonical(match.group(1))
        assert name not in pins, f"requirements.lock:{number}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def _project_requirements() -> list[str]:
    """pyproject's dependencies and its test extras, with the self-references (saeft[fashion])
    expanded: what the test command installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    out, todo, seen = list(project["dependencies"]), ["test"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in extras[extra]:
            self_ref = re.fullmatch(r"saeft\[([^\]]+)\]", requirement.replace(" ", ""))
            if self_ref:
                todo.extend(self_ref.group(1).split(","))
            else:
                out.append(requirement)
    return out


# --- the record itself -------------------------------------------------------------------------

def test_runtime_record_has_the_versions_threads_and_device():
    import numpy
    import torch

    record = environment.runtime_record()
    assert tuple(record) == KEYS
    assert record["torch"] == str(torch.__version__) and record["numpy"] == numpy.__version__
    assert isinstance(record["open_clip"], str) and re.match(r"\d+\.\d+", record["open_clip"])
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["torch_threads"] == torch.get_num_threads() and isinstance(record["torch_threads"], int)
    assert record["torch_cuda"] == torch.version.cuda
    json.dumps(record)  # JSON as it is
    cpu = environment.runtime_record(torch.device("cpu"))
    assert cpu["device"] == "cpu" and cpu["gpu"] is None
    tags = environment.runtime_tags("cpu")
    assert tags["env.device"] == "cpu" and tags["env.torch"] == record["torch"] and "env.gpu" not in tags
    assert all(isinstance(value, str) for value in tags.values())


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_a_cuda_device_is_named_with_its_gpu():
    import torch

    record = environment.runtime_record(torch.device("cuda", 0))
    assert record["device"] == "cuda:0" and record["gpu"] == torch.cuda.get_device_name(0)


def test_the_environment_module_does_not_import_torch():
    """Snakefile planning imports parts of saeft: the record must not make it pay for torch."""
    code = "import sys, saeft.infra.environment; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_write_json_adds_the_record_to_objects_only(tmp_path):
    from saeft.infra.io import write_json

    write_json(tmp_path / "a.json", {"value": 1})
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["value"] == 1 and tuple(data["environment"]) == KEYS
    write_json(tmp_path / "b.json", [1, 2])
    assert json.loads((tmp_path / "b.json").read_text()) == [1, 2]
    write_json(tmp_path / "c.json", {"value": 1}, environment=False)
    assert json.loads((tmp_path / "c.json").read_text()) == {"value": 1}
    # Two writes on one machine are byte-identical: no timestamp in the record.
    write_json(tmp_path / "d.json", {"value": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "d.json").read_bytes()


# --- a real stage: its JSON and its MLflow run ---------------------------------------------------

def test_evaluate_records_the_environment_in_its_json_and_mlflow_run(tiny_world, clip_file, head_file, tmp_path, monkeypatch):
    import mlflow
    import torch

    from saeft import cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SAEFT_THREADS", "1")  # restored after the test (cli sets it from --threads)
    assert tracking.init_store("study")
    out = tmp_path / "eval" / "evals.json"
    track = {"experiment": "study", "run_name": "evaluate_model/zeroshot", "tags": {"rule": "evaluate_model"}}
    threads = torch.get_num_threads()
    try:
        code = cli.main(["evaluate", "--model", str(clip_file), "--head", str(head_file), "--dataset", "shapes",
                         "--dataset-options", json.dumps(tiny_world.to_dict()), "--split", "test", "sketch", "--out", str(out),
                         "--identity", json.dumps({"study": "s", "model": "m", "method": "zeroshot", "seed": None}),
                         "--threads", "1", "--track", json.dumps(track)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    assert tuple(env) == KEYS and env["torch_threads"] == 1 and env["device"] == "cpu"
    assert env["torch"] == str(torch.__version__) and env["open_clip"] == environment.package_version("open_clip_torch")

    client = mlflow.tracking.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    for key in ("python", "saeft", "torch", "open_clip", "numpy", "device"):
        assert tags[f"env.{key}"] == str(env[key]), key
    assert tags["env.torch_threads"] == "1"  # the stage's thread count, set when the run ended
    assert not any(name.startswith("env.") for name in run.data.params)
    # One job, one run: a record per eval set in the JSON, metrics per eval set in the run.
    assert list(result["evals"]) == ["test", "sketch"]
    for name, record in result["evals"].items():
        assert run.data.metrics[f"top1/{name}"] == record["value"] and run.data.metrics[f"n/{name}"] == record["n"]


def test_a_queued_run_gets_its_environment_tags_on_replay(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.init_store("study")
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")  # nothing listens: queued
    with tracking.job_run({"experiment": "study", "run_name": "r", "tags": {"rule": "r"}}, {"x": 1}) as run:
        pass
    assert run.queued
    ops = [json.loads(line) for line in run.queue_file.read_text().splitlines()]
    assert ops[0]["op"] == "open" and ops[0]["tags"]["env.device"] == "cpu"
    assert ops[-1]["op"] == "end" and ops[-1]["tags"]["env.torch"] == environment.runtime_record()["torch"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.replay_queue()["runs"] == 1
    client = mlflow.tracking.MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert logged.data.tags["env.numpy"] == environment.runtime_record()["numpy"]


def test_the_cache_records_the_environment_in_its_attributes(tiny_world, clip_file, tmp_path):
    import h5py

    from saeft.stages import cache

    out = tmp_path / "val.h5"
    cache.run(clip_file, "shapes", "val", tiny_world, cache.CacheConfig(), out)
    with h5py.File(out, "r") as handle:
        attrs = dict(handle.attrs)
    assert attrs["env.torch"] == environment.runtime_record()["torch"] and attrs["env.device"] == "cpu"


# --- the lock and the commands that install it ---------------------------------------------------

def test_the_lock_pins_every_dependency_and_test_extra_of_pyproject():
    from packaging.requirements import Requirement

    pins = _pins()
    assert "saeft" not in pins and "pip" not in pins
    requirements = _project_requirements()
    names = {_canonical(Requirement(r).name) for r in requirements}
    assert {"torch", "open-clip-torch", "pytest", "imagecorruptions", "setuptools"} <= names
    for text in requirements:
        requirement = Requirement(text)
        name = _canonical(requirement.name)
        assert name in pins, f"requirements.lock does not pin {name} (pyproject: {text})"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {text}"


def test_the_lock_header_says_how_it_was_made():
    header = "\n".join(line for line in LOCK.read_text().splitlines() if line.startswith("#"))
    for needle in ("pip freeze --all --exclude-editable", "2026-12-02", "Python 3.11.7", "x86_64 Linux", "Regenerate"):
        assert needle in header, needle


def test_ci_runs_the_readme_test_command_which_installs_the_lock():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", readme)
    assert len(commands) >= 2, "the README's two commands"
    test_command = next(c for c in commands if c.endswith("&& pytest"))
    study_command = next(c for c in commands if c.endswith("snakemake --cores all"))
    for command in (test_command, study_command):
        assert "pip install -r requirements.lock && pip install --no-deps -e ." in command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, ".ci/run must run the README's test command verbatim"
    assert "-r ${SAEFT_ROOT}/requirements.lock" in (ROOT / "workflow" / "envs" / "saeft.yaml").read_text()
