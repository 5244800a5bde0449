"""Stage ``calibrate``: measure whether a study's world reproduces robust fine-tuning's effects.

Reads the evaluations of zero-shot, the baseline (FT: its reported variant on every seed), its
WiSE-FT curve, and LP-FT, FLYP, LP and ID-only models where the study has them, with their
per-image predictions; makes, in this one job, the runs that no evaluation job makes, from the
zero-shot and the baseline's weights: the output-space ensemble at 0.5 per seed, the uniform soup
of the seeds, and the ID-validation loss along the interpolation path; then measures the criteria
of :mod:`saeft.report.calibration` and writes ``calibration.json`` atomically: every criterion's
record, the gate and its failures, and the runs it made. The aggregate stage turns it into
``tables/calibration.*`` and withholds the comparison's reading when a gate criterion fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from saeft.config.calibration import CalibrationConfig
from saeft.config.stages import EvaluateConfig
from saeft.data.registry import get_dataset
from saeft.infra.io import read_json, write_json
from saeft.nn import metrics
from saeft.nn.models import ImageClassifier, classifier_from_zeroshot, load_classifier, preprocess_for
from saeft.nn.training import default_device, eval_loader, setup_torch
from saeft.nn.weights import interpolate_weights
from saeft.report import calibration
from saeft.report.intervals import Evaluations
from saeft.report.results import load_metrics

logger = logging.getLogger(__name__)

ENSEMBLE = "ensemble"
"""Variant (and method) name of the output-space ensemble at alpha 0.5 in the calibration's runs."""
SOUP = "soup"
"""Variant (and method) name of the uniform soup of the baseline's seeds."""


