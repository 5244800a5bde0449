"""Top-K sparse autoencoder on cached image embeddings (stage ``train_sae``).

The SAE encodes ``E(z) = Select(W_enc (z - b_pre) + b_enc)`` and decodes
``D(s) = W_dec s + b_pre`` (DESIGN section 3; ``b_enc`` is zero unless trained with an encoder
bias). ``Select`` is Top-K per sample or Batch-Top-K. Decoder columns are the feature directions
and are kept at unit norm. Training and the regularizer never differentiate a dense
(batch x n_features) matmul: the pre-activations are computed once without autograd, only the k
kept entries are differentiated, and decoding gathers the active decoder columns
(``embedding_bag``).

Input convention: ``encode``, ``decode`` and ``forward`` work on *prepared* embeddings, i.e. after
:meth:`TopKSAE.prepare`, which applies the normalisation recorded in the SAE (``"l2"`` or
``"none"``). Callers holding raw embeddings call ``sae.prepare(x)`` first; the regularizers do so
themselves (by default: ``sae_penalty(..., inputs="raw")`` skips it as the reference code does,
see docs/penalty_scale.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from saeft.config import ConfigError, StageConfig, require
from saeft.config.stages import SAETrainConfig
from saeft.io import load_tensors, save_tensors, write_json
from saeft.training import CHECKPOINT_NAME, resume_checkpoint, save_checkpoint, warmup_cosine

log = logging.getLogger(__name__)

NORMALIZATIONS = ("l2", "none")
"""Allowed values of the SAE's input normalisation."""

ARCHITECTURES = ("topk", "batchtopk")
"""``topk``: k largest per sample; ``batchtopk``: k x batch largest over the batch in training,
a learned threshold at inference."""

B_PRE_INITS = ("mean", "median", "zero")
"""How ``b_pre`` starts: the data mean, its geometric median, or zero."""

_TENSOR_KEYS = ("b_pre", "W_enc", "W_dec")
# Added after the first file format; files without them load with their defaults.
_OPTIONAL_TENSOR_KEYS = ("b_enc", "threshold")
_META_KEYS = ("d", "n_features", "k", "normalize")
_META_DEFAULTS = {"architecture": "topk", "relu": False}

# Rows per chunk when evaluating; keeps the dense (rows, n_features) code small in memory.
_EVAL_CHUNK = 4096
# EMA rate of the Batch-Top-K inference threshold (the smallest value kept in each batch).
_THRESHOLD_MOMENTUM = 0.99


def topk_encode(z: torch.Tensor, W_enc: torch.Tensor, b_pre: torch.Tensor, k: int) -> torch.Tensor:
    """``TopK_k(W_enc (z - b_pre))`` as a dense ``(..., n_features)`` tensor, k non-zeros per row.

    The k largest *signed* pre-activations are kept (no ReLU, no encoder bias). Gradients flow to
    ``z`` (and to the weights, if they require grad) through the kept values.
    """
    pre = (z - b_pre) @ W_enc.T
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


class SparseCode(NamedTuple):
    """A batch of sparse codes as flat, row-sorted entries (the layout of ``embedding_bag``).

    Row ``b`` owns entries ``offsets[b]:offsets[b+1]``; ``rows[i]`` repeats that ownership.
    """

    values: torch.Tensor
    """(nnz,) the kept activations (differentiable)."""
    indices: torch.Tensor
    """(nnz,) int64 latent index of each entry."""
    rows: torch.Tensor
    """(nnz,) int64 batch row of each entry, non-decreasing."""
    offsets: torch.Tensor
    """(B,) int64 first entry of each row."""
    batch: int
    """Number of rows B."""


# Entries per chunk of gathered decoder columns in the decode backward (bounds its memory).
_GATHER_ENTRIES = 32768


def _sparse_rows_mm(indices, rows, values, n: int, dense: torch.Tensor) -> torch.Tensor:
    """``S @ dense`` for the (n, B) sparse matrix with ``S[indices[i], rows[i]] = values[i]``."""
    sparse = torch.sparse_coo_tensor(
        torch.stack([indices, rows]), values, (n, dense.shape[0]), check_invariants=False
    )
    return torch.sparse.mm(sparse, dense)


