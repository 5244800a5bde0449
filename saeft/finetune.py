"""Stage ``finetune``: fine-tune the zero-shot classifier on a dataset's training split.

Methods (DESIGN section 3) implemented here: ``ft`` (end-to-end, no regulariser) and the SAE-FT
family, whose regulariser is :func:`saeft.regularizers.sae_penalty` with some weights at zero:
``sae_sparse`` (code distance), ``sae_add`` (no new features) and ``saeft`` (add and remove).
The loss is ``CE + lambda * R``; the classifier head starts from the zero-shot text head.

Training state (model, optimizer, scheduler, RNG, data order) is checkpointed after each epoch
beside the outputs, never in them; a killed job resumes from it and ends with the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saeft.config import ConfigError, StageConfig, require
from saeft.data.registry import get_dataset
from saeft.io import write_json
from saeft.models import classifier_from_zeroshot, preprocess_for, save_classifier
from saeft.regularizers import sae_penalty
from saeft.sae import load_sae
from saeft.training import CHECKPOINT_NAME, Progress, resume_checkpoint, save_checkpoint, setup_torch, warmup_cosine

logger = logging.getLogger(__name__)

# Each method's hyper-parameters and their defaults (public reference code).
METHOD_PARAMS: dict[str, dict[str, float]] = {
    "ft": {},
    "sae_sparse": {"lambda": 70.0, "lambda_l1": 1e-3, "mu": 1.0},
    "sae_add": {"lambda": 70.0, "lambda_add": 10.0, "mu": 1.0},
    "saeft": {"lambda": 70.0, "lambda_add": 10.0, "lambda_remove": 0.02, "mu": 1.0},
}
SAE_METHODS = frozenset({"sae_sparse", "sae_add", "saeft"})


@dataclasses.dataclass
class FinetuneConfig(StageConfig):
    """Fine-tuning of one method (config keys ``finetune`` and ``methods.<method>``)."""

    method: str = "ft"
    """Method name; one of :data:`METHOD_PARAMS`."""
    method_params: dict[str, float] = dataclasses.field(default_factory=dict)
    """The method's own hyper-parameters (``methods.<method>``); missing ones take defaults."""
    epochs: int = 10
    """Passes over the training split; the cosine schedule spans exactly these epochs."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    warmup_steps: int = 500
    """Linear warm-up steps before the cosine decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 disables clipping)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    seed: int = 0
    """Seed of data order and any randomness in training."""

    def __post_init__(self) -> None:
        require(self.method in METHOD_PARAMS, "methods", f"unknown method {self.method!r}; known: {', '.join(METHOD_PARAMS)}")
        allowed = METHOD_PARAMS[self.method]
        for key, value in self.method_params.items():
            require(key in allowed, f"methods.{self.method}.{key}",
                    f"not a hyper-parameter of {self.method} (allowed: {', '.join(allowed) or 'none'})")
            require(value >= 0, f"methods.{self.method}.{key}", f"must be non-negative, got {value}")
        self.method_params = {**allowed, **self.method_params}
        require(self.epochs >= 1, "finetune.epochs", "must be at least 1")
        require(self.batch_size >= 1, "finetune.batch_size", "must be at least 1")
        require(self.lr > 0, "finetune.lr", "must be positive")
        require(self.weight_decay >= 0, "finetune.weight_decay", "must be non-negative")
        require(self.warmup_steps >= 0, "finetune.warmup_steps", "must be non-negative")
        require(self.grad_clip >= 0, "finetune.grad_clip", "must be non-negative")
        require(0 <= self.label_smoothing < 1, "finetune.label_smoothing", "must lie in [0, 1)")


def regularizer(cfg: FinetuneConfig, sae: torch.nn.Module | None) -> Any:
    """The method's ``R(f_theta, f_0) -> dict of terms with 'total'``, or None for plain FT."""
    if cfg.method not in SAE_METHODS:
        return None
    if sae is None:
        raise ConfigError(f"methods.{cfg.method}: needs an SAE but none was given")
    p = cfg.method_params
    weights = {k: p.get(k, 0.0) for k in ("lambda_add", "lambda_remove", "lambda_l1", "mu")}
    return lambda f_theta, f_0: sae_penalty(f_theta, f_0, sae, **weights)


