"""``flyp``: contrastive fine-tuning of both towers against class-prompt text embeddings (the
symmetric CLIP loss between each image and its class's prompt embedding, with the class prompts
as the image-side negatives); the head is rebuilt from the tuned text tower. The trained module
(:class:`saeft.methods.flyp_towers.FlypModel`) lives in a torch module imported at training time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saeft.methods.base import Method
from saeft.methods.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn


def flyp_loss(image_features: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of FLYP: image -> class prompts (CE over classes) and each
    image's class prompt -> the batch's images (CE over the batch), averaged."""
    import torch
    import torch.nn.functional as F

    image = F.normalize(image_features, dim=-1)
    text = F.normalize(class_text, dim=-1)
    to_classes = scale * image @ text.T
    to_images = scale * text[labels] @ image.T
    targets = torch.arange(len(labels), device=labels.device)
    return 0.5 * (F.cross_entropy(to_classes, labels) + F.cross_entropy(to_images, targets))


def task_loss(ctx: Any, batch: Any) -> torch.Tensor:
    """The contrastive loss in place of the cross-entropy (the temperature of pretraining)."""
    return flyp_loss(batch.features, ctx.model.class_text(), batch.labels, ctx.model.clip.logit_scale.exp())


def build_trained(towers: Any) -> nn.Module:
    """Both towers, with the class prompts of the dataset; the temperature stays frozen."""
    from saeft.methods.flyp_towers import FlypModel
    from saeft.nn.models import tokenizer_for

    spec = towers.spec
    tokens = tokenizer_for(towers.arch)([prompt for c in spec.classnames for prompt in spec.prompts(c)])
    trained = FlypModel(towers.clip, tokens, len(spec.classnames))
    towers.clip.logit_scale.requires_grad_(False)  # the temperature stays that of pretraining
    return trained


def finish(towers: Any) -> None:
    """The classifier's head comes from the tuned text tower."""
    import torch

    from saeft.nn.models import zeroshot_head

    clip, spec = towers.clip, towers.spec
    clip.eval()
    with torch.no_grad():
        towers.classifier.head.weight.copy_(zeroshot_head(clip.cpu(), towers.arch, spec.classnames, spec.templates))


METHOD = register(Method(name="flyp", label="FLYP", needs=frozenset({"text"}), task_loss=task_loss,
                         build_trained=build_trained, finish=finish, ddp=False,
                         summary="FLYP: contrastive fine-tuning of both towers against class-prompt embeddings"))
