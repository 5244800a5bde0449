"""The fixed cost of a job: its wall time minus the time of its own work, per stage.

    python bench/job_overhead.py [--repeats 3] [--cores 2] [--modes default,tracking-off,fresh]

Runs the tiny test study (tests/data/tiny_study.yaml: every stage, seconds of work each) from
scratch ``--repeats`` times in each mode, in a temporary folder:

- ``default``: as a user runs it: the warm worker (saeft.infra.worker) forks each job, jobs spool
  their MLflow tracking and the run's sync process sends it (tracking on);
- ``tracking-off``: the same with ``SAEFT_TRACKING=off``;
- ``fresh``: every job a fresh Python process logging to MLflow itself and rendering its
  images (``SAEFT_WORKER=off SAEFT_TRACKING=live SAEFT_IMAGE_CACHE=``): how every job ran
  before the worker.

For every job, the wall time is Snakemake's benchmark of it (the whole shell command) and the
work is what the job timed around its stage function (the ``done in`` line of its log, imports
and tracking excluded); fixed = wall - work. It prints, per mode and stage, the median over jobs
and repeats of each, the run's wall time, and then the import breakdown of a fresh job (``python
-X importtime``: the top-level packages a stage imports). It also checks that the three modes
wrote the same metrics tables (SHA-256 of tables/*.csv) and prints their digest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny_study.yaml"
MODES = {
    "default": {},
    "tracking-off": {"SAEFT_TRACKING": "off"},
    "fresh": {"SAEFT_WORKER": "off", "SAEFT_TRACKING": "live", "SAEFT_IMAGE_CACHE": ""},
}
DONE = re.compile(r"done in [0-9.]+s \((.*)\)")
IMPORTED = ("torch", "torchvision", "open_clip", "mlflow", "pandas", "h5py", "matplotlib", "numpy", "safetensors", "saeft")


def run_study(folder: Path, env_overrides: dict[str, str], cores: int) -> float:
    """Run the tiny study from scratch in ``folder``; its wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_overrides}
    for name in ("SAEFT_WORKER", "SAEFT_TRACKING", "SAEFT_IMAGE_CACHE"):
        if name not in env_overrides:
            env.pop(name, None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "--replace-workflow-config", "--configfile", str(TINY),
                             "--cores", str(cores), "-q"], cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"the tiny study failed in {folder}:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def job_times(folder: Path) -> list[tuple[str, float, float]]:
    """(rule, wall, work) of every job of a finished run."""
    jobs = []
    for benchmark in sorted((folder / "benchmarks").rglob("*.tsv")):
        relative = benchmark.relative_to(folder / "benchmarks").with_suffix(".log")
        log = folder / "logs" / relative
        rule = relative.parts[1].removesuffix(".log")
        wall = float(benchmark.read_text().splitlines()[1].split("\t")[0])
        found = DONE.search(log.read_text()) if log.is_file() else None
        if not found:
            raise SystemExit(f"{log}: no 'done in' line with the job's timing")
        timing = dict(part.rsplit(" ", 1) for part in found[1].split(", "))
        jobs.append((rule, wall, float(timing["work"].rstrip("s"))))
    return jobs


def tables_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((folder / "results").rglob("tables/*.csv")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def import_breakdown() -> dict[str, tuple[float, float]]:
    """Per top-level package a fine-tuning job imports: (seconds of its own modules, cumulative
    seconds of its outermost imports, including the packages it pulls in), from -X importtime."""
    modules = "saeft.cli, saeft.stages.finetune, saeft.nn.models, open_clip, saeft.infra.tracking, mlflow"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {modules}"], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = []
    for line in result.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2][1:]  # one space after the bar, then two per nesting level
            rows.append((int(parts[0].split(":")[1]) / 1e6, int(parts[1]) / 1e6, (len(name) - len(name.lstrip())) // 2,
                         name.strip().split(".")[0]))
    own: dict[str, float] = defaultdict(float)
    outer: dict[str, float] = defaultdict(float)
    ancestors: list[tuple[int, str]] = []
    for self_seconds, cumulative, depth, package in reversed(rows):  # a module is printed after its imports
        while ancestors and ancestors[-1][0] >= depth:
            ancestors.pop()
        own[package] += self_seconds
        if not any(p == package for _, p in ancestors):  # not nested in an import of its own package
            outer[package] += cumulative
        ancestors.append((depth, package))
    return {p: (own[p], outer[p]) for p in IMPORTED if p in own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the tiny study per mode (default 3)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    print(f"bench/job_overhead.py: tiny study, {args.repeats} run(s) per mode, --cores {args.cores}, "
          f"{os.cpu_count()} CPUs ({_cpu_name()})")
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    walls: dict[str, list[float]] = {}
    digests: dict[str, set[str]] = {}
    for mode in modes:
        results[mode], walls[mode], digests[mode] = defaultdict(list), [], set()
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix=f"job-overhead-{mode}-") as tmp:
                walls[mode].append(run_study(Path(tmp), MODES[mode], args.cores))
                for rule, wall, work in job_times(Path(tmp)):
                    results[mode][rule].append((wall, work))
                digests[mode].add(tables_digest(Path(tmp)))
            print(f"  {mode} run {repeat + 1}: {walls[mode][-1]:.1f} s", flush=True)
    for mode in modes:
        print(f"\n== {mode} ({' '.join(f'{k}={v}' for k, v in MODES[mode].items()) or 'worker on, tracking on'}): "
              f"study wall time median {statistics.median(walls[mode]):.1f} s")
        print(f"{'stage (rule)':<22} {'jobs':>5} {'wall s':>7} {'work s':>7} {'fixed s':>8}")
        fixed_all = []
        for rule in sorted(results[mode]):
            samples = results[mode][rule]
            wall = statistics.median(w for w, _ in samples)
            work = statistics.median(k for _, k in samples)
            fixed = statistics.median(w - k for w, k in samples)
            fixed_all += [w - k for w, k in samples]
            print(f"{rule:<22} {len(samples) // args.repeats:>5} {wall:>7.2f} {work:>7.2f} {fixed:>8.2f}")
        print(f"{'every job':<22} {len(fixed_all) // args.repeats:>5} {'':>7} {'':>7} {statistics.median(fixed_all):>8.2f}"
              f"   (max of the per-stage medians is the figure to hold to 2 s)")
    print("\n== imports of a fresh fine-tuning job with MLflow (python -X importtime), seconds per package:")
    print(f"{'package':<14} {'own':>6} {'with what it imports':>21}")
    for package, (own, outer) in sorted(import_breakdown().items(), key=lambda item: -item[1][1]):
        print(f"{package:<14} {own:6.2f} {outer:21.2f}")
    print("\n== metrics tables (tables/*.csv) digest per mode")
    for mode in modes:
        print(f"{mode:<14} {', '.join(sorted(digests[mode]))}")
    same = len(set().union(*digests.values())) == 1
    print("identical across modes and runs" if same else "DIFFERENT across modes or runs")
    if not same:
        sys.exit(1)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
