"""Stage ``finetune``: fine-tune the zero-shot classifier on a dataset's training split.

Every trained method of DESIGN section 3 lives here; each is one loss on one batch
(:func:`method_loss`) inside one shared training loop:

- ``lp``: linear probe (the whole encoder frozen and in eval mode, head trained);
- ``ft``: end-to-end; ``lpft``: ``lp_epochs`` epochs of ``lp`` then ``epochs`` of ``ft``;
- ``l2sp``: ``lambda * ||theta - theta_0||^2`` over the visual tower's weights;
- ``feat_mse``, ``feat_l1``: ``lambda * mean((f_theta - f_0)^2)`` / ``mean(|f_theta - f_0|)``;
- ``ldifs``: ``lambda *`` mean over tapped blocks of the squared distance of L2-normalised token
  features (channels of a feature map, or a transformer block's token vectors);
- ``flyp``: contrastive fine-tuning of both towers against class-prompt text embeddings (the
  symmetric CLIP loss between each image and its class's prompt embedding, with the class
  prompts as the image-side negatives); the head is rebuilt from the tuned text tower;
- ``sae_sparse``, ``sae_add``, ``saeft``: :func:`saeft.regularizers.sae_penalty` with some
  weights at zero.

BatchNorm (a ResNet visual tower; ViTs have none) follows ``finetune.batchnorm``. ``frozen`` (the
default) keeps every BatchNorm module in eval mode while training, for every method: it normalises
with the zero-shot running statistics and never updates them, so at step 0 the tuned embedding is
the teacher's (the cache and the live teacher embed in eval mode) and every regulariser is zero
until a weight moves; the affine weight and bias still train. ``train`` is plain train mode: batch
statistics in the forward and running statistics updated from ID batches, which moves the
embedding (and OOD accuracy) before any gradient step.

WiSE-FT is not trained: :func:`interpolate_weights` mixes a zero-shot and a fine-tuned model
at evaluation time (``saeft.evaluate``). The frozen teacher embeddings ``f_0`` come from the
HDF5 teacher cache when one is given and from a frozen copy of the encoder otherwise. The cache
holds ``f_0`` of exactly the training views: the deterministic evaluation preprocessing, or a fixed
bank of seeded augmented views per image (:mod:`saeft.views`); fresh views every epoch need the
live teacher.

Training state (model, optimizer, scheduler, RNG, data order) is checkpointed after each epoch
beside the outputs, never in them; a killed job resumes from it and ends with the same weights.

Several processes (``torchrun``, ``WORLD_SIZE`` > 1) train one model with torch DDP on the same
global batches as one process: every rank draws the same batch order and takes its share of each
batch, its loss is weighted by its share so that the all-reduced gradient is that of the global
batch mean, and with ``batchnorm: train`` BatchNorm is synchronised on GPU (SyncBatchNorm: the
statistics of the global batch; frozen BatchNorm needs no synchronisation). Rank 0 writes outputs
and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saeft.config import ConfigError, StageConfig, require
from saeft.config.stages import FinetuneConfig
from saeft.data.registry import get_dataset
from saeft.faults import maybe_kill
from saeft.io import load_tensors, write_json
from saeft.models import ImageClassifier, load_clip, preprocess_for, save_classifier, tokenizer_for, zeroshot_head
from saeft.regularizers import SAE_INPUTS, sae_penalty
from saeft.sae import load_sae
from saeft.training import CHECKPOINT_NAME, Progress, resume_checkpoint, save_checkpoint, setup_torch, warmup_cosine
from saeft.views import TrainingViews, ViewConfig, keep_pil

logger = logging.getLogger(__name__)

# Each trained method's hyper-parameters and their defaults (public reference code where it has
# them). ``taps`` of ldifs: module names inside the visual tower, or null for every block.
# ``sae_inputs`` of the SAE methods: the scale convention of the penalty (docs/penalty_scale.md);
# the reference's weights were tuned with ``raw``, which puts rho-sized codes into the penalty.
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "lp": {},
    "ft": {},
    "lpft": {"lp_epochs": 2},
    "l2sp": {"lambda": 0.01},
    "feat_mse": {"lambda": 10.0},
    "feat_l1": {"lambda": 1.0},
    "ldifs": {"lambda": 10.0, "taps": None},
    "flyp": {},
    "sae_sparse": {"lambda": 70.0, "lambda_l1": 1e-3, "mu": 1.0, "sae_inputs": "prepared"},
    "sae_add": {"lambda": 70.0, "lambda_add": 10.0, "mu": 1.0, "sae_inputs": "prepared"},
    "saeft": {"lambda": 70.0, "lambda_add": 10.0, "lambda_remove": 0.02, "mu": 1.0, "sae_inputs": "prepared"},
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# How a method hyper-parameter's value is checked: (test, what a failing value must be). Every key
# not listed here is a penalty weight: a non-negative number.
PARAM_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "taps": (lambda v: v is None or (isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)),
             "must be null or a non-empty list of module names"),
    "lp_epochs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1"),
    "sae_inputs": (lambda v: isinstance(v, str) and v in SAE_INPUTS, f"must be one of {', '.join(SAE_INPUTS)}"),
}
WEIGHT_RULE: tuple[Callable[[Any], bool], str] = (lambda v: _is_number(v) and v >= 0, "must be a non-negative number")
SAE_METHODS = frozenset({"sae_sparse", "sae_add", "saeft"})
TEACHER_METHODS = SAE_METHODS | {"feat_mse", "feat_l1"}
"""Methods that compare with the zero-shot embedding f_0 (which the teacher cache can supply)."""
BATCHNORM_MODES = ("frozen", "train")
"""Values of ``finetune.batchnorm``."""


# --- the regularisers on small tensors (hand-checkable) ------------------------------------------

def feature_mse(f_theta: torch.Tensor, f_0: torch.Tensor) -> torch.Tensor:
    """``mean((f_theta - f_0)^2)`` over batch x dim."""
    return (f_theta - f_0).pow(2).mean()


def feature_l1(f_theta: torch.Tensor, f_0: torch.Tensor) -> torch.Tensor:
    """``mean(|f_theta - f_0|)`` over batch x dim."""
    return (f_theta - f_0).abs().mean()


def l2sp_penalty(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum ||theta - theta_0||^2`` over the given tensors."""
    return sum((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True))


