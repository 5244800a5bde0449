"""Every fine-tuning method: its loss against a hand computation, a short real run, WiSE-FT ends,
teacher cache against live teacher, LP-FT's converged probe, and resume across the LP-FT phase
change."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from saeft.config import ConfigError
from saeft.data.registry import get_dataset
from saeft.infra.io import load_tensors
from saeft.methods.features import feature_l1, feature_mse
from saeft.methods.flyp import flyp_loss
from saeft.methods.l2sp import l2sp_penalty
from saeft.methods.ldifs import ldifs_distance
from saeft.nn import models
from saeft.nn.loss import Context, build_context, method_loss
from saeft.nn.models import classifier_from_zeroshot, preprocess_for, save_classifier
from saeft.nn.regularizers import sae_penalty
from saeft.nn.training import CHECKPOINT_NAME
from saeft.sae import TopKSAE
from saeft.stages import cache, finetune



class _Killed(Exception):
    """A job killed by the test (raised from an on_epoch hook)."""


def _kill_at_epoch(epoch):
    """An on_epoch hook that kills the run after ``epoch``."""
    def kill(record):
        if record["epoch"] == epoch:
            raise _Killed
    return kill

def test_feature_losses_by_hand():
    f = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    f0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # differences 1, 2, -1, -2: squares 1+4+1+4 = 10, abs 1+2+1+2 = 6, over 4 entries
    assert feature_mse(f, f0).item() == pytest.approx(10 / 4)
    assert feature_l1(f, f0).item() == pytest.approx(6 / 4)


def test_l2sp_by_hand():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    anchors = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert l2sp_penalty(params, anchors).item() == pytest.approx(1 + 4 + 4)


def test_ldifs_by_hand():
    # A (B=1, C=2, H=1, W=2) map: tokens are the 2 positions, features the 2 channels.
    a = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])  # tokens (3, 4) -> (.6, .8) and (1, 0)
    b = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # tokens (1, 0) and (0, 2) -> (0, 1)
    per_token = [(0.6 - 1) ** 2 + 0.8**2, 1 + 1]
    expected_map = sum(per_token) / 2
    # A (B=1, L=1, D=2) transformer tap: features on the last dimension.
    c, d = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 5.0]]])
    got = ldifs_distance([a, c], [b, d]).item()
    assert got == pytest.approx((expected_map + 2.0) / 2)
    assert ldifs_distance([a], [a]).item() == pytest.approx(0.0, abs=1e-7)


def test_flyp_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1])
    scale = torch.tensor(2.0)
    s = 2.0 / math.sqrt(2)
    # image -> classes: row i logits = 2 * cos(image_i, text_c)
    ce_img = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(s))) * 2) / 2
    # class prompt of image i -> images: text[y_i] vs each image, target i
    ce_txt = (-math.log(math.exp(2) / (math.exp(2) + 1)) * 2) / 2
    assert flyp_loss(image, text, labels, scale).item() == pytest.approx(0.5 * (ce_img + ce_txt), rel=1e-6)


class _Toy(nn.Module):
    """features = x W^T; logits = features (two classes, two dims)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.eye(2) * 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x @ self.w.T
        return f, f


