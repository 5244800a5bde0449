"""Reading a finished embedding cache (HDF5, written by :mod:`saeft.stages.cache`): the contract between
the cache stage and its readers (fine-tuning's teacher, the feature analysis)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def read_cache(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embeddings, labels and attributes of a finished cache, checked against the layout."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            for name in ("embeddings", "labels", "index"):
                if name not in handle:
                    raise ValueError(f"{path}: not a saeft cache (no /{name})")
            attrs = dict(handle.attrs)
            if "rows_done" in attrs:
                raise ValueError(f"{path}: unfinished cache ({attrs['rows_done']} rows done)")
            embeddings, labels = handle["embeddings"][:], handle["labels"][:]
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if embeddings.shape[0] != attrs.get("count"):
        raise ValueError(f"{path}: {embeddings.shape[0]} rows but attrs say {attrs.get('count')}")
    return embeddings, labels, attrs
