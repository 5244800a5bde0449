"""Fault injection for the crash tests: ``SAEFT_KILL_AT=<point>:<n>`` makes the process kill
itself with SIGKILL the n-th time it passes ``point``, as a preempted or OOM-killed job would die.

Points: ``checkpoint`` (just after a training checkpoint is saved), ``train_step`` (after an
optimizer step of fine-tuning), ``cache_rows`` (after a batch of cached rows is flushed),
``evalset`` (after evaluation scored an eval set, before the next) and ``rename`` (an output
fully written to its temporary file, not yet moved into place). Unset, it costs one dictionary
lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

logger = logging.getLogger(__name__)

ENV = "SAEFT_KILL_AT"
_passes: Counter[str] = Counter()


def maybe_kill(point: str) -> None:
    """Die here if ``SAEFT_KILL_AT`` names this point and this is its n-th pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] == int(count or 1):
        logger.warning("%s=%s: killing this process", ENV, spec)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
