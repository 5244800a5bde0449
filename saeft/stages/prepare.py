"""Stage ``prepare_model``: the zero-shot CLIP as one local safetensors file, and its heads.

Whatever the source of the weights (the pipeline's own ``pretrain_clip``, an open_clip tag, a
local checkpoint), every later stage reads this one file, offline. A zero-shot head per dataset
is the normalised mean of the dataset's prompt embeddings per class, scaled by the logit scale.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from saeft.data.registry import get_dataset
from saeft.infra.io import save_tensors
from saeft.nn.models import create_clip, load_clip, pretrained_kind, save_clip, zeroshot_head

logger = logging.getLogger(__name__)


def run_model(arch: str, pretrained: str | None, out: str | os.PathLike) -> dict[str, Any]:
    """Materialise the zero-shot CLIP ``arch`` with weights from ``pretrained`` into ``out``."""
    if pretrained_kind(pretrained) == "pipeline":
        raise ValueError("prepare_model takes the pretrain_clip output as a file path, not the keyword")
    if pretrained_kind(pretrained) == "none":
        logger.warning("model.pretrained is null: the zero-shot model has random weights")
    model = create_clip(arch, pretrained)
    save_clip(out, model.eval(), arch, source=pretrained)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("saved %s (%d parameters, weights from %s) to %s", arch, n_params, pretrained, out)
    return {"n_params": n_params, "embed_dim": model.visual.output_dim}


def run_head(model_path: str | os.PathLike, dataset: str, out: str | os.PathLike, dataset_options: Any = None) -> dict[str, Any]:
    """Build the zero-shot head of ``dataset`` from its class names and prompt templates (of
    the class subset and template count that the loader ``dataset_options`` set, if any)."""
    model, arch = load_clip(model_path)
    spec = get_dataset(dataset, dataset_options)
    head = zeroshot_head(model, arch, spec.classnames, spec.templates)
    save_tensors(out, {"weight": head}, {"dataset": dataset, "classnames": list(spec.classnames),
                                         "templates": list(spec.templates), "kind": "zeroshot_head"})
    logger.info("zero-shot head of %s: %d classes x %d templates", dataset, len(spec.classnames), len(spec.templates))
    return {"n_classes": len(spec.classnames), "n_templates": len(spec.templates)}
