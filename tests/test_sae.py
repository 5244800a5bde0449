"""Tests for the Top-K SAE (saeft.sae), CPU only."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
import torch

from saeft.config import ConfigError
from saeft.infra.io import save_tensors
from saeft.sae import (
    SAETrainConfig,
    TopKSAE,
    Trainer,
    load_sae,
    read_embeddings,
    run,
    save_sae,
    to_dense,
    train_sae,
)
from saeft.sae.model import ENCODER_INIT_NORM


def _write_cache(path, embeddings: np.ndarray) -> None:
    """A minimal activation cache in the layout of docs/stages.md."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("embeddings", data=embeddings.astype(np.float32))
        handle.create_dataset("labels", data=np.zeros(len(embeddings), dtype=np.int64))
        handle.attrs["dim"] = embeddings.shape[1]
        handle.attrs["count"] = embeddings.shape[0]


def _sparse_data(n: int, d: int = 16, n_true: int = 64, active: int = 3, seed: int = 0):
    """Points that are sparse non-negative combinations of ``n_true`` unit directions."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_true, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = np.zeros((n, n_true))
    for row in range(n):
        idx = rng.choice(n_true, size=active, replace=False)
        codes[row, idx] = rng.uniform(0.5, 2.0, size=active)
    return codes @ directions


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    data = _sparse_data(2500)
    train, heldout = folder / "train.h5", folder / "heldout.h5"
    _write_cache(train, data[:2000])
    _write_cache(heldout, data[2000:])
    return train, heldout


FAST = dict(expansion=4, k=6, epochs=8, batch_size=128, lr=1e-2, seed=3)


@pytest.fixture(scope="module")
def trained(caches):
    return train_sae(*caches, SAETrainConfig(**FAST))


def test_encode_keeps_exact_top_k():
    torch.manual_seed(0)
    sae = TopKSAE(8, 20, 3, normalize="none")
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.W_enc.normal_()
    z = torch.randn(5, 8)
    s = sae.encode(z)
    assert s.shape == (5, 20)
    assert ((s != 0).sum(dim=1) == 3).all()
    pre = (z - sae.b_pre) @ sae.W_enc.T
    for row in range(5):
        top = sorted(range(20), key=lambda j: -pre[row, j].item())[:3]
        assert set(torch.nonzero(s[row]).flatten().tolist()) == set(top)
        torch.testing.assert_close(s[row, top], pre[row, top])
    # Signed values, no ReLU: all-negative pre-activations still give k non-zeros.
    eye = TopKSAE(3, 3, 2, normalize="none")
    with torch.no_grad():
        eye.W_enc.copy_(torch.eye(3))
    neg = eye.encode(torch.tensor([[-1.0, -3.0, -2.0]]))
    torch.testing.assert_close(neg, torch.tensor([[-1.0, 0.0, -2.0]]))


def test_decode_and_forward():
    torch.manual_seed(1)
    sae = TopKSAE(6, 12, 2, normalize="none")
    with torch.no_grad():
        sae.b_pre.normal_()
    s = torch.randn(4, 12)
    torch.testing.assert_close(sae.decode(s), s @ sae.W_dec.T + sae.b_pre)
    z = torch.randn(4, 6)
    out = sae(z, dense=True)
    torch.testing.assert_close(out.dense, sae.encode(z))
    torch.testing.assert_close(out.recon, sae.decode(out.dense))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_forward_contract(architecture):
    """One pass gives the rows, the code (sparse and dense) and the reconstruction, consistent
    with each other; raw and prepared inputs agree where the SAE does not normalise."""
    g = torch.Generator().manual_seed(4)
    sae = TopKSAE(6, 12, 3, normalize="none", architecture=architecture, relu=True, generator=g)
    with torch.no_grad():
        sae.b_pre.normal_(generator=g)
        sae.b_enc.normal_(generator=g)
        sae.threshold.fill_(0.1)
    sae.eval()
    x = torch.randn(2, 5, 6, generator=g)
    out = sae(x, dense=True)
    assert out.z.shape == (10, 6) and out.dense.shape == (10, 12) and out.recon.shape == (10, 6)
    assert torch.equal(out.z, x.reshape(-1, 6))
    torch.testing.assert_close(out.dense, to_dense(out.code, sae.n_features))
    torch.testing.assert_close(out.decoded, out.dense @ sae.W_dec.T)
    torch.testing.assert_close(out.recon, sae.decode(out.dense))
    assert sae(x).dense is None
    raw = sae(x, prepare=True, dense=True)
    for name in ("z", "decoded", "recon", "dense"):
        assert torch.equal(getattr(raw, name), getattr(out, name))


def test_forward_contract_prepares_and_freezes():
    g = torch.Generator().manual_seed(5)
    sae = TopKSAE(6, 12, 3, normalize="l2", generator=g)
    x = (3 * torch.randn(4, 6, generator=g)).requires_grad_(True)
    out = sae(x, prepare=True, frozen=True, dense=True)
    torch.testing.assert_close(out.z, sae.prepare(x))
    torch.testing.assert_close(out.dense, sae.encode(sae.prepare(x)))
    (out.recon.sum() + out.dense.sum()).backward()
    assert x.grad is not None
    assert all(p.grad is None for p in sae.parameters())
    with pytest.raises(ValueError, match="expected"):
        sae(torch.randn(4, 5))


def test_init_and_prepare():
    sae = TopKSAE(5, 10, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(10))
    # Tied: each encoder row is its decoder column, scaled to ENCODER_INIT_NORM.
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T * ENCODER_INIT_NORM)
    torch.testing.assert_close(sae.W_enc.norm(dim=1), torch.full((10,), ENCODER_INIT_NORM))
    assert (sae.b_pre == 0).all()
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(sae.prepare(x), x / 5)
    assert TopKSAE(5, 10, 2, normalize="none").prepare(x) is x


def test_trainer_honours_the_encoder_init_norm():
    cfg = SAETrainConfig(expansion=2, k=2, encoder_init_norm=3**-0.5)
    sae = Trainer("t", cfg, 8, total_steps=1, n_train=16, device=torch.device("cpu")).sae
    torch.testing.assert_close(sae.W_enc.norm(dim=1), torch.full((16,), 3**-0.5))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T * 3**-0.5)
    with pytest.raises(ConfigError, match="encoder_init_norm"):
        SAETrainConfig(encoder_init_norm=0.0)


@pytest.mark.parametrize(
    "args, match",
    [((0, 4, 1), "d"), ((4, 0, 1), "n_features"), ((4, 4, 0), "k"), ((4, 4, 5), "k")],
)
def test_sae_rejects_bad_args(args, match):
    with pytest.raises(ValueError, match=match):
        TopKSAE(*args)
    with pytest.raises(ValueError, match="normalize"):
        TopKSAE(4, 8, 2, normalize="l1")


def test_parallel_grad_removed():
    sae = TopKSAE(4, 6, 2, generator=torch.Generator().manual_seed(0))
    sae.W_dec.grad = torch.randn(4, 6)
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close(
        (sae.W_dec.grad * sae.W_dec).sum(dim=0), torch.zeros(6), atol=1e-6, rtol=0
    )


def test_training_reduces_fvu(trained):
    sae, metrics = trained
    assert metrics["fvu"] < 0.3
    assert metrics["train_fvu"] < 0.3
    assert metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"])
    assert metrics["l0"] == pytest.approx(6)
    assert 0.0 <= metrics["dead_fraction"] < 1.0
    assert (metrics["n_train"], metrics["n_heldout"]) == (2000, 500)
    assert (metrics["d"], metrics["n_features"]) == (16, 64)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(64))


def test_training_is_deterministic(caches, trained):
    sae_b, metrics_b = train_sae(*caches, SAETrainConfig(**FAST))
    sae_a, metrics_a = trained
    for name in ("b_pre", "W_enc", "W_dec"):
        assert torch.equal(getattr(sae_a, name), getattr(sae_b, name))
    assert metrics_a == metrics_b


def test_training_logs_per_epoch(caches, caplog):
    with caplog.at_level(logging.INFO, logger="saeft.sae"):
        train_sae(*caches, SAETrainConfig(**{**FAST, "epochs": 2}))
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch")]
    assert len(epoch_lines) == 2
    assert "loss=" in epoch_lines[0] and "fvu=" in epoch_lines[0]


def test_save_load_round_trip(tmp_path, trained):
    sae, _ = trained
    path = tmp_path / "sae.safetensors"
    save_sae(path, sae, {"note": "x"})
    loaded = load_sae(path)
    assert (loaded.d, loaded.n_features, loaded.k, loaded.normalize) == (16, 64, 6, "l2")
    assert not any(p.requires_grad for p in loaded.parameters())
    z = sae.prepare(torch.randn(7, 16))
    a, b = sae(z, dense=True), loaded(z, dense=True)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.dense, b.dense)
    with pytest.raises(ValueError, match="must not set"):
        save_sae(path, sae, {"k": 3})


def test_load_rejects_wrong_file(tmp_path):
    wrong_keys = tmp_path / "wrong_keys.safetensors"
    save_tensors(wrong_keys, {"W": torch.zeros(2, 2)}, {"d": 2, "n_features": 2, "k": 1})
    with pytest.raises(ValueError, match="wrong_keys.safetensors"):
        load_sae(wrong_keys)
    sae = TopKSAE(4, 8, 2)
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_tensors(
        wrong_shape,
        {"b_pre": sae.b_pre, "W_enc": sae.W_enc, "W_dec": sae.W_dec},
        {"d": 4, "n_features": 6, "k": 2, "normalize": "l2"},
    )
    with pytest.raises(ValueError, match="wrong_shape.safetensors.*W_enc"):
        load_sae(wrong_shape)


@pytest.mark.parametrize(
    "key, value",
    [
        ("k", 0),
        ("expansion", 0),
        ("normalize", "l1"),
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("seed", -1),
    ],
)
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError, match=rf"sae\.{key}"):
        SAETrainConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"sae\.{key}"):
        SAETrainConfig.from_dict({key: value}, where="sae.")


def test_config_defaults_and_unknown_key():
    cfg = SAETrainConfig()
    assert (cfg.expansion, cfg.k, cfg.normalize, cfg.epochs) == (4, 32, "l2", 20)
    with pytest.raises(ConfigError, match="sae.kk"):
        SAETrainConfig.from_dict({"kk": 3}, where="sae.")


def test_k_larger_than_dictionary_names_key(caches):
    with pytest.raises(ConfigError, match=r"sae\.k"):
        train_sae(*caches, SAETrainConfig(expansion=1, k=17, epochs=1))


def test_read_embeddings_validates(tmp_path):
    good = tmp_path / "good.h5"
    _write_cache(good, np.arange(6.0).reshape(3, 2))
    out = read_embeddings(good)
    assert out.dtype == torch.float32 and out.shape == (3, 2)
    missing = tmp_path / "missing.h5"
    with h5py.File(missing, "w") as handle:
        handle.create_dataset("labels", data=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="missing.h5"):
        read_embeddings(missing)
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as handle:
        handle.create_dataset("embeddings", data=np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="flat.h5.*2-D"):
        read_embeddings(flat)


def test_run_writes_outputs(tmp_path):
    data = _sparse_data(300, d=8, n_true=16, seed=1)
    train, heldout = tmp_path / "train.h5", tmp_path / "heldout.h5"
    _write_cache(train, data[:250])
    _write_cache(heldout, data[250:])
    weights, report = tmp_path / "out" / "sae.safetensors", tmp_path / "out" / "sae.json"
    cfg = SAETrainConfig(expansion=2, k=3, epochs=2, batch_size=64, normalize="none")
    metrics = run(train, heldout, weights, report, cfg)
    written = json.loads(report.read_text())
    assert written["config"] == cfg.to_dict()
    assert (written["d"], written["n_features"], written["k"]) == (8, 16, 3)
    assert written["normalize"] == "none"
    assert written["metrics"] == pytest.approx(metrics)
    assert set(metrics) >= {"fvu", "explained_variance", "l0", "dead_fraction", "mse", "train_fvu"}
    assert written["train_cache"] == str(train)
    assert load_sae(weights).normalize == "none"
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in weights.parent.iterdir()) == ["sae.json", "sae.safetensors"]
