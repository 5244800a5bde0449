"""Torch datasets over images held in memory (uint8 arrays) or in files, transformed on access."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from saeft.data.samples import Samples


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, H, W, 3), transformed on access like files would be."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class FileImageDataset(torch.utils.data.Dataset):
    """Image files read as RGB on access, optionally without a border of ``crop_border`` pixels."""

    def __init__(self, files: list[Path], labels: np.ndarray, transform: Callable[[Image.Image], torch.Tensor], crop_border: int = 0) -> None:
        self.files = files
        self.labels = labels
        self.transform = transform
        self.crop_border = crop_border

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.files[index]) as image:
                image = image.convert("RGB")
        except Exception as exc:  # PIL's errors do not always name the file (a truncated one)
            raise ValueError(f"{self.files[index]}: image does not decode ({exc})") from exc
        if self.crop_border:
            b = self.crop_border
            image = image.crop((b, b, image.width - b, image.height - b))
        return self.transform(image), int(self.labels[index])


def samples_dataset(samples: Samples, transform: Callable[[Image.Image], torch.Tensor]) -> torch.utils.data.Dataset:
    """A Dataset of ``samples``; per-sample groups (FMoW regions) ride along as attributes
    ``groups`` and ``group_names``, which the evaluator reads, and where they were read from as
    ``source``."""
    if samples.files is not None:
        data: torch.utils.data.Dataset = FileImageDataset(samples.files, samples.labels, transform, samples.crop_border)
    else:
        assert samples.images is not None
        data = ArrayImageDataset(samples.images, samples.labels, transform)
    data.groups = samples.groups  # type: ignore[attr-defined]
    data.source = samples.source  # type: ignore[attr-defined]
    data.group_names = samples.group_names  # type: ignore[attr-defined]
    return data
