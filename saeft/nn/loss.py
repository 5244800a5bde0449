"""The loss of one training batch, shared by every method: the task loss (cross-entropy unless
the method brings its own) plus ``lambda`` times the method's penalty, through the hooks of its
registry entry (:mod:`saeft.methods.base`); no method is named here."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saeft.config import ConfigError
from saeft.config.finetune import FinetuneConfig
from saeft.methods import Method, get_method


@dataclasses.dataclass
class Context:
    """What a method's loss needs besides the batch (built once per run by :func:`build_context`)."""

    cfg: FinetuneConfig
    model: Any
    """The trained module (the classifier, or what the method's ``build_trained`` returned),
    called as ``model(images) -> (logits, image embedding)``."""
    sae: nn.Module | None = None
    teacher: nn.Module | None = None
    """A frozen copy of the visual tower (a live teacher, or the method's ``encoder_copy``)."""
    visual: nn.Module | None = None
    """The trained visual tower."""
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The method's own objects (anchors, forward hooks), made by its ``setup``."""
    method: Method | None = None
    """The registry entry of ``cfg.method`` (looked up when not given)."""
    params: Any = None
    """``cfg.params``: the method's hyper-parameters as its dataclass (parsed once)."""

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = get_method(self.cfg.method)
        if self.params is None:
            self.params = self.cfg.params


@dataclasses.dataclass
class Batch:
    """One batch as a method's hooks see it."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor
    """The tuned image embeddings (as the model returned them)."""
    f_0: torch.Tensor | None = None
    """Teacher embeddings (float32) for a method that needs ``teacher``; else the cached rows, if any."""
    f_theta: torch.Tensor | None = None
    """``features`` in float32, for a method that needs ``teacher``."""
    terms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Logged values of this batch (detached)."""


@dataclasses.dataclass
class Towers:
    """What ``build_trained`` and ``finish`` hooks get: the CLIP model, its architecture name, the
    classifier around its visual tower and the dataset's spec."""

    clip: nn.Module
    arch: str
    classifier: nn.Module
    spec: Any


def build_context(cfg: FinetuneConfig, trained: nn.Module, visual: nn.Module, sae: nn.Module | None, live_teacher: bool) -> Context:
    """The method's loss context: the SAE, the frozen copy of the encoder (a live teacher, or the
    method's ``encoder_copy``), then the method's ``setup``."""
    ctx = Context(cfg=cfg, model=trained, sae=sae, visual=visual)
    needs = ctx.method.needs
    if "sae" in needs and sae is None:
        raise ConfigError(f"methods.{cfg.method}: needs an SAE but none was given")
    if "encoder_copy" in needs or ("teacher" in needs and live_teacher):
        ctx.teacher = copy.deepcopy(visual).eval().requires_grad_(False)
    if ctx.method.setup is not None:
        ctx.method.setup(ctx)
    return ctx


def method_loss(ctx: Context, images: torch.Tensor, labels: torch.Tensor, f_0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``ctx.method`` on one batch and its named terms. ``f_0``: cached teacher
    embeddings of these images; without them a teacher-needing method runs the frozen encoder."""
    method = ctx.method
    logits, features = ctx.model(images)
    batch = Batch(images, labels, logits, features, f_0)
    if method.task_loss is not None:
        ce = method.task_loss(ctx, batch)
    else:
        ce = F.cross_entropy(logits, labels, label_smoothing=ctx.cfg.label_smoothing)
    batch.terms["ce"] = ce.detach()
    if "teacher" in method.needs:
        if batch.f_0 is None:
            with torch.no_grad():
                batch.f_0 = ctx.teacher(images)
        batch.f_theta, batch.f_0 = features.float(), batch.f_0.float()
    loss = ce
    if method.penalty is not None:
        penalty = method.penalty(ctx, batch)
        loss = ce + float(ctx.params.lam) * penalty["total"]
        batch.terms.update({f"reg_{k}": v.detach() for k, v in penalty.items()})
    batch.terms["loss"] = loss.detach()
    return loss, batch.terms
