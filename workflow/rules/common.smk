# Config validation, wildcard constraints, each job's log, benchmark and command line, and the
# target and input functions of every rule. Planning imports nothing heavy (no torch, pandas or
# matplotlib; tests/test_planning.py checks): the config, dataset and method registries, run ids
# and the aggregate's output names are plain-Python modules.
import hashlib
import json
import mimetypes
import os
import shlex
import subprocess
import sys
from pathlib import Path

from snakemake.sourcecache import LocalSourceFile

from saeft.infra import background
from saeft.config.base import ConfigError
from saeft.config.finetune import split_run_params
from saeft.config.calibration import ROLE_KEYS
from saeft.config.study import pretrained_kind, validate_config
from saeft.data.registry import get_dataset
from saeft.infra.io import atomic_path
from saeft.data.subset import REDUCTION_KEYS
from saeft.methods import get_method
from saeft.infra.mlflow_store import tracking_enabled
from saeft.plan.outputs import output_names
from saeft.plan.runs import PATTERN as RUN_PATTERN, RunId
from saeft.plan.variants import PATTERN as VARIANT_PATTERN, grid_values, method_of, study_variants

try:
    validate_config(config, workflow.source_path("../schemas/config.schema.json"))
except ConfigError as error:  # it names the key: a traceback would only bury it
    sys.exit(f"ConfigError: {error}")
if pretrained_kind(config["model"]["pretrained"]) == "file" and not os.path.isfile(config["model"]["pretrained"]):
    raise WorkflowError(f"model.pretrained: checkpoint {config['model']['pretrained']} does not exist")

STUDY = config["study"]
R = f"results/{STUDY}"
MODEL = config["model"]["name"]
SEEDS = config["seeds"]
METHODS = [m for m in config["methods"] if get_method(m).trained]  # a finetune job per variant and seed each
# Each trained method's variants (saeft.plan.variants): name -> parameters; one, named by the method,
# without a grid. Of a method with several, every variant trains on the selection seeds and the
# one selected on ID validation (checkpoint select_variants) on the other seeds.
VARIANTS = study_variants(config["methods"], METHODS)
SELECTION_SEEDS = config["selection"]["seeds"] or SEEDS[:1]
GRIDDED = [m for m in METHODS if len(VARIANTS[m]) > 1]
# The evaluation-only method's section (WiSE-FT: base, alphas, alpha), if the study lists it.
WISEFT = next((entry for m, entry in config["methods"].items() if not get_method(m).trained), None)
DATASETS = config["datasets"]
SAE_SWEEP = [entry["name"] for entry in config["sae"].get("sweep", [])]


def needs(variant, need):
    """Whether ``variant``'s method reads ``need`` (the registry's needs: teacher, sae,
    encoder_copy, text)."""
    return need in get_method(method_of(variant)).needs


for _dataset in DATASETS if GRIDDED else []:
    if get_dataset(_dataset).val_split is None:
        raise WorkflowError(
            f"datasets: {_dataset} has no ID validation split apart from its test split, so the "
            f"variants of {', '.join(GRIDDED)} cannot be selected without peeking; drop their grid/variants"
        )


wildcard_constraints:
    model=r"[A-Za-z0-9_.-]+",
    dataset=r"[a-z0-9_]+",
    split=r"[a-z0-9_]+",
    method=VARIANT_PATTERN,
    seed=r"\d+",
    run=RUN_PATTERN,


# The checkout this workflow's files come from, also where a deployment (`module ... snakefile:`,
# whose workflow.basedir is the importing workflow's) imports it from; a module read from a URL
# has no checkout, and its rules run the saeft installed with Snakemake.
_RULES_DIR = workflow.current_basedir
WORKFLOW_ROOT = (
    os.path.abspath(os.path.join(_RULES_DIR.get_path_or_uri(secret_free=True), "..", ".."))
    if isinstance(_RULES_DIR, LocalSourceFile)
    else os.path.abspath(os.path.join(workflow.basedir, ".."))
)


