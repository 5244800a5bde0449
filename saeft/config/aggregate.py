"""The ``aggregate`` section: how tables and figures order, label and format results. Its
defaults come from the method registry (each method's display label, registration order), so it
lives apart from :mod:`saeft.config.stages`. Imports no torch."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from saeft.config.base import Fraction, NonNegInt, PositiveInt, Schema, StageConfig


def default_method_order() -> list[str]:
    """Zero-shot, then every registered method in registration order."""
    from saeft.methods import all_methods

    return ["zeroshot", *all_methods()]


def default_method_labels() -> dict[str, str]:
    """Display names: Zero-shot, each registered method's label, and WiSE-FT of each trained
    method other than FT (row ``wiseft_<method>``: "WiSE-FT (<label>)")."""
    from saeft.methods import all_methods
    from saeft.plan.runs import wiseft_name

    labels = {"zeroshot": "Zero-shot", **{name: method.label for name, method in all_methods().items()}}
    wiseft = labels.get("wiseft", "WiSE-FT")
    labels.update({wiseft_name(name): f"{wiseft} ({method.label})" for name, method in all_methods().items()
                   if method.trained and wiseft_name(name) not in labels})
    return labels


DEFAULT_METRIC_LABELS = {"top1": "top-1 accuracy", "macro_f1": "macro-F1", "worst_region_acc": "worst-region accuracy"}


@dataclasses.dataclass
class AggregateConfig(StageConfig):
    """Display options of the tables and figures of aggregate_tables (config key ``aggregate``;
    WiSE-FT rows use methods.wiseft.alpha)."""

    section = "aggregate"
    method_order: Annotated[list[str], Schema(unique_items=True)] = dataclasses.field(default_factory=default_method_order)
    """Row order of methods; methods not listed follow, alphabetically."""
    method_labels: dict[str, Annotated[str, Schema(min_length=1)]] = dataclasses.field(default_factory=default_method_labels)
    """Display name per method, over the defaults (FT, WiSE-FT, SAE-FT, ...)."""
    metric_labels: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_METRIC_LABELS))
    """Display name per metric (top1, macro_f1, worst_region_acc), over the defaults."""
    percent: bool = True
    """Show values x100 (tables, figure axes); the CSV and Parquet keep fractions."""
    decimals: NonNegInt = 1
    """Decimals of means and stds in the tables."""
    bootstrap: PositiveInt = 1000
    """Bootstrap resamples of each eval set's images behind every interval (saeft.report.uncertainty)."""
    level: Annotated[float, Schema(exclusive_minimum=0, exclusive_maximum=1)] = 0.95
    """Coverage of the intervals: bootstrap over images within a seed, with the spread over seeds."""
    compare: str = "saeft"
    """The method the comparison table pits against ``compare_with`` (paired differences)."""
    compare_with: list[str] = dataclasses.field(default_factory=lambda: ["ft", "wiseft", "feat_mse", "lpft"])
    """Table rows (methods, WiSE-FT rows) the ``compare`` method is compared with, where the study has them."""
    wiseft_alpha: Fraction | None = dataclasses.field(default=None, metadata={"config": False})
    """The reported WiSE-FT alpha (the workflow sets it from methods.wiseft.alpha): the tables show
    WiSE-FT there; the other alphas are curve points. None: a method may carry one alpha only."""
    pretrained: str | None = dataclasses.field(default=None, metadata={"config": False})
    """The study's weights (the workflow sets it from model.pretrained): the reference table
    compares only with published cells of the same weights. None: with every cell."""

    def label(self, method: str) -> str:
        """Display name of ``method``."""
        return self.method_labels.get(method, default_method_labels().get(method, method))

    def metric_label(self, metric: str) -> str:
        """Display name of ``metric`` (of each part of a ``/``-joined one, for mixed eval sets)."""
        return "/".join(self.metric_labels.get(m, DEFAULT_METRIC_LABELS.get(m, m)) for m in str(metric).split("/"))

    def scale_and_unit(self) -> tuple[float, str]:
        """Factor from fractions to shown values, and the unit's name: (100, "%") or (1, "fraction")."""
        return (100.0, "%") if self.percent else (1.0, "fraction")

    def method_sort_key(self, method: str) -> tuple[int, str]:
        """Sort key: listed methods in their order, then the others alphabetically."""
        try:
            return (self.method_order.index(method), "")
        except ValueError:
            return (len(self.method_order), method)
