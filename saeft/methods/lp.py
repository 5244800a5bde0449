"""``lp``: linear probe. The whole encoder is frozen and in eval mode; only the head trains, with
cross-entropy."""

from __future__ import annotations

from saeft.methods.registry import register
from saeft.methods.base import Method

METHOD = register(Method(name="lp", label="LP", summary="linear probe: encoder frozen, head trained"))
