"""SAE-based regularizers for fine-tuning (docs/methods.md).

The three SAE methods are :func:`sae_penalty` with some weights at zero:
``sae_sparse`` (lambda_l1, mu), ``sae_add`` (lambda_add, mu) and ``saeft``
(lambda_add, lambda_remove, mu).

Scale convention (``inputs``, config key ``methods.<method>.sae_inputs``; docs/penalty_scale.md):
``"prepared"`` feeds the SAE the embeddings prepared as it was trained (unit norm for an ``l2``
SAE); ``"raw"`` feeds it the raw embeddings as the public reference code does, so the feature
terms grow linearly and the alignment term quadratically with the embedding norm rho.
:func:`convert_weights` maps weights between the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from saeft.sae import TopKSAE

SAE_INPUTS = ("prepared", "raw")
"""What the SAE sees in :func:`sae_penalty`: ``prepared`` (``sae.prepare``, as in SAE training)
or ``raw`` (the embeddings unchanged, as in the reference code)."""

FEATURE_WEIGHTS = ("lambda_add", "lambda_remove", "lambda_l1")
"""Weights of the terms linear in the code magnitudes (they scale with rho)."""

ALIGN_WEIGHTS = ("mu",)
"""Weights of the terms quadratic in the embedding scale (they scale with rho**2)."""


def sae_penalty(
    f_theta: torch.Tensor,
    f_0: torch.Tensor,
    sae: TopKSAE,
    *,
    lambda_add: float = 0.0,
    lambda_remove: float = 0.0,
    lambda_l1: float = 0.0,
    mu: float = 0.0,
    inputs: str = "prepared",
) -> dict[str, torch.Tensor]:
    """Weighted SAE regularization terms for embeddings ``f_theta`` (tuned) and ``f_0`` (frozen).

    ``inputs`` picks what the SAE sees (:data:`SAE_INPUTS`):

    - ``"prepared"`` (default): both embeddings, shape ``(..., d)``, are first prepared with
      ``sae.prepare`` (the SAE's own recorded normalisation: unit norm for an ``l2`` SAE), so the
      SAE encodes inputs from its training distribution;
    - ``"raw"``: the embeddings go into the SAE unchanged, skipping its normalisation, as the
      public reference code does. Codes and residuals then carry the embedding norm rho: with
      ``b_pre = 0``, ``b_enc = 0`` and ``topk`` selection, the feature terms are rho times and
      ``align`` rho**2 times their ``"prepared"`` values (:func:`convert_weights`). For an SAE
      with ``normalize="none"`` both are the same.

    Call the SAE inputs ``z_theta``, ``z_0``; then ``s_theta = E(z_theta)``, ``s_0 = E(z_0)``
    (no gradient) and ``m = 1[s_0 != 0]``. Returned terms, each already multiplied by its weight:

    - ``add    = lambda_add    * mean((1 - m) * |s_theta|)``
    - ``remove = lambda_remove * mean(m * relu(s_0 - s_theta))``
    - ``l1     = lambda_l1     * mean(|s_theta - s_0|)``
    - ``align  = mu            * mean(r**2)``, ``r = (z_theta - z_0) - (s_theta - s_0) @ W_dec.T``
    - ``total``: their sum.

    Feature terms average over batch x n_features, ``align`` over batch x d. The SAE is frozen:
    its parameters never receive gradient here (its tensors are used detached), while gradient
    flows to ``f_theta`` through the top-k values. Computation is in the SAE's dtype. The SAE's
    own encoder (bias, ReLU, Batch-Top-K threshold) selects the codes; ``W_dec`` terms are
    decoded from the kept entries only (a gather of decoder columns, not a dense matmul).
    """
    weights = {"lambda_add": lambda_add, "lambda_remove": lambda_remove, "lambda_l1": lambda_l1, "mu": mu}
    _check_penalty_args(f_theta, f_0, sae, inputs, **weights)
    # The SAE stays frozen even if the caller left requires_grad on (frozen=True detaches it);
    # decoding goes through the k kept entries only (embedding_bag), never a dense matmul.
    dtype = sae.W_dec.dtype
    prepare = inputs == "prepared"
    with torch.no_grad():
        out_0 = sae(f_0.detach().to(dtype), prepare=prepare, frozen=True, dense=True)
        m = (out_0.dense != 0).to(dtype)
    out_theta = sae(f_theta.to(dtype), prepare=prepare, frozen=True, dense=True)
    s_0, s_theta = out_0.dense, out_theta.dense
    r = (out_theta.z - out_0.z) - (out_theta.decoded - out_0.decoded)
    terms = {
        "add": lambda_add * ((1 - m) * s_theta.abs()).mean(),
        "remove": lambda_remove * (m * torch.relu(s_0 - s_theta)).mean(),
        "l1": lambda_l1 * (s_theta - s_0).abs().mean(),
        "align": mu * r.pow(2).mean(),
    }
    terms["total"] = terms["add"] + terms["remove"] + terms["l1"] + terms["align"]
    return terms


def _check_penalty_args(f_theta, f_0, sae: TopKSAE, inputs: str, **weights: float) -> None:
    """Raise ``ValueError`` for a weight that is not a finite number >= 0, an unknown
    ``inputs``, embeddings of differing or wrong shapes, or an empty batch."""
    for name, value in weights.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"sae_penalty: {name} must be a finite number >= 0, got {value!r}")
    if inputs not in SAE_INPUTS:
        raise ValueError(f"sae_penalty: inputs must be one of {', '.join(SAE_INPUTS)}, got {inputs!r}")
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


def convert_weights(weights: Mapping[str, Any], rho: float, to: str) -> dict[str, Any]:
    """Penalty weights of one scale convention rewritten for the other (``to``: ``"raw"`` or
    ``"prepared"``), for embeddings of norm ``rho``.

    The feature weights (:data:`FEATURE_WEIGHTS`) are divided by ``rho`` and ``mu`` by
    ``rho**2`` going to ``"raw"`` (multiplied going to ``"prepared"``). ``sae_inputs``, when
    present, must name the other convention and is set to ``to``; every other key (``lambda``,
    ``sae``, ...) is copied unchanged, since ``lambda`` multiplies the whole penalty.

    Exact for an ``l2`` SAE with ``topk`` selection, ``b_pre = 0`` and ``b_enc = 0`` (Top-K is
    positively homogeneous: ``E(rho z) = rho E(z)``) when every embedding has norm ``rho``. Else
    approximate: ``b_pre``/``b_enc`` do not scale with rho (so raw inputs may select other
    features), norms vary across a batch (use their mean), and ``batchtopk``'s fixed inference
    threshold keeps more features at larger rho. Even when exact, only the value and the gradient
    tangent to the sphere of radius rho match: ``"raw"`` also penalises changes of ``f_theta``'s
    norm, to which ``"prepared"`` is blind.
    """
    if to not in SAE_INPUTS:
        raise ValueError(f"convert_weights: to must be one of {', '.join(SAE_INPUTS)}, got {to!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"convert_weights: rho must be a finite number > 0, got {rho!r}")
    source = SAE_INPUTS[1 - SAE_INPUTS.index(to)]
    if weights.get("sae_inputs", source) != source:
        raise ValueError(f"convert_weights: weights already use sae_inputs={weights['sae_inputs']!r}")
    factor = 1.0 / rho if to == "raw" else float(rho)
    converted = dict(weights)
    for key in FEATURE_WEIGHTS:
        if key in converted:
            converted[key] = converted[key] * factor
    for key in ALIGN_WEIGHTS:
        if key in converted:
            converted[key] = converted[key] * factor**2
    if "sae_inputs" in converted:
        converted["sae_inputs"] = to
    return converted


__all__ = ["ALIGN_WEIGHTS", "FEATURE_WEIGHTS", "SAE_INPUTS", "convert_weights", "sae_penalty"]
