"""GPU assignment without GPUs: the lock-file slots, and when saeft leaves the choice to others."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from saeft.infra import gpu
from saeft.infra.gpu import GpuSlots, allocated_gpu_count, assign_gpus

ROOT = Path(__file__).resolve().parent.parent


def test_concurrent_claims_get_distinct_gpus_and_freed_ones_are_reused(tmp_path):
    first, second, third = (GpuSlots(3, tmp_path) for _ in range(3))
    assert first.try_acquire() == [0]
    assert second.try_acquire() == [1]  # flock is per open file: a second claim sees GPU 0 taken
    assert third.try_acquire(2) is None  # only GPU 2 is free: all or nothing
    assert third.held == []
    assert third.try_acquire() == [2]
    assert GpuSlots(3, tmp_path).try_acquire() is None
    second.release()
    assert GpuSlots(3, tmp_path).try_acquire() == [1]


def test_a_claim_dies_with_its_process(tmp_path):
    # A child claims GPU 0 and exits without releasing: the kernel drops its lock.
    code = textwrap.dedent(f"""
        from saeft.infra.gpu import GpuSlots
        slots = GpuSlots(2, {str(tmp_path)!r})
        print(slots.try_acquire(), flush=True)
        import os; os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[0]"
    assert GpuSlots(2, tmp_path).try_acquire() == [0]


def test_waiting_for_a_gpu_times_out_with_a_clear_error(tmp_path):
    holder = GpuSlots(1, tmp_path)
    holder.try_acquire()
    with pytest.raises(TimeoutError, match="no 1 free GPU"):
        GpuSlots(1, tmp_path).acquire(timeout_s=0.3, poll_s=0.1)


def test_assign_sets_cuda_visible_devices_only_when_there_is_a_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "_SLOTS", None)
    env: dict[str, str] = {}
    assert assign_gpus(1, n_gpus=1, lock_dir=tmp_path, environ=env) is None and env == {}  # one GPU: nothing to choose
    assert assign_gpus(1, n_gpus=4, lock_dir=tmp_path, environ=env) == [0]
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    other: dict[str, str] = {}
    assert assign_gpus(2, n_gpus=4, lock_dir=tmp_path, environ=other) == [1, 2]  # GPU 0 is still held
    assert other["CUDA_VISIBLE_DEVICES"] == "1,2"
    slurm = {"CUDA_VISIBLE_DEVICES": "3"}  # an allocation (SLURM) or the user decided
    assert assign_gpus(1, n_gpus=4, lock_dir=tmp_path, environ=slurm) is None and slurm["CUDA_VISIBLE_DEVICES"] == "3"
    worker = {"LOCAL_RANK": "1"}  # a torchrun worker: its launcher chose
    assert assign_gpus(1, n_gpus=4, lock_dir=tmp_path, environ=worker) is None and "CUDA_VISIBLE_DEVICES" not in worker


def test_allocated_gpus_count_only_inside_a_slurm_job():
    assert allocated_gpu_count({"CUDA_VISIBLE_DEVICES": "0,1"}) == 0
    assert allocated_gpu_count({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert allocated_gpu_count({"SLURM_JOB_ID": "7"}) == 0


def test_visible_gpu_count_reads_the_driver_list(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"0000:0{i}:00.0").mkdir()
    monkeypatch.setattr(gpu, "NVIDIA_GPUS", tmp_path)
    assert gpu.visible_gpu_count() == 3
