"""Multi-process fine-tuning (torch DDP through torchrun, gloo on the CPU) ends with the weights
of one process on the same global batches, and the single-process path is unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeft.infra.io import load_tensors

ROOT = Path(__file__).resolve().parent.parent
ARCH = "saeft-tiny-vit"  # LayerNorm only: without GPUs there is no SyncBatchNorm to match BatchNorm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from saeft.nn.models import create_clip, save_clip
    from saeft.stages.prepare import run_head

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit")
    save_clip(folder / "model.safetensors", create_clip(ARCH).eval(), ARCH, source=None)
    run_head(folder / "model.safetensors", "shapes", folder / "head.safetensors")
    return folder


def _finetune(vit: Path, out: Path, world, *extra: str, **cfg) -> subprocess.CompletedProcess:
    settings = {"method": "l2sp", "method_params": {"lambda": 0.5}, "epochs": 2, "batch_size": 7, "lr": 1e-3,
                "warmup_steps": 2, "seed": 0, **cfg}
    command = [sys.executable, "-m", "saeft.cli", "finetune", "--model", str(vit / "model.safetensors"),
               "--head", str(vit / "head.safetensors"), "--dataset", "shapes",
               "--dataset-options", json.dumps(dataclasses.asdict(world)), "--config", json.dumps(settings),
               "--out-model", str(out / "model.safetensors"), "--out-json", str(out / "train.json"),
               "--threads", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("method", [{}, {"method": "lpft", "method_params": {}}], ids=["l2sp", "lpft"])
def test_two_processes_match_one_on_the_same_global_batch(vit, tmp_path, tiny_world, method):
    # 40 training images, global batch 7: five batches split 3 + 4 between the ranks, so the
    # loss weighting by each rank's share is exercised; l2sp adds a penalty that is no batch mean;
    # lpft fits its head on every rank before the first step (then broadcasts rank 0's).
    _finetune(vit, tmp_path / "one", tiny_world, **method)
    ddp = _finetune(vit, tmp_path / "two", tiny_world, "--nproc", "2", **method)
    assert "launching 2 DDP workers" in ddp.stderr
    assert "DDP rank 0 of 2 (gloo)" in ddp.stderr
    one, _ = load_tensors(tmp_path / "one" / "model.safetensors")
    two, _ = load_tensors(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    start, _ = load_tensors(vit / "model.safetensors")
    moved = max(float((one[k] - start[k]).abs().max()) for k in one if k in start and k.startswith("visual."))
    assert moved > 1e-3  # training changed the weights, so agreement below means something
    for key in one:
        a, b = one[key], two[key]
        if key.endswith("attn.in_proj_bias"):
            # The key bias of attention has a zero gradient in exact arithmetic (softmax ignores
            # a shift), so its gradient is rounding noise that AdamW's normalised step turns into
            # steps of up to lr: only there may the order of summation show, bounded by lr * steps.
            width = a.numel() // 3
            torch.testing.assert_close(b[width:2 * width], a[width:2 * width], rtol=0, atol=1e-3 * 10, msg=key)
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)
    r1, r2 = (json.loads((tmp_path / run / "train.json").read_text()) for run in ("one", "two"))
    h1, h2 = r1["history"], r2["history"]
    assert (r1["head_fit"] is None) == (r2["head_fit"] is None) == (method.get("method") != "lpft")
    if r1["head_fit"] is not None:  # the same probe: the whole split on every rank, whatever the world
        assert r2["head_fit"]["loss"] == pytest.approx(r1["head_fit"]["loss"], rel=1e-5)
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)  # losses are of the global batch
    assert not (tmp_path / "two" / "checkpoint.pt").exists()


def test_rank_share_splits_each_global_batch_in_order():
    from saeft.nn.distributed import RankShare

    batches = [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]]
    shares = [list(RankShare(batches, rank, 2)) for rank in range(2)]
    assert shares[0] == [[0, 1, 2], [7]] and shares[1] == [[3, 4, 5, 6], [8, 9]]
    assert len(RankShare(batches, 0, 2)) == 2


def test_sync_batchnorm_is_undone_with_its_state_before_saving():
    from torch import nn

    from saeft.nn.distributed import without_sync_batchnorm

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    plain.train()(torch.randn(2, 3, 8, 8))  # running statistics that are not the defaults
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(plain)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 2
    state = {k: v.clone() for k, v in synced.state_dict().items()}
    restored = without_sync_batchnorm(synced)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in restored.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in restored.modules()) == 2
    assert all(torch.equal(state[k], v) for k, v in restored.state_dict().items())
