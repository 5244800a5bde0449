"""Sparse autograd kernels of the SAE: codes as flat kept entries, decoded and differentiated
with ``embedding_bag``'s native kernels, so no dense (batch x n_features) matmul is ever
differentiated and no (entries x d) gather is ever materialised.

The backward passes are, over the nnz kept entries, O(nnz x d) each:

- the kept values' gradient, a *row dot* ``grad[rows[i]] . W[indices[i]]``
  (:func:`row_dots`: the native gradient of ``embedding_bag``'s per-sample weights);
- the decoder's and the encoder's weight gradients, a *row scatter*
  ``out[j] = sum_{i: indices[i] = j} w[i] dense[rows[i]]`` (:func:`scatter_rows`): one
  ``embedding_bag`` with the roles swapped (latents as bags, batch rows as the table) over the
  entries sorted by latent, a :class:`LatentOrder` sorted once per code and shared by both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_SUM = 0  # embedding_bag's mode code for "sum"
_NO_PADDING = -1


def topk_encode(z: torch.Tensor, W_enc: torch.Tensor, b_pre: torch.Tensor, k: int) -> torch.Tensor:
    """``TopK_k(W_enc (z - b_pre))`` as a dense ``(..., n_features)`` tensor, k non-zeros per row.

    The k largest *signed* pre-activations are kept (no ReLU, no encoder bias). Gradients flow to
    ``z`` (and to the weights, if they require grad) through the kept values.
    """
    pre = (z - b_pre) @ W_enc.T
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


class LatentOrder(NamedTuple):
    """A code's entries grouped by latent (a stable sort): what the weight gradients scatter by."""

    perm: torch.Tensor
    """(nnz,) the entries in latent order."""
    rows: torch.Tensor
    """(nnz,) ``rows[perm]``: the batch row of each entry, in latent order."""
    starts: torch.Tensor
    """(n_features,) the first sorted entry of each latent (empty latents start where the next
    one does)."""


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
    order: LatentOrder | None = None
    """The entries by latent, when weights are trained through this code (else ``None``)."""


def latent_order(indices: torch.Tensor, rows: torch.Tensor, n: int) -> LatentOrder:
    """Sort entries by latent index (stable, so sums are reproducible) for :func:`scatter_rows`."""
    perm = torch.argsort(indices, stable=True)
    counts = torch.bincount(indices, minlength=n)
    return LatentOrder(perm, rows[perm], counts.cumsum(0) - counts)


