"""Corrupt inputs are caught when the job that reads them starts, with the file and the problem
named: truncated or foreign HDF5 caches, an SAE of another width, a checkpoint missing keys, a
model file that is not safetensors."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
import torch

from saeft import cli
from saeft.nn.training import CHECKPOINT_NAME, resume_checkpoint, save_checkpoint
from saeft.sae import TopKSAE, save_sae
from saeft.stages import cache, finetune


@pytest.fixture(scope="module")
def caches(clip_file, tiny_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("caches")
    for split in ("train", "val"):
        cache.run(clip_file, "shapes", split, tiny_world, cache.CacheConfig(), folder / f"{split}.h5")
    return folder


def _train_sae(caplog, train, heldout, tmp_path):
    caplog.set_level(logging.ERROR)
    return cli.main(["train-sae", "--train", str(train), "--heldout", str(heldout), "--config", '{"epochs": 1}',
                     "--out-weights", str(tmp_path / "sae.safetensors"), "--out-json", str(tmp_path / "sae.json")])


def test_a_truncated_cache_is_named(caches, tmp_path, caplog):
    truncated = tmp_path / "train.h5"
    data = (caches / "train.h5").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    assert _train_sae(caplog, truncated, caches / "val.h5", tmp_path) == 2
    assert f"{truncated}: not a readable HDF5 file" in caplog.text
    assert not (tmp_path / "sae.safetensors").exists()


def test_a_foreign_hdf5_file_is_named(caches, tmp_path, caplog):
    foreign = tmp_path / "features.h5"
    with h5py.File(foreign, "w") as handle:
        handle["features"] = np.zeros((4, 8), dtype="float32")
    assert _train_sae(caplog, foreign, caches / "val.h5", tmp_path) == 2
    assert f"{foreign}: no /embeddings" in caplog.text


def test_an_sae_of_another_width_fails_before_training(clip_file, head_file, tiny_world, caches, tmp_path):
    wrong = tmp_path / "sae64.safetensors"
    save_sae(wrong, TopKSAE(64, 128, 4, generator=torch.Generator().manual_seed(0)))
    cfg = finetune.FinetuneConfig(method="saeft", epochs=1, batch_size=8)
    with pytest.raises(ValueError, match=r"sae64.safetensors: the SAE encodes 64-dim embeddings, but .* embeds into 128 dims"):
        finetune.run(clip_file, head_file, "shapes", tiny_world, cfg, tmp_path / "m.safetensors", tmp_path / "t.json",
                     sae_path=wrong, teacher_cache=caches / "train.h5")
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_a_model_file_that_is_not_safetensors_is_named(tmp_path, caplog):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    caplog.set_level(logging.ERROR)
    code = cli.main(["head", "--model", str(bogus), "--dataset", "shapes", "--out", str(tmp_path / "head.safetensors")])
    assert code == 2 and str(bogus) in caplog.text


def test_a_checkpoint_missing_keys_is_named_and_training_starts_afresh(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"a": 1}, {"model": model}, {})  # no optimizer state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = torch.nn.Linear(3, 2)
    caplog.set_level(logging.WARNING)
    assert resume_checkpoint(path, {"a": 1}, {"model": fresh, "optimizer": optimizer}) is None
    assert f"ignoring checkpoint {path}: it lacks optimizer" in caplog.text
    # A checkpoint of another shape: named, and the parts keep their fresh state.
    save_checkpoint(path, {"a": 1}, {"model": torch.nn.Linear(4, 2)}, {})
    untouched = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert resume_checkpoint(path, {"a": 1}, {"model": fresh}) is None
    assert "it does not fit" in caplog.text
    assert all(torch.equal(untouched[k], fresh.state_dict()[k]) for k in untouched)
    assert not all(torch.equal(before[k], fresh.state_dict()[k]) for k in before)
    # A torn checkpoint file is ignored the same way.
    path.write_bytes(path.read_bytes()[:40])
    assert resume_checkpoint(path, {"a": 1}, {"model": fresh}) is None
    assert f"ignoring unreadable checkpoint {path}" in caplog.text
