"""SAE training (stages ``train_sae`` and ``train_sae_sweep``): a :class:`Trainer` per SAE,
SAEs that share the data keys trained side by side on the same streamed batches, resumable
from a per-epoch checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from saeft.config import require
from saeft.config.stages import SAETrainConfig
from saeft.infra.io import load_tensors, write_json
from saeft.nn.training import CHECKPOINT_NAME, Curve, resume_checkpoint, save_checkpoint, warmup_cosine
from saeft.sae.data import ChunkBatches, geometric_median, read_cache, read_embeddings
from saeft.sae.files import save_sae, shape_metadata
from saeft.sae.kernels import gathered_code, sparse_decode
from saeft.sae.metrics import evaluate_sae, stream_fvu
from saeft.sae.model import TopKSAE

log = logging.getLogger(__name__)

# Keys that fix the order in which batches are read: SAEs sharing them train in one pass.
_DATA_KEYS = ("epochs", "batch_size", "seed", "normalize", "shuffle_buffer")

CurvesSink = Callable[[str, int, Mapping[str, float]], None]
"""Receives a point of an SAE's training curve: ``(SAE name, step, {name: value})`` with
``loss`` (the squared error per embedding element, as the epoch log), ``fvu`` (the batch's
squared error over the training data's variance) and ``dead_fraction``, averaged over windows
of steps (:class:`~saeft.nn.training.Curve`)."""


def sweep_configs(section: Mapping[str, Any]) -> dict[str, SAETrainConfig]:
    """The SAEs of ``sae.sweep``: each entry's overrides on the other ``sae`` keys, by name."""
    return SAETrainConfig.from_dict(dict(section)).sweep_configs()


def train_sae(
    train_h5: str | os.PathLike,
    heldout_h5: str | os.PathLike,
    cfg: SAETrainConfig,
    *,
    head: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    evals: Mapping[str, str | os.PathLike] | None = None,
    curves: CurvesSink | None = None,
) -> tuple[TopKSAE, dict[str, Any]]:
    """Train one SAE on the cache ``train_h5``; metrics are measured on ``heldout_h5`` and, per
    name, on each cache of ``evals`` (``metrics["splits"][name]``: FVU, L0, dead fraction... on
    the ID test split and every shift).

    Deterministic for a fixed ``cfg.seed`` on CPU. Returns the SAE (eval mode) and a metrics dict:
    ``fvu``, ``explained_variance``, ``l0``, ``dead_fraction``, ``dense_fraction``, ``mse``
    (held-out; with ``head`` also the zero-shot accuracies), ``train_fvu``, ``n_train``,
    ``n_heldout``, ``d``, ``n_features``. With ``checkpoint``, state is saved there after every
    epoch and a matching one is resumed from (see :func:`train_saes`). ``curves`` receives the
    training curves (:data:`CurvesSink`, the SAE named ``sae``).
    """
    result = train_saes(train_h5, heldout_h5, {"sae": cfg}, head=head, checkpoint=checkpoint, evals=evals, curves=curves)
    return result["sae"]


def train_cache_for(train_h5: str | os.PathLike | Mapping[str, str | os.PathLike], cfg: SAETrainConfig) -> str | os.PathLike:
    """The training cache of an SAE: ``train_h5`` itself, or its entry for the SAE's ``data``."""
    if not isinstance(train_h5, Mapping):
        return train_h5
    if cfg.data not in train_h5:
        raise ValueError(f"sae.data {cfg.data!r}: no training cache given for it (given: {', '.join(sorted(train_h5)) or 'none'})")
    return train_h5[cfg.data]


def train_saes(
    train_h5: str | os.PathLike | Mapping[str, str | os.PathLike],
    heldout_h5: str | os.PathLike,
    cfgs: Mapping[str, SAETrainConfig],
    *,
    head: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    evals: Mapping[str, str | os.PathLike] | None = None,
    curves: CurvesSink | None = None,
) -> dict[str, tuple[TopKSAE, dict[str, Any]]]:
    """Train several SAEs; those sharing the data keys (``data``, epochs, batch size, seed,
    normalisation, shuffle buffer) train side by side on the same batches, in one pass.
    ``train_h5`` is one cache, or one per ``data`` value (``{"id": ..., "pretrain": ...}``).

    With ``checkpoint`` (a file path; groups after the first add ``.{i}``), each group saves its
    state after every epoch and resumes from a checkpoint saved under the same configs; the
    checkpoint is removed when its group is done. Resuming gives bitwise the same weights as an
    uninterrupted run on CPU. ``curves`` receives each SAE's training curves (:data:`CurvesSink`).
    """
    heldout_raw, labels = read_cache(heldout_h5, labels=True)
    head_weight = None
    if head is not None:
        head_weight = load_tensors(head)[0].get("weight")
        if head_weight is None:
            raise ValueError(f"{head}: no 'weight' tensor (a zero-shot head)")
        head_weight = head_weight.float()
    groups: dict[tuple, dict[str, SAETrainConfig]] = {}
    for name, cfg in cfgs.items():
        groups.setdefault((str(train_cache_for(train_h5, cfg)), *(getattr(cfg, key) for key in _DATA_KEYS)), {})[name] = cfg
    results: dict[str, tuple[TopKSAE, dict[str, Any]]] = {}
    for i, group in enumerate(groups.values()):
        path = None
        if checkpoint is not None:
            path = Path(checkpoint) if i == 0 else Path(f"{checkpoint}.{i}")
        group_cache = train_cache_for(train_h5, next(iter(group.values())))
        results.update(_train_group(group_cache, heldout_h5, heldout_raw, labels, head_weight, group, path, curves))
    for name, path in (evals or {}).items():
        raw, split_labels = read_cache(path, labels=True)
        for sae, metrics in results.values():
            metrics.setdefault("splits", {})[name] = _evaluate_named(sae, sae.prepare(raw), path, labels=split_labels, head=head_weight)
    return {name: results[name] for name in cfgs}


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss of ``(B, d)`` rows: the squared error summed over the embedding dims,
    averaged over the rows, so its gradients do not shrink with ``d``.

    Adam is invariant to the loss's scale except through its epsilon: a mean over every element
    made the gradients of a large (batch x d) batch small enough for epsilon to damp the steps.
    """
    return (recon - target).pow(2).sum() / max(target.shape[0], 1)


class Trainer:
    """One SAE and its training state (AdamW, schedule, dead-latent counters); :meth:`step`
    trains it on one prepared batch. :func:`train_saes` drives one per SAE."""

    def __init__(
        self, name: str, cfg: SAETrainConfig, d: int, total_steps: int, n_train: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.name, self.cfg = name, cfg
        self.dead_after = cfg.dead_after or n_train
        """Samples without firing after which a latent counts as dead (``sae.dead_after``, or one epoch)."""
        n_features = cfg.expansion * d
        require(cfg.k <= n_features, "sae.k", f"must be <= n_features = expansion * d = {n_features}")
        generator = torch.Generator().manual_seed(cfg.seed)
        self.sae = TopKSAE(
            d, n_features, cfg.k, cfg.normalize, architecture=cfg.architecture, relu=cfg.relu,
            tied_init=cfg.tied_init, encoder_init_norm=cfg.encoder_init_norm, generator=generator,
        )
        self.sae.b_enc.requires_grad_(cfg.encoder_bias)
        self.sae.to(device)
        params = [p for p in self.sae.parameters() if p.requires_grad]
        # The fused kernel (CPU and CUDA) updates every parameter in one pass.
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        if cfg.lr_decay == "cosine":
            self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, total_steps)
        else:
            # Warm-up only (warmup_cosine always decays).
            warmup = max(cfg.warmup_steps, 1)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
            )
        # Samples since each latent last fired (dead latents feed the AuxK loss).
        self.since_fired = torch.zeros(n_features, dtype=torch.long, device=device)
        self.aux_k = min(cfg.aux_k or max(d // 2, 1), n_features)
        self.epoch_sse = 0.0

    def parts(self) -> dict[str, Any]:
        return {
            f"{self.name}/sae": self.sae,
            f"{self.name}/optimizer": self.optimizer,
            f"{self.name}/scheduler": self.scheduler,
        }

    def step(self, batch: torch.Tensor) -> tuple[float, int]:
        """One optimiser step on a prepared batch: :func:`reconstruction_loss` + AuxK, the
        decoder's parallel gradient removed and its columns renormalised after the step.
        Returns the batch's summed squared error and the count of dead latents (both already
        read back for the epoch's statistics and AuxK: no extra device sync)."""
        sae, cfg = self.sae, self.cfg
        with torch.no_grad():
            pre = sae.pre_activations(batch)
        out = sae(batch, pre=pre)
        loss = reconstruction_loss(out.recon, batch)
        dead = self._update_fired(out.code, batch.shape[0])
        n_dead = int(dead.sum())
        if cfg.auxk_alpha > 0 and n_dead > 0:
            loss = loss + cfg.auxk_alpha * self._auxk_loss(pre, batch, out.recon, dead, n_dead)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        self.scheduler.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            sse = (out.recon - batch).double().pow(2).sum().item()
        self.epoch_sse += sse
        return sse, n_dead

    @torch.no_grad()
    def _update_fired(self, code, batch_size: int) -> torch.Tensor:
        """Count ``batch_size`` more samples for every latent, reset those that fired; the mask
        of dead latents."""
        fired = torch.zeros(self.sae.n_features, dtype=torch.bool, device=code.indices.device)
        fired[code.indices[code.values != 0]] = True
        self.since_fired += batch_size
        self.since_fired[fired] = 0
        return self.since_fired >= self.dead_after

    def _auxk_loss(self, pre, batch, recon, dead, n_dead: int) -> torch.Tensor:
        """Dead latents learn to explain what the live ones miss (in the main loss's units)."""
        sae = self.sae
        k_aux = min(self.aux_k, n_dead)
        values, indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        rows = torch.arange(batch.shape[0], device=batch.device).repeat_interleave(k_aux)
        offsets = torch.arange(0, batch.shape[0] * k_aux, k_aux, device=batch.device)
        aux_code = gathered_code(
            values.reshape(-1), batch, sae.b_pre, sae.W_enc, sae.b_enc, indices.reshape(-1),
            rows, offsets, batch.shape[0], sae.relu,
        )
        return reconstruction_loss(sparse_decode(aux_code, sae.W_dec), (batch - recon).detach())


def _train_group(train_h5, heldout_h5, heldout_raw, labels, head_weight, cfgs, checkpoint, curves=None):
    """Train the SAEs ``cfgs`` (sharing the data keys) in one pass over the streamed cache and
    measure them; the checkpoint is removed once they are done."""
    first = next(iter(cfgs.values()))
    batches = ChunkBatches(train_h5, first.batch_size, first.shuffle_buffer)
    try:
        n_train, d = batches.n, batches.d
        _check_sizes(train_h5, heldout_h5, n_train, d, heldout_raw)
        steps_per_epoch = -(-n_train // first.batch_size)
        members = [Trainer(name, cfg, d, steps_per_epoch * first.epochs, n_train=n_train) for name, cfg in cfgs.items()]
        train_sst = _init_b_pre(members, batches, train_h5)
        _fit(members, batches, train_h5, checkpoint, train_sst, curves)
        results = _measure(members, batches, heldout_raw, heldout_h5, labels, head_weight, train_sst)
    finally:
        batches.close()
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return results


def _check_sizes(train_h5, heldout_h5, n_train: int, d: int, heldout_raw: torch.Tensor) -> None:
    if n_train < 2:
        raise ValueError(f"{train_h5}: need at least 2 training embeddings, got {n_train}")
    if heldout_raw.shape[0] < 2:
        raise ValueError(
            f"{heldout_h5}: need at least 2 held-out embeddings, got {heldout_raw.shape[0]}"
        )
    if heldout_raw.shape[1] != d:
        raise ValueError(
            f"{heldout_h5}: embedding dim {heldout_raw.shape[1]} differs from the training "
            f"cache {train_h5} ({d})"
        )


def _init_b_pre(members: list[Trainer], batches: ChunkBatches, train_h5) -> float:
    """Start each ``b_pre`` as its config says (data mean, geometric median or zero) and return
    the training data's summed squared deviation from its mean (what FVU divides by)."""
    n_train, d = batches.n, batches.d
    prepare = members[0].sae.prepare
    # One streamed pass for the statistics b_pre starts from and FVU divides by.
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = 0.0
    for batch in batches.epoch(None, shuffle=False):
        batch = prepare(batch).double()
        total += batch.sum(dim=0)
        total_sq += batch.pow(2).sum().item()
    mean = total / n_train
    train_sst = total_sq - n_train * mean.pow(2).sum().item()
    if any(m.cfg.b_pre_init == "median" for m in members):
        median = geometric_median(prepare(read_embeddings(train_h5)))
    with torch.no_grad():
        for m in members:
            if m.cfg.b_pre_init == "mean":
                m.sae.b_pre.copy_(mean.float())
            elif m.cfg.b_pre_init == "median":
                m.sae.b_pre.copy_(median)
    return train_sst


def _fit(members: list[Trainer], batches: ChunkBatches, train_h5, checkpoint, train_sst: float,
         curves: CurvesSink | None = None) -> None:
    """Run the epochs (from a matching checkpoint's, if any), every member stepping on the same
    batches; logs each epoch, hands ``curves`` each member's per-step curve points and
    checkpoints after all but the last epoch."""
    first = members[0].cfg
    n_train, d = batches.n, batches.d
    prepare = members[0].sae.prepare
    generator = torch.Generator().manual_seed(first.seed)
    parts = {key: part for m in members for key, part in m.parts().items()}
    identity = {"configs": {m.name: m.cfg.to_dict() for m in members}, "train": str(train_h5)}
    start_epoch = 1
    if checkpoint is not None:
        saved = resume_checkpoint(Path(checkpoint), identity, parts)
        if saved is not None:
            start_epoch = int(saved["epoch"]) + 1
            generator.set_state(saved["generator"])
            for m in members:
                m.since_fired.copy_(saved[f"{m.name}/since_fired"])
    for m in members:
        m.sae.train()
    log.info(
        "training %d SAE(s) %s: n_train=%d d=%d epochs=%d batch_size=%d (from epoch %d)",
        len(members), ", ".join(m.name for m in members), n_train, d, first.epochs,
        first.batch_size, start_epoch,
    )
    steps_per_epoch = -(-n_train // first.batch_size)
    step = (start_epoch - 1) * steps_per_epoch
    sink = (lambda name: lambda at, values: curves(name, at, values)) if curves is not None else (lambda name: None)
    points = {m.name: Curve(sink(m.name), steps_per_epoch * first.epochs) for m in members}
    variance = max(train_sst / n_train, 1e-30)  # summed over the dims, per row
    for epoch in range(start_epoch, first.epochs + 1):
        for m in members:
            m.epoch_sse = 0.0
        for batch in batches.epoch(generator):
            batch = prepare(batch)
            step += 1
            for m in members:
                sse, n_dead = m.step(batch)
                rows = max(batch.shape[0], 1)
                points[m.name].add(step, loss=sse / (rows * d), fvu=sse / (rows * variance),
                                   dead_fraction=n_dead / m.sae.n_features)
        for m in members:
            # Running FVU over the epoch (the weights change within it): a cheap progress signal.
            label = "" if len(members) == 1 else f" [{m.name}]"
            log.info(
                "epoch %d/%d%s loss=%.6g fvu=%.4f dead=%d", epoch, first.epochs, label,
                m.epoch_sse / (n_train * d), m.epoch_sse / max(train_sst, 1e-30),
                int((m.since_fired >= m.dead_after).sum()),
            )
        if checkpoint is not None and epoch < first.epochs:
            extra = {"epoch": epoch, "generator": generator.get_state()}
            extra.update({f"{m.name}/since_fired": m.since_fired for m in members})
            save_checkpoint(Path(checkpoint), identity, parts, extra)
    for curve in points.values():  # a last window cut short (fewer batches than planned)
        curve.flush()


def _measure(members, batches, heldout_raw, heldout_h5, labels, head_weight, train_sst):
    """Each member in eval mode with its held-out metrics and training FVU, by name."""
    heldout = members[0].sae.prepare(heldout_raw)
    results = {}
    for m in members:
        m.sae.eval()
        metrics: dict[str, Any] = _evaluate_named(
            m.sae, heldout, heldout_h5, labels=labels, head=head_weight
        )
        metrics["train_fvu"] = stream_fvu(m.sae, batches, train_sst)
        metrics.update(
            {"n_train": batches.n, "n_heldout": heldout.shape[0], "d": batches.d,
             "n_features": m.sae.n_features}
        )
        log.info(
            "%s held-out: fvu=%.4f l0=%.2f dead_fraction=%.4f dense_fraction=%.4f (train fvu=%.4f)",
            m.name, metrics["fvu"], metrics["l0"], metrics["dead_fraction"],
            metrics["dense_fraction"], metrics["train_fvu"],
        )
        results[m.name] = (m.sae, metrics)
    return results


def _evaluate_named(sae: TopKSAE, prepared: torch.Tensor, path: str | os.PathLike, **kwargs) -> dict:
    try:
        return evaluate_sae(sae, prepared, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _write_outputs(sae, metrics, cfg, out_weights, out_json, train_h5, heldout_h5) -> None:
    save_sae(out_weights, sae, {"config": cfg.to_dict(), "metrics": metrics})
    write_json(
        out_json,
        {
            "config": cfg.to_dict(),
            **shape_metadata(sae),
            "metrics": metrics,
            "train_cache": str(train_h5),
            "heldout_cache": str(heldout_h5),
        },
    )


def run(
    train_h5: str | os.PathLike,
    heldout_h5: str | os.PathLike,
    out_weights: str | os.PathLike,
    out_json: str | os.PathLike,
    cfg: SAETrainConfig,
    head: str | os.PathLike | None = None,
    evals: Mapping[str, str | os.PathLike] | None = None,
    curves: CurvesSink | None = None,
) -> dict[str, Any]:
    """Stage ``train_sae``: train, write ``sae.safetensors`` and ``sae.json``; return the metrics.

    The resumable state lives in ``checkpoint.pt`` beside the weights, never among the outputs.
    ``curves``: see :data:`CurvesSink`.
    """
    checkpoint = Path(out_weights).with_name(CHECKPOINT_NAME)
    sae, metrics = train_sae(train_h5, heldout_h5, cfg, head=head, checkpoint=checkpoint, evals=evals, curves=curves)
    _write_outputs(sae, metrics, cfg, out_weights, out_json, train_h5, heldout_h5)
    return metrics


def run_sweep(
    train_h5: str | os.PathLike | Mapping[str, str | os.PathLike],
    heldout_h5: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfgs: Mapping[str, SAETrainConfig],
    head: str | os.PathLike | None = None,
    evals: Mapping[str, str | os.PathLike] | None = None,
    curves: CurvesSink | None = None,
) -> dict[str, Any]:
    """Stage ``train_sae_sweep``: train every named SAE (one pass where they share the data
    keys) and write ``{out_dir}/{name}/sae.safetensors`` and ``sae.json`` for each; returns the
    metrics as ``{name}.{metric}``. ``train_h5``: one cache, or one per ``data`` value of the
    entries. ``curves``: see :data:`CurvesSink`."""
    out_dir = Path(out_dir)
    results = train_saes(
        train_h5, heldout_h5, cfgs, head=head, checkpoint=out_dir / f"sweep-{CHECKPOINT_NAME}", evals=evals, curves=curves
    )
    flat: dict[str, Any] = {}
    for name, (sae, metrics) in results.items():
        _write_outputs(
            sae, metrics, cfgs[name], out_dir / name / "sae.safetensors", out_dir / name / "sae.json",
            train_cache_for(train_h5, cfgs[name]), heldout_h5,
        )
        flat.update({f"{name}.{key}": value for key, value in metrics.items() if key != "splits"})
    return flat


__all__ = ["Trainer", "reconstruction_loss", "run", "run_sweep", "sweep_configs", "train_sae", "train_saes"]
