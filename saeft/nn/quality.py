"""The quality record of a pretrained CLIP, and the gate that keeps a study off a failed one.

``pretrain_clip`` measures its model before any study uses it: zero-shot top-1 on the ID
held-out split, the ID test split and every shift of the pretraining dataset, and the top-1 of a
linear probe fitted on the ID training embeddings and scored on the ID test split (how much the
embedding knows, whatever the prompts). ``prepare_model`` refuses a model whose zero-shot
held-out accuracy is below ``pretrain.min_zeroshot_acc``, naming the value and the key, so no
study runs on a pretraining that did not learn.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saeft.config import ConfigError
from saeft.data.registry import get_dataset
from saeft.nn.models import preprocess_for, zeroshot_head

logger = logging.getLogger(__name__)

PROBE_STEPS = 300
"""Full-batch AdamW steps of the linear probe (a convex problem on a few thousand embeddings)."""


@torch.no_grad()
def embed_split(visual: nn.Module, data: torch.utils.data.Dataset, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image embeddings and labels of a whole split."""
    features, labels = [], []
    for images, targets in torch.utils.data.DataLoader(data, batch_size=batch_size):
        features.append(F.normalize(visual(images), dim=-1))
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def linear_probe_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                          n_classes: int, seed: int = 0) -> float:
    """Top-1 on ``test`` of a multinomial logistic regression fitted on ``train`` (embeddings,
    labels), weight decay 1e-4, deterministic for a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    x, y = train
    probe = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(probe(x * 10.0), y).backward()  # unit-norm inputs: scale so logits can grow
        optimizer.step()
    with torch.no_grad():
        return float((probe(test[0] * 10.0).argmax(-1) == test[1]).float().mean())


def measure(model: nn.Module, arch: str, dataset: str, options: Any) -> dict[str, Any]:
    """The quality record of CLIP ``model`` on ``dataset`` (loaded with ``options``)."""
    spec = get_dataset(dataset)
    model.eval()
    preprocess = preprocess_for(model)
    head = zeroshot_head(model, arch, spec.classnames, spec.templates)
    splits = dict.fromkeys((spec.heldout_split, *spec.eval_splits))
    embedded = {split: embed_split(model.visual, spec.load(split, preprocess, options)) for split in splits}
    zeroshot = {split: float(((x @ head.T).argmax(-1) == y).float().mean()) for split, (x, y) in embedded.items()}
    train = embed_split(model.visual, spec.load(spec.train_split, preprocess, options))
    probe = linear_probe_accuracy(train, embedded[spec.id_eval], len(spec.classnames))
    record = {
        "dataset": dataset,
        "heldout_split": spec.heldout_split,
        "id_eval": spec.id_eval,
        "zeroshot_top1": zeroshot,
        "zeroshot_ood_mean": sum(zeroshot[s] for s in spec.ood_evals) / max(len(spec.ood_evals), 1),
        "linear_probe_top1": probe,
        "chance": 1.0 / len(spec.classnames),
    }
    logger.info("quality of the pretrained model on %s: zero-shot %s; linear probe on %s %.3f", dataset,
                " ".join(f"{s}={v:.3f}" for s, v in zeroshot.items()), spec.id_eval, probe)
    return record


def check(path: str | os.PathLike, min_zeroshot_acc: float) -> dict[str, Any]:
    """Read the quality record at ``path`` and refuse a model below the threshold; returns the
    record. The error names the measured value, the split and the config key."""
    with open(path) as handle:
        record = json.load(handle)
    split = record["heldout_split"]
    value = record["zeroshot_top1"][split]
    if value < min_zeroshot_acc:
        raise ConfigError(
            f"pretrain.min_zeroshot_acc: the pretrained model's zero-shot top-1 on {record['dataset']}/{split} is "
            f"{value:.3f} (chance {record['chance']:.3f}), below pretrain.min_zeroshot_acc = {min_zeroshot_acc}; "
            f"the pretraining failed, so no study runs on it (quality record: {path}). Pretrain longer or with "
            "another pretrain.lr, or lower the threshold knowingly.")
    logger.info("zero-shot top-1 on %s/%s %.3f >= pretrain.min_zeroshot_acc %.3f", record["dataset"], split, value, min_zeroshot_acc)
    return record
