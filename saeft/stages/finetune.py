"""Stage ``finetune``: fine-tune the zero-shot classifier on a dataset's training split.

Every trained method is an entry of the method registry (:mod:`saeft.methods`): its loss on one
batch is :func:`saeft.nn.loss.method_loss` through the method's hooks, inside this one shared
training loop, which never names a method (docs/methods.md describes each loss).

BatchNorm (a ResNet visual tower; ViTs have none) follows ``finetune.batchnorm``. ``frozen`` (the
default) keeps every BatchNorm module in eval mode while training, for every method: it normalises
with the zero-shot running statistics and never updates them, so at step 0 the tuned embedding is
the teacher's (the cache and the live teacher embed in eval mode) and every regulariser is zero
until a weight moves; the affine weight and bias still train. ``train`` is plain train mode: batch
statistics in the forward and running statistics updated from ID batches, which moves the
embedding (and OOD accuracy) before any gradient step.

WiSE-FT is not trained: :func:`saeft.nn.weights.interpolate_weights` mixes a zero-shot and a
fine-tuned model at evaluation time (``saeft.stages.evaluate``). The frozen teacher embeddings ``f_0``
come from the HDF5 teacher cache when one is given and from a frozen copy of the encoder
otherwise. The cache holds ``f_0`` of exactly the training views: the deterministic evaluation
preprocessing, or a fixed bank of seeded augmented views per image (:mod:`saeft.nn.views`); fresh
views every epoch need the live teacher.

A method with a ``fit_head`` hook (LP-FT's converged probe) fits the classifier's head on the
frozen zero-shot embeddings of the training images before the first step; its record is
``head_fit`` in train.json.

Training state (model, optimizer, scheduler, RNG, data order) is checkpointed after each epoch
beside the outputs, never in them; a killed job resumes from it and ends with the same weights.

Several processes (``torchrun``) train one model with DDP on the global batches of one process
(:mod:`saeft.nn.distributed`); rank 0 writes outputs and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saeft.config import ConfigError
from saeft.config.finetune import FinetuneConfig
from saeft.data.registry import get_dataset
from saeft.nn.distributed import (
    Distributed,
    RankShare,
    distributed_setup,
    distributed_teardown,
    global_share,
    sum_over_ranks,
    sync_batchnorm_for,
    without_sync_batchnorm,
)
from saeft.infra.faults import maybe_kill
from saeft.infra.io import load_tensors, write_json
from saeft.methods import Method, get_method
from saeft.nn.loss import Context, Towers, build_context, method_loss
from saeft.nn.models import ImageClassifier, load_clip, preprocess_for, save_classifier
from saeft.nn.training import CHECKPOINT_NAME, Progress, resume_checkpoint, save_checkpoint, setup_torch, warmup_cosine
from saeft.nn.views import TrainingViews, ViewConfig, keep_pil
from saeft.sae import load_sae

__all__ = ["FinetuneConfig", "accuracy", "autocast_for", "batchnorm_modules", "read_teacher_cache", "regime_ratios", "run",
           "set_phase"]

logger = logging.getLogger(__name__)


def read_teacher_cache(path: str | os.PathLike, dataset: str, split: str, n: int, dim: int, views: ViewConfig | None = None) -> torch.Tensor:
    """f_0 of every training view from a cache written by ``cache_activations`` (deterministic
    views: row = image) or ``cache_views`` (a bank: row = image * views + view), checked to be of
    this dataset, split, size, embedding width and bank (a stale cache would silently mis-teach)."""
    from saeft.nn.embeddings import read_cache

    views = views or ViewConfig()
    embeddings, _, attrs = read_cache(path)
    want = {"dataset": dataset, "split": split, "dim": dim, "count": n * (views.views if views.banked else 1)}
    if views.banked:
        want.update(views=views.views, augment=views.augment, view_seed=views.view_seed, crop_scale=views.crop_scale)
    for key, value in want.items():
        if attrs.get(key) != value:
            raise ValueError(f"{path}: teacher cache has {key}={attrs.get(key)!r}, training needs {value!r}")
    if not views.banked and "views" in attrs:
        raise ValueError(f"{path}: teacher cache holds a bank of {attrs['views']} views; training uses deterministic views")
    return torch.from_numpy(embeddings)


def autocast_for(cfg: FinetuneConfig, device: torch.device) -> Any:
    """bf16/fp16 autocast on GPU; plain fp32 on CPU (CPU autocast is slower for these models)."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def batchnorm_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm module inside ``module`` (BatchNorm1d/2d/3d, SyncBatchNorm)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_phase(cfg: FinetuneConfig, model: nn.Module, visual: nn.Module, epoch: int) -> None:
    """Train mode for ``model`` (the trained module), with BatchNorm in eval mode under
    ``batchnorm: frozen`` and the whole encoder frozen (weights and eval mode) while the method
    probes (its ``probing`` hook)."""
    model.train()
    if cfg.batchnorm == "frozen":
        # Eval mode: running statistics normalise and stay those of the zero-shot model.
        for norm in batchnorm_modules(model):
            norm.eval()
    probing = get_method(cfg.method).probes(cfg.params, epoch)
    visual.requires_grad_(not probing)
    if probing:
        visual.eval()


