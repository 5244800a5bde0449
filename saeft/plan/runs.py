"""Run ids: which model an evaluation or an analysis is about, formatted and parsed in one place.

A run id is ``zeroshot``, ``<variant>/seed<N>`` (a fine-tuned model) or
``<variant>/seed<N>/alpha<a>`` (WiSE-FT: that model mixed with the zero-shot one at ``alpha``);
a variant is a method's name, or ``<method>@<label>`` for one of its variants
(:mod:`saeft.plan.variants`).
It is the ``run`` wildcard of the workflow and a folder under ``eval/`` and ``analysis/``.
Imports nothing heavy: the workflow builds its targets with it while it plans."""

from __future__ import annotations

import dataclasses
import re

from saeft.plan.variants import PATTERN as VARIANT_PATTERN, method_of

ZEROSHOT = "zeroshot"
PATTERN = rf"zeroshot|{VARIANT_PATTERN}/seed\d+(/alpha[0-9.]+)?"
"""The run ids this module formats (the workflow's wildcard constraint)."""

_PARSE = re.compile(rf"(?P<method>{VARIANT_PATTERN})/seed(?P<seed>\d+)(?:/alpha(?P<alpha>[0-9.]+))?")


def wiseft_name(base: str) -> str:
    """Table row of WiSE-FT over ``base`` (a method, or one of its variants: the row is the
    method's): 'wiseft' for ft (as in the literature), else ``wiseft_<method>``; the inverse of
    :func:`wiseft_base`."""
    trained = method_of(base)
    return "wiseft" if trained == "ft" else f"wiseft_{trained}"


def wiseft_base(method: str) -> str | None:
    """The fine-tuned method a WiSE-FT row interpolates: 'ft' for 'wiseft', B for 'wiseft_B'."""
    prefix, _, base = method.partition("_")
    if prefix != "wiseft":
        return None
    return base or "ft"


def alpha_tag(alpha: float) -> str:
    """``alpha<a>``, with ``a`` in its shortest form (0.5, 1, 0.25)."""
    return f"alpha{float(alpha):g}"


@dataclasses.dataclass(frozen=True)
class RunId:
    """One evaluated model: zero-shot (``method`` None), fine-tuned (``method``, ``seed``), or
    WiSE-FT (``alpha`` as well)."""

    method: str | None = None
    """The fine-tuned variant (a method's name, or ``<method>@<label>``); None for zero-shot."""
    seed: int | None = None
    """Its fine-tuning seed."""
    alpha: float | None = None
    """WiSE-FT's mixing weight (0: zero-shot, 1: fine-tuned); None: no interpolation."""

    def __post_init__(self) -> None:
        if (self.method is None) != (self.seed is None) or (self.method is None and self.alpha is not None):
            raise ValueError(f"run id: method and seed go together, alpha needs them ({self})")

    @classmethod
    def parse(cls, text: str) -> RunId:
        """The run id ``text`` names; a ValueError names the text otherwise."""
        if text == ZEROSHOT:
            return cls()
        match = _PARSE.fullmatch(text)
        if match is None:
            raise ValueError(f"{text!r} is not a run id (zeroshot, <variant>/seed<N> or <variant>/seed<N>/alpha<a>)")
        alpha = match["alpha"]
        return cls(match["method"], int(match["seed"]), float(alpha) if alpha is not None else None)

    def __str__(self) -> str:
        if self.method is None:
            return ZEROSHOT
        return f"{self.trained}/{alpha_tag(self.alpha)}" if self.alpha is not None else self.trained

    @property
    def zeroshot(self) -> bool:
        return self.method is None

    @property
    def trained(self) -> str:
        """``<method>/seed<N>``: the fine-tuned model this run reads (its folder under finetune/)."""
        return f"{self.method}/seed{self.seed}"

    @property
    def variant(self) -> str:
        """The fine-tuned variant's name (``zeroshot`` for the zero-shot model)."""
        return ZEROSHOT if self.method is None else self.method

    @property
    def row(self) -> str:
        """Its method's name in the tables: ``zeroshot``, the method (of the variant), or
        WiSE-FT's row name."""
        if self.method is None:
            return ZEROSHOT
        return wiseft_name(self.method) if self.alpha is not None else method_of(self.method)


__all__ = ["PATTERN", "RunId", "ZEROSHOT", "alpha_tag", "wiseft_base", "wiseft_name"]
