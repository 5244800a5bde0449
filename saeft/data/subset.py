"""A dataset reduced for quick iterations: a class subset, an image cap per class, fewer prompt
templates (``data.<dataset>.classes``, ``max_images_per_class``, ``templates``).

:func:`restrict` turns a registered :class:`~saeft.data.registry.DatasetSpec` into the spec every
stage sees when such keys are set. What a class subset means for each kind of split:

- The dataset's classes are the chosen ones, in the dataset's label order (not the list's):
  label ``i`` is the ``i``-th chosen class. Zero-shot heads have one row per chosen class, and
  fine-tuning, caches and plain eval splits (ImageNet val, -V2, -Sketch; CIFAR-10.1/-10.2; WILDS
  id_test/test; transfer sets) keep only images of chosen classes.
- An eval split scored on a class sub-list (ImageNet-R, -A: their 200 classes) keeps the chosen
  classes among its own: its logits are restricted to those, its labels follow them.
- ObjectNet (a logit projection) keeps each of its classes that maps to at least one chosen
  ImageNet class; its logit is the maximum over those of its ImageNet classes that were chosen.
- FMoW keeps its regions (and the worst-region metric) on the images left; iWildCam's macro-F1
  is over the classes present, as always.

A split that would keep no class is an error at config time (:func:`check_reductions`), naming the
key, as is a class the dataset does not have or a name two classes share. The image cap keeps the
first ``max_images_per_class`` images of each (eval-set) class in every split, in the reader's
order. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from saeft.config import ConfigError
from saeft.data.samples import RealDataOptions, Samples

DatasetSpec = Any
"""A :class:`saeft.data.registry.DatasetSpec` (not imported: the registry imports this module)."""
EvalSet = Any
"""A :class:`saeft.data.registry.EvalSet`."""


def resolve_classes(spec: DatasetSpec, classes: Sequence[str | int], key: str = "classes") -> tuple[int, ...]:
    """Label indices of ``classes`` (names as in prompts, or label indices), ascending, once each.
    Raises :class:`ConfigError` naming ``key`` for an unknown or ambiguous class or an empty list."""
    if not classes:
        raise ConfigError(f"{key}: an empty class list keeps nothing (leave the key out for every class)")
    by_name: dict[str, list[int]] = {}
    for index, name in enumerate(spec.classnames):
        by_name.setdefault(name.lower(), []).append(index)
    chosen = set()
    for item in classes:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ConfigError(f"{key}: {item!r} is neither a class name nor a label index")
        if isinstance(item, int):
            if not 0 <= item < len(spec.classnames):
                raise ConfigError(f"{key}: label index {item} is outside 0..{len(spec.classnames) - 1} of {spec.name}")
            chosen.add(item)
            continue
        found = by_name.get(item.strip().lower().replace("_", " ")) or by_name.get(item.strip().lower())
        if not found:
            close = [n for n in spec.classnames if item.lower() in n.lower()][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ConfigError(f"{key}: {item!r} is not a class of {spec.name} ({len(spec.classnames)} classes{hint})")
        if len(found) > 1:
            raise ConfigError(f"{key}: {item!r} names {len(found)} classes of {spec.name} (labels "
                              f"{', '.join(map(str, found))}); give the label index instead")
        chosen.add(found[0])
    return tuple(sorted(chosen))


def _eval_classes(hooks: EvalSet, chosen: tuple[int, ...]) -> tuple[list[int], EvalSet]:
    """(the eval-set classes kept, the eval set's hooks in the subset's label space)."""
    position = {label: i for i, label in enumerate(chosen)}
    if hooks.class_subset is not None:
        kept = [j for j, label in enumerate(hooks.class_subset) if label in position]
        subset = tuple(position[hooks.class_subset[j]] for j in kept)
        names = tuple(hooks.classnames[j] for j in kept) if hooks.classnames is not None else None
        return kept, dataclasses.replace(hooks, class_subset=subset, classnames=names)
    if hooks.projection is not None:
        kept = [j for j, group in enumerate(hooks.projection) if any(label in position for label in group)]
        groups = tuple(tuple(position[label] for label in hooks.projection[j] if label in position) for j in kept)
        names = tuple(hooks.classnames[j] for j in kept) if hooks.classnames is not None else None
        return kept, dataclasses.replace(hooks, projection=groups, classnames=names)
    return list(chosen), hooks


def _cap(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` samples of each label (all without a limit), in order."""
    if limit is None:
        return np.arange(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rank[where] = np.arange(len(where))
    return np.flatnonzero(rank < limit)


def restrict(spec: DatasetSpec, options: RealDataOptions) -> DatasetSpec:
    """``spec`` reduced by ``options``' class subset, image cap and template count (``spec``
    itself when none is set). The reduced spec reads the same files and relabels them."""
    if not options.reduced:
        return spec
    chosen = resolve_classes(spec, options.classes) if options.classes is not None else None
    kept: dict[str, list[int]] = {}
    evalsets = dict(spec.evalsets)
    if chosen is not None:
        for split in spec.splits:
            kept[split], hooks = _eval_classes(spec.evalset(split), chosen)
            if not kept[split]:
                raise ConfigError(f"data.{spec.name}.classes: no chosen class is among the classes of {spec.name}/{split}; "
                                  "choose at least one of them")
            if split in spec.evalsets:
                evalsets[split] = hooks
    reader = spec.reader
    assert reader is not None, f"{spec.name} is not read from data_root"

    def read(split: str, read_options: RealDataOptions) -> Samples:
        found = reader(split, read_options)
        if chosen is not None:
            relabel = np.full(max(int(found.labels.max(initial=0)) + 1, max(kept[split]) + 1), -1, dtype=np.int64)
            relabel[kept[split]] = np.arange(len(kept[split]))
            labels = relabel[found.labels]
            keep = np.flatnonzero(labels >= 0)
            found = found.select(keep, labels[keep])
        keep = _cap(found.labels, options.max_images_per_class)
        return found.select(keep) if len(keep) < len(found) else found

    return dataclasses.replace(
        spec,
        classnames=tuple(spec.classnames[i] for i in chosen) if chosen is not None else spec.classnames,
        templates=spec.templates[:options.templates] if options.templates is not None else spec.templates,
        evalsets=evalsets, reader=read,
    )


def check_reductions(name: str, spec: DatasetSpec, data: dict) -> None:
    """The ``data.<name>`` reduction keys of a study config hold for ``spec`` (class names and
    indices exist, every split keeps a class); errors name the key."""
    if not spec.on_disk:
        return
    options = RealDataOptions.from_dict({"data_root": "-", **{k: v for k, v in data.items() if k in REDUCTION_KEYS}}, f"data.{name}.")
    if options.classes is not None:
        resolve_classes(spec, options.classes, f"data.{name}.classes")
    restrict(spec, options)


REDUCTION_KEYS = ("classes", "max_images_per_class", "templates")
"""The ``data.<dataset>`` keys that reduce a dataset (and that every stage reading it gets)."""
