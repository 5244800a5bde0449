"""``flyp``: contrastive fine-tuning of both towers against class-prompt text embeddings (the
symmetric CLIP loss between each image and its class's prompt embedding); the head is rebuilt from
the tuned text tower."""

from __future__ import annotations

from saeft.methods.registry import register
from saeft.methods.base import Method

METHOD = register(Method(name="flyp", label="FLYP", needs=frozenset({"text"}),
                         summary="FLYP: contrastive fine-tuning of both towers against class-prompt embeddings"))
