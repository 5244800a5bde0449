"""Training views: seeded augmentations, so a teacher cache can hold ``f_0`` of every view.

View ``v`` of image ``i`` is a random-resized crop and a horizontal flip whose parameters are
drawn from a seed derived from ``(view_seed, i, v)``, followed by the model's evaluation
preprocessing. With a bank of ``views`` views per image, training draws one of them per image and
epoch, and ``cache_views`` embeds the whole bank once, ahead of every method and seed. With
``views: 0`` every epoch draws a fresh view, which no cache can hold: the frozen teacher then runs
live. With ``augment: none`` the view is the evaluation preprocessing itself (the reference code's
setting, and the default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from saeft.config import StageConfig, require

AUGMENTS = ("none", "crop_flip")
VIEW_KEYS = ("augment", "views", "view_seed", "crop_scale")
"""The ``finetune`` keys that define the training views (and so the views cache)."""


@dataclasses.dataclass
class ViewConfig(StageConfig):
    """Training views (config keys ``finetune.augment``, ``views``, ``view_seed``, ``crop_scale``)."""

    augment: str = "none"
    """'none' (the evaluation preprocessing, deterministic) or 'crop_flip' (random-resized crop
    and horizontal flip, then the evaluation preprocessing)."""
    views: int = 0
    """Size of the bank of views per image, drawn once and shared by every method and seed; the
    teacher cache holds f_0 of each. 0: a fresh view every epoch (the teacher must run live)."""
    view_seed: int = 0
    """Seed of the bank's crop and flip parameters."""
    crop_scale: float = 0.5
    """Smallest crop area, as a fraction of the image (the largest is the whole image)."""

    def __post_init__(self) -> None:
        require(self.augment in AUGMENTS, "finetune.augment", f"must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        require(self.views >= 0, "finetune.views", f"must be non-negative, got {self.views}")
        require(0 < self.crop_scale <= 1, "finetune.crop_scale", f"must lie in (0, 1], got {self.crop_scale}")

    @property
    def deterministic(self) -> bool:
        """Every epoch sees the same view of an image (the plain embedding cache is its teacher)."""
        return self.augment == "none"

    @property
    def banked(self) -> bool:
        """Views come from a finite bank that a views cache can hold."""
        return self.augment != "none" and self.views >= 1

    @classmethod
    def of(cls, finetune: dict[str, Any]) -> ViewConfig:
        """The view keys of a ``finetune`` mapping (other keys ignored)."""
        return cls.from_dict({k: finetune[k] for k in VIEW_KEYS if k in finetune}, "finetune.")


def _seed(key: Sequence[int]) -> int:
    # SeedSequence mixes the key well: neighbouring images and views get unrelated parameters.
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def crop_flip(image: Image.Image, key: Sequence[int], crop_scale: float) -> Image.Image:
    """The crop-and-flip view of ``image`` determined by ``key``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(_seed(key))
        top, left, height, width = T.RandomResizedCrop.get_params(image, scale=(crop_scale, 1.0), ratio=(3 / 4, 4 / 3))
        flip = bool(torch.rand(()) < 0.5)
    view = TF.resized_crop(image, top, left, height, width, [image.height, image.width])
    return TF.hflip(view) if flip else view


class TrainingViews(torch.utils.data.Dataset):
    """Items ``(image tensor, label, index, view)`` of a dataset of PIL images.

    ``index`` is the image's row and ``view`` its view in the bank (the row ``index * views +
    view`` of a views cache). :meth:`set_epoch` picks the epoch's views; the choice depends on the
    training seed, the epoch and the image only, so a resumed run sees the same views.
    """

    def __init__(self, images: torch.utils.data.Dataset, preprocess: Callable[[Image.Image], torch.Tensor], cfg: ViewConfig, seed: int) -> None:
        self.images = images
        self.preprocess = preprocess
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def view_of(self, index: int) -> int:
        """The bank view that image ``index`` shows in the current epoch (0 without a bank)."""
        if not self.cfg.banked:
            return 0
        return _seed((self.seed, self.epoch, index)) % self.cfg.views

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        image, label = self.images[index]
        view = self.view_of(index)
        if self.cfg.banked:
            image = crop_flip(image, (self.cfg.view_seed, index, view), self.cfg.crop_scale)
        elif self.cfg.augment != "none":  # a fresh view per epoch, never repeated across seeds
            image = crop_flip(image, (self.cfg.view_seed, index, self.seed, self.epoch, 1), self.cfg.crop_scale)
        return self.preprocess(image), label, index, view


class ViewBank(torch.utils.data.Dataset):
    """Every view of the bank, row ``index * views + view``, as ``(image tensor, label)``: what
    ``cache_views`` embeds."""

    def __init__(self, images: torch.utils.data.Dataset, preprocess: Callable[[Image.Image], torch.Tensor], cfg: ViewConfig) -> None:
        if not cfg.banked:
            raise ValueError("a view bank needs finetune.augment != 'none' and finetune.views >= 1")
        self.images = images
        self.preprocess = preprocess
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.images) * self.cfg.views

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int]:
        index, view = divmod(row, self.cfg.views)
        image, label = self.images[index]
        return self.preprocess(crop_flip(image, (self.cfg.view_seed, index, view), self.cfg.crop_scale)), label


def keep_pil(image: Image.Image) -> Image.Image:
    """The identity transform: load a split as PIL images, to make views of them."""
    return image
