"""The cluster profiles: they load and give the GPU rules their resources (dry runs, always), and a
real single-node SLURM cluster runs a study through them (tests/slurm/run_study.sh: needs root and
the Debian SLURM packages, which .ci/run installs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "tests" / "slurm" / "study.yaml"
GPU_RULES = ("pretrain_clip", "cache_activations", "train_sae", "finetune", "evaluate_model", "analyze_features")


def _dry_run(tmp_path: Path, *args: str, env: dict[str, str]) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", **env}
    # From the repository root, as users type it: '--profile slurm' is the top-level link.
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "all", *args, "--directory", str(tmp_path),
                             "--configfile", str(STUDY)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _resources(text: str) -> dict[str, str]:
    """Rule -> its jobs' 'resources:' line in a dry run."""
    found = {}
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:)", text):  # members of a group job are indented
        rule = re.match(r"(?:local)?rule (\w+):", block.strip())
        line = re.search(r"^\s*resources: (.*)$", block, re.M)
        if rule and line:
            found[rule.group(1)] = line.group(1)
    return found


def test_slurm_profile_loads_from_the_repository_root_with_account_and_gpus(tmp_path):
    text = _dry_run(tmp_path, "--profile", "slurm", env={"SAEFT_SLURM_ACCOUNT": "lab", "SAEFT_SLURM_PARTITION": "gpu"})
    resources = _resources(text)
    for rule in GPU_RULES:
        assert "gpu=1" in resources[rule] and "cpus_per_gpu=8" in resources[rule], (rule, resources[rule])
        assert "slurm_account=lab" in resources[rule] and "slurm_partition=gpu" in resources[rule]
    assert "gpu=" not in resources["prepare_model"] and "runtime=240" in resources["prepare_model"]
    assert "mem_mb=32000" in resources["finetune"] and "runtime=720" in resources["finetune"]


def test_slurm_profile_without_gpus_and_account(tmp_path):
    env = {"SAEFT_SLURM_GPUS": "0", "SAEFT_SLURM_ACCOUNT": "", "SAEFT_SLURM_PARTITION": ""}
    resources = _resources(_dry_run(tmp_path, "--profile", "slurm", env=env))
    assert "gpu=0" in resources["finetune"] and "slurm_account" not in resources["finetune"]


# A dry run through the SLURM profile that also prints each group job's size and resources
# (Snakemake's dry run lists a group's members but not what the group asks SLURM for).
GROUP_PRINTER = """
import sys, snakemake.jobs as jobs
shown = jobs.GroupJob.log_info
def log_info(self, *args, **kwargs):
    res = dict(self.resources)
    print("SLURM-GROUP", len(self.jobs), sorted({job.rule.name for job in self.jobs}), res.get("gpu", 0), res["runtime"])
    return shown(self, *args, **kwargs)
jobs.GroupJob.log_info = log_info
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


def test_slurm_profile_submits_the_paper_dag_as_a_tenth_of_its_jobs_one_gpu_per_group(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", GROUP_PRINTER, "-n", "--profile", "slurm", "--directory", str(tmp_path),
                             "--configfile", "config/paper_vitb16.yaml", "--config", "data_root=/data"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    groups = [line.split(" ", 2)[1:] for line in text.splitlines() if line.startswith("SLURM-GROUP ")]
    # Top-level jobs (group members are indented), but 'all': a rule without an action, never submitted.
    alone = [rule for rule in re.findall(r"^rule (\w+):", text, re.M) if rule != "all"]
    grouped = {"check_dataset", "build_zeroshot_head", "train_sae", "evaluate_model", "analyze_features",
               "plot_feature_cards", "aggregate_features", "aggregate_tables"}
    assert not grouped & set(alone)
    assert sorted(alone) == ["cache_activations"] * 15 + ["finetune"] * 99 + ["prepare_model"]
    # 569 Snakemake jobs (1769 before evaluation bundles): one group each of the checks, heads,
    # SAEs and summaries, 300 evaluations and 117 analyses by 8 ('all' runs locally).
    assert len(groups) == 4 + 38 + 15
    assert len(alone) + len(groups) <= 1769 // 10, (len(alone), len(groups))
    for size, rest in groups:
        rules, gpu, runtime = re.match(r"(\[.*\]) (\d+) (\d+)$", rest).groups()
        assert int(size) <= 100 and int(gpu) <= 1, (size, rules, gpu)  # members take turns on one GPU
        assert int(runtime) <= 10 * 60, (size, rules, runtime)  # within a day's wall-clock limit


def test_slurm_profile_installed_in_the_user_config_dir(tmp_path):
    home = tmp_path / "home"
    shutil.copytree(ROOT / "workflow" / "profiles" / "slurm", home / ".config" / "snakemake" / "slurm")
    work = tmp_path / "work"
    work.mkdir()
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "SAEFT_SLURM_ACCOUNT": "lab"}
    # From a folder without a 'slurm' entry, the name resolves to ~/.config/snakemake/slurm.
    env_full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", **env}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "all", "--profile", "slurm",
                             "-s", str(ROOT / "workflow" / "Snakefile"), "--configfile", str(STUDY)], cwd=work,
                            capture_output=True, text=True, env=env_full, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "slurm_account=lab" in _resources(result.stdout + result.stderr)["finetune"]


def test_local_profile_gives_each_gpu_rule_one_gpu_of_the_limit(tmp_path):
    resources = _resources(_dry_run(tmp_path, "--profile", "workflow/profiles/local", env={"SAEFT_GPUS": "2"}))
    for rule in GPU_RULES:
        assert "gpu=1" in resources[rule], (rule, resources[rule])
    cpu_only = _resources(_dry_run(tmp_path, "--profile", "workflow/profiles/local", env={"SAEFT_GPUS": "0"}))
    assert "gpu=0" in cpu_only["finetune"]


SLURM_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd")
missing = [b for b in SLURM_BINARIES if not (shutil.which(b) or Path(f"/usr/sbin/{b}").exists())]


@pytest.mark.slow
@pytest.mark.skipif(bool(missing), reason=f"SLURM test cluster needs {', '.join(missing)} "
                    "(apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server)")
@pytest.mark.skipif(os.geteuid() != 0, reason="the SLURM test cluster must run as root (slurmd)")
@pytest.mark.skipif(Path("/etc/slurm/slurm.conf").exists(), reason="this machine has a SLURM config of its own")
def test_study_runs_on_a_real_slurm_cluster_and_a_cancelled_job_resumes(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # timeout -k: the executor plugin waits forever when it cannot read job states.
    result = subprocess.run(["timeout", "-k", "60", "1200", str(ROOT / "tests" / "slurm" / "run_study.sh"), str(tmp_path / "work")],
                            capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "check.py: OK" in output
    assert re.search(r"cancelled finetune job \d+", output)
