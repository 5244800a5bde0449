"""``saeft export``: a run's fine-tuned and WiSE-FT models load in open_clip alone and score what
``saeft evaluate`` scored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from saeft import cli
from saeft.config.stages import EvaluateConfig
from saeft.data.registry import get_dataset
from saeft.infra.io import load_tensors
from saeft.nn.metrics import eval_logits
from saeft.stages import evaluate, export, finetune
from saeft.nn.models import (ImageClassifier, create_clip, load_classifier, load_clip, load_run_model, open_clip_module,
                          save_classifier, save_clip)

ARCH = "saeft-tiny-rn"
SPLITS = ["test", "sketch"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, clip_file, head_file, tiny_world):
    """A study's results folder as the workflow lays it out: the zero-shot model and head, and
    one fine-tuned run (ft, seed 0)."""
    results = tmp_path_factory.mktemp("export") / "results" / "tiny"
    zeroshot = results / "models" / ARCH / "zeroshot"
    (zeroshot / "heads").mkdir(parents=True)
    shutil.copy(clip_file, zeroshot / "model.safetensors")
    shutil.copy(head_file, zeroshot / "heads" / "shapes.safetensors")
    run = results / "finetune" / ARCH / "shapes" / "ft" / "seed0"
    cfg = finetune.FinetuneConfig.from_dict({"method": "ft", "epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2})
    finetune.run(zeroshot / "model.safetensors", zeroshot / "heads" / "shapes.safetensors", "shapes", tiny_world, cfg,
                 run / "model.safetensors", run / "train.json")
    return {"results": results, "zeroshot": zeroshot, "run": run}


def _evaluated(study, world, tmp_path, alpha=None):
    """What ``saeft evaluate`` scores for the run (at WiSE-FT's ``alpha``): records and predictions."""
    zs = study["zeroshot"]
    wiseft = None if alpha is None else (zs / "model.safetensors", zs / "heads" / "shapes.safetensors", alpha)
    records = evaluate.run(study["run"] / "model.safetensors", None, "shapes", SPLITS, world, EvaluateConfig(),
                           tmp_path / "eval.json", {"method": "ft", "seed": 0}, wiseft=wiseft,
                           out_predictions=tmp_path / "predictions.parquet")
    return records, pd.read_parquet(tmp_path / "predictions.parquet")


def _load_by_name(out):
    open_clip = open_clip_module()  # saeft's tiny architectures registered with open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(out / export.CHECKPOINT_NAME))
    return model.eval(), preprocess


@torch.no_grad()
def _matches_evaluation(out, records, predictions, world, classifier):
    """The exported model, loaded by open_clip with its own preprocessing, predicts through the
    exported head what evaluate predicted on every eval set (so its accuracy is the recorded
    one), with the logits of saeft's evaluated classifier."""
    model, preprocess = _load_by_name(out)
    head = load_file(str(out / export.HEAD_NAME))["weight"]
    spec = get_dataset("shapes")
    for split in SPLITS:
        pairs = list(spec.load(split, preprocess, world))
        images, target = torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])
        logits = F.normalize(model.encode_image(images), dim=-1) @ head.T
        predicted = eval_logits(logits, spec.evalset(split)).argmax(-1).numpy()
        scored = predictions[predictions["evalset"] == split]
        assert (predicted == scored["predicted"].to_numpy()).all(), split
        assert (target.numpy() == scored["target"].to_numpy()).all(), split
        assert float((predicted == target.numpy()).mean()) == records[split]["value"]
        torch.testing.assert_close(logits, classifier(images)[0], rtol=1e-5, atol=1e-5)


def test_export_loads_in_open_clip_and_scores_what_evaluate_scored(study, tiny_world, tmp_path):
    out = tmp_path / "exported"
    assert cli.main(["export", "--run", str(study["run"]), "--out", str(out)]) == 0
    records, predictions = _evaluated(study, tiny_world, tmp_path)
    assert 0 < records["test"]["value"] < 1  # an accuracy whose equality below means something
    _matches_evaluation(out, records, predictions, tiny_world, load_run_model(study["run"] / "model.safetensors", None))

    exported = load_file(str(out / export.CHECKPOINT_NAME))
    zeroshot = load_file(str(study["zeroshot"] / "model.safetensors"))
    tuned = load_classifier(study["run"] / "model.safetensors")[0].state_dict()
    assert set(exported) == set(zeroshot)
    for key, value in exported.items():  # image tower from the run, the rest from the zero-shot model
        assert torch.equal(value, tuned[key] if key.startswith("visual.") else zeroshot[key]), key
    assert not torch.equal(exported["visual.conv1.weight"], zeroshot["visual.conv1.weight"])
    head = load_file(str(out / export.HEAD_NAME))["weight"]
    assert torch.equal(head, tuned["head.weight"])
    record = json.loads((out / export.RECORD_NAME).read_text())
    assert (record["arch"], record["dataset"], record["method"], record["seed"], record["alpha"]) == (ARCH, "shapes", "ft", 0, None)


