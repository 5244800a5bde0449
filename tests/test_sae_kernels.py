"""The SAE's sparse autograd kernels (saeft.sae.kernels) against dense computations: values and
gradients, in float64 (tight tolerances) and float32 (the training dtype), for Top-K codes and
for ragged Batch-Top-K codes with empty rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saeft.sae import SAETrainConfig, TopKSAE, Trainer
from saeft.sae.kernels import (
    SparseCode,
    bag_sum,
    gathered_code,
    latent_order,
    row_dots,
    scatter_rows,
    sparse_decode,
    to_dense,
)
from saeft.sae.train import reconstruction_loss

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def _ragged(batch=9, n=40, seed=0, empty_rows=(2, 7, 8)):
    """A ragged code's layout: 0-6 distinct latents per row, some rows (the last ones too) empty."""
    generator = torch.Generator().manual_seed(seed)
    rows, indices = [], []
    for b in range(batch):
        count = 0 if b in empty_rows else int(torch.randint(1, 7, (), generator=generator))
        rows += [b] * count
        indices += torch.randperm(n, generator=generator)[:count].tolist()
    rows, indices = torch.tensor(rows, dtype=torch.long), torch.tensor(indices, dtype=torch.long)
    offsets = torch.searchsorted(rows, torch.arange(batch))
    return indices, rows, offsets


def _topk(batch=16, n=64, k=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(batch)]).reshape(-1)
    rows = torch.arange(batch).repeat_interleave(k)
    return indices, rows, torch.arange(0, batch * k, k)


LAYOUTS = {"topk": _topk, "ragged": _ragged}