def _git_commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=WORKFLOW_ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Jobs read the commit from the environment for their MLflow tag: as a rule param it would make
# every commit rerun every job.
os.environ["SAEFT_GIT_COMMIT"] = os.environ.get("SAEFT_GIT_COMMIT") or _git_commit()
# The checkout whose Snakefile runs: the rules' conda environment installs its requirements.lock
# and saeft from it under --sdm conda.
os.environ["SAEFT_ROOT"] = WORKFLOW_ROOT


def checkout_env_file():
    """workflow/envs/saeft.yaml written for this checkout (its path in place of ${SAEFT_ROOT})
    under .snakemake/saeft-envs/. Snakemake names an environment after its file's text, so two
    checkouts sharing a --conda-prefix get one environment each, each with its own editable
    saeft, where one shared file would run the first checkout's code in both."""
    root = os.environ["SAEFT_ROOT"]
    with open(os.path.join(root, "workflow", "envs", "saeft.yaml"), encoding="utf-8") as handle:
        source = handle.read().replace("${SAEFT_ROOT}", root)
    text = f"# workflow/envs/saeft.yaml for the checkout {root}\n{source}"
    digest = hashlib.sha256(root.encode()).hexdigest()[:12]
    path = os.path.abspath(os.path.join(".snakemake", "saeft-envs", f"saeft-{digest}.yaml"))
    if not os.path.exists(path) or Path(path).read_text(encoding="utf-8") != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


SAEFT_ENV = checkout_env_file()
# Generated splits (shapes, Fashion-MNIST's shifts) are rendered once and read back by later jobs
# (saeft.data.image_cache; not an output: deleting the folder costs a render).
os.environ.setdefault("SAEFT_IMAGE_CACHE", os.path.abspath(os.path.join(".snakemake", "saeft-images")))
# Jobs share the cores: spinning OpenMP threads waiting for work slowed a job 20-fold under load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# SAEFT_TRACKING=off: jobs log nothing to MLflow; =live: each job logs to the store itself (an
# MLflow import and connection per job); otherwise jobs spool their tracking to mlflow-queue/
# and the run's sync process sends it (tracking.smk). An environment variable, not a config
# key, so switching it reruns nothing.
if os.environ.get("SAEFT_TRACKING", "on").strip().lower() in {"", "on"}:
    os.environ["SAEFT_TRACKING"] = "spool"


# Set above; declared so that Snakemake passes them on to jobs on remote executors.
envvars:
    "SAEFT_TRACKING",
    "SAEFT_IMAGE_CACHE",
    "SAEFT_GIT_COMMIT",
    "SAEFT_ROOT",
    "OMP_WAIT_POLICY",


def tracking_queue():
    """The folder where jobs queue MLflow calls that failed (saeft.infra.tracking.queue_dir)."""
    return os.environ.get("SAEFT_MLFLOW_QUEUE") or os.path.abspath("mlflow-queue")


def queued_tracking():
    folder = tracking_queue()
    return [name for name in os.listdir(folder) if name.endswith(".jsonl")] if os.path.isdir(folder) else []