@torch.no_grad()
def split_logits(model: ImageClassifier, data: torch.utils.data.Dataset, cfg: EvaluateConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits over the head's classes and labels of every item of ``data`` (model on its device)."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for images, targets in eval_loader(data, cfg.batch_size, cfg.workers, device):
        logits.append(model(images.to(device, non_blocking=True))[0].float().cpu())
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def _records(template: pd.DataFrame, method: str, seed: Any, alpha: float | None,
             values: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Tidy rows of a made run (like an evaluation's), one per eval set, from its predictions."""
    rows = template.drop_duplicates("evalset").set_index("evalset")
    out = []
    for evalset, (predicted, target) in values.items():
        row = rows.loc[evalset]
        out.append({"study": row["study"], "model": row["model"], "dataset": row["dataset"], "method": method,
                    "variant": method, "seed": seed, "alpha": alpha, "evalset": evalset, "role": row["role"],
                    "metric": row["metric"], "value": metrics.top1(predicted, target), "n": len(target)})
    return pd.DataFrame(out)


def run(
    eval_paths: Sequence[str | os.PathLike],
    prediction_paths: Sequence[str | os.PathLike],
    zeroshot_model: str | os.PathLike,
    zeroshot_head: str | os.PathLike,
    baseline_models: Mapping[int, str | os.PathLike],
    dataset: str,
    dataset_options: Any,
    cfg: CalibrationConfig,
    out: str | os.PathLike,
    eval_cfg: EvaluateConfig | None = None,
    level: float = 0.95,
    n_boot: int = 1000,
    pretrain_lr: float | None = None,
    quality: str | os.PathLike | None = None,
    selection: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Measure the calibration of ``dataset``'s world and write ``calibration.json`` to ``out``.

    ``baseline_models``: the baseline's fine-tuned classifier per seed (its ``train.json``
    beside each gives the lr); ``pretrain_lr``: the pretraining's peak lr (P4; None: the study
    does not pretrain); ``quality``: the pretrained model's quality record (its linear probe,
    P2, where the study runs no linear probe); ``selection``: the dataset's selection.json (how
    the baseline's lr was chosen)."""
    spec = get_dataset(dataset, dataset_options)
    if spec.metric != "top1":
        raise ValueError(f"calibration of {dataset}: criteria are defined on top-1 accuracy, the dataset reports {spec.metric}")
    df = load_metrics(eval_paths)
    ev = Evaluations(eval_paths, prediction_paths, {(d, e): m for d, e, m in zip(df["dataset"], df["evalset"], df["metric"])}, n_boot)
    made, path_loss = make_runs(df, ev, zeroshot_model, zeroshot_head, baseline_models, spec, dataset_options, cfg,
                                eval_cfg or EvaluateConfig())
    df = pd.concat([df, *made], ignore_index=True).astype({"seed": "Int64", "alpha": "float64"})
    lr_ratio, lr_detail = _lr_ratio(baseline_models, pretrain_lr, selection, cfg.baseline)
    inputs = calibration.Inputs(
        dataset=dataset, chance=1.0 / len(spec.classnames), baseline=cfg.baseline, lpft=cfg.lpft, flyp=cfg.flyp,
        ensemble=ENSEMBLE, soup=SOUP if len(baseline_models) > 1 else None, path_loss=path_loss,
        lr_ratio=lr_ratio, lr_detail=lr_detail, linear_probe=_linear_probe(df, dataset, cfg.linear_probe, quality),
        id_only_line=_id_only_line(df, dataset, cfg.id_only))
    records = calibration.assess(df, ev, inputs, cfg.gate, level)
    failures = calibration.gate_failures(records)
    result = {"dataset": dataset, "gate": list(cfg.gate), "failures": failures, "calibrated": not failures,
              "criteria": records, "path_loss": {f"{a:g}": v for a, v in path_loss.items()},
              "lr_ratio": lr_ratio, "baseline": cfg.baseline, "level": level}
    write_json(out, result)
    logger.info("%s: %s", dataset, "calibrated" if not failures else calibration.not_calibrated_text(failures))
    return result


def make_runs(df: pd.DataFrame, ev: Evaluations, zeroshot_model: str | os.PathLike, zeroshot_head: str | os.PathLike,
              baseline_models: Mapping[int, str | os.PathLike], spec: Any, options: Any, cfg: CalibrationConfig,
              eval_cfg: EvaluateConfig) -> tuple[list[pd.DataFrame], dict[float, float]]:
    """The runs no evaluation job makes, from the zero-shot and the baseline's weights: the
    output-space ensemble at 0.5 per seed and the uniform soup of the seeds (their predictions
    added to ``ev``, their tidy rows returned), and the mean ID-validation loss over seeds at
    each alpha of the path (0: zero-shot, 1: the baseline)."""
    setup_torch(0)
    device = default_device()
    zeroshot = classifier_from_zeroshot(zeroshot_model, zeroshot_head)[0].to(device)
    preprocess = preprocess_for(zeroshot.visual)
    data = {split: spec.load(split, preprocess, options) for split in spec.scored_splits}
    zs_logits = {split: split_logits(zeroshot, data[split], eval_cfg) for split in data}
    template = df[(df["dataset"] == spec.name) & (df["method"] == "zeroshot")]
    made: list[pd.DataFrame] = []
    losses: dict[float, list[float]] = {alpha: [] for alpha in [0.0, *sorted(cfg.path_alphas), 1.0]}
    states = []

    def predictions(logits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {s: (metrics.eval_logits(lg, spec.evalset(s)).argmax(-1).numpy(), y.numpy()) for s, (lg, y) in logits.items()}

    for seed, path in sorted(baseline_models.items()):
        tuned = load_classifier(path)[0]
        states.append({k: v.detach().clone() for k, v in tuned.state_dict().items()})
        tuned = tuned.to(device)
        ft_logits = {split: split_logits(tuned, data[split], eval_cfg) for split in data}
        mixed = {s: ((0.5 * zs_logits[s][0].softmax(-1) + 0.5 * ft_logits[s][0].softmax(-1)).log(), zs_logits[s][1]) for s in data}
        made.append(_add(ev, template, ENSEMBLE, seed, 0.5, predictions(mixed), spec.name))
        for alpha in losses if spec.val_split else ():
            tuned.load_state_dict(interpolate_weights(zeroshot.state_dict(), states[-1], alpha))
            logits, labels = split_logits(tuned, data[spec.val_split], eval_cfg)
            losses[alpha].append(float(F.cross_entropy(logits, labels)))
        logger.info("calibration runs of %s seed %d: the ensemble and the path done", spec.name, seed)
    if len(states) > 1:
        soup = load_classifier(next(iter(baseline_models.values())))[0]
        soup.load_state_dict({k: sum(state[k] for state in states) / len(states) for k in states[0]})
        soup = soup.to(device)
        made.append(_add(ev, template, SOUP, None, None, predictions({s: split_logits(soup, data[s], eval_cfg) for s in data}), spec.name))
    return made, {alpha: float(np.mean(v)) for alpha, v in losses.items() if v}


def _add(ev: Evaluations, template: pd.DataFrame, name: str, seed: int | None, alpha: float | None,
         values: dict[str, tuple[np.ndarray, np.ndarray]], dataset: str) -> pd.DataFrame:
    """Register a made run's predictions in ``ev``; its tidy rows."""
    for evalset, (predicted, target) in values.items():
        ev.arrays[(dataset, name, seed, alpha, evalset)] = (predicted, target, None)
    return _records(template, name, seed, alpha, values)


def _lr_ratio(models: Mapping[int, str | os.PathLike], pretrain_lr: float | None, selection: str | os.PathLike | None,
              baseline: str) -> tuple[float | None, str]:
    """The baseline's fine-tuning lr over the pretraining lr, and how that lr was chosen."""
    if pretrain_lr is None:
        return None, ""
    path = os.path.join(os.path.dirname(next(iter(models.values()))), "train.json")
    lr = float(read_json(path)["config"]["lr"])
    detail = f"lr {lr:g} (the study's finetune.lr)"
    if selection is not None and os.path.isfile(selection):
        record = read_json(selection)
        entry = record["methods"].get(baseline)
        if entry is not None:
            detail = f"lr {lr:g}, {entry['selected']} of {len(entry['scores'])} variants on ID validation ({record.get('rule', 'best')})"
    return lr / pretrain_lr, detail


def _linear_probe(df: pd.DataFrame, dataset: str, probe: str, quality: str | os.PathLike | None) -> float | None:
    """ID test top-1 of the linear probe: the study's runs of ``probe``, else the quality record's."""
    rows = df[(df["dataset"] == dataset) & (df["method"] == probe) & (df["role"] == "id") & df["alpha"].isna()]
    if len(rows):
        return float(rows.groupby("seed")["value"].first().mean())
    if quality is not None and os.path.isfile(quality):
        return float(read_json(quality)["linear_probe_top1"])
    return None


def _id_only_line(df: pd.DataFrame, dataset: str, id_only: str) -> tuple[float, float] | None:
    """OOD average against ID of the models trained on ID data only (every variant and seed of
    ``id_only``), as (slope, intercept); None with fewer than two distinct points."""
    rows = df[(df["dataset"] == dataset) & (df["method"] == id_only) & df["alpha"].isna()]
    if rows.empty:
        return None
    points = []
    for _, run in rows.groupby(["variant", "seed"]):
        id_rows, ood = run[run["role"] == "id"], run[run["role"] == "ood"]
        if len(id_rows) and len(ood):
            points.append((float(id_rows["value"].iloc[0]), float(ood["value"].mean())))
    if len({p[0] for p in points}) < 2:
        return None
    slope, intercept = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return float(slope), float(intercept)


__all__ = ["ENSEMBLE", "SOUP", "run", "split_logits"]
