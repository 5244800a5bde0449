"""The method registry: every fine-tuning method (and WiSE-FT, evaluated only), registered once by
its own module. Adding a method is one module that calls :func:`register`, plus its test.

Imports no torch: the workflow reads names, parameters and needs while it plans."""

from __future__ import annotations

from saeft.methods.base import NEEDS, Method, MethodParams

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


# The built-in methods, in display order (each module registers its methods on import).
from saeft.methods import lp, ft, lpft, wiseft, l2sp, features, ldifs, flyp, sae  # noqa: E402,F401

__all__ = ["NEEDS", "Method", "MethodParams", "all_methods", "get_method", "needing", "register", "trained_methods", "unregister"]
