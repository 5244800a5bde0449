"""The paired bootstrap at iWildCam-test size: time and memory of 1000 resamples of one run.

The intervals of every table come from :mod:`saeft.report.uncertainty`: one matrix of resample indices
per eval set, shared by every run on it (the bootstrap is paired), and the metric on each row.
iWildCam's test split is the largest eval set of the paper studies (42,791 images, 182 classes,
macro-F1). This bench makes predictions of that size (a model right 70% of the time, wrong
labels drawn at random), then times the index matrix and the macro-F1 and top-1 replicates, and
prints the index matrix's size and the process's peak resident memory::

    PYTHONPATH=. python bench/bootstrap.py --images 42791 --classes 182 --resamples 1000

Goal (issue "Catalog-grade workflow"): 1000 resamples of one run and eval set under 5 s.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from saeft.report.uncertainty import bootstrap_indices, replicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=42791)
    parser.add_argument("--classes", type=int, default=182)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    target = rng.integers(0, args.classes, args.images)
    predicted = np.where(rng.random(args.images) < 0.7, target, rng.integers(0, args.classes, args.images))
    runs = [(0, predicted, target, None)]
    times: dict[str, list[float]] = {"indices": [], "macro_f1": [], "top1": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        indices = bootstrap_indices(args.images, args.resamples, seed=0)
        times["indices"].append(time.perf_counter() - start)
        for metric in ("macro_f1", "top1"):
            start = time.perf_counter()
            replicates(metric, runs, indices)
            times[metric].append(time.perf_counter() - start)
    print(f"{args.resamples} resamples of {args.images} images, {args.classes} classes; median of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:<9} {np.median(values):6.2f} s")
    print(f"  index matrix {indices.nbytes / 2**20:.0f} MiB ({indices.dtype}); peak resident memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
