"""Probe a world's calibration quickly, in one process: the established baselines only.

Calibrating a world (issue "Calibrated worlds", ``saeft.report.calibration``) needs many candidate
worlds and fine-tuning regimes; a whole study per candidate is too slow. This probe takes a
pretrained zero-shot model (a study's ``models/<model>/zeroshot/``) and, for each ID shortcut
strength and fine-tuning lr given, fine-tunes ``ft`` on the given seeds and prints, per model, ID
validation, ID test, every shift and the OOD average: zero-shot, a linear probe, FT, the WiSE-FT
curve, the output-space ensemble at 0.5, the uniform soup of the FT seeds; then the P2, P3, P5
and P6 numbers of :mod:`saeft.report.calibration` (points, no intervals: the study measures those).
It never reads SAE-FT. The pretraining corpus has no shortcut, so one pretrained model serves
every ``--spurious``::

    PYTHONPATH=. python bench/probe_world.py --model results/default/models/saeft-vit-p4/zeroshot \\
        --spurious 0.9 0.3 --lrs 1e-2 3e-4 --seeds 0 1

The Fashion-MNIST world the same way (``--config`` merges over the default study, as the workflow
merges ``--configfile``)::

    PYTHONPATH=. python bench/probe_world.py --dataset fashion_mnist --config config/fashion_mnist.yaml \\
        --model results/fashion_mnist/models/saeft-vit-p4/zeroshot --lrs 1e-4 --seeds 0
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml",
                        help="study config (its finetune keys and world), merged over the default study's")
    parser.add_argument("--model", required=True, help="folder with model.safetensors and heads/<dataset>.safetensors")
    parser.add_argument("--dataset", default="shapes", help="the world: shapes (config key synthetic) or fashion_mnist")
    parser.add_argument("--spurious", type=float, nargs="+", default=[None], help="ID shortcut strengths")
    parser.add_argument("--lrs", type=float, nargs="+", default=[None], help="fine-tuning peak lrs")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--world", nargs="*", default=[], metavar="KEY=VALUE",
                        help="other world (synthetic) keys, e.g. object_scale=1.2 train_per_class=200")
    parser.add_argument("--head-scale", type=float, default=1.0,
                        help="multiply the zero-shot head (its logit scale) by this before anything uses it")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from saeft.config.study import validate_config
    from saeft.data.registry import get_dataset
    from saeft.nn.models import classifier_from_zeroshot, load_classifier, preprocess_for
    from saeft.nn.probe import fit_linear_head
    from saeft.nn.quality import embed_split, linear_probe_accuracy
    from saeft.nn.weights import interpolate_weights
    from saeft.stages import finetune

    config = yaml.safe_load(Path(args.config).read_text())
    default = Path(__file__).resolve().parent.parent / "config" / "config.yaml"
    if Path(args.config).resolve() != default:  # a study file merges over the default study, as in the workflow
        from snakemake.utils import update_config

        merged = yaml.safe_load(default.read_text())
        update_config(merged, {k: v for k, v in config.items() if k != "methods"})
        merged["methods"] = config.get("methods", merged["methods"])
        config = merged
    config = validate_config(config)
    folder = Path(args.model)
    model_path, head_path = folder / "model.safetensors", folder / "heads" / f"{args.dataset}.safetensors"
    spec = get_dataset(args.dataset)
    section = "synthetic" if args.dataset == "shapes" else args.dataset
    if args.head_scale != 1.0:
        from safetensors.torch import load_file, save_file

        scaled = Path(tempfile.mkdtemp()) / "head.safetensors"
        save_file({"weight": load_file(head_path)["weight"] * args.head_scale}, scaled)
        head_path = scaled
    zeroshot, _ = classifier_from_zeroshot(model_path, head_path)
    preprocess = preprocess_for(zeroshot.visual)
    splits = ("val", "test", *spec.ood_evals)

    @torch.no_grad()
    def logits_of(model, data) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        return model(data[0])[0], data[1]

    def scores(logits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        out = {s: 100 * float((lg.argmax(-1) == y).float().mean()) for s, (lg, y) in logits.items()}
        out["val_loss"] = float(torch.nn.functional.cross_entropy(*logits["val"]))
        # Confidence (mean top softmax probability) on ID test and the shifts: a mixture is pulled
        # towards its more confident endpoint.
        out["conf_id"] = 100 * float(logits["test"][0].softmax(-1).max(-1).values.mean())
        out["conf_ood"] = 100 * float(np.mean([float(logits[s][0].softmax(-1).max(-1).values.mean()) for s in spec.ood_evals]))
        out["ood"] = float(np.mean([out[s] for s in spec.ood_evals]))
        return out

    def row(name: str, s: dict[str, float]) -> None:
        print(f"  {name:<18}" + " ".join(f"{s[k]:6.1f}" for k in ("val", "test", *spec.ood_evals, "ood")) + f" {s['val_loss']:6.3f}"
              + f" {s['conf_id']:6.1f} {s['conf_ood']:6.1f}", flush=True)

    def complementarity(a: dict, b: dict) -> str:
        """Share of images only ``a`` gets right and only ``b`` gets right, ID test and OOD mean:
        an ensemble of the two can only gain where each is right where the other is wrong."""
        def only(x, y, s):
            right_x = x[s][0].argmax(-1) == x[s][1]
            right_y = y[s][0].argmax(-1) == y[s][1]
            return 100 * float((right_x & ~right_y).float().mean())
        ood = lambda x, y: float(np.mean([only(x, y, s) for s in spec.ood_evals]))
        return f"ID {only(a, b, 'test'):.1f} / {only(b, a, 'test'):.1f}, OOD {ood(a, b):.1f} / {ood(b, a):.1f}"

    for spurious in args.spurious:
        world = {**config.get(section, {}), **({"spurious": spurious} if spurious is not None else {})}
        if args.test_per_class:
            world["test_per_class"] = args.test_per_class
        world.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.world)})
        options = spec.options(world)
        started = time.monotonic()
        data = {}
        for split in ("train", *splits):
            loaded = spec.load(split, preprocess, options)
            images, labels = zip(*(loaded[i] for i in range(len(loaded))))
            data[split] = (torch.stack(images), torch.tensor(labels))
        print(f"world spurious={world.get('spurious')} (rendered in {time.monotonic() - started:.0f} s)")
        print(f"  {'model':<18}" + " ".join(f"{k[:6]:>6}" for k in ("val", "test", *spec.ood_evals, "ood")) + " vloss  cf_id cf_ood")
        zs_logits = {s: logits_of(zeroshot, data[s]) for s in splits}
        zs = scores(zs_logits)
        row("zeroshot", zs)
        # The worst class of each split: a model with blind classes is not a CLIP-like zero-shot.
        worst = {}
        for s in ("test", *spec.ood_evals):
            lg, y = zs_logits[s]
            right = (lg.argmax(-1) == y).float()
            worst[s] = min(100 * float(right[y == c].mean()) for c in y.unique())
        print("  zero-shot worst class: " + ", ".join(f"{s} {v:.0f}" for s, v in worst.items()))
        train_emb = embed_split(zeroshot.visual, torch.utils.data.TensorDataset(*data["train"]))
        lp = {s: 100 * linear_probe_accuracy(train_emb, embed_split(zeroshot.visual, torch.utils.data.TensorDataset(*data[s])), len(spec.classnames)) for s in ("val", "test")}
        print(f"  linear probe val {lp['val']:.1f} test {lp['test']:.1f}")
        # Head-only WiSE-FT: the zero-shot features fixed, the head moved from the zero-shot head
        # to a converged probe's. How much OOD an ID-trained head loses on the zero-shot features
        # says how domain-specific the features' class directions are (CLIP's ImageNet probe
        # loses little: Radford et al. 2021, figure 14).
        with torch.enable_grad():
            probe_head = fit_linear_head(train_emb[0].detach(), train_emb[1], zeroshot.head.weight.detach().clone(), 1e-4, 500).weight
        with torch.no_grad():
            features = {s: embed_split(zeroshot.visual, torch.utils.data.TensorDataset(*data[s])) for s in ("test", *spec.ood_evals)}
        for alpha in (0.25, 0.5, 1.0):
            head = (1 - alpha) * zeroshot.head.weight.detach() + alpha * probe_head
            acc = {s: 100 * float(((f @ head.T).argmax(-1) == y).float().mean()) for s, (f, y) in features.items()}
            print(f"  zero-shot features, head {alpha:g} of the way to the probe's: ID {acc['test']:.1f} OOD "
                  f"{np.mean([acc[s] for s in spec.ood_evals]):.1f} (" + " ".join(f"{acc[s]:.1f}" for s in spec.ood_evals) + ")")
        for lr in args.lrs:
            keys = {k: v for k, v in config["finetune"].items()}
            if lr is not None:
                keys["lr"] = lr
            if args.epochs:
                keys["epochs"] = args.epochs
            print(f" lr {keys['lr']:g} ({keys['lr'] / config['pretrain']['lr']:.3f} x pretraining), {keys['epochs']} epochs")
            tuned_states, per_seed = [], {}
            with tempfile.TemporaryDirectory() as tmp:
                for seed in args.seeds:
                    cfg = finetune.FinetuneConfig(**{**keys, "method": "ft", "seed": seed})
                    out = Path(tmp) / f"{seed}"
                    out.mkdir()
                    t0 = time.monotonic()
                    finetune.run(model_path, head_path, args.dataset, options, cfg, out / "model.safetensors", out / "train.json")
                    tuned, _ = load_classifier(out / "model.safetensors")
                    tuned_states.append({k: v.clone() for k, v in tuned.state_dict().items()})
                    ft_logits = {s: logits_of(tuned, data[s]) for s in splits}
                    rows = {"ft": scores(ft_logits)}
                    for alpha in args.alphas:
                        mixed, _ = load_classifier(out / "model.safetensors")
                        mixed.load_state_dict(interpolate_weights(zeroshot.state_dict(), tuned.state_dict(), alpha))
                        rows[f"wise{alpha:g}"] = scores({s: logits_of(mixed, data[s]) for s in splits})
                    ens = {s: (0.5 * zs_logits[s][0].softmax(-1) + 0.5 * ft_logits[s][0].softmax(-1), data[s][1]) for s in splits}
                    rows["ens0.5"] = scores({s: (p.log(), y) for s, (p, y) in ens.items()})
                    print(f"  seed {seed}: right only by zero-shot / only by FT: {complementarity(zs_logits, ft_logits)}")
                    per_seed[seed] = rows
                    print(f"  seed {seed}: {time.monotonic() - t0:.0f} s", flush=True)
                if len(tuned_states) > 1:
                    soup, _ = load_classifier(Path(tmp) / f"{args.seeds[0]}" / "model.safetensors")
                    soup.load_state_dict({k: sum(st[k] for st in tuned_states) / len(tuned_states) for k in tuned_states[0]})
                    soup_scores = scores({s: logits_of(soup, data[s]) for s in splits})
                else:
                    soup_scores = None
            names = list(per_seed[args.seeds[0]])
            mean = {n: {k: float(np.mean([per_seed[s][n][k] for s in args.seeds])) for k in per_seed[args.seeds[0]][n]} for n in names}
            for n in names:
                row(n, mean[n])
            if soup_scores:
                row("soup", soup_scores)
            ft, w5, w25 = mean["ft"], mean["wise0.5"], mean.get("wise0.25")
            chance = 100.0 / len(spec.classnames)
            keep = min((ft[s] - chance) / max(zs[s] - chance, 1e-9) for s in spec.ood_evals)
            print(f"  P2 zs/ft ID {zs['test'] / ft['test']:.2f} (>=0.8); LP-ZS {lp['test'] - zs['test']:+.1f} (<=15)")
            print(f"  P3 dID {ft['test'] - zs['test']:+.1f} (>=8) dOOD {ft['ood'] - zs['ood']:+.1f} (<0) min keep {keep:.2f} (>=0.5)")
            print(f"  P5 wise0.5 OOD - max(zs,ft) {w5['ood'] - max(zs['ood'], ft['ood']):+.1f} (>=2); "
                  + (f"wise0.25 - zs {w25['ood'] - zs['ood']:+.1f} (>=0); " if w25 else "")
                  + f"wise0.5 ID - ft {w5['test'] - ft['test']:+.1f} (>=-2)")
            path = [mean[f"wise{a:g}"]["val_loss"] for a in args.alphas]
            barrier = max(p - ((1 - a) * zs["val_loss"] + a * ft["val_loss"]) for p, a in zip(path, args.alphas))
            print(f"  P6 barrier {barrier:+.3f} (<=0); ens-wise OOD {mean['ens0.5']['ood'] - w5['ood']:+.1f} ID "
                  f"{mean['ens0.5']['test'] - w5['test']:+.1f} (|.|<=2)"
                  + (f"; soup ID - mean {soup_scores['test'] - ft['test']:+.1f} (>=0)" if soup_scores else ""), flush=True)


if __name__ == "__main__":
    main()
