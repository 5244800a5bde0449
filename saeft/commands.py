"""The stage commands behind ``saeft <stage>``: each reads its parsed arguments, runs the stage
and returns the metrics the job logs. :mod:`saeft.cli` parses the command line, opens the job's
MLflow run (:data:`RUN` while a command runs) and calls them. :data:`EXAMPLES`: how to run each by
hand, the end of its ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from saeft.infra.tracking import JobRun

logger = logging.getLogger("saeft")

RUN: Any = JobRun()
"""The running job's MLflow run (:func:`saeft.infra.tracking.job_run`), set by :func:`saeft.cli.main`; outside
a job an untracked run, whose every call does nothing."""


def cmd_init_tracking(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.infra.tracking import init_store

    return {"ok": init_store(args.experiment, args.study)}


def cmd_sync_tracking(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.infra.tracking import follow_queue, init_store, replay_queue

    if args.follow:
        if args.experiment:
            init_store(args.experiment, args.study)
        return follow_queue(args.queue, args.parent, args.interval)
    counts = replay_queue(args.queue)
    if counts["failed"]:
        raise ValueError(f"{counts['failed']} queued run(s) could not be replayed (kept; see the warnings above)")
    return counts


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.data.registry import get_dataset
    from saeft.infra.io import write_json
    from saeft.nn import quality
    from saeft.nn.models import load_clip
    from saeft.stages import pretrain

    cfg = pretrain.PretrainConfig.from_dict(args.config, "pretrain.")
    options = get_dataset(cfg.dataset).options(args.dataset_options)
    metrics = pretrain.run(args.arch, options, cfg, args.out, curve=lambda step, values: RUN.log_curve(_prefixed("train/", values), step))
    record = quality.measure(load_clip(args.out)[0], args.arch, cfg.dataset, options)
    write_json(args.quality, record)
    return {**metrics, "quality": record}


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.stages import prepare

    if args.quality:
        from saeft.nn import quality

        quality.check(args.quality, args.min_zeroshot_acc)
    return prepare.run_model(args.arch, args.pretrained, args.out)


def cmd_head(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.data.registry import get_dataset
    from saeft.stages import prepare

    options = get_dataset(args.dataset).options(args.dataset_options) if args.dataset_options else None
    return prepare.run_head(args.model, args.dataset, args.out, options)


def cmd_cache(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.data.registry import get_dataset
    from saeft.nn.views import ViewConfig
    from saeft.stages import cache

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
    return sae.run(args.train, args.heldout, args.out_weights, args.out_json, cfg, head=args.head, evals=evals,
                   curves=lambda name, step, values: RUN.log_curve(_prefixed("train/", values), step))


def cmd_train_sae_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from saeft import sae

    cfgs = sae.sweep_configs(args.config)
    if not cfgs:
        raise ValueError("train-sae-sweep: the config lists no sae.sweep entries")
    train = _split_paths(args.train, "--train") if any("=" in item for item in args.train) else args.train[0]
    if len(args.train) > 1 and not isinstance(train, dict):
        raise ValueError("train-sae-sweep: several --train caches must each be DATA=PATH (id=..., pretrain=...)")
    return sae.run_sweep(train, args.heldout, args.out_dir, cfgs, head=args.head, evals=_split_paths(args.eval, "--eval"),
                         curves=lambda name, step, values: RUN.log_curve(_prefixed(f"{name}/train/", values), step))


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {prefix + name: value for name, value in values.items()}


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.data.registry import get_dataset
    from saeft.stages import finetune

    options = get_dataset(args.dataset).options(args.dataset_options)
    cfg = finetune.FinetuneConfig.from_dict(args.config, "finetune.")
    final = finetune.run(args.model, args.head, args.dataset, options, cfg, args.out_model, args.out_json,
                         sae_path=args.sae, teacher_cache=args.teacher_cache, pretrain_schedule=args.pretrain_schedule,
                         on_epoch=lambda record: RUN.log_metrics(record, step=int(record["epoch"])))
    if os.path.isfile(args.out_model):  # rank 0 wrote it (the other ranks have no MLflow run)
        from saeft.infra.tracking import model_reference

        RUN.log_model_reference("classifier", model_reference(args.out_model, args.out_json), params=cfg.to_dict())
    return final


def _wiseft(args: argparse.Namespace, stage: str) -> tuple[str, str, float] | None:
    """(zero-shot model, zero-shot head, alpha) of a WiSE-FT run, or None without --alpha."""
    if args.alpha is None:
        return None
    if not (args.zeroshot_model and args.zeroshot_head):
        raise SystemExit(f"{stage}: --alpha needs --zeroshot-model and --zeroshot-head")
    return args.zeroshot_model, args.zeroshot_head, args.alpha


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.data.registry import get_dataset
    from saeft.stages import evaluate

    options = get_dataset(args.dataset).options(args.dataset_options)
    cfg = evaluate.EvaluateConfig.from_dict(args.config, "evaluate.")
    wiseft = _wiseft(args, "evaluate")
    heads = _split_paths(args.transfer, "--transfer")
    unknown = sorted(set(args.transfer_options) - set(heads))
    if unknown:
        raise ValueError(f"--transfer-options: {', '.join(unknown)} not among the --transfer sets")
    transfer = {name: (head, get_dataset(name).options(args.transfer_options.get(name, {}))) for name, head in heads.items()}
    inputs: dict[str, dict[str, str]] = {}
    results = evaluate.run(args.model, args.head, args.dataset, args.split, options, cfg, args.out, args.identity,
                           wiseft=wiseft, transfer=transfer, out_predictions=args.out_predictions, inputs=inputs)
    datasets = _evaluation_inputs(results, inputs)
    RUN.log_inputs(datasets, context="eval")
    metrics = _evaluation_metrics(results)
    # Each eval set's metrics name its dataset input and, but for a WiSE-FT interpolation (made in
    # memory, never logged), the logged model of the evaluated weights.
    links = {key: (d["name"], d["digest"]) for name, d in zip(results, datasets) for key in metrics if key.endswith(f"/{name}")}
    RUN.link_metrics(links, model_weights=None if wiseft else args.model)
    return metrics


def _evaluation_inputs(results: dict[str, dict[str, Any]], inputs: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """The eval sets as MLflow dataset inputs: ``<dataset>/<eval set>`` (a transfer set:
    ``<its dataset>/<its split>``), source and digest (:func:`saeft.stages.evaluate.fingerprint`) and a
    profile of counts; no image goes to MLflow."""
    from saeft.infra.tracking import dataset_record

    records = []
    for name, result in results.items():
        read = result.get("transfer") or {"dataset": result["dataset"], "split": result["evalset"]}
        found = inputs.get(name, {"source": "", "digest": "unknown"})
        profile = {"num_images": result["n"], "num_classes": len(result["classnames"]), "role": result["role"],
                   "metric": result["metric"], "eval_set": name}
        records.append(dataset_record(f"{read['dataset']}/{read['split']}", found["source"], found["digest"], profile))
    return records


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.stages import export

    files = export.resolve(args.run, args.alpha, args.zeroshot_model, args.zeroshot_head)
    record = export.run(files, args.out, args.alpha)
    return {"alpha": 1.0 if record["alpha"] is None else record["alpha"]}


def _evaluation_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of an evaluation, named metric / eval set: ``<metric>/<set>`` (e.g.
    ``macro_f1/id_test``, ``worst_region_acc/ood_test``), ``top1/<set>`` (also beside macro-F1
    or worst-region accuracy) and ``n/<set>`` (its image count)."""
    out: dict[str, float] = {}
    for name, result in results.items():
        out[f"{result['metric']}/{name}"] = result["value"]
        out[f"top1/{name}"] = result.get("average_accuracy", result["value"])
        out[f"n/{name}"] = result["n"]
    return out


