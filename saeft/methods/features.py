"""Feature distillation to the zero-shot embedding f_0: ``feat_mse`` (``lambda * mean((f_theta -
f_0)^2)``) and ``feat_l1`` (``lambda * mean(|f_theta - f_0|)``), means over batch x dim."""

from __future__ import annotations

import dataclasses

from saeft.config import NonNegFloat
from saeft.methods.registry import register
from saeft.methods.base import Method, MethodParams, penalty_weight


@dataclasses.dataclass
class FeatMseParams(MethodParams):
    """Feature-MSE's hyper-parameters (config key ``methods.feat_mse``)."""

    section = "methods.feat_mse"
    lam: NonNegFloat = penalty_weight(10.0)
    """Weight of the regulariser R in CE + lambda * R."""


@dataclasses.dataclass
class FeatL1Params(MethodParams):
    """Feature-L1's hyper-parameters (config key ``methods.feat_l1``)."""

    section = "methods.feat_l1"
    lam: NonNegFloat = penalty_weight(1.0)
    """Weight of the regulariser R in CE + lambda * R."""


FEAT_MSE = register(Method(name="feat_mse", label="Feature MSE", params=FeatMseParams, needs=frozenset({"teacher"}),
                           summary="lambda * mean((f_theta - f_0)^2)"))
FEAT_L1 = register(Method(name="feat_l1", label="Feature L1", params=FeatL1Params, needs=frozenset({"teacher"}),
                          summary="lambda * mean(|f_theta - f_0|)"))
