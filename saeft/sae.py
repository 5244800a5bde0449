"""Top-K sparse autoencoder on cached image embeddings (stage ``train_sae``).

The SAE encodes ``E(z) = TopK_k(W_enc (z - b_pre))`` and decodes ``D(s) = W_dec s + b_pre``
(DESIGN section 3). Decoder columns are the feature directions and are kept at unit norm.

Input convention: ``encode``, ``decode`` and ``forward`` work on *prepared* embeddings, i.e. after
:meth:`TopKSAE.prepare`, which applies the normalisation recorded in the SAE (``"l2"`` or
``"none"``). Callers holding raw embeddings call ``sae.prepare(x)`` first; the regularizers do so
themselves, so the SAE is always applied to embeddings prepared the way it was trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saeft.config import StageConfig, require
from saeft.io import load_tensors, save_tensors, write_json

log = logging.getLogger(__name__)

NORMALIZATIONS = ("l2", "none")
"""Allowed values of the SAE's input normalisation."""

_TENSOR_KEYS = ("b_pre", "W_enc", "W_dec")
_META_KEYS = ("d", "n_features", "k", "normalize")

# Rows per chunk when evaluating; keeps the dense (rows, n_features) code small in memory.
_EVAL_CHUNK = 4096


def topk_encode(z: torch.Tensor, W_enc: torch.Tensor, b_pre: torch.Tensor, k: int) -> torch.Tensor:
    """``TopK_k(W_enc (z - b_pre))`` as a dense ``(..., n_features)`` tensor, k non-zeros per row.

    The k largest *signed* pre-activations are kept (no ReLU, no encoder bias). Gradients flow to
    ``z`` (and to the weights, if they require grad) through the kept values.
    """
    pre = (z - b_pre) @ W_enc.T
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


