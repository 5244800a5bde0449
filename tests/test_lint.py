"""Catalog conventions: `snakemake --lint` warns of nothing (it exits 0), `snakefmt --check` finds
nothing to change, and every rule runs in the one conda environment (workflow/envs/saeft.yaml) that installs the lock
and saeft itself, checked with a fake `conda` (none on CI machines) and, slowly, with pip."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / "workflow" / "envs" / "saeft.yaml"
LOCK = ROOT / "requirements.lock"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile")]

# Lint warnings that stay, each explained here and in docs/ARCHITECTURE.md: none. (Each rule file's flag
# and input functions live in workflow/rules/helpers/<file>.smk: Snakemake flags any `def` in a
# file that also holds a rule.)
ALLOWED: set[tuple[str, str]] = set()

# A stand-in for conda: answers the three questions Snakemake asks before it plans with
# --sdm conda, and for `conda env create` records the environment file, the SAEFT_ROOT that
# conda's pip would expand, and makes the prefix. Anything else fails.
FAKE_CONDA = """#!/bin/sh
echo "$*" >> "$FAKE_CONDA_LOG"
case "$1" in
  --version) echo "conda 24.11.3" ;;
  info) echo '{"conda_prefix": "/nonexistent", "platform": "linux-64", "conda_version": "24.11.3"}' ;;
  config) echo '{"get": {"channel_priority": "strict"}}' ;;
  clean) ;;
  env)
    file=$(echo "$*" | sed -n 's/.*--file "\\{0,1\\}\\([^" ]*\\)"\\{0,1\\} .*/\\1/p')
    prefix=$(echo "$*" | sed -n 's/.*--prefix "\\{0,1\\}\\([^" ]*\\)"\\{0,1\\}.*/\\1/p')
    cp "$file" "$FAKE_CONDA_LOG.$(basename "$prefix").yaml"
    echo "$SAEFT_ROOT" > "$FAKE_CONDA_LOG.$(basename "$prefix").root"
    mkdir -p "$prefix/bin" ;;
  *) echo "fake conda: unexpected call: $*" >&2; exit 3 ;;
esac
"""


def snakemake(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environ.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*SNAKEMAKE, "-d", str(tmp_path / "work"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=environ, timeout=300)


def lints(output: str) -> set[tuple[str, str]]:
    """(item, title) of every warning in `snakemake --lint`'s text output. (Snakemake 9's CLI
    prints text whatever --lint's argument: its json form never reaches the linter.)"""
    found, item = set(), None
    for line in output.splitlines():
        header = re.match(r"Lints for (.*?):$", line)
        if header:
            item = re.sub(r" \(line \d+, .*\)$", "", header[1])
            continue
        title = re.match(r"    \* (.*?):$", line)
        if title:
            assert item, f"a lint before any 'Lints for' header: {line!r}"
            found.add((item, title[1]))
    return found


@pytest.mark.parametrize("overrides", [[], ["--config", "sae={sweep: [{name: corpus, data: pretrain}, {name: k4, k: 4}]}"]],
                         ids=["default", "sae-sweep"])  # the default's grid names the corpus SAE
def test_lint_warns_of_nothing_but_the_explained_warning(tmp_path, overrides):
    result = snakemake(tmp_path, "--lint", *overrides)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    found = lints(output)
    assert "Lints for" not in output or found, output[-3000:]
    assert found - ALLOWED == set(), f"new lint warnings (fix them, or explain them in docs/ARCHITECTURE.md and here):\n{output[-4000:]}"
    # The allow-list is no wider than what Snakemake reports: a fixed warning leaves it.
    assert found == ALLOWED, f"allowed but not reported any more (drop them from ALLOWED): {ALLOWED - found}"


