"""The workflow deploys as the Snakemake workflow catalog deploys it: `snakedeploy deploy-workflow`
writes a Snakefile that imports this repository's workflow as a module, and the deployment plans
the default study offline.

snakedeploy 0.17's local provider (used here: the test has no network) declares the module's
Snakefile by its path inside the repository ("workflow/Snakefile"), which Snakemake resolves
against the deployment's own folder; the test points it at the repository, as the GitHub provider's
`github(...)` declaration does. What it checks is ours: the layout snakedeploy expects, and a
workflow that plans correctly when imported as a module (its paths taken from its own files, not
from the importing workflow's folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tracked_copy(dest: Path) -> Path:
    """The repository's tracked files as they are in the working tree (no .venv, no results)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_snakedeploy_deploys_the_workflow_and_the_deployment_plans_the_default_study(tmp_path):
    repo = tracked_copy(tmp_path / "saeft")
    deployment = tmp_path / "deployment"
    snakedeploy = Path(sys.executable).with_name("snakedeploy")
    result = subprocess.run([str(snakedeploy), "deploy-workflow", str(repo), str(deployment), "--branch", "main"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The config folder is copied for the user to edit; the Snakefile imports every rule.
    for study in ("config.yaml", "paper_vitb16.yaml", "fashion_mnist.yaml", "README.md"):
        assert (deployment / "config" / study).read_bytes() == (repo / "config" / study).read_bytes()
    snakefile = deployment / "workflow" / "Snakefile"
    text = snakefile.read_text()
    assert 'configfile: "config/config.yaml"' in text and "use rule * from saeft" in text
    assert '"workflow/Snakefile"' in text
    snakefile.write_text(text.replace('"workflow/Snakefile"', repr(str(repo / "workflow" / "Snakefile")).replace("'", '"')))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plan = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--quiet", "rules"], cwd=deployment,
                          capture_output=True, text=True, env=env, timeout=600)
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-3000:]
    for rule in ("pretrain_clip", "finetune", "evaluate_model", "select_variants", "aggregate_tables"):
        assert rule in plan.stdout, f"{rule} missing from the deployment's plan:\n{plan.stdout[-3000:]}"
    # The module's conda environment and commit are the repository's, not the deployment folder's.
    envs = list((deployment / ".snakemake" / "saeft-envs").glob("saeft-*.yaml"))
    assert len(envs) == 1 and f"for the checkout {repo}" in envs[0].read_text()
