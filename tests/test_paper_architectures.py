"""The paper's real architectures, ViT-B/32 and ViT-B/16 at 224 px, through every stage that
touches the model: random weights saved as a local checkpoint (``model.pretrained: <path>``,
nothing downloaded) → prepare → zero-shot head → cache → SAE → one fine-tuning step of ``saeft``
→ evaluation, on a few images of the fixture data root (an ImageNet class subset), by calling the
stage functions as the rules' commands do. The whole paper DAG runs on a tiny ViT of the same
family (tests/test_paper_study.py); this checks that the real sizes fit the same code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import build_data_root  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES = ["tench", "stingray", "broom", "wine bottle", "banana"]  # in every ImageNet shift


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_root")
    build_data_root(root, per_class=1)
    return root


@pytest.mark.parametrize("arch, width", [("ViT-B-32", 512), ("ViT-B-16", 512)])
def test_real_architecture_through_every_model_stage(arch, width, data_root, tmp_path):
    import torch

    from saeft.data.registry import get_dataset
    from saeft.data.samples import RealDataOptions
    from saeft.infra.io import load_tensors, save_tensors
    from saeft.nn.models import create_clip
    from saeft.sae import train as sae_train
    from saeft.stages import cache, evaluate, finetune, prepare

    torch.manual_seed(0)
    checkpoint = tmp_path / "random.safetensors"
    save_tensors(checkpoint, create_clip(arch).state_dict())
    model = tmp_path / "zeroshot.safetensors"
    assert prepare.run_model(arch, str(checkpoint), model)["embed_dim"] == width

    options = RealDataOptions(data_root=str(data_root), classes=CLASSES, templates=2)
    head = tmp_path / "head.safetensors"
    assert prepare.run_head(model, "imagenet", head, options) == {"n_classes": 5, "n_templates": 2}
    assert load_tensors(head)[0]["weight"].shape == (5, width)

    caches = {}
    for split in ("train", "val"):
        caches[split] = tmp_path / f"{split}.h5"
        record = cache.run(model, "imagenet", split, options, cache.CacheConfig(batch_size=8), caches[split])
        assert (record["count"], record["dim"]) == (5, width)
    sae = tmp_path / "sae.safetensors"
    sae_train.run(caches["train"], caches["val"], sae, tmp_path / "sae.json",
                  sae_train.SAETrainConfig(expansion=1, k=8, epochs=1, batch_size=5))

    cfg = finetune.FinetuneConfig.from_dict({"method": "saeft", "epochs": 1, "batch_size": 4, "warmup_steps": 0, "lr": 1e-5,
                                             "teacher": "cache", "seed": 0,
                                             "method_params": {"lambda": 70, "lambda_add": 10, "lambda_remove": 0.02, "mu": 1}})
    tuned = tmp_path / "model.safetensors"
    summary = finetune.run(model, head, "imagenet", options, cfg, tuned, tmp_path / "train.json", sae_path=sae,
                           teacher_cache=caches["train"])
    written = json.loads((tmp_path / "train.json").read_text())
    assert written["steps"] == 1 and written["history"]  # 5 images, batches of 4, the last dropped
    assert all(torch.isfinite(torch.tensor(float(h["ce"]))) for h in written["history"])

    out = tmp_path / "evals.json"
    results = evaluate.run(tuned, None, "imagenet", ["val", "imagenet_r", "objectnet"], options,
                           evaluate.EvaluateConfig(batch_size=8), out,
                           {"study": "smoke", "model": arch, "method": "saeft", "seed": 0})
    spec = get_dataset("imagenet", options)
    assert results["val"]["n"] == 5 and results["imagenet_r"]["n"] == 4 and results["objectnet"]["n"] == 3
    assert results["objectnet"]["classnames"] == list(spec.evalset_classnames("objectnet"))
    assert all(0 <= r["value"] <= 1 for r in results.values())