class _GatheredLinear(torch.autograd.Function):
    """``values[i] = (z - b_pre)[rows[i]] . W[indices[i]] + b[indices[i]]``: forward given,
    backward sparse.

    The forward values come from a dense no-grad matmul (every pre-activation is needed for the
    selection anyway); the backward touches only the kept entries: O(nnz x d) instead of the
    O(B x n_features x d) of differentiating the dense matmul.
    """

    @staticmethod
    def forward(ctx, values, z, b_pre, W, b, indices, rows, offsets):  # type: ignore[override]
        ctx.save_for_backward(z, b_pre, W, indices, rows, offsets)
        ctx.has_b = b is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, b_pre, W, indices, rows, offsets = ctx.saved_tensors
        grad_z = grad_b_pre = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_z = F.embedding_bag(indices, W, offsets, mode="sum", per_sample_weights=grad)
            if grad_z.shape[0] != z.shape[0]:  # trailing empty rows get no bag
                grad_z = F.pad(grad_z, (0, 0, 0, z.shape[0] - grad_z.shape[0]))
        per_latent = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            per_latent = torch.zeros(W.shape[0], dtype=grad.dtype).index_add_(0, indices, grad)
        if ctx.needs_input_grad[2]:
            # Summed over rows, the input gradient is the per-latent total times W.
            grad_b_pre = -(per_latent @ W)
        if ctx.needs_input_grad[3]:
            grad_W = _sparse_rows_mm(indices, rows, grad, W.shape[0], z - b_pre)
        if ctx.needs_input_grad[4]:
            grad_b = per_latent
        return None, grad_z, grad_b_pre, grad_W, grad_b, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``out[b] = sum_{i in row b} values[i] * Wt[indices[i]]`` (``Wt``: decoder columns as rows)
    by ``embedding_bag``, with a backward that also stays O(nnz x d)."""

    @staticmethod
    def forward(ctx, values, Wt, indices, rows, offsets, batch):  # type: ignore[override]
        ctx.save_for_backward(values, Wt, indices, rows)
        out = F.embedding_bag(indices, Wt, offsets, mode="sum", per_sample_weights=values)
        if out.shape[0] != batch:  # trailing empty rows get no bag
            out = F.pad(out, (0, 0, 0, batch - out.shape[0]))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, Wt, indices, rows = ctx.saved_tensors
        grad_values = grad_Wt = None
        if ctx.needs_input_grad[0]:
            # Row-wise dots of gathered columns with the output gradient, chunked for memory.
            parts = []
            for start in range(0, indices.numel(), _GATHER_ENTRIES):
                sl = slice(start, start + _GATHER_ENTRIES)
                parts.append((Wt[indices[sl]] * grad[rows[sl]]).sum(dim=-1))
            grad_values = torch.cat(parts) if parts else values.new_zeros(0)
        if ctx.needs_input_grad[1]:
            grad_Wt = _sparse_rows_mm(indices, rows, values, Wt.shape[0], grad)
        return grad_values, grad_Wt, None, None, None, None


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """``dense(code) @ W_dec.T`` (no bias) from the kept entries only: an ``embedding_bag`` over
    decoder columns, O(nnz x d); gradients reach ``code.values`` and ``W_dec``."""
    # embedding_bag wants the columns as contiguous rows; the copy is O(d x n), the dense
    # decode it replaces O(B x d x n).
    return _SparseDecode.apply(
        code.values, W_dec.T.contiguous(), code.indices, code.rows, code.offsets, code.batch
    )


def to_dense(code: SparseCode, n_features: int) -> torch.Tensor:
    """The ``(B, n_features)`` dense form of ``code`` (differentiable in the values)."""
    dense = code.values.new_zeros(code.batch * n_features)
    return dense.index_put((code.rows * n_features + code.indices,), code.values).view(
        code.batch, n_features
    )


def _flat_code(values, z, b_pre, W, b, indices, rows, offsets, batch, relu) -> SparseCode:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, b_pre, W, b)):
        values = _GatheredLinear.apply(values, z, b_pre, W, b, indices, rows, offsets)
    if relu:
        values = torch.relu(values)
    return SparseCode(values, indices, rows, offsets, batch)


class TopKSAE(torch.nn.Module):
    """Top-K (or Batch-Top-K) sparse autoencoder with unit-norm decoder columns.

    ``E(z) = Select(W_enc (z - b_pre) + b_enc)``, ``D(s) = W_dec s + b_pre``. ``Select`` keeps
    the k largest pre-activations per row (``topk``) or, in training, the k x B largest of the
    batch (``batchtopk``; at inference those above the learned ``threshold``, so one sample's
    code does not depend on its batch). ``relu`` applies a ReLU to the kept values.
    """

    def __init__(
        self,
        d: int,
        n_features: int,
        k: int,
        normalize: str = "l2",
        *,
        architecture: str = "topk",
        relu: bool = False,
        tied_init: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        """Build an SAE for ``d``-dim embeddings with ``n_features`` features, ``k`` active.

        ``tied_init`` starts the encoder as the decoder's transpose; ``generator`` makes the
        random initialisation reproducible.
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
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"TopKSAE: architecture must be one of {', '.join(ARCHITECTURES)}, "
                f"got {architecture!r}"
            )
        self.d = d
        self.n_features = n_features
        self.k = k
        self.normalize = normalize
        self.architecture = architecture
        self.relu = bool(relu)

        W_dec = torch.randn(d, n_features, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=0, keepdim=True)
        self.b_pre = torch.nn.Parameter(torch.zeros(d))
        if tied_init:
            # Each feature starts by reading the direction it writes.
            W_enc = W_dec.T.clone()
        else:
            W_enc = torch.randn(n_features, d, generator=generator) / d**0.5
        self.W_enc = torch.nn.Parameter(W_enc)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        # Batch-Top-K inference threshold; learned as an EMA during training, unused by topk.
        self.register_buffer("threshold", torch.zeros(()))
        # Training-only state (checkpointed with the module, not saved in the SAE file).
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, n_features={self.n_features}, k={self.k}, "
            f"normalize={self.normalize!r}, architecture={self.architecture!r}, relu={self.relu}"
        )

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Apply the SAE's recorded input normalisation (L2 over the last dim, or identity)."""
        if self.normalize == "l2":
            return F.normalize(z, dim=-1)
        return z

    def pre_activations(self, z: torch.Tensor) -> torch.Tensor:
        """Dense ``W_enc (z - b_pre) + b_enc`` of prepared ``z`` (differentiable)."""
        return torch.addmm(self.b_enc, z - self.b_pre, self.W_enc.T)

    def encode_sparse(
        self, z: torch.Tensor, *, pre: torch.Tensor | None = None, frozen: bool = False
    ) -> SparseCode:
        """Sparse code of prepared ``z`` (B, d), with a sparse backward (see :class:`SparseCode`).

        ``pre`` may pass the already computed (no-grad) pre-activations. ``frozen`` uses the
        parameters detached (gradient reaches ``z`` only) and the inference selection, and
        never updates the Batch-Top-K threshold.
        """
        if z.ndim != 2:
            raise ValueError(f"encode_sparse: expected (B, d) embeddings, got {tuple(z.shape)}")
        W_enc, b_enc, b_pre = self.W_enc, self.b_enc, self.b_pre
        if frozen:
            W_enc, b_enc, b_pre = W_enc.detach(), b_enc.detach(), b_pre.detach()
        batch = z.shape[0]
        if pre is None:
            with torch.no_grad():
                pre = torch.addmm(b_enc, z - b_pre, W_enc.T)
        pre = pre.detach()
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            rows = torch.arange(batch).repeat_interleave(self.k)
            offsets = torch.arange(0, batch * self.k, self.k)
            values, indices = values.reshape(-1), indices.reshape(-1)
        else:
            if self.training and not frozen:
                flat_values, flat = pre.reshape(-1).topk(min(self.k * batch, pre.numel()), sorted=False)
                with torch.no_grad():
                    kept_min = flat_values.min()
                    if self.relu:
                        kept_min = kept_min.clamp_min(0)
                    # Running mean over the first updates, then an EMA: no bias towards the
                    # initial zero in short runs.
                    self.threshold_updates.add_(1)
                    rate = max(1 - _THRESHOLD_MOMENTUM, 1 / self.threshold_updates.item())
                    self.threshold.add_(rate * (kept_min - self.threshold))
                flat = flat.sort().values
            else:
                flat = torch.nonzero(pre.reshape(-1) > self.threshold).flatten()
            rows, indices = flat // self.n_features, flat % self.n_features
            values = pre.reshape(-1)[flat]
            offsets = torch.searchsorted(rows, torch.arange(batch))
        return _flat_code(values, z, b_pre, W_enc, b_enc, indices, rows, offsets, batch, self.relu)

    def decode_sparse(self, code: SparseCode) -> torch.Tensor:
        """Reconstruction ``W_dec s + b_pre`` from a sparse code, without the dense matmul."""
        return sparse_decode(code, self.W_dec) + self.b_pre

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Sparse code of *prepared* embeddings ``z`` (..., d) -> dense (..., n_features)."""
        if self.architecture == "topk" and not self.relu and not self.b_enc.any():
            # The original contract, differentiable through the dense path.
            return topk_encode(z, self.W_enc, self.b_pre, self.k)
        lead = z.shape[:-1]
        code = self.encode_sparse(z.reshape(-1, self.d))
        return to_dense(code, self.n_features).reshape(*lead, self.n_features)

    def decode(self, s: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``s @ W_dec.T + b_pre`` (in prepared space)."""
        return s @ self.W_dec.T + self.b_pre

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_hat, s)`` for *prepared* embeddings ``z``; ``s`` dense, ``z_hat`` decoded sparsely."""
        lead = z.shape[:-1]
        flat = z.reshape(-1, self.d)
        code = self.encode_sparse(flat)
        z_hat = self.decode_sparse(code).reshape(*lead, self.d)
        return z_hat, to_dense(code, self.n_features).reshape(*lead, self.n_features)

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

    ``extra_metadata`` (JSON-serialisable) is stored beside ``d``, ``n_features``, ``k``,
    ``normalize``, ``architecture`` and ``relu``, which it must not override.
    """
    meta: dict[str, Any] = {
        "d": sae.d,
        "n_features": sae.n_features,
        "k": sae.k,
        "normalize": sae.normalize,
        "architecture": sae.architecture,
        "relu": sae.relu,
    }
    clash = sorted(set(extra_metadata or {}) & set(meta))
    if clash:
        raise ValueError(f"save_sae: extra_metadata must not set {', '.join(clash)}")
    meta.update(extra_metadata or {})
    tensors = {name: getattr(sae, name) for name in _TENSOR_KEYS + _OPTIONAL_TENSOR_KEYS}
    save_tensors(path, tensors, meta)