def ldifs_distance(taps_theta: Sequence[torch.Tensor], taps_0: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over taps of the per-token squared distance of L2-normalised features, averaged over
    batch and tokens. A 4-d tap (B, C, H, W) has its tokens at the spatial positions and its
    features on channels; any other tap has its features on the last dimension."""
    total = []
    for a, b in zip(taps_theta, taps_0, strict=True):
        dim = 1 if a.ndim == 4 else -1
        diff = F.normalize(a.float(), dim=dim) - F.normalize(b.float(), dim=dim)
        total.append(diff.pow(2).sum(dim).mean())
    return torch.stack(total).mean()


def flyp_loss(image_features: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of FLYP: image -> class prompts (CE over classes) and each
    image's class prompt -> the batch's images (CE over the batch), averaged."""
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(class_text, dim=-1)
    to_classes = scale * image @ text.T
    to_images = scale * text[labels] @ image.T
    targets = torch.arange(len(labels), device=labels.device)
    return 0.5 * (F.cross_entropy(to_classes, labels) + F.cross_entropy(to_images, targets))


def default_taps(visual: nn.Module) -> list[str]:
    """Every block of the visual tower: transformer resblocks (ViT) or ResNet stages."""
    names = dict(visual.named_modules())
    if "transformer.resblocks" in names:
        return [f"transformer.resblocks.{i}" for i in range(len(names["transformer.resblocks"]))]
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if n in names]
    if not stages:
        raise ConfigError("methods.ldifs.taps: no default blocks for this visual tower; name modules explicitly")
    return stages


