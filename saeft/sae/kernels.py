"""Sparse autograd kernels of the SAE: codes as flat kept entries, a gathered encoder backward
and an ``embedding_bag`` decoder, so no dense (batch x n_features) matmul is ever differentiated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Entries per chunk of gathered decoder columns in the decode backward (bounds its memory).
_GATHER_ENTRIES = 32768


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


def gathered_code(values, z, b_pre, W, b, indices, rows, offsets, batch, relu) -> SparseCode:
    """The :class:`SparseCode` of kept pre-activations ``values`` (computed without autograd from
    ``(z - b_pre) @ W.T + b``), differentiable to whichever of ``z``, ``b_pre``, ``W``, ``b``
    require grad through the sparse backward of the kept entries; ``relu`` clips them at zero."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, b_pre, W, b)):
        values = _GatheredLinear.apply(values, z, b_pre, W, b, indices, rows, offsets)
    if relu:
        values = torch.relu(values)
    return SparseCode(values, indices, rows, offsets, batch)


__all__ = ["SparseCode", "gathered_code", "sparse_decode", "to_dense", "topk_encode"]
