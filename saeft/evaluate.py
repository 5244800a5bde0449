"""Stage ``evaluate``: a model's metric on one evaluation split of a dataset.

One evaluator serves every dataset: it asks the registry for the split, runs the classifier, and
reports the dataset's metric with the sample count and per-class counts, so tables can be rebuilt
and re-weighted from the JSON alone. A WiSE-FT model is interpolated here, in memory, from the
fine-tuned and zero-shot weights (:func:`load_wiseft`); it is never written to disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from saeft.config import StageConfig, require
from saeft.data.registry import get_dataset
from saeft.finetune import interpolate_weights
from saeft.io import write_json
from saeft.models import ImageClassifier, classifier_from_zeroshot, load_classifier, preprocess_for
from saeft.training import Progress, setup_torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvaluateConfig(StageConfig):
    """Evaluation settings (config key ``evaluate``)."""

    batch_size: int = 256
    """Images per forward pass."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "evaluate.batch_size", "must be at least 1")


def load_model(model: str | os.PathLike, head: str | os.PathLike | None) -> ImageClassifier:
    """A fine-tuned classifier file, or (with ``head``) a zero-shot CLIP plus its head."""
    if head is not None:
        return classifier_from_zeroshot(model, head)[0]
    return load_classifier(model)[0]


def load_wiseft(model: str | os.PathLike, zeroshot_model: str | os.PathLike, zeroshot_head: str | os.PathLike, alpha: float) -> ImageClassifier:
    """WiSE-FT: the fine-tuned classifier ``model`` with weights ``(1 - alpha) * theta_0 + alpha *
    theta_ft``, head included; built in memory, never stored."""
    tuned = load_classifier(model)[0]
    zeroshot = classifier_from_zeroshot(zeroshot_model, zeroshot_head)[0]
    tuned.load_state_dict(interpolate_weights(zeroshot.state_dict(), tuned.state_dict(), alpha))
    return tuned.eval()


@torch.no_grad()
def predict(model: ImageClassifier, data: torch.utils.data.Dataset, batch_size: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of every item of ``data``."""
    model.eval()
    predictions, targets = [], []
    progress = Progress(len(data), label)
    for images, labels in torch.utils.data.DataLoader(data, batch_size=batch_size):
        predictions.append(model(images)[0].argmax(-1))
        targets.append(labels)
        progress.update(sum(len(t) for t in targets))
    return torch.cat(predictions), torch.cat(targets)


def run(
    model: str | os.PathLike,
    head: str | os.PathLike | None,
    dataset: str,
    split: str,
    dataset_options: Any,
    cfg: EvaluateConfig,
    out: str | os.PathLike,
    identity: dict[str, Any],
    wiseft: tuple[str | os.PathLike, str | os.PathLike, float] | None = None,
) -> dict[str, Any]:
    """Evaluate and write the result JSON; ``identity`` holds study, model, method and seed.
    ``wiseft``: (zero-shot model, zero-shot head, alpha) to evaluate the interpolation of
    ``model`` with the zero-shot model instead of ``model`` itself."""
    setup_torch(0)
    classifier = load_wiseft(model, *wiseft) if wiseft is not None else load_model(model, head)
    spec = get_dataset(dataset)
    data = spec.load(split, preprocess_for(classifier.visual), dataset_options)
    predicted, target = predict(classifier, data, cfg.batch_size, f"evaluate {dataset}/{split}")
    n_classes = len(spec.classnames)
    total = torch.bincount(target, minlength=n_classes)
    correct = torch.bincount(target[predicted == target], minlength=n_classes)
    result = {
        **identity,
        "dataset": dataset,
        "evalset": split,
        "role": spec.role(split),
        "metric": spec.metric,
        "value": float(correct.sum()) / max(len(target), 1),
        "n": len(target),
        "per_class": {"correct": correct.tolist(), "total": total.tolist()},
        "classnames": list(spec.classnames),
    }
    write_json(out, result)
    logger.info("%s/%s %s: %s = %.4f (n=%d)", dataset, split, identity.get("method"), spec.metric, result["value"], len(target))
    return result
