"""The scale convention of the SAE penalty (``sae_inputs``: prepared | raw) and the conversion of
its weights between the two (docs/penalty_scale.md)."""

from __future__ import annotations

import copy

import pytest
import torch

from saeft.config import ConfigError
from saeft.methods import needing
from saeft.nn.loss import Context, method_loss
from saeft.nn.regularizers import convert_weights, sae_penalty
from saeft.sae import TopKSAE
from saeft.stages import finetune

WEIGHTS = dict(lambda_add=2.0, lambda_remove=3.0, lambda_l1=5.0, mu=7.0)
FEATURE_TERMS = ("add", "remove", "l1")


def _sae(d=8, n=24, k=3, seed=0, architecture="topk", relu=False, b_pre=0.0, b_enc=0.0):
    """A random l2 SAE, in float64 so that equalities can be tight; biases zero unless asked."""
    generator = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, k, normalize="l2", architecture=architecture, relu=relu, tied_init=False, generator=generator)
    with torch.no_grad():
        sae.b_pre.copy_(b_pre * torch.randn(d, generator=generator))
        sae.b_enc.copy_(b_enc * torch.randn(n, generator=generator))
        sae.threshold.fill_(0.05)
    return sae.double().eval()


def _pair(rho, rows=6, d=8, seed=1, equal_norms=True):
    """Zero-shot and tuned embeddings, every row of norm ``rho`` (or of scattered norms)."""
    generator = torch.Generator().manual_seed(seed)
    f_0 = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    f_theta = f_0 + 0.8 * torch.randn(rows, d, generator=generator, dtype=torch.float64)
    if equal_norms:
        f_0 = rho * torch.nn.functional.normalize(f_0, dim=-1)
        f_theta = rho * torch.nn.functional.normalize(f_theta, dim=-1)
    return f_theta, f_0


@pytest.mark.parametrize("rho", [0.3, 4.0, 10.0])
@pytest.mark.parametrize("relu", [False, True])
def test_converted_weights_give_the_same_penalty(rho, relu):
    sae = _sae(relu=relu)
    f_theta, f_0 = _pair(rho)
    prepared = sae_penalty(f_theta, f_0, sae, **WEIGHTS)
    raw_weights = convert_weights(WEIGHTS, rho, to="raw")
    raw = sae_penalty(f_theta, f_0, sae, inputs="raw", **raw_weights)
    for name in (*FEATURE_TERMS, "align", "total"):
        assert prepared[name].item() > 0, name  # every term is exercised
        assert raw[name].item() == pytest.approx(prepared[name].item(), rel=1e-10), name
    # Back again: the round trip restores the weights.
    back = convert_weights(raw_weights, rho, to="prepared")
    assert back == pytest.approx(WEIGHTS, rel=1e-12)


def test_converted_weights_give_the_same_gradient_along_the_sphere():
    """Equal values, equal gradients tangent to the sphere of radius rho; but only ``raw`` has a
    radial gradient (``prepared`` cannot see the norm of f_theta)."""
    sae, rho = _sae(), 6.0
    f_theta, f_0 = _pair(rho)
    grads = []
    for inputs, weights in (("prepared", WEIGHTS), ("raw", convert_weights(WEIGHTS, rho, to="raw"))):
        x = f_theta.clone().requires_grad_()
        sae_penalty(x, f_0, sae, inputs=inputs, **weights)["total"].backward()
        grads.append(x.grad)
    u = torch.nn.functional.normalize(f_theta, dim=-1)
    radial = [(g * u).sum(-1) for g in grads]
    tangent = [g - r[:, None] * u for g, r in zip(grads, radial)]
    torch.testing.assert_close(tangent[1], tangent[0], rtol=1e-9, atol=1e-12)
    assert radial[0].abs().max().item() < 1e-12
    assert radial[1].abs().max().item() > 1e-4