class TapRecorder:
    """Forward hooks that keep the outputs of named modules of the last forward pass."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        modules = dict(module.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"methods.ldifs.taps: no module(s) {missing} in the visual tower")
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        for name in names:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return keep

    def taken(self) -> list[torch.Tensor]:
        return [self.outputs[n] for n in self.names]


class FlypModel(nn.Module):
    """Both CLIP towers, with ``forward(images) -> (logits over class prompts, image embedding)``
    so that the shared loop's accuracy and checkpoint code apply unchanged."""

    def __init__(self, clip: nn.Module, prompts: torch.Tensor, n_classes: int) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("prompts", prompts, persistent=False)  # (C * T, ctx) token ids
        self.n_classes = n_classes

    def class_text(self) -> torch.Tensor:
        """Per class, the mean of its normalised prompt embeddings (with gradient)."""
        text = F.normalize(self.clip.encode_text(self.prompts), dim=-1)
        return text.view(self.n_classes, -1, text.shape[-1]).mean(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.clip.encode_image(images)
        text = F.normalize(self.class_text(), dim=-1)
        return self.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ text.T, features


@dataclasses.dataclass
class Context:
    """What a method's loss needs besides the batch."""

    cfg: FinetuneConfig
    model: nn.Module
    sae: nn.Module | None = None
    teacher: nn.Module | None = None
    anchors: list[torch.Tensor] | None = None
    anchored: list[torch.Tensor] | None = None
    taps: TapRecorder | None = None
    teacher_taps: TapRecorder | None = None


def method_loss(ctx: Context, images: torch.Tensor, labels: torch.Tensor, f_0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``ctx.cfg.method`` on one batch and its named terms. ``f_0``: cached teacher
    embeddings of these images; without them a teacher-needing method runs the frozen encoder."""
    cfg, p = ctx.cfg, ctx.cfg.method_params
    logits, features = ctx.model(images)
    if cfg.method == "flyp":
        ce = flyp_loss(features, ctx.model.class_text(), labels, ctx.model.clip.logit_scale.exp())
    else:
        ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    terms: dict[str, torch.Tensor] = {"ce": ce.detach()}
    penalty: dict[str, torch.Tensor] | None = None
    if cfg.method in TEACHER_METHODS or cfg.method == "ldifs":
        if f_0 is None or cfg.method == "ldifs":
            with torch.no_grad():
                f_0 = ctx.teacher(images)
        f_theta, f_0 = features.float(), f_0.float()
        if cfg.method in SAE_METHODS:
            weights = {k: float(p.get(k, 0.0)) for k in ("lambda_add", "lambda_remove", "lambda_l1", "mu")}
            penalty = sae_penalty(f_theta, f_0, ctx.sae, inputs=p["sae_inputs"], **weights)
            terms["f0_norm"] = f_0.norm(dim=-1).mean().detach()  # rho of docs/penalty_scale.md
        elif cfg.method == "feat_mse":
            penalty = {"total": feature_mse(f_theta, f_0)}
        elif cfg.method == "feat_l1":
            penalty = {"total": feature_l1(f_theta, f_0)}
        else:
            penalty = {"total": ldifs_distance(ctx.taps.taken(), ctx.teacher_taps.taken())}
    elif cfg.method == "l2sp":
        penalty = {"total": l2sp_penalty(ctx.anchored, ctx.anchors)}
    loss = ce
    if penalty is not None:
        loss = ce + float(p["lambda"]) * penalty["total"]
        terms.update({f"reg_{k}": v.detach() for k, v in penalty.items()})
    terms["loss"] = loss.detach()
    return loss, terms


def read_teacher_cache(path: str | os.PathLike, dataset: str, split: str, n: int, dim: int, views: ViewConfig | None = None) -> torch.Tensor:
    """f_0 of every training view from a cache written by ``cache_activations`` (deterministic
    views: row = image) or ``cache_views`` (a bank: row = image * views + view), checked to be of
    this dataset, split, size, embedding width and bank (a stale cache would silently mis-teach)."""
    from saeft.cache import read_cache

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


def build_context(cfg: FinetuneConfig, trained: nn.Module, visual: nn.Module, sae: nn.Module | None, live_teacher: bool) -> Context:
    """The method's loss context: the frozen teacher, taps, L2-SP anchors and SAE as needed."""
    ctx = Context(cfg=cfg, model=trained, sae=sae)
    if cfg.method in SAE_METHODS and sae is None:
        raise ConfigError(f"methods.{cfg.method}: needs an SAE but none was given")
    if cfg.method == "ldifs" or (cfg.method in TEACHER_METHODS and live_teacher):
        ctx.teacher = copy.deepcopy(visual).eval().requires_grad_(False)
    if cfg.method == "ldifs":
        names = cfg.method_params["taps"] or default_taps(visual)
        ctx.taps, ctx.teacher_taps = TapRecorder(visual, names), TapRecorder(ctx.teacher, names)
    if cfg.method == "l2sp":
        ctx.anchored = [p for p in visual.parameters() if p.requires_grad]
        ctx.anchors = [p.detach().clone() for p in ctx.anchored]
    return ctx


def autocast_for(cfg: FinetuneConfig, device: torch.device) -> Any:
    """bf16/fp16 autocast on GPU; plain fp32 on CPU (CPU autocast is slower for these models)."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def batchnorm_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm module inside ``module`` (BatchNorm1d/2d/3d, SyncBatchNorm)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _set_phase(cfg: FinetuneConfig, model: nn.Module, visual: nn.Module, epoch: int) -> None:
    """Train mode for ``model`` (the trained module: classifier, or both towers for flyp), with
    BatchNorm in eval mode under ``batchnorm: frozen`` and the whole encoder frozen (weights and
    eval mode) while probing."""
    model.train()
    if cfg.batchnorm == "frozen":
        # Eval mode: running statistics normalise and stay those of the zero-shot model.
        for norm in batchnorm_modules(model):
            norm.eval()
    probing = cfg.method == "lp" or (cfg.method == "lpft" and epoch < cfg.method_params["lp_epochs"])
    visual.requires_grad_(not probing)
    if probing:
        visual.eval()


class RankShare(torch.utils.data.Sampler):
    """Each global batch of ``batches``, cut into ``world`` contiguous parts; yields part ``rank``."""

    def __init__(self, batches: torch.utils.data.BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        for batch in self.batches:
            size = len(batch)
            start, stop = self.rank * size // self.world, (self.rank + 1) * size // self.world
            yield batch[start:stop]


@dataclasses.dataclass
class Distributed:
    """This process's place in a DDP run (``torchrun`` sets the environment)."""

    rank: int = 0
    """Global rank; rank 0 writes outputs and checkpoints."""
    local_rank: int = 0
    """Rank on this node: the GPU index among the visible ones."""
    world: int = 1
    """Number of processes."""

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _distributed_setup(cfg: FinetuneConfig, dist_info: Distributed) -> torch.device:
    """The device of this process, with the process group up when there are several."""
    cuda = torch.cuda.is_available()
    if dist_info.world == 1:
        return torch.device("cuda" if cuda else "cpu")
    if cfg.method == "flyp":
        raise ConfigError("methods.flyp: multi-process (DDP) training is not supported; run it on one GPU")
    if cfg.compile:
        raise ConfigError("finetune.compile: not supported with multi-process (DDP) training")
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(dist_info.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    logger.info("DDP rank %d of %d (%s)", dist_info.rank, dist_info.world, "nccl" if cuda else "gloo")
    return torch.device(f"cuda:{dist_info.local_rank}") if cuda else torch.device("cpu")


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
) -> dict[str, Any]:
    """Fine-tune and write ``out_model`` (safetensors) and ``out_json`` (config and history)."""
    generator = setup_torch(cfg.seed)
    dist_info = Distributed.from_env()
    device = _distributed_setup(cfg, dist_info)
    clip, arch = load_clip(zeroshot_model)
    head_state, _ = load_tensors(head)
    model = ImageClassifier(clip.visual, head_state["weight"])
    preprocess = preprocess_for(model.visual)
    spec = get_dataset(dataset)
    views = cfg.view_config
    train = TrainingViews(spec.load(spec.train_split, keep_pil, dataset_options), preprocess, views, cfg.seed)
    heldout = spec.load(spec.heldout_split, preprocess, dataset_options)
    if cfg.method == "flyp":
        tokens = tokenizer_for(arch)([prompt for c in spec.classnames for prompt in spec.prompts(c)])
        trained: nn.Module = FlypModel(clip, tokens, len(spec.classnames))
        clip.logit_scale.requires_grad_(False)  # the temperature stays that of pretraining
    else:
        trained = model
    if dist_info.world > 1:
        trained = sync_batchnorm_for(cfg, trained, dist_info.world, device)
        model = trained  # flyp is excluded above, so the trained module is the classifier
    trained.to(device)
    sae = load_sae(sae_path).to(device) if sae_path else None
    if sae is not None and sae.d != model.visual.output_dim:
        raise ValueError(f"{sae_path}: the SAE encodes {sae.d}-dim embeddings, but {zeroshot_model} embeds "
                         f"into {model.visual.output_dim} dims (an SAE of another model?)")
    use_cache = cfg.method in TEACHER_METHODS and cfg.teacher != "live" and teacher_cache is not None
    if cfg.teacher == "cache" and cfg.method in TEACHER_METHODS and teacher_cache is None:
        raise ConfigError("finetune.teacher: 'cache' needs a teacher cache (--teacher-cache)")
    if use_cache and not (views.deterministic or views.banked):
        logger.warning("fresh views every epoch: ignoring the teacher cache %s, running the teacher live", teacher_cache)
        use_cache = False
    cached_f0 = read_teacher_cache(teacher_cache, dataset, spec.train_split, len(train), model.visual.output_dim, views).to(device) if use_cache else None
    ctx = build_context(cfg, trained, model.visual, sae, live_teacher=not use_cache)
    step_loss = torch.compile(method_loss) if cfg.compile else method_loss

    drop_last = len(train) > cfg.batch_size
    if dist_info.world == 1:
        loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=drop_last,
                                             generator=generator, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    else:
        # Every rank draws the batch order of one process (same seed) and keeps its share.
        batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(train, generator=generator), cfg.batch_size, drop_last)
        # The loader draws its base seed from ``generator`` as the single-process one does.
        loader = torch.utils.data.DataLoader(train, batch_sampler=RankShare(batches, dist_info.rank, dist_info.world),
                                             generator=generator, num_workers=cfg.workers, pin_memory=device.type == "cuda")
        # Parameters frozen in a phase (lp, lpft's probing) get no gradient: DDP must allow it.
        ctx.model = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=cfg.method in ("lp", "lpft"))
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.total_epochs * len(loader)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.precision == "fp16")
    checkpoint = Path(out_model).with_name(CHECKPOINT_NAME)
    parts = {"model": trained, "optimizer": optimizer, "scheduler": scheduler}
    saved = resume_checkpoint(checkpoint, cfg.to_dict(), parts)
    history: list[dict[str, float]] = []
    if saved is not None:
        generator.set_state(saved["generator"])
        history.extend(saved["history"])
    start_epoch = len(history)
    if saved is not None:
        logger.info("resumed from epoch %d of %d", start_epoch, cfg.total_epochs)
    progress = Progress(total_steps, f"finetune {dataset}/{cfg.method}/seed{cfg.seed}")

    for epoch in range(start_epoch, cfg.total_epochs):
        _set_phase(cfg, trained, model.visual, epoch)
        train.set_epoch(epoch)
        sums: dict[str, float] = {}
        started = time.monotonic()
        for step, (images, labels, index, view) in enumerate(loader, start=1):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            row = index * views.views + view if views.banked else index
            f_0 = cached_f0[row.to(device)] if cached_f0 is not None else None
            with autocast_for(cfg, device):
                loss, terms = step_loss(ctx, images, labels, f_0)
            shown = float(terms["loss"])  # this process's batch loss, for the progress line
            if dist_info.world > 1:
                share = _global_share(len(labels), dist_info.world, device)
                loss = loss * (share * dist_info.world)  # DDP averages: the gradient of the global mean
                terms = {key: value * share for key, value in terms.items()}
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            progress.update(epoch * len(loader) + step, loss=shown)
            maybe_kill("train_step")
        if dist_info.world > 1:
            sums = _sum_over_ranks(sums, device)
        record = {key: value / len(loader) for key, value in sums.items()}
        record.update(epoch=epoch + 1, lr=scheduler.get_last_lr()[0], seconds=time.monotonic() - started,
                      heldout_top1=accuracy(trained, heldout, cfg.batch_size * 4))
        history.append(record)
        logger.info("epoch %d/%d %s", epoch + 1, cfg.total_epochs, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
        if on_epoch is not None and dist_info.main:
            on_epoch(record)
        if dist_info.main:
            save_checkpoint(checkpoint, cfg.to_dict(), parts, {"generator": generator.get_state(), "history": history})

    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        if not dist_info.main:
            return history[-1] if history else {}
        model = _without_sync_batchnorm(model)  # a no-op when nothing was converted

    if cfg.method == "flyp":  # the classifier's head comes from the tuned text tower
        clip.eval()
        with torch.no_grad():
            model.head.weight.copy_(zeroshot_head(clip.cpu(), arch, spec.classnames, spec.templates))
    model.cpu()
    save_classifier(out_model, model.eval(), arch, {"method": cfg.method, "seed": cfg.seed, "dataset": dataset})
    summary = {"config": cfg.to_dict(), "dataset": dataset, "arch": arch, "steps": total_steps, "device": str(device),
               "seed": cfg.seed, "teacher": "cache" if use_cache else ("live" if ctx.teacher is not None else None),
               "sae": str(sae_path) if sae_path else None, "history": history,
               "final": history[-1] if history else {}}
    write_json(out_json, summary)
    checkpoint.unlink(missing_ok=True)
    return summary["final"]


def _global_share(n_local: int, world: int, device: torch.device) -> float:
    """This rank's fraction of the global batch (the last batch may split unevenly)."""
    import torch.distributed as dist

    n = torch.tensor([float(n_local)], device=device)
    dist.all_reduce(n)
    return n_local / float(n.item())


def _sum_over_ranks(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist(), strict=True))


