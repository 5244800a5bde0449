"""The captioned image corpus that ``pretrain_clip`` trains on, as a dataset offers it.

A dataset that can pretrain the study's own CLIP (the shapes world, Fashion-MNIST) builds one of
these from its options: images, their class labels, the domain (style) of each image, and a
function that writes a caption for a (class, domain) pair. Pretraining batches draw one image per
(class, domain) pair, so the domain is what keeps two captions of a batch from saying the same.
Imports no torch, so the registry can name the builders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class PretrainCorpus:
    """Captioned pretraining images of one dataset."""

    images: np.ndarray
    """uint8 (N, H, W, 3) images."""
    labels: np.ndarray
    """int64 (N,) class labels, indices into the dataset's class names."""
    domains: np.ndarray
    """(N,) domain (style) name of each image, as the caption function knows it."""
    caption: Callable[[int, str, np.random.Generator], str]
    """``caption(label, domain, rng)``: a caption naming the class (and the style) of an image."""
    styleless: Callable[[str], bool] | None = None
    """Whether a caption names no style, so that it describes an image of its class in every
    domain (``pretrain.multi_positive``); None: every caption names its image's style."""
    named_class: Callable[[str], int] | None = None
    """The class a caption names, where a caption may name another class than its image's
    (``pretrain.multi_positive`` then matches it with that class's images); None: its image's."""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.ndim != 4 or self.images.shape[0] != n or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"pretraining images must be uint8 (N, H, W, 3) with N = {n} labels, got {self.images.dtype} {self.images.shape}")
        if len(self.domains) != n:
            raise ValueError(f"pretraining corpus has {n} labels but {len(self.domains)} domains")
