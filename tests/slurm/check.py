"""Checks of the real-SLURM test (run_study.sh): every job ran in a SLURM allocation, the
cancelled fine-tuning resumed from its checkpoint, and the outputs equal those of a local run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

STUDY = "slurmtest"


def fail(message: str) -> None:
    print(f"check.py: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main(work: Path) -> None:
    slurm, local = work / "slurm", work / "local"
    # logs/<study>/workflow/ holds the run's MLflow sync, which runs beside Snakemake: no job.
    logs = sorted(p for p in (slurm / "logs" / STUDY).rglob("*.log") if p.parent.name != "workflow")
    if (slurm / "logs" / STUDY / "workflow" / "worker.log").exists():
        fail("a warm worker started under the SLURM executor: its jobs run elsewhere")
    if len(logs) < 10:
        fail(f"only {len(logs)} job logs under {slurm / 'logs' / STUDY}")
    accounted = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-S", "now-1hour"],
                               capture_output=True, text=True, check=True).stdout
    states = dict(line.split("|", 1) for line in accounted.splitlines() if "|" in line)
    job_of_log = {}
    for log in logs:
        found = re.findall(r"SLURM job (\d+) on ", log.read_text())
        if not found:
            fail(f"{log} names no SLURM job: the job did not run in an allocation")
        job_of_log[log] = found[-1]
        if states.get(found[-1]) != "COMPLETED":
            fail(f"{log}: SLURM job {found[-1]} is {states.get(found[-1])!r} in sacct, not COMPLETED")
    print(f"check.py: {len(logs)} jobs, all in SLURM jobs {sorted(set(job_of_log.values()), key=int)}")

    cancelled = (work / "cancelled_job").read_text().strip() if (work / "cancelled_job").exists() else None
    if cancelled is None:
        fail("the finetune job was never cancelled (no checkpoint seen while it ran)")
    if not states.get(cancelled, "").startswith("CANCELLED"):  # sacct says 'CANCELLED by <uid>'
        fail(f"cancelled job {cancelled} is {states.get(cancelled)!r} in sacct")
    finetune_log = next(log for log in logs if "/finetune/" in str(log))
    text = finetune_log.read_text()
    resumed = re.search(r"resumed from epoch (\d+) of (\d+)", text)
    if not resumed or int(resumed.group(1)) < 1:
        fail(f"{finetune_log} does not say it resumed from an epoch checkpoint:\n{text[-2000:]}")
    if job_of_log[finetune_log] == cancelled:
        fail("the finetune log is that of the cancelled job, not of its resubmission")
    print(f"check.py: finetune job {cancelled} cancelled; job {job_of_log[finetune_log]} resumed from epoch "
          f"{resumed.group(1)} of {resumed.group(2)}")

    # The profile's job groups: both evaluations ran in one SLURM job.
    evaluation_jobs = {job for log, job in job_of_log.items() if "/evaluate_model/" in str(log)}
    if len(evaluation_jobs) != 1:
        fail(f"the evaluations ran in SLURM jobs {sorted(evaluation_jobs)}, not in one group job")
    print(f"check.py: both evaluations in SLURM job {evaluation_jobs.pop()} (group 'evaluations')")

    # One bundle per evaluated run (zero-shot, saeft seed 0), a record per eval set (5 each, and
    # the ID validation split that variants are selected on).
    bundles = sorted((local / "results" / STUDY / "eval").rglob("evals.json"))
    evals = [(path, name) for path in bundles for name in json.loads(path.read_text())["evals"]]
    if len(bundles) != 2 or len(evals) != 12:
        fail(f"expected 12 evaluation results in 2 files in the local run, found {len(evals)} in {len(bundles)}")
    for path, name in evals:
        twin = slurm / path.relative_to(local)
        a = json.loads(path.read_text())["evals"][name]
        b = json.loads(twin.read_text())["evals"].get(name, {})
        for key in ("value", "n", "per_class"):
            if a.get(key) != b.get(key):
                fail(f"{twin.relative_to(slurm)} [{name}]: {key} {b.get(key)!r} under SLURM, {a.get(key)!r} locally")
    for name in ("shifts.csv", "shifts.md", "shifts.tex"):
        if (local / "results" / STUDY / "tables" / name).read_text() != (slurm / "results" / STUDY / "tables" / name).read_text():
            fail(f"tables/{name} differs between the SLURM and the local run")
    print(f"check.py: {len(evals)} evaluation results and the tables equal those of the local run")
    print("check.py: OK")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