PRETRAIN_SCHEDULE_KEYS = ("lr", "steps", "warmup_steps")
"""The keys of the pretraining schedule :func:`regime_ratios` compares with (``pretrain.*``)."""


def _summed_schedule(warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of :func:`saeft.nn.training.warmup_cosine` summed over the
    ``total_steps`` optimizer steps of a run (step s takes the factor at s)."""
    # The schedule's own factor, so that the sum follows any change to it; the optimizer is a stand-in.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = warmup_cosine(optimizer, warmup_steps, total_steps).lr_lambdas[0]
    return math.fsum(factor(step) for step in range(total_steps))


def regime_ratios(cfg: FinetuneConfig, total_steps: int, pretrain: Mapping[str, Any]) -> dict[str, float]:
    """The fine-tuning regime against the pretraining's (``pretrain``: its ``lr``, ``steps`` and
    ``warmup_steps``): ``lr_ratio``, fine-tuning's peak lr over pretraining's, and
    ``summed_lr_ratio``, the lr summed over every step of fine-tuning's schedule (``total_steps``)
    over the same sum for pretraining: how far fine-tuning may move the weights next to how far
    pretraining did. A ValueError names a missing key."""
    missing = [key for key in PRETRAIN_SCHEDULE_KEYS if key not in pretrain]
    if missing:
        raise ValueError(f"--pretrain-schedule: missing {', '.join(missing)} (needs {', '.join(PRETRAIN_SCHEDULE_KEYS)})")
    lr, steps, warmup = float(pretrain["lr"]), int(pretrain["steps"]), int(pretrain["warmup_steps"])
    if lr <= 0 or steps < 1:
        raise ValueError(f"--pretrain-schedule: lr must be > 0 and steps >= 1, got lr={lr}, steps={steps}")
    summed = cfg.lr * _summed_schedule(cfg.warmup_steps, total_steps)
    return {"lr_ratio": cfg.lr / lr, "summed_lr_ratio": summed / (lr * _summed_schedule(warmup, steps))}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: torch.utils.data.Dataset, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for images, labels in torch.utils.data.DataLoader(data, batch_size=batch_size):
        correct += int((model(images.to(device))[0].argmax(-1).cpu() == labels).sum())
    return correct / max(len(data), 1)


@dataclasses.dataclass
class _Job:
    """Everything one fine-tuning run holds, built in order by :func:`run`."""

    cfg: FinetuneConfig
    method: Method
    dataset: str
    dist_info: Distributed
    device: torch.device
    generator: torch.Generator
    towers: Towers
    trained: nn.Module
    train: TrainingViews
    heldout: Any
    sae: nn.Module | None = None
    cached_f0: torch.Tensor | None = None
    ctx: Context | None = None
    step_loss: Any = None
    loader: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    head_fit: dict[str, float] | None = None
    """The record of the method's ``fit_head`` (None: the method fits no head)."""

    @property
    def model(self) -> nn.Module:
        """The classifier (what is saved)."""
        return self.towers.classifier