def test_workflow_is_formatted_with_snakefmt():
    """The catalog's layout (pyproject.toml's [tool.snakefmt]); `snakefmt workflow/` fixes it."""
    snakefmt = Path(sys.executable).with_name("snakefmt")
    result = subprocess.run([str(snakefmt), "--check", "workflow/"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"run `snakefmt workflow/`:\n{(result.stdout + result.stderr)[-3000:]}"


@pytest.fixture
def fake_conda(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "conda").write_text(FAKE_CONDA)
    (folder / "conda").chmod((folder / "conda").stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "conda.log"
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "FAKE_CONDA_LOG": str(log)}, log


def test_sdm_conda_creates_the_one_environment_from_the_env_file(tmp_path, fake_conda):
    env, log = fake_conda
    listed = snakemake(tmp_path, "--sdm", "conda", "--list-conda-envs", env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    rows = [line.split("\t") for line in listed.stdout.splitlines() if line.endswith(tuple("0123456789abcdef_")) and "\t" in line]
    assert len(rows) == 1, listed.stdout
    # The env file written for this checkout: workflow/envs/saeft.yaml with its path filled in.
    written = tmp_path / "work" / rows[0][0]
    assert written.parent == tmp_path / "work" / ".snakemake" / "saeft-envs", written
    expected = ENV_FILE.read_text().replace("${SAEFT_ROOT}", str(ROOT))
    assert written.read_text().endswith(expected) and written.read_text().startswith(f"# workflow/envs/saeft.yaml for the checkout {ROOT}\n")

    created = snakemake(tmp_path, "--sdm", "conda", "--conda-create-envs-only", "--cores", "1", env=env)
    assert created.returncode == 0, created.stderr[-3000:]
    creations = [line for line in log.read_text().splitlines() if line.startswith("env create")]
    assert len(creations) == 1, log.read_text()
    handed = list(tmp_path.glob("conda.log.*.yaml"))
    assert len(handed) == 1 and handed[0].read_text() == written.read_text()

    planned = snakemake(tmp_path, "--sdm", "conda", "-n", "--cores", "1", env=env)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert re.search(r"^finetune\s+\d+$", planned.stdout, re.M), planned.stdout[-2000:]


def test_two_checkouts_sharing_a_conda_prefix_get_an_environment_each(tmp_path, fake_conda):
    """Snakemake names an environment after its file's text: with one shared env file, a second
    checkout would run the first one's editable saeft. Each checkout writes its own."""
    env, _ = fake_conda
    other = tmp_path / "other-checkout"
    for name in ("workflow", "config"):
        shutil.copytree(ROOT / name, other / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(LOCK, other / LOCK.name)
    prefix = tmp_path / "shared-prefix"
    environments = {}
    for root in (ROOT, other):
        result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "workflow" / "Snakefile"), "-d",
                                 str(tmp_path / f"work-{root.name}"), "--sdm", "conda", "--conda-prefix", str(prefix),
                                 "--list-conda-envs"], capture_output=True, text=True, cwd=root, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [line.split("\t") for line in result.stdout.splitlines() if "shared-prefix" in line]
        assert len(rows) == 1, result.stdout
        environments[root] = rows[0][-1]
        assert str(root) in (tmp_path / f"work-{root.name}" / rows[0][0]).read_text()
    assert environments[ROOT] != environments[other], environments


def pip_section() -> list[str]:
    spec = yaml.safe_load(ENV_FILE.read_text())
    pips = [dep["pip"] for dep in spec["dependencies"] if isinstance(dep, dict)]
    assert len(pips) == 1, spec
    return pips[0]


def test_env_file_installs_the_lock_and_saeft_on_the_locks_python():
    spec = yaml.safe_load(ENV_FILE.read_text())
    assert spec["channels"] == ["conda-forge", "nodefaults"]
    conda_deps = [dep for dep in spec["dependencies"] if isinstance(dep, str)]
    python = next(dep for dep in conda_deps if dep.startswith("python="))
    locked_python = re.search(r"for Python (\d+\.\d+)\.\d+", LOCK.read_text())
    assert locked_python and python == f"python={locked_python[1]}", (python, "requirements.lock's header")
    assert "pip" in conda_deps
    assert pip_section() == ["-r ${SAEFT_ROOT}/requirements.lock", "-e ${SAEFT_ROOT}"]
    # Snakemake names the environment after the file's text: the lock's hash in it makes a
    # changed lock a new environment.
    recorded = re.search(r"^# requirements\.lock sha256: ([0-9a-f]{64})$", ENV_FILE.read_text(), re.M)
    assert recorded, "workflow/envs/saeft.yaml lacks its '# requirements.lock sha256: ...' line"
    assert recorded[1] == hashlib.sha256(LOCK.read_bytes()).hexdigest(), (
        "requirements.lock changed: put `sha256sum requirements.lock` into workflow/envs/saeft.yaml")


@pytest.mark.slow
def test_pip_resolves_the_env_files_requirements_to_the_lock_and_saeft(tmp_path):
    """What conda's pip step does with the env file, in this venv (installed from the lock):
    ${SAEFT_ROOT} expanded, the lock and saeft resolved together with nothing to fetch, and
    nothing to install but saeft itself."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(pip_section()) + "\n")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet",
         "--report", str(report), "-r", str(requirements)],
        capture_output=True, text=True, env={**os.environ, "SAEFT_ROOT": str(ROOT)}, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    assert [(item["metadata"]["name"], item["metadata"]["version"]) for item in installs] == [("saeft", "0.1.0")]
