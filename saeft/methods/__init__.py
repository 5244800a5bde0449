"""The method registry: every fine-tuning method (and WiSE-FT, evaluated only), registered once by
its own module. Adding a method is one module that calls :func:`register`, plus its test.

Imports no torch: the workflow reads names, parameters and needs while it plans."""

from __future__ import annotations

from saeft.methods.base import NEEDS, Method, MethodParams
from saeft.methods.registry import all_methods, get_method, needing, register, trained_methods, unregister

# The built-in methods, in display order (each module registers its methods on import).
from saeft.methods import lp, ft, lpft, wiseft, l2sp, features, ldifs, flyp, sae, scratch  # noqa: E402,F401

__all__ = ["NEEDS", "Method", "MethodParams", "all_methods", "get_method", "needing", "register", "trained_methods", "unregister"]