class TopKSAE(torch.nn.Module):
    """Top-K sparse autoencoder with unit-norm decoder columns and a tied initialisation."""

    def __init__(
        self,
        d: int,
        n_features: int,
        k: int,
        normalize: str = "l2",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Build an SAE for ``d``-dim embeddings with ``n_features`` features, ``k`` active.

        ``generator`` makes the random decoder initialisation reproducible.
        """
        super().__init__()
        for name, value in (("d", d), ("n_features", n_features), ("k", k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TopKSAE: {name} must be a positive integer, got {value!r}")
        if k > n_features:
            raise ValueError(f"TopKSAE: k ({k}) must not exceed n_features ({n_features})")
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                f"TopKSAE: normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}"
            )
        self.d = d
        self.n_features = n_features
        self.k = k
        self.normalize = normalize

        W_dec = torch.randn(d, n_features, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=0, keepdim=True)
        self.b_pre = torch.nn.Parameter(torch.zeros(d))
        # Tied init: each feature starts by reading the direction it writes.
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.W_dec = torch.nn.Parameter(W_dec)

    def extra_repr(self) -> str:
        return f"d={self.d}, n_features={self.n_features}, k={self.k}, normalize={self.normalize!r}"

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Apply the SAE's recorded input normalisation (L2 over the last dim, or identity)."""
        if self.normalize == "l2":
            return F.normalize(z, dim=-1)
        return z

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Sparse code of *prepared* embeddings ``z`` (..., d) -> (..., n_features)."""
        return topk_encode(z, self.W_enc, self.b_pre, self.k)

    def decode(self, s: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``s @ W_dec.T + b_pre`` (in prepared space)."""
        return s @ self.W_dec.T + self.b_pre

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_hat, s)`` for *prepared* embeddings ``z``."""
        s = self.encode(z)
        return self.decode(s), s

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder column to unit norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of ``W_dec.grad`` the component along each (unit) decoder column.

        That component would only change column norms, which renormalisation undoes anyway;
        removing it keeps Adam's moment estimates from being spent on it.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = (grad * self.W_dec).sum(dim=0, keepdim=True)
        grad.sub_(parallel * self.W_dec)


def save_sae(
    path: str | os.PathLike, sae: TopKSAE, extra_metadata: Mapping[str, Any] | None = None
) -> None:
    """Save the SAE weights and shape metadata as safetensors, atomically.

    ``extra_metadata`` (JSON-serialisable) is stored beside ``d``, ``n_features``, ``k`` and
    ``normalize``, which it must not override.
    """
    meta: dict[str, Any] = {
        "d": sae.d,
        "n_features": sae.n_features,
        "k": sae.k,
        "normalize": sae.normalize,
    }
    clash = sorted(set(extra_metadata or {}) & set(meta))
    if clash:
        raise ValueError(f"save_sae: extra_metadata must not set {', '.join(clash)}")
    meta.update(extra_metadata or {})
    tensors = {name: getattr(sae, name) for name in _TENSOR_KEYS}
    save_tensors(path, tensors, meta)


def load_sae(path: str | os.PathLike, *, trainable: bool = False) -> TopKSAE:
    """Load an SAE written by :func:`save_sae` (on CPU, eval mode).

    Its parameters are frozen (``requires_grad=False``) unless ``trainable``. A file with missing
    or unexpected keys, or shapes that contradict its metadata, raises ``ValueError`` naming it.
    """
    tensors, meta = load_tensors(path)
    if set(tensors) != set(_TENSOR_KEYS):
        raise ValueError(
            f"{path}: not an SAE file: tensors {sorted(tensors)}, expected {sorted(_TENSOR_KEYS)}"
        )
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path}: not an SAE file: metadata lacks {', '.join(missing)}")
    try:
        sae = TopKSAE(meta["d"], meta["n_features"], meta["k"], meta["normalize"])
    except ValueError as exc:
        raise ValueError(f"{path}: invalid SAE metadata ({exc})") from exc
    for name in _TENSOR_KEYS:
        expected = tuple(getattr(sae, name).shape)
        got = tuple(tensors[name].shape)
        if got != expected:
            raise ValueError(f"{path}: tensor {name} has shape {got}, expected {expected}")
    with torch.no_grad():
        for name in _TENSOR_KEYS:
            getattr(sae, name).copy_(tensors[name])
    sae.requires_grad_(trainable)
    return sae.eval()


@dataclasses.dataclass
class SAETrainConfig(StageConfig):
    """Settings of the ``train_sae`` stage (config key ``sae``)."""

    expansion: int = 4
    """Dictionary size as a multiple of the embedding dim: ``n_features = expansion * d``."""
    k: int = 32
    """Number of active features per embedding (Top-K)."""
    normalize: str = "l2"
    """Input normalisation before the SAE: ``"l2"`` (unit-norm embeddings) or ``"none"``."""
    epochs: int = 20
    """Passes over the training embeddings."""
    batch_size: int = 256
    """Embeddings per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed for the decoder initialisation and the shuffling (training is deterministic on CPU)."""

    def __post_init__(self) -> None:
        require(self.expansion >= 1, "sae.expansion", f"must be >= 1, got {self.expansion}")
        require(self.k >= 1, "sae.k", f"must be >= 1, got {self.k}")
        require(
            self.normalize in NORMALIZATIONS,
            "sae.normalize",
            f"must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}",
        )
        require(self.epochs >= 1, "sae.epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "sae.batch_size", f"must be >= 1, got {self.batch_size}")
        require(
            self.lr > 0 and self.lr != float("inf"), "sae.lr", f"must be > 0, got {self.lr}"
        )
        require(self.seed >= 0, "sae.seed", f"must be >= 0, got {self.seed}")


def read_embeddings(path: str | os.PathLike) -> torch.Tensor:
    """Read ``/embeddings`` (N, d) of an activation cache into a float32 tensor."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such activation cache")
    try:
        with h5py.File(path, "r") as handle:
            dataset = handle.get("embeddings")
            if not isinstance(dataset, h5py.Dataset):
                raise ValueError(f"{path}: no /embeddings dataset")
            if dataset.ndim != 2:
                raise ValueError(f"{path}: /embeddings must be 2-D (N, d), got shape {dataset.shape}")
            array = dataset[...]
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc
    embeddings = torch.from_numpy(array).to(torch.float32)
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{path}: /embeddings contains NaN or infinite values")
    return embeddings


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, prepared: torch.Tensor) -> dict[str, float]:
    """Reconstruction metrics of ``sae`` on already prepared embeddings (N, d).

    ``fvu`` is the summed squared error over the summed squared deviation from these embeddings'
    own mean; ``l0`` the mean count of non-zeros per row; ``dead_fraction`` the fraction of
    features that are never non-zero here.
    """
    n = prepared.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to compute FVU, got {n}")
    # float64 accumulators: sums over many rows lose precision in float32.
    mean = prepared.double().mean(dim=0)
    sse = 0.0
    sst = 0.0
    nonzero = 0
    active = torch.zeros(sae.n_features, dtype=torch.bool)
    for start in range(0, n, _EVAL_CHUNK):
        chunk = prepared[start : start + _EVAL_CHUNK]
        z_hat, s = sae(chunk)
        sse += (z_hat.double() - chunk.double()).pow(2).sum().item()
        sst += (chunk.double() - mean).pow(2).sum().item()
        is_active = s != 0
        nonzero += int(is_active.sum().item())
        active |= is_active.any(dim=0).cpu()
    if sst == 0.0:
        raise ValueError("all embeddings are identical: FVU is undefined")
    fvu = sse / sst
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": nonzero / n,
        "dead_fraction": 1.0 - active.double().mean().item(),
        "mse": sse / prepared.numel(),
    }


