"""Measures of what fine-tuning changed, on embeddings and on their SAE codes (pure tensor code).

Codes are dense ``(N, n_features)`` tensors as :func:`saeft.sae.to_dense` returns them. A feature
is *active* where the code is non-zero: the definition of ``m = 1[s_0 != 0]`` in the SAE-FT
regulariser (:func:`saeft.nn.regularizers.sae_penalty`), so "added" and "removed" here are what its
``add`` and ``remove`` terms penalise.

Reductions run in float64: sums over thousands of rows lose digits in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Singular values below this fraction of a row's largest one count as zero: the rank cut-off
# of the span projections (float64, well above its round-off for d up to a few thousand).
_RANK_RTOL = 1e-8
# Rows per batched SVD in :func:`active_span_share` (bounds the (rows, d, |support|) gather).
_SPAN_CHUNK = 256


class FeatureChanges(NamedTuple):
    """Per-row changes between a zero-shot code ``s_0`` and a fine-tuned code ``s_theta``."""

    added: torch.Tensor
    """(N, n_features) bool: active in ``s_theta``, not in ``s_0``."""
    removed: torch.Tensor
    """(N, n_features) bool: active in ``s_0``, not in ``s_theta``."""
    n_added: torch.Tensor
    """(N,) int64 count of added features."""
    n_removed: torch.Tensor
    """(N,) int64 count of removed features."""
    mass_added: torch.Tensor
    """(N,) float64 sum of ``s_theta`` over the added features."""
    mass_removed: torch.Tensor
    """(N,) float64 sum of ``s_0`` over the removed features."""


def active(code: torch.Tensor) -> torch.Tensor:
    """The support of a code: ``code != 0`` (the regulariser's ``m``)."""
    return code != 0


def feature_changes(s_0: torch.Tensor, s_theta: torch.Tensor) -> FeatureChanges:
    """Features added (active in ``s_theta`` only) and removed (active in ``s_0`` only), with their
    counts and activation mass, per row of two codes of the same shape."""
    if s_0.shape != s_theta.shape:
        raise ValueError(f"feature_changes: code shapes differ: {tuple(s_0.shape)} vs {tuple(s_theta.shape)}")
    on_0, on_theta = active(s_0), active(s_theta)
    added = on_theta & ~on_0
    removed = on_0 & ~on_theta
    return FeatureChanges(
        added=added,
        removed=removed,
        n_added=added.sum(dim=-1),
        n_removed=removed.sum(dim=-1),
        mass_added=(s_theta.double() * added).sum(dim=-1),
        mass_removed=(s_0.double() * removed).sum(dim=-1),
    )


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same N inputs, ``x`` (N, d1) and ``y`` (N, d2).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``: HSIC
    with linear kernels, normalised (Kornblith et al. 2019). 1 for identical inputs, invariant to
    orthogonal transforms and isotropic scaling of either side, not to general linear maps.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: need (N, d) matrices with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka: need at least 2 rows")
    xc = x.double() - x.double().mean(dim=0)
    yc = y.double() - y.double().mean(dim=0)
    cross = (yc.T @ xc).pow(2).sum()
    norm = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    if norm == 0:
        raise ValueError("linear_cka: a representation is constant over the rows (CKA undefined)")
    return float(cross / norm)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.

    The definition of :func:`saeft.sae.evaluate_sae` (deviation from these rows' own mean).
    """
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(f"fvu: need two (N, d) matrices of one shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    x64 = x.double()
    sst = (x64 - x64.mean(dim=0)).pow(2).sum()
    if sst == 0:
        raise ValueError("fvu: all rows are identical (FVU undefined)")
    return float((x64 - x_hat.double()).pow(2).sum() / sst)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) float64 cosine between matching rows; the cosine drift is ``1 -`` this."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _projected_share(delta: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``||P delta||^2 / ||delta||^2`` per row, ``P`` the projection onto the column span of the
    row's ``bases`` (B, d, m), or of one shared basis (1, d, m); NaN where ``delta`` is zero (no change, no direction)."""
    u, s, _ = torch.linalg.svd(bases, full_matrices=False)
    keep = s > _RANK_RTOL * s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    u = (u * keep.unsqueeze(-2)).expand(delta.shape[0], -1, -1)  # one basis may serve every row
    coords = torch.einsum("bdm,bd->bm", u, delta)
    total = delta.pow(2).sum(dim=-1)
    share = coords.pow(2).sum(dim=-1) / total
    return torch.where(total > 0, share.clamp(0.0, 1.0), torch.full_like(share, float("nan")))


def span_share(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Share of each row of ``delta`` (N, d) in the column span of ``basis`` (d, m):
    ``||P delta||^2 / ||delta||^2`` per row (NaN for a zero row).

    With the whole decoder as ``basis``, an overcomplete dictionary of full rank spans every
    direction and the share is 1 for any change: see :func:`active_span_share` for the measure
    that distinguishes changes.
    """
    if delta.ndim != 2 or basis.ndim != 2 or basis.shape[0] != delta.shape[1]:
        raise ValueError(f"span_share: need delta (N, d) and basis (d, m), got {tuple(delta.shape)} and {tuple(basis.shape)}")
    # One basis for every row: a single SVD, not one per row.
    return _projected_share(delta.double(), basis.double().unsqueeze(0))


def active_span_share(delta: torch.Tensor, W_dec: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Share of each row of ``delta`` (N, d) in the span of the decoder columns its row of
    ``support`` (N, n_features, bool) marks: ``||P_A delta||^2 / ||delta||^2`` (NaN for a zero row).

    With ``support = active(s_0) | active(s_theta)`` this is the part of the embedding change that
    the features active before or after fine-tuning can carry: at most ``2k`` directions, so a
    proper subspace when ``2k < d``. Its complement is the least residual that SAE-FT's alignment
    term ``r = delta - W_dec (s_theta - s_0)`` could reach with these features.
    """
    n, d = delta.shape
    if W_dec.shape[0] != d or support.shape != (n, W_dec.shape[1]):
        raise ValueError(
            f"active_span_share: need delta (N, d), W_dec (d, n_features), support (N, n_features); "
            f"got {tuple(delta.shape)}, {tuple(W_dec.shape)}, {tuple(support.shape)}"
        )
    columns = W_dec.double().T  # (n_features, d)
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, _SPAN_CHUNK):
        rows = slice(start, start + _SPAN_CHUNK)
        mask = support[rows]
        width = max(int(mask.sum(dim=-1).max()) if len(mask) else 0, 1)
        # Each row's active columns first, padded with zero columns (rank cut-off drops them).
        order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
        kept = torch.gather(mask, 1, order)
        bases = columns[order] * kept.unsqueeze(-1)  # (rows, width, d)
        out[rows] = _projected_share(delta[rows].double(), bases.transpose(1, 2))
    return out


def alignment_residual_share(delta: torch.Tensor, s_0: torch.Tensor, s_theta: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``||r||^2 / ||delta||^2`` per row with ``r = delta - W_dec (s_theta - s_0)``: the share of the
    change that the code change does not carry, the quantity SAE-FT's ``mu`` term penalises
    (NaN for a zero row)."""
    r = delta.double() - (s_theta.double() - s_0.double()) @ W_dec.double().T
    total = delta.double().pow(2).sum(dim=-1)
    share = r.pow(2).sum(dim=-1) / total
    return torch.where(total > 0, share, torch.full_like(share, float("nan")))


__all__ = [
    "FeatureChanges",
    "active",
    "active_span_share",
    "alignment_residual_share",
    "cosine_similarity",
    "feature_changes",
    "fvu",
    "linear_cka",
    "span_share",
]
