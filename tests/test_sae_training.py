"""Tests for SAE training as practitioners expect it (saeft.sae, issue #3), CPU only."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import saeft.sae.train as sae_train
from saeft.config import ConfigError
from saeft.infra.io import save_tensors
from saeft.nn.regularizers import sae_penalty
from saeft.sae import (
    ChunkBatches,
    SAETrainConfig,
    TopKSAE,
    Trainer,
    load_sae,
    run,
    run_sweep,
    sweep_configs,
    to_dense,
    topk_encode,
    train_sae,
)
from saeft.nn.training import CHECKPOINT_NAME


def _write_cache(path, embeddings: np.ndarray, labels: np.ndarray | None = None, chunk_rows=64):
    with h5py.File(path, "w") as handle:
        handle.create_dataset(
            "embeddings", data=embeddings.astype(np.float32), chunks=(chunk_rows, embeddings.shape[1])
        )
        if labels is None:
            labels = np.zeros(len(embeddings), dtype=np.int64)
        handle.create_dataset("labels", data=labels.astype(np.int64))


def _sparse_data(n, d=16, n_true=48, active=3, seed=0):
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_true, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = np.zeros((n, n_true))
    for row in range(n):
        codes[row, rng.choice(n_true, active, replace=False)] = rng.uniform(0.5, 2.0, active)
    return codes @ directions + 0.01 * rng.standard_normal((n, d))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    data = _sparse_data(1200, seed=5)
    labels = (data[:, 0] > 0).astype(np.int64)
    _write_cache(root / "train.h5", data[:1000], labels[:1000])
    _write_cache(root / "heldout.h5", data[1000:], labels[1000:])
    return root / "train.h5", root / "heldout.h5"


FAST = dict(expansion=2, k=4, epochs=3, batch_size=100, lr=1e-2, warmup_steps=5, seed=1)


def _random_sae(arch="topk", relu=False, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    sae = TopKSAE(16, 96, 5, "none", architecture=arch, relu=relu, generator=generator).to(dtype)
    with torch.no_grad():
        sae.b_pre.copy_(0.1 * torch.randn(16, generator=generator))
        sae.b_enc.copy_(0.1 * torch.randn(96, generator=generator))
        sae.W_enc.add_(0.2 * torch.randn(96, 16, generator=generator))
    return sae


@pytest.mark.parametrize("arch, relu", [("topk", False), ("topk", True), ("batchtopk", False)])
def test_sparse_and_dense_decode_agree_in_value_and_gradient(arch, relu):
    sae = _random_sae(arch, relu).train()
    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    z_sparse = z.clone().requires_grad_()
    code = sae.encode_sparse(z_sparse)
    out_sparse = sae.decode_sparse(code)
    # Losses averaged over the batch keep float32 gradients O(1), where 1e-5 is meaningful.
    (out_sparse.pow(2).mean() + code.values.sum() / 32).backward()
    grads_sparse = [p.grad.clone() for p in sae.parameters()] + [z_sparse.grad.clone()]
    sae.zero_grad()
    # Dense reference: the full pre-activation matmul, masked to the same selection.
    z_dense = z.clone().requires_grad_()
    pre = (z_dense - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[code.rows, code.indices] = True
    s = torch.where(mask, pre, torch.zeros_like(pre))
    if relu:
        s = torch.relu(s)
    out_dense = s @ sae.W_dec.T + sae.b_pre
    (out_dense.pow(2).mean() + s.sum() / 32).backward()
    grads_dense = [p.grad.clone() for p in sae.parameters()] + [z_dense.grad.clone()]
    torch.testing.assert_close(out_sparse, out_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(to_dense(code, 96), s.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_regularizer_matches_dense_reference_in_value_and_gradient():
    generator = torch.Generator().manual_seed(3)
    sae = TopKSAE(16, 64, 4, "l2", generator=generator)
    with torch.no_grad():
        sae.b_pre.copy_(0.05 * torch.randn(16, generator=generator))
    f_0 = torch.randn(8, 16, generator=generator)
    f_theta = (f_0 + 0.5 * torch.randn(8, 16, generator=generator)).requires_grad_()
    weights = dict(lambda_add=2.0, lambda_remove=3.0, lambda_l1=5.0, mu=7.0)
    terms = sae_penalty(f_theta, f_0, sae, **weights)
    terms["total"].backward()
    grad = f_theta.grad.clone()
    f_theta.grad = None
    # Dense: topk_encode + a dense decode, as before the sparse path existed.
    W_enc, W_dec, b_pre = sae.W_enc.detach(), sae.W_dec.detach(), sae.b_pre.detach()
    z_t = sae.prepare(f_theta)
    z_0 = sae.prepare(f_0)
    s_t = topk_encode(z_t, W_enc, b_pre, 4)
    s_0 = topk_encode(z_0, W_enc, b_pre, 4)
    m = (s_0 != 0).float()
    delta = s_t - s_0
    r = (z_t - z_0) - delta @ W_dec.T
    dense = {
        "add": 2.0 * ((1 - m) * s_t.abs()).mean(),
        "remove": 3.0 * (m * torch.relu(s_0 - s_t)).mean(),
        "l1": 5.0 * delta.abs().mean(),
        "align": 7.0 * r.pow(2).mean(),
    }
    sum(dense.values()).backward()
    for name, value in dense.items():
        torch.testing.assert_close(terms[name], value, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, f_theta.grad, atol=1e-5, rtol=1e-5)


def test_decoder_columns_stay_unit_norm_after_steps():
    cfg = SAETrainConfig(expansion=4, k=3, lr=5e-2, encoder_bias=True, warmup_steps=0, dead_after=8)
    trainer = Trainer("t", cfg, 16, total_steps=20, n_train=64)
    data = torch.from_numpy(_sparse_data(640)).float()
    for batch in data.split(32):
        trainer.step(batch)
        torch.testing.assert_close(trainer.sae.W_dec.norm(dim=0), torch.ones(64))
    assert trainer.sae.b_enc.abs().sum() > 0  # the encoder bias is learned when asked for
    frozen = Trainer("f", SAETrainConfig(expansion=4, k=3), 16, total_steps=2, n_train=64)
    frozen.step(data[:32])
    assert (frozen.sae.b_enc == 0).all()


def _dead_run(auxk_alpha: float) -> float:
    """A constructed case: latents 24.. carry a fixed encoder bias of -5 (``encoder_bias`` off),
    so Top-K never selects them and, without AuxK, they get no gradient and stay dead.
    Returns the fraction of them that fire on the data after training."""
    data = torch.from_numpy(_sparse_data(4096, d=8, n_true=16, seed=2)).float()
    cfg = SAETrainConfig(
        expansion=4, k=2, normalize="none", lr=2e-2, warmup_steps=0, lr_decay="none",
        auxk_alpha=auxk_alpha, aux_k=4, dead_after=64, seed=0,
    )
    trainer = Trainer("dead", cfg, 8, total_steps=10**6, n_train=10**6)
    with torch.no_grad():
        trainer.sae.b_pre.copy_(data.mean(dim=0))
        trainer.sae.b_enc[24:] = -5.0
    for _ in range(2):
        for batch in data.split(64):
            trainer.step(batch)
    trainer.sae.eval()
    with torch.no_grad():
        code = trainer.sae.encode_sparse(data)
    fired = torch.zeros(32, dtype=torch.bool)
    fired[code.indices] = True
    return fired[24:].float().mean().item()


def test_auxk_revives_latents_a_plain_run_leaves_dead():
    alive_without = _dead_run(0.0)
    alive_with = _dead_run(1.0)
    assert alive_without == 0.0
    assert alive_with >= 0.5


def test_batchtopk_is_batch_independent_at_inference(caches):
    sae, metrics = train_sae(*caches, SAETrainConfig(**{**FAST, "architecture": "batchtopk"}))
    assert sae.threshold.item() > 0
    z = sae.prepare(torch.from_numpy(_sparse_data(50, seed=9)).float())
    together = sae.encode(z)
    alone = torch.cat([sae.encode(z[i : i + 1]) for i in range(50)])
    shuffled = sae.encode(z.flip(0)).flip(0)
    # Same latents selected; values equal up to the matmul's batch-size-dependent rounding.
    for other in (alone, shuffled):
        assert torch.equal(together != 0, other != 0)
        torch.testing.assert_close(together, other, atol=1e-6, rtol=1e-6)
    assert 1.0 <= metrics["l0"] <= 3 * FAST["k"]
    # In training the batch shares k x B activations.
    sae.train()
    with torch.no_grad():
        code = sae.encode_sparse(z)
    assert code.values.numel() == FAST["k"] * 50


def test_resume_gives_identical_weights(tmp_path, caches, monkeypatch):
    cfg = SAETrainConfig(**FAST)
    ref_w, ref_j = tmp_path / "ref" / "sae.safetensors", tmp_path / "ref" / "sae.json"
    run(*caches, ref_w, ref_j, cfg)
    out_w, out_j = tmp_path / "out" / "sae.safetensors", tmp_path / "out" / "sae.json"
    real_save = sae_train.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(sae_train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(*caches, out_w, out_j, cfg)
    assert (out_w.parent / CHECKPOINT_NAME).exists() and not out_w.exists()
    monkeypatch.setattr(sae_train, "save_checkpoint", real_save)
    run(*caches, out_w, out_j, cfg)
    ref, resumed = load_sae(ref_w), load_sae(out_w)
    for name in ("b_pre", "W_enc", "W_dec", "b_enc", "threshold"):
        assert torch.equal(getattr(ref, name), getattr(resumed, name)), name
    # The checkpoint lived beside the outputs and is gone once they exist.
    assert sorted(p.name for p in out_w.parent.iterdir()) == ["sae.json", "sae.safetensors"]


def test_sweep_writes_one_sae_per_entry(tmp_path, caches):
    section = {
        **FAST,
        "sweep": [
            {"name": "k2", "k": 2},
            {"name": "btk_x3", "architecture": "batchtopk", "expansion": 3},
            {"name": "bs50", "batch_size": 50, "epochs": 1},  # another pass: other batches
        ],
    }
    cfgs = sweep_configs(section)
    assert list(cfgs) == ["k2", "btk_x3", "bs50"]
    metrics = run_sweep(*caches, tmp_path, cfgs)
    for name, (k, n_features, arch) in {
        "k2": (2, 32, "topk"), "btk_x3": (4, 48, "batchtopk"), "bs50": (4, 32, "topk")
    }.items():
        sae = load_sae(tmp_path / name / "sae.safetensors")
        assert (sae.k, sae.n_features, sae.architecture) == (k, n_features, arch)
        written = json.loads((tmp_path / name / "sae.json").read_text())
        assert written["config"] == cfgs[name].to_dict()
        assert written["metrics"]["fvu"] == pytest.approx(metrics[f"{name}.fvu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bs50", "btk_x3", "k2"]
    # Members of one pass train exactly as they would alone.
    alone, _ = train_sae(*caches, cfgs["k2"])
    assert torch.equal(alone.W_dec, load_sae(tmp_path / "k2" / "sae.safetensors").W_dec)


@pytest.mark.parametrize(
    "entry, key",
    [({"k": 2}, r"sae\.sweep\.0\.name"), ({"name": "A b"}, r"sae\.sweep\.0\.name"),
     ({"name": "a", "k": 0}, r"sae\.sweep\.0\.k")],
)
def test_sweep_entries_are_validated(entry, key):
    with pytest.raises(ConfigError, match=key):
        sweep_configs({"sweep": [entry]})


def test_heldout_metrics_and_zeroshot_of_reconstructions(tmp_path, caches):
    head = torch.zeros(2, 16)
    head[1, 0], head[0, 0] = 10.0, -10.0  # class 1 iff the first coordinate is positive
    save_tensors(tmp_path / "head.safetensors", {"weight": head})
    cfg = SAETrainConfig(**{**FAST, "normalize": "none"})
    metrics = run(*caches, tmp_path / "sae.safetensors", tmp_path / "sae.json", cfg,
                  head=tmp_path / "head.safetensors")
    assert metrics["zeroshot_acc"] == 1.0
    assert 0.5 < metrics["zeroshot_acc_recon"] <= 1.0
    assert metrics["zeroshot_acc_kept"] == pytest.approx(metrics["zeroshot_acc_recon"])
    assert metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"])
    assert 0.0 <= metrics["dense_fraction"] <= 1.0 and 0.0 <= metrics["dead_fraction"] < 1.0
    written = json.loads((tmp_path / "sae.json").read_text())
    assert written["normalize"] == "none" and written["architecture"] == "topk"


def test_chunk_batches_cover_every_row_once(caches):
    batches = ChunkBatches(caches[0], batch_size=96, buffer_rows=128)
    generator = torch.Generator().manual_seed(0)
    try:
        rows = torch.cat(list(batches.epoch(generator)))
        sizes = [len(b) for b in batches.epoch(generator)]
        ordered = torch.cat(list(batches.epoch(None, shuffle=False)))
    finally:
        batches.close()
    expected = torch.from_numpy(h5py.File(caches[0], "r")["embeddings"][...])
    assert torch.equal(ordered, expected)
    assert not torch.equal(rows, expected)
    assert torch.equal(rows.sort(dim=0).values, expected.sort(dim=0).values)
    assert sizes[:-1] == [96] * (len(sizes) - 1) and sum(sizes) == 1000

    # Fewer rows than a batch: one batch of them all, no empty one (a 10-class subset's SAE).
    small = ChunkBatches(caches[0], batch_size=4096, buffer_rows=8192)
    try:
        assert [len(b) for b in small.epoch(generator)] == [1000]
    finally:
        small.close()


def test_old_sae_files_keep_loading(tmp_path):
    sae = TopKSAE(4, 8, 2, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "old.safetensors"
    save_tensors(path, {"b_pre": sae.b_pre, "W_enc": sae.W_enc, "W_dec": sae.W_dec},
                 {"d": 4, "n_features": 8, "k": 2, "normalize": "l2"})
    loaded = load_sae(path)
    assert (loaded.architecture, loaded.relu) == ("topk", False)
    assert (loaded.b_enc == 0).all()
    z = torch.randn(3, 4)
    torch.testing.assert_close(loaded(z).recon, sae(z).recon)


@pytest.mark.parametrize(
    "key, value",
    [("architecture", "jumprelu"), ("b_pre_init", "max"), ("lr_decay", "step"),
     ("auxk_alpha", -1.0), ("aux_k", -1), ("dead_after", -1), ("warmup_steps", -1),
     ("shuffle_buffer", 0), ("weight_decay", -0.1)],
)
def test_new_config_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=rf"sae\.{key}"):
        SAETrainConfig(**{key: value})


def test_geometric_median_init(caches):
    sae, metrics = train_sae(*caches, SAETrainConfig(**{**FAST, "b_pre_init": "median", "epochs": 1}))
    assert metrics["fvu"] < 1.0
    assert sae.b_pre.abs().sum() > 0


def test_cli_trains_a_sweep_and_refuses_an_empty_one(tmp_path, caches):
    from saeft import cli

    section = {**FAST, "epochs": 1, "sweep": [{"name": "a", "k": 2}, {"name": "b", "k": 3}]}
    argv = ["train-sae-sweep", "--train", str(caches[0]), "--heldout", str(caches[1]),
            "--config", json.dumps(section), "--out-dir", str(tmp_path / "sweep")]
    assert cli.main(argv) == 0
    assert [load_sae(tmp_path / "sweep" / n / "sae.safetensors").k for n in "ab"] == [2, 3]
    empty = {**FAST, "sweep": []}
    assert cli.main(argv[:5] + ["--config", json.dumps(empty), "--out-dir", str(tmp_path / "e")]) == 2


def test_regularizer_uses_the_batchtopk_threshold_and_stays_batch_independent():
    sae = _random_sae("batchtopk").eval()
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    f_0 = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    f_theta = (f_0 + 0.3 * torch.randn(6, 16, generator=torch.Generator().manual_seed(5))).requires_grad_()
    terms = sae_penalty(f_theta, f_0, sae, lambda_add=1.0, lambda_remove=1.0, mu=1.0)
    terms["total"].backward()
    assert f_theta.grad.abs().sum() > 0 and all(p.grad is None for p in sae.parameters())
    # Per-row terms do not depend on the batch: the sum over single rows is the batch total.
    rows = [sae_penalty(f_theta[i : i + 1].detach(), f_0[i : i + 1], sae, lambda_add=1.0)["add"]
            for i in range(6)]
    torch.testing.assert_close(torch.stack(rows).mean(), terms["add"], atol=1e-6, rtol=1e-5)
    assert sae.threshold.item() == pytest.approx(0.3, abs=0, rel=1e-7)  # inference never moves it
