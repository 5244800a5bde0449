"""In-memory image datasets: uint8 arrays served as transformed images, like files would be."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


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