def as_json(obj):
    """A stage config as a compact, stable JSON string: the rule param that triggers reruns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def track(rule_name, wildcards):
    """--track of a job: its MLflow run (experiment per study, run name rule/wildcards, tags). Part
    of the settings param, so its value must not change with code versions: every job would rerun.
    Tags computed from these (method, variant and its grid values, seed, alpha...) are added by
    the job itself (saeft.infra.tracking.comparison_tags)."""
    items = dict(wildcards.items())
    tags = {"rule": rule_name, "study": STUDY, **{f"wc.{k}": v for k, v in items.items()}}
    name = f"{rule_name}/{','.join(f'{k}={v}' for k, v in items.items())}" if items else rule_name
    return {"experiment": STUDY, "run_name": name, "tags": tags}


# Rules take their log, benchmark and command-line flags from these: the log and benchmark
# named by rule and wildcards; the flags from two named functions per rule, each returning a dict
# (flag -> value): <rule>_files(wildcards, input, output), the paths the job reads and writes, and
# <rule>_settings(wildcards), what the config and the wildcards set, to which the job's --track is
# added. Snakemake reruns a job when a param changes unless the param derives from the job's input
# or output (those trigger reruns themselves): the settings are that rerun trigger, the files not.


def job_log(rule_name, wildcards=""):
    """The log of a job: logs/<study>/<rule>[/<wildcards>].log (``wildcards`` a pattern such as
    "{model}/{dataset}")."""
    return _job_file("logs", rule_name, wildcards, "log")


def job_benchmark(rule_name, wildcards=""):
    """The benchmark of a job: benchmarks/<study>/<rule>[/<wildcards>].tsv."""
    return _job_file("benchmarks", rule_name, wildcards, "tsv")


def _job_file(folder, rule_name, wildcards, ext):
    parts = [folder, STUDY, rule_name] + ([wildcards] if wildcards else [])
    return f"{os.path.join(*parts)}.{ext}"


def job_files(flags):
    """The ``files`` param of a rule: ``flags(wildcards, input, output)`` as shell words (not a
    rerun trigger: it derives from the input and output)."""

    def files(wildcards, input, output):
        return command_line(flags(wildcards, input, output))

    return files


def job_settings(rule_name, flags):
    """The ``settings`` param of a rule: ``flags(wildcards)`` then --track, as shell words; a
    change of any of them reruns the job."""

    def settings(wildcards):
        return command_line({**flags(wildcards), "--track": track(rule_name, wildcards)})

    return settings


def command_line(flags):
    """``{flag: value}`` as shell words, each quoted: a dict value is compact JSON, a list one
    word per item, None leaves the flag out."""
    words = []
    for flag, value in flags.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [as_json(value) if isinstance(value, dict) else value]
        words += [flag, *(shlex.quote(str(v)) for v in values)]
    return " ".join(words)


def pretrain_threads(wildcards):
    """Threads of pretrain_clip: the config's, since they decide its weights (not only its speed)."""
    return config["pretrain"]["threads"]


TRANSFER = config["transfer"]


def dataset_options(dataset):
    """The options a dataset's loader takes: the shapes world reads config 'synthetic', a dataset
    on disk data_root, any other the config section of its own name (e.g. 'fashion_mnist')."""
    if dataset == "shapes":
        return config["synthetic"]
    if get_dataset(dataset).on_disk:
        return {"data_root": config["data_root"], **reductions(dataset)}
    return config.get(dataset, {})


def reductions(dataset):
    """The data.<dataset> keys that reduce a dataset on disk (class subset, image cap, template
    count; saeft.data.subset) and that every job reading it gets; {} when none is set, so a study
    without them plans exactly the same jobs."""
    data = config["data"].get(dataset) or {}
    return {key: data[key] for key in REDUCTION_KEYS if data.get(key) is not None}


def check_options(dataset):
    """check_dataset's options: data_root and the data.<dataset> keys (expected counts), which
    only the check reads; it checks the whole split, whatever subset the study reads. (A rerun
    check rewrites its marker, so the jobs reading the split follow.)"""
    data = {key: value for key, value in (config["data"].get(dataset) or {}).items() if key not in REDUCTION_KEYS}
    return {"data_root": config["data_root"], **data}


def check_marker(dataset, split):
    """The check_dataset marker of a split read from data_root (a rule input), or none."""
    return [f"{R}/checks/{dataset}/{split}.json"] if get_dataset(dataset).on_disk else []


def transfer_split(dataset, evalset):
    """(dataset, split) an evaluation reads: a transfer set's test split, or the dataset's own."""
    if evalset in TRANSFER.get(dataset, []):
        return evalset, get_dataset(evalset).id_eval
    return dataset, evalset


def pretrain_config():
    """pretrain_clip's keys: the gate's threshold is read by prepare_model, so changing it never
    reruns the pretraining."""
    return {key: value for key, value in config["pretrain"].items() if key != "min_zeroshot_acc"}


