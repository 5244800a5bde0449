"""The ``saeft`` command: one subcommand per pipeline stage.

Rules call these with paths and the stage's resolved config as JSON; every subcommand also works
by hand (``saeft <stage> --help``). ``--track`` names the MLflow run of the job (experiment, run
name, tags); without it nothing is tracked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("saeft")

GPU_COMMANDS = frozenset({"pretrain", "cache", "train-sae", "train-sae-sweep", "finetune", "evaluate"})
"""Stages that run on a GPU when there is one; each gets a GPU of its own (:mod:`saeft.gpu`)."""


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--track", type=_json_arg, default=None,
                        help="MLflow run as JSON: {experiment, run_name, tags}; omit to not track")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all allowed)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def _config(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--config", type=_json_arg, default={}, help=f"{what} config as a JSON object")


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="registered dataset name")
    parser.add_argument("--dataset-options", type=_json_arg, default={},
                        help="the dataset's options as JSON (the shapes world: config key 'synthetic'; "
                             "datasets on disk: {data_root, expected_images})")


def cmd_init_tracking(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.tracking import init_store

    return {"ok": init_store(args.experiment)}


def cmd_sync_tracking(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.tracking import replay_queue

    counts = replay_queue(args.queue)
    if counts["failed"]:
        raise ValueError(f"{counts['failed']} queued run(s) could not be replayed (kept; see the warnings above)")
    return counts


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import pretrain, quality
    from saeft.data.registry import get_dataset
    from saeft.io import write_json
    from saeft.models import load_clip

    cfg = pretrain.PretrainConfig.from_dict(args.config, "pretrain.")
    options = get_dataset(cfg.dataset).options(args.dataset_options)
    metrics = pretrain.run(args.arch, options, cfg, args.out)
    record = quality.measure(load_clip(args.out)[0], args.arch, cfg.dataset, options)
    write_json(args.quality, record)
    return {**metrics, "quality": record}


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import prepare

    if args.quality:
        from saeft import quality

        quality.check(args.quality, args.min_zeroshot_acc)
    return prepare.run_model(args.arch, args.pretrained, args.out)


def cmd_head(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import prepare

    return prepare.run_head(args.model, args.dataset, args.out)


def cmd_cache(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import cache
    from saeft.data.registry import get_dataset
    from saeft.views import ViewConfig

    options = get_dataset(args.dataset).options(args.dataset_options)
    cfg = cache.CacheConfig.from_dict(args.config, "cache.")
    views = ViewConfig.of(args.views) if args.views is not None else None
    if views is not None and not views.banked:
        raise ValueError("cache --views: needs a bank of views (finetune.augment != 'none', finetune.views >= 1)")
    return cache.run(args.model, args.dataset, args.split, options, cfg, args.out, {"pretrained": args.pretrained or ""}, views)


def cmd_train_sae(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import sae

    cfg = sae.SAETrainConfig.from_dict(args.config, "sae.")
    evals = _split_paths(args.eval, "--eval")
    return sae.run(args.train, args.heldout, args.out_weights, args.out_json, cfg, head=args.head, evals=evals)


def cmd_train_sae_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import sae

    cfgs = sae.sweep_configs(args.config)
    if not cfgs:
        raise ValueError("train-sae-sweep: the config lists no sae.sweep entries")
    return sae.run_sweep(args.train, args.heldout, args.out_dir, cfgs, head=args.head, evals=_split_paths(args.eval, "--eval"))


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import finetune
    from saeft.data.registry import get_dataset

    options = get_dataset(args.dataset).options(args.dataset_options)
    cfg = finetune.FinetuneConfig.from_dict(args.config, "finetune.")
    return finetune.run(args.model, args.head, args.dataset, options, cfg, args.out_model, args.out_json,
                        sae_path=args.sae, teacher_cache=args.teacher_cache, on_epoch=lambda record: _RUN.log_metrics(record, step=int(record["epoch"])))


def _wiseft(args: argparse.Namespace, stage: str) -> tuple[str, str, float] | None:
    """(zero-shot model, zero-shot head, alpha) of a WiSE-FT run, or None without --alpha."""
    if args.alpha is None:
        return None
    if not (args.zeroshot_model and args.zeroshot_head):
        raise SystemExit(f"{stage}: --alpha needs --zeroshot-model and --zeroshot-head")
    return args.zeroshot_model, args.zeroshot_head, args.alpha


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import evaluate
    from saeft.data.registry import get_dataset

    options = get_dataset(args.dataset).options(args.dataset_options)
    cfg = evaluate.EvaluateConfig.from_dict(args.config, "evaluate.")
    wiseft = _wiseft(args, "evaluate")
    heads = _split_paths(args.transfer, "--transfer")
    unknown = sorted(set(args.transfer_options) - set(heads))
    if unknown:
        raise ValueError(f"--transfer-options: {', '.join(unknown)} not among the --transfer sets")
    transfer = {name: (head, get_dataset(name).options(args.transfer_options.get(name, {}))) for name, head in heads.items()}
    results = evaluate.run(args.model, args.head, args.dataset, args.split, options, cfg, args.out, args.identity,
                           wiseft=wiseft, transfer=transfer)
    return _evaluation_metrics(results)


def _evaluation_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of an evaluation, per eval set: ``<set>.<metric>``, ``<set>.top1`` (also
    beside macro-F1 or worst-region accuracy) and ``<set>.n``."""
    out: dict[str, float] = {}
    for name, result in results.items():
        out[f"{name}.{result['metric']}"] = result["value"]
        out[f"{name}.top1"] = result.get("average_accuracy", result["value"])
        out[f"{name}.n"] = result["n"]
    return out


