"""Dry-run cost of paper-scale DAGs, and a no-change rerun that schedules nothing.

    PYTHONPATH=. python bench/dag.py [CONFIG ...] [--no-rerun | --rerun-workdir DIR --rerun-config CONFIG]

For each config (default: config/paper_vitb16.yaml and paper_vitb32.yaml), times
``snakemake -n`` in an empty working directory (every job of the study is planned) and prints the
job count and seconds. A config that does not exist is replaced, and the output says so, by a
paper-scale stand-in generated from the default study: every trained method x 3 seeds, WiSE-FT
of every method on a 9-point alpha grid. Then it plans the default study with an SAE-FT grid of
``--variants`` points (default 300) on 3 seeds: with the variants on the selection seed (the
default; the DAG up to the select_variants checkpoint) and on all three seeds (every variant on
every seed, the largest DAG such a grid makes). Then (unless
--no-rerun) it runs the tiny test study for real and times ``snakemake -n`` again, which must plan
zero jobs.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = [ROOT / "config" / "paper_vitb16.yaml", ROOT / "config" / "paper_vitb32.yaml"]
TINY = ROOT / "tests" / "data" / "tiny_study.yaml"


def stand_in_config(folder: Path) -> Path:
    """The default study at paper scale: every trained method x 3 seeds, WiSE-FT of each on a grid."""
    from saeft.methods import trained_methods

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    methods = list(trained_methods())
    config["study"] = "paper_scale_standin"
    config["seeds"] = [0, 1, 2]
    config["methods"] = {m: {} for m in methods}
    config["methods"]["wiseft"] = {"base": methods, "alphas": [round(0.1 * i, 1) for i in range(1, 10)], "alpha": 0.5}
    path = folder / "paper_scale_standin.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def grid_config(folder: Path, variants: int) -> tuple[Path, str]:
    """The default study with an SAE-FT grid of ``variants`` points (lambda x mu x lambda_add,
    rounded down to a multiple of 30), and the name of one of its variants."""
    lambdas = [round(10 ** (i / 4), 4) for i in range(max(1, variants // 30))]
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["study"] = f"grid{variants}"
    config["methods"]["saeft"] = {"lambda_remove": 0.02, "grid": {"lambda": lambdas, "mu": [0.1, 1, 10, 100, 1000],
                                                                   "lambda_add": [0.1, 1, 3, 10, 30, 100]}}
    path = folder / f"grid{variants}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, f"saeft@lambda={lambdas[0]:g},lambda_add=0.1,mu=0.1"


def plan_grid(tmp: Path, variants: int) -> None:
    """Plan the grid study in an empty directory, with its variants on the first seed (the
    default: the DAG up to the select_variants checkpoint, which then adds the selected variant's
    other seeds) and on all three; print jobs and seconds."""
    config, _ = grid_config(tmp, variants)
    study = yaml.safe_load(config.read_text())
    n = len(study["methods"]["saeft"]["grid"]["lambda"]) * 30
    for seeds in ([0], [0, 1, 2]):
        study["selection"] = {"seeds": seeds}
        config.write_text(yaml.safe_dump(study, sort_keys=False))
        workdir = tmp / f"grid-{len(seeds)}"
        workdir.mkdir()
        seconds, cpu, output = snakemake(workdir, config, "-n", "--cores", "all")
        print(f"default study with a {n}-variant SAE-FT grid, variants on seed(s) {seeds}: snakemake -n planned "
              f"{planned_jobs(output)} jobs in {seconds:.2f} s ({cpu:.2f} s CPU)")


def snakemake(workdir: Path, config: Path, *args: str) -> tuple[float, float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "-d", str(workdir), "--configfile", str(config), *args]
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time as well: on a shared machine the wall-clock time also measures the other load.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, cpu, result.stdout + result.stderr


def planned_jobs(output: str) -> int:
    if "Nothing to be done" in output:
        return 0
    found = re.search(r"^total\s+(\d+)$", output, re.M)
    if not found:
        raise SystemExit(f"no job count in the dry run's output:\n{output[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, default=PAPER_CONFIGS, help="study configs to plan")
    parser.add_argument("--no-rerun", action="store_true", help="skip the real tiny run and its no-change rerun")
    parser.add_argument("--variants", type=int, default=300, help="SAE-FT grid size of the variant plan (0: skip it)")
    parser.add_argument("--rerun-config", type=Path, default=TINY, help="study of the no-change rerun (default: the tiny test study)")
    parser.add_argument("--rerun-workdir", type=Path, default=None,
                        help="a working directory where --rerun-config already ran to completion (skips the real run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saeft-dag-") as tmp:
        tmp = Path(tmp)
        configs = [(c.resolve(), str(c.resolve().relative_to(ROOT) if c.resolve().is_relative_to(ROOT) else c))
                   for c in args.configs if c.is_file()]
        missing = [c.name for c in args.configs if not c.is_file()]
        if missing:
            configs.append((stand_in_config(tmp), f"{', '.join(missing)} missing -> stand-in (default study, "
                                                  f"11 methods x 3 seeds, WiSE-FT of each on 9 alphas)"))
        for i, (config, label) in enumerate(configs):
            workdir = tmp / f"plan-{i}"
            workdir.mkdir()
            # A paper config reads its datasets from data_root: planning needs the key, not the data.
            needs_root = "data_root" in (yaml.safe_load(config.read_text()) or {})
            extra = ("--config", f"data_root={tmp / 'data'}") if needs_root else ()
            seconds, cpu, output = snakemake(workdir, config, "-n", "--cores", "all", *extra)
            print(f"{label}: snakemake -n planned {planned_jobs(output)} jobs in {seconds:.2f} s ({cpu:.2f} s CPU)")
        if args.variants:
            plan_grid(tmp, args.variants)
        if not args.no_rerun:
            config = args.rerun_config.resolve()
            workdir = args.rerun_workdir
            ran = "an earlier run"
            if workdir is None:
                workdir = tmp / "rerun"
                workdir.mkdir()
                run_s, _, _ = snakemake(workdir, config, "--cores", "all", "--quiet")
                ran = f"a real run ({run_s:.0f} s)"
            seconds, cpu, output = snakemake(workdir, config, "-n", "--cores", "all")
            print(f"{config.relative_to(ROOT) if config.is_relative_to(ROOT) else config} after {ran}: snakemake -n "
                  f"planned {planned_jobs(output)} jobs in {seconds:.2f} s ({cpu:.2f} s CPU)")


if __name__ == "__main__":
    main()