def pretrain_dataset():
    """The dataset whose captioned corpus pretrain_clip trains on (pretrain.dataset, default shapes)."""
    return config["pretrain"].get("dataset", "shapes")


# Every dataset's options are checked before any job starts (e.g. fashion_mnist's held-out
# corruption families must be unseen in pretraining); the error names the key.
for _dataset in set(DATASETS) | ({pretrain_dataset()} if pretrained_kind(config["model"]["pretrained"]) == "pipeline" else set()):
    get_dataset(_dataset).options(dataset_options(_dataset))


def pretrained_source():
    return config["model"]["pretrained"]


def zeroshot_model():
    return f"{R}/models/{MODEL}/zeroshot/model.safetensors"


def sae_config():
    """The `sae:` keys of the main SAE: the sweep is its own rule, so editing it reruns only that."""
    return {key: value for key, value in config["sae"].items() if key != "sweep"}


def sae_path(model, dataset, name=None):
    """Weights of the main SAE, or of the sweep entry ``name``."""
    return os.path.join(R, "sae", model, dataset, *([name] if name else []), "sae.safetensors")


def sae_sweep_targets():
    return [f"{R}/sae/{MODEL}/{dataset}/{name}/sae.json" for dataset in DATASETS for name in SAE_SWEEP]


def view_config():
    """The finetune keys that define the training views: editing them reruns only cache_views and
    what reads it."""
    return {key: config["finetune"][key] for key in ("augment", "views", "view_seed", "crop_scale")}


def teacher_cache(model, dataset):
    """The HDF5 file holding f_0 of the training views, or None when the teacher must run live
    (finetune.teacher live, or a fresh augmented view every epoch)."""
    views = view_config()
    split = get_dataset(dataset).train_split
    if config["finetune"]["teacher"] == "live":
        return None
    if views["augment"] == "none":
        return f"{R}/cache/{model}/{dataset}/{split}.h5"
    return f"{R}/cache/{model}/{dataset}/{split}.views.h5" if views["views"] >= 1 else None


def zeroshot_head(dataset):
    return f"{R}/models/{MODEL}/zeroshot/heads/{dataset}.safetensors"


def method_params(variant, dataset):
    """A variant's hyper-parameters for one dataset: its keys with the method's overrides for
    the dataset (the finetune keys a grid or named variant sets included: split_run_params)."""
    method = method_of(variant)
    params = dict(VARIANTS[method][variant])
    params.update(config["methods"][method].get("datasets", {}).get(dataset, {}))
    return params


def method_config(variant, seed, dataset):
    """Resolved fine-tuning config of one variant, seed and dataset: the finetune keys, those the
    variant sets overriding them, then the method's own parameters."""
    run, params = split_run_params(method_params(variant, dataset))
    params.pop("sae", None)  # an input, not a param
    return as_json({**config["finetune"], **run, "method": method_of(variant), "method_params": params, "seed": int(seed)})


def selection_file(dataset):
    return f"{R}/selection/{MODEL}/{dataset}/selection.json"


def selected_variant(method, dataset):
    """The variant of ``method`` the study reports on ``dataset``: its only one, or the one
    select_variants chose (a checkpoint: the DAG grows once it has run)."""
    if len(VARIANTS[method]) == 1:
        return next(iter(VARIANTS[method]))
    with open(checkpoints.select_variants.get(model=MODEL, dataset=dataset).output[0]) as handle:
        return json.load(handle)["methods"][method]["selected"]


def selection_runs():
    """The fine-tuned runs select_variants compares: every variant of a gridded method on the
    selection seeds."""
    return [str(RunId(v, s)) for m in GRIDDED for v in VARIANTS[m] for s in SELECTION_SEEDS]


