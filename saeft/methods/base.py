"""What a fine-tuning method is: data (its name, its hyper-parameter dataclass, what it needs)
plus its loss, registered once in :mod:`saeft.methods`. Imports no torch, so the workflow reads the
registry while it plans."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from saeft.config import NonNegFloat, Schema, StageConfig

NEEDS = ("teacher", "sae", "encoder_copy", "text")
"""What a method may need besides the batch: ``teacher`` (the zero-shot embeddings f_0 of the
training images: the teacher cache, or a frozen encoder), ``sae`` (a trained SAE),
``encoder_copy`` (a frozen copy of the visual tower, e.g. to tap its blocks), ``text`` (the text
tower, trained)."""


@dataclasses.dataclass
class MethodParams(StageConfig):
    """Base of a method's hyper-parameters (config key ``methods.<method>``)."""


def penalty_weight(default: float) -> Any:
    """The ``lambda`` field of a regularised method (``CE + lambda * R``), with its default; the
    config key is ``lambda``, a Python keyword, so the field is named ``lam``."""
    return dataclasses.field(default=default, metadata={"key": "lambda"})


SaeName = Annotated[str, Schema(min_length=1)]


@dataclasses.dataclass(frozen=True)
class Method:
    """One fine-tuning method, or an evaluation-only one (``trained=False``: WiSE-FT)."""

    name: str
    """Config key under ``methods`` and the name of its runs (``[a-z0-9_]+``)."""
    label: str
    """Display name in tables and figures."""
    summary: str
    """One line: what it does (the config schema's description)."""
    params: type[MethodParams] = MethodParams
    """Its hyper-parameters: the single definition of its keys, defaults and checks."""
    needs: frozenset[str] = frozenset()
    """Subset of :data:`NEEDS`."""
    trained: bool = True
    """False for a method evaluated from other methods' weights (no finetune job)."""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"method {self.name}: unknown needs {sorted(unknown)} (known: {', '.join(NEEDS)})")
