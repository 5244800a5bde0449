"""pretrain_clip: deterministic, and a killed run resumes to the same weights."""

from __future__ import annotations

import pytest
import torch

from saeft import pretrain
from saeft.io import load_tensors
from saeft.training import CHECKPOINT_NAME

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


def test_bad_pretrain_config_names_the_key():
    from saeft.config import ConfigError

    with pytest.raises(ConfigError, match="pretrain.steps"):
        pretrain.PretrainConfig(steps=0)
