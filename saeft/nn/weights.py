"""Arithmetic on model weights, below both fine-tuning and evaluation: WiSE-FT's interpolation."""

from __future__ import annotations

from collections.abc import Mapping

import torch


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
