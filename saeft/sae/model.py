"""The Top-K SAE module and its forward contract (:class:`SAEOutput`)."""

from __future__ import annotations

import dataclasses
from typing import get_args

import torch
import torch.nn.functional as F

from saeft.config.stages import SaeArchitecture, SaeNormalize
from saeft.sae.kernels import SparseCode, gathered_code, sparse_decode, to_dense, topk_encode

NORMALIZATIONS: tuple[str, ...] = get_args(SaeNormalize)
"""Allowed values of the SAE's input normalisation (from the config's ``sae.normalize``)."""

ARCHITECTURES: tuple[str, ...] = get_args(SaeArchitecture)
"""``topk``: k largest per sample; ``batchtopk``: k x batch largest over the batch in training,
a learned threshold at inference (from the config's ``sae.architecture``)."""

ENCODER_INIT_NORM = 1.0
"""Default norm of each encoder row under ``tied_init`` (the decoder's columns have norm 1). On
bench/sae_train.py's synthetic data 0.5 learned faster per step, but on the default study's
embeddings it left 47% of the latents dead on the held-out photos (FVU 0.0078), against 7% at 1.0
(FVU 0.0075; measured at commit bda83fe's training code, 20 epochs, AuxK 0.25): the study's
dictionary matters more than the first steps' speed, so rows start at the decoder's norm."""