@pytest.mark.parametrize("rho", [0.5, 3.0, 10.0])
def test_raw_differs_from_prepared_without_conversion(rho):
    sae = _sae()
    f_theta, f_0 = _pair(rho)
    prepared = sae_penalty(f_theta, f_0, sae, **WEIGHTS)
    raw = sae_penalty(f_theta, f_0, sae, inputs="raw", **WEIGHTS)
    # Same weights: the feature terms are rho times, the alignment rho**2 times larger.
    for name in FEATURE_TERMS:
        assert raw[name].item() == pytest.approx(rho * prepared[name].item(), rel=1e-10), name
    assert raw["align"].item() == pytest.approx(rho**2 * prepared["align"].item(), rel=1e-10)
    assert raw["total"].item() != pytest.approx(prepared["total"].item(), rel=1e-3)


def test_raw_equals_prepared_at_unit_norm_and_for_unnormalised_saes():
    sae = _sae(b_pre=0.3, b_enc=0.1)
    f_theta, f_0 = _pair(1.0)
    a, b = sae_penalty(f_theta, f_0, sae, **WEIGHTS), sae_penalty(f_theta, f_0, sae, inputs="raw", **WEIGHTS)
    for name in a:
        assert b[name].item() == pytest.approx(a[name].item(), rel=1e-10), name
    plain = copy.deepcopy(sae)
    plain.normalize = "none"
    f_theta, f_0 = _pair(1.0, equal_norms=False)
    a, b = sae_penalty(f_theta, f_0, plain, **WEIGHTS), sae_penalty(f_theta, f_0, plain, inputs="raw", **WEIGHTS)
    for name in a:
        assert b[name].item() == a[name].item(), name


def test_conversion_is_approximate_with_a_pre_bias():
    """With b_pre != 0 raw inputs are centred by a unit-scale bias: no exact conversion."""
    sae, rho = _sae(b_pre=0.5), 10.0
    f_theta, f_0 = _pair(rho)
    prepared = sae_penalty(f_theta, f_0, sae, **WEIGHTS)
    raw = sae_penalty(f_theta, f_0, sae, inputs="raw", **convert_weights(WEIGHTS, rho, to="raw"))
    assert raw["total"].item() != pytest.approx(prepared["total"].item(), rel=1e-6)


@pytest.mark.parametrize("inputs", ["prepared", "raw"])
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_step_zero_every_term_is_zero(inputs, architecture):
    sae = _sae(architecture=architecture, relu=architecture == "batchtopk", b_pre=0.3, b_enc=0.1)
    f_0 = 10.0 * _pair(1.0, equal_norms=False)[1]  # norms far from 1
    terms = sae_penalty(f_0.clone(), f_0, sae, inputs=inputs, **WEIGHTS)
    assert set(terms) == {*FEATURE_TERMS, "align", "total"}
    for name, value in terms.items():
        assert value.item() == 0.0, name


def test_convert_weights_keys_and_errors():
    params = {"lambda": 70.0, "lambda_add": 10.0, "lambda_remove": 0.02, "mu": 1.0, "sae_inputs": "prepared", "sae": "main"}
    raw = convert_weights(params, 10.0, to="raw")
    assert raw == {"lambda": 70.0, "lambda_add": 1.0, "lambda_remove": pytest.approx(0.002), "mu": pytest.approx(0.01),
                   "sae_inputs": "raw", "sae": "main"}
    assert params["lambda_add"] == 10.0  # the input is not changed
    with pytest.raises(ValueError, match="already use sae_inputs='raw'"):
        convert_weights(raw, 10.0, to="raw")
    with pytest.raises(ValueError, match="to must be one of"):
        convert_weights(params, 10.0, to="unit")
    for rho in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="rho"):
            convert_weights(params, rho, to="raw")
    with pytest.raises(ValueError, match="inputs must be one of"):
        f = torch.zeros(2, 8, dtype=torch.float64)
        sae_penalty(f, f, _sae(), inputs="unit")


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(needing("sae")))
def test_config_default_and_choices(method):
    assert finetune.FinetuneConfig(method=method).method_params["sae_inputs"] == "prepared"
    assert finetune.FinetuneConfig(method=method, method_params={"sae_inputs": "raw"}).method_params["sae_inputs"] == "raw"
    for bad in ("unit", "reference", "", 1.0, None, ["raw"]):
        with pytest.raises(ConfigError, match=rf"methods\.{method}\.sae_inputs: must be one of prepared, raw"):
            finetune.FinetuneConfig(method=method, method_params={"sae_inputs": bad})