def test_wiseft_export_is_the_evaluated_interpolation(study, tiny_world, tmp_path):
    out = tmp_path / "wiseft"
    record = export.run(export.resolve(study["run"], alpha=0.5), out, alpha=0.5)
    assert record["alpha"] == 0.5 and record["zeroshot_head"].endswith("heads/shapes.safetensors")
    records, predictions = _evaluated(study, tiny_world, tmp_path, alpha=0.5)
    zs = study["zeroshot"]
    _matches_evaluation(out, records, predictions, tiny_world,
                        load_run_model(study["run"] / "model.safetensors", None, (zs / "model.safetensors", zs / "heads" / "shapes.safetensors", 0.5)))

    exported = load_file(str(out / export.CHECKPOINT_NAME))
    zeroshot = load_file(str(zs / "model.safetensors"))
    tuned = load_file(str(study["run"] / "model.safetensors"))
    key = "visual.conv1.weight"
    torch.testing.assert_close(exported[key], torch.lerp(zeroshot[key], tuned[key], 0.5))
    assert not torch.equal(exported[key], tuned[key]) and not torch.equal(exported[key], zeroshot[key])
    zs_head = load_file(str(zs / "heads" / "shapes.safetensors"))["weight"]
    torch.testing.assert_close(load_file(str(out / export.HEAD_NAME))["weight"], torch.lerp(zs_head, tuned["head.weight"], 0.5))
    assert torch.equal(exported["logit_scale"], zeroshot["logit_scale"])


LOCAL_DIR_SCRIPT = """
import sys, torch, open_clip
from safetensors.torch import save_file
assert "saeft-tiny-rn" not in open_clip.list_models()  # plain open_clip: saeft never imported
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
torch.manual_seed(0)
with torch.no_grad():
    save_file({"embedding": model.eval().encode_image(torch.rand(3, 3, 32, 32))}, sys.argv[2])
print(preprocess.transforms[0].size)
"""


def test_export_folder_loads_in_plain_open_clip_and_in_saeft(study, tmp_path):
    out = tmp_path / "exported"
    export.run(export.resolve(study["run"] / "model.safetensors"), out)
    result = subprocess.run([sys.executable, "-c", LOCAL_DIR_SCRIPT, str(out), str(tmp_path / "embedding.safetensors")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "32"  # the architecture's image size, from open_clip_config.json
    by_name, _ = _load_by_name(out)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = by_name.encode_image(torch.rand(3, 3, 32, 32))
    torch.testing.assert_close(load_file(str(tmp_path / "embedding.safetensors"))["embedding"], expected)
    assert load_clip(out / export.CHECKPOINT_NAME)[1] == ARCH  # also a saeft CLIP file (saeft evaluate --model)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_run_model(out / export.CHECKPOINT_NAME, out / export.HEAD_NAME)(images)[0],
                                   load_run_model(study["run"] / "model.safetensors", None)(images)[0])
    _, meta = load_tensors(out / export.HEAD_NAME)
    assert meta["classnames"] == list(get_dataset("shapes").classnames) and meta["dataset"] == "shapes"


@pytest.mark.slow
@torch.no_grad()
def test_vit_b_32_export_loads_by_its_open_clip_name(tmp_path):
    """A real architecture (random weights, no download) through the same export."""
    arch = "ViT-B-32"
    torch.manual_seed(0)
    zeroshot = tmp_path / "results" / "s" / "models" / arch / "zeroshot" / "model.safetensors"
    clip = create_clip(arch).eval()
    save_clip(zeroshot, clip, arch, source=None)
    classifier = ImageClassifier(clip.visual, torch.randn(3, clip.visual.output_dim)).eval()
    classifier.visual.proj.mul_(1.5)  # a "fine-tuned" tower that differs from the zero-shot one
    run = tmp_path / "results" / "s" / "finetune" / arch / "shapes" / "ft" / "seed0"
    save_classifier(run / "model.safetensors", classifier, arch, {"method": "ft", "seed": 0, "dataset": "shapes"})
    out = tmp_path / "exported"
    export.run(export.resolve(run), out)
    import open_clip  # a built-in architecture: no saeft registration needed

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(out / export.CHECKPOINT_NAME))
    head = load_file(str(out / export.HEAD_NAME))["weight"]
    images = torch.rand(2, 3, 224, 224)
    logits = F.normalize(model.eval().encode_image(images), dim=-1) @ head.T
    torch.testing.assert_close(logits, classifier(images)[0], rtol=1e-4, atol=1e-4)
    assert preprocess.transforms[0].size == 224


def test_bad_run_paths_exit_2_naming_the_problem(study, tmp_path, caplog):
    out = str(tmp_path / "out")
    missing = tmp_path / "results" / "tiny" / "finetune" / ARCH / "shapes" / "ft" / "seed9"
    assert cli.main(["export", "--run", str(missing), "--out", out]) == 2
    assert "seed9: no such run folder or file" in caplog.text
    assert cli.main(["export", "--run", str(tmp_path), "--out", out]) == 2
    assert "no model.safetensors in this folder" in caplog.text
    assert cli.main(["export", "--run", str(study["zeroshot"] / "model.safetensors"), "--out", out]) == 2
    assert "zero-shot CLIP, not a fine-tuned run" in caplog.text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(study["run"] / "model.safetensors", elsewhere / "model.safetensors")
    assert cli.main(["export", "--run", str(elsewhere), "--out", out]) == 2
    assert "give --zeroshot-model" in caplog.text
    assert cli.main(["export", "--run", str(elsewhere), "--alpha", "0.5", "--out", out,
                     "--zeroshot-model", str(study["zeroshot"] / "model.safetensors")]) == 2
    assert "give --zeroshot-head" in caplog.text
    other = tmp_path / "vit.safetensors"
    save_clip(other, create_clip("saeft-tiny-vit"), "saeft-tiny-vit", source=None)
    assert cli.main(["export", "--run", str(study["run"]), "--zeroshot-model", str(other), "--out", out]) == 2
    assert f"is a {ARCH} model, the zero-shot model {other} a saeft-tiny-vit" in caplog.text
    assert cli.main(["export", "--run", str(study["run"]), "--alpha", "1.5", "--out", out]) == 2
    assert "alpha must lie in [0, 1]" in caplog.text
    assert not (tmp_path / "out" / export.CHECKPOINT_NAME).exists()
