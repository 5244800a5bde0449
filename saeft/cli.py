"""The ``saeft`` command: one subcommand per pipeline stage.

Rules call these with paths and the stage's resolved config as JSON; every subcommand also works
by hand (``saeft <stage> --help`` ends with a worked example). ``--track`` names the MLflow run of
a workflow job (experiment, run name, tags); without it nothing is tracked.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import re
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

from saeft import __version__, commands
from saeft.infra import environment

logger = logging.getLogger("saeft")

STAGE_IMPORTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("saeft.stages.pretrain", "saeft.nn.quality", "saeft.nn.models", "open_clip"),
    "prepare": ("saeft.stages.prepare", "saeft.nn.models", "open_clip"),
    "head": ("saeft.stages.prepare", "saeft.nn.models", "open_clip"),
    "cache": ("saeft.stages.cache", "saeft.nn.models", "open_clip"),
    "train-sae": ("saeft.sae",),
    "train-sae-sweep": ("saeft.sae",),
    "finetune": ("saeft.stages.finetune", "saeft.nn.models", "open_clip"),
    "evaluate": ("saeft.stages.evaluate", "saeft.nn.models", "open_clip"),
    "calibrate": ("saeft.stages.calibrate", "saeft.nn.models", "open_clip"),
    "analyze-features": ("saeft.analysis.features", "saeft.nn.models", "open_clip"),
    "feature-cards": ("saeft.analysis.cards",),
    "aggregate": ("saeft.stages.aggregate",),
    "aggregate-features": ("saeft.stages.aggregate", "saeft.analysis.tables"),
    "select-variants": ("saeft.stages.selection",),
    "export": ("saeft.stages.export",),
}
"""The modules each stage runs on, imported (and timed) before its work: the job log's ``done
in`` line splits start-up, imports, tracking and work (bench/job_overhead.py reads it), and the
warm worker imports them all once."""

GPU_COMMANDS = frozenset({"pretrain", "cache", "train-sae", "train-sae-sweep", "finetune", "evaluate", "analyze-features", "calibrate"})
"""Stages that run on a GPU when there is one; each gets a GPU of its own (:mod:`saeft.infra.gpu`)."""

TRACKED = frozenset({"pretrain", "prepare", "head", "cache", "train-sae", "train-sae-sweep", "finetune", "evaluate", "check-data",
                     "select-variants", "aggregate", "calibrate", "analyze-features", "feature-cards", "aggregate-features"})
"""The workflow's jobs: each logs to the MLflow run its --track names (every rule passes one). The
other commands (schema, the tracking tools, the worker, export) have no run of their own."""

THREADED = frozenset({"pretrain", "head", "cache", "train-sae", "train-sae-sweep", "finetune", "evaluate", "calibrate",
                      "analyze-features", "feature-cards"})
"""Stages whose torch work runs on --threads CPU threads (:func:`apply_threads`; finetune shares
them among its DDP workers). The other commands do no torch work worth threads."""


def apply_threads(threads: int) -> None:
    """A THREADED stage's --threads: torch's thread count now, and ``SAEFT_THREADS`` for setup_torch
    (not OMP_NUM_THREADS: it would outlive the command in the process and cap ``nproc``)."""
    import torch  # every THREADED stage imports it anyway
    os.environ["SAEFT_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _job_options(parser: argparse.ArgumentParser, name: str) -> None:
    """How command ``name`` runs rather than what it computes: --track and --threads only where
    they act, --log-level everywhere."""
    if name in TRACKED:
        parser.add_argument("--track", type=_json_arg, default=None,
                            help="MLflow run as JSON: {experiment, run_name, tags}; omit to not track")
    if name in THREADED:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all allowed)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def _config(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--config", type=_json_arg, default={}, help=f"{what} config as a JSON object")


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="registered dataset name")
    parser.add_argument("--dataset-options", type=_json_arg, default={},
                        help="the dataset's options as JSON (the shapes world: config key 'synthetic'; "
                             "datasets on disk: {data_root, expected_images, classes, max_images_per_class, templates})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeft", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
        "saeft COMMAND --help: its options and a worked example.\n"
        "snakemake -n -p prints the exact command of every job of a study."))
    version = environment.package_version("saeft") or __version__  # installed, else the checkout's __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_setup_commands(sub)
    _add_training_commands(sub)
    _add_evaluation_commands(sub)
    _add_calibration_command(sub)
    _add_analysis_commands(sub)
    _add_export_command(sub)
    for name, subparser in sub.choices.items():
        _job_options(subparser, name)
    # The commands as registered, so that the lists cannot go stale: the workflow's jobs, then the tools.
    fill = functools.partial(textwrap.fill, width=96, subsequent_indent="  ")
    parser.description = "\n".join([plain(__doc__.splitlines()[0]), "",
                                    fill("workflow stages, each a rule's job: " + ", ".join(n for n in sub.choices if n in TRACKED)),
                                    fill("other commands: " + ", ".join(n for n in sub.choices if n not in TRACKED))])
    return parser


def plain(text: str) -> str:
    """reStructuredText as the plain text of --help: ``code`` and :role:`target` as their bare text."""
    return re.sub(r"``([^`]+)``", r"\1", re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text))


def _subcommand(sub: Any, name: str, fn: Callable[[argparse.Namespace], dict[str, Any]], help_text: str) -> argparse.ArgumentParser:
    """A subcommand ``name`` that runs ``fn``; its help ends with its worked example
    (:data:`saeft.commands.EXAMPLES`), line breaks kept."""
    caption, command = commands.EXAMPLES[name]
    shortened = "\n(from snakemake -n -p, shortened: no --track; settings left out take their defaults)" if name in TRACKED else ""
    epilog = f"example: {caption}{shortened}\n{commands.shell_lines(command)}"
    p = sub.add_parser(name, help=plain(help_text), description=plain(help_text), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn, track=None, threads=None)  # where the command has no such option
    return p


def _add_setup_commands(sub: Any) -> None:
    """Add the tracking, config and model-preparation commands."""
    add = functools.partial(_subcommand, sub)
    p = add("schema", commands.cmd_schema, "print the study config's JSON schema, generated from the config dataclasses")
    p.add_argument("--write", action="store_true", help="write it to workflow/schemas/config.schema.json instead")

    p = add("sync-tracking", commands.cmd_sync_tracking,
            "send the tracking that jobs queued (spooled, or while MLflow was unreachable) to the store")
    p.add_argument("--queue", default=None, help="queue folder (default: $SAEFT_MLFLOW_QUEUE or ./mlflow-queue)")
    p.add_argument("--follow", action="store_true",
                   help="keep sending finished jobs' files every --interval seconds until SIGTERM or until --parent exits")
    p.add_argument("--interval", type=float, default=5.0, help="--follow: seconds between passes (default 5)")
    p.add_argument("--parent", type=int, default=None, help="--follow: stop once this process (the workflow) is gone")
    p.add_argument("--experiment", default=None, help="--follow: create this experiment (and --study's parent run) first")
    p.add_argument("--study", default=None, help="--follow: the study whose parent run to create")

    p = add("worker", _serve_worker,
            "serve the jobs of a workflow run from one warm process (saeft.infra.worker; the workflow starts it)")
    p.add_argument("--socket", required=True, help="Unix socket path to listen at")
    p.add_argument("--parent", type=int, default=None, help="stop once this process (the workflow) is gone")

    p = add("init-tracking", commands.cmd_init_tracking, "create the MLflow store, experiment and study parent run (once, before parallel jobs)")
    p.add_argument("--experiment", required=True, help="experiment name (the study)")
    p.add_argument("--study", default=None, help="also create this study's parent run, under which its jobs' runs nest")

    p = add("pretrain", commands.cmd_pretrain, "pretrain a small CLIP contrastively on a dataset's captioned corpus")
    p.add_argument("--arch", required=True, help="open_clip architecture name")
    p.add_argument("--dataset-options", "--world", dest="dataset_options", type=_json_arg, default={},
                   help="options of the dataset named by the config's 'dataset' (default shapes: config key 'synthetic') as JSON")
    _config(p, "pretraining")
    p.add_argument("--out", required=True, help="output weights (.safetensors)")
    p.add_argument("--quality", required=True,
                   help="output quality record (JSON): zero-shot top-1 per split, linear-probe top-1 on ID")

    p = add("prepare", commands.cmd_prepare, "materialise the zero-shot CLIP as one local safetensors file")
    p.add_argument("--arch", required=True, help="open_clip architecture name")
    p.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint; omit for random weights")
    p.add_argument("--out", required=True, help="output weights (.safetensors)")
    p.add_argument("--quality", default=None, help="quality record of a pretrain_clip model: refuse it below --min-zeroshot-acc")
    p.add_argument("--min-zeroshot-acc", type=float, default=0.0,
                   help="pretrain.min_zeroshot_acc: least zero-shot top-1 on the ID held-out split")

    p = add("head", commands.cmd_head, "build a dataset's zero-shot head from its prompt templates")
    p.add_argument("--model", required=True, help="zero-shot CLIP weights from 'saeft prepare'")
    p.add_argument("--dataset", required=True, help="registered dataset name")
    p.add_argument("--dataset-options", type=_json_arg, default={},
                   help="options of a dataset on disk as JSON: its class subset and template count (classes, templates)")
    p.add_argument("--out", required=True, help="output head (.safetensors)")


def _add_training_commands(sub: Any) -> None:
    """Add the caching, SAE-training and fine-tuning commands."""
    add = functools.partial(_subcommand, sub)
    p = add("cache", commands.cmd_cache, "cache the zero-shot image embeddings of a dataset split in HDF5")
    p.add_argument("--model", required=True, help="zero-shot CLIP weights from 'saeft prepare'")
    p.add_argument("--pretrained", default=None, help="provenance recorded in the cache's attributes")
    _dataset_args(p)
    p.add_argument("--split", required=True, help="dataset split to embed")
    _config(p, "cache")
    p.add_argument("--views", type=_json_arg, default=None,
                   help="the finetune view keys as JSON: cache every view of the bank (the teacher of augmented training)")
    p.add_argument("--out", required=True, help="output HDF5 file")

    p = add("train-sae", commands.cmd_train_sae, "train a Top-K sparse autoencoder on cached embeddings")
    p.add_argument("--train", required=True, help="HDF5 cache of the training embeddings")
    p.add_argument("--heldout", required=True, help="HDF5 cache of held-out embeddings (metrics)")
    _config(p, "SAE")
    p.add_argument("--out-weights", required=True, help="output SAE weights (.safetensors)")
    p.add_argument("--out-json", required=True, help="output sae.json (config and metrics)")
    p.add_argument("--head", default=None,
                   help="the dataset's zero-shot head: adds the zero-shot accuracy of reconstructions")
    p.add_argument("--eval", nargs="*", default=[], metavar="SPLIT=PATH",
                   help="HDF5 caches of evaluation splits: FVU, L0 and dead latents per split in sae.json")

    p = add("train-sae-sweep", commands.cmd_train_sae_sweep, "train the SAEs of sae.sweep, one folder each")
    p.add_argument("--train", required=True, nargs="+", metavar="[DATA=]PATH",
                   help="HDF5 cache of the training embeddings, or one per sae.data value of the entries (id=PATH pretrain=PATH)")
    p.add_argument("--heldout", required=True, help="HDF5 cache of held-out embeddings (metrics)")
    _config(p, "SAE section (defaults plus a 'sweep' list of named overrides)")
    p.add_argument("--out-dir", required=True, help="folder of {name}/sae.safetensors and sae.json")
    p.add_argument("--head", default=None,
                   help="the dataset's zero-shot head: adds the zero-shot accuracy of reconstructions")
    p.add_argument("--eval", nargs="*", default=[], metavar="SPLIT=PATH",
                   help="HDF5 caches of evaluation splits: FVU, L0 and dead latents per split in sae.json")

    p = add("finetune", commands.cmd_finetune, "fine-tune the zero-shot classifier with one method and seed")
    p.add_argument("--model", required=True, help="zero-shot CLIP weights")
    p.add_argument("--head", required=True, help="the dataset's zero-shot head")
    _dataset_args(p)
    p.add_argument("--sae", default=None, help="SAE weights (SAE methods only)")
    p.add_argument("--teacher-cache", default=None, help="HDF5 cache of the zero-shot training embeddings f_0")
    _config(p, "fine-tuning (finetune keys plus method and method_params)")
    p.add_argument("--pretrain-schedule", type=_json_arg, default=None,
                   help="the schedule of the pretraining that made --model, as JSON {lr, steps, warmup_steps} "
                        "(a study that pretrains its own model): train.json then records lr_ratio and summed_lr_ratio")
    p.add_argument("--out-model", required=True, help="output classifier weights (.safetensors)")
    p.add_argument("--out-json", required=True, help="output train.json")
    p.add_argument("--nproc", default="auto",
                   help="training processes (torch DDP through torchrun, one per GPU, the same global batch); "
                        "'auto': the GPUs of the SLURM job's allocation, else 1")


def _add_evaluation_commands(sub: Any) -> None:
    """Add the evaluation, data-check and aggregation commands."""
    add = functools.partial(_subcommand, sub)
    p = add("evaluate", commands.cmd_evaluate, "evaluate a model on every evaluation split of a dataset and its transfer sets")
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
    p.add_argument("--out-predictions", default=None, help="output Parquet: per image of every eval set, predicted and true label")

    p = add("check-data", commands.cmd_check_data, "verify a dataset split's layout and image count under data_root")
    _dataset_args(p)
    p.add_argument("--split", required=True, help="split to check")
    p.add_argument("--out", required=True, help="output marker JSON (what was found)")

    p = add("select-variants", commands.cmd_select_variants, "choose each method's reported variant on ID validation")
    p.add_argument("--evals", nargs="+", required=True, help="evaluation bundles of every variant on the selection seeds")
    p.add_argument("--variants", type=_json_arg, required=True, help="JSON: method -> variant -> its parameters")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="the selection seeds")
    p.add_argument("--oracle", type=_json_arg, default=True, help="also record the OOD-oracle choice (true/false)")
    p.add_argument("--order", type=_json_arg, default=None,
                   help="JSON: method -> its variants in the config's order (ties and one_se go by it)")
    p.add_argument("--rule", choices=["best", "one_se"], default="best",
                   help="selection.rule: the best mean, or the first listed variant within one standard error of it")
    p.add_argument("--out", required=True, help="output selection.json")

    p = add("aggregate", commands.cmd_aggregate, "build the tables and figures from evaluation results")
    p.add_argument("--evals", nargs="+", required=True, help="evaluation result JSON files (WiSE-FT curve points included)")
    p.add_argument("--train", nargs="*", default=[], help="train.json of the fine-tuning jobs (training-curve figures)")
    p.add_argument("--predictions", nargs="*", default=[],
                   help="predictions.parquet of each --evals file, in the same order (the intervals); none: no intervals")
    p.add_argument("--selections", nargs="*", default=[], help="selection.json per dataset (select-variants)")
    p.add_argument("--calibrations", nargs="*", default=[], help="calibration.json per calibrated dataset (calibrate)")
    p.add_argument("--variants", type=_json_arg, default={}, help="JSON: method -> variant -> its parameters")
    p.add_argument("--tables", required=True, help="output folder of tables")
    p.add_argument("--figures", required=True, help="output folder of figures")
    _config(p, "aggregation")


def _add_calibration_command(sub: Any) -> None:
    """Add the calibration command (calibration criteria of a study's world)."""
    add = functools.partial(_subcommand, sub)
    p = add("calibrate", commands.cmd_calibrate,
            "measure whether the world reproduces robust fine-tuning's known effects (the calibration criteria)")
    p.add_argument("--evals", nargs="+", required=True,
                   help="evaluation bundles: zero-shot, the baseline on every seed, its WiSE-FT curve, other baselines")
    p.add_argument("--predictions", nargs="+", required=True, help="predictions.parquet of each --evals file, in order")
    p.add_argument("--baseline-models", nargs="+", required=True, metavar="SEED=PATH",
                   help="the baseline's fine-tuned classifier per seed (its train.json beside it)")
    p.add_argument("--zeroshot-model", required=True, help="zero-shot CLIP weights")
    p.add_argument("--zeroshot-head", required=True, help="the dataset's zero-shot head")
    _dataset_args(p)
    _config(p, "calibration")
    p.add_argument("--evaluate-config", type=_json_arg, default={}, help="evaluate config as a JSON object (batch size, workers)")
    p.add_argument("--level", type=float, default=0.95, help="coverage of the intervals")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each eval set")
    p.add_argument("--pretrain-lr", type=float, default=None, help="the pretraining's peak lr (P4); omit: not pretrained here")
    p.add_argument("--quality", default=None, help="the pretrained model's quality.json (its linear probe)")
    p.add_argument("--selection", default=None, help="the dataset's selection.json (how the baseline's lr was chosen)")
    p.add_argument("--out", required=True, help="output calibration.json")


def _add_analysis_commands(sub: Any) -> None:
    """Add the feature-analysis commands."""
    add = functools.partial(_subcommand, sub)
    p = add("analyze-features", commands.cmd_analyze_features,
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

    p = add("feature-cards", commands.cmd_feature_cards, "cards of the SAE features each method most often added and removed")
    p.add_argument("--images", nargs="+", required=True, metavar="METHOD=PATH",
                   help="per-image tables of analyze-features, one per method and seed")
    p.add_argument("--sae", required=True, help="the zero-shot SAE")
    p.add_argument("--head", required=True, help="the dataset's zero-shot head (class prompt embeddings)")
    _dataset_args(p)
    _config(p, "cards (analysis.cards: features, images, thumbnail)")
    p.add_argument("--out-dir", required=True, help="output folder: {method}.png, {method}.json, cards.md")

    p = add("aggregate-features", commands.cmd_aggregate_features, "tables and figures of the feature analyses, joined with the evaluations")
    p.add_argument("--analyses", nargs="+", required=True, help="features.json files of analyze-features")
    p.add_argument("--images", nargs="+", required=True, help="their per-image tables, in the same order")
    p.add_argument("--evals", nargs="+", required=True, help="evaluation result JSON files")
    p.add_argument("--top", type=int, default=10, help="features listed per method, role and direction")
    p.add_argument("--tables", required=True, help="output folder of tables")
    p.add_argument("--figures", required=True, help="output folder of figures")
    _config(p, "aggregation (display)")


def _add_export_command(sub: Any) -> None:
    """Add the command that exports a run's model for use outside saeft."""
    p = _subcommand(sub, "export", commands.cmd_export,
                    "write a fine-tuned (or WiSE-FT) model as an open_clip checkpoint folder, its head beside it")
    p.add_argument("--run", required=True,
                   help="the fine-tuning run: results/<study>/finetune/<model>/<dataset>/<variant>/seed<N> "
                        "(or its model.safetensors)")
    p.add_argument("--alpha", type=float, default=None,
                   help="WiSE-FT: export (1-alpha)*zero-shot + alpha*fine-tuned (visual tower and head)")
    p.add_argument("--zeroshot-model", default=None,
                   help="zero-shot CLIP weights (default: results/<study>/models/<model>/zeroshot/model.safetensors)")
    p.add_argument("--zeroshot-head", default=None,
                   help="WiSE-FT: the dataset's zero-shot head (default: that study's zeroshot/heads/<dataset>.safetensors)")
    p.add_argument("--out", required=True,
                   help="output folder: open_clip_model.safetensors, open_clip_config.json, head.safetensors, export.json")


def _serve_worker(args: argparse.Namespace) -> dict[str, Any]:
    """``saeft worker``: serve jobs until stopped; each forked child runs :func:`run`."""
    from saeft.infra.mlflow_store import tracking_mode
    from saeft.infra.worker import serve

    # Jobs of a workflow spool their tracking: MLflow is imported by them only when live.
    preload = ["torch", "numpy", "pandas", "h5py", "safetensors.torch", "saeft.commands",
               *sorted({module for modules in STAGE_IMPORTS.values() for module in modules}),
               *(["mlflow"] if tracking_mode() == "live" else [])]
    serve(args.socket, args.parent, run, preload)
    return {}


def _nproc(args: argparse.Namespace) -> int:
    """Training processes of a finetune job: the explicit --nproc, or the SLURM allocation's GPUs."""
    from saeft.infra.gpu import allocated_gpu_count

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
    """Entry point of the ``saeft`` command; returns the exit status. Inside a workflow run the
    warm worker (:mod:`saeft.infra.worker`) runs the command when it can; otherwise this process does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from saeft.infra import worker  # standard library only: cheap for every command

    if os.environ.get(worker.ENV) and argv[:1] != ["worker"]:
        if (status := worker.run_command(argv)) is not None:
            return status
    return run(argv)


def run(argv: Sequence[str] | None = None) -> int:
    """Run ``saeft <argv>`` in this process; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # open_clip warns on the root logger about every model it creates without weights, also
    # where saeft loads the weights right after: keep job logs about the job.
    logging.getLogger().addFilter(lambda record: "No pretrained weights loaded" not in record.getMessage())
    if args.threads:
        apply_threads(args.threads)
    if os.environ.get("SLURM_JOB_ID"):
        logger.info("SLURM job %s on %s, CUDA_VISIBLE_DEVICES=%s", os.environ["SLURM_JOB_ID"],
                    os.environ.get("SLURMD_NODENAME", "?"), os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if args.command in GPU_COMMANDS:
        from saeft.infra.gpu import assign_gpus

        nproc = _nproc(args) if args.command == "finetune" else 1
        assign_gpus(nproc)  # before torch initialises CUDA
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _launch_torchrun(argv, nproc, args.threads)
    if int(os.environ.get("RANK", "0")) != 0:
        args.track = None  # one MLflow run and one log per job: rank 0's
        logging.getLogger().setLevel(logging.WARNING)
    from saeft.config import ConfigError
    from saeft.infra.tracking import JobRun, job_run

    params = {k: v for k, v in vars(args).items() if k not in {"fn", "track", "log_level", "threads"}}
    timing = {"start-up": _process_age(), "imports": time.monotonic()}
    for module in STAGE_IMPORTS.get(args.command, ()):
        importlib.import_module(module)
    started = time.monotonic()
    timing["imports"] = started - timing["imports"]
    try:
        with job_run(args.track, params) as run:
            commands.RUN = run
            working = time.monotonic()
            metrics = args.fn(args) or {}
            timing["work"] = time.monotonic() - working
            run.log_metrics({**metrics, "seconds": time.monotonic() - started})
    except (ConfigError, ValueError, OSError) as exc:  # bad input, missing file, disk full, read-only
        logger.error("%s", exc)
        return 2
    finally:
        commands.RUN = JobRun()  # untracked: calls outside a job do nothing
    timing["tracking"] = time.monotonic() - started - timing["work"]
    logger.info("done in %.1fs (%s)", time.monotonic() - started,
                ", ".join(f"{name} {seconds:.2f}s" for name, seconds in timing.items() if seconds is not None))
    return 0


def _process_age() -> float | None:
    """Seconds since this process started (a forked worker child: since the fork), from /proc;
    None where there is none."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            started_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


if __name__ == "__main__":  # torchrun's workers: run here, never in the warm worker
    sys.exit(run())