def trained_runs(dataset, selected_only=False):
    """Fine-tuned runs of ``dataset`` (run ids): per method its selected variant on every seed,
    and (unless ``selected_only``) its other variants on the selection seeds."""
    runs = []
    for method in METHODS:
        chosen = selected_variant(method, dataset)
        others = [] if selected_only else [v for v in VARIANTS[method] if v != chosen]
        runs += [RunId(chosen, s) for s in SEEDS] + [RunId(v, s) for v in others for s in SELECTION_SEEDS]
    return runs


def wiseft_bases(dataset):
    """The variants WiSE-FT interpolates: a method named in methods.wiseft.base stands for its
    selected variant, a variant for itself."""
    return [selected_variant(b, dataset) if b in VARIANTS else b for b in WISEFT["base"]] if WISEFT else []


def evaluation_runs(dataset, curve=False, selected_only=False):
    """Every evaluated model of ``dataset`` (run ids, saeft.plan.runs): zero-shot once, the fine-tuned
    runs (trained_runs), WiSE-FT of its bases at the reported alpha (and, with ``curve``, on the
    whole alpha grid) on every seed."""
    runs = [RunId()] + trained_runs(dataset, selected_only)
    if WISEFT:
        alphas = sorted(set(WISEFT["alphas"]) | {WISEFT["alpha"]}) if curve else [WISEFT["alpha"]]
        runs += [RunId(b, s, a) for b in wiseft_bases(dataset) for s in SEEDS for a in alphas]
    return [str(run) for run in runs]


def eval_path(dataset, run, leaf="evals.json"):
    return f"{R}/eval/{MODEL}/{dataset}/{run}/{leaf}"


def eval_results(curve=False, leaf="evals.json", selected_only=False):
    """Eval bundles (or, by ``leaf``, their predictions), one per dataset and evaluated run: each
    holds a record per eval split of the dataset, then per transfer set (named by dataset)."""
    return [eval_path(d, run, leaf) for d in DATASETS for run in evaluation_runs(d, curve, selected_only)]


def train_summaries():
    """train.json of every reported fine-tuning job (the training-curve figures)."""
    return [f"{R}/finetune/{MODEL}/{d}/{run.trained}/train.json" for d in DATASETS for run in trained_runs(d, selected_only=True)]


def aggregate_config():
    """aggregate_tables' config: the display keys, the WiSE-FT alpha its tables report, and the
    weights (the reference table compares with published cells of the same weights only)."""
    return {**config["aggregate"], "wiseft_alpha": WISEFT["alpha"] if WISEFT else None, "pretrained": config["model"]["pretrained"]}


def variant_table():
    """Every variant of every trained method with its parameters (method -> variant -> params):
    what the tables show next to a selected variant."""
    return {method: VARIANTS[method] for method in METHODS}


AGGREGATE_TABLES, AGGREGATE_FIGURES = output_names(
    DATASETS, {d: get_dataset(d).metric for d in DATASETS}, any(TRANSFER.get(d) for d in DATASETS)
)
TABLES = [f"{R}/tables/{name}" for name in AGGREGATE_TABLES]
FIGURES = [f"{R}/figures/{name}" for name in AGGREGATE_FIGURES]
REPORT_CATEGORY = f"Study {STUDY}"
mimetypes.add_type("application/vnd.apache.parquet", ".parquet")  # the report's download type
PER_DATASET_FIGURES = ("shifts", "bars", "training", "frontier")


def in_report(path, caption, subcategory="all datasets"):
    """``path`` as a report() output: captioned from workflow/report/<caption>.rst, in the
    study's category and the subcategory of its dataset (a wildcard pattern is expanded)."""
    stem, ext = os.path.basename(path).rsplit(".", 1)
    kind = "figure" if ext in ("png", "pdf") else "table"
    return report(
        path,
        caption=f"../report/{caption}.rst",
        category=REPORT_CATEGORY,
        subcategory=subcategory,
        labels={"kind": kind, "name": stem, "format": ext},
    )


