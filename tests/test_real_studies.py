"""The paper study configs against a fixture data root: the full DAG builds; the evaluator scores
a random tiny CLIP on a fixture ImageNet-R tree with the 200-class mask."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import build_data_root  # noqa: E402

from saeft.config import ConfigError  # noqa: E402
from saeft.config.study import validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "config"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_root")
    build_data_root(root, per_class=1)
    return root


def test_paper_configs_need_a_data_root():
    config = yaml.safe_load((CONFIGS / "paper_vitb16.yaml").read_text())
    with pytest.raises(ConfigError, match=r"data_root: not set, but .*cifar100.*imagenet"):
        validate_config(config)
    config["data_root"] = "/data"
    config["transfer"] = {"imagenet": ["imagenet"]}
    with pytest.raises(ConfigError, match=r"transfer.imagenet"):
        validate_config(config)


# Per rule, for 3 datasets (imagenet, iwildcam, fmow), 5 transfer sets of imagenet, 11 trained
# methods x 3 seeds, WiSE-FT over 2 bases x 3 seeds x 11 alphas:
#   heads: 3 + 5; checks: imagenet 7 splits + iwildcam 4 + fmow 4 + 5 transfer test splits;
#   caches: train, held-out and every eval split of each dataset (imagenet 7, iwildcam 4, fmow 4);
#   evaluations: (1 + 33 + 66) runs x 3 datasets, one job each for all its eval sets (imagenet 6
#   splits + 5 transfer sets, iwildcam 2, fmow 2); feature analysis: (33 trained + 6 WiSE-FT at the
#   reported alpha) runs x 3 datasets, one card job per dataset.
EXPECTED_JOBS = {
    "prepare_model": 1, "build_zeroshot_head": 8, "check_dataset": 20, "cache_activations": 15, "train_sae": 3,
    "finetune": 99, "evaluate_model": 300, "analyze_features": 117, "plot_feature_cards": 3, "aggregate_features": 1,
    "aggregate_tables": 1, "all": 1,
}


# paper_vitb16 in full; paper_vitb32 (the same DAG on another model) runs for real, reduced, in
# tests/test_paper_study.py.
@pytest.mark.slow  # a dry run of 569 jobs: about 15 s on 2 cores
@pytest.mark.parametrize("name", ["paper_vitb16"])
def test_paper_config_dry_run_builds_the_full_dag(data_root, tmp_path, name):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "workflow" / "Snakefile"), "-d", str(tmp_path),
               "--configfile", str(CONFIGS / f"{name}.yaml"), "--config", f"data_root={data_root}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (result.stdout + result.stderr).split("Job stats:", 1)[1]
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    total = jobs.pop("total")
    assert jobs == EXPECTED_JOBS
    assert total == sum(EXPECTED_JOBS.values())
    assert f"results/{name}/checks/imagenet/objectnet.json" in result.stdout
    model = "ViT-B-16" if name.endswith("16") else "ViT-B-32"
    assert f"results/{name}/eval/{model}/imagenet/zeroshot/evals.json" in result.stdout
    assert f"results/{name}/eval/{model}/imagenet/ft/seed2/alpha0.5/evals.json" in result.stdout


def test_evaluator_masks_imagenet_r_logits(data_root, tmp_path, clip_file):
    import torch

    from saeft.data.registry import get_dataset
    from saeft.data.samples import RealDataOptions
    from saeft.infra.io import read_json, save_tensors
    from saeft.nn.models import classifier_from_zeroshot, preprocess_for
    from saeft.stages import evaluate

    torch.manual_seed(0)
    head = tmp_path / "imagenet.safetensors"
    dim = classifier_from_zeroshot_dim(clip_file)
    save_tensors(head, {"weight": torch.randn(1000, dim)}, {"kind": "zeroshot_head"})
    options = RealDataOptions(data_root=str(data_root))
    out = tmp_path / "evals.json"
    result = evaluate.run(clip_file, head, "imagenet", ["imagenet_r"], options, evaluate.EvaluateConfig(batch_size=64), out,
                          {"study": "t", "model": "m", "method": "zeroshot", "seed": None})["imagenet_r"]
    written = read_json(out)["evals"]["imagenet_r"]
    assert written == result
    assert written["metric"] == "top1" and written["role"] == "ood" and written["n"] == 200
    assert len(written["classnames"]) == 200 and len(written["per_class"]["total"]) == 200

    # The same number by hand: logits over 1000 classes, restricted to ImageNet-R's 200.
    classifier = classifier_from_zeroshot(clip_file, head)[0]
    spec = get_dataset("imagenet")
    data = spec.load("imagenet_r", preprocess_for(classifier.visual), options)
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        logits = classifier(images)[0]
    subset = list(spec.evalset("imagenet_r").class_subset)
    expected = float((logits[:, subset].argmax(1).numpy() == np.arange(200)).mean())
    unmasked = float((logits.argmax(1).numpy() == np.arange(200)).mean())
    assert written["value"] == pytest.approx(expected)
    assert sum(written["per_class"]["correct"]) == round(expected * 200)
    assert unmasked <= expected  # the mask can only help: labels index the 200 classes


def classifier_from_zeroshot_dim(clip_file):
    from saeft.nn.models import load_clip

    return load_clip(clip_file)[0].visual.output_dim


def test_transfer_evaluation_scores_through_the_transfer_head(data_root, tmp_path, clip_file, monkeypatch):
    import torch

    from saeft.data.samples import RealDataOptions
    from saeft.infra.io import save_tensors
    from saeft.nn.models import classifier_from_zeroshot, save_classifier
    from saeft.stages import evaluate

    torch.manual_seed(1)
    dim = classifier_from_zeroshot_dim(clip_file)
    own_head, transfer_head = tmp_path / "own.safetensors", tmp_path / "stl10.safetensors"
    save_tensors(own_head, {"weight": torch.randn(1000, dim)}, {"kind": "zeroshot_head"})
    save_tensors(transfer_head, {"weight": torch.randn(10, dim)}, {"kind": "zeroshot_head"})
    tuned = tmp_path / "model.safetensors"
    save_classifier(tuned, classifier_from_zeroshot(clip_file, own_head)[0], "saeft-tiny-rn", {"method": "ft"})
    options = RealDataOptions(data_root=str(data_root))
    transfer = {"stl10": (transfer_head, options)}
    result = evaluate.run(tuned, None, "imagenet", [], options, evaluate.EvaluateConfig(batch_size=16),
                          tmp_path / "ft.json", {"study": "t", "model": "m", "method": "ft", "seed": 0}, transfer=transfer)["stl10"]
    assert (result["dataset"], result["evalset"], result["role"]) == ("imagenet", "stl10", "transfer")
    assert result["transfer"] == {"dataset": "stl10", "split": "test"}
    assert result["n"] == 10 and len(result["per_class"]["total"]) == 10
    # The zero-shot model through the same head gives the same predictions (same visual tower here);
    # by the command, as the workflow runs it: the transfer set beside an eval split of imagenet.
    from saeft import cli
    from saeft.infra.io import read_json

    zs = tmp_path / "zs.json"
    monkeypatch.setenv("SAEFT_THREADS", "1")  # restored after the test (cli sets it from --threads)
    code = cli.main(["evaluate", "--model", str(clip_file), "--head", str(own_head), "--dataset", "imagenet",
                     "--dataset-options", json.dumps({"data_root": str(data_root)}), "--split", "imagenet_r",
                     "--transfer", f"stl10={transfer_head}", "--transfer-options", json.dumps({"stl10": {"data_root": str(data_root)}}),
                     "--identity", json.dumps({"study": "t", "model": "m", "method": "zeroshot", "seed": None}),
                     "--config", '{"batch_size": 16}', "--out", str(zs), "--threads", "1"])
    assert code == 0
    bundle = read_json(zs)
    assert list(bundle["evals"]) == ["imagenet_r", "stl10"] and bundle["method"] == "zeroshot"
    assert bundle["evals"]["stl10"]["per_class"] == result["per_class"]
    assert bundle["evals"]["imagenet_r"]["role"] == "ood"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU"))])
def test_evaluation_runs_on_the_default_device_with_loader_workers(data_root, tmp_path, clip_file, monkeypatch, device):
    """evaluate puts the model on default_device() (the GPU of a GPU job) and decodes images in
    loader workers; the scores equal those of the plain CPU evaluation of the same model."""
    import torch

    from saeft.data.samples import RealDataOptions
    from saeft.infra.io import save_tensors
    from saeft.stages import evaluate

    torch.manual_seed(0)
    head = tmp_path / "imagenet.safetensors"
    save_tensors(head, {"weight": torch.randn(1000, classifier_from_zeroshot_dim(clip_file))}, {"kind": "zeroshot_head"})
    options = RealDataOptions(data_root=str(data_root))
    identity = {"study": "t", "model": "m", "method": "zeroshot", "seed": None}
    reference = evaluate.run(clip_file, head, "imagenet", ["imagenet_r"], options, evaluate.EvaluateConfig(batch_size=64),
                             tmp_path / "cpu.json", identity)["imagenet_r"]
    seen = []
    real_predict = evaluate.predict

    def predict(model, *args, **kwargs):
        seen.append(next(model.parameters()).device.type)
        return real_predict(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "default_device", lambda: torch.device(device))
    monkeypatch.setattr(evaluate, "predict", predict)
    result = evaluate.run(clip_file, head, "imagenet", ["imagenet_r"], options, evaluate.EvaluateConfig(batch_size=64, workers=2),
                          tmp_path / "device.json", identity)["imagenet_r"]
    assert seen == [device]
    assert result["n"] == reference["n"] == 200
    assert result["value"] == pytest.approx(reference["value"], abs=1 / 200)  # a tie may flip on a GPU
