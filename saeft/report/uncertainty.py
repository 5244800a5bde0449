"""95% intervals for evaluation results: image bootstrap within a seed plus the spread over seeds.

A table cell is the mean over seeds of an eval set's metric. Two sources of noise move it: the
finite eval set (which images happened to be drawn) and training randomness (which seed). Both are
covered here:

* Evaluation noise. Every seed and every method is evaluated on the same images, so the images are
  resampled once per eval set (:func:`bootstrap_indices`) and the same resample is applied to every
  seed and every method: the bootstrap is paired. :func:`replicates` gives the statistic per seed on
  the full set and on each resample; the bootstrap variance of the seed mean is the variance over
  resamples of the per-resample mean over seeds. Pairing makes a difference "method A minus method
  B" (:func:`difference`) or an OOD average (:func:`average`) carry the right correlations for free:
  combine the replicates resample by resample, then take the interval.
* Training noise. The between-seed variance of the mean, s^2 / S (s: the sample standard deviation
  of the per-seed point values), is added to the bootstrap variance (:func:`interval`), and the
  interval is mean -/+ z * se (normal approximation). This is slightly conservative: the spread
  over seeds already contains some evaluation noise, which is then counted twice.

With a single seed (e.g. the zero-shot model) the seed term is 0: the interval covers only the
evaluation noise, not training randomness.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence

import numpy as np

Run = tuple[int | None, np.ndarray, np.ndarray, np.ndarray | None]  # (seed, predicted, target, groups)


@dataclasses.dataclass(frozen=True)
class Replicates:
    """A statistic per seed, on the whole eval set and on each bootstrap resample of its images."""

    seeds: tuple[int | None, ...]  # length S (None: the zero-shot model, one 'seed')
    point: np.ndarray  # [S]: the statistic per seed on the full eval set
    boot: np.ndarray  # [B, S]: the statistic per seed on each of B resamples

    def __post_init__(self) -> None:
        n = len(self.seeds)
        if len(set(self.seeds)) != n:
            raise ValueError(f"repeated seeds: {self.seeds}")
        if self.point.shape != (n,) or self.boot.ndim != 2 or self.boot.shape[1] != n:
            raise ValueError(f"{n} seeds need point [{n}] and boot [B, {n}], got {self.point.shape} and {self.boot.shape}")


_BLOCK = 1 << 22
"""Indices drawn at a time by :func:`bootstrap_indices` (32 MiB of int64)."""


def bootstrap_indices(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_images] resample indices (with replacement) from np.random.default_rng(seed).

    The draw is np.random.default_rng(seed).integers(0, n_images, size=(n_boot, n_images)),
    taken a block of rows at a time (the generator's stream is the same) into int32 where the
    images fit: half the memory, and the whole int64 draw never exists (1000 resamples of
    iWildCam's test split: 163 MiB instead of 326)."""
    if n_images < 1 or n_boot < 1:
        raise ValueError(f"need at least one image and one resample, got n_images={n_images}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    indices = np.empty((n_boot, n_images), dtype=np.int32 if n_images <= np.iinfo(np.int32).max else np.int64)
    rows = max(1, _BLOCK // n_images)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        indices[start:stop] = rng.integers(0, n_images, size=(stop - start, n_images))
    return indices


def _top1(predicted: np.ndarray, target: np.ndarray, groups: np.ndarray | None, indices: np.ndarray) -> np.ndarray:
    """Accuracy on each row of ``indices`` (vectorised)."""
    correct = predicted == target
    return correct[indices].mean(axis=-1)


def _macro_f1(predicted: np.ndarray, target: np.ndarray, groups: np.ndarray | None, indices: np.ndarray) -> np.ndarray:
    """Macro-F1 (saeft.nn.metrics.macro_f1) on each row of ``indices`` (vectorised)."""
    from saeft.nn.metrics import macro_f1_rows

    return macro_f1_rows(predicted, target, indices)


def _worst_region_acc(predicted: np.ndarray, target: np.ndarray, groups: np.ndarray | None, indices: np.ndarray) -> np.ndarray:
    """Worst accuracy over the group names present in each resample, 'Other' left out (as the evaluator)."""
    from saeft.nn.metrics import group_accuracies, worst_group_accuracy

    if groups is None:
        raise ValueError("worst_region_acc needs the group name of every image (groups is None)")
    names, codes = np.unique(np.asarray(groups), return_inverse=True)
    names = [str(name) for name in names]
    return np.array([
        worst_group_accuracy(group_accuracies(predicted[rows], target[rows], codes[rows], names), exclude=("Other",))
        for rows in indices
    ])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray], np.ndarray]] = {
    "top1": _top1,
    "macro_f1": _macro_f1,
    "worst_region_acc": _worst_region_acc,
}