def aggregate_outputs():
    """aggregate_tables' outputs: every table and figure in the report except the Markdown (the
    HTML view shows the same table)."""
    out = []
    for path in TABLES:
        stem, ext = os.path.basename(path).rsplit(".", 1)
        out.append(path if ext == "md" else in_report(path, f"table_{stem}"))
    for path in FIGURES:
        stem = os.path.basename(path).rsplit(".", 1)[0]
        kind = next((k for k in PER_DATASET_FIGURES if stem.startswith(f"{k}_")), None)
        out.append(in_report(path, f"figure_{kind}", stem[len(kind) + 1 :]) if kind else in_report(path, f"figure_{stem}"))
    # The calibration table (calibrate.smk, included before the aggregate's rules).
    out += [path if path.endswith(".md") else in_report(path, "table_calibration") for path in CALIBRATION_TABLES]
    return out


ANALYSIS = config["analysis"]["enabled"]
FEATURE_TABLES = [f"{R}/tables/{name}" for name in ("features.parquet", "features_summary.csv", "features_summary.md", "features_top.csv")]
FEATURE_FIGURES = [
    f"{R}/figures/{name}" for name in ("features_added_removed.png", "features_added_removed.pdf", "drift_vs_ood.png", "drift_vs_ood.pdf")
]


def analysis_config():
    """The keys analyze_features reads (the cards have their own, so editing them reruns only the cards)."""
    return {key: value for key, value in config["analysis"].items() if key in ("batch_size", "top_features")}


def analysis_runs(dataset, selected_only=True):
    """Every analysed run of ``dataset``: each fine-tuned run (with ``selected_only``, of the
    reported variants alone), and WiSE-FT at the reported alpha."""
    return [run for run in evaluation_runs(dataset, selected_only=selected_only) if not RunId.parse(run).zeroshot]


def analysis_path(dataset, run, leaf):
    return f"{R}/analysis/{MODEL}/{dataset}/{run}/{leaf}"


def analysis_files(leaf, selected_only=True):
    """``leaf`` of every analysed run of every dataset (aggregate_features' inputs: the reported
    variants; without ``selected_only``, every variant's)."""
    return [analysis_path(d, run, leaf) for d in DATASETS for run in analysis_runs(d, selected_only)]


def card_files():
    """The cards per table row: the rows are known before any variant is selected."""
    rows = [RunId(m, 0).row for m in METHODS]
    rows += [RunId(b, 0, WISEFT["alpha"]).row for b in WISEFT["base"]] if WISEFT else []
    return [f"{row}.{ext}" for row in dict.fromkeys(rows) for ext in ("png", "json")] + ["cards.md"]


def analysis_targets():
    if not ANALYSIS:
        return []
    cards = [f"{R}/analysis/{MODEL}/{dataset}/cards/{name}" for dataset in DATASETS for name in card_files()]
    # Every variant's own analysis too (on the selection seeds; the reported ones feed the tables).
    variants = (
        [analysis_path(d, run, "features.json") for d in DATASETS for run in selection_runs()] if config["analysis"]["variants"] else []
    )
    return FEATURE_TABLES + FEATURE_FIGURES + cards + variants


def unselected_targets():
    """Evaluations known before any selection (every run of a method with one variant, and every
    variant on the selection seeds): targets of their own, so that they run beside the selection
    stage instead of waiting for the aggregate's inputs, which depend on the checkpoint."""
    single = [m for m in METHODS if m not in GRIDDED]
    runs = [str(RunId(m, s)) for m in single for s in SEEDS] + selection_runs()
    return [eval_path(d, run) for d in DATASETS for run in runs]


def all_targets():
    # The aggregate reads the whole WiSE-FT curve (figures); its tables take the reported alpha.
    return TABLES + CALIBRATION_TABLES + FIGURES + sae_sweep_targets() + analysis_targets() + unselected_targets()


# Calibration, for the calibrate rule; which runs measure the world, per dataset.
CALIBRATION = config["calibration"]
CALIBRATION_BASELINE = CALIBRATION["baseline"]
# The baselines the criteria read besides the baseline itself, by role (where the study has them).
CALIBRATION_ROLES = {key: CALIBRATION[key] for key in ROLE_KEYS}


