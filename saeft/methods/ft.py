"""``ft``: end-to-end fine-tuning of the visual tower and the head with cross-entropy."""

from __future__ import annotations

from saeft.methods.registry import register
from saeft.methods.base import Method

METHOD = register(Method(name="ft", label="FT", summary="end-to-end fine-tuning"))