def cmd_check_data(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.data.registry import get_dataset
    from saeft.infra.io import write_json

    spec = get_dataset(args.dataset)
    if not spec.on_disk:
        raise ValueError(f"check-data: dataset {args.dataset!r} is not read from data_root; nothing to check")
    found = spec.check(args.split, spec.options(args.dataset_options))
    write_json(args.out, found)
    logger.info("%s/%s: %d images in %s (%d of %d classes present)", args.dataset, args.split, found["images"],
                found["source"], found["classes_present"], found["classes"])
    return {"images": found["images"]}


def cmd_select_variants(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.stages import selection

    record = selection.run(args.evals, args.out, args.variants, args.seeds, oracle=bool(args.oracle), rule=args.rule,
                           order=args.order)
    for method, entry in record["methods"].items():
        RUN.log_table(_scores_frame(entry), f"selection/{method}.json")
    return {f"{m}/selected_val": entry["scores"][entry["selected"]] for m, entry in record["methods"].items()}


def _scores_frame(entry: dict[str, Any]) -> Any:
    import pandas as pd

    oracle = entry.get("oracle", {}).get("scores", {})
    return pd.DataFrame([{"variant": v, "val": s, "ood_avg": oracle.get(v), "selected": v == entry["selected"]}
                         for v, s in entry["scores"].items()])


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.config.calibration import CalibrationConfig
    from saeft.config.stages import EvaluateConfig
    from saeft.data.registry import get_dataset
    from saeft.stages import calibrate

    if len(args.predictions) != len(args.evals):
        raise ValueError(f"--predictions: {len(args.predictions)} files for {len(args.evals)} --evals files")
    models = {int(seed): path for seed, path in _split_paths(args.baseline_models, "--baseline-models").items()}
    result = calibrate.run(args.evals, args.predictions, args.zeroshot_model, args.zeroshot_head, models, args.dataset,
                           get_dataset(args.dataset).options(args.dataset_options),
                           CalibrationConfig.from_dict(args.config, "calibration."), args.out,
                           eval_cfg=EvaluateConfig.from_dict(args.evaluate_config, "evaluate."), level=args.level,
                           n_boot=args.bootstrap, pretrain_lr=args.pretrain_lr, quality=args.quality, selection=args.selection)
    RUN.log_table(_calibration_frame(result), "calibration.json")
    out = {f"calibration/{r['criterion']}/pass": float(r["status"] == "pass") for r in result["criteria"] if r["status"] != "not measured"}
    out.update({f"calibration/{r['criterion']}/value": r["value"] for r in result["criteria"] if r["value"] == r["value"]})
    out["calibration/calibrated"] = float(result["calibrated"])
    return out


def _calibration_frame(result: dict[str, Any]) -> Any:
    from saeft.report.calibration import calibration_frame

    return calibration_frame(result["criteria"])


def cmd_aggregate(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.stages import aggregate

    cfg = aggregate.AggregateConfig.from_dict(args.config, "aggregate.")
    if args.predictions and len(args.predictions) != len(args.evals):
        raise ValueError(f"--predictions: {len(args.predictions)} files for {len(args.evals)} --evals files")
    outputs = aggregate.run(args.evals, args.tables, args.figures, cfg, train_paths=args.train,
                            prediction_paths=args.predictions, selection_paths=args.selections, variants=args.variants,
                            calibration_paths=args.calibrations)
    for name, frame in outputs.tables.items():
        RUN.log_table(frame, f"tables/{name}.json")
    for path in outputs.table_files:  # the files as written: LaTeX, Markdown, HTML, Parquet
        RUN.log_artifact(path, "tables")
    for name, figure in outputs.figures.items():
        RUN.log_figure(figure, f"figures/{name}.png")
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
    from saeft.analysis import tables
    from saeft.stages import aggregate

    cfg = aggregate.AggregateConfig.from_dict(args.config, "aggregate.")
    if args.top < 1:
        raise ValueError(f"analysis.top_features: must be at least 1, got {args.top}")
    headline = tables.run(args.analyses, args.images, args.evals, args.tables, args.figures, cfg, args.top)
    for name in tables.TABLE_FILES:
        RUN.log_artifact(os.path.join(args.tables, name))
    for name in tables.FIGURE_FILES:
        RUN.log_artifact(os.path.join(args.figures, name))
    return headline


def cmd_schema(args: argparse.Namespace) -> dict[str, Any]:
    from saeft.config.study import SCHEMA_PATH, schema_text
    from saeft.infra.io import atomic_path

    text = schema_text()
    if not args.write:
        sys.stdout.write(text)
        return {}
    with atomic_path(SCHEMA_PATH) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
    logger.info("wrote %s", SCHEMA_PATH)
    return {}


# The worked examples' paths and settings: the default study's (config/config.yaml), as its workflow lays
# out and plans its jobs; when that config changes, `snakemake -n -p` shows what to update here.
_RESULTS = "results/default"
_ZEROSHOT = f"{_RESULTS}/models/saeft-vit-p4/zeroshot"
_CACHES, _SAE = f"{_RESULTS}/cache/saeft-vit-p4/shapes", f"{_RESULTS}/sae/saeft-vit-p4/shapes"
_EVALS, _ANALYSES = f"{_RESULTS}/eval/saeft-vit-p4/shapes", f"{_RESULTS}/analysis/saeft-vit-p4/shapes"
_VARIANT = "saeft@lambda=10,mu=1,sae=null"
_RUN = f"{_RESULTS}/finetune/saeft-vit-p4/shapes/{_VARIANT}/seed0"
_FT_RUN = f"{_RESULTS}/finetune/saeft-vit-p4/shapes/ft@lr=0.001/seed0"


def _shell_json(obj: Any) -> str:
    return shlex.quote(json.dumps(obj, separators=(",", ":")))


_WORLD_OPTIONS = "--dataset-options " + _shell_json(
    {"object_scale": 1.2, "spurious": 0.5, "train_per_class": 400, "val_per_class": 50, "test_per_class": 100})
_WORLD = f"--dataset shapes {_WORLD_OPTIONS}"
_SAE_CONFIG = {"k": 8, "auxk_alpha": 0.25}
_PRETRAIN_SCHEDULE = {"lr": 0.002, "steps": 6000, "warmup_steps": 100}
_IDENTITY = _shell_json({"study": "default", "model": "saeft-vit-p4", "method": "saeft", "variant": _VARIANT, "seed": 0})
_SAEFT_FINETUNE = {"method": "saeft", "method_params": {"lambda": 10, "mu": 1, "lambda_add": 10, "lambda_remove": 0.02},
                   "seed": 0, "lr": 0.0001, "epochs": 3, "warmup_steps": 20}

EXAMPLES: dict[str, tuple[str, str]] = {
    "schema": ("after editing a config dataclass, rewrite the schema file", "saeft schema --write"),
    "sync-tracking": ("send what jobs queued while MLflow was unreachable", "saeft sync-tracking --queue mlflow-queue"),
    "worker": ("what a workflow run starts before its first job", "saeft worker --socket /tmp/saeft-worker/socket"),
    "init-tracking": ("the default study's experiment and parent run", "saeft init-tracking --experiment default --study default"),
    "pretrain": ("the default study's pretrain_clip job", f"saeft pretrain --arch saeft-vit-p4 {_WORLD_OPTIONS} "
                 f"--config {_shell_json(_PRETRAIN_SCHEDULE)} --out {_RESULTS}/pretrain/saeft-vit-p4/model.safetensors "
                 f"--quality {_RESULTS}/pretrain/saeft-vit-p4/quality.json"),
    "prepare": ("the default study's prepare_model job", f"saeft prepare --arch saeft-vit-p4 --pretrained "
                f"{_RESULTS}/pretrain/saeft-vit-p4/model.safetensors --quality {_RESULTS}/pretrain/saeft-vit-p4/quality.json "
                f"--min-zeroshot-acc 0.6 --out {_ZEROSHOT}/model.safetensors"),
    "head": ("the default study's build_zeroshot_head job",
             f"saeft head --model {_ZEROSHOT}/model.safetensors --dataset shapes --out {_ZEROSHOT}/heads/shapes.safetensors"),
    "cache": ("a cache_activations job of the default study",
              f"saeft cache --model {_ZEROSHOT}/model.safetensors --pretrained pretrain_clip {_WORLD} --split test --out {_CACHES}/test.h5"),
    "train-sae": ("the default study's train_sae job", f"saeft train-sae --train {_CACHES}/sae_train.h5 --heldout {_CACHES}/sae_heldout.h5 "
                  f"--head {_ZEROSHOT}/heads/shapes.safetensors --eval test={_CACHES}/test.h5 sketch={_CACHES}/sketch.h5 "
                  f"--config {_shell_json(_SAE_CONFIG)} --out-weights {_SAE}/sae.safetensors --out-json {_SAE}/sae.json"),
    "train-sae-sweep": ("the default study's train_sae_sweep job (its SAE 'corpus')",
                        f"saeft train-sae-sweep --train pretrain={_CACHES}/pretrain.h5 --heldout {_CACHES}/sae_heldout.h5 "
                        f"--head {_ZEROSHOT}/heads/shapes.safetensors --config "
                        f"{_shell_json({**_SAE_CONFIG, 'sweep': [{'name': 'corpus', 'data': 'pretrain'}]})} --out-dir {_SAE}"),
    "finetune": ("a finetune job of the default study: SAE-FT, one variant, seed 0",
                 f"saeft finetune --model {_ZEROSHOT}/model.safetensors --head {_ZEROSHOT}/heads/shapes.safetensors "
                 f"--sae {_SAE}/sae.safetensors --teacher-cache {_CACHES}/train.h5 {_WORLD} --config {_shell_json(_SAEFT_FINETUNE)} "
                 f"--pretrain-schedule {_shell_json(_PRETRAIN_SCHEDULE)} --out-model {_RUN}/model.safetensors --out-json {_RUN}/train.json"),
    "evaluate": ("the evaluate_model job of the fine-tuning in 'saeft finetune --help'",
                 f"saeft evaluate --model {_RUN}/model.safetensors {_WORLD} --split test resampled sketch rendition hard val "
                 f"--identity {_IDENTITY} --out {_EVALS}/{_VARIANT}/seed0/evals.json "
                 f"--out-predictions {_EVALS}/{_VARIANT}/seed0/predictions.parquet"),
    "check-data": ("a check_dataset job of the paper_vitb16 study (datasets on disk)",
                   f"saeft check-data --dataset imagenet --dataset-options {_shell_json({'data_root': '/data'})} --split val "
                   "--out results/paper_vitb16/checks/imagenet/val.json"),
    "select-variants": ("the default study's select_variants job, for two of FT's variants",
                        f"saeft select-variants --evals {_EVALS}/ft@lr=0.0001/seed0/evals.json {_EVALS}/ft@lr=0.0001/seed1/evals.json "
                        f"{_EVALS}/ft@lr=0.001/seed0/evals.json {_EVALS}/ft@lr=0.001/seed1/evals.json --variants "
                        f"{_shell_json({'ft': {'ft@lr=0.0001': {'lr': 0.0001}, 'ft@lr=0.001': {'lr': 0.001}}})} --seeds 0 1 "
                        f"--rule one_se --order {_shell_json({'ft': ['ft@lr=0.0001', 'ft@lr=0.001']})} "
                        f"--out {_RESULTS}/selection/saeft-vit-p4/shapes/selection.json"),
    "aggregate": ("the default study's aggregate_tables job, for two of its evaluations",
                  f"saeft aggregate --evals {_EVALS}/zeroshot/evals.json {_EVALS}/{_VARIANT}/seed0/evals.json "
                  f"--predictions {_EVALS}/zeroshot/predictions.parquet {_EVALS}/{_VARIANT}/seed0/predictions.parquet "
                  f"--selections {_RESULTS}/selection/saeft-vit-p4/shapes/selection.json --tables {_RESULTS}/tables "
                  f"--figures {_RESULTS}/figures --config {_shell_json({'pretrained': 'pretrain_clip'})}"),
    "calibrate": ("the default study's calibrate job, for seed 0 of one FT variant",
                  f"saeft calibrate --evals {_EVALS}/zeroshot/evals.json {_EVALS}/ft@lr=0.001/seed0/evals.json "
                  f"--predictions {_EVALS}/zeroshot/predictions.parquet {_EVALS}/ft@lr=0.001/seed0/predictions.parquet "
                  f"--baseline-models 0={_FT_RUN}/model.safetensors --zeroshot-model {_ZEROSHOT}/model.safetensors "
                  f"--zeroshot-head {_ZEROSHOT}/heads/shapes.safetensors {_WORLD} --pretrain-lr 0.002 "
                  f"--quality {_RESULTS}/pretrain/saeft-vit-p4/quality.json --selection {_RESULTS}/selection/saeft-vit-p4/shapes/selection.json "
                  f"--out {_RESULTS}/calibration/saeft-vit-p4/shapes/calibration.json"),
    "analyze-features": ("the analyze_features job of the fine-tuning in 'saeft finetune --help'",
                         f"saeft analyze-features --model {_RUN}/model.safetensors --cache test={_CACHES}/test.h5 sketch={_CACHES}/sketch.h5 "
                         f"--sae {_SAE}/sae.safetensors {_WORLD} --identity {_IDENTITY} --out-json {_ANALYSES}/{_VARIANT}/seed0/features.json "
                         f"--out-images {_ANALYSES}/{_VARIANT}/seed0/images.parquet"),
    "feature-cards": ("the default study's plot_feature_cards job, for two methods",
                      f"saeft feature-cards --images ft={_ANALYSES}/ft@lr=0.001/seed0/images.parquet "
                      f"saeft={_ANALYSES}/{_VARIANT}/seed0/images.parquet --sae {_SAE}/sae.safetensors "
                      f"--head {_ZEROSHOT}/heads/shapes.safetensors {_WORLD} --out-dir {_ANALYSES}/cards"),
    "aggregate-features": ("the default study's aggregate_features job, for one analysed run",
                           f"saeft aggregate-features --analyses {_ANALYSES}/{_VARIANT}/seed0/features.json "
                           f"--images {_ANALYSES}/{_VARIANT}/seed0/images.parquet --evals {_EVALS}/{_VARIANT}/seed0/evals.json "
                           f"--tables {_RESULTS}/tables --figures {_RESULTS}/figures"),
    "export": ("WiSE-FT (alpha 0.5) of the fine-tuning in 'saeft finetune --help' as an open_clip folder",
               f"saeft export --run {_RUN} --alpha 0.5 --out exports/wiseft-saeft-seed0"),
}
"""Each command's worked example, the end of its --help: (caption, command line). A workflow
stage's is a job of the default study (check-data's: of paper_vitb16) as ``snakemake -n -p``
prints it, shortened (tests/test_cli_help.py parses each)."""


def shell_lines(command: str, width: int = 96) -> str:
    """``command`` as indented shell lines of about ``width`` characters, each but the last ending
    in a backslash; an option starts a piece of a line and keeps its first value beside it."""
    words = shlex.split(command)
    pieces = [shlex.join(words[:2])]
    for word in words[2:]:
        bare_option = pieces[-1].startswith("--") and " " not in pieces[-1]
        if word.startswith("--") or (not bare_option and len(pieces[-1]) + 1 + len(word) > width):
            pieces.append(shlex.quote(word))
        else:
            pieces[-1] += " " + shlex.quote(word)
    lines = [pieces[0]]
    for piece in pieces[1:]:
        if len(lines[-1]) + 1 + len(piece) <= width:
            lines[-1] += " " + piece
        else:
            lines.append(piece)
    return "  " + " \\\n    ".join(lines)
