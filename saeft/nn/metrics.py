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
    if len(target) == 0:
        return 0.0
    return float(macro_f1_rows(np.asarray(predicted), np.asarray(target), np.arange(len(target))[None])[0])


def macro_f1_rows(predicted: np.ndarray, target: np.ndarray, indices: np.ndarray, chunk: int = 256) -> np.ndarray:
    """:func:`macro_f1` of each row of ``indices`` [B, n] (the images of one bootstrap resample),
    from per-row class counts: F1 of class c is 2 tp / (predicted c + true c), averaged over the
    classes present in the row's targets. Rows are counted ``chunk`` at a time (one bincount of
    chunk x classes each), so no confusion matrix is built."""
    labels, codes = np.unique(np.concatenate([np.asarray(target).ravel(), np.asarray(predicted).ravel()]), return_inverse=True)
    n_classes = len(labels)
    true_code, predicted_code = codes[: len(target)], codes[len(target):]
    hit = true_code == predicted_code
    scores = np.empty(len(indices), dtype=np.float64)
    for start in range(0, len(indices), chunk):
        rows = np.asarray(indices[start:start + chunk])
        offset = np.arange(len(rows))[:, None] * n_classes
        size = len(rows) * n_classes
        true_cells = (offset + true_code[rows]).ravel()
        true_count = np.bincount(true_cells, minlength=size).reshape(len(rows), n_classes)
        predicted_count = np.bincount((offset + predicted_code[rows]).ravel(), minlength=size).reshape(len(rows), n_classes)
        tp = np.bincount(true_cells, weights=hit[rows].ravel(), minlength=size).reshape(len(rows), n_classes)
        present = true_count > 0
        f1 = np.divide(2 * tp, true_count + predicted_count, out=np.zeros_like(tp), where=present)
        scores[start:start + len(rows)] = f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return scores


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
