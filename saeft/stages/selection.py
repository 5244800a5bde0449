"""Stage ``select_variants``: per dataset, which variant of each method the study reports.

The paper's protocol, and the only one that does not peek: the variant with the best metric on
the dataset's ID validation split (held out from training, never a shift and never the ID test
split; :attr:`saeft.data.registry.DatasetSpec.val_split`), as the mean over the selection seeds.
Ties go to the variant listed first. Rule ``one_se`` (``selection.rule``) instead takes the first
listed variant within one standard error of that best mean, which prefers the conservative end
of a grid (listed first) unless a later value is better by more than the noise. The OOD oracle (best OOD average, the mean over the shifts
per seed and then over seeds) is recorded beside it as an upper bound: it reads the shifts, so
it is never the reported choice.

The job writes ``selection.json`` (:func:`run`), which the workflow reads as a checkpoint: the
selected variant of each method then runs on every seed, and its WiSE-FT curve is evaluated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from saeft.infra.io import read_json, write_json
from saeft.report.results import load_metrics

logger = logging.getLogger(__name__)

CRITERIA = {"val": "ID validation", "ood": "OOD oracle"}
"""What a selection maximises: the ID validation metric (reported), or the OOD average (oracle)."""

RULES = {"best": "the best", "one_se": "the first listed variant within one standard error of the best"}
"""How the scores choose (``selection.rule``), as the criterion text says it."""


def variant_scores(df: pd.DataFrame, variants: Sequence[str], criterion: str) -> pd.DataFrame:
    """Score of each of ``variants`` on ``criterion`` from the tidy table ``df`` (fine-tuned
    rows of one dataset, no WiSE-FT): columns variant, score (mean over seeds), n_seeds and se
    (:func:`standard_error`; ID validation only, NaN for the oracle), in the order given. A
    ValueError names a variant without a result."""
    rows = df[df["alpha"].isna() & df["variant"].isin(variants)]
    if criterion not in CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    rows = rows[rows["role"] == criterion]
    per_seed = rows.groupby(["variant", "seed"])["value"].mean()
    stats = per_seed.groupby(level="variant").agg(["mean", "count"])
    missing = [v for v in variants if v not in stats.index]
    if missing:
        raise ValueError(f"no {CRITERIA[criterion]} result for variant(s) {', '.join(missing)}")
    images = rows.groupby("variant")["n"].sum()
    se = [standard_error(per_seed.loc[v].to_numpy(), int(images[v])) if criterion == "val" else float("nan")
          for v in variants]
    return pd.DataFrame({"variant": list(variants), "score": [float(stats.loc[v, "mean"]) for v in variants],
                         "n_seeds": [int(stats.loc[v, "count"]) for v in variants], "se": se})


def standard_error(per_seed: np.ndarray, n_images: int) -> float:
    """Standard error of a mean accuracy over seeds, ``per_seed`` its value on each seed and
    ``n_images`` the validation images summed over the seeds: binomial over the images,
    p(1-p)/n_images, plus the spread over seeds (sample variance / seeds) when there are two or
    more. A mean over several validation sets is treated as one proportion (an approximation)."""
    p = float(np.mean(per_seed))
    variance = p * (1 - p) / n_images
    if len(per_seed) >= 2:
        variance += float(np.var(per_seed, ddof=1)) / len(per_seed)
    return float(np.sqrt(variance))


def choose(scores: pd.DataFrame, rule: str = "best") -> str:
    """The variant ``rule`` picks from ``scores`` (:func:`variant_scores`): ``best``, the highest
    score (the first listed on a tie); ``one_se``, the first listed whose score is at least the
    best's minus the best's ``se``."""
    values = scores["score"].to_numpy()
    best = int(values.argmax())
    if rule == "best":
        return str(scores["variant"].iloc[best])
    if rule != "one_se":
        raise ValueError(f"selection.rule: unknown rule {rule!r}; known: {', '.join(RULES)}")
    threshold = values[best] - float(scores["se"].iloc[best])
    return str(scores["variant"].iloc[int(np.flatnonzero(values >= threshold)[0])])


def select(df: pd.DataFrame, variants: Mapping[str, Sequence[str]], oracle: bool = True,
           rule: str = "best") -> dict[str, dict[str, Any]]:
    """Per method of ``variants`` (method -> its variants, several each): the variant ``rule``
    selects (:func:`choose`), the best-scoring one and its standard error (what ``one_se``
    measures against), every variant's validation score, and (``oracle``) the OOD-oracle choice
    (always the best OOD average) with its scores."""
    out: dict[str, dict[str, Any]] = {}
    for method, names in variants.items():
        scores = variant_scores(df, names, "val")
        best = choose(scores, "best")
        entry: dict[str, Any] = {"selected": choose(scores, rule), "best": best,
                                 "se": float(scores.set_index("variant").loc[best, "se"]),
                                 "scores": dict(zip(scores["variant"], scores["score"])),
                                 "n_seeds": dict(zip(scores["variant"], scores["n_seeds"].tolist()))}
        if oracle:
            ood = variant_scores(df, names, "ood")
            entry["oracle"] = {"selected": choose(ood), "scores": dict(zip(ood["variant"], ood["score"]))}
        out[method] = entry
        logger.info("%s: selected %s on ID validation by rule %s (best %s, se %.4f; %s)", method, entry["selected"], rule,
                    best, entry["se"], ", ".join(f"{v} {s:.4f}" for v, s in entry["scores"].items()))
    return out


def run(
    eval_paths: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    variants: Mapping[str, Mapping[str, Mapping[str, Any]]],
    seeds: Sequence[int],
    oracle: bool = True,
    rule: str = "best",
    order: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Select among ``variants`` (method -> variant -> its parameters) from the evaluation
    bundles of every variant on ``seeds`` by ``rule`` (:data:`RULES`), and write
    ``selection.json`` atomically: per method the selected variant, the best and its standard
    error, the scores, the parameters of every variant; the rule and how it chose. ``order``
    (method -> its variants as the config lists them) is the order ties and ``one_se`` go by;
    without it, ``variants``' own order (a JSON object on the command line loses it)."""
    if rule not in RULES:
        raise ValueError(f"selection.rule: unknown rule {rule!r}; known: {', '.join(RULES)}")
    df = load_metrics(eval_paths)
    datasets, models = sorted(df["dataset"].unique()), sorted(df["model"].unique())
    if len(datasets) != 1 or len(models) != 1:
        raise ValueError(f"a selection covers one model and dataset; the results hold {models} x {datasets}")
    val = df[df["role"] == "val"]
    if val.empty:
        raise ValueError(f"{datasets[0]}: no ID validation results (role 'val'): nothing to select on")
    listed = {m: list(order[m]) if order and m in order else list(v) for m, v in variants.items()}
    for method, names in listed.items():
        if sorted(names) != sorted(variants[method]):
            raise ValueError(f"selection order of {method} lists {names}, its variants are {sorted(variants[method])}")
    chosen = select(df, listed, oracle, rule)
    for method, entry in chosen.items():
        entry["params"] = {name: dict(params) for name, params in variants[method].items()}
    metric, evalset = val["metric"].iloc[0], val["evalset"].iloc[0]
    seeds_text = ", ".join(str(s) for s in sorted(seeds))
    if rule == "best":
        criterion = f"best ID validation {metric} on '{evalset}' (mean over seeds {seeds_text}); ties to the first listed"
    else:
        criterion = (f"{RULES[rule]} ID validation {metric} on '{evalset}' (mean over seeds {seeds_text}; standard "
                     "error binomial over its validation images, plus the spread over seeds with two or more)")
    record = {
        "model": models[0], "dataset": datasets[0], "seeds": sorted(int(s) for s in seeds),
        "evalset": str(evalset), "metric": str(metric), "rule": rule, "criterion": criterion, "methods": chosen,
    }
    write_json(out, record)
    return record


__all__ = ["CRITERIA", "RULES", "choose", "run", "select", "standard_error", "variant_scores"]