# EMA rate of the Batch-Top-K inference threshold (the smallest value kept in each batch).
_THRESHOLD_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class SAEOutput:
    """What one pass of :meth:`TopKSAE.forward` computed, all over ``B`` flattened rows.

    ``recon`` is ``decoded + b_pre``; ``decoded`` and ``recon`` come from the kept entries only
    (a gather of decoder columns), never a dense matmul. With ``frozen`` the SAE's tensors enter
    detached, so gradient reaches only the input.
    """

    z: torch.Tensor
    """(B, d) the rows the SAE encoded: the input, prepared if ``prepare`` was asked."""
    code: SparseCode
    """The sparse code of ``z`` (kept entries, differentiable in their values)."""
    decoded: torch.Tensor
    """(B, d) ``W_dec s`` without the bias: what the kept features write."""
    recon: torch.Tensor
    """(B, d) the reconstruction ``W_dec s + b_pre`` (in the space of ``z``)."""
    dense: torch.Tensor | None = None
    """(B, n_features) the dense code ``s`` when ``dense`` was asked, else ``None``."""


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
        encoder_init_norm: float = ENCODER_INIT_NORM,
        generator: torch.Generator | None = None,
    ) -> None:
        """Build an SAE for ``d``-dim embeddings with ``n_features`` features, ``k`` active.

        ``tied_init`` starts the encoder as the decoder's transpose with rows of norm
        ``encoder_init_norm``; ``generator`` makes the random initialisation reproducible.
        """
        super().__init__()
        _check_shape_args(d, n_features, k, normalize, architecture)
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
            # Each feature starts by reading the direction it writes, at a smaller scale.
            W_enc = (W_dec.T * encoder_init_norm).contiguous()  # row-major: rows contiguous
        else:
            W_enc = torch.randn(n_features, d, generator=generator) / d**0.5
        self.W_enc = torch.nn.Parameter(W_enc)
        # (d, n_features) stored column-major: each feature's direction is one contiguous row of
        # W_dec.T, which the sparse decode reads (and its gradient fills) in place.
        self.W_dec = torch.nn.Parameter(W_dec.T.contiguous().T)
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        # Batch-Top-K inference threshold; learned as an EMA during training, unused by topk.
        self.register_buffer("threshold", torch.zeros(()))
        # Training-only state (checkpointed with the module, not saved in the SAE file).
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._zero_bias: tuple[tuple, bool] | None = None

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
        return self._pre(z, self.W_enc, self.b_enc, self.b_pre)

    def _pre(self, z, W_enc, b_enc, b_pre) -> torch.Tensor:
        """``(z - b_pre) @ W_enc.T + b_enc``; a bias that is zero and not trained (the default
        architecture) is skipped, sparing a pass over the (B, n_features) result."""
        if b_enc.requires_grad or not self._bias_is_zero():
            return torch.addmm(b_enc, z - b_pre, W_enc.T)
        return (z - b_pre) @ W_enc.T

    def _bias_is_zero(self) -> bool:
        """Whether ``b_enc`` is all zero, looked at again only after it changed (its version
        counter moves with every in-place write, its storage with every reassignment)."""
        b_enc = self.b_enc
        key = (b_enc._version, b_enc.data_ptr(), b_enc.device)
        if self._zero_bias is None or self._zero_bias[0] != key:
            self._zero_bias = (key, not bool(b_enc.any()))
        return self._zero_bias[1]

    def forward(
        self,
        x: torch.Tensor,
        *,
        prepare: bool = False,
        frozen: bool = False,
        dense: bool = False,
        pre: torch.Tensor | None = None,
    ) -> SAEOutput:
        """Encode and decode ``x`` (..., d) as ``B`` flattened rows: the one forward contract.

        ``prepare`` first applies :meth:`prepare` (for raw embeddings; without it ``x`` goes in
        unchanged, as already prepared rows or deliberately raw ones). ``frozen`` uses the SAE's
        tensors detached and the inference selection, never updating the Batch-Top-K threshold
        (the regulariser's and the analysis' view); else the parameters get gradient and a
        training-mode Batch-Top-K SAE updates its threshold. ``dense`` also returns the dense
        code. ``pre`` may pass this batch's already computed pre-activations.
        """
        if x.ndim < 1 or x.shape[-1] != self.d:
            raise ValueError(f"TopKSAE: expected (..., {self.d}) embeddings, got {tuple(x.shape)}")
        z = (self.prepare(x) if prepare else x).reshape(-1, self.d)
        code = self.encode_sparse(z, pre=pre, frozen=frozen)
        W_dec, b_pre = self.W_dec, self.b_pre
        if frozen:
            W_dec, b_pre = W_dec.detach(), b_pre.detach()
        decoded = sparse_decode(code, W_dec)
        dense_code = to_dense(code, self.n_features) if dense else None
        return SAEOutput(z=z, code=code, decoded=decoded, recon=decoded + b_pre, dense=dense_code)

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
                pre = self._pre(z, W_enc, b_enc, b_pre)
        pre = pre.detach()
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            rows, offsets = self._topk_layout(batch, pre.device)
            values, indices = values.reshape(-1), indices.reshape(-1)
        else:
            if self.training and not frozen:
                flat = self._batch_select(pre, batch)
            else:
                flat = torch.nonzero(pre.reshape(-1) > self.threshold).flatten()
            rows, indices = flat // self.n_features, flat % self.n_features
            values = pre.reshape(-1)[flat]
            offsets = torch.searchsorted(rows, torch.arange(batch, device=pre.device))
        return gathered_code(values, z, b_pre, W_enc, b_enc, indices, rows, offsets, batch, self.relu)

    def _topk_layout(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` and ``offsets`` of a Top-K code of ``batch`` rows (k entries each), kept for
        the batch sizes seen last (they never change, and are never written to)."""
        key = (batch, self.k, device)
        layout = self._layouts.get(key)
        if layout is None:
            rows = torch.arange(batch, device=device).repeat_interleave(self.k)
            layout = (rows, torch.arange(0, batch * self.k, self.k, device=device))
            if len(self._layouts) >= 4:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = layout
        return layout

    def _batch_select(self, pre: torch.Tensor, batch: int) -> torch.Tensor:
        """Batch-Top-K in training: the sorted flat positions of the k x B largest
        pre-activations; updates the inference threshold with the smallest one kept."""
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
        return flat.sort().values

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
        """Reconstruction ``s @ W_dec.T + b_pre`` (in prepared space) by the dense matmul."""
        return s @ self.W_dec.T + self.b_pre

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


def _check_shape_args(d, n_features, k, normalize, architecture) -> None:
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


__all__ = ["ARCHITECTURES", "ENCODER_INIT_NORM", "NORMALIZATIONS", "SAEOutput", "TopKSAE"]
