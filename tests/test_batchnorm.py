"""``finetune.batchnorm``: with ``frozen`` (the default) BatchNorm of the ResNet tower never leaks
around the regulariser. In its training phase, before the first optimiser step, every method's
tuned embedding is the teacher's (cached and live), every penalty is zero, and a full step leaves
the running statistics untouched; ``train`` moves them (so these checks can fail)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from saeft.config import ConfigError
from saeft.data.registry import get_dataset
from saeft.infra.io import load_tensors
from saeft.methods import get_method, needing, trained_methods
from saeft.methods.flyp_towers import FlypModel
from saeft.nn.distributed import sync_batchnorm_for, without_sync_batchnorm
from saeft.nn.loss import build_context, method_loss
from saeft.nn.models import ImageClassifier, classifier_from_zeroshot, load_clip, preprocess_for, tokenizer_for
from saeft.nn.regularizers import sae_penalty
from saeft.sae import TopKSAE
from saeft.stages import cache, finetune

BATCH = torch.tensor([5, 0, 17, 3, 9, 11, 30, 22])
"""Training images of one batch (the tiny world's train split has 40)."""
ATOL = 1e-5
PENALTY_ATOL = 1e-6
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def train_cache(clip_file, tiny_world, tmp_path_factory):
    """f_0 of the train split as the teacher cache stage writes it (eval-mode embeddings)."""
    path = tmp_path_factory.mktemp("teacher") / "train.h5"
    cache.run(clip_file, "shapes", "train", tiny_world, cache.CacheConfig(), path)
    return path


@pytest.fixture(scope="module")
def zero_shot_clip(clip_file):
    """(CLIP, arch) of the zero-shot weights; tests train deep copies (faster than reloading)."""
    return load_clip(clip_file)


@pytest.fixture(scope="module")
def batch(zero_shot_clip, tiny_world, train_cache):
    """(images, labels, cached f_0) of one training batch."""
    visual = zero_shot_clip[0].visual
    spec = get_dataset("shapes")
    train = spec.load(spec.train_split, preprocess_for(visual), tiny_world)
    cached = finetune.read_teacher_cache(train_cache, "shapes", spec.train_split, len(train), visual.output_dim)
    images = torch.stack([train[int(i)][0] for i in BATCH])
    labels = torch.tensor([train[int(i)][1] for i in BATCH])
    return images, labels, cached[BATCH]


@pytest.fixture(scope="module")
def train_embeddings(zero_shot_clip, tiny_world):
    """(zero-shot embeddings, labels) of every training image: what the loop hands ``fit_head``."""
    visual = zero_shot_clip[0].visual
    spec = get_dataset("shapes")
    train = spec.load(spec.train_split, preprocess_for(visual), tiny_world)
    with torch.no_grad():
        return visual(torch.stack([image for image, _ in train])), torch.tensor([label for _, label in train])


@pytest.fixture(scope="module")
def sae(zero_shot_clip):
    d = zero_shot_clip[0].visual.output_dim
    return TopKSAE(d, 2 * d, 8, generator=torch.Generator().manual_seed(0)).eval()


def _trained_module(zero_shot_clip, head_file, method):
    """(trained module, classifier) as ``finetune.run`` builds them: the classifier, or for flyp
    both towers around it (sharing the visual tower)."""
    clip, arch = copy.deepcopy(zero_shot_clip[0]), zero_shot_clip[1]
    model = ImageClassifier(clip.visual, load_tensors(head_file)[0]["weight"])
    if method != "flyp":
        return model, model
    spec = get_dataset("shapes")
    tokens = tokenizer_for(arch)([prompt for c in spec.classnames for prompt in spec.prompts(c)])
    clip.logit_scale.requires_grad_(False)
    return FlypModel(clip, tokens, len(spec.classnames)), model


def _statistics(module):
    """Copies of every BatchNorm running statistic, by module name."""
    return {f"{name}.{stat}": getattr(norm, stat).clone()
            for name, norm in module.named_modules() if isinstance(norm, nn.modules.batchnorm._BatchNorm)
            for stat in STATISTICS}


class _Embeddings:
    """The visual tower's outputs (the embeddings f_theta the losses see), forward by forward."""

    def __init__(self, visual):
        self.seen = []
        visual.register_forward_hook(lambda _m, _i, output: self.seen.append(output.detach().clone()))


def _prepare(method, zero_shot_clip, head_file, sae, batchnorm, live_teacher=True):
    cfg = finetune.FinetuneConfig(method=method, batchnorm=batchnorm)
    trained, model = _trained_module(zero_shot_clip, head_file, method)
    ctx = build_context(cfg, trained, model.visual, sae if method in needing("sae") else None, live_teacher)
    return cfg, trained, model, ctx


def _assert_zero_penalty(method, terms, f_theta, f_0, sae):
    penalties = {key: float(value) for key, value in terms.items() if key.startswith("reg_")}
    if method in needing("sae"):
        assert {"reg_add", "reg_remove", "reg_l1", "reg_align", "reg_total"} <= set(penalties)
        # The method's own weights zero some terms; unit weights check every term itself.
        unit = sae_penalty(f_theta, f_0, sae, lambda_add=1.0, lambda_remove=1.0, lambda_l1=1.0, mu=1.0)
        penalties.update({f"unit_{key}": float(value) for key, value in unit.items()})
    elif method in ("feat_mse", "feat_l1", "l2sp", "ldifs"):
        assert "reg_total" in penalties
    else:
        assert not penalties
    assert all(abs(v) <= PENALTY_ATOL for v in penalties.values()), penalties
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"]), rel=1e-5)


@pytest.mark.parametrize("method", [m for m in trained_methods() if get_method(m).from_zeroshot])
def test_frozen_batchnorm_the_step_0_embedding_is_the_teachers(method, zero_shot_clip, head_file, batch, sae, train_embeddings):
    images, labels, cached_f0 = batch
    cfg, trained, model, ctx = _prepare(method, zero_shot_clip, head_file, sae, "frozen")
    zero_shot = copy.deepcopy(zero_shot_clip[0].visual).eval()  # a live teacher, also for methods without one
    before = _statistics(trained)
    assert len(before) == 3 * len(finetune.batchnorm_modules(model.visual)) > 0
    if ctx.method.fits(ctx.params):  # the head fit the loop runs before step 0 (lpft's probe) moves no embedding
        ctx.method.fit_head(ctx, model, *train_embeddings)
    embeddings = _Embeddings(model.visual)

    finetune.set_phase(cfg, trained, model.visual, epoch=0)
    assert trained.training and not any(norm.training for norm in finetune.batchnorm_modules(trained))
    loss, terms = method_loss(ctx, images, labels)  # the live teacher where the method has one
    f_theta = embeddings.seen[-1]
    with torch.no_grad():
        live_f0 = zero_shot(images)
        torch.testing.assert_close(f_theta, live_f0, atol=ATOL, rtol=0)
        torch.testing.assert_close(f_theta, cached_f0, atol=ATOL, rtol=0)
        if ctx.teacher is not None:
            torch.testing.assert_close(f_theta, ctx.teacher(images), atol=ATOL, rtol=0)
    _assert_zero_penalty(method, terms, f_theta, live_f0, sae)
    if method in needing("teacher"):  # the same batch with f_0 from the teacher cache
        cached_ctx = build_context(cfg, trained, model.visual, ctx.sae, live_teacher=False)
        _, cached_terms = method_loss(cached_ctx, images, labels, cached_f0)
        torch.testing.assert_close(embeddings.seen[-1], cached_f0, atol=ATOL, rtol=0)
        _assert_zero_penalty(method, cached_terms, embeddings.seen[-1], cached_f0, sae)

    # One full optimiser step (no weight decay: what moves, the gradient moved).
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    norms = {name for name, m in model.visual.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    affine = {name: p.detach().clone() for name, p in model.visual.named_parameters() if name.rsplit(".", 1)[0] in norms}
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
    optimizer.step()
    after = _statistics(trained)
    assert [key for key in before if not torch.equal(before[key], after[key])] == []
    if ctx.teacher is not None:
        teacher, reference = _statistics(ctx.teacher), _statistics(zero_shot)
        assert all(torch.equal(teacher[key], reference[key]) for key in reference)
    # Affine weights train with the encoder (frozen statistics only); probing freezes them too.
    moved = [name for name, p in model.visual.named_parameters() if name in affine and not torch.equal(p, affine[name])]
    assert bool(moved) == (not ctx.method.probes(ctx.params, 0))


@pytest.mark.parametrize("method", ["ft", "saeft", "flyp", "lp"])
def test_train_batchnorm_moves_statistics_and_embedding(method, zero_shot_clip, head_file, batch, sae):
    images, labels, cached_f0 = batch
    cfg, trained, model, ctx = _prepare(method, zero_shot_clip, head_file, sae, "train")
    before = _statistics(trained)
    embeddings = _Embeddings(model.visual)
    finetune.set_phase(cfg, trained, model.visual, epoch=0)
    _, terms = method_loss(ctx, images, labels)
    after = _statistics(trained)
    gap = float((embeddings.seen[-1] - cached_f0).abs().max())
    if method == "lp":  # probing keeps the whole encoder in eval mode whatever batchnorm says
        assert gap <= ATOL and all(torch.equal(before[k], after[k]) for k in before)
        return
    assert gap > 1e-3  # batch statistics normalise: the step-0 embedding is not the teacher's
    assert not all(torch.equal(before[k], after[k]) for k in before)  # ID batches moved them
    if method == "saeft":
        assert float(terms["reg_total"]) > PENALTY_ATOL


def test_training_loop_keeps_the_running_statistics(tmp_path, clip_file, head_file, tiny_world):
    """The real loop (``finetune.run``, 5 steps of ft, default config): statistics as zero-shot."""
    cfg = finetune.FinetuneConfig.from_dict({"method": "ft", "epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1})
    finetune.run(clip_file, head_file, "shapes", tiny_world, cfg, tmp_path / "model.safetensors", tmp_path / "train.json")
    tuned = load_tensors(tmp_path / "model.safetensors")[0]
    zero_shot = classifier_from_zeroshot(clip_file, head_file)[0].state_dict()
    stats = [k for k in zero_shot if k.rsplit(".", 1)[-1] in STATISTICS]
    affine = [k.rsplit(".", 1)[0] + ".weight" for k in stats if k.endswith("running_mean")]
    assert stats and all(torch.equal(tuned[k], zero_shot[k]) for k in stats)
    assert any(not torch.equal(tuned[k], zero_shot[k]) for k in affine)  # affine weights trained
    assert json.loads((tmp_path / "train.json").read_text())["config"]["batchnorm"] == "frozen"


def test_sync_batchnorm_only_for_trained_statistics():
    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def synced(module):
        return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    frozen, train = finetune.FinetuneConfig(), finetune.FinetuneConfig(batchnorm="train")
    assert frozen.batchnorm == "frozen"
    assert not synced(sync_batchnorm_for(frozen, net(), 2, gpu))
    assert not synced(sync_batchnorm_for(train, net(), 1, gpu))
    assert not synced(sync_batchnorm_for(train, net(), 2, cpu))
    converted = sync_batchnorm_for(train, net(), 2, gpu)
    assert synced(converted) and not synced(without_sync_batchnorm(converted))


def test_bad_batchnorm_names_the_key():
    with pytest.raises(ConfigError, match=r"finetune\.batchnorm: must be one of frozen, train, got 'bogus'"):
        finetune.FinetuneConfig(batchnorm="bogus")
    with pytest.raises(ConfigError, match=r"finetune\.batchnorm"):
        finetune.FinetuneConfig.from_dict({"batchnorm": "bogus"}, "finetune.")


def test_schema_defaults_and_rejects_batchnorm():
    from saeft.config.study import validate_config

    config = validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    assert config["finetune"]["batchnorm"] == "frozen"
    # What workflow/rules/common.smk's method_config hands the finetune command.
    resolved = json.dumps({**config["finetune"], "method": "ft", "method_params": {}, "seed": 0})
    assert finetune.FinetuneConfig.from_json(resolved, "finetune.").to_dict()["batchnorm"] == "frozen"
    config["finetune"]["batchnorm"] = "bogus"
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert "finetune.batchnorm:" in str(info.value)