def _dense_matrix(values, indices, rows, batch, n):
    """The (batch, n) matrix of the entries, built by a differentiable dense scatter."""
    return torch.zeros(batch, n, dtype=values.dtype).index_put((rows, indices), values)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_primitives_match_dense_products(layout, dtype):
    indices, rows, offsets = LAYOUTS[layout]()
    batch, n, d = offsets.numel(), int(indices.max()) + 3, 7
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(n, d, generator=generator, dtype=dtype)
    dense = torch.randn(batch, d, generator=generator, dtype=dtype)
    weights = torch.randn(indices.numel(), generator=generator, dtype=dtype)
    S = _dense_matrix(weights, indices, rows, batch, n)
    torch.testing.assert_close(bag_sum(W, weights, indices, offsets, batch), S @ W, **TOL[dtype])
    torch.testing.assert_close(row_dots(dense, W, indices, offsets, rows), (dense @ W.T)[rows, indices], **TOL[dtype])
    order = latent_order(indices, rows, n)
    torch.testing.assert_close(scatter_rows(dense, weights, order), S.T @ dense, **TOL[dtype])
    # The order groups the entries by latent, stably.
    assert torch.equal(indices[order.perm], indices.sort(stable=True).values)
    assert torch.equal(order.starts, torch.searchsorted(indices[order.perm], torch.arange(n)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encode_decode_match_dense_in_value_and_gradient(layout, relu, dtype):
    """The kept entries' encoder (values from a no-grad matmul, sparse backward) and the sparse
    decode, against the dense masked computation: the loss and every gradient."""
    indices, rows, offsets = LAYOUTS[layout]()
    batch, n, d = offsets.numel(), 70, 6
    generator = torch.Generator().manual_seed(2)
    leaves = {
        "z": torch.randn(batch, d, generator=generator, dtype=dtype),
        "b_pre": 0.1 * torch.randn(d, generator=generator, dtype=dtype),
        "W_enc": torch.randn(n, d, generator=generator, dtype=dtype),
        "b_enc": 0.1 * torch.randn(n, generator=generator, dtype=dtype),
        "W_dec": F.normalize(torch.randn(d, n, generator=generator, dtype=dtype), dim=0),
    }
    target = torch.randn(batch, d, generator=generator, dtype=dtype)

    def loss_of(recon, values):
        return (recon - target).pow(2).sum() + values.pow(3).sum()

    sparse = {name: t.clone().requires_grad_() for name, t in leaves.items()}
    with torch.no_grad():
        pre = (sparse["z"] - sparse["b_pre"]) @ sparse["W_enc"].T + sparse["b_enc"]
    code = gathered_code(pre[rows, indices], sparse["z"], sparse["b_pre"], sparse["W_enc"], sparse["b_enc"],
                         indices, rows, offsets, batch, relu)
    assert code.order is not None  # one sort, shared by the encoder's and the decoder's gradient
    recon = sparse_decode(code, sparse["W_dec"]) + sparse["b_pre"]
    loss_of(recon, code.values).backward()

    ref = {name: t.clone().requires_grad_() for name, t in leaves.items()}
    mask = _dense_matrix(torch.ones(indices.numel(), dtype=dtype), indices, rows, batch, n).bool()
    s = torch.where(mask, (ref["z"] - ref["b_pre"]) @ ref["W_enc"].T + ref["b_enc"], torch.zeros((), dtype=dtype))
    if relu:
        s = torch.relu(s)
    recon_ref = s @ ref["W_dec"].T + ref["b_pre"]
    loss_of(recon_ref, s[mask]).backward()

    torch.testing.assert_close(to_dense(code, n), s.detach(), **TOL[dtype])
    torch.testing.assert_close(recon, recon_ref, **TOL[dtype])
    for name in leaves:
        torch.testing.assert_close(sparse[name].grad, ref[name].grad, **TOL[dtype], msg=name)


def test_decode_computes_its_own_order_and_handles_an_empty_code():
    generator = torch.Generator().manual_seed(3)
    indices, rows, offsets = _ragged()
    batch, n, d = offsets.numel(), 40, 5
    values = torch.randn(indices.numel(), generator=generator, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d, n, generator=generator, dtype=torch.float64, requires_grad=True)
    code = SparseCode(values, indices, rows, offsets, batch)  # no order: the decode sorts itself
    grad_out = torch.randn(batch, d, generator=generator, dtype=torch.float64)
    (sparse_decode(code, W) * grad_out).sum().backward()
    S = _dense_matrix(values.detach(), indices, rows, batch, n)
    torch.testing.assert_close(W.grad, (S.T @ grad_out).T)
    torch.testing.assert_close(values.grad, (grad_out @ W.detach())[rows, indices])
    # A Batch-Top-K code may keep nothing at all.
    empty = torch.empty(0, dtype=torch.long)
    nothing = SparseCode(torch.empty(0, dtype=torch.float64, requires_grad=True), empty, empty,
                         torch.zeros(batch, dtype=torch.long), batch)
    W.grad = None
    out = sparse_decode(nothing, W)
    assert out.shape == (batch, d) and not out.any()
    out.sum().backward()
    assert not W.grad.any()


def test_frozen_forward_differentiates_the_input_only():
    """The regulariser's view: gradient reaches the embeddings through the kept values, never
    the SAE, and no latent order is sorted."""
    sae = TopKSAE(8, 48, 4, "none", generator=torch.Generator().manual_seed(4))
    x = torch.randn(5, 8, dtype=torch.float32, requires_grad=True)
    out = sae(x, frozen=True, dense=True)
    assert out.code.order is None
    out.recon.pow(2).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in sae.parameters())
    pre = (x.detach() - sae.b_pre.detach()) @ sae.W_enc.detach().T
    values, indices = pre.topk(4, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    torch.testing.assert_close(out.dense, dense)


def test_layouts_let_the_kernels_work_in_place():
    """The decoder is stored column-major (its columns are the rows embedding_bag reads), the
    encoder row-major; after a step both gradients have their parameter's layout (no copy)."""
    cfg = SAETrainConfig(expansion=4, k=3, warmup_steps=0, encoder_bias=True, relu=True)
    trainer = Trainer("t", cfg, 16, total_steps=5, n_train=64)
    sae = trainer.sae
    assert sae.W_dec.shape == (16, 64) and sae.W_dec.T.is_contiguous() and sae.W_enc.is_contiguous()
    batch = F.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    trainer.step(batch)
    assert sae.W_dec.grad.stride() == sae.W_dec.stride() and sae.W_enc.grad.stride() == sae.W_enc.stride()
    assert sae.W_dec.T.is_contiguous()  # the optimiser and renormalisation keep the layout


def test_the_training_loss_is_the_squared_error_per_row():
    generator = torch.Generator().manual_seed(6)
    batch = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    recon = batch + 0.1 * torch.randn(20, 6, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(reconstruction_loss(recon, batch), (recon - batch).pow(2).sum(dim=1).mean())
