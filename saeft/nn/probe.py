"""The converged linear probe of LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can Distort
Pretrained Features"): a multinomial logistic regression of the classifier's head on the frozen
zero-shot embeddings of the training split, fitted to convergence before end-to-end fine-tuning.

The head is :class:`saeft.nn.models.ImageClassifier`'s: logits ``W @ normalize(f)`` with ``W`` of
shape (classes, d) and no bias, the zero-shot head being the logit scale times unit class
vectors. The probe fits ``W`` in exactly that form, so the fitted weight replaces the head as is.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TOLERANCE_GRAD = 1e-6
"""L-BFGS stops once the largest absolute gradient entry of the objective is below this."""
TOLERANCE_CHANGE = 1e-10
"""L-BFGS stops once the objective (or a step) changes by less than this."""
HISTORY = 20
"""Curvature pairs L-BFGS keeps (its memory)."""


@dataclasses.dataclass
class HeadFit:
    """A fitted head and how the fit went."""

    weight: torch.Tensor
    """The fitted head (classes, d), float32, on the features' device."""
    record: dict[str, float]
    """``loss`` (the final objective), ``ce`` (its cross-entropy part), ``train_top1`` (accuracy of
    the fitted head on the fitted embeddings), the same three of the starting head as
    ``init_loss``, ``init_ce``, ``init_train_top1``, ``iterations``, ``evaluations``,
    ``converged`` (1.0 when L-BFGS stopped on a tolerance before the iteration budget),
    ``weight_norm`` (mean row norm: the head's logit scale) and ``seconds``."""


def _objective(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, cross-entropy): mean CE of ``x @ W.T`` plus ``weight_decay / 2 * ||W||_F^2``."""
    ce = F.cross_entropy(x @ weight.T, y)
    return ce + 0.5 * weight_decay * weight.square().sum(), ce


@torch.no_grad()
def _scores(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float, prefix: str = "") -> dict[str, float]:
    loss, ce = _objective(weight, x, y, weight_decay)
    top1 = (x @ weight.T).argmax(-1).eq(y).float().mean()
    return {f"{prefix}loss": float(loss), f"{prefix}ce": float(ce), f"{prefix}train_top1": float(top1)}


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, init: torch.Tensor, weight_decay: float, steps: int) -> HeadFit:
    """Fit the head to the embeddings ``features`` (N, d, as the visual tower returns them) and
    their ``labels``: minimise over ``W`` (classes, d)

        mean_i CE(W @ normalize(f_i), y_i) + weight_decay / 2 * ||W||_F^2

    by full-batch L-BFGS (strong Wolfe line search) from ``init`` (the zero-shot head), for at
    most ``steps`` iterations or until the gradient or the objective stops moving
    (:data:`TOLERANCE_GRAD`, :data:`TOLERANCE_CHANGE`). With ``weight_decay > 0`` the problem is
    strictly convex: its single minimum does not depend on the start, which only saves iterations
    (and decides the result when the budget runs out first). No randomness and the full batch:
    the same inputs on the same device give the same head. The full batch lives on the features'
    device: N x (d + classes) floats a few times over (ImageNet with a ViT-B: about 20 GB)."""
    started = time.monotonic()
    x = F.normalize(features.detach().float(), dim=-1)
    y = labels.to(x.device).long()
    weight = init.detach().to(x.device, torch.float32).clone().requires_grad_(True)
    before = _scores(weight, x, y, weight_decay, "init_")
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=steps, history_size=HISTORY, line_search_fn="strong_wolfe",
                                  tolerance_grad=TOLERANCE_GRAD, tolerance_change=TOLERANCE_CHANGE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = _objective(weight, x, y, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():  # the caller may hold no_grad; the fit needs its gradient
        optimizer.step(closure)
    state = optimizer.state[weight]
    iterations, evaluations = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    # Neither budget (iterations, and LBFGS's default 5/4 as many evaluations) ran out: a tolerance stopped it.
    converged = iterations < steps and evaluations < steps * 5 // 4
    record = {**_scores(weight, x, y, weight_decay), **before, "iterations": float(iterations),
              "evaluations": float(evaluations), "converged": float(converged),
              "weight_norm": float(weight.detach().norm(dim=-1).mean()), "seconds": time.monotonic() - started}
    logger.info("linear probe: %d L-BFGS iterations, loss %.4g -> %.4g, train top-1 %.3f -> %.3f%s", iterations,
                record["init_loss"], record["loss"], record["init_train_top1"], record["train_top1"],
                "" if converged else " (budget reached before convergence)")
    return HeadFit(weight=weight.detach(), record=record)
