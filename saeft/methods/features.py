"""Feature distillation to the zero-shot embedding f_0: ``feat_mse`` (``lambda * mean((f_theta -
f_0)^2)``) and ``feat_l1`` (``lambda * mean(|f_theta - f_0|)``), means over batch x dim."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from saeft.config import NonNegFloat
from saeft.methods.registry import register
from saeft.methods.base import Method, MethodParams, penalty_weight

if TYPE_CHECKING:
    import torch


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


def feature_mse(f_theta: torch.Tensor, f_0: torch.Tensor) -> torch.Tensor:
    """``mean((f_theta - f_0)^2)`` over batch x dim."""
    return (f_theta - f_0).pow(2).mean()


def feature_l1(f_theta: torch.Tensor, f_0: torch.Tensor) -> torch.Tensor:
    """``mean(|f_theta - f_0|)`` over batch x dim."""
    return (f_theta - f_0).abs().mean()


def mse_penalty(_ctx: Any, batch: Any) -> dict[str, torch.Tensor]:
    return {"total": feature_mse(batch.f_theta, batch.f_0)}


def l1_penalty(_ctx: Any, batch: Any) -> dict[str, torch.Tensor]:
    return {"total": feature_l1(batch.f_theta, batch.f_0)}


FEAT_MSE = register(Method(name="feat_mse", label="Feature MSE", params=FeatMseParams, needs=frozenset({"teacher"}),
                           penalty=mse_penalty, summary="lambda * mean((f_theta - f_0)^2)"))
FEAT_L1 = register(Method(name="feat_l1", label="Feature L1", params=FeatL1Params, needs=frozenset({"teacher"}),
                          penalty=l1_penalty, summary="lambda * mean(|f_theta - f_0|)"))