def calibrated_datasets():
    """The datasets the study calibrates: calibration.enabled, the baseline among the trained
    methods, and a top-1 dataset with an ID validation split (the criteria are on top-1)."""
    if not CALIBRATION["enabled"] or CALIBRATION_BASELINE not in METHODS:
        return []
    return [d for d in DATASETS if get_dataset(d).metric == "top1" and get_dataset(d).val_split is not None]


CALIBRATION_TABLES = [f"{R}/tables/calibration.{ext}" for ext in ("csv", "md")] if calibrated_datasets() else []
"""The calibration table, written by aggregate_tables from every calibrated dataset's records."""


def calibration_file(dataset):
    return f"{R}/calibration/{MODEL}/{dataset}/calibration.json"


def calibration_runs(dataset):
    """Run ids the calibration reads: zero-shot, the baseline's and the other baselines' reported
    variants on every seed (every variant of the ID-only models), and the WiSE-FT curve of the
    baseline (empty where the study interpolates another method)."""
    runs = [RunId()]
    others = [m for m in dict.fromkeys(CALIBRATION_ROLES.values()) if m in METHODS and m != CALIBRATION_BASELINE]
    for trained in [CALIBRATION_BASELINE, *others]:
        if trained == CALIBRATION_ROLES["id_only"]:  # every ID-only model trained: each variant on the selection seeds
            runs += [RunId(v, s) for v in VARIANTS[trained] for s in (SELECTION_SEEDS if trained in GRIDDED else SEEDS)]
        else:
            runs += [RunId(selected_variant(trained, dataset), s) for s in SEEDS]
    base = selected_variant(CALIBRATION_BASELINE, dataset)
    if WISEFT and base in wiseft_bases(dataset):
        alphas = sorted(set(WISEFT["alphas"]) | {WISEFT["alpha"]})
        runs += [RunId(base, s, a) for s in SEEDS for a in alphas]
    return [str(run) for run in runs]


def calibrate_inputs(wildcards):
    dataset, base = wildcards.dataset, selected_variant(CALIBRATION_BASELINE, wildcards.dataset)
    inputs = {
        "evals": [eval_path(dataset, run) for run in calibration_runs(dataset)],
        "predictions": [eval_path(dataset, run, "predictions.parquet") for run in calibration_runs(dataset)],
        "models": [f"{R}/finetune/{MODEL}/{dataset}/{base}/seed{s}/model.safetensors" for s in SEEDS],
        "train": [f"{R}/finetune/{MODEL}/{dataset}/{base}/seed{s}/train.json" for s in SEEDS],
        "zeroshot": zeroshot_model(),
        "head": zeroshot_head(dataset),
        "selection": [selection_file(dataset)] if CALIBRATION_BASELINE in GRIDDED else [],
    }
    if pretrained_kind(config["model"]["pretrained"]) == "pipeline":
        inputs["quality"] = f"{R}/pretrain/{MODEL}/quality.json"
    return inputs


def calibrate_files(wildcards, input, output):
    return {
        "--evals": list(input.evals),
        "--predictions": list(input.predictions),
        "--baseline-models": [f"{s}={path}" for s, path in zip(SEEDS, input.models)],
        "--zeroshot-model": input.zeroshot,
        "--zeroshot-head": input.head,
        "--quality": input.get("quality"),
        "--selection": list(input.selection) or None,
        "--out": output[0],
    }


def calibrate_settings(wildcards):
    pipeline = pretrained_kind(config["model"]["pretrained"]) == "pipeline"
    return {
        "--dataset": wildcards.dataset,
        "--dataset-options": dataset_options(wildcards.dataset),
        "--config": CALIBRATION,
        "--evaluate-config": config["evaluate"],
        "--level": config["aggregate"]["level"],
        "--bootstrap": config["aggregate"]["bootstrap"],
        "--pretrain-lr": config["pretrain"]["lr"] if pipeline else None,
    }