@pytest.mark.parametrize("method", ["feat_mse", "feat_l1", "saeft", "sae_sparse", "sae_add"])
def test_method_loss_is_ce_plus_lambda_r(method):
    torch.manual_seed(0)
    model = _Toy()
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    f_0 = x  # the teacher is the identity map
    sae = TopKSAE(2, 4, 2, generator=torch.Generator().manual_seed(0))
    cfg = finetune.FinetuneConfig(method=method, method_params={"lambda": 3.0})
    ctx = Context(cfg=cfg, model=model, sae=sae)
    loss, terms = method_loss(ctx, x, y, f_0)
    f = x * 2
    ce = nn.functional.cross_entropy(f, y)
    r = {"feat_mse": lambda: ((f - x) ** 2).mean(), "feat_l1": lambda: (f - x).abs().mean()}.get(method)
    if r is None:
        p = cfg.method_params
        r = lambda: sae_penalty(f, x, sae, **{k: p.get(k, 0.0) for k in ("lambda_add", "lambda_remove", "lambda_l1", "mu")})["total"]  # noqa: E731
    assert loss.item() == pytest.approx((ce + 3.0 * r()).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(ce.item())


def test_l2sp_method_loss():
    model = _Toy()
    cfg = finetune.FinetuneConfig(method="l2sp", method_params={"lambda": 0.5})
    ctx = Context(cfg=cfg, model=model, state={"anchored": [model.w], "anchors": [torch.eye(2)]})
    x, y = torch.eye(2), torch.tensor([0, 1])
    loss, _ = method_loss(ctx, x, y)
    ce = nn.functional.cross_entropy(torch.eye(2) * 2, y)
    assert loss.item() == pytest.approx(ce.item() + 0.5 * 2.0)  # ||2I - I||^2 = 2


def test_unknown_method_and_missing_sae_fail_early():
    with pytest.raises(ConfigError, match="unknown method 'zeroshot'"):
        finetune.FinetuneConfig(method="zeroshot")
    with pytest.raises(ConfigError, match="methods.ldifs.taps"):
        finetune.FinetuneConfig(method="ldifs", method_params={"taps": []})
    cfg = finetune.FinetuneConfig(method="saeft")
    with pytest.raises(ConfigError, match="needs an SAE"):
        build_context(cfg, _Toy(), _Toy(), None, live_teacher=True)


@pytest.fixture(scope="module")
def train_cache(clip_file, tiny_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "train.h5"
    cache.run(clip_file, "shapes", "train", tiny_world, cache.CacheConfig(), path)
    return path


def test_teacher_cache_and_live_teacher_give_the_same_loss(clip_file, head_file, tiny_world, train_cache):
    model = classifier_from_zeroshot(clip_file, head_file)[0]
    spec = get_dataset("shapes")
    train = spec.load(spec.train_split, preprocess_for(model.visual), tiny_world)
    cached = finetune.read_teacher_cache(train_cache, "shapes", spec.train_split, len(train), model.visual.output_dim)
    index = torch.tensor([5, 0, 17, 3, 9, 11])
    images = torch.stack([train[int(i)][0] for i in index])
    labels = torch.tensor([train[int(i)][1] for i in index])
    sae = TopKSAE(model.visual.output_dim, 2 * model.visual.output_dim, 8, generator=torch.Generator().manual_seed(0))
    for method in ("saeft", "feat_mse"):
        # A fresh model each time (with finetune.batchnorm: train, forwards would move BatchNorm statistics).
        model = classifier_from_zeroshot(clip_file, head_file)[0]
        cfg = finetune.FinetuneConfig(method=method)
        live = build_context(cfg, model, model.visual, sae, live_teacher=True)
        finetune.set_phase(cfg, model, model.visual, 0)  # as in training (BatchNorm frozen by default)
        loss_live, _ = method_loss(live, images, labels)
        stored = build_context(cfg, model, model.visual, sae, live_teacher=False)
        loss_cache, _ = method_loss(stored, images, labels, cached[index])
        assert loss_cache.item() == pytest.approx(loss_live.item(), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="split"):
        finetune.read_teacher_cache(train_cache, "shapes", "val", len(train), model.visual.output_dim)


def _run(tmp_path, clip_file, head_file, world, method, name=None, teacher_cache=None, on_epoch=None, **overrides):
    settings = {"method": method, "epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "seed": 0, **overrides}
    cfg = finetune.FinetuneConfig.from_dict(settings)
    folder = tmp_path / (name or method)
    final = finetune.run(clip_file, head_file, "shapes", world, cfg, folder / "model.safetensors", folder / "train.json",
                         teacher_cache=teacher_cache, on_epoch=on_epoch)
    return folder, final


@pytest.mark.parametrize("method", ["lp", "l2sp", "feat_l1", "ldifs", "flyp"])
def test_each_method_trains(tmp_path, clip_file, head_file, tiny_world, method):
    folder, final = _run(tmp_path, clip_file, head_file, tiny_world, method)
    assert math.isfinite(final["loss"])
    tuned, _ = load_tensors(folder / "model.safetensors")
    zeroshot = classifier_from_zeroshot(clip_file, head_file)[0].state_dict()
    changed = {k for k in tuned if not torch.equal(tuned[k], zeroshot[k])}
    if method == "lp":
        assert changed == {"head.weight"}  # encoder and its BatchNorm statistics frozen
    else:
        assert any(k.startswith("visual.") for k in changed)
    if method == "flyp":
        assert "head.weight" in changed  # rebuilt from the tuned text tower
    if method != "lp" and method != "flyp" and method != "ldifs":
        assert final["reg_total"] > 0
    record = json.loads((folder / "train.json").read_text())
    assert record["seed"] == 0 and record["config"]["method"] == method


def test_feat_mse_trains_from_the_teacher_cache(tmp_path, clip_file, head_file, tiny_world, train_cache):
    folder, final = _run(tmp_path, clip_file, head_file, tiny_world, "feat_mse", teacher_cache=train_cache)
    assert json.loads((folder / "train.json").read_text())["teacher"] == "cache"
    assert final["reg_total"] > 0


def test_lpft_probing_epochs_resume_across_the_phase_change(tmp_path, clip_file, head_file, tiny_world):
    """``probe: epochs`` (the earlier protocol): one head-only epoch inside the schedule, then one
    end-to-end epoch; a run killed between them resumes to the same weights."""
    params = {"method_params": {"probe": "epochs", "lp_epochs": 1}, "epochs": 1}
    whole, _ = _run(tmp_path, clip_file, head_file, tiny_world, "lpft", name="whole", **params)
    record = json.loads((whole / "train.json").read_text())
    assert len(record["history"]) == 2 and record["steps"] == 2 * 5 and record["head_fit"] is None

    with pytest.raises(_Killed):
        _run(tmp_path, clip_file, head_file, tiny_world, "lpft", name="killed", on_epoch=_kill_at_epoch(2), **params)
    # The checkpoint is the probing epoch's (on_epoch runs before the epoch's checkpoint): the head alone moved.
    probed = torch.load(tmp_path / "killed" / CHECKPOINT_NAME, weights_only=True)["model"]
    zeroshot = classifier_from_zeroshot(clip_file, head_file)[0].state_dict()
    assert {k for k in zeroshot if not torch.equal(probed[k], zeroshot[k])} == {"head.weight"}
    _run(tmp_path, clip_file, head_file, tiny_world, "lpft", name="killed", **params)
    wa, wb = (load_tensors(tmp_path / n / "model.safetensors")[0] for n in ("whole", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _zeroshot_train(clip_file, head_file, tiny_world):
    """(zero-shot classifier, its unnormalised embeddings of the training images in the
    evaluation preprocessing, their labels): what the loop hands ``fit_head``."""
    model = classifier_from_zeroshot(clip_file, head_file)[0]
    spec = get_dataset("shapes")
    train = spec.load(spec.train_split, preprocess_for(model.visual), tiny_world)
    with torch.no_grad():
        images = torch.stack([image for image, _ in train])
        labels = torch.tensor([label for _, label in train])
        features = model.visual(images)
    return model, features, labels


def _train_top1(model, features, labels):
    with torch.no_grad():
        return float((model.head(nn.functional.normalize(features, dim=-1)).argmax(-1) == labels).float().mean())


def test_lpft_converged_probe_beats_zero_shot_and_leaves_the_encoder(clip_file, head_file, tiny_world):
    """The ``fit_head`` hook alone (what the loop runs before the first step): the probed head
    scores at least the zero-shot head on the training split, the encoder is untouched, and the
    head keeps the classifier's form (no bias, unit-norm embeddings in)."""
    model, features, labels = _zeroshot_train(clip_file, head_file, tiny_world)
    cfg = finetune.FinetuneConfig(method="lpft")
    assert cfg.params.probe == "converge" and cfg.total_epochs == cfg.epochs
    ctx = build_context(cfg, model, model.visual, None, live_teacher=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zeroshot_top1 = _train_top1(model, features, labels)
    record = ctx.method.fit_head(ctx, model, features, labels)
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"head.weight"}
    assert model.head.bias is None and model.head.weight.shape == before["head.weight"].shape
    assert record["train_top1"] == pytest.approx(_train_top1(model, features, labels))
    assert record["init_train_top1"] == pytest.approx(zeroshot_top1)
    assert record["train_top1"] >= zeroshot_top1 and record["loss"] < record["init_loss"]
    assert record["converged"] == 1.0 and 0 < record["iterations"] < cfg.params.probe_steps


def test_lpft_probe_is_the_regularised_minimum():
    """The fitted head is a stationary point of the stated objective (mean CE on unit-norm
    embeddings + weight_decay / 2 ||W||^2), whatever the start: the problem is strictly convex."""
    from saeft.nn.probe import fit_linear_head

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    fits = [fit_linear_head(x, y, start, 1e-2, 500) for start in (torch.zeros(3, 8), 20 * torch.randn(3, 8, generator=generator))]
    weight = fits[0].weight.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(nn.functional.normalize(x, dim=-1) @ weight.T, y) + 0.5e-2 * weight.square().sum()
    loss.backward()
    assert float(weight.grad.abs().max()) < 1e-4
    torch.testing.assert_close(fits[0].weight, fits[1].weight, atol=1e-3, rtol=0)
    assert fits[0].record["loss"] == pytest.approx(float(loss.detach()))


def test_lpft_converged_probe_run_is_deterministic_and_resumes(tmp_path, clip_file, head_file, tiny_world):
    """``probe: converge`` through ``finetune.run``: finetune.epochs alone (no probing epochs),
    the fit recorded in train.json, the same weights for the same seed, and a run killed after an
    epoch resumes to them with the fit's record from its checkpoint."""
    params = {"epochs": 2}
    runs = [_run(tmp_path, clip_file, head_file, tiny_world, "lpft", name=name, **params)[0] for name in ("a", "b")]
    records = [json.loads((folder / "train.json").read_text()) for folder in runs]
    fit = records[0]["head_fit"]
    assert len(records[0]["history"]) == 2 and records[0]["steps"] == 2 * 5
    assert fit["train_top1"] >= fit["init_train_top1"] and fit["converged"] == 1.0
    assert records[1]["head_fit"] == {**fit, "seconds": records[1]["head_fit"]["seconds"]}
    wa, wb = (load_tensors(folder / "model.safetensors")[0] for folder in runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    with pytest.raises(_Killed):
        _run(tmp_path, clip_file, head_file, tiny_world, "lpft", name="killed", on_epoch=_kill_at_epoch(2), **params)
    _run(tmp_path, clip_file, head_file, tiny_world, "lpft", name="killed", **params)
    resumed = json.loads((tmp_path / "killed" / "train.json").read_text())
    assert resumed["head_fit"] is not None and resumed["head_fit"]["train_top1"] == fit["train_top1"]
    wk = load_tensors(tmp_path / "killed" / "model.safetensors")[0]
    assert all(torch.equal(wa[k], wk[k]) for k in wa)


def test_lpft_probe_keys_are_checked():
    with pytest.raises(ConfigError, match=r"methods\.lpft\.probe: must be one of converge, epochs"):
        finetune.FinetuneConfig(method="lpft", method_params={"probe": "sometimes"})
    with pytest.raises(ConfigError, match=r"methods\.lpft\.probe_weight_decay"):
        finetune.FinetuneConfig(method="lpft", method_params={"probe_weight_decay": 0})
    assert finetune.FinetuneConfig(method="lpft", method_params={"probe": "epochs", "lp_epochs": 3}, epochs=4).total_epochs == 7


def test_wiseft_ends_are_exactly_zeroshot_and_finetuned(tmp_path, clip_file, head_file):
    zeroshot, arch = classifier_from_zeroshot(clip_file, head_file)
    tuned = classifier_from_zeroshot(clip_file, head_file)[0]
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_classifier(tmp_path / "ft.safetensors", tuned, arch, {"method": "ft"})
    at0 = models.load_wiseft(tmp_path / "ft.safetensors", clip_file, head_file, 0.0).state_dict()
    at1 = models.load_wiseft(tmp_path / "ft.safetensors", clip_file, head_file, 1.0).state_dict()
    half = models.load_wiseft(tmp_path / "ft.safetensors", clip_file, head_file, 0.5).state_dict()
    z, t = zeroshot.state_dict(), tuned.state_dict()
    assert all(torch.equal(at0[k], z[k]) for k in z if z[k].is_floating_point())
    assert all(torch.equal(at1[k], t[k]) for k in t)
    assert torch.allclose(half["head.weight"], (z["head.weight"] + t["head.weight"]) / 2)
