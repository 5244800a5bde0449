"""Typed stage configs: dataclasses built from the JSON that a rule passes, validated on creation.

Each stage module defines a ``@dataclass`` subclass of :class:`StageConfig` with a docstring per
field and a ``__post_init__`` that rejects bad values, naming the key. ``from_dict`` rejects
unknown keys, so a typo in ``config.yaml`` never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T", bound="StageConfig")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the key."""


@dataclasses.dataclass
class StageConfig:
    """Base class: construction from a mapping with unknown-key and type checks."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
        """Build the config from ``data``; ``where`` prefixes key names in errors (e.g. ``sae.``)."""
        data = dict(data or {})
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                f"allowed: {', '.join(sorted(fields))}"
            )
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            _check_type(where + name, value, hints[name])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{where or cls.__name__}: {exc}") from exc

    @classmethod
    def from_json(cls: type[T], text: str, where: str = "") -> T:
        """Build the config from a JSON object string (what rules pass on the command line)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where or cls.__name__}: config is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{where or cls.__name__}: config must be a JSON object")
        return cls.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-serialisable data."""
        return dataclasses.asdict(self)


def require(condition: bool, key: str, reason: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {reason}")


def _check_type(key: str, value: Any, hint: Any) -> None:
    """Check ``value`` against a simple type hint (scalars, unions, list/dict of scalars)."""
    if _matches(value, hint):
        return
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {type(value).__name__} {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, key_t) and _matches(v, val_t) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
