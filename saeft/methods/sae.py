"""The SAE regularisers (``saeft.nn.regularizers.sae_penalty`` with some weights at zero):
``sae_sparse`` (lambda_l1, mu), ``sae_add`` (lambda_add, mu) and ``saeft`` (lambda_add,
lambda_remove, mu); the loss is ``CE + lambda * penalty``."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Literal

from saeft.config import NonNegFloat, Schema
from saeft.methods.base import Method, MethodParams, penalty_weight
from saeft.methods.registry import register

if TYPE_CHECKING:
    import torch

SaeInputs = Literal["prepared", "raw"]


@dataclasses.dataclass
class SaeParams(MethodParams):
    """Keys every SAE method has."""

    sae: Annotated[str, Schema(min_length=1)] | None = None
    """Name of an SAE in sae.sweep to regularise with (null: the main sae: SAE). An input of the
    job, not a training key."""
    lam: NonNegFloat = penalty_weight(70.0)
    """Weight of the regulariser R in CE + lambda * R."""
    mu: NonNegFloat = 1.0
    """Weight of the residual alignment term."""
    sae_inputs: SaeInputs = "prepared"
    """Scale convention of the penalty (docs/penalty_scale.md): prepared, the SAE encodes the
    embeddings normalised as it was trained (unit norm); raw, the raw embeddings, as the public
    reference code (feature terms then grow with the embedding norm rho, the alignment term with
    rho**2)."""


@dataclasses.dataclass
class SaeSparseParams(SaeParams):
    """sae_sparse's hyper-parameters (config key ``methods.sae_sparse``)."""

    section = "methods.sae_sparse"
    lambda_l1: NonNegFloat = 1e-3
    """L1 distance between fine-tuned and zero-shot codes."""


@dataclasses.dataclass
class SaeAddParams(SaeParams):
    """sae_add's hyper-parameters (config key ``methods.sae_add``)."""

    section = "methods.sae_add"
    lambda_add: NonNegFloat = 10.0
    """Penalty on features absent from the zero-shot code."""


@dataclasses.dataclass
class SaeftParams(SaeAddParams):
    """SAE-FT's hyper-parameters (config key ``methods.saeft``)."""

    section = "methods.saeft"
    lambda_remove: NonNegFloat = 0.02
    """Penalty on zero-shot features that weaken."""


WEIGHTS = ("lambda_add", "lambda_remove", "lambda_l1", "mu")
"""The weights of :func:`saeft.nn.regularizers.sae_penalty`; a method without one weighs it zero."""


def penalty(ctx: Any, batch: Any) -> dict[str, torch.Tensor]:
    """R: :func:`saeft.nn.regularizers.sae_penalty` of f_theta against f_0 with this method's
    weights; logs rho, the mean teacher embedding norm (docs/penalty_scale.md), as ``f0_norm``."""
    from saeft.nn.regularizers import sae_penalty

    weights = {k: float(getattr(ctx.params, k, 0.0)) for k in WEIGHTS}
    terms = sae_penalty(batch.f_theta, batch.f_0, ctx.sae, inputs=ctx.params.sae_inputs, **weights)
    batch.terms["f0_norm"] = batch.f_0.norm(dim=-1).mean().detach()  # rho of docs/penalty_scale.md
    return terms


_NEEDS = frozenset({"teacher", "sae"})
SAE_SPARSE = register(Method(name="sae_sparse", label="SAE sparse", params=SaeSparseParams, needs=_NEEDS, penalty=penalty,
                             summary="SAE codes kept close in L1, residual aligned"))
SAE_ADD = register(Method(name="sae_add", label="SAE add", params=SaeAddParams, needs=_NEEDS, penalty=penalty,
                          summary="SAE features absent from the zero-shot code penalised, residual aligned"))
SAEFT = register(Method(name="saeft", label="SAE-FT", params=SaeftParams, needs=_NEEDS, penalty=penalty,
                        summary="SAE-FT: added features and weakened zero-shot features penalised, residual aligned"))