def cmd_check_data(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.data.registry import get_dataset
    from saeft.io import write_json

    spec = get_dataset(args.dataset)
    if not spec.on_disk:
        raise ValueError(f"check-data: dataset {args.dataset!r} is not read from data_root; nothing to check")
    found = spec.check(args.split, spec.options(args.dataset_options))
    write_json(args.out, found)
    logger.info("%s/%s: %d images in %s (%d of %d classes present)", args.dataset, args.split, found["images"],
                found["source"], found["classes_present"], found["classes"])
    return {"images": found["images"]}


def cmd_aggregate(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import aggregate

    cfg = aggregate.AggregateConfig.from_dict(args.config, "aggregate.")
    outputs = aggregate.run(args.evals, args.tables, args.figures, cfg, train_paths=args.train)
    for name, frame in outputs.tables.items():
        _RUN.log_table(frame, f"tables/{name}.json")
    for path in outputs.table_files:  # the files as written: LaTeX, Markdown, HTML, Parquet
        _RUN.log_artifact(path, "tables")
    for name, figure in outputs.figures.items():
        _RUN.log_figure(figure, f"figures/{name}.png")
    return outputs.headline


def _split_paths(items: Sequence[str], what: str) -> dict[str, str]:
    """``SPLIT=PATH`` arguments as a mapping, each split once."""
    out: dict[str, str] = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            raise ValueError(f"{what}: expected SPLIT=PATH, got {item!r}")
        if split in out:
            raise ValueError(f"{what}: split {split!r} given twice")
        out[split] = path
    return out


def cmd_analyze_features(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.analysis import features
    from saeft.data.registry import get_dataset

    options = get_dataset(args.dataset).options(args.dataset_options)
    cfg = features.AnalysisConfig.from_dict(args.config, "analysis.")
    wiseft = _wiseft(args, "analyze-features")
    caches = _split_paths(args.cache, "--cache")
    return features.run(args.model, args.dataset, options, caches, args.sae, cfg, args.out_json, args.out_images,
                        args.identity, head=args.head, wiseft=wiseft)


def cmd_feature_cards(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.analysis import cards
    from saeft.data.registry import get_dataset

    options = get_dataset(args.dataset).options(args.dataset_options)
    cfg = cards.CardsConfig.from_dict(args.config, "analysis.cards.")
    tables: dict[str, list[str]] = {}
    for method, path in _split_paths_multi(args.images):
        tables.setdefault(method, []).append(path)
    return cards.run(tables, args.sae, args.head, args.dataset, options, cfg, args.out_dir)


def _split_paths_multi(items: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        method, sep, path = item.partition("=")
        if not sep or not method or not path:
            raise ValueError(f"--images: expected METHOD=PATH, got {item!r}")
        pairs.append((method, path))
    return pairs


def cmd_aggregate_features(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import aggregate
    from saeft.analysis import tables

    cfg = aggregate.AggregateConfig.from_dict(args.config, "aggregate.")
    if args.top < 1:
        raise ValueError(f"analysis.top_features: must be at least 1, got {args.top}")
    headline = tables.run(args.analyses, args.images, args.evals, args.tables, args.figures, cfg, args.top)
    for name in tables.TABLE_FILES:
        _RUN.log_artifact(os.path.join(args.tables, name))
    for name in tables.FIGURE_FILES:
        _RUN.log_artifact(os.path.join(args.figures, name))
    return headline


def cmd_schema(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.config.study import SCHEMA_PATH, schema_text
    from saeft.io import atomic_path

    text = schema_text()
    if not args.write:
        sys.stdout.write(text)
        return {}
    with atomic_path(SCHEMA_PATH) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
    logger.info("wrote %s", SCHEMA_PATH)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    def add(name: str, fn: Callable[[argparse.Namespace], dict[str, Any]], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        _common(p)
        return p

    p = add("schema", cmd_schema, "print the study config's JSON schema, generated from the config dataclasses")
    p.add_argument("--write", action="store_true", help="write it to workflow/schemas/config.schema.yaml instead")

    p = add("sync-tracking", cmd_sync_tracking, "replay the tracking calls that jobs queued while MLflow was unreachable")
    p.add_argument("--queue", default=None, help="queue folder (default: $SAEFT_MLFLOW_QUEUE or ./mlflow-queue)")

    p = add("init-tracking", cmd_init_tracking, "create the MLflow store and experiment (once, before parallel jobs)")
    p.add_argument("--experiment", required=True, help="experiment name (the study)")

    p = add("pretrain", cmd_pretrain, "pretrain a small CLIP contrastively on a dataset's captioned corpus")
    p.add_argument("--arch", required=True, help="open_clip architecture name")
    p.add_argument("--dataset-options", "--world", dest="dataset_options", type=_json_arg, default={},
                   help="options of the dataset named by the config's 'dataset' (default shapes: config key 'synthetic') as JSON")
    _config(p, "pretraining")
    p.add_argument("--out", required=True, help="output weights (.safetensors)")
    p.add_argument("--quality", required=True,
                   help="output quality record (JSON): zero-shot top-1 per split, linear-probe top-1 on ID")

    p = add("prepare", cmd_prepare, "materialise the zero-shot CLIP as one local safetensors file")
    p.add_argument("--arch", required=True, help="open_clip architecture name")
    p.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint; omit for random weights")
    p.add_argument("--out", required=True, help="output weights (.safetensors)")
    p.add_argument("--quality", default=None, help="quality record of a pretrain_clip model: refuse it below --min-zeroshot-acc")
    p.add_argument("--min-zeroshot-acc", type=float, default=0.0,
                   help="pretrain.min_zeroshot_acc: least zero-shot top-1 on the ID held-out split")

    p = add("head", cmd_head, "build a dataset's zero-shot head from its prompt templates")
    p.add_argument("--model", required=True, help="zero-shot CLIP weights from 'saeft prepare'")
    p.add_argument("--dataset", required=True, help="registered dataset name")
    p.add_argument("--out", required=True, help="output head (.safetensors)")

    p = add("cache", cmd_cache, "cache the zero-shot image embeddings of a dataset split in HDF5")
    p.add_argument("--model", required=True, help="zero-shot CLIP weights from 'saeft prepare'")
    p.add_argument("--pretrained", default=None, help="provenance recorded in the cache's attributes")
    _dataset_args(p)
    p.add_argument("--split", required=True, help="dataset split to embed")
    _config(p, "cache")
    p.add_argument("--views", type=_json_arg, default=None,
                   help="the finetune view keys as JSON: cache every view of the bank (the teacher of augmented training)")
    p.add_argument("--out", required=True, help="output HDF5 file")

    p = add("train-sae", cmd_train_sae, "train a Top-K sparse autoencoder on cached embeddings")
    p.add_argument("--train", required=True, help="HDF5 cache of the training embeddings")
    p.add_argument("--heldout", required=True, help="HDF5 cache of held-out embeddings (metrics)")
    _config(p, "SAE")
    p.add_argument("--out-weights", required=True, help="output SAE weights (.safetensors)")
    p.add_argument("--out-json", required=True, help="output sae.json (config and metrics)")
    p.add_argument("--head", default=None,
                   help="the dataset's zero-shot head: adds the zero-shot accuracy of reconstructions")
    p.add_argument("--eval", nargs="*", default=[], metavar="SPLIT=PATH",
                   help="HDF5 caches of evaluation splits: FVU, L0 and dead latents per split in sae.json")

    p = add("train-sae-sweep", cmd_train_sae_sweep, "train the SAEs of sae.sweep, one folder each")
    p.add_argument("--train", required=True, help="HDF5 cache of the training embeddings")
    p.add_argument("--heldout", required=True, help="HDF5 cache of held-out embeddings (metrics)")
    _config(p, "SAE section (defaults plus a 'sweep' list of named overrides)")
    p.add_argument("--out-dir", required=True, help="folder of {name}/sae.safetensors and sae.json")
    p.add_argument("--head", default=None,
                   help="the dataset's zero-shot head: adds the zero-shot accuracy of reconstructions")
    p.add_argument("--eval", nargs="*", default=[], metavar="SPLIT=PATH",
                   help="HDF5 caches of evaluation splits: FVU, L0 and dead latents per split in sae.json")

    p = add("finetune", cmd_finetune, "fine-tune the zero-shot classifier with one method and seed")
    p.add_argument("--model", required=True, help="zero-shot CLIP weights")
    p.add_argument("--head", required=True, help="the dataset's zero-shot head")
    _dataset_args(p)
    p.add_argument("--sae", default=None, help="SAE weights (SAE methods only)")
    p.add_argument("--teacher-cache", default=None, help="HDF5 cache of the zero-shot training embeddings f_0")
    _config(p, "fine-tuning (finetune keys plus method and method_params)")
    p.add_argument("--out-model", required=True, help="output classifier weights (.safetensors)")
    p.add_argument("--out-json", required=True, help="output train.json")
    p.add_argument("--nproc", default="auto",
                   help="training processes (torch DDP through torchrun, one per GPU, the same global batch); "
                        "'auto': the GPUs of the SLURM job's allocation, else 1")

    p = add("evaluate", cmd_evaluate, "evaluate a model on every evaluation split of a dataset and its transfer sets")
    p.add_argument("--model", required=True, help="classifier weights, or zero-shot CLIP weights with --head")
    p.add_argument("--head", default=None, help="zero-shot head (evaluates the zero-shot model)")
    _dataset_args(p)
    p.add_argument("--split", nargs="*", default=[], help="evaluation splits of --dataset, scored in this order")
    p.add_argument("--transfer", nargs="*", default=[], metavar="DATASET=HEAD",
                   help="transfer sets: DATASET's ID eval split scored through its zero-shot head HEAD, "
                        "recorded under --dataset as eval set DATASET, role 'transfer'")
    p.add_argument("--transfer-options", type=_json_arg, default={},
                   help="the transfer sets' dataset options as JSON, {DATASET: options}")
    p.add_argument("--identity", type=_json_arg, default={}, help="JSON recorded in the result: study, model, method, seed")
    p.add_argument("--alpha", type=float, default=None, help="WiSE-FT: evaluate (1-alpha)*zero-shot + alpha*--model")
    p.add_argument("--zeroshot-model", default=None, help="WiSE-FT: zero-shot CLIP weights")
    p.add_argument("--zeroshot-head", default=None, help="WiSE-FT: the dataset's zero-shot head")
    _config(p, "evaluation")
    p.add_argument("--out", required=True, help="output JSON: the run's identity and 'evals', a result record per eval set")

    p = add("check-data", cmd_check_data, "verify a dataset split's layout and image count under data_root")
    _dataset_args(p)
    p.add_argument("--split", required=True, help="split to check")
    p.add_argument("--out", required=True, help="output marker JSON (what was found)")

    p = add("aggregate", cmd_aggregate, "build the tables and figures from evaluation results")
    p.add_argument("--evals", nargs="+", required=True, help="evaluation result JSON files (WiSE-FT curve points included)")
    p.add_argument("--train", nargs="*", default=[], help="train.json of the fine-tuning jobs (training-curve figures)")
    p.add_argument("--tables", required=True, help="output folder of tables")
    p.add_argument("--figures", required=True, help="output folder of figures")
    _config(p, "aggregation")

    p = add("analyze-features", cmd_analyze_features,
            "SAE features a fine-tuned model added and removed, and its drift, on every eval set")
    p.add_argument("--model", required=True, help="classifier weights, or zero-shot CLIP weights with --head")
    p.add_argument("--head", default=None, help="zero-shot head (analyses the zero-shot model itself)")
    _dataset_args(p)
    p.add_argument("--cache", nargs="+", required=True, metavar="SPLIT=PATH",
                   help="HDF5 cache of the zero-shot embeddings of each eval split to analyse")
    p.add_argument("--sae", required=True, help="the zero-shot SAE (its recorded normalisation is applied)")
    p.add_argument("--identity", type=_json_arg, default={}, help="JSON recorded in the result: study, model, method, seed")
    p.add_argument("--alpha", type=float, default=None, help="WiSE-FT: analyse (1-alpha)*zero-shot + alpha*--model")
    p.add_argument("--zeroshot-model", default=None, help="WiSE-FT: zero-shot CLIP weights")
    p.add_argument("--zeroshot-head", default=None, help="WiSE-FT: the dataset's zero-shot head")
    _config(p, "analysis (batch_size, top_features)")
    p.add_argument("--out-json", required=True, help="output features.json (per eval set summaries)")
    p.add_argument("--out-images", required=True, help="output per-image Parquet table")

    p = add("feature-cards", cmd_feature_cards, "cards of the SAE features each method most often added and removed")
    p.add_argument("--images", nargs="+", required=True, metavar="METHOD=PATH",
                   help="per-image tables of analyze-features, one per method and seed")
    p.add_argument("--sae", required=True, help="the zero-shot SAE")
    p.add_argument("--head", required=True, help="the dataset's zero-shot head (class prompt embeddings)")
    _dataset_args(p)
    _config(p, "cards (analysis.cards: features, images, thumbnail)")
    p.add_argument("--out-dir", required=True, help="output folder: {method}.png, {method}.json, cards.md")

    p = add("aggregate-features", cmd_aggregate_features, "tables and figures of the feature analyses, joined with the evaluations")
    p.add_argument("--analyses", nargs="+", required=True, help="features.json files of analyze-features")
    p.add_argument("--images", nargs="+", required=True, help="their per-image tables, in the same order")
    p.add_argument("--evals", nargs="+", required=True, help="evaluation result JSON files")
    p.add_argument("--top", type=int, default=10, help="features listed per method, role and direction")
    p.add_argument("--tables", required=True, help="output folder of tables")
    p.add_argument("--figures", required=True, help="output folder of figures")
    _config(p, "aggregation (display)")
    return parser


class _NoRun:
    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_figure(self, *args: Any, **kwargs: Any) -> None:
        pass


_RUN: Any = _NoRun()


def _nproc(args: argparse.Namespace) -> int:
    """Training processes of a finetune job: the explicit --nproc, or the SLURM allocation's GPUs."""
    from saeft.gpu import allocated_gpu_count

    if args.nproc == "auto":
        return max(1, allocated_gpu_count())
    try:
        nproc = int(args.nproc)
    except ValueError:
        nproc = 0
    if nproc < 1:
        raise SystemExit(f"finetune: --nproc must be 'auto' or an integer >= 1, got {args.nproc!r}")
    return nproc


def _launch_torchrun(argv: Sequence[str], nproc: int, threads: int | None) -> int:
    """Run this same command as ``nproc`` DDP workers under torchrun on this node; each worker
    sees ``LOCAL_RANK`` and trains instead of launching."""
    import subprocess

    env = dict(os.environ)
    total = threads or len(os.sched_getaffinity(0))
    env["SAEFT_THREADS"] = str(max(1, total // nproc))  # the job's CPUs, shared by its workers
    # Workers need no --nproc (LOCAL_RANK tells them they are workers), and torchrun's own parser
    # would take it for an abbreviation of its --nproc-per-node.
    worker_argv, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            worker_argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "saeft.cli", *worker_argv]
    logger.info("launching %d DDP workers: %s", nproc, " ".join(command[:6]))
    return subprocess.run(command, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saeft`` command; returns the exit status."""
    global _RUN
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # open_clip warns on the root logger about every model it creates without weights, also
    # where saeft loads the weights right after: keep job logs about the job.
    logging.getLogger().addFilter(lambda record: "No pretrained weights loaded" not in record.getMessage())
    if args.threads:
        os.environ["SAEFT_THREADS"] = str(args.threads)
    if os.environ.get("SLURM_JOB_ID"):
        logger.info("SLURM job %s on %s, CUDA_VISIBLE_DEVICES=%s", os.environ["SLURM_JOB_ID"],
                    os.environ.get("SLURMD_NODENAME", "?"), os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if args.command in GPU_COMMANDS:
        from saeft.gpu import assign_gpus

        nproc = _nproc(args) if args.command == "finetune" else 1
        assign_gpus(nproc)  # before torch initialises CUDA
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _launch_torchrun(argv, nproc, args.threads)
    if int(os.environ.get("RANK", "0")) != 0:
        args.track = None  # one MLflow run and one log per job: rank 0's
        logging.getLogger().setLevel(logging.WARNING)
    from saeft.config import ConfigError
    from saeft.tracking import job_run

    params = {k: v for k, v in vars(args).items() if k not in {"fn", "track", "log_level", "threads"}}
    started = time.monotonic()
    try:
        with job_run(args.track, params) as run:
            _RUN = run
            metrics = args.fn(args) or {}
            run.log_metrics({**metrics, "seconds": time.monotonic() - started})
    except (ConfigError, ValueError, OSError) as exc:  # bad input, missing file, disk full, read-only
        logger.error("%s", exc)
        return 2
    finally:
        _RUN = _NoRun()
    logger.info("done in %.1fs", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
