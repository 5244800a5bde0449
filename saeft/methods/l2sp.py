"""``l2sp``: ``CE + lambda * sum ||theta - theta_0||^2`` over the visual tower's trainable weights
(theta_0: the zero-shot weights)."""

from __future__ import annotations

import dataclasses

from saeft.config import NonNegFloat
from saeft.methods.registry import register
from saeft.methods.base import Method, MethodParams, penalty_weight


@dataclasses.dataclass
class L2spParams(MethodParams):
    """L2-SP's hyper-parameters (config key ``methods.l2sp``)."""

    section = "methods.l2sp"
    lam: NonNegFloat = penalty_weight(0.01)
    """Weight of the regulariser R in CE + lambda * R."""


METHOD = register(Method(name="l2sp", label="L2-SP", params=L2spParams,
                         summary="L2-SP: lambda * ||theta - theta_0||^2 over the visual tower"))
