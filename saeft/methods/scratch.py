"""``scratch``: a model trained on ID data only, from a random initialisation of the same
architecture (no pretraining, no zero-shot head): the "ImageNet models" of effective robustness
(Taori et al. 2020). Several of them (e.g. a grid over ``finetune.epochs``) give the line of
OOD against ID accuracy that zero-shot CLIP lies above (calibration criterion P1); they are a
reference, not a fine-tuning method."""

from __future__ import annotations

from typing import Any

from saeft.methods.base import Method
from saeft.methods.registry import register


def build_trained(towers: Any) -> Any:
    """The classifier with its visual tower re-initialised as open_clip builds an untrained one
    (from the job's seeded generator) and a zero head (no text knowledge either)."""
    import torch

    from saeft.nn.models import create_clip

    fresh = create_clip(towers.arch, pretrained=None)
    towers.classifier.visual.load_state_dict(fresh.visual.state_dict())
    with torch.no_grad():
        towers.classifier.head.weight.zero_()
    return towers.classifier


METHOD = register(Method(name="scratch", label="ID-only (scratch)", build_trained=build_trained, from_zeroshot=False,
                         summary="a model of the same architecture trained on ID data only from random weights "
                                 "(the ID-only reference line of effective robustness, calibration P1)"))
