"""Tests for the SAE regularizers (saeft.nn.regularizers), against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from saeft.nn.regularizers import sae_penalty
from saeft.sae import TopKSAE

SQRT2 = math.sqrt(2.0)
WEIGHTS = dict(lambda_add=2.0, lambda_remove=3.0, lambda_l1=5.0, mu=7.0)


def _hand_sae(normalize: str = "none") -> TopKSAE:
    """d=3, 4 features: the three axes and (1, 1, 0)/sqrt(2); tied encoder, b_pre = 0."""
    sae = TopKSAE(3, 4, 2, normalize=normalize)
    W_dec = torch.tensor(
        [[1.0, 0.0, 0.0, 1 / SQRT2], [0.0, 1.0, 0.0, 1 / SQRT2], [0.0, 0.0, 1.0, 0.0]]
    )
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_pre.zero_()
    return sae


def _reference(f_theta, f_0, sae, lambda_add, lambda_remove, lambda_l1, mu):
    """Plain-Python loops over the definitions in docs/methods.md (no torch.topk)."""
    W_enc, W_dec, b = sae.W_enc.tolist(), sae.W_dec.tolist(), sae.b_pre.tolist()
    d, n, k = sae.d, sae.n_features, sae.k

    def prep(row):
        if sae.normalize == "l2":
            norm = math.sqrt(sum(v * v for v in row))
            return [v / norm for v in row]
        return list(row)

    def encode(z):
        pre = [sum(W_enc[j][i] * (z[i] - b[i]) for i in range(d)) for j in range(n)]
        keep = sorted(range(n), key=lambda j: -pre[j])[:k]
        return [pre[j] if j in keep else 0.0 for j in range(n)]

    add = remove = l1 = align = 0.0
    for row_t, row_0 in zip(f_theta.tolist(), f_0.tolist()):
        z_t, z_0 = prep(row_t), prep(row_0)
        s_t, s_0 = encode(z_t), encode(z_0)
        for j in range(n):
            active = s_0[j] != 0
            add += 0.0 if active else abs(s_t[j])
            remove += max(s_0[j] - s_t[j], 0.0) if active else 0.0
            l1 += abs(s_t[j] - s_0[j])
        for i in range(d):
            carried = sum(W_dec[i][j] * (s_t[j] - s_0[j]) for j in range(n))
            align += ((z_t[i] - z_0[i]) - carried) ** 2
    rows = f_theta.shape[0]
    return {
        "add": lambda_add * add / (rows * n),
        "remove": lambda_remove * remove / (rows * n),
        "l1": lambda_l1 * l1 / (rows * n),
        "align": mu * align / (rows * d),
    }


def _check(terms, expected):
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert terms["total"].item() == pytest.approx(sum(expected.values()), rel=1e-5, abs=1e-7)


def test_terms_match_numbers_worked_by_hand():
    sae = _hand_sae()
    f_0 = torch.tensor([[1.0, 2.0, 0.0]])
    f_theta = torch.tensor([[1.0, 0.5, 3.0]])
    # pre(f_0)     = [1, 2, 0, 3/sqrt2]     -> s_0     = [0, 2, 0, 3/sqrt2],   m = [0, 1, 0, 1]
    # pre(f_theta) = [1, .5, 3, 1.5/sqrt2]  -> s_theta = [0, 0, 3, 1.5/sqrt2]
    # delta_s = [0, -2, 3, -1.5/sqrt2]; W_dec delta_s = [-0.75, -2.75, 3]
    # r = [0, -1.5, 3] - [-0.75, -2.75, 3] = [0.75, 1.25, 0]
    expected = {
        "add": 2.0 * 3.0 / 4,
        "remove": 3.0 * (2.0 + 1.5 / SQRT2) / 4,
        "l1": 5.0 * (2.0 + 3.0 + 1.5 / SQRT2) / 4,
        "align": 7.0 * (0.75**2 + 1.25**2) / 3,
    }
    _check(sae_penalty(f_theta, f_0, sae, **WEIGHTS), expected)
    assert set(sae_penalty(f_theta, f_0, sae)) == {"add", "remove", "l1", "align", "total"}


def test_l2_case_uses_prepared_embeddings():
    sae = _hand_sae("l2")
    f_0 = torch.tensor([[3.0, 4.0, 0.0]])  # prepared: [0.6, 0.8, 0]
    f_theta = torch.tensor([[0.0, 0.0, 2.0]])  # prepared: [0, 0, 1]
    # s_0 = [0, 0.8, 0, 1.4/sqrt2] (pre = [.6, .8, 0, 1.4/sqrt2]); s_theta = [0, 0, 1, 0] (ties
    # at 0 among the rest are broken by torch.topk, but a tied 0 value is 0 either way).
    # delta_s = [0, -0.8, 1, -1.4/sqrt2]; W_dec delta_s = [-0.7, -1.5, 1]
    # r = [-0.6, -0.8, 1] - [-0.7, -1.5, 1] = [0.1, 0.7, 0]
    expected = {
        "add": 2.0 * 1.0 / 4,
        "remove": 3.0 * (0.8 + 1.4 / SQRT2) / 4,
        "l1": 5.0 * (0.8 + 1.0 + 1.4 / SQRT2) / 4,
        "align": 7.0 * (0.1**2 + 0.7**2) / 3,
    }
    _check(sae_penalty(f_theta, f_0, sae, **WEIGHTS), expected)
    # The same raw inputs without normalisation give different terms.
    raw = sae_penalty(f_theta, f_0, _hand_sae("none"), **WEIGHTS)
    assert raw["align"].item() != pytest.approx(expected["align"])


@pytest.mark.parametrize("normalize", ["none", "l2"])
def test_terms_match_reference_on_random_sae(normalize):
    generator = torch.Generator().manual_seed(0)
    sae = TopKSAE(4, 6, 2, normalize=normalize, generator=generator)
    with torch.no_grad():
        sae.b_pre.copy_(torch.randn(4, generator=generator) * 0.3)
        sae.W_enc.add_(torch.randn(6, 4, generator=generator) * 0.2)
    f_0 = torch.randn(5, 4, generator=generator)
    f_theta = f_0 + 0.7 * torch.randn(5, 4, generator=generator)
    terms = sae_penalty(f_theta, f_0, sae, **WEIGHTS)
    _check(terms, _reference(f_theta, f_0, sae, **WEIGHTS))
    # Each term scales linearly with its own weight only.
    single = sae_penalty(f_theta, f_0, sae, lambda_remove=1.0)
    assert single["remove"].item() == pytest.approx(terms["remove"].item() / 3.0, rel=1e-6)
    assert single["add"].item() == single["l1"].item() == single["align"].item() == 0.0
    torch.testing.assert_close(single["total"], single["remove"])


@pytest.mark.parametrize("normalize", ["none", "l2"])
def test_identical_embeddings_give_zero(normalize):
    sae = TopKSAE(4, 6, 2, normalize=normalize, generator=torch.Generator().manual_seed(1))
    f = torch.randn(3, 4)
    terms = sae_penalty(f.clone(), f, sae, **WEIGHTS)
    for name, value in terms.items():
        assert value.item() == 0.0, name


def test_gradient_reaches_f_theta_only():
    generator = torch.Generator().manual_seed(2)
    sae = TopKSAE(4, 6, 2, normalize="l2", generator=generator)
    assert all(p.requires_grad for p in sae.parameters())  # frozen even if left trainable
    f_0 = torch.randn(3, 4, generator=generator)
    f_theta = (f_0 + 0.5 * torch.randn(3, 4, generator=generator)).requires_grad_()
    f_0.requires_grad_()
    terms = sae_penalty(f_theta, f_0, sae, **WEIGHTS)
    terms["total"].backward()
    assert f_theta.grad is not None and f_theta.grad.abs().sum() > 0
    assert f_0.grad is None
    assert all(p.grad is None for p in sae.parameters())
    # Feature terms alone also carry gradient (through the top-k values, not only via r).
    f_theta.grad = None
    sae_penalty(f_theta, f_0, sae, lambda_l1=1.0)["total"].backward()
    assert f_theta.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["lambda_add", "lambda_remove", "lambda_l1", "mu"])
def test_negative_weight_raises(name):
    sae = _hand_sae()
    f = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=name):
        sae_penalty(f, f, sae, **{name: -1.0})
    with pytest.raises(ValueError, match=name):
        sae_penalty(f, f, sae, **{name: float("nan")})


def test_shape_mismatch_raises():
    sae = _hand_sae()
    with pytest.raises(ValueError, match="last dim 3"):
        sae_penalty(torch.zeros(2, 4), torch.zeros(2, 4), sae)
    with pytest.raises(ValueError, match="differ"):
        sae_penalty(torch.zeros(2, 3), torch.zeros(3, 3), sae)
