"""``l2sp``: ``CE + lambda * sum ||theta - theta_0||^2`` over the visual tower's trainable weights
(theta_0: the zero-shot weights)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from saeft.config import NonNegFloat
from saeft.methods.registry import register
from saeft.methods.base import Method, MethodParams, penalty_weight

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass
class L2spParams(MethodParams):
    """L2-SP's hyper-parameters (config key ``methods.l2sp``)."""

    section = "methods.l2sp"
    lam: NonNegFloat = penalty_weight(0.01)
    """Weight of the regulariser R in CE + lambda * R."""


def l2sp_penalty(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum ||theta - theta_0||^2`` over the given tensors."""
    return sum((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True))


def setup(ctx: Any) -> None:
    """Anchor every trainable weight of the visual tower at its zero-shot value."""
    ctx.state["anchored"] = [p for p in ctx.visual.parameters() if p.requires_grad]
    ctx.state["anchors"] = [p.detach().clone() for p in ctx.state["anchored"]]


def penalty(ctx: Any, _batch: Any) -> dict[str, torch.Tensor]:
    """R: the squared distance of the anchored weights to their anchors."""
    return {"total": l2sp_penalty(ctx.state["anchored"], ctx.state["anchors"])}


METHOD = register(Method(name="l2sp", label="L2-SP", params=L2spParams, setup=setup, penalty=penalty,
                         summary="L2-SP: lambda * ||theta - theta_0||^2 over the visual tower"))