def _build(zeroshot_model: str | os.PathLike, head: str | os.PathLike, dataset: str, dataset_options: Any,
           cfg: FinetuneConfig) -> _Job:
    """Seeds, device, the zero-shot classifier, the data, and the module the method trains."""
    generator = setup_torch(cfg.seed)
    dist_info = Distributed.from_env()
    device = distributed_setup(cfg, dist_info)
    method = get_method(cfg.method)
    clip, arch = load_clip(zeroshot_model)
    head_state, _ = load_tensors(head)
    model = ImageClassifier(clip.visual, head_state["weight"])
    preprocess = preprocess_for(model.visual)
    spec = get_dataset(dataset, dataset_options)
    train = TrainingViews(spec.load(spec.train_split, keep_pil, dataset_options), preprocess, cfg.view_config, cfg.seed)
    heldout = spec.load(spec.heldout_split, preprocess, dataset_options)
    towers = Towers(clip=clip, arch=arch, classifier=model, spec=spec)
    trained = method.build_trained(towers) if method.build_trained is not None else model
    if dist_info.world > 1:
        converted = sync_batchnorm_for(cfg, trained, dist_info.world, device)
        if trained is model:  # a method with its own trained module refuses DDP (its ``ddp``)
            towers.classifier = converted
        trained = converted
    trained.to(device)
    return _Job(cfg=cfg, method=method, dataset=dataset, dist_info=dist_info, device=device, generator=generator,
                towers=towers, trained=trained, train=train, heldout=heldout)


def _teacher_cache(job: _Job, teacher_cache: str | os.PathLike | None) -> None:
    """``job.cached_f0``: the teacher cache's f_0 when the method needs f_0 and the cache serves."""
    cfg, views = job.cfg, job.cfg.view_config
    needs_teacher = "teacher" in job.method.needs
    use_cache = needs_teacher and cfg.teacher != "live" and teacher_cache is not None
    if cfg.teacher == "cache" and needs_teacher and teacher_cache is None:
        raise ConfigError("finetune.teacher: 'cache' needs a teacher cache (--teacher-cache)")
    if use_cache and not (views.deterministic or views.banked):
        logger.warning("fresh views every epoch: ignoring the teacher cache %s, running the teacher live", teacher_cache)
        use_cache = False
    if use_cache:
        spec, dim = job.towers.spec, job.model.visual.output_dim
        job.cached_f0 = read_teacher_cache(teacher_cache, job.dataset, spec.train_split, len(job.train), dim, views).to(job.device)


@torch.no_grad()
def _train_embeddings(job: _Job) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen zero-shot embeddings (float32, on the device) and labels of every training
    image, in the evaluation preprocessing whatever the training views (a probe fits the images,
    not their augmentations) and in fp32 without autocast, as the teacher cache embeds them."""
    visual, device = job.model.visual, job.device
    visual.eval()  # zero-shot running statistics; set_phase sets each epoch's modes afterwards
    plain = TrainingViews(job.train.images, job.train.preprocess, ViewConfig(), job.cfg.seed)
    loader = torch.utils.data.DataLoader(plain, batch_size=job.cfg.batch_size * 4, num_workers=job.cfg.workers,
                                         pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets, _index, _view in loader:
        features.append(visual(images.to(device, non_blocking=True)).float())
        labels.append(targets.to(device))
    return torch.cat(features), torch.cat(labels)


def _fit_head(job: _Job) -> dict[str, float] | None:
    """The method's ``fit_head`` on the training embeddings, when it fits one (a fresh run only:
    a checkpoint holds the fitted head). Every DDP rank embeds the whole split and fits
    deterministically; rank 0's parameters are broadcast all the same, so that no last-bit
    difference between devices can make the replicas' heads differ."""
    method, params = job.method, job.ctx.params
    if not method.fits(params):
        return None
    features, labels = _train_embeddings(job)
    record = {key: float(value) for key, value in method.fit_head(job.ctx, job.model, features, labels).items()}
    if job.dist_info.world > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for parameter in job.trained.parameters():
                dist.broadcast(parameter, 0)
    return record