def load_sae(path: str | os.PathLike, *, trainable: bool = False) -> TopKSAE:
    """Load an SAE written by :func:`save_sae` (on CPU, eval mode).

    Its parameters are frozen (``requires_grad=False``) unless ``trainable``. Files from before
    ``b_enc``, ``threshold``, ``architecture`` and ``relu`` existed load with their defaults
    (zero bias, Top-K, no ReLU). A file with missing or unexpected keys, or shapes that
    contradict its metadata, raises ``ValueError`` naming it.
    """
    tensors, meta = load_tensors(path)
    # A fixed order, so the first mismatch reported does not depend on hashing.
    names = [name for name in _TENSOR_KEYS + _OPTIONAL_TENSOR_KEYS if name in tensors]
    if not set(_TENSOR_KEYS) <= set(tensors) <= set(_TENSOR_KEYS + _OPTIONAL_TENSOR_KEYS):
        raise ValueError(
            f"{path}: not an SAE file: tensors {sorted(tensors)}, expected {sorted(_TENSOR_KEYS)}"
            f" (and optionally {', '.join(_OPTIONAL_TENSOR_KEYS)})"
        )
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path}: not an SAE file: metadata lacks {', '.join(missing)}")
    meta = {**_META_DEFAULTS, **meta}
    try:
        sae = TopKSAE(
            meta["d"], meta["n_features"], meta["k"], meta["normalize"],
            architecture=meta["architecture"], relu=meta["relu"],
        )
    except ValueError as exc:
        raise ValueError(f"{path}: invalid SAE metadata ({exc})") from exc
    for name in names:
        expected = tuple(getattr(sae, name).shape)
        got = tuple(tensors[name].shape)
        if got != expected:
            raise ValueError(f"{path}: tensor {name} has shape {got}, expected {expected}")
    with torch.no_grad():
        for name in names:
            getattr(sae, name).copy_(tensors[name])
    sae.requires_grad_(trainable)
    return sae.eval()


