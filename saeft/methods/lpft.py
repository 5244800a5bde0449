"""``lpft``: ``lp_epochs`` epochs of linear probing, then ``finetune.epochs`` of end-to-end
fine-tuning from the probed head (one cosine schedule over both)."""

from __future__ import annotations

import dataclasses

from saeft.config import PositiveInt
from saeft.methods.registry import register
from saeft.methods.base import Method, MethodParams


@dataclasses.dataclass
class LpftParams(MethodParams):
    """LP-FT's hyper-parameters (config key ``methods.lpft``)."""

    section = "methods.lpft"
    lp_epochs: PositiveInt = 2
    """Linear-probing epochs before the finetune.epochs of full fine-tuning."""


def probing(params: LpftParams, epoch: int) -> bool:
    """The first ``lp_epochs`` epochs probe."""
    return epoch < params.lp_epochs


def extra_epochs(params: LpftParams) -> int:
    """The probing epochs come on top of ``finetune.epochs``."""
    return params.lp_epochs


METHOD = register(Method(name="lpft", label="LP-FT", params=LpftParams, probing=probing, extra_epochs=extra_epochs,
                         summary="linear probe, then end-to-end fine-tuning from the probed head"))
