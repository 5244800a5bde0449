"""Pieces every training loop shares: threads and seeds, the learning-rate schedule, progress,
training curves, checkpoints."""

from __future__ import annotations

import copy
import logging
import math
import os
import random

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from saeft.infra.faults import maybe_kill
from saeft.infra.io import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
"""Resumable training state, kept beside (never among) a stage's declared outputs."""


def default_device() -> torch.device:
    """The first visible GPU, else the CPU (caching, evaluation and analysis run there)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_loader(data: torch.utils.data.Dataset, batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """In-order batches of ``data`` for inference: ``workers`` loader processes (0: in this one),
    pinned memory when the model is on a GPU."""
    return torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")


def setup_torch(seed: int, threads: int | None = None) -> torch.Generator:
    """Seed Python, NumPy and torch, pin the thread count, and return a generator for data order.

    ``threads`` defaults to ``SAEFT_THREADS`` or, failing that, the CPUs this process may use
    (Snakemake passes each job's thread count through the rule).
    """
    threads = threads or int(os.environ.get("SAEFT_THREADS", "0")) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base learning rate, then cosine decay to zero at ``total_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _LogLines:
    """A file for tqdm that logs each refreshed line (no carriage returns, no blank clears)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    def write(self, text: str) -> None:
        line = text.strip("\r\n\t ")
        if line:
            self.log.info("%s", line)

    def flush(self) -> None:
        pass


class Progress:
    """Logs ``step/total``, rate and ETA at most every ``every_s`` seconds, and at the last step:
    one plain line per report through :mod:`logging` (a tqdm whose file is the log), readable in a
    non-TTY Snakemake or SLURM log."""

    FORMAT = "{desc} {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, total: int, label: str, every_s: float = 10.0) -> None:
        self.total = total
        self.bar = tqdm(total=total, desc=label, file=_LogLines(logger), mininterval=every_s, miniters=1,
                        delay=max(every_s, 1e-9), bar_format=self.FORMAT, leave=False, ascii=True, disable=False)
        self.done = False

    def update(self, step: int, **values: float) -> None:
        """Report progress after ``step`` (1-based) steps, with named values such as the loss."""
        if self.done:
            return
        self.bar.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in values.items()), refresh=False)
        self.bar.update(step - self.bar.n)
        if step >= self.total:  # the last line always, then the bar is done (leaves no blank line)
            if self.bar.last_print_n != self.bar.n:
                self.bar.refresh()
            self.bar.close()
            self.done = True


CurveSink = Callable[[int, Mapping[str, float]], None]
"""Receives one point of a training curve: ``(step, {name: value})``."""


class Curve:
    """Per-step training values averaged over windows of steps, handed to ``sink(step, means)``
    at the end of each window and at the last step: at most about ``points`` points per curve
    whatever the number of steps, so the tracking store and its UI stay light. Each ``add`` is
    a few float additions; values must already be Python floats (no device sync here)."""

    def __init__(self, sink: CurveSink | None, total_steps: int, points: int = 500) -> None:
        self.sink = sink
        self.total = total_steps
        self.every = max(1, -(-total_steps // max(points, 1)))
        """Steps per window: ``ceil(total_steps / points)``."""
        self._sums: dict[str, float] = {}
        self._count = 0
        self._step = 0

    def add(self, step: int, **values: float) -> None:
        """Add the values of ``step`` (1-based); at a window's end, send the window's means."""
        if self.sink is None:
            return
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count, self._step = self._count + 1, step
        if step % self.every == 0 or step >= self.total:
            self.flush()

    def flush(self) -> None:
        """Send the means of the steps added since the last point (none: nothing), at the last
        step added: the end of a loop that ran fewer steps than ``total_steps``."""
        if self.sink is not None and self._count:
            self.sink(self._step, {name: total / self._count for name, total in self._sums.items()})
        self._sums, self._count = {}, 0


def save_checkpoint(path: Path, config: dict[str, Any], parts: dict[str, Any], extra: dict[str, Any]) -> None:
    """Atomically save ``parts`` (objects with ``state_dict``), torch's RNG and ``extra`` under
    ``config``, which a resume must match exactly."""
    state = {"config": config, "torch_rng": torch.get_rng_state(), **extra}
    state.update({name: part.state_dict() for name, part in parts.items()})
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    maybe_kill("checkpoint")


def resume_checkpoint(path: Path, config: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any] | None:
    """Restore ``parts`` and torch's RNG from ``path`` if it was saved under the same ``config``;
    returns the whole saved state (for the caller's ``extra``), or None to start afresh."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start afresh rather than fail
        logger.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if state.get("config") != config:
        logger.info("checkpoint %s is from another configuration; starting afresh", path)
        return None
    missing = [name for name in (*parts, "torch_rng") if name not in state]
    if missing:
        logger.warning("ignoring checkpoint %s: it lacks %s; starting afresh", path, ", ".join(missing))
        return None
    fresh = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}
    try:
        for name, part in parts.items():
            part.load_state_dict(state[name])
    except (KeyError, RuntimeError, ValueError) as exc:  # a checkpoint of another model shape
        logger.warning("ignoring checkpoint %s: it does not fit (%s); starting afresh", path, exc)
        for name, part in parts.items():
            part.load_state_dict(fresh[name])
        return None
    torch.set_rng_state(state["torch_rng"])
    logger.info("resuming from %s", path)
    return state
