"""What a fine-tuning method is: data (its name, its hyper-parameter dataclass, what it needs)
plus the hooks the shared training loop (:mod:`saeft.stages.finetune`) calls, registered once in
:mod:`saeft.methods`. Imports no torch, so the workflow reads the registry while it plans: a
method module defines its hooks as functions that import torch inside their bodies.

The contract (every hook optional; a method with none is plain cross-entropy fine-tuning):

- the loss on one batch is ``task_loss`` (default: cross-entropy with ``finetune.label_smoothing``)
  plus, for a method with a ``penalty``, ``lam * R`` where ``R = penalty(ctx, batch)["total"]``;
  every entry of the penalty's dict is logged as ``reg_<name>``. A method with a penalty has a
  ``lam`` field in its params (:func:`penalty_weight`);
- ``needs`` says what the loop prepares for the hooks: ``teacher``: ``batch.f_0`` (the zero-shot
  embeddings, from the teacher cache or a frozen copy of the encoder) and ``batch.f_theta`` (the
  tuned ones), both float32; ``sae``: ``ctx.sae``; ``encoder_copy``: ``ctx.teacher``, a frozen
  copy of the visual tower; ``text``: the method trains the text tower (``build_trained``);
- ``setup(ctx)`` runs once before the optimizer is built (anchors, forward hooks);
- ``fit_head(ctx, classifier, features, labels)`` fits the classifier's head before the first
  training step (LP-FT's converged probe): ``features`` are the frozen zero-shot embeddings of
  every training image (the evaluation preprocessing, no augmentation; N x d, float32, as the
  visual tower returns them) and ``labels`` their classes; it returns the fit's record (numbers),
  written as ``head_fit`` in train.json. It runs on a fresh run only (a resumed run's checkpoint
  holds the fitted head and the record), on every DDP rank (deterministically; the loop then
  broadcasts rank 0's parameters); ``fits_head(params)`` says whether this run fits (default:
  whenever ``fit_head`` is set), so the loop embeds the training split only when it does;
- ``probing(params, epoch)``: True while the encoder is frozen (weights and eval mode) and only
  the head trains; ``extra_epochs(params)``: epochs the run adds to ``finetune.epochs``;
- ``build_trained(towers)`` returns the module trained in place of the classifier (it must
  return ``(logits, image embedding)`` from images); ``finish(towers)`` runs after training,
  before the classifier is saved (e.g. rebuild its head).

``ctx`` is :class:`saeft.nn.loss.Context` (``cfg``, ``params``, ``model``, ``visual``, ``sae``,
``teacher``, and ``state``, a dict the method's hooks own); ``batch`` is :class:`saeft.nn.loss.Batch`
(``images``, ``labels``, ``logits``, ``features``, ``f_0``, ``f_theta``, and ``terms``, the
logged values, to which a hook may add diagnostics); ``towers`` is :class:`saeft.nn.loss.Towers`
(``clip``, ``arch``, ``classifier``, ``spec``: the dataset)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any

from saeft.config import Schema, StageConfig

NEEDS = ("teacher", "sae", "encoder_copy", "text")
"""What a method may need besides the batch: ``teacher`` (the zero-shot embeddings f_0 of the
training images: the teacher cache, or a frozen encoder), ``sae`` (a trained SAE),
``encoder_copy`` (a frozen copy of the visual tower, e.g. to tap its blocks), ``text`` (the text
tower, trained)."""


@dataclasses.dataclass
class MethodParams(StageConfig):
    """Base of a method's hyper-parameters (config key ``methods.<method>``)."""


def penalty_weight(default: float) -> Any:
    """The ``lambda`` field of a regularised method (``CE + lambda * R``), with its default; the
    config key is ``lambda``, a Python keyword, so the field is named ``lam``."""
    return dataclasses.field(default=default, metadata={"key": "lambda"})


SaeName = Annotated[str, Schema(min_length=1)]

Hook = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """One fine-tuning method, or an evaluation-only one (``trained=False``: WiSE-FT)."""

    name: str
    """Config key under ``methods`` and the name of its runs (``[a-z0-9_]+``)."""
    label: str
    """Display name in tables and figures."""
    summary: str
    """One line: what it does (the config schema's description)."""
    params: type[MethodParams] = MethodParams
    """Its hyper-parameters: the single definition of its keys, defaults and checks."""
    needs: frozenset[str] = frozenset()
    """Subset of :data:`NEEDS`."""
    trained: bool = True
    """False for a method evaluated from other methods' weights (no finetune job)."""
    penalty: Hook | None = None
    """``penalty(ctx, batch) -> {"total": R, ...named parts}``; the loss adds ``params.lam * R``."""
    task_loss: Hook | None = None
    """``task_loss(ctx, batch) -> loss`` in place of the cross-entropy of ``batch.logits``."""
    setup: Hook | None = None
    """``setup(ctx)``: once, after the frozen copies are made and before the optimizer."""
    fit_head: Hook | None = None
    """``fit_head(ctx, classifier, features, labels) -> {name: number}``: once before the first
    step of a fresh run, fits ``classifier.head`` on the frozen zero-shot embeddings of the
    training images; the record goes to train.json (``head_fit``)."""
    fits_head: Hook | None = None
    """``fits_head(params) -> bool``: whether ``fit_head`` runs for these params (default: yes)."""
    probing: Hook | None = None
    """``probing(params, epoch) -> bool``: encoder frozen, head alone trained, this epoch."""
    extra_epochs: Hook | None = None
    """``extra_epochs(params) -> int``: epochs added to ``finetune.epochs`` (one schedule)."""
    build_trained: Hook | None = None
    """``build_trained(towers) -> module`` trained in place of the classifier."""
    finish: Hook | None = None
    """``finish(towers)``: after training, before the classifier is saved."""
    ddp: bool = True
    """False: the method refuses multi-process (DDP) training."""
    from_zeroshot: bool = True
    """False: the run does not start from the zero-shot model (an ID-only reference trained from
    random weights), so its step 0 is not the zero-shot model's."""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"method {self.name}: unknown needs {sorted(unknown)} (known: {', '.join(NEEDS)})")
        if self.fits_head is not None and self.fit_head is None:
            raise ValueError(f"method {self.name}: fits_head without a fit_head hook")
        if self.penalty is not None and "lam" not in {f.name for f in dataclasses.fields(self.params)}:
            raise ValueError(f"method {self.name}: a penalty needs a lam field in {self.params.__name__} (penalty_weight)")

    def epochs(self, params: Any, epochs: int) -> int:
        """Epochs of a run of ``epochs`` fine-tuning epochs (plus ``extra_epochs``)."""
        return epochs + (int(self.extra_epochs(params)) if self.extra_epochs is not None else 0)

    def fits(self, params: Any) -> bool:
        """Whether a run with ``params`` fits the head before training (``fit_head``)."""
        if self.fit_head is None:
            return False
        return bool(self.fits_head(params)) if self.fits_head is not None else True

    def probes(self, params: Any, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) trains the head alone."""
        return bool(self.probing(params, epoch)) if self.probing is not None else False
