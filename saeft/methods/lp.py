"""``lp``: linear probe. The whole encoder is frozen and in eval mode; only the head trains, with
cross-entropy."""

from __future__ import annotations

from typing import Any

from saeft.methods.registry import register
from saeft.methods.base import Method


def always_probing(_params: Any, _epoch: int) -> bool:
    """Every epoch probes."""
    return True


METHOD = register(Method(name="lp", label="LP", summary="linear probe: encoder frozen, head trained",
                         probing=always_probing))
