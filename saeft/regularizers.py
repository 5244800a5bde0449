"""SAE-based regularizers for fine-tuning (DESIGN section 3).

The three SAE methods are :func:`sae_penalty` with some weights at zero:
``sae_sparse`` (lambda_l1, mu), ``sae_add`` (lambda_add, mu) and ``saeft``
(lambda_add, lambda_remove, mu).
"""

from __future__ import annotations

import math

import torch

from saeft.sae import TopKSAE, sparse_decode, to_dense


def sae_penalty(
    f_theta: torch.Tensor,
    f_0: torch.Tensor,
    sae: TopKSAE,
    *,
    lambda_add: float = 0.0,
    lambda_remove: float = 0.0,
    lambda_l1: float = 0.0,
    mu: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weighted SAE regularization terms for embeddings ``f_theta`` (tuned) and ``f_0`` (frozen).

    Both embeddings, shape ``(..., d)``, are first prepared with ``sae.prepare`` (the SAE's own
    recorded normalisation), then ``s_theta = E(f_theta)``, ``s_0 = E(f_0)`` (no gradient) and
    ``m = 1[s_0 != 0]``. Returned terms, each already multiplied by its weight:

    - ``add    = lambda_add    * mean((1 - m) * |s_theta|)``
    - ``remove = lambda_remove * mean(m * relu(s_0 - s_theta))``
    - ``l1     = lambda_l1     * mean(|s_theta - s_0|)``
    - ``align  = mu            * mean(r**2)``, ``r = (f_theta - f_0) - (s_theta - s_0) @ W_dec.T``
      (on prepared embeddings)
    - ``total``: their sum.

    Feature terms average over batch x n_features, ``align`` over batch x d. The SAE is frozen:
    its parameters never receive gradient here (its tensors are used detached), while gradient
    flows to ``f_theta`` through the top-k values. Computation is in the SAE's dtype. The SAE's
    own encoder (bias, ReLU, Batch-Top-K threshold) selects the codes; ``W_dec`` terms are
    decoded from the kept entries only (a gather of decoder columns, not a dense matmul).
    """
    weights = {
        "lambda_add": lambda_add,
        "lambda_remove": lambda_remove,
        "lambda_l1": lambda_l1,
        "mu": mu,
    }
    for name, value in weights.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"sae_penalty: {name} must be a finite number >= 0, got {value!r}")
    if f_theta.shape != f_0.shape:
        raise ValueError(
            f"sae_penalty: f_theta and f_0 shapes differ: {tuple(f_theta.shape)} vs "
            f"{tuple(f_0.shape)}"
        )
    if f_theta.ndim < 1 or f_theta.shape[-1] != sae.d:
        raise ValueError(
            f"sae_penalty: embeddings must have last dim {sae.d} (the SAE's d), "
            f"got shape {tuple(f_theta.shape)}"
        )
    if f_theta.numel() == 0:
        raise ValueError("sae_penalty: empty batch (the means would be NaN)")

    # The SAE stays frozen even if the caller left requires_grad on (frozen=True detaches it);
    # decoding goes through the k kept entries only (embedding_bag), never a dense matmul.
    W_dec = sae.W_dec.detach()
    dtype = W_dec.dtype
    z_theta = sae.prepare(f_theta.to(dtype)).reshape(-1, sae.d)
    with torch.no_grad():
        z_0 = sae.prepare(f_0.detach().to(dtype)).reshape(-1, sae.d)
        code_0 = sae.encode_sparse(z_0, frozen=True)
        s_0 = to_dense(code_0, sae.n_features)
        m = (s_0 != 0).to(dtype)
        carried_0 = sparse_decode(code_0, W_dec)
    code_theta = sae.encode_sparse(z_theta, frozen=True)
    s_theta = to_dense(code_theta, sae.n_features)

    delta_s = s_theta - s_0
    r = (z_theta - z_0) - (sparse_decode(code_theta, W_dec) - carried_0)
    terms = {
        "add": lambda_add * ((1 - m) * s_theta.abs()).mean(),
        "remove": lambda_remove * (m * torch.relu(s_0 - s_theta)).mean(),
        "l1": lambda_l1 * delta_s.abs().mean(),
        "align": mu * r.pow(2).mean(),
    }
    terms["total"] = terms["add"] + terms["remove"] + terms["l1"] + terms["align"]
    return terms


__all__ = ["sae_penalty"]
