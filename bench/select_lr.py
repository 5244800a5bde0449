"""Choose the fine-tuning learning rate on ID validation, as the study's protocol demands.

Fine-tunes ``ft`` at each learning rate of a grid (every other key from the study config's
``finetune`` section) on the study's own zero-shot model, and prints the ID validation top-1
(the dataset's held-out split, never a shift or the test split) per learning rate and seed, and
the best one. Run it after the study has prepared its model (``snakemake --cores all --until
build_zeroshot_head``)::

    PYTHONPATH=. python bench/select_lr.py --config config/config.yaml --lrs 1e-4 3e-4 1e-3 3e-3

The default study's ``finetune.lr`` is the value this printed (docs/default_study.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="the study config (its finetune keys and dataset options)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per learning rate")
    parser.add_argument("--dataset", default=None, help="dataset (default: the config's first)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from saeft.config.study import validate_config
    from saeft.data.registry import get_dataset
    from saeft.stages import finetune

    config = validate_config(yaml.safe_load(Path(args.config).read_text()))
    dataset = args.dataset or config["datasets"][0]
    spec = get_dataset(dataset)
    options = spec.options(config["synthetic"] if dataset == "shapes" else config.get(dataset, {}))
    base = Path("results") / config["study"] / "models" / config["model"]["name"] / "zeroshot"
    model, head = base / "model.safetensors", base / "heads" / f"{dataset}.safetensors"
    if not head.is_file():
        raise SystemExit(f"{head}: missing; run `snakemake --cores all --until build_zeroshot_head` first")
    keys = {k: v for k, v in config["finetune"].items() if k != "lr"}
    print(f"ft on {dataset}: ID validation ({spec.heldout_split}) top-1 after {keys['epochs']} epochs")
    print(f"{'lr':>10} " + " ".join(f"seed{s:>3}" for s in args.seeds) + "      mean")
    means = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs:
            values = []
            for seed in args.seeds:
                cfg = finetune.FinetuneConfig(**{**keys, "method": "ft", "lr": lr, "seed": seed})
                out = Path(tmp) / f"{lr}-{seed}"
                out.mkdir()
                final = finetune.run(model, head, dataset, options, cfg, out / "model.safetensors", out / "train.json")
                values.append(final["heldout_top1"])
            means[lr] = float(np.mean(values))
            print(f"{lr:>10g} " + " ".join(f"{100 * v:7.1f}" for v in values) + f"  {100 * means[lr]:8.1f}", flush=True)
    best = max(means, key=means.get)
    print(f"best on ID validation: finetune.lr = {best:g} ({100 * means[best]:.1f})")


if __name__ == "__main__":
    main()
