"""The method registry: a method defined and registered by this test alone (a toy cosine
regulariser with its own parameters) trains through ``finetune.run`` and is scored by
``evaluate.run`` with no other file touched; importing the registry never imports torch."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from saeft.config import ConfigError, NonNegFloat, PositiveInt
from saeft.config.stages import EvaluateConfig
from saeft.methods import Method, MethodParams, all_methods, get_method, needing, register, trained_methods, unregister
from saeft.methods.base import penalty_weight
from saeft.stages import evaluate, finetune


@dataclasses.dataclass
class FeatCosParams(MethodParams):
    """The toy method's hyper-parameters (config key ``methods.feat_cos``)."""

    section = "methods.feat_cos"
    lam: NonNegFloat = penalty_weight(2.0)
    """Weight of the regulariser R in CE + lambda * R."""
    warm_epochs: PositiveInt = 1
    """Probing epochs before the encoder trains (added to finetune.epochs)."""


SEEN: dict[str, list] = {"setup": [], "penalty": []}


def _setup(ctx):
    SEEN["setup"].append(ctx.teacher is not None)
    ctx.state["calls"] = 0


def _penalty(ctx, batch):
    import torch.nn.functional as F

    ctx.state["calls"] += 1
    SEEN["penalty"].append(ctx.state["calls"])
    cos = F.cosine_similarity(batch.f_theta, batch.f_0, dim=-1)
    batch.terms["cos"] = cos.mean().detach()
    return {"total": (1 - cos).mean()}


FEAT_COS = Method(name="feat_cos", label="Feature cosine", summary="lambda * mean(1 - cos(f_theta, f_0))",
                  params=FeatCosParams, needs=frozenset({"teacher"}), setup=_setup, penalty=_penalty,
                  probing=lambda params, epoch: epoch < params.warm_epochs, extra_epochs=lambda params: params.warm_epochs)


@pytest.fixture
def feat_cos():
    register(FEAT_COS)
    SEEN["setup"].clear()
    SEEN["penalty"].clear()
    try:
        yield FEAT_COS
    finally:
        unregister(FEAT_COS.name)


def test_registry_lists_and_validates_the_new_method(feat_cos):
    assert get_method("feat_cos") is feat_cos
    assert "feat_cos" in all_methods() and "feat_cos" in trained_methods() and "feat_cos" in needing("teacher")
    cfg = finetune.FinetuneConfig(method="feat_cos", epochs=3, method_params={"lambda": 0.5})
    assert cfg.method_params == {"lambda": 0.5, "warm_epochs": 1}
    assert cfg.total_epochs == 4  # the method's extra_epochs
    with pytest.raises(ConfigError, match=r"methods\.feat_cos\.lambda"):
        finetune.FinetuneConfig(method="feat_cos", method_params={"lambda": -1.0})
    with pytest.raises(ValueError, match="registered twice"):
        register(feat_cos)


def test_a_penalty_without_a_weight_is_refused():
    with pytest.raises(ValueError, match="lam field"):
        Method(name="bad", label="Bad", summary="no weight", penalty=_penalty)
    with pytest.raises(ValueError, match="unknown needs"):
        Method(name="bad", label="Bad", summary="odd needs", needs=frozenset({"oracle"}))
    with pytest.raises(ValueError, match="fits_head without a fit_head"):
        Method(name="bad", label="Bad", summary="a fit of nothing", fits_head=lambda params: True)
    assert not Method(name="plain", label="Plain", summary="no fit").fits(MethodParams())


def test_not_registered_outside_the_fixture():
    assert "feat_cos" not in all_methods()
    with pytest.raises(ConfigError, match="unknown method 'feat_cos'"):
        finetune.FinetuneConfig(method="feat_cos")


def test_new_method_runs_through_finetune_and_evaluate(feat_cos, tmp_path, clip_file, head_file, tiny_world):
    cfg = finetune.FinetuneConfig.from_dict({"method": "feat_cos", "epochs": 1, "batch_size": 8, "lr": 1e-3,
                                             "warmup_steps": 1, "seed": 0, "method_params": {"lambda": 3.0}})
    out_model, out_json = tmp_path / "model.safetensors", tmp_path / "train.json"
    final = finetune.run(clip_file, head_file, "shapes", tiny_world, cfg, out_model, out_json)
    record = json.loads(out_json.read_text())
    assert len(record["history"]) == 2 and record["teacher"] == "live"  # one probing epoch, then one more
    assert SEEN["setup"] == [True] and SEEN["penalty"] == list(range(1, len(SEEN["penalty"]) + 1))
    for key in ("ce", "cos", "reg_total", "loss"):
        assert math.isfinite(final[key])
    assert final["loss"] == pytest.approx(final["ce"] + 3.0 * final["reg_total"], rel=1e-4)

    identity = {"study": "test", "model": "tiny", "method": "feat_cos", "seed": 0}
    results = evaluate.run(out_model, None, "shapes", ["test"], tiny_world, EvaluateConfig(), tmp_path / "eval.json", identity)
    assert results["test"]["method"] == "feat_cos" and 0.0 <= results["test"]["value"] <= 1.0
    assert json.loads((tmp_path / "eval.json").read_text())["evals"]["test"]["n"] == results["test"]["n"]


def test_importing_the_registry_imports_no_torch():
    code = ("import sys, saeft.methods, saeft.config.finetune as s; "
            "assert s.FinetuneConfig(method='lpft').total_epochs == 10; "
            "assert s.FinetuneConfig(method='lpft', method_params={'probe': 'epochs'}).total_epochs == 12; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