SAE_DATA = ("id", "pretrain")
"""Allowed values of ``sae.data``."""

LR_DECAYS = ("cosine", "none")
"""Allowed learning-rate schedules after warm-up."""

SWEEP_NAME = re.compile(r"[a-z0-9_]+")
# Keys that fix the order in which batches are read: SAEs sharing them train in one pass.
_DATA_KEYS = ("epochs", "batch_size", "seed", "normalize", "shuffle_buffer")


def sweep_configs(section: Mapping[str, Any]) -> dict[str, SAETrainConfig]:
    """The SAEs of ``sae.sweep``: each entry's overrides on the other ``sae`` keys, by name."""
    return SAETrainConfig.from_dict(dict(section)).sweep_configs()


def read_embeddings(path: str | os.PathLike) -> torch.Tensor:
    """Read ``/embeddings`` (N, d) of an activation cache into a float32 tensor."""
    return _read_cache(path)[0]


def _read_cache(path: str | os.PathLike, labels: bool = False):
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such activation cache")
    try:
        with h5py.File(path, "r") as handle:
            dataset = _embeddings_dataset(handle, path)
            array = dataset[...]
            label_array = handle["labels"][...] if labels and "labels" in handle else None
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc
    embeddings = torch.from_numpy(array).to(torch.float32)
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{path}: /embeddings contains NaN or infinite values")
    return embeddings, (None if label_array is None else torch.from_numpy(label_array).long())


