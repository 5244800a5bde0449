"""Which numerical code path decides a pretrained model, and what a portable path costs.

The same commit pretrains a different model on an AMD EPYC with AVX2 than on one with AVX-512
(issue "A newcomer's first hour"). One machine can emulate the other's code paths: torch picks
its vectorised kernels by ``ATEN_CPU_CAPABILITY``, MKL its BLAS kernels by
``MKL_ENABLE_INSTRUCTIONS`` and oneDNN its ISA by ``ONEDNN_MAX_CPU_ISA``. This bench pretrains the
default world's CLIP for a few steps in a fresh process per setting (and thread count), and prints
the SHA-256 of the weights and the wall time::

    PYTHONPATH=. python bench/cpu_paths.py --steps 200 --threads 1 2

Settings: ``native`` (what the CPU offers), ``avx2`` (the three libraries held to AVX2, as on an
AVX2-only CPU), and ``portable`` / ``portable+avx2``: torch's scalar kernels
(``ATEN_CPU_CAPABILITY=default``), MKL's conditional numerical reproducibility
(``MKL_CBWR=COMPATIBLE``) and oneDNN held to SSE4.1. Equal digests for ``portable`` and
``portable+avx2`` but not for ``native`` and ``avx2`` mean the switch makes the result
independent of the instruction set; the time ratio is its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}
SETTINGS = {
    "native": {},
    "avx2": AVX2,
    "portable": PORTABLE,
    "portable+avx2": {**AVX2, **PORTABLE, "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

CHILD = r"""
import hashlib, json, sys, time
import torch
from saeft.config.stages import PretrainConfig
from saeft.data.synthetic import WorldConfig
from saeft.infra.io import load_tensors
from saeft.stages import pretrain
out, steps = sys.argv[1], int(sys.argv[2])
world = WorldConfig(object_scale=1.2, pretrain_per_class=400)
start = time.perf_counter()
pretrain.run("saeft-vit-p4", world, PretrainConfig(steps=steps, lr=0.002, warmup_steps=20), out)
seconds = time.perf_counter() - start
tensors, _ = load_tensors(out)
digest = hashlib.sha256()
for name in sorted(tensors):
    digest.update(name.encode()); digest.update(tensors[name].contiguous().numpy().tobytes())
print("RESULT " + json.dumps({"sha256": digest.hexdigest()[:16], "seconds": seconds,
                              "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def run_setting(name: str, steps: int, folder: Path, threads: int = 1) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **{key: str(threads) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SAEFT_THREADS")}}
    for key in {key for values in SETTINGS.values() for key in values}:
        env.pop(key, None)
    env.update(SETTINGS[name])
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder / f"{name}-{threads}.safetensors"), str(steps)],
                            capture_output=True, text=True, env=env, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps per setting")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads (each a run per setting)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {(name, threads): run_setting(name, args.steps, Path(folder), threads)
                   for threads in args.threads for name in args.settings}
    print(f"{'setting':<15} {'threads':>7} {'torch kernels':<14} {'weights sha256':<18} {'seconds':>8} {'/ native':>9}")
    for (name, threads), result in results.items():
        native = results.get(("native", threads), {}).get("seconds")
        ratio = f"{result['seconds'] / native:.2f}" if native else "-"
        print(f"{name:<15} {threads:>7} {result['capability']:<14} {result['sha256']:<18} {result['seconds']:8.1f} {ratio:>9}")


if __name__ == "__main__":
    main()
