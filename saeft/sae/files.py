"""The SAE weight file: safetensors with the shape metadata (:func:`save_sae`, :func:`load_sae`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from saeft.infra.io import load_tensors, save_tensors
from saeft.sae.model import TopKSAE

_TENSOR_KEYS = ("b_pre", "W_enc", "W_dec")
# Added after the first file format; files without them load with their defaults.
_OPTIONAL_TENSOR_KEYS = ("b_enc", "threshold")
_META_KEYS = ("d", "n_features", "k", "normalize")
_META_DEFAULTS = {"architecture": "topk", "relu": False}


def shape_metadata(sae: TopKSAE) -> dict[str, Any]:
    """What rebuilds the module: ``d``, ``n_features``, ``k``, ``normalize``, ``architecture``,
    ``relu`` (stored in the weights file and in ``sae.json``)."""
    return {"d": sae.d, "n_features": sae.n_features, "k": sae.k, "normalize": sae.normalize,
            "architecture": sae.architecture, "relu": sae.relu}


def save_sae(
    path: str | os.PathLike, sae: TopKSAE, extra_metadata: Mapping[str, Any] | None = None
) -> None:
    """Save the SAE weights and shape metadata as safetensors, atomically.

    ``extra_metadata`` (JSON-serialisable) is stored beside ``d``, ``n_features``, ``k``,
    ``normalize``, ``architecture`` and ``relu``, which it must not override.
    """
    meta = shape_metadata(sae)
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


__all__ = ["load_sae", "save_sae"]
