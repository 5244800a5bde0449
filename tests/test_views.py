"""Augmented training views: seeded and repeatable, a bank the views cache embeds row for row,
cached and live teachers agreeing on the same views, and resume equality with augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from saeft.config import ConfigError
from saeft.data.registry import get_dataset
from saeft.infra.io import load_tensors
from saeft.nn.embeddings import read_cache
from saeft.nn.models import classifier_from_zeroshot, preprocess_for
from saeft.nn.training import CHECKPOINT_NAME
from saeft.nn.views import TrainingViews, ViewBank, ViewConfig, crop_flip, keep_pil
from saeft.sae import TopKSAE
from saeft.stages import cache, finetune

BANK = ViewConfig(augment="crop_flip", views=3, view_seed=7, crop_scale=0.4)


def _image() -> Image.Image:
    pixels = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    return Image.fromarray(pixels)


def test_a_view_is_fixed_by_its_key_and_leaves_the_global_rng_alone():
    image = _image()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = np.asarray(crop_flip(image, (7, 4, 1), 0.4))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert np.array_equal(a, np.asarray(crop_flip(image, (7, 4, 1), 0.4)))
    others = [np.asarray(crop_flip(image, key, 0.4)) for key in ((7, 4, 2), (7, 5, 1), (8, 4, 1))]
    assert all(not np.array_equal(a, other) for other in others)
    assert a.shape == (32, 32, 3)


def test_view_choice_depends_on_seed_and_epoch_and_stays_in_the_bank(tiny_world):
    images = get_dataset("shapes").load("train", keep_pil, tiny_world)
    views = TrainingViews(images, lambda im: torch.from_numpy(np.asarray(im).copy()), BANK, seed=0)
    epoch0 = [views.view_of(i) for i in range(len(views))]
    views.set_epoch(1)
    epoch1 = [views.view_of(i) for i in range(len(views))]
    assert set(epoch0) | set(epoch1) <= {0, 1, 2} and epoch0 != epoch1
    other_seed = TrainingViews(images, keep_pil, BANK, seed=1)
    assert [other_seed.view_of(i) for i in range(len(views))] != epoch0
    # The item is the bank's row index * views + view.
    bank = ViewBank(images, views.preprocess, BANK)
    image, label, index, view = views[5]
    bank_image, bank_label = bank[index * BANK.views + view]
    assert torch.equal(image, bank_image) and label == bank_label


def test_without_augmentation_views_are_the_evaluation_preprocessing(clip_file, tiny_world):
    from saeft.nn.models import load_clip

    preprocess = preprocess_for(load_clip(clip_file)[0])
    spec = get_dataset("shapes")
    plain = spec.load("train", preprocess, tiny_world)
    views = TrainingViews(spec.load("train", keep_pil, tiny_world), preprocess, ViewConfig(), seed=0)
    image, label, index, view = views[3]
    assert torch.equal(image, plain[3][0]) and (label, index, view) == (plain[3][1], 3, 0)


def test_view_keys_are_validated():
    with pytest.raises(ConfigError, match="finetune.augment"):
        ViewConfig(augment="mixup")
    with pytest.raises(ConfigError, match="finetune.crop_scale"):
        ViewConfig(augment="crop_flip", crop_scale=0.0)
    with pytest.raises(ConfigError, match="finetune.teacher"):
        finetune.FinetuneConfig(method="saeft", teacher="cache", augment="crop_flip", views=0)
    finetune.FinetuneConfig(method="saeft", teacher="cache", augment="crop_flip", views=2)


@pytest.fixture(scope="module")
def views_cache(clip_file, tiny_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "train.views.h5"
    cache.run(clip_file, "shapes", "train", tiny_world, cache.CacheConfig(batch_size=16), path, views=BANK)
    return path


def test_views_cache_holds_every_view_and_cached_and_live_teachers_agree(clip_file, head_file, tiny_world, views_cache):
    embeddings, labels, attrs = read_cache(views_cache)
    spec = get_dataset("shapes")
    images = spec.load(spec.train_split, keep_pil, tiny_world)
    n = len(images)
    assert embeddings.shape[0] == n * BANK.views and attrs["views"] == BANK.views and attrs["augment"] == "crop_flip"
    model = classifier_from_zeroshot(clip_file, head_file)[0]
    dim = model.visual.output_dim
    cached = finetune.read_teacher_cache(views_cache, "shapes", spec.train_split, n, dim, BANK)
    with pytest.raises(ValueError, match="view_seed"):
        finetune.read_teacher_cache(views_cache, "shapes", spec.train_split, n, dim, ViewConfig(augment="crop_flip", views=3, view_seed=8, crop_scale=0.4))
    with pytest.raises(ValueError, match="count"):
        finetune.read_teacher_cache(views_cache, "shapes", spec.train_split, n, dim)

    views = TrainingViews(images, preprocess_for(model.visual), BANK, seed=0)
    views.set_epoch(2)
    items = [views[i] for i in (5, 0, 17, 3, 9, 11)]
    batch = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items])
    rows = torch.tensor([item[2] * BANK.views + item[3] for item in items])
    assert len({item[3] for item in items}) > 1  # the batch mixes views of the bank
    sae = TopKSAE(dim, 2 * dim, 8, generator=torch.Generator().manual_seed(0))
    for method in ("saeft", "feat_mse"):
        model = classifier_from_zeroshot(clip_file, head_file)[0]
        cfg = finetune.FinetuneConfig(method=method, augment="crop_flip", views=3, view_seed=7, crop_scale=0.4)
        live = finetune.build_context(cfg, model, model.visual, sae, live_teacher=True)
        model.train()
        loss_live, _ = finetune.method_loss(live, batch, labels)
        stored = finetune.build_context(cfg, model, model.visual, sae, live_teacher=False)
        loss_cache, _ = finetune.method_loss(stored, batch, labels, cached[rows])
        assert loss_cache.item() == pytest.approx(loss_live.item(), rel=1e-5, abs=1e-6)


def _run(tmp_path, clip_file, head_file, world, name, teacher_cache=None, on_epoch=None, **overrides):
    settings = {"method": "feat_mse", "epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "seed": 0,
                "augment": "crop_flip", "views": 3, "view_seed": 7, "crop_scale": 0.4, **overrides}
    cfg = finetune.FinetuneConfig.from_dict(settings)
    folder = tmp_path / name
    finetune.run(clip_file, head_file, "shapes", world, cfg, folder / "model.safetensors", folder / "train.json",
                 teacher_cache=teacher_cache, on_epoch=on_epoch)
    return folder


def test_augmented_training_from_the_views_cache_resumes_to_the_same_weights(tmp_path, clip_file, head_file, tiny_world, views_cache):
    whole = _run(tmp_path, clip_file, head_file, tiny_world, "whole", teacher_cache=views_cache)
    assert json.loads((whole / "train.json").read_text())["teacher"] == "cache"

    class Killed(Exception):
        pass

    def kill(record):
        if record["epoch"] == 2:  # after the epoch-1 checkpoint, so epoch 2 reruns on resume
            raise Killed

    with pytest.raises(Killed):
        _run(tmp_path, clip_file, head_file, tiny_world, "killed", teacher_cache=views_cache, on_epoch=kill)
    assert (tmp_path / "killed" / CHECKPOINT_NAME).exists()
    _run(tmp_path, clip_file, head_file, tiny_world, "killed", teacher_cache=views_cache)
    wa, wb = (load_tensors(tmp_path / n / "model.safetensors")[0] for n in ("whole", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Augmentation changes what is learnt: the deterministic run ends elsewhere.
    plain = _run(tmp_path, clip_file, head_file, tiny_world, "plain", augment="none", views=0)
    wp = load_tensors(plain / "model.safetensors")[0]
    assert any(not torch.equal(wa[k], wp[k]) for k in wa if k.startswith("visual."))
