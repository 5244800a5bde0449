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

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from saeft.config.stages import ViewConfig


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
