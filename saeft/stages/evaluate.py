"""Stage ``evaluate``: a model's metric on every evaluation split of a dataset, in one job.

One evaluator serves every dataset: it asks the registry for each split, computes the classifier's
logits, applies the eval set's hook (class sub-list or logit projection, :mod:`saeft.nn.metrics`),
and reports the eval set's metric with the sample count and per-class counts, so tables can be
rebuilt and re-weighted from the JSON alone. The model is loaded once (a WiSE-FT model is
interpolated here, in memory, from the fine-tuned and zero-shot weights, :func:`saeft.nn.models.load_wiseft`; it
is never written to disk) and scored on the dataset's eval splits, then on its transfer sets: a
transfer set is another dataset's ID eval split scored through that dataset's zero-shot head (in
place of the classifier's own) and is named by that dataset.

The job writes one bundle JSON (:func:`run`): the run's identity and ``evals``, one record per
eval set keyed by its name (:func:`saeft.report.results.eval_records` reads it), written
atomically once every eval set is scored, so a job killed midway leaves no output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from saeft.config.stages import EvaluateConfig
from saeft.data.registry import DatasetSpec, get_dataset
from saeft.infra.faults import maybe_kill
from saeft.infra.io import write_json
from saeft.nn import metrics
from saeft.nn.models import ImageClassifier, load_run_model, preprocess_for, with_head
from saeft.nn.training import Progress, default_device, eval_loader, setup_torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: ImageClassifier, data: torch.utils.data.Dataset, cfg: EvaluateConfig, label: str, spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels of every item of ``data``, predictions over the eval set's
    classes (its class sub-list or projection applied to the logits, on the CPU). The model runs
    on the device it is on."""
    model.eval()
    device = next(model.parameters()).device
    hooks = spec.evalset(split)
    predictions, targets = [], []
    progress = Progress(len(data), label)
    for images, labels in eval_loader(data, cfg.batch_size, cfg.workers, device):
        logits = model(images.to(device, non_blocking=True))[0].float().cpu()
        predictions.append(metrics.eval_logits(logits, hooks).argmax(-1))
        targets.append(labels)
        progress.update(sum(len(t) for t in targets))
    return torch.cat(predictions).numpy(), torch.cat(targets).numpy()


