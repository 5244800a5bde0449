"""bench/gpu.sh at its tiny CPU size: the GPU benchmarks' code runs and prints its three sections
with numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def _section(output: str, title: str) -> str:
    """The text of the section ``## <title> ...`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", output, re.M | re.S)
    assert match, f"no section '## {title}' in:\n{output}"
    return match.group(1)


@pytest.mark.slow
def test_gpu_bench_runs_at_tiny_size(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout

    finetune = _section(out, "finetune_step")
    for row in ("ft", "saeft (cache)", "saeft (live)", "flyp"):  # step (ms), ratio, peak memory, ratio
        assert re.search(rf"^\| {re.escape(row)} \| {NUMBER} \| {NUMBER}x \| {NUMBER} \| {NUMBER}x \|$", finetune, re.M), row
    for row in ("saeft (cache) / ft", "saeft (live) / ft"):  # the paired intervals
        assert re.search(rf"^\| {re.escape(row)} \| {NUMBER}x \| {NUMBER}-{NUMBER}x", finetune, re.M), row
    assert "model saeft-tiny-vit, bf16 autocast, batch 4, device cpu" in finetune

    sae = _section(out, "sae_train")
    assert "### tiny: d 32, 256 latents, k 8" in sae
    for row in ("saeft", "dense"):  # samples/s, held-out FVU
        assert re.search(rf"^\| {row} \| {NUMBER} \| {NUMBER} ", sae, re.M), row
    assert re.search(rf"saeft / dense: speed {NUMBER}x", sae)

    cache = _section(out, "cache")
    assert re.search(rf"^\| encoder forward \(decoded batches\) \| {NUMBER} \| {NUMBER}-{NUMBER} \| {NUMBER} \|$", cache, re.M)
    assert re.search(rf"^\| cache_activations per image beyond the fixed cost \| {NUMBER} \| \| {NUMBER} \|$", cache, re.M)
    ratio = re.search(rf"cache / forward throughput: ({NUMBER})x", cache)
    assert ratio and float(ratio.group(1)) > 0
    assert re.search(r"goal cache / forward >= 0\.90x: (met|NOT met)$", cache, re.M)
    assert re.search(r"^bench/gpu.sh: done in [0-9]+ s$", out, re.M)


def test_gpu_bench_refuses_unknown_arguments():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--huge"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument '--huge'" in result.stderr


def test_bootstrap_bench_prints_its_times_and_memory():
    result = subprocess.run([sys.executable, "bench/bootstrap.py", "--images", "500", "--classes", "10", "--resamples", "40",
                             "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("indices", "macro_f1", "top1"):
        assert re.search(rf"^  {name} +{NUMBER} s$", result.stdout, re.M), result.stdout
    assert re.search(rf"index matrix {NUMBER} MiB \(int32\); peak resident memory {NUMBER} MiB", result.stdout)