def _loader(job: _Job) -> None:
    """The training batches (every DDP rank takes its share of one process's batches), and the
    trained module wrapped in DDP when there are several processes."""
    cfg, dist_info, train, pin = job.cfg, job.dist_info, job.train, job.device.type == "cuda"
    drop_last = len(train) > cfg.batch_size
    if dist_info.world == 1:
        job.loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=drop_last,
                                                 generator=job.generator, num_workers=cfg.workers, pin_memory=pin)
        return
    # Every rank draws the batch order of one process (same seed) and keeps its share.
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(train, generator=job.generator), cfg.batch_size, drop_last)
    # The loader draws its base seed from ``generator`` as the single-process one does.
    job.loader = torch.utils.data.DataLoader(train, batch_sampler=RankShare(batches, dist_info.rank, dist_info.world),
                                             generator=job.generator, num_workers=cfg.workers, pin_memory=pin)
    # Parameters frozen in a phase (a probing epoch) get no gradient: DDP must allow it.
    device, probes = job.device, any(job.method.probes(job.ctx.params, epoch) for epoch in range(cfg.total_epochs))
    job.ctx.model = nn.parallel.DistributedDataParallel(job.trained, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=probes)


def _step(job: _Job, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss`` (scaled under fp16, clipped, then the schedule)."""
    optimizer, scaler = job.optimizer, job.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if job.cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(job.trained.parameters(), job.cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    job.scheduler.step()


def _train_epoch(job: _Job, epoch: int, progress: Progress) -> dict[str, float]:
    """One pass over the training batches; the epoch's mean terms, learning rate and held-out top-1."""
    cfg, device, world, views = job.cfg, job.device, job.dist_info.world, job.cfg.view_config
    set_phase(cfg, job.trained, job.model.visual, epoch)
    job.train.set_epoch(epoch)
    sums: dict[str, float] = {}
    started = time.monotonic()
    for step, (images, labels, index, view) in enumerate(job.loader, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        row = index * views.views + view if views.banked else index
        f_0 = job.cached_f0[row.to(device)] if job.cached_f0 is not None else None
        with autocast_for(cfg, device):
            loss, terms = job.step_loss(job.ctx, images, labels, f_0)
        shown = float(terms["loss"])  # this process's batch loss, for the progress line
        if world > 1:
            share = global_share(len(labels), world, device)
            loss = loss * (share * world)  # DDP averages: the gradient of the global mean
            terms = {key: value * share for key, value in terms.items()}
        _step(job, loss)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        progress.update(epoch * len(job.loader) + step, loss=shown)
        maybe_kill("train_step")
    if world > 1:
        sums = sum_over_ranks(sums, device)
    record = {key: value / len(job.loader) for key, value in sums.items()}
    record.update(epoch=epoch + 1, lr=job.scheduler.get_last_lr()[0], seconds=time.monotonic() - started,
                  heldout_top1=accuracy(job.trained, job.heldout, cfg.batch_size * 4))
    return record


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
    teacher_cache: str | os.PathLike | None = None,
    pretrain_schedule: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune and write ``out_model`` (safetensors) and ``out_json`` (config and history;
    given the schedule of the pretraining that made the zero-shot model, also the regime ratios
    of :func:`regime_ratios`)."""
    job = _build(zeroshot_model, head, dataset, dataset_options, cfg)
    job.sae = load_sae(sae_path).to(job.device) if sae_path else None
    if job.sae is not None and job.sae.d != job.model.visual.output_dim:
        raise ValueError(f"{sae_path}: the SAE encodes {job.sae.d}-dim embeddings, but {zeroshot_model} embeds "
                         f"into {job.model.visual.output_dim} dims (an SAE of another model?)")
    _teacher_cache(job, teacher_cache)
    job.ctx = build_context(cfg, job.trained, job.model.visual, job.sae, live_teacher=job.cached_f0 is None)
    job.step_loss = torch.compile(method_loss) if cfg.compile else method_loss
    _loader(job)
    job.optimizer = torch.optim.AdamW([p for p in job.trained.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.total_epochs * len(job.loader)
    job.scheduler = warmup_cosine(job.optimizer, cfg.warmup_steps, total_steps)
    regime = regime_ratios(cfg, total_steps, pretrain_schedule) if pretrain_schedule is not None else {}
    if regime:
        logger.info("regime against pretraining: lr ratio %.4g, summed lr ratio %.4g", regime["lr_ratio"], regime["summed_lr_ratio"])
    job.scaler = torch.amp.GradScaler("cuda", enabled=job.device.type == "cuda" and cfg.precision == "fp16")
    checkpoint = Path(out_model).with_name(CHECKPOINT_NAME)
    parts = {"model": job.trained, "optimizer": job.optimizer, "scheduler": job.scheduler}
    saved = resume_checkpoint(checkpoint, cfg.to_dict(), parts)
    history: list[dict[str, float]] = []
    if saved is not None:
        job.generator.set_state(saved["generator"])
        history.extend(saved["history"])
        logger.info("resumed from epoch %d of %d", len(history), cfg.total_epochs)
    # A fresh run fits its head before the first step (the optimizer's state is still empty); a checkpoint holds it.
    job.head_fit = _fit_head(job) if saved is None else saved.get("head_fit")
    progress = Progress(total_steps, f"finetune {dataset}/{cfg.method}/seed{cfg.seed}")
    for epoch in range(len(history), cfg.total_epochs):
        record = _train_epoch(job, epoch, progress)
        history.append(record)
        logger.info("epoch %d/%d %s", epoch + 1, cfg.total_epochs, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
        if on_epoch is not None and job.dist_info.main:
            on_epoch(record)
        if job.dist_info.main:
            save_checkpoint(checkpoint, cfg.to_dict(), parts, {"generator": job.generator.get_state(), "history": history, "head_fit": job.head_fit})
    if job.dist_info.world > 1:
        distributed_teardown()
        if not job.dist_info.main:
            return history[-1] if history else {}
        job.towers.classifier = without_sync_batchnorm(job.model)  # a no-op when nothing was converted
    return _save(job, out_model, out_json, checkpoint, total_steps, history, sae_path, regime)


def _save(job: _Job, out_model: str | os.PathLike, out_json: str | os.PathLike, checkpoint: Path, total_steps: int,
          history: list[dict[str, float]], sae_path: str | os.PathLike | None, regime: dict[str, float]) -> dict[str, Any]:
    """The method's ``finish``, then the classifier and the run's summary (with ``regime``, the
    ratios to the pretraining, when known); the checkpoint goes."""
    cfg, model = job.cfg, job.model
    if job.method.finish is not None:
        job.method.finish(job.towers)
    model.cpu()
    save_classifier(out_model, model.eval(), job.towers.arch, {"method": cfg.method, "seed": cfg.seed, "dataset": job.dataset})
    teacher = "cache" if job.cached_f0 is not None else ("live" if job.ctx.teacher is not None else None)
    summary = {"config": cfg.to_dict(), "dataset": job.dataset, "arch": job.towers.arch, "steps": total_steps,
               "device": str(job.device), "seed": cfg.seed, "teacher": teacher, **regime,
               "sae": str(sae_path) if sae_path else None, "head_fit": job.head_fit, "history": history, "final": history[-1] if history else {}}
    write_json(out_json, summary)
    checkpoint.unlink(missing_ok=True)
    return summary["final"]