def _embeddings_dataset(handle, path):
    import h5py

    dataset = handle.get("embeddings")
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"{path}: no /embeddings dataset")
    if dataset.ndim != 2:
        raise ValueError(f"{path}: /embeddings must be 2-D (N, d), got shape {dataset.shape}")
    return dataset


class ChunkBatches:
    """Batches of an HDF5 cache read whole chunks at a time, never row by row.

    Each epoch visits the chunks in a random order, concatenates up to ``buffer_rows`` rows of
    them, shuffles those in memory and cuts batches (the remainder carries into the next buffer).
    ``shuffle=False`` reads in file order. Uses only ``generator`` for randomness.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, buffer_rows: int) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such activation cache")
        try:
            self.handle = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValueError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        self.dataset = _embeddings_dataset(self.handle, self.path)
        self.n, self.d = self.dataset.shape
        self.chunk_rows = self.dataset.chunks[0] if self.dataset.chunks else max(1, (1 << 20) // (4 * max(self.d, 1)))
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, self.chunk_rows, batch_size)

    def close(self) -> None:
        self.handle.close()

    def _read(self, start: int) -> torch.Tensor:
        rows = torch.from_numpy(self.dataset[start : start + self.chunk_rows]).to(torch.float32)
        if not torch.isfinite(rows).all():
            raise ValueError(f"{self.path}: /embeddings contains NaN or infinite values")
        return rows

    def epoch(self, generator: torch.Generator | None, shuffle: bool = True):
        """Yield the batches of one pass (the last one may be smaller)."""
        starts = torch.arange(0, self.n, self.chunk_rows)
        if shuffle:
            starts = starts[torch.randperm(len(starts), generator=generator)]
        pending: list[torch.Tensor] = []
        pending_rows = 0
        carry = torch.empty(0, self.d)
        for i, start in enumerate(starts.tolist()):
            pending.append(self._read(start))
            pending_rows += pending[-1].shape[0]
            if pending_rows < self.buffer_rows and i < len(starts) - 1:
                continue
            buffer = torch.cat([carry, *pending])
            pending, pending_rows = [], 0
            if shuffle:
                buffer = buffer[torch.randperm(buffer.shape[0], generator=generator)]
            full = buffer.shape[0] // self.batch_size * self.batch_size
            yield from buffer[:full].split(self.batch_size)
            carry = buffer[full:]
        if carry.shape[0]:
            yield carry


def geometric_median(x: torch.Tensor, iterations: int = 30, max_rows: int = 8192) -> torch.Tensor:
    """Weiszfeld estimate of the geometric median of the rows of ``x`` (on at most
    ``max_rows`` evenly spaced rows, float64)."""
    step = max(1, x.shape[0] // max_rows)
    points = x[::step].double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median.float()


@torch.no_grad()
def evaluate_sae(
    sae: TopKSAE,
    prepared: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    head: torch.Tensor | None = None,
) -> dict[str, float]:
    """Reconstruction metrics of ``sae`` on already prepared embeddings (N, d).

    ``fvu`` is the summed squared error over the summed squared deviation from these embeddings'
    own mean; ``l0`` the mean count of non-zeros per row; ``dead_fraction`` the fraction of
    features that are never non-zero here; ``dense_fraction`` the fraction firing on more than
    10% of the rows. With ``labels`` and a zero-shot ``head`` (C, d) (logits =
    ``normalize(x) @ head.T``): ``zeroshot_acc`` of the embeddings and ``zeroshot_acc_recon`` of
    their reconstructions, and ``zeroshot_acc_kept`` their ratio.
    """
    n = prepared.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to compute FVU, got {n}")
    was_training = sae.training
    sae.eval()
    # float64 accumulators: sums over many rows lose precision in float32.
    mean = prepared.double().mean(dim=0)
    sse = 0.0
    sst = 0.0
    nonzero = 0
    fires = torch.zeros(sae.n_features, dtype=torch.float64)
    correct = correct_recon = 0
    for start in range(0, n, _EVAL_CHUNK):
        chunk = prepared[start : start + _EVAL_CHUNK]
        code = sae.encode_sparse(chunk)
        z_hat = sae.decode_sparse(code)
        sse += (z_hat.double() - chunk.double()).pow(2).sum().item()
        sst += (chunk.double() - mean).pow(2).sum().item()
        active = code.values != 0
        nonzero += int(active.sum().item())
        fires.index_add_(0, code.indices[active], torch.ones(int(active.sum()), dtype=torch.float64))
        if head is not None and labels is not None:
            target = labels[start : start + _EVAL_CHUNK]
            correct += int((F.normalize(chunk, dim=-1) @ head.T).argmax(-1).eq(target).sum())
            correct_recon += int((F.normalize(z_hat, dim=-1) @ head.T).argmax(-1).eq(target).sum())
    sae.train(was_training)
    if sst == 0.0:
        raise ValueError("all embeddings are identical: FVU is undefined")
    fvu = sse / sst
    metrics = {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": nonzero / n,
        "dead_fraction": (fires == 0).double().mean().item(),
        "dense_fraction": (fires > 0.1 * n).double().mean().item(),
        "mse": sse / prepared.numel(),
    }
    if head is not None and labels is not None:
        metrics["zeroshot_acc"] = correct / n
        metrics["zeroshot_acc_recon"] = correct_recon / n
        metrics["zeroshot_acc_kept"] = correct_recon / max(correct, 1)
    return metrics


def train_sae(
    train_h5: str | os.PathLike,
    heldout_h5: str | os.PathLike,
    cfg: SAETrainConfig,
    *,
    head: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    evals: Mapping[str, str | os.PathLike] | None = None,
) -> tuple[TopKSAE, dict[str, Any]]:
    """Train one SAE on the cache ``train_h5``; metrics are measured on ``heldout_h5`` and, per
    name, on each cache of ``evals`` (``metrics["splits"][name]``: FVU, L0, dead fraction... on
    the ID test split and every shift).

    Deterministic for a fixed ``cfg.seed`` on CPU. Returns the SAE (eval mode) and a metrics dict:
    ``fvu``, ``explained_variance``, ``l0``, ``dead_fraction``, ``dense_fraction``, ``mse``
    (held-out; with ``head`` also the zero-shot accuracies), ``train_fvu``, ``n_train``,
    ``n_heldout``, ``d``, ``n_features``. With ``checkpoint``, state is saved there after every
    epoch and a matching one is resumed from (see :func:`train_saes`).
    """
    result = train_saes(train_h5, heldout_h5, {"sae": cfg}, head=head, checkpoint=checkpoint, evals=evals)
    return result["sae"]


def train_saes(
    train_h5: str | os.PathLike,
    heldout_h5: str | os.PathLike,
    cfgs: Mapping[str, SAETrainConfig],
    *,
    head: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    evals: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, tuple[TopKSAE, dict[str, Any]]]:
    """Train several SAEs on one cache; those sharing the data keys (epochs, batch size, seed,
    normalisation, shuffle buffer) train side by side on the same batches, in one pass.

    With ``checkpoint`` (a file path; groups after the first add ``.{i}``), each group saves its
    state after every epoch and resumes from a checkpoint saved under the same configs; the
    checkpoint is removed when its group is done. Resuming gives bitwise the same weights as an
    uninterrupted run on CPU.
    """
    heldout_raw, labels = _read_cache(heldout_h5, labels=True)
    head_weight = None
    if head is not None:
        head_weight = load_tensors(head)[0].get("weight")
        if head_weight is None:
            raise ValueError(f"{head}: no 'weight' tensor (a zero-shot head)")
        head_weight = head_weight.float()
    groups: dict[tuple, dict[str, SAETrainConfig]] = {}
    for name, cfg in cfgs.items():
        groups.setdefault(tuple(getattr(cfg, key) for key in _DATA_KEYS), {})[name] = cfg
    results: dict[str, tuple[TopKSAE, dict[str, Any]]] = {}
    for i, group in enumerate(groups.values()):
        path = None
        if checkpoint is not None:
            path = Path(checkpoint) if i == 0 else Path(f"{checkpoint}.{i}")
        results.update(_train_group(train_h5, heldout_h5, heldout_raw, labels, head_weight, group, path))
    for name, path in (evals or {}).items():
        raw, split_labels = _read_cache(path, labels=True)
        for sae, metrics in results.values():
            metrics.setdefault("splits", {})[name] = _evaluate_named(sae, sae.prepare(raw), path, labels=split_labels, head=head_weight)
    return {name: results[name] for name in cfgs}


class Trainer:
    """One SAE and its training state (AdamW, schedule, dead-latent counters); :meth:`step`
    trains it on one prepared batch. :func:`train_saes` drives one per SAE."""

    def __init__(self, name: str, cfg: SAETrainConfig, d: int, total_steps: int, n_train: int) -> None:
        self.name, self.cfg = name, cfg
        self.dead_after = cfg.dead_after or n_train
        """Samples without firing after which a latent counts as dead (``sae.dead_after``, or one epoch)."""
        n_features = cfg.expansion * d
        require(cfg.k <= n_features, "sae.k", f"must be <= n_features = expansion * d = {n_features}")
        generator = torch.Generator().manual_seed(cfg.seed)
        self.sae = TopKSAE(
            d, n_features, cfg.k, cfg.normalize, architecture=cfg.architecture, relu=cfg.relu,
            tied_init=cfg.tied_init, generator=generator,
        )
        self.sae.b_enc.requires_grad_(cfg.encoder_bias)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.sae.parameters() if p.requires_grad],
            lr=cfg.lr, weight_decay=cfg.weight_decay,
        )
        if cfg.lr_decay == "cosine":
            self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, total_steps)
        else:
            warmup = max(cfg.warmup_steps, 1)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
            )
        # Samples since each latent last fired (dead latents feed the AuxK loss).
        self.since_fired = torch.zeros(n_features, dtype=torch.long)
        self.aux_k = min(cfg.aux_k or max(d // 2, 1), n_features)
        self.epoch_sse = 0.0

    def parts(self) -> dict[str, Any]:
        return {
            f"{self.name}/sae": self.sae,
            f"{self.name}/optimizer": self.optimizer,
            f"{self.name}/scheduler": self.scheduler,
        }

    def step(self, batch: torch.Tensor) -> None:
        """One optimiser step on a prepared batch: MSE + AuxK, unit-norm decoder kept."""
        sae, cfg = self.sae, self.cfg
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, batch - sae.b_pre, sae.W_enc.T)
        code = sae.encode_sparse(batch, pre=pre)
        recon = sae.decode_sparse(code)
        loss = F.mse_loss(recon, batch)
        with torch.no_grad():
            fired = torch.zeros(sae.n_features, dtype=torch.bool)
            fired[code.indices[code.values != 0]] = True
            self.since_fired += batch.shape[0]
            self.since_fired[fired] = 0
            dead = self.since_fired >= self.dead_after
            n_dead = int(dead.sum())
        if cfg.auxk_alpha > 0 and n_dead > 0:
            k_aux = min(self.aux_k, n_dead)
            values, indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            rows = torch.arange(batch.shape[0]).repeat_interleave(k_aux)
            offsets = torch.arange(0, batch.shape[0] * k_aux, k_aux)
            aux_code = _flat_code(
                values.reshape(-1), batch, sae.b_pre, sae.W_enc, sae.b_enc, indices.reshape(-1),
                rows, offsets, batch.shape[0], sae.relu,
            )
            # Dead latents learn to explain what the live ones miss (in the MSE's units).
            residual = (batch - recon).detach()
            loss = loss + cfg.auxk_alpha * F.mse_loss(sparse_decode(aux_code, sae.W_dec), residual)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        self.scheduler.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            self.epoch_sse += (recon - batch).double().pow(2).sum().item()


def _train_group(train_h5, heldout_h5, heldout_raw, labels, head_weight, cfgs, checkpoint):
    first = next(iter(cfgs.values()))
    batches = ChunkBatches(train_h5, first.batch_size, first.shuffle_buffer)
    try:
        n_train, d = batches.n, batches.d
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
        steps_per_epoch = -(-n_train // first.batch_size)
        members = [Trainer(name, cfg, d, steps_per_epoch * first.epochs, n_train=n_train) for name, cfg in cfgs.items()]
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
        for epoch in range(start_epoch, first.epochs + 1):
            for m in members:
                m.epoch_sse = 0.0
            for batch in batches.epoch(generator):
                batch = prepare(batch)
                for m in members:
                    m.step(batch)
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

        heldout = prepare(heldout_raw)
        results = {}
        for m in members:
            m.sae.eval()
            metrics: dict[str, Any] = _evaluate_named(
                m.sae, heldout, heldout_h5, labels=labels, head=head_weight
            )
            metrics["train_fvu"] = _stream_fvu(m.sae, batches, mean, train_sst)
            metrics.update(
                {"n_train": n_train, "n_heldout": heldout.shape[0], "d": d,
                 "n_features": m.sae.n_features}
            )
            log.info(
                "%s held-out: fvu=%.4f l0=%.2f dead_fraction=%.4f dense_fraction=%.4f (train fvu=%.4f)",
                m.name, metrics["fvu"], metrics["l0"], metrics["dead_fraction"],
                metrics["dense_fraction"], metrics["train_fvu"],
            )
            results[m.name] = (m.sae, metrics)
    finally:
        batches.close()
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return results


@torch.no_grad()
def _stream_fvu(sae: TopKSAE, batches: ChunkBatches, mean: torch.Tensor, sst: float) -> float:
    sse = 0.0
    for batch in batches.epoch(None, shuffle=False):
        batch = sae.prepare(batch)
        sse += (sae.decode_sparse(sae.encode_sparse(batch)).double() - batch.double()).pow(2).sum().item()
    return sse / max(sst, 1e-30)


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
            "d": sae.d,
            "n_features": sae.n_features,
            "k": sae.k,
            "normalize": sae.normalize,
            "architecture": sae.architecture,
            "relu": sae.relu,
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
) -> dict[str, Any]:
    """Stage ``train_sae``: train, write ``sae.safetensors`` and ``sae.json``; return the metrics.

    The resumable state lives in ``checkpoint.pt`` beside the weights, never among the outputs.
    """
    checkpoint = Path(out_weights).with_name(CHECKPOINT_NAME)
    sae, metrics = train_sae(train_h5, heldout_h5, cfg, head=head, checkpoint=checkpoint, evals=evals)
    _write_outputs(sae, metrics, cfg, out_weights, out_json, train_h5, heldout_h5)
    return metrics


def run_sweep(
    train_h5: str | os.PathLike,
    heldout_h5: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfgs: Mapping[str, SAETrainConfig],
    head: str | os.PathLike | None = None,
    evals: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Stage ``train_sae_sweep``: train every named SAE (one pass where they share the data
    keys) and write ``{out_dir}/{name}/sae.safetensors`` and ``sae.json`` for each; returns the
    metrics as ``{name}.{metric}``."""
    out_dir = Path(out_dir)
    results = train_saes(
        train_h5, heldout_h5, cfgs, head=head, checkpoint=out_dir / f"sweep-{CHECKPOINT_NAME}", evals=evals
    )
    flat: dict[str, Any] = {}
    for name, (sae, metrics) in results.items():
        _write_outputs(
            sae, metrics, cfgs[name], out_dir / name / "sae.safetensors", out_dir / name / "sae.json",
            train_h5, heldout_h5,
        )
        flat.update({f"{name}.{key}": value for key, value in metrics.items() if key != "splits"})
    return flat


__all__ = [
    "ARCHITECTURES",
    "NORMALIZATIONS",
    "ChunkBatches",
    "SAETrainConfig",
    "SparseCode",
    "Trainer",
    "TopKSAE",
    "evaluate_sae",
    "geometric_median",
    "load_sae",
    "read_embeddings",
    "run",
    "run_sweep",
    "save_sae",
    "sparse_decode",
    "sweep_configs",
    "to_dense",
    "topk_encode",
    "train_sae",
    "train_saes",
]