def replicates(metric: str, runs: Sequence[Run], indices: np.ndarray) -> Replicates:
    """The metric per seed on the full eval set and on each resample ``indices`` [B, n_images].

    ``runs``: (seed, predicted, target, groups) per seed, all on the same eval set (same images in
    the same order), so one ``indices`` resamples every seed alike (paired across seeds and methods).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if not runs:
        raise ValueError("no runs to compute replicates from")
    compute = METRICS[metric]
    indices = np.asarray(indices)
    points, boots = [], []
    for seed, predicted, target, groups in runs:
        predicted, target = np.asarray(predicted), np.asarray(target)
        if len(predicted) != len(target) or (groups is not None and len(groups) != len(target)):
            raise ValueError(f"seed {seed}: predicted, target and groups differ in length")
        if indices.ndim != 2 or indices.shape[1] != len(target):
            raise ValueError(f"seed {seed}: indices {indices.shape} do not resample {len(target)} images")
        points.append(compute(predicted, target, groups, np.arange(len(target))[None])[0])
        boots.append(compute(predicted, target, groups, indices))
    seeds = tuple(run[0] for run in runs)
    return Replicates(seeds, np.array(points, dtype=float), np.stack(boots, axis=1).astype(float))


def average(parts: Sequence[Replicates]) -> Replicates:
    """Element-wise mean of several statistics over the same seeds (e.g. the OOD average over shifts,
    each shift bootstrapped with its own indices, all with the same number of resamples)."""
    if not parts:
        raise ValueError("nothing to average")
    seeds = parts[0].seeds
    for part in parts[1:]:
        if part.seeds != seeds:
            raise ValueError(f"cannot average statistics over different seeds: {seeds} and {part.seeds}")
        if part.boot.shape != parts[0].boot.shape:
            raise ValueError(f"cannot average {parts[0].boot.shape[0]} and {part.boot.shape[0]} resamples")
    point = np.mean([part.point for part in parts], axis=0)
    boot = np.mean([part.boot for part in parts], axis=0)
    return Replicates(seeds, point, boot)


def difference(a: Replicates, b: Replicates) -> Replicates:
    """a - b, paired by seed on the seeds both have (in a's order). Both must come from the same
    indices (the same eval set): that pairing is the caller's job."""
    common = [seed for seed in a.seeds if seed in b.seeds]
    if not common:
        raise ValueError(f"no seed in common to pair: {a.seeds} and {b.seeds}")
    if a.boot.shape[0] != b.boot.shape[0]:
        raise ValueError(f"cannot pair {a.boot.shape[0]} and {b.boot.shape[0]} resamples")
    ia = [a.seeds.index(seed) for seed in common]
    ib = [b.seeds.index(seed) for seed in common]
    return Replicates(tuple(common), a.point[ia] - b.point[ib], a.boot[:, ia] - b.boot[:, ib])


@dataclasses.dataclass(frozen=True)
class Interval:
    """The seed mean of a statistic with its interval and standard errors."""

    mean: float
    low: float
    high: float
    boot_se: float  # standard error from the image bootstrap of the seed mean
    seed_se: float  # standard error of the seed mean from the spread over seeds (0 for one seed)
    se: float  # sqrt(boot_se**2 + seed_se**2)
    n_seeds: int
    n_boot: int


def interval(r: Replicates, level: float = 0.95) -> Interval:
    """mean -/+ z * se, se combining the bootstrap se of the seed mean and the seed spread (s / sqrt(S))."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_boot, n_seeds = r.boot.shape
    if n_boot < 2:
        raise ValueError(f"need at least 2 resamples for a bootstrap standard error, got {n_boot}")
    mean = float(r.point.mean())
    boot_se = float(np.std(r.boot.mean(axis=1), ddof=1))
    seed_se = float(np.std(r.point, ddof=1) / np.sqrt(n_seeds)) if n_seeds > 1 else 0.0
    se = float(np.sqrt(boot_se**2 + seed_se**2))
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    return Interval(mean, mean - z * se, mean + z * se, boot_se, seed_se, se, n_seeds, n_boot)
