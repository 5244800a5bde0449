"""The registry itself: register, look up and list methods. Imports no torch."""

from __future__ import annotations

from saeft.methods.base import Method

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name registered twice is an error) and return it."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove ``name`` (tests that register a method of their own)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method ``name``; the error names the key and lists the known ones."""
    from saeft.config import ConfigError

    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"methods.{name}: unknown method {name!r}; known: {', '.join(_REGISTRY)}") from None


def all_methods() -> dict[str, Method]:
    """Every registered method by name, in registration (display) order."""
    return dict(_REGISTRY)


def trained_methods() -> list[str]:
    """Names of the methods a finetune job trains."""
    return [name for name, method in _REGISTRY.items() if method.trained]


def needing(need: str) -> frozenset[str]:
    """Names of the methods that need ``need`` (one of :data:`NEEDS`)."""
    return frozenset(name for name, method in _REGISTRY.items() if need in method.needs)