def test_config_other_keys_keep_their_rules():
    with pytest.raises(ConfigError, match=r"methods\.ft\.sae_inputs: unknown key"):
        finetune.FinetuneConfig(method="ft", method_params={"sae_inputs": "raw"})
    with pytest.raises(ConfigError, match=r"methods\.saeft\.mu: must be a number, got 'raw'"):
        finetune.FinetuneConfig(method="saeft", method_params={"mu": "raw"})
    with pytest.raises(ConfigError, match=r"methods\.saeft\.lambda: must be a number, got True"):
        finetune.FinetuneConfig(method="saeft", method_params={"lambda": True})
    with pytest.raises(ConfigError, match=r"methods\.lpft\.lp_epochs: must be an integer, got 1.5"):
        finetune.FinetuneConfig(method="lpft", method_params={"lp_epochs": 1.5})
    with pytest.raises(ConfigError, match=r"methods\.ldifs\.taps"):
        finetune.FinetuneConfig(method="ldifs", method_params={"taps": [""]})
    assert finetune.FinetuneConfig(method="ldifs", method_params={"taps": ["a"]}).method_params["taps"] == ["a"]


@pytest.mark.parametrize("method", sorted(needing("sae")))
def test_schema_accepts_the_choices_and_names_a_bad_value(method):
    from saeft.config.study import validate_config

    for value in ("prepared", "raw"):
        config = validate_config({"methods": {method: {"sae_inputs": value, "datasets": {"shapes": {"sae_inputs": "prepared"}}}}})
        assert config["methods"][method]["sae_inputs"] == value
    with pytest.raises(ConfigError) as info:
        validate_config({"methods": {method: {"sae_inputs": "unit"}}})
    assert f"methods.{method}.sae_inputs:" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_config({"methods": {"ft": {"sae_inputs": "raw"}}})
    assert "methods.ft.sae_inputs" in str(info.value)


@pytest.mark.parametrize("inputs", ["prepared", "raw"])
def test_method_loss_passes_the_convention(inputs):
    generator = torch.Generator().manual_seed(3)
    sae = TopKSAE(4, 12, 2, generator=generator)
    model = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4) + 0.3 * torch.randn(4, 4, generator=generator))

    def forward(x):
        f = model(x)
        return f, f

    x = 5.0 * torch.randn(6, 4, generator=generator)  # norms far from 1
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    cfg = finetune.FinetuneConfig(method="saeft", method_params={"lambda": 2.0, "sae_inputs": inputs})
    ctx = Context(cfg=cfg, model=forward, sae=sae)
    loss, terms = method_loss(ctx, x, y, x)
    p = cfg.method_params
    expected = sae_penalty(model(x), x, sae, inputs=inputs, **{k: p[k] for k in ("lambda_add", "lambda_remove", "mu")})
    assert terms["reg_total"].item() == pytest.approx(expected["total"].item(), rel=1e-6)
    assert terms["f0_norm"].item() == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-6)
    other = sae_penalty(model(x), x, sae, inputs="raw" if inputs == "prepared" else "prepared",
                        **{k: p[k] for k in ("lambda_add", "lambda_remove", "mu")})
    assert terms["reg_total"].item() != pytest.approx(other["total"].item(), rel=1e-3)
