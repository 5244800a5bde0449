"""Stage ``select_variants``: per dataset, which variant of each method the study reports.

The paper's protocol, and the only one that does not peek: the variant with the best metric on
the dataset's ID validation split (held out from training, never a shift and never the ID test
split; :attr:`saeft.data.registry.DatasetSpec.val_split`), as the mean over the selection seeds.
Ties go to the variant listed first. The OOD oracle (best OOD average, the mean over the shifts
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

import pandas as pd

from saeft.io import read_json, write_json
from saeft.results import load_metrics

logger = logging.getLogger(__name__)

CRITERIA = {"val": "ID validation", "ood": "OOD oracle"}
"""What a selection maximises: the ID validation metric (reported), or the OOD average (oracle)."""


def variant_scores(df: pd.DataFrame, variants: Sequence[str], criterion: str) -> pd.DataFrame:
    """Score of each of ``variants`` on ``criterion`` from the tidy table ``df`` (fine-tuned
    rows of one dataset, no WiSE-FT): columns variant, score (mean over seeds), n_seeds, in the
    order given. A ValueError names a variant without a result."""
    rows = df[df["alpha"].isna() & df["variant"].isin(variants)]
    if criterion == "val":
        per_seed = rows[rows["role"] == "val"].groupby(["variant", "seed"])["value"].mean()
    elif criterion == "ood":
        per_seed = rows[rows["role"] == "ood"].groupby(["variant", "seed"])["value"].mean()
    else:
        raise ValueError(f"unknown selection criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    stats = per_seed.groupby(level="variant").agg(["mean", "count"])
    missing = [v for v in variants if v not in stats.index]
    if missing:
        raise ValueError(f"no {CRITERIA[criterion]} result for variant(s) {', '.join(missing)}")
    return pd.DataFrame({"variant": list(variants), "score": [float(stats.loc[v, "mean"]) for v in variants],
                         "n_seeds": [int(stats.loc[v, "count"]) for v in variants]})


def choose(scores: pd.DataFrame) -> str:
    """The variant with the highest score; the first listed on a tie."""
    return str(scores["variant"].iloc[int(scores["score"].to_numpy().argmax())])


def select(df: pd.DataFrame, variants: Mapping[str, Sequence[str]], oracle: bool = True) -> dict[str, dict[str, Any]]:
    """Per method of ``variants`` (method -> its variants, several each): the selected variant,
    every variant's validation score, and (``oracle``) the OOD-oracle choice with its scores."""
    out: dict[str, dict[str, Any]] = {}
    for method, names in variants.items():
        scores = variant_scores(df, names, "val")
        entry: dict[str, Any] = {"selected": choose(scores), "scores": dict(zip(scores["variant"], scores["score"])),
                                 "n_seeds": dict(zip(scores["variant"], scores["n_seeds"].tolist()))}
        if oracle:
            ood = variant_scores(df, names, "ood")
            entry["oracle"] = {"selected": choose(ood), "scores": dict(zip(ood["variant"], ood["score"]))}
        out[method] = entry
        logger.info("%s: selected %s on ID validation (%s)", method, entry["selected"],
                    ", ".join(f"{v} {s:.4f}" for v, s in entry["scores"].items()))
    return out


def run(
    eval_paths: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    variants: Mapping[str, Mapping[str, Mapping[str, Any]]],
    seeds: Sequence[int],
    oracle: bool = True,
) -> dict[str, Any]:
    """Select among ``variants`` (method -> variant -> its parameters) from the evaluation
    bundles of every variant on ``seeds``, and write ``selection.json`` atomically: per method the
    selected variant, the scores, the parameters of every variant, and how it was chosen."""
    df = load_metrics(eval_paths)
    datasets, models = sorted(df["dataset"].unique()), sorted(df["model"].unique())
    if len(datasets) != 1 or len(models) != 1:
        raise ValueError(f"a selection covers one model and dataset; the results hold {models} x {datasets}")
    val = df[df["role"] == "val"]
    if val.empty:
        raise ValueError(f"{datasets[0]}: no ID validation results (role 'val'): nothing to select on")
    chosen = select(df, {m: list(v) for m, v in variants.items()}, oracle)
    for method, entry in chosen.items():
        entry["params"] = {name: dict(params) for name, params in variants[method].items()}
    record = {
        "model": models[0], "dataset": datasets[0], "seeds": sorted(int(s) for s in seeds),
        "evalset": str(val["evalset"].iloc[0]), "metric": str(val["metric"].iloc[0]),
        "criterion": f"best ID validation {val['metric'].iloc[0]} on '{val['evalset'].iloc[0]}' (mean over seeds "
                     f"{', '.join(str(s) for s in sorted(seeds))}); ties to the first listed",
        "methods": chosen,
    }
    write_json(out, record)
    return record


def read_selections(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """``selection.json`` files by dataset (errors name the file)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or "dataset" not in data:
            raise ValueError(f"{path}: expected a selection with 'dataset' and 'methods'")
        out[str(data["dataset"])] = data
    return out


__all__ = ["CRITERIA", "choose", "read_selections", "run", "select", "variant_scores"]
