"""WiSE-FT: evaluated, never trained. ``theta_alpha = (1 - alpha) theta_0 + alpha theta_ft`` mixes
the zero-shot model with a fine-tuned one at evaluation time (``saeft.nn.weights``)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from saeft.config import Fraction, Schema
from saeft.methods.base import Method, MethodParams
from saeft.methods.registry import register


@dataclasses.dataclass
class WiseftParams(MethodParams):
    """The interpolations evaluated (config key ``methods.wiseft``)."""

    section = "methods.wiseft"
    base: Annotated[list[str], Schema(min_items=1, unique_items=True)] = dataclasses.field(default_factory=lambda: ["ft"])
    """Fine-tuned methods (each also listed under methods) to interpolate with the zero-shot model."""
    alphas: Annotated[list[Fraction], Schema(min_items=1, unique_items=True)] = dataclasses.field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """The alpha grid of the WiSE-FT curve (evaluated, drawn, not tabulated)."""
    alpha: Fraction = 0.5
    """The reported alpha: table rows 'wiseft' (base ft) and 'wiseft_<base>'."""


METHOD = register(Method(name="wiseft", label="WiSE-FT", params=WiseftParams, trained=False,
                         summary="WiSE-FT, evaluated only (interpolated models are never stored): "
                                 "theta_alpha = (1 - alpha) theta_0 + alpha theta_ft"))
