"""Dry-run cost of paper-scale DAGs, and a no-change rerun that schedules nothing.

    PYTHONPATH=. python bench/dag.py [CONFIG ...] [--no-rerun]

For each config (default: workflow/configs/paper_vitb16.yaml and paper_vitb32.yaml), times
``snakemake -n`` in an empty working directory (every job of the study is planned) and prints the
job count and seconds. A config that does not exist is replaced, and the output says so, by a
paper-scale stand-in generated from the default study: every trained method x 3 seeds, WiSE-FT
of every method on a 9-point alpha grid. Then (unless --no-rerun) it runs the tiny test study for
real and times ``snakemake -n`` again, which must plan zero jobs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = [ROOT / "workflow" / "configs" / "paper_vitb16.yaml", ROOT / "workflow" / "configs" / "paper_vitb32.yaml"]
TINY = ROOT / "tests" / "data" / "tiny_study.yaml"


def stand_in_config(folder: Path) -> Path:
    """The default study at paper scale: every trained method x 3 seeds, WiSE-FT of each on a grid."""
    from saeft.finetune import METHOD_PARAMS

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    methods = list(METHOD_PARAMS)
    config["study"] = "paper_scale_standin"
    config["seeds"] = [0, 1, 2]
    config["methods"] = {m: {} for m in methods}
    config["methods"]["wiseft"] = {"base": methods, "alphas": [round(0.1 * i, 1) for i in range(1, 10)], "alpha": 0.5}
    path = folder / "paper_scale_standin.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, config: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--configfile", str(config), *args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saeft-dag-") as tmp:
        tmp = Path(tmp)
        configs = []
        for config in args.configs:
            if config.is_file():
                configs.append((config, str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config)))
            else:
                configs.append((stand_in_config(tmp), f"{config.name} missing -> stand-in: default study, "
                                                      f"11 methods x 3 seeds, WiSE-FT of each on 9 alphas"))
        seen = set()
        for config, label in configs:
            if config in seen:
                continue
            seen.add(config)
            workdir = tmp / f"plan-{len(seen)}"
            workdir.mkdir()
            seconds, output = snakemake(workdir, config, "-n", "--cores", "all")
            print(f"{label}: snakemake -n planned {planned_jobs(output)} jobs in {seconds:.2f} s")
        if not args.no_rerun:
            workdir = tmp / "tiny"
            workdir.mkdir()
            run_s, _ = snakemake(workdir, TINY, "--cores", "all", "--quiet")
            seconds, output = snakemake(workdir, TINY, "-n", "--cores", "all")
            print(f"{TINY.relative_to(ROOT)} after a real run ({run_s:.0f} s): snakemake -n planned "
                  f"{planned_jobs(output)} jobs in {seconds:.2f} s")


if __name__ == "__main__":
    main()
