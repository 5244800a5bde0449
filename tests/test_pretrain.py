"""pretrain_clip: deterministic, and a killed run resumes to the same weights."""

from __future__ import annotations

import pytest
import torch

from saeft.infra.io import load_tensors
from saeft.nn.training import CHECKPOINT_NAME
from saeft.stages import pretrain

ARCH = "saeft-tiny-rn"


class Killed(Exception):
    pass


def test_killed_pretraining_resumes_to_the_same_weights(tiny_world, tmp_path):
    cfg = pretrain.PretrainConfig(steps=6, warmup_steps=2, checkpoint_every=2)
    whole = tmp_path / "whole" / "model.safetensors"
    info = pretrain.run(ARCH, tiny_world, cfg, whole)
    assert info["steps"] == 6 and info["batch_size"] == 40
    assert not (whole.parent / CHECKPOINT_NAME).exists()

    def kill_at_five(step: int) -> None:
        if step == 5:
            raise Killed

    out = tmp_path / "killed" / "model.safetensors"
    with pytest.raises(Killed):
        pretrain.run(ARCH, tiny_world, cfg, out, on_step=kill_at_five)
    assert (out.parent / CHECKPOINT_NAME).exists() and not out.exists()
    pretrain.run(ARCH, tiny_world, cfg, out)
    a, meta = load_tensors(whole)
    b, _ = load_tensors(out)
    assert meta["source"] == "pretrain_clip"
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_hold_every_pair_or_some_domains_of_each_class():
    """Without domains_per_class a batch holds one row of every (class, domain) pair, drawing as
    before; with k, k rows of each class, each of another domain."""
    import numpy as np

    n_classes, n_domains = 3, 4
    groups = [np.arange(10) + 100 * (c * n_domains + d) for c in range(n_classes) for d in range(n_domains)]
    rng, before = np.random.default_rng(5), np.random.default_rng(5)
    assert pretrain.batch_rows(groups, n_domains, None, rng).tolist() == [g[before.integers(len(g))] for g in groups]
    for k in (1, 2):
        rows = pretrain.batch_rows(groups, n_domains, k, np.random.default_rng(k))
        pair = rows // 100
        assert len(rows) == n_classes * k
        for c in range(n_classes):
            domains = pair[pair // n_domains == c] % n_domains
            assert len(domains) == k and len(set(domains.tolist())) == k
        shared = pretrain.batch_rows(groups, n_domains, k, np.random.default_rng(k), shared=True) // 100
        per_class = [sorted((shared[shared // n_domains == c] % n_domains).tolist()) for c in range(n_classes)]
        assert len(shared) == n_classes * k and len(per_class[0]) == k
        assert all(domains == per_class[0] for domains in per_class)  # one set of domains for the batch


def test_fewer_domains_per_class_make_smaller_batches(tiny_world, tmp_path):
    info = pretrain.run(ARCH, tiny_world, pretrain.PretrainConfig(steps=2, warmup_steps=1, domains_per_class=1), tmp_path / "m.safetensors")
    assert info["batch_size"] == 10
    with pytest.raises(ValueError, match="pretrain.domains_per_class: 5 is more than the 4 domains"):
        pretrain.run(ARCH, tiny_world, pretrain.PretrainConfig(steps=2, domains_per_class=5), tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="pretrain.shared_domains: true needs pretrain.domains_per_class"):
        pretrain.run(ARCH, tiny_world, pretrain.PretrainConfig(steps=2, shared_domains=True), tmp_path / "o.safetensors")


def test_bad_pretrain_config_names_the_key():
    from saeft.config import ConfigError

    with pytest.raises(ConfigError, match="pretrain.steps"):
        pretrain.PretrainConfig(steps=0)
    with pytest.raises(ConfigError, match="pretrain.shared_domains: true needs pretrain.domains_per_class"):
        pretrain.PretrainConfig(shared_domains=True)


def test_multi_positive_loss_is_clips_with_one_positive_each_and_counts_every_describing_caption():
    import numpy as np
    import open_clip

    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    clip = open_clip.ClipLoss()(images, texts, scale)
    assert torch.allclose(pretrain.multi_positive_loss(images, texts, scale, torch.eye(6, dtype=torch.bool)), clip, atol=1e-6)
    # A styleless caption describes its class in every domain; a styled one its own pair only.
    labels, domains = np.array([0, 0, 1, 1]), np.array(["photo", "sketch", "photo", "sketch"])
    positives = pretrain.describes(labels, domains, np.array([True, False, False, False]))
    assert positives.tolist() == [[True, False, False, False], [True, True, False, False],
                                  [False, False, True, False], [False, False, False, True]]
    # A caption naming the other class describes that class's images and still its own image.
    confused = pretrain.describes(labels, domains, np.array([False, True, False, False]), named=np.array([0, 1, 1, 1]))
    assert confused.tolist() == [[True, False, False, False], [False, True, False, False],
                                 [False, True, True, False], [False, True, False, True]]
    # More positives for an image lower its loss (the sketch of class 0 now matches "a circle." too).
    logits_ok = pretrain.multi_positive_loss(images[:4], texts[:4], scale, positives)
    assert logits_ok < pretrain.multi_positive_loss(images[:4], texts[:4], scale, torch.eye(4, dtype=torch.bool))


def test_pretraining_with_styleless_captions_and_several_positives_runs(tiny_world, tmp_path):
    import dataclasses

    world = dataclasses.replace(tiny_world, styleless_captions=0.5)
    several = pretrain.run(ARCH, world, pretrain.PretrainConfig(steps=2, warmup_steps=1, multi_positive=True), tmp_path / "m.safetensors")
    one = pretrain.run(ARCH, world, pretrain.PretrainConfig(steps=2, warmup_steps=1), tmp_path / "n.safetensors")
    # Same batches and captions; same-class captions without a style count as positives: a lower loss.
    assert 0 < several["final_loss"] < one["final_loss"]
