"""FLYP's trained module (torch; imported at training time only, never by :mod:`saeft.methods`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FlypModel(nn.Module):
    """Both CLIP towers, with ``forward(images) -> (logits over class prompts, image embedding)``
    so that the shared loop's accuracy and checkpoint code apply unchanged."""

    def __init__(self, clip: nn.Module, prompts: torch.Tensor, n_classes: int) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("prompts", prompts, persistent=False)  # (C * T, ctx) token ids
        self.n_classes = n_classes

    def class_text(self) -> torch.Tensor:
        """Per class, the mean of its normalised prompt embeddings (with gradient)."""
        text = F.normalize(self.clip.encode_text(self.prompts), dim=-1)
        return text.view(self.n_classes, -1, text.shape[-1]).mean(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.clip.encode_image(images)
        text = F.normalize(self.class_text(), dim=-1)
        return self.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ text.T, features