def score(spec: DatasetSpec, split: str, predicted: np.ndarray, target: np.ndarray, groups: np.ndarray | None, group_names: tuple[str, ...]) -> dict[str, Any]:
    """The eval set's metric (``value``) and its extra fields: ``average_accuracy`` (top-1)
    beside macro-F1 or worst-region accuracy, ``per_region`` for grouped eval sets."""
    hooks = spec.evalset(split)
    accuracy = metrics.top1(predicted, target)
    if hooks.metric == "top1":
        return {"value": accuracy}
    if hooks.metric == "macro_f1":
        return {"value": metrics.macro_f1(predicted, target), "average_accuracy": accuracy}
    if groups is None:
        raise ValueError(f"{spec.name}/{split}: metric {hooks.metric} needs per-sample regions, the loader gave none")
    per_region = metrics.group_accuracies(predicted, target, groups, group_names)
    worst = metrics.worst_group_accuracy(per_region, exclude=("Other",))
    return {"value": worst, "average_accuracy": accuracy, "per_region": per_region}


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One eval set of a run: split ``split`` of ``dataset``, read with the loader ``options``.
    A transfer set (``head``: that dataset's zero-shot head) is named by its dataset."""

    name: str
    dataset: str
    split: str
    options: Any
    head: str | os.PathLike | None = None


def eval_sets(
    dataset: str,
    splits: Sequence[str],
    dataset_options: Any,
    transfer: Mapping[str, tuple[str | os.PathLike, Any]] | None = None,
) -> list[EvalSet]:
    """The eval sets of a run, in order: ``splits`` of ``dataset``, then each transfer set
    (``transfer``: dataset -> (its zero-shot head, its loader options)), read at its ID eval
    split. Raises ``ValueError`` for a name given twice or a transfer set that is ``dataset``."""
    sets = [EvalSet(split, dataset, split, dataset_options) for split in splits]
    for name, (head, options) in (transfer or {}).items():
        if name == dataset:
            raise ValueError(f"transfer set {name!r} is the dataset the model was fine-tuned on")
        sets.append(EvalSet(name, name, get_dataset(name).id_eval, options, head))
    names = [evalset.name for evalset in sets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"eval set names given twice: {', '.join(repeated)}")
    if not sets:
        raise ValueError("no eval set to evaluate: give splits or transfer sets")
    return sets


def fingerprint(data: torch.utils.data.Dataset, target: np.ndarray, dataset: str, split: str, options: Any) -> dict[str, str]:
    """Where an eval set's images came from (``source``: a folder or file, or
    ``generated:<dataset>/<split>`` for images made in memory) and a ``digest`` of what was read:
    the dataset and split names, the labels in the loader's order and the image files' paths
    relative to the source or, without files, the loader options that generate the images.
    Cheap: no image is read."""
    source = str(getattr(data, "source", "") or f"generated:{dataset}/{split}")
    digest = hashlib.sha256(f"{dataset}/{split}\0".encode())
    digest.update(np.ascontiguousarray(target, dtype=np.int64).tobytes())
    files = getattr(data, "files", None)
    if files is not None:
        for path in files:
            name = os.path.relpath(path, source) if os.path.isabs(str(path)) and os.path.isabs(source) else str(path)
            digest.update(name.encode() + b"\0")
    else:
        plain = options.to_dict() if hasattr(options, "to_dict") else options
        digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    return {"source": source, "digest": digest.hexdigest()[:16]}


def score_split(
    classifier: ImageClassifier,
    evalset: EvalSet,
    cfg: EvaluateConfig,
    identity: dict[str, Any],
    transfer_from: str | None = None,
    predictions: dict[str, dict[str, np.ndarray]] | None = None,
    inputs: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The result record of ``classifier`` on one eval set (a transfer set is scored through its
    head): identity, dataset, eval set, role, metric and value, n, per-class counts, classnames.
    ``transfer_from``: the dataset the model was fine-tuned on, when ``evalset`` is a transfer
    set; the record is filed under that dataset, eval set ``evalset.dataset``, role 'transfer'.
    ``predictions``, if given, gets the per-image predicted and true labels (and region names)
    under the record's eval set name (:func:`write_predictions`); ``inputs``, if given, the eval
    set's source and digest (:func:`fingerprint`) under that name."""
    dataset, split = evalset.dataset, evalset.split
    if evalset.head is not None:
        classifier = with_head(classifier, evalset.head).to(next(classifier.parameters()).device)
    spec = get_dataset(dataset, evalset.options)
    data = spec.load(split, preprocess_for(classifier.visual), evalset.options)
    predicted, target = predict(classifier, data, cfg, f"evaluate {dataset}/{split}", spec, split)
    classnames = spec.evalset_classnames(split)
    total = np.bincount(target, minlength=len(classnames))
    correct = np.bincount(target[predicted == target], minlength=len(classnames))
    groups, group_names = getattr(data, "groups", None), getattr(data, "group_names", ())
    scores = score(spec, split, predicted, target, groups, group_names)
    if predictions is not None:
        names = None if groups is None else np.asarray(group_names, dtype=object)[np.asarray(groups)]
        predictions[dataset if transfer_from else split] = {"predicted": predicted, "target": target, "group": names}
    if inputs is not None:
        inputs[dataset if transfer_from else split] = fingerprint(data, target, dataset, split, evalset.options)
    result = {
        **identity,
        "dataset": transfer_from or dataset,
        "evalset": dataset if transfer_from else split,
        "role": "transfer" if transfer_from else spec.role(split),
        "metric": spec.evalset(split).metric,
        **scores,
        "n": len(target),
        "per_class": {"correct": correct.tolist(), "total": total.tolist()},
        "classnames": list(classnames),
    }
    if transfer_from:
        result["transfer"] = {"dataset": dataset, "split": split}
    logger.info("%s/%s %s: %s = %.4f (n=%d)", dataset, split, identity.get("method"), result["metric"], result["value"], len(target))
    return result


def run(
    model: str | os.PathLike,
    head: str | os.PathLike | None,
    dataset: str,
    splits: Sequence[str],
    dataset_options: Any,
    cfg: EvaluateConfig,
    out: str | os.PathLike,
    identity: dict[str, Any],
    wiseft: tuple[str | os.PathLike, str | os.PathLike, float] | None = None,
    transfer: Mapping[str, tuple[str | os.PathLike, Any]] | None = None,
    out_predictions: str | os.PathLike | None = None,
    inputs: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate one run on every eval set and write the bundle JSON ``out``; returns the records
    by eval set name. ``identity`` holds study, model, method and seed (and alpha). ``splits``:
    the eval splits of ``dataset``; ``transfer``: transfer set -> (its zero-shot head, its loader
    options), each scored on its ID eval split through that head. ``wiseft``: (zero-shot model,
    zero-shot head, alpha) to evaluate the interpolation of ``model`` with the zero-shot model
    instead of ``model`` itself. The model is loaded once; the bundle is written once, after the
    last eval set, as ``{**identity, "dataset": dataset, "evals": {name: record}}``, and, given
    ``out_predictions``, the per-image predictions behind it (:func:`write_predictions`).
    ``inputs``, if given, gets each eval set's source and digest (:func:`fingerprint`) by name."""
    sets = eval_sets(dataset, splits, dataset_options, transfer)
    setup_torch(0)
    classifier = load_run_model(model, head, wiseft).to(default_device())
    results: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    for evalset in sets:
        setup_torch(0)  # each eval set from the same seeds, as in a job of its own
        transfer_from = dataset if evalset.head is not None else None
        results[evalset.name] = score_split(classifier, evalset, cfg, identity, transfer_from, predictions, inputs)
        maybe_kill("evalset")
    if out_predictions is not None:
        write_predictions(out_predictions, predictions)
    write_json(out, {**identity, "dataset": dataset, "evals": results})
    return results


PREDICTION_COLUMNS = ("evalset", "predicted", "target", "group")
"""Columns of ``predictions.parquet``: per image of every eval set (in the loader's order), the
predicted and the true label over the eval set's classes, and its region (null without)."""


def write_predictions(path: str | os.PathLike, predictions: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the per-image predictions of every eval set as one Parquet table, atomically: what
    the intervals of :mod:`saeft.report.uncertainty` resample."""
    import pandas as pd

    from saeft.infra.io import atomic_path

    frames = [pd.DataFrame({"evalset": name, "predicted": p["predicted"].astype("int32"), "target": p["target"].astype("int32"),
                            "group": p["group"] if p["group"] is not None else None}) for name, p in predictions.items()]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    table["group"] = table["group"].astype("string")
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=False)
