"""The paper study (config/paper_vitb32.yaml) run for real through Snakemake on the
fixture data root in the real on-disk layouts (tests/real_data.py): ImageNet with its five shifts,
iWildCam and FMoW (WILDS), transfer sets. Reduced only through config keys a user would set to
iterate: a class subset, an image cap and fewer prompt templates per dataset (data.<dataset>),
one seed, one epoch, fewer methods, transfer sets and WiSE-FT alphas; the model is a tiny ViT
CLIP of the same open_clip family with random weights given as a local checkpoint
(model.pretrained: <path>), so nothing is downloaded. Every rule type of the paper DAG runs at
least once, and the tables it writes hold what the study evaluated.

Cost: 79 jobs, nearly all of each the start of a ``saeft`` process (Python, torch, open_clip):
205 s on this 2-core machine with MLflow off (SAEFT_TRACKING=off), 419 s with it on."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import build_data_root  # noqa: E402
from test_real_studies import EXPECTED_JOBS  # noqa: E402
from test_workflow import planned_jobs, snakemake  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "config" / "paper_vitb32.yaml"
ARCH = "saeft-tiny-vit"
STUDY = "paper_vitb32"
IMAGENET_CLASSES = ["tench", "stingray", "broom", "wine bottle", "banana"]
"""Five classes with images in every shift: the last four are in ImageNet-R and -A, the last
three also in ObjectNet (an ImageNet-100 list goes here the same way)."""
METHODS = ["ft", "saeft"]
TRANSFER = ["cifar100", "stl10"]
IMAGENET_SPLITS = {"val", "imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet"}


def paper_config(data_root: Path, checkpoint: Path, counts: dict[str, dict[str, int]]) -> dict:
    """paper_vitb32.yaml with the reduction keys (and the fixture's image counts for check_dataset)."""
    config = yaml.safe_load(PAPER.read_text())
    datasets = config["datasets"] + TRANSFER
    config.update(seeds=[0], data_root=str(data_root), transfer={"imagenet": TRANSFER})
    config["model"] = {"name": ARCH, "pretrained": str(checkpoint)}
    config["data"] = {name: {"expected_images": counts[name], "templates": 2, "max_images_per_class": 2} for name in datasets}
    config["data"]["imagenet"]["classes"] = IMAGENET_CLASSES
    config["data"]["cifar100"]["classes"] = ["apple", "bear", "whale"]
    config["cache"].update(batch_size=64, workers=0)
    config["sae"].update(epochs=2, batch_size=16, k=8)
    config["finetune"].update(epochs=1, batch_size=4, warmup_steps=1, workers=0)
    config["methods"] = {m: config["methods"][m] for m in METHODS}
    config["methods"]["wiseft"] = {"base": ["saeft"], "alphas": [0.0, 0.5, 1.0], "alpha": 0.5}
    config["evaluate"].update(batch_size=64, workers=0)
    config["analysis"]["workers"] = 0
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import torch

    from saeft.infra.io import save_tensors
    from saeft.nn.models import create_clip

    workdir = tmp_path_factory.mktemp("paper")
    counts = build_data_root(workdir / "data", per_class=2)
    torch.manual_seed(0)
    checkpoint = workdir / "tiny_vit.safetensors"  # random weights, like an open_clip checkpoint file
    save_tensors(checkpoint, create_clip(ARCH).state_dict())
    (workdir / "study.yaml").write_text(yaml.safe_dump(paper_config(workdir / "data", checkpoint, counts)))
    # A run prints its job stats first, as a dry run. MLflow off: tested in test_workflow.py.
    plan = planned_jobs(snakemake(workdir, "--cores", "2", env={"SAEFT_TRACKING": "off"}))
    return workdir, plan


def test_every_rule_type_of_the_paper_dag_ran(study):
    workdir, plan = study
    assert set(plan) == set(EXPECTED_JOBS)  # the full paper DAG has no other rule
    # 3 datasets x (ft, saeft); evaluations: zero-shot, 2 trained, WiSE-FT of saeft at 3 alphas.
    assert plan["finetune"] == 6 and plan["evaluate_model"] == 3 * 6 and plan["analyze_features"] == 3 * 3
    assert plan["build_zeroshot_head"] == 3 + len(TRANSFER) and plan["cache_activations"] == 15
    logs = workdir / "logs" / STUDY
    ran = {path.name for path in logs.iterdir() if any(path.rglob("*.log")) or path.suffix == ".log"}
    assert {rule for rule in plan if rule != "all"} <= {name.removesuffix(".log") for name in ran}
    assert planned_jobs(snakemake(workdir, "-n", "--cores", "2")) == {}


def test_the_shift_table_scores_every_imagenet_shift_on_the_subset(study):
    workdir, _ = study
    metrics = pd.read_parquet(workdir / "results" / STUDY / "tables" / "metrics.parquet")
    imagenet = metrics[metrics["dataset"] == "imagenet"]
    assert IMAGENET_SPLITS | set(TRANSFER) == set(imagenet["evalset"])
    n = imagenet[imagenet["method"] == "zeroshot"].set_index("evalset")["n"].to_dict()
    # 2 images per class: 5 classes; R and A keep the 4 in their 200; ObjectNet its 3 mapped ones.
    assert n == {"val": 10, "imagenet_v2": 10, "imagenet_sketch": 10, "imagenet_r": 8, "imagenet_a": 8,
                 "objectnet": 6, "cifar100": 6, "stl10": 20}
    assert set(metrics["method"]) == {"zeroshot", "ft", "saeft", "wiseft_saeft"}
    assert metrics["value"].between(0, 1).all()
    shifts = (workdir / "results" / STUDY / "tables" / "shifts.md").read_text()
    for label in ("Zero-shot", "FT", "SAE-FT", "ObjectNet" if "ObjectNet" in shifts else "objectnet"):
        assert label in shifts, label


def test_wilds_transfer_and_reference_tables(study):
    workdir, _ = study
    tables = workdir / "results" / STUDY / "tables"
    wilds = pd.read_csv(tables / "wilds.csv")
    assert {"ft", "saeft", "zeroshot"} <= set(wilds["method"])
    columns = " ".join(wilds.columns)
    assert "iwildcam" in columns and "fmow" in columns, columns
    metrics = pd.read_parquet(tables / "metrics.parquet")
    fmow = metrics[(metrics["dataset"] == "fmow") & (metrics["method"] == "zeroshot")].set_index("evalset")
    iwildcam = metrics[(metrics["dataset"] == "iwildcam") & (metrics["method"] == "zeroshot")].set_index("evalset")
    assert set(fmow["metric"]) == {"worst_region_acc"} and set(iwildcam["metric"]) == {"macro_f1"}
    assert fmow.loc["test", "n"] == 4 and iwildcam.loc["test", "n"] == 6  # 2 categories, 3 classes: 2 images each

    transfer = pd.read_csv(tables / "transfer.csv")
    assert {"ft", "saeft"} <= set(transfer["method"])
    assert all(any(name in column for column in transfer.columns) for name in TRANSFER), list(transfer.columns)
    reference = pd.read_csv(tables / "reference.csv")
    # SAE-FT's published cells without a stated backbone: ImageNet-V2/-R and the transfer sets.
    assert {"imagenet_v2", "imagenet_r", "cifar100", "stl10"} <= set(reference["evalset"])
    assert set(reference["method"]) == {"saeft"}
    for name in ("features_summary.csv", "robustness.csv", "selection.csv", "comparison.csv", "frontier.csv"):
        assert (tables / name).stat().st_size > 0, name