def row_dots(dense: torch.Tensor, W: torch.Tensor, indices, offsets, rows) -> torch.Tensor:
    """``out[i] = dense[rows[i]] . W[indices[i]]`` for every entry (nnz,), by the native
    backward of ``embedding_bag``'s per-sample weights (no gathered copy of ``W``)."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        dense.contiguous(), W, indices, offsets, rows, _SUM, _NO_PADDING
    )


def scatter_rows(dense: torch.Tensor, weights: torch.Tensor, order: LatentOrder) -> torch.Tensor:
    """``out[j] = sum_{i: indices[i] = j} weights[i] * dense[rows[i]]``, an ``(n, d)`` tensor
    (``S^T dense`` for the sparse ``S`` of the entries): an ``embedding_bag`` whose bags are
    the latents and whose table is ``dense``, each output row summed by one thread."""
    return bag_sum(dense, weights[order.perm], order.rows, order.starts, order.starts.shape[0])


def bag_sum(W: torch.Tensor, weights: torch.Tensor, indices, offsets, bags: int) -> torch.Tensor:
    """``out[b] = sum_{i in bag b} weights[i] * W[indices[i]]``, a ``(bags, d)`` tensor
    (bag ``b`` is entries ``offsets[b]:offsets[b+1]``)."""
    # The aten op itself: F.embedding_bag's argument checks cost more than a small bag sum.
    out = torch.embedding_bag(W, indices, offsets, False, _SUM, False, weights)[0]
    if out.shape[0] != bags:  # trailing empty bags get no row on some versions
        out = F.pad(out, (0, 0, 0, bags - out.shape[0]))
    return out


class _GatheredLinear(torch.autograd.Function):
    """``values[i] = (z - b_pre)[rows[i]] . W[indices[i]] + b[indices[i]]``: forward given,
    backward sparse.

    The forward values come from a dense no-grad matmul (every pre-activation is needed for the
    selection anyway); the backward touches only the kept entries: O(nnz x d) instead of the
    O(B x n_features x d) of differentiating the dense matmul.
    """

    @staticmethod
    def forward(ctx, values, z, b_pre, W, b, indices, rows, offsets, order):  # type: ignore[override]
        ctx.save_for_backward(z, b_pre, W, indices, rows, offsets)
        ctx.order = order
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, b_pre, W, indices, rows, offsets = ctx.saved_tensors
        grad_z = grad_b_pre = grad_W = grad_b = per_latent = None
        grad = grad.contiguous()
        if ctx.needs_input_grad[1]:
            grad_z = bag_sum(W, grad, indices, offsets, z.shape[0])
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            per_latent = grad.new_zeros(W.shape[0]).index_add_(0, indices, grad)
        if ctx.needs_input_grad[2]:
            # Summed over rows, the input gradient is the per-latent total times W.
            grad_b_pre = -(per_latent @ W)
        if ctx.needs_input_grad[3]:
            order = ctx.order or latent_order(indices, rows, W.shape[0])
            grad_W = scatter_rows(z - b_pre, grad, order)
        if ctx.needs_input_grad[4]:
            grad_b = per_latent
        return None, grad_z, grad_b_pre, grad_W, grad_b, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``out[b] = sum_{i in row b} values[i] * Wt[indices[i]]`` (``Wt``: decoder columns as rows)
    by ``embedding_bag``; the backward is a row dot (values) and a row scatter (``Wt``)."""

    @staticmethod
    def forward(ctx, values, Wt, indices, rows, offsets, batch, order):  # type: ignore[override]
        ctx.save_for_backward(values, Wt, indices, rows, offsets)
        ctx.order = order
        return bag_sum(Wt, values, indices, offsets, batch)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, Wt, indices, rows, offsets = ctx.saved_tensors
        grad_values = grad_Wt = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(grad, Wt, indices, offsets, rows)
        if ctx.needs_input_grad[1]:
            order = ctx.order or latent_order(indices, rows, Wt.shape[0])
            grad_Wt = scatter_rows(grad, values, order)
        return grad_values, grad_Wt, None, None, None, None, None


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """``dense(code) @ W_dec.T`` (no bias) from the kept entries only: an ``embedding_bag`` over
    decoder columns, O(nnz x d); gradients reach ``code.values`` and ``W_dec``.

    ``embedding_bag`` reads the columns as rows of ``W_dec.T``: a decoder stored column-major
    (as :class:`~saeft.sae.model.TopKSAE` keeps it) is used in place, any other is copied once.
    """
    return _SparseDecode.apply(
        code.values, W_dec.T.contiguous(), code.indices, code.rows, code.offsets, code.batch,
        code.order,
    )


def to_dense(code: SparseCode, n_features: int) -> torch.Tensor:
    """The ``(B, n_features)`` dense form of ``code`` (differentiable in the values)."""
    return code.values.new_zeros(code.batch, n_features).index_put_((code.rows, code.indices), code.values)


def gathered_code(values, z, b_pre, W, b, indices, rows, offsets, batch, relu) -> SparseCode:
    """The :class:`SparseCode` of kept pre-activations ``values`` (computed without autograd from
    ``(z - b_pre) @ W.T + b``), differentiable to whichever of ``z``, ``b_pre``, ``W``, ``b``
    require grad through the sparse backward of the kept entries; ``relu`` clips them at zero."""
    order = None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, b_pre, W, b)):
        if W.requires_grad:  # sorted once, shared by the encoder's and the decoder's gradient
            order = latent_order(indices, rows, W.shape[0])
        values = _GatheredLinear.apply(values, z, b_pre, W, b, indices, rows, offsets, order)
    if relu:
        values = torch.relu(values)
    return SparseCode(values, indices, rows, offsets, batch, order)


__all__ = [
    "LatentOrder", "SparseCode", "bag_sum", "gathered_code", "latent_order", "row_dots",
    "scatter_rows", "sparse_decode", "to_dense", "topk_encode",
]
