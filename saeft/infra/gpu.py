"""Which GPU(s) a job uses.

Under SLURM a job's allocation decides: SLURM sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it
granted, so jobs on one node never share one. A workstation has no such arbiter: Snakemake's
``--resources gpu=N`` bounds how many GPU jobs run at once but does not say which GPU each takes.
There, :func:`assign_gpus` gives every job GPUs of its own through lock files, one per GPU
(``<lock dir>/gpu<i>.lock``): a job holds an exclusive lock (``filelock``, an ``flock``) on its
GPUs' files for as long as it lives, and the kernel drops the lock when the process exits,
however it exits, so a crashed job never leaves a GPU taken.

This module must not import torch: it runs before CUDA is initialised, which reads
``CUDA_VISIBLE_DEVICES`` once.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
"""One entry per GPU the NVIDIA driver knows."""


def visible_gpu_count() -> int:
    """GPUs on this machine, without initialising CUDA: the NVIDIA driver's list, else
    ``nvidia-smi -L``, else 0."""
    if NVIDIA_GPUS.is_dir():
        return len(list(NVIDIA_GPUS.iterdir()))
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return 0


def default_lock_dir() -> Path:
    """``SAEFT_GPU_LOCK_DIR``, else a per-user folder in the system's temporary directory."""
    return Path(os.environ.get("SAEFT_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"saeft-gpu-locks-{os.getuid()}")


class GpuSlots:
    """Exclusive claims on GPUs ``0 .. n_gpus-1`` through one lock file each in ``lock_dir``."""

    def __init__(self, n_gpus: int, lock_dir: str | os.PathLike | None = None) -> None:
        if n_gpus < 1:
            raise ValueError(f"GpuSlots needs at least one GPU, got {n_gpus}")
        self.n_gpus = n_gpus
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
        self._held: dict[int, FileLock] = {}  # GPU index -> the lock this object holds on it

    @property
    def held(self) -> list[int]:
        """The GPUs this object holds, in ascending order."""
        return sorted(self._held)

    def _try(self, index: int) -> bool:
        path = self.lock_dir / f"gpu{index}.lock"
        lock = FileLock(path, mode=0o666, blocking=False, preserve_lock_file=True)
        try:
            lock.acquire()
        except Timeout:
            return False
        path.write_text(f"{os.getpid()}\n")  # who holds it, for people reading the folder
        self._held[index] = lock
        return True

    def try_acquire(self, count: int = 1) -> list[int] | None:
        """Claim ``count`` free GPUs (the lowest free indices) or none at all; returns their
        indices, or None when fewer than ``count`` are free now."""
        if not 1 <= count <= self.n_gpus:
            raise ValueError(f"cannot claim {count} GPU(s) of {self.n_gpus}")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        got: list[int] = []
        for index in range(self.n_gpus):
            if index not in self._held and self._try(index):
                got.append(index)
                if len(got) == count:
                    return got
        self.release(got)
        return None

    def acquire(self, count: int = 1, timeout_s: float = 3600.0, poll_s: float = 1.0) -> list[int]:
        """Claim ``count`` GPUs, waiting up to ``timeout_s`` for others to free them."""
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            got = self.try_acquire(count)
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {count} free GPU(s) of {self.n_gpus} within {timeout_s:.0f}s (locks in {self.lock_dir})")
            if not waited:
                logger.info("all GPUs are taken by other jobs; waiting for one (locks in %s)", self.lock_dir)
                waited = True
            time.sleep(poll_s)

    def release(self, indices: list[int] | None = None) -> None:
        """Give back ``indices`` (default: all held)."""
        for index in list(self._held if indices is None else indices):
            lock = self._held.pop(index, None)
            if lock is not None:
                lock.release()


_SLOTS: GpuSlots | None = None
"""The claims of this process, kept alive until it exits."""


def assign_gpus(count: int = 1, n_gpus: int | None = None, lock_dir: str | os.PathLike | None = None,
                environ: dict[str, str] | None = None) -> list[int] | None:
    """Give this process ``count`` GPUs of its own by setting ``CUDA_VISIBLE_DEVICES``, unless
    something already decided: ``CUDA_VISIBLE_DEVICES`` is set (a SLURM allocation, or the user),
    or this is a worker of ``torchrun`` (``LOCAL_RANK``: its launcher chose). Only with more than
    one GPU visible is there anything to choose. Returns the GPUs claimed, or None."""
    global _SLOTS
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env or "LOCAL_RANK" in env:
        return None
    n_gpus = visible_gpu_count() if n_gpus is None else n_gpus
    if n_gpus <= 1:
        return None
    slots = GpuSlots(n_gpus, lock_dir)
    got = slots.acquire(min(count, n_gpus))
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, got))
    _SLOTS = slots
    logger.info("using GPU(s) %s of %d (lock files in %s)", env["CUDA_VISIBLE_DEVICES"], n_gpus, slots.lock_dir)
    return got


def allocated_gpu_count(environ: dict[str, str] | None = None) -> int:
    """GPUs of this SLURM job's allocation (``CUDA_VISIBLE_DEVICES`` inside a job), 0 outside a
    SLURM job or without GPUs."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return 0
    devices = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    return len([d for d in devices.split(",") if d.strip()]) if devices else 0
