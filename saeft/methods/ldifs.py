"""``ldifs``: ``lambda *`` the mean over tapped blocks of the squared distance between the
L2-normalised token features of the tuned and the frozen zero-shot visual tower."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from saeft.config import NonNegFloat, Schema
from saeft.methods.registry import register
from saeft.methods.base import Method, MethodParams, penalty_weight


@dataclasses.dataclass
class LdifsParams(MethodParams):
    """LDIFS's hyper-parameters (config key ``methods.ldifs``)."""

    section = "methods.ldifs"
    lam: NonNegFloat = penalty_weight(10.0)
    """Weight of the regulariser R in CE + lambda * R."""
    taps: Annotated[list[Annotated[str, Schema(min_length=1)]], Schema(min_items=1)] | None = None
    """Modules of the visual tower whose outputs are compared (e.g. transformer.resblocks.3,
    layer2); null: every block."""


METHOD = register(Method(name="ldifs", label="LDIFS", params=LdifsParams, needs=frozenset({"encoder_copy"}),
                         summary="LDIFS: lambda * distance of L2-normalised block features"))