def train_sae(
    train_h5: str | os.PathLike, heldout_h5: str | os.PathLike, cfg: SAETrainConfig
) -> tuple[TopKSAE, dict[str, Any]]:
    """Train a Top-K SAE on the cache ``train_h5``; metrics are measured on ``heldout_h5``.

    Deterministic for a fixed ``cfg.seed`` on CPU. Returns the SAE (eval mode) and a metrics dict:
    ``fvu``, ``explained_variance``, ``l0``, ``dead_fraction``, ``mse`` (held-out), ``train_fvu``,
    ``n_train``, ``n_heldout``, ``d``, ``n_features``.
    """
    train_raw = read_embeddings(train_h5)
    heldout_raw = read_embeddings(heldout_h5)
    n_train, d = train_raw.shape
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
    n_features = cfg.expansion * d
    require(cfg.k <= n_features, "sae.k", f"must be <= n_features = expansion * d = {n_features}")

    generator = torch.Generator().manual_seed(cfg.seed)
    sae = TopKSAE(d, n_features, cfg.k, cfg.normalize, generator=generator)
    train = sae.prepare(train_raw)
    heldout = sae.prepare(heldout_raw)
    with torch.no_grad():
        sae.b_pre.copy_(train.mean(dim=0))
    train_sst = (train.double() - train.double().mean(dim=0)).pow(2).sum().item()

    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    sae.train()
    log.info(
        "training SAE: n_train=%d d=%d n_features=%d k=%d normalize=%s epochs=%d",
        n_train, d, n_features, cfg.k, cfg.normalize, cfg.epochs,
    )
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n_train, generator=generator)
        epoch_sse = 0.0
        for start in range(0, n_train, cfg.batch_size):
            batch = train[order[start : start + cfg.batch_size]]
            z_hat, _ = sae(batch)
            loss = F.mse_loss(z_hat, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_decoder_grad_()
            optimizer.step()
            sae.normalize_decoder_()
            epoch_sse += loss.item() * batch.numel()
        # Running FVU over the epoch (the weights change within it): cheap progress signal.
        log.info(
            "epoch %d/%d loss=%.6g fvu=%.4f",
            epoch, cfg.epochs, epoch_sse / train.numel(), epoch_sse / max(train_sst, 1e-30),
        )
    sae.eval()

    metrics: dict[str, Any] = _evaluate_named(sae, heldout, heldout_h5)
    metrics["train_fvu"] = _evaluate_named(sae, train, train_h5)["fvu"]
    metrics.update(
        {"n_train": n_train, "n_heldout": heldout.shape[0], "d": d, "n_features": n_features}
    )
    log.info(
        "held-out: fvu=%.4f l0=%.2f dead_fraction=%.4f (train fvu=%.4f)",
        metrics["fvu"], metrics["l0"], metrics["dead_fraction"], metrics["train_fvu"],
    )
    return sae, metrics


def _evaluate_named(sae: TopKSAE, prepared: torch.Tensor, path: str | os.PathLike) -> dict:
    try:
        return evaluate_sae(sae, prepared)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def run(
    train_h5: str | os.PathLike,
    heldout_h5: str | os.PathLike,
    out_weights: str | os.PathLike,
    out_json: str | os.PathLike,
    cfg: SAETrainConfig,
) -> dict[str, Any]:
    """Stage ``train_sae``: train, write ``sae.safetensors`` and ``sae.json``; return the metrics."""
    sae, metrics = train_sae(train_h5, heldout_h5, cfg)
    save_sae(out_weights, sae, {"config": cfg.to_dict(), "metrics": metrics})
    write_json(
        out_json,
        {
            "config": cfg.to_dict(),
            "d": sae.d,
            "n_features": sae.n_features,
            "k": sae.k,
            "normalize": sae.normalize,
            "metrics": metrics,
            "train_cache": str(train_h5),
            "heldout_cache": str(heldout_h5),
        },
    )
    return metrics


__all__ = [
    "NORMALIZATIONS",
    "SAETrainConfig",
    "TopKSAE",
    "evaluate_sae",
    "load_sae",
    "read_embeddings",
    "run",
    "save_sae",
    "topk_encode",
    "train_sae",
]
