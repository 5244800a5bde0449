"""Method variants: one method's hyper-parameters at several values, each its own run.

A method's config entry (``methods.<method>``) holds its parameters, and may add

- ``grid``: parameter -> list of values; every combination is a variant, named
  ``<method>@<key>=<value>,...`` with the keys in alphabetical order (``saeft@lambda=10,mu=1``);
- ``variants``: a list of named variants, each ``{name: <label>, <key>: <value>, ...}``, named
  ``<method>@<label>``.

The entry's other keys are shared by every variant (a variant's own values win). A method with
neither has one variant named by the method itself, so a study without grids keeps its paths. The
name is the ``method`` part of a run id (:mod:`saeft.plan.runs`): a folder under ``finetune/``,
``eval/`` and ``analysis/``, and an MLflow tag. It depends only on the variant's own values, so
editing one grid value renames (and reruns) that variant alone. Imports nothing heavy: the
workflow expands grids while it plans."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

SEPARATOR = "@"
"""Between a method and its variant's label."""

VARIANT_KEYS = ("grid", "variants")
"""Keys of a method's entry that define variants rather than parameters."""

ENTRY_KEYS = (*VARIANT_KEYS, "datasets")
"""Keys of a method's entry that are not parameters of one run."""

LABEL_PATTERN = r"[a-z0-9_]+|[a-z_][a-z0-9_]*=[A-Za-z0-9_.+-]+(,[a-z_][a-z0-9_]*=[A-Za-z0-9_.+-]+)*"
"""A variant label: a name, or a grid point's ``key=value`` pairs."""

PATTERN = rf"[a-z0-9_]+(?:{SEPARATOR}(?:{LABEL_PATTERN}))?"
"""A variant name: the method, or ``<method>@<label>`` (the workflow's ``method`` wildcard)."""

_NAME = re.compile(rf"(?P<method>[a-z0-9_]+)(?:{SEPARATOR}(?P<label>{LABEL_PATTERN}))?")
_VALUE = re.compile(r"[A-Za-z0-9_.+-]+")


def format_value(value: Any) -> str:
    """A parameter value as a variant label writes it: numbers in their shortest form (``10``,
    ``0.001``, ``1e-05``), booleans ``true``/``false``, None ``null`` (as YAML writes it; e.g.
    ``sae=null``, the main SAE), strings as they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = f"{value:g}" if isinstance(value, (int, float)) else str(value)
    if not _VALUE.fullmatch(text):
        raise ValueError(f"grid value {value!r} cannot be part of a variant name (letters, digits, _ . + - only)")
    return text


def grid_label(values: Mapping[str, Any]) -> str:
    """``key=value,...`` of one grid point, keys sorted: the label does not depend on the order
    the grid was written in."""
    return ",".join(f"{key}={format_value(values[key])}" for key in sorted(values))


def variant_name(method: str, label: str | None = None) -> str:
    """``<method>@<label>``, or the method alone for its only variant."""
    return method if label is None else f"{method}{SEPARATOR}{label}"


def parse_name(name: str) -> tuple[str, str | None]:
    """(method, label) of a variant name; a ValueError names a malformed one."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a variant name (<method> or <method>@<label>)")
    return match["method"], match["label"]


def method_of(name: str) -> str:
    """The method a variant (or method) name belongs to."""
    return parse_name(name)[0]


def grid_values(name: str) -> dict[str, str]:
    """The ``key -> value`` text of a grid variant's name (empty for a named or the only variant):
    what MLflow tags show without the config."""
    label = parse_name(name)[1]
    if label is None or "=" not in label:
        return {}
    return dict(part.split("=", 1) for part in label.split(","))


def expand(method: str, entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every variant of ``method`` from its config entry: name -> its parameters (the entry's
    shared keys, overridden by the grid point's or the named variant's own; ``datasets``
    overrides stay in the entry and apply to each variant). Grid points first, in the grid's
    order, then the named variants; a ValueError names a repeated name or an empty grid."""
    shared = {key: value for key, value in entry.items() if key not in ENTRY_KEYS}
    grid = entry.get("grid") or {}
    named = entry.get("variants") or []
    if not grid and not named:
        return {method: shared}
    variants: dict[str, dict[str, Any]] = {}
    if grid:
        keys = list(grid)
        for key in keys:
            if not isinstance(grid[key], list) or not grid[key]:
                raise ValueError(f"methods.{method}.grid.{key}: must be a non-empty list of values")
        for point in itertools.product(*(grid[key] for key in keys)):
            values = dict(zip(keys, point))
            _add(variants, method, variant_name(method, grid_label(values)), {**shared, **values})
    for index, variant in enumerate(named):
        own = {key: value for key, value in variant.items() if key != "name"}
        if not re.fullmatch(r"[a-z0-9_]+", str(variant.get("name", ""))):
            raise ValueError(f"methods.{method}.variants.{index}.name: {variant.get('name')!r} must match [a-z0-9_]+")
        _add(variants, method, variant_name(method, variant["name"]), {**shared, **own})
    return variants


def _add(variants: dict[str, dict[str, Any]], method: str, name: str, params: dict[str, Any]) -> None:
    if name in variants:
        raise ValueError(f"methods.{method}: variant {name!r} is defined twice")
    variants[name] = params


def study_variants(methods: Mapping[str, Mapping[str, Any]], trained: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every trained method's variants (:func:`expand`), by method, in the config's order."""
    return {method: expand(method, methods[method]) for method in methods if method in trained}


__all__ = ["ENTRY_KEYS", "PATTERN", "SEPARATOR", "VARIANT_KEYS", "expand", "format_value", "grid_label",
           "grid_values", "method_of", "parse_name", "study_variants", "variant_name"]
