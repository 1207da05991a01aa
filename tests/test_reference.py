"""Tier A: the oracle against an independent dense float64 Jacobian and closed forms."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.formulas import HALF_LOG_2PIE

from .conftest import encoder_zoo

ZOO_NAMES = list(encoder_zoo())


def dense_jacobian(model, x):
    """Independent oracle: torch.autograd.functional.jacobian, one sample at a time, float64."""
    m64 = copy.deepcopy(model).double()
    out = []
    for xb in x.double():
        J = torch.autograd.functional.jacobian(lambda z: m64(z.unsqueeze(0))[0], xb)
        out.append(J.reshape(-1, xb.numel()))
    return torch.stack(out)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_jacobian_matches_independent_dense_jacobian(zoo, name):
    model, x = zoo[name]
    J = ff.reference.jacobian(model, x)
    Jd = dense_jacobian(model, x)
    assert J.dtype == torch.float64 and J.shape == Jd.shape
    torch.testing.assert_close(J, Jd, rtol=1e-10, atol=1e-12)
    # the caller's module is not modified (still float32)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_trace_diag_logdet_match_numpy(zoo, name):
    model, x = zoo[name]
    Jd = dense_jacobian(model, x).numpy()
    sigma, prior_var = 0.3, 2.0
    d = Jd.shape[2]
    diag = ff.reference.fisher_diag(model, x).numpy()
    trace = ff.reference.fisher_trace(model, x).numpy()
    logdet = ff.reference.fisher_logdet(model, x, sigma=sigma, prior_var=prior_var).numpy()
    for b, J in enumerate(Jd):
        F = J.T @ J
        np.testing.assert_allclose(diag[b], np.diag(F), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(trace[b], np.trace(F), rtol=1e-10)
        # the full d x d log-det, no smaller-side trick
        sign, ld = np.linalg.slogdet(F / sigma**2 + np.eye(d) / prior_var)
        assert sign > 0
        np.testing.assert_allclose(logdet[b], ld, rtol=1e-9)


def test_linear_encoder_closed_form():
    torch.manual_seed(0)
    d, m, sigma = 5, 8, 0.2
    A = torch.randn(m, d, dtype=torch.float64)
    enc = lambda x: x @ A.T  # noqa: E731
    x = torch.randn(3, d, dtype=torch.float64)
    r = ff.reference.fsinfo(enc, x, sigma=sigma, variant="logdet")
    expected = torch.logdet(A.T @ A / sigma**2) / (2 * d) - 0.5 * math.log(2 * math.pi * math.e)
    torch.testing.assert_close(r.value, expected.expand(3), rtol=1e-12, atol=1e-12)
    assert r.estimator == "exact" and r.units == "nats/dim" and bool((r.stderr == 0).all())
    assert r.value.shape == (3,) and r.stderr.shape == (3,)
    dfil = ff.reference.dfil(enc, x, sigma=sigma)
    torch.testing.assert_close(dfil.value, (A**2).sum().expand(3) / (sigma**2 * d))


@pytest.mark.parametrize("name", ["tanh_mlp_m>d", "linear_m>d", "residual_m=d"])
def test_fsinfo_plus_log_sigma_is_constant(zoo, name):
    model, x = zoo[name]
    for variant, kw in (("logdet", {}), ("diag", {"floor": 0.0})):
        vals = [
            ff.reference.fsinfo(model, x, sigma=s, variant=variant, **kw).value + math.log(s)
            for s in (0.05, 0.2, 1.0, 7.0, 50.0)
        ]
        for v in vals[1:]:
            torch.testing.assert_close(v, vals[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["tanh_mlp_m>d", "linear_m>d", "residual_m=d", "attention_m=d"])
def test_hadamard_and_bound_chain_full_rank(zoo, name):
    model, x = zoo[name]
    sigma = 0.1
    logdet = ff.reference.fsinfo(model, x, sigma=sigma, variant="logdet")
    diag = ff.reference.fsinfo(model, x, sigma=sigma, variant="diag", floor=0.0)
    dfil = ff.reference.dfil(model, x, sigma=sigma)
    assert torch.isfinite(logdet.value).all() and not logdet.singular.any()
    # Hadamard: FSInfo_diag >= FSInfo
    assert bool((diag.value >= logdet.value - 1e-12).all())
    b_dfil = ff.bounds.dfil_bound(dfil).value
    b_diag = ff.bounds.fsinfo_bound(diag).value
    b_full = ff.bounds.fsinfo_bound(logdet).value
    # 1/dFIL <= exp(-2 FSInfo_diag)/(2 pi e) <= exp(-2 FSInfo)/(2 pi e)   (AM-GM, Hadamard)
    assert bool((b_dfil <= b_diag * (1 + 1e-12)).all())
    assert bool((b_diag <= b_full * (1 + 1e-12)).all())


def test_logdet_singular_is_minus_inf_with_warning(zoo):
    model, x = zoo["tanh_mlp_m<d"]
    with pytest.warns(ff.SingularFisherWarning, match="prior_var"):
        r = ff.reference.fsinfo(model, x, variant="logdet")
    assert bool(torch.isneginf(r.value).all()) and not torch.isnan(r.value).any()
    assert bool(r.singular.all())
    # the prior term makes it finite and equal to the m-side identity computed densely
    r2 = ff.reference.fsinfo(model, x, sigma=0.5, variant="logdet", prior_var=3.0)
    J = dense_jacobian(model, x)
    d = J.shape[2]
    for b in range(J.shape[0]):
        full = torch.logdet(J[b].T @ J[b] / 0.25 + torch.eye(d, dtype=torch.float64) / 3.0)
        torch.testing.assert_close(r2.value[b], full / (2 * d) - HALF_LOG_2PIE)


def test_rank_deficient_square_jacobian_is_singular():
    P = torch.zeros(4, 4, dtype=torch.float64)
    P[0, 0] = P[1, 1] = 1.0  # projection: rank 2
    enc = lambda x: torch.tanh(x) @ P  # noqa: E731
    with pytest.warns(ff.SingularFisherWarning):
        r = ff.reference.fsinfo(enc, torch.randn(2, 4, dtype=torch.float64), variant="logdet")
    assert bool(torch.isneginf(r.value).all())
    # diag variant stays finite thanks to the floor, and uses it exactly for zero columns
    rd = ff.reference.fsinfo(enc, torch.randn(2, 4, dtype=torch.float64), sigma=1.0)
    assert torch.isfinite(rd.value).all()


@pytest.mark.parametrize("variant,kw", [
    ("diag", {}), ("diag", {"floor": 0.0}), ("logdet", {}), ("logdet", {"prior_var": 0.5}),
])
def test_fsinfo_sigma_reproduces_target(zoo, variant, kw):
    model, x = zoo["tanh_mlp_m>d"]
    for target in (-1.0, 0.5, 2.0):
        s = ff.reference.fsinfo_sigma(model, x, target=target, variant=variant, **kw).sigma
        assert s.shape == (x.shape[0],) and bool((s > 0).all())
        back = ff.reference.fsinfo(model, x, sigma=s, variant=variant, **kw).value
        torch.testing.assert_close(back, torch.full_like(back, target), rtol=0, atol=1e-10)


def test_fsinfo_sigma_closed_form_matches_paper(zoo):
    model, x = zoo["tanh_mlp_m>d"]
    tau = -1.0
    f1 = ff.reference.fsinfo(model, x, sigma=1.0, variant="logdet").value
    s = ff.reference.fsinfo_sigma(model, x, target=tau, variant="logdet").sigma
    torch.testing.assert_close(s, torch.exp(f1 - tau))
    # sigma* = det(J^T J)^(1/2d) exp(-tau) / sqrt(2 pi e)
    J = dense_jacobian(model, x)
    d = J.shape[2]
    det_root = torch.exp(torch.logdet(J.transpose(1, 2) @ J) / (2 * d))
    torch.testing.assert_close(s, det_root * math.exp(-tau) / math.sqrt(2 * math.pi * math.e))


def test_fsinfo_sigma_unreachable_target_with_prior_is_inf(zoo):
    model, x = zoo["tanh_mlp_m>d"]
    # with prior precision 1/prior_var, FSInfo never drops below log(1/prior_var)/2 - log(2 pi e)/2
    floor_value = 0.5 * math.log(1 / 0.01) - HALF_LOG_2PIE
    s = ff.reference.fsinfo_sigma(model, x, target=floor_value - 0.1, variant="logdet",
                                  prior_var=0.01).sigma
    assert bool(torch.isinf(s).all())


def test_dfil_noise_calibration(zoo):
    """Maeng et al.: sigma = sqrt(b * mean_x tr(J^T J) / d) makes 1/mean dFIL equal b."""
    model, x = zoo["cnn_bn_maxpool_m<d"]
    b = 0.05
    per_sample = ff.dfil_sigma(model, x, bound=b, estimator="exact")  # the float64 oracle
    s = per_sample.dataset("rms")
    dfil = ff.reference.dfil(model, x, sigma=s)
    torch.testing.assert_close(torch.tensor(1.0 / float(dfil.value.mean()), dtype=torch.float64),
                               torch.tensor(b, dtype=torch.float64))
    trace = ff.reference.fisher_trace(model, x)
    assert math.isclose(s, math.sqrt(b * float(trace.mean()) / x[0].numel()), rel_tol=1e-12)
    # per sample: sigma_b puts that sample's 1/dFIL at b
    own = ff.reference.dfil(model, x, sigma=per_sample.sigma).value
    torch.testing.assert_close(1.0 / own, torch.full_like(own, b))


def test_diag_floor_is_documented_parameter(zoo):
    model, x = zoo["tanh_mlp_m<d"]
    diag = ff.reference.fisher_diag(model, x)
    for floor in (0.0, 1e-10, 1e-2):
        r = ff.reference.fsinfo(model, x, sigma=0.1, floor=floor)
        expected = torch.log(diag / 0.01 + floor).mean(dim=1) / 2 - HALF_LOG_2PIE
        torch.testing.assert_close(r.value, expected)
        assert r.info["floor"] == floor


def test_bits_and_aggregates(zoo):
    model, x = zoo["tanh_mlp_m<d"]
    r = ff.fsinfo(model, x, estimator="exact")
    bits = r.to_bits()
    torch.testing.assert_close(bits.value, r.value / math.log(2))
    assert bits.units == "bits/dim"
    mean = r.mean()
    assert math.isclose(mean.value, float(r.value.mean())) and mean.stderr == 0.0
    worst = r.worst()
    assert worst.index == int(r.value.argmax()) and worst.value == float(r.value.max())
    with pytest.raises(ValueError):
        ff.dfil(model, x, estimator="exact").to_bits()


def test_worst_case_bound_is_least_private_sample(zoo):
    model, x = zoo["tanh_mlp_m<d"]
    r = ff.fsinfo(model, x, estimator="exact")
    i, v = ff.bounds.fsinfo_bound(r).worst()
    assert i == r.worst().index
    assert math.isclose(v, math.exp(-2 * r.worst().value) / (2 * math.pi * math.e))


def test_oracle_spectrum_of_an_ill_conditioned_jacobian():
    """Singular values from 1e-6 to 1e6 (cond 1e12, a Gram matrix of cond 1e24): the oracle's
    log det comes from the SVD of J and matches the closed form; through eigvalsh of J^T J it
    read -inf without a prior and was 0.022 nats/dim off with prior_var=1."""
    from fsinfo_fast.reference import eigvals_from_jacobian

    s = torch.logspace(-6, 6, 192, dtype=torch.float64)
    J = torch.diag(s)[None] @ torch.linalg.qr(
        torch.randn(1, 192, 192, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)).Q
    mu, zero = eigvals_from_jacobian(J)
    assert not bool(zero.any())
    # float64 SVD: absolute error about eps * s_max on each singular value (3e-5 relative on the
    # smallest here); eigvalsh of J^T J errs by eps * s_max^2 on mu (1e-4, larger than mu_min)
    torch.testing.assert_close(mu[0], s.square(), rtol=1e-3, atol=0)
    enc = torch.nn.Linear(192, 192, bias=False).double().eval()
    with torch.no_grad():
        enc.weight.copy_(J[0])
    x = torch.zeros(1, 192, dtype=torch.float64)
    for pv, lam in ((None, 0.0), (1.0, 1.0)):
        got = ff.fsinfo(enc, x, 0.1, variant="logdet", estimator="exact", prior_var=pv).value
        want = 0.5 * torch.log(s.square() / 0.01 + lam).mean() - HALF_LOG_2PIE
        # float64 SVD at cond 1e12: about eps * s_max absolute on each singular value, so the
        # smallest carry ~1e-4 relative (measured: 2e-9 to 6e-7 nats/dim, by thread count)
        assert abs(float(got) - float(want)) < 1e-5, (pv, float(got), float(want))
