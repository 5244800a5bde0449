"""``lpft``: LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features"), a
linear probe, then end-to-end fine-tuning from the probed head.

``probe: converge`` (the reference protocol, the default): before any training step the head is
fitted to convergence on the frozen zero-shot embeddings of the training split (a multinomial
logistic regression, :func:`saeft.nn.probe.fit_linear_head`, through the ``fit_head`` hook), then
``finetune.epochs`` of end-to-end fine-tuning start from it with the study's ``finetune.lr`` and
its warm-up and cosine schedule. ``probe: epochs`` (the earlier protocol): ``lp_epochs`` epochs
of head-only training with the encoder frozen, then ``finetune.epochs`` end to end, all under one
warm-up and cosine schedule."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from saeft.config import PositiveFloat, PositiveInt
from saeft.methods.base import Method, MethodParams
from saeft.methods.registry import register

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass
class LpftParams(MethodParams):
    """LP-FT's hyper-parameters (config key ``methods.lpft``)."""

    section = "methods.lpft"
    probe: Literal["converge", "epochs"] = "converge"
    """How the head is probed before end-to-end fine-tuning: converge (the reference protocol: a
    logistic regression of the head fitted to convergence on the frozen zero-shot training
    embeddings, then finetune.epochs end to end) or epochs (lp_epochs head-only epochs with the
    encoder frozen, then finetune.epochs end to end, one schedule over both)."""
    lp_epochs: PositiveInt = 2
    """probe: epochs only: head-only epochs before the finetune.epochs of full fine-tuning."""
    probe_steps: PositiveInt = 1000
    """probe: converge only: the most full-batch L-BFGS iterations of the probe (it stops earlier
    once converged; train.json's head_fit says whether it did)."""
    probe_weight_decay: PositiveFloat = 1e-4
    """probe: converge only: L2 penalty of the probe, weight_decay / 2 * ||W||^2 added to the mean
    cross-entropy (W: the head on unit-norm embeddings). Positive, so the problem is strictly
    convex and its minimum unique; smaller values give a sharper (larger-norm) head."""


def probing(params: LpftParams, epoch: int) -> bool:
    """``probe: epochs``: the first ``lp_epochs`` epochs probe; a converged probe needs none."""
    return params.probe == "epochs" and epoch < params.lp_epochs


def extra_epochs(params: LpftParams) -> int:
    """``probe: epochs``: the probing epochs come on top of ``finetune.epochs``."""
    return params.lp_epochs if params.probe == "epochs" else 0


def fits_head(params: LpftParams) -> bool:
    """Only ``probe: converge`` fits the head before training."""
    return params.probe == "converge"


def fit_head(ctx: Any, classifier: Any, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Replace ``classifier.head`` with the converged linear probe of ``features`` (the frozen
    zero-shot embeddings of the training images) and ``labels``, started from the zero-shot head;
    returns the fit's record (:class:`saeft.nn.probe.HeadFit`)."""
    import torch

    from saeft.nn.probe import fit_linear_head

    head = classifier.head
    fit = fit_linear_head(features, labels, head.weight, ctx.params.probe_weight_decay, ctx.params.probe_steps)
    with torch.no_grad():
        head.weight.copy_(fit.weight)
    return fit.record


METHOD = register(Method(name="lpft", label="LP-FT", params=LpftParams, probing=probing, extra_epochs=extra_epochs,
                         fit_head=fit_head, fits_head=fits_head,
                         summary="linear probe, then end-to-end fine-tuning from the probed head"))
