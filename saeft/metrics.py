"""Evaluation-set hooks on logits and the metrics the evaluator reports.

The evaluator computes the classifier's logits over its head's classes, then
:func:`eval_logits` applies the eval set's hook (a class sub-list keeps those columns; a
projection takes, per eval-set class, the maximum logit over its head classes), and the eval set's
metric scores the predictions: :func:`top1`, :func:`macro_f1` (over the classes present in the
targets, as WILDS reports iWildCam), :func:`group_accuracies` / worst-group accuracy (FMoW regions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from saeft.data.registry import EvalSet


def eval_logits(logits: torch.Tensor, hooks: EvalSet) -> torch.Tensor:
    """Logits over the eval set's classes from logits over the head's classes."""
    if hooks.class_subset is not None:
        return logits[:, list(hooks.class_subset)]
    if hooks.projection is not None:
        return torch.stack([logits[:, list(group)].amax(dim=1) for group in hooks.projection], dim=1)
    return logits


def top1(predicted: np.ndarray, target: np.ndarray) -> float:
    """Fraction of predictions equal to the target."""
    return float((predicted == target).mean()) if len(target) else 0.0


def macro_f1(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean F1 over the classes that occur in ``target`` (a class only predicted counts as a false
    positive of the others, not as a class of its own)."""
    classes = np.unique(target)
    if len(classes) == 0:
        return 0.0
    scores = []
    for c in classes:
        tp = int(((predicted == c) & (target == c)).sum())
        fp = int(((predicted == c) & (target != c)).sum())
        fn = int(((predicted != c) & (target == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def group_accuracies(predicted: np.ndarray, target: np.ndarray, groups: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Accuracy and count per group name (groups without samples are left out)."""
    result = {}
    for index, name in enumerate(names):
        mask = groups == index
        if mask.any():
            result[name] = {"accuracy": top1(predicted[mask], target[mask]), "n": int(mask.sum())}
    return result


def worst_group_accuracy(per_group: dict[str, dict[str, Any]], exclude: Sequence[str] = ()) -> float:
    """The lowest accuracy over the groups, leaving out ``exclude`` (FMoW: 'Other')."""
    kept = [v["accuracy"] for name, v in per_group.items() if name not in exclude]
    if not kept:
        raise ValueError(f"no group left to take the worst of (groups: {', '.join(per_group) or 'none'}; excluded: {', '.join(exclude)})")
    return min(kept)