def sync_batchnorm_for(cfg: FinetuneConfig, trained: nn.Module, world: int, device: torch.device) -> nn.Module:
    """``trained`` with SyncBatchNorm (statistics of the global batch) when ``world`` GPU processes
    train with ``batchnorm: train``; otherwise unchanged: frozen BatchNorm normalises by its
    running statistics, which need no synchronisation (and gloo on CPU has no SyncBatchNorm)."""
    if world > 1 and device.type == "cuda" and cfg.batchnorm == "train":
        return nn.SyncBatchNorm.convert_sync_batchnorm(trained)
    return trained


def _without_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Plain BatchNorm2d in place of SyncBatchNorm (same state), so the saved classifier loads
    and runs in one process."""
    if isinstance(module, nn.SyncBatchNorm):
        plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        plain.load_state_dict(module.state_dict())
        return plain
    for name, child in module.named_children():
        setattr(module, name, _without_sync_batchnorm(child))
    return module


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: torch.utils.data.Dataset, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for images, labels in torch.utils.data.DataLoader(data, batch_size=batch_size):
        correct += int((model(images.to(device))[0].argmax(-1).cpu() == labels).sum())
    return correct / max(len(data), 1)


def interpolate_weights(
    state_0: Mapping[str, torch.Tensor], state_ft: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) * theta_0 + alpha * theta_ft`` for every floating-point tensor.

    Buffers mix too: BatchNorm running statistics of a ``batchnorm: frozen`` run equal the
    zero-shot ones, so they stay exactly those (the interpolated model normalises as both ends);
    integer buffers (``num_batches_tracked``) are taken from the fine-tuned model."""
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