def run(
    zeroshot_model: str | os.PathLike,
    head: str | os.PathLike,
    dataset: str,
    dataset_options: Any,
    cfg: FinetuneConfig,
    out_model: str | os.PathLike,
    out_json: str | os.PathLike,
    sae_path: str | os.PathLike | None = None,
    on_epoch: Any = None,
) -> dict[str, Any]:
    """Fine-tune and write ``out_model`` (safetensors) and ``out_json`` (config and history)."""
    generator = setup_torch(cfg.seed)
    model, arch = classifier_from_zeroshot(zeroshot_model, head)
    preprocess = preprocess_for(model.visual)
    spec = get_dataset(dataset)
    train = spec.load(spec.train_split, preprocess, dataset_options)
    heldout = spec.load(spec.heldout_split, preprocess, dataset_options)
    sae = load_sae(sae_path) if sae_path else None
    reg = regularizer(cfg, sae)
    teacher = None
    if reg is not None:  # the frozen zero-shot encoder f_0
        teacher = copy.deepcopy(model.visual).eval().requires_grad_(False)

    # Training reads the evaluation transform: deterministic views, as in the reference code.
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train) > cfg.batch_size, generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(loader)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    checkpoint = Path(out_model).with_name(CHECKPOINT_NAME)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    saved = resume_checkpoint(checkpoint, cfg.to_dict(), parts)
    history: list[dict[str, float]] = []
    if saved is not None:
        generator.set_state(saved["generator"])
        history.extend(saved["history"])
    start_epoch = len(history)
    progress = Progress(total_steps, f"finetune {dataset}/{cfg.method}/seed{cfg.seed}")
    lam = cfg.method_params.get("lambda", 0.0)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        started = time.monotonic()
        for step, (images, labels) in enumerate(loader, start=1):
            logits, features = model(images)
            ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            loss, terms = ce, {"ce": ce.detach()}
            if reg is not None:
                with torch.no_grad():
                    f_0 = teacher(images)
                penalty = reg(features, f_0)
                loss = ce + lam * penalty["total"]
                terms.update({f"reg_{k}": v.detach() for k, v in penalty.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            terms["loss"] = loss.detach()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            progress.update(epoch * len(loader) + step, loss=float(terms["loss"]))
        record = {key: value / len(loader) for key, value in sums.items()}
        record.update(epoch=epoch + 1, lr=scheduler.get_last_lr()[0], seconds=time.monotonic() - started,
                      heldout_top1=accuracy(model, heldout, cfg.batch_size * 4))
        history.append(record)
        logger.info("epoch %d/%d %s", epoch + 1, cfg.epochs, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
        if on_epoch is not None:
            on_epoch(record)
        save_checkpoint(checkpoint, cfg.to_dict(), parts, {"generator": generator.get_state(), "history": history})

    save_classifier(out_model, model.eval(), arch, {"method": cfg.method, "seed": cfg.seed, "dataset": dataset})
    summary = {"config": cfg.to_dict(), "dataset": dataset, "arch": arch, "steps": total_steps,
               "sae": str(sae_path) if sae_path else None, "history": history,
               "final": history[-1] if history else {}}
    write_json(out_json, summary)
    checkpoint.unlink(missing_ok=True)
    return summary["final"]


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: torch.utils.data.Dataset, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    model.eval()
    correct = 0
    for images, labels in torch.utils.data.DataLoader(data, batch_size=batch_size):
        correct += int((model(images)[0].argmax(-1) == labels).sum())
    return correct / max(len(data), 1)


def interpolate_weights(
    state_0: Mapping[str, torch.Tensor], state_ft: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) * theta_0 + alpha * theta_ft`` for every floating-point tensor."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if set(state_0) != set(state_ft):
        raise ValueError(f"state dicts differ in keys: {sorted(set(state_0) ^ set(state_ft))[:5]}")
    mixed = {}
    for key, theta_0 in state_0.items():
        theta_ft = state_ft[key]
        if theta_0.shape != theta_ft.shape:
            raise ValueError(f"{key}: shapes {tuple(theta_0.shape)} and {tuple(theta_ft.shape)} differ")
        mixed[key] = torch.lerp(theta_0, theta_ft, alpha) if theta_0.is_floating_point() else theta_ft.clone()
    return mixed
