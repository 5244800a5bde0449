# Config validation, wildcard constraints, and the target and input functions of every rule.
import json
import os
import subprocess

from saeft.data.registry import get_dataset
from saeft.study import pretrained_kind, validate_config

validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
if pretrained_kind(config["model"]["pretrained"]) == "file" and not os.path.isfile(config["model"]["pretrained"]):
    raise WorkflowError(f"model.pretrained: checkpoint {config['model']['pretrained']} does not exist")

STUDY = config["study"]
R = f"results/{STUDY}"
MODEL = config["model"]["name"]
SEEDS = config["seeds"]
METHODS = list(config["methods"])
DATASETS = config["datasets"]
SAE_METHODS = {"sae_sparse", "sae_add", "saeft"}
SAE_SWEEP = [entry["name"] for entry in config["sae"].get("sweep", [])]


wildcard_constraints:
    model=r"[A-Za-z0-9_.-]+",
    dataset=r"[a-z0-9_]+",
    split=r"[a-z0-9_]+",
    evalset=r"[a-z0-9_]+",
    method=r"[a-z0-9_]+",
    seed=r"\d+",
    run=r"zeroshot|[a-z0-9_]+/seed\d+",


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=workflow.basedir, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


GIT_COMMIT = _git_commit()


def as_json(obj):
    """A stage config as a compact, stable JSON string: the rule param that triggers reruns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def track(rule_name):
    """The MLflow run of a job: experiment per study, run name rule/wildcards, tags."""
    def make(wildcards):
        items = dict(wildcards.items())
        tags = {"rule": rule_name, "study": STUDY, "git_commit": GIT_COMMIT, **{f"wc.{k}": v for k, v in items.items()}}
        name = rule_name + ("/" + ",".join(f"{k}={v}" for k, v in items.items()) if items else "")
        return as_json({"experiment": STUDY, "run_name": name, "tags": tags})
    return make


def dataset_options(dataset):
    """The options a dataset's loader takes (the shapes world reads config 'synthetic')."""
    return config["synthetic"] if dataset == "shapes" else {}


def pretrained_source():
    return config["model"]["pretrained"]


def zeroshot_model():
    return f"{R}/models/{MODEL}/zeroshot/model.safetensors"


def sae_config():
    """The `sae:` keys of the main SAE: the sweep is its own rule, so editing it reruns only that."""
    return {key: value for key, value in config["sae"].items() if key != "sweep"}


def sae_path(model, dataset):
    """Weights of the SAE the SAE methods use."""
    return f"{R}/sae/{model}/{dataset}/sae.safetensors"


def sae_sweep_targets():
    return [f"{R}/sae/{MODEL}/{dataset}/{name}/sae.json" for dataset in DATASETS for name in SAE_SWEEP]


def zeroshot_head(dataset):
    return f"{R}/models/{MODEL}/zeroshot/heads/{dataset}.safetensors"


def method_config(method, seed):
    """Resolved fine-tuning config of one method and seed (finetune keys + the method's own)."""
    return as_json({**config["finetune"], "method": method, "method_params": config["methods"][method], "seed": int(seed)})


def evaluation_runs():
    """Every evaluated model: zero-shot once, each fine-tuned method per seed."""
    return ["zeroshot"] + [f"{m}/seed{s}" for m in METHODS for s in SEEDS]


def eval_results():
    return [
        f"{R}/eval/{MODEL}/{dataset}/{run}/{split}.json"
        for dataset in DATASETS
        for run in evaluation_runs()
        for split in get_dataset(dataset).eval_splits
    ]


TABLES = [f"{R}/tables/{name}" for name in ("metrics.parquet", "summary.csv", "summary.md")]
FIGURES = [f"{R}/figures/{name}" for name in ("id_vs_ood.png", "id_vs_ood.pdf")]


def all_targets():
    return TABLES + FIGURES + sae_sweep_targets()
