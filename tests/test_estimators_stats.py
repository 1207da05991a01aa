"""Tier C: unbiasedness and 95% interval coverage of every estimator, over many seeds.

Each "seed" is one sample of a batch: ``B`` copies of the same Jacobian get independent probes
(probes depend on the sample id), so one batched call gives ``B`` independent estimates.
Exact values come from the DenseProducts' ``J`` directly (fsinfo_fast.testing), and once from
the reference oracle on real encoders.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jvp, vjp

import fsinfo_fast.reference as ref
from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators import (
    estimate_diag,
    hutchinson_trace,
    hutchpp_trace,
    log_chi2_mean_offset,
    slq_logdet,
)
from fsinfo_fast.formulas import HALF_LOG_2PIE
from fsinfo_fast.testing import (
    TOL,
    assert_close_verbose,
    coverage,
    exact_fsinfo_diag,
    exact_fsinfo_logdet,
    exact_trace,
    geometric_spectrum,
    spectral_jacobian,
    unbiasedness_z,
)

B = TOL.seeds  # independent runs per check
SIGMA = 0.1

# name -> (singular values, m, d, prior_var for the log det)
CASES = {
    "ill_cond1e6_m>d": (geometric_spectrum(16, 1e6), 24, 16, None),
    "rank_deficient_m>d": (torch.cat([geometric_spectrum(8, 1e2), torch.zeros(4)]), 30, 16, 1.0),
    "m<d": (geometric_spectrum(10, 1e3), 10, 25, 0.5),
    "prescribed_m>d": (
        torch.tensor([3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.1]),
        40,
        10,
        None,
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    s, m, d, pv = CASES[request.param]
    J = spectral_jacobian(s, m, d, batch=B, seed=len(request.param))
    return request.param, J, pv


#: The coverage band the seed count justifies (diag, Hutchinson, Hutch++ tests).
BAND = TOL.coverage_band(B)
#: A trace at a fixed count (same-sample interval): the band's lower end, and the top of
#: ``TOL.same_sample_coverage_high`` (it over-covers less skewed laws than one dominant
#: direction by design; the band's top failed Rademacher K = 50 on ``rank_deficient_m>d`` at
#: 0.970 where its coverage over 8000 runs is 0.955-0.957).
TRACE_BAND = (BAND[0], TOL.same_sample_coverage_high)


def _check(name, value, halfwidth, exact, *, what, band=(TOL.coverage_low, TOL.coverage_high)):
    z = unbiasedness_z(value, exact)
    cov = coverage(value, halfwidth, exact)
    assert abs(z) < TOL.z_unbiased, f"{what} on {name}: mean is {z:.2f} standard errors off"
    lo, hi = band
    assert lo <= cov <= hi, (
        f"{what} on {name}: 95% interval coverage {cov:.3f} outside [{lo:.3f}, {hi:.3f}]"
    )
    return z, cov


def test_diag_fsinfo_and_dfil(case):
    name, J, _ = case
    P = DenseProducts(J)
    r = estimate_diag(P, sigma=SIGMA, floor=0.0, num_probes=10, seed=1)
    assert P.vjp_passes == 10 == r.fsinfo_diag.passes and P.jvp_passes == 0
    _check(
        name,
        r.fsinfo_diag.value,
        r.fsinfo_diag.ci_halfwidth,
        exact_fsinfo_diag(J[:1], SIGMA, 0.0),
        what="FSInfo_diag (K=10)",
        band=BAND,
    )
    # dFIL from the same probes: a Hutchinson mean, nominal coverage needs more probes
    r = estimate_diag(P, sigma=SIGMA, floor=0.0, num_probes=50, seed=2)
    _check(
        name,
        r.dfil.value,
        r.dfil.ci_halfwidth,
        exact_trace(J[:1], SIGMA),
        what="dFIL from the diag probes (K=50)",
        band=TRACE_BAND,
    )


def test_diag_grouped_jackknife(case):
    """K = 25 probes in 10 jackknife groups of unequal size (3 and 2)."""
    name, J, _ = case
    r = estimate_diag(
        DenseProducts(J), sigma=SIGMA, floor=0.0, num_probes=25, seed=12, jackknife_groups=10
    ).fsinfo_diag
    assert (r.info["dof"] == 9).all()
    _check(
        name,
        r.value,
        r.ci_halfwidth,
        exact_fsinfo_diag(J[:1], SIGMA, 0.0),
        what="FSInfo_diag (K=25, 10 groups)",
        band=BAND,
    )


def test_slq_gaussian_probes(case):
    name, J, pv = case
    r = slq_logdet(
        DenseProducts(J), sigma=SIGMA, prior_var=pv, num_probes=10, seed=13, kind="gaussian"
    )
    _check(
        name,
        r.value,
        r.ci_halfwidth,
        exact_fsinfo_logdet(J[:1], SIGMA, pv),
        what="SLQ log-det FSInfo (lanczos, Gaussian probes, K=10)",
    )


def test_diag_debiasing_matters_at_tiny_k(case):
    """At K = 3 the plug-in log-mean is biased by (psi(1.5) + log(2/3)) / 2 = -0.18 nats/dim;
    the debiased estimator is not (the test has the power to see the difference)."""
    name, J, _ = case
    r = estimate_diag(DenseProducts(J), sigma=SIGMA, floor=0.0, num_probes=3, seed=3)
    exact = exact_fsinfo_diag(J[:1], SIGMA, 0.0)
    assert abs(unbiasedness_z(r.fsinfo_diag.value, exact)) < TOL.z_unbiased
    naive = r.fsinfo_diag.value + float(log_chi2_mean_offset(3.0)) / 2
    assert abs(unbiasedness_z(naive, exact)) > 10


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson(case, side, kind):
    name, J, _ = case
    r = hutchinson_trace(DenseProducts(J), sigma=SIGMA, side=side, kind=kind, num_probes=50, seed=4)
    _check(
        name,
        r.value,
        r.ci_halfwidth,
        exact_trace(J[:1], SIGMA),
        what=f"Hutchinson dFIL ({side}, {kind}, K=50)",
        band=TRACE_BAND,
    )


def test_hutchpp(case):
    name, J, _ = case
    P = DenseProducts(J)
    r = hutchpp_trace(P, sigma=SIGMA, sketch_size=4, num_probes=50, seed=5)
    assert r.passes == 3 * 4 + 50 == P.passes
    _check(
        name,
        r.value,
        r.ci_halfwidth,
        exact_trace(J[:1], SIGMA),
        what="Hutch++ dFIL (k=4, K=50)",
        band=BAND,
    )


@pytest.mark.parametrize("method", ["lanczos", "golub_kahan"])
def test_slq_logdet(case, method):
    name, J, pv = case
    r = slq_logdet(
        DenseProducts(J), sigma=SIGMA, prior_var=pv, num_probes=10, seed=6, method=method
    )  # default order 30, capped at n: exact quadrature
    _check(
        name,
        r.value,
        r.ci_halfwidth,
        exact_fsinfo_logdet(J[:1], SIGMA, pv),
        what=f"SLQ log-det FSInfo ({method}, K=10)",
    )


def test_slq_truncated_order_with_prior():
    """Order cap 12 < n = 48: the quadrature error is below Monte-Carlo resolution with a prior
    (probes whose bracket closes earlier stop earlier)."""
    J = spectral_jacobian(geometric_spectrum(40, 1e4), 60, 48, batch=B, seed=11)
    r = slq_logdet(DenseProducts(J), sigma=SIGMA, prior_var=1.0, order=12, num_probes=10, seed=7)
    assert r.info["order"] == 12 and r.passes <= 2 * 12 * 10
    _check(
        "geometric_m>d_n48",
        r.value,
        r.ci_halfwidth,
        exact_fsinfo_logdet(J[:1], SIGMA, 1.0),
        what="SLQ (order 12, prior)",
    )


# --- cross-check with the reference oracle on real encoders through a torch.func adapter ---


class FuncProducts:
    """Minimal Products adapter over an encoder (torch.func), independent of the engine."""

    def __init__(self, enc, x):
        self.enc, self.x = enc, x
        self.batch, self.d = x.shape[0], x[0].numel()
        self.m = enc(x[:1]).numel()
        self.dtype, self.device = x.dtype, x.device
        _, self._pullback = vjp(enc, x)

    def jvp(self, V):
        outs = [
            jvp(self.enc, (self.x,), (V[:, k].reshape(self.x.shape),))[1] for k in range(V.shape[1])
        ]
        return torch.stack([o.reshape(self.batch, -1) for o in outs], dim=1)

    def vjp(self, U):
        outs = [self._pullback(U[:, k])[0] for k in range(U.shape[1])]
        return torch.stack([o.reshape(self.batch, -1) for o in outs], dim=1)


def _encoders():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lin = nn.Linear(5, 7).double().eval()
    mlp = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double().eval()
    return {
        "linear_m>d": (lin, torch.randn(1, 5, generator=g, dtype=torch.float64)),
        "tanh_mlp_m<d": (mlp, torch.randn(1, 12, generator=g, dtype=torch.float64)),
    }


@pytest.mark.parametrize("name", ["linear_m>d", "tanh_mlp_m<d"])
def test_against_reference_oracle(name):
    enc, x1 = _encoders()[name]
    xb = x1.expand(B, -1).contiguous()
    P = FuncProducts(enc, xb)
    Pd = DenseProducts(ref.jacobian(enc, x1).expand(B, -1, -1))
    # tier B on the way: adapter and dense products give the same estimates with the same probes
    r = estimate_diag(P, sigma=SIGMA, floor=0.0, num_probes=10, seed=8)
    rd = estimate_diag(Pd, sigma=SIGMA, floor=0.0, num_probes=10, seed=8)
    assert_close_verbose(r.fsinfo_diag.value, rd.fsinfo_diag.value, name="diag adapter vs dense")
    assert P.vjp(torch.ones(B, 1, P.m, dtype=torch.float64)).requires_grad  # parameters do
    assert not r.fsinfo_diag.value.requires_grad  # estimators detach the products
    exact = ref.fsinfo(enc, x1, SIGMA, "diag", floor=0.0).value
    f = r.fsinfo_diag
    _check(name, f.value, f.ci_halfwidth, exact, what="FSInfo_diag", band=BAND)
    t = hutchinson_trace(P, sigma=SIGMA, side="input", num_probes=50, seed=9)
    _check(name, t.value, t.ci_halfwidth, ref.dfil(enc, x1, SIGMA).value, what="dFIL", band=BAND)
    s = slq_logdet(P, sigma=SIGMA, prior_var=2.0, num_probes=10, seed=10)
    exact = ref.fsinfo(enc, x1, SIGMA, "logdet", prior_var=2.0).value
    _check(name, s.value, s.ci_halfwidth, exact, what="log-det FSInfo (prior)")
    if name == "linear_m>d":  # full column rank: the definition without a prior is finite
        s = slq_logdet(P, sigma=SIGMA, num_probes=10, seed=11)
        exact = ref.fsinfo(enc, x1, SIGMA, "logdet").value
        assert torch.isfinite(exact).all()
        _check(name, s.value, s.ci_halfwidth, exact, what="log-det FSInfo (no prior)")
    assert float(exact) > -HALF_LOG_2PIE - 10  # finite, sensible


# --- the floor: exact debiasing where diag(J^T J) / sigma^2 is near 1e-10 -------------------


def _floor_jacobian(b: int, m: int = 40, d: int = 24) -> torch.Tensor:
    """``[b, m, d]`` copies of one Jacobian whose ``D_k / (sigma^2 floor)`` runs from ``1e-4`` to
    ``1e4`` over the columns (correlated columns)."""
    g = torch.Generator().manual_seed(7)
    mix = torch.eye(d, dtype=torch.float64)
    mix += 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    J = torch.randn(m, d, generator=g, dtype=torch.float64) @ mix
    target = torch.logspace(-4, 4, d, dtype=torch.float64) * SIGMA**2 * 1e-10
    J = J * (target / (J**2).sum(dim=0)).sqrt()
    return J.expand(b, m, d).contiguous()


@pytest.mark.parametrize("K", [4, 20])
def test_diag_floor_exactly_debiased(K):
    """Columns from 1e-4 to 1e4 times the floor: the estimate is unbiased and its interval
    covers; the old plug-in ``log(s/sigma^2 + floor) - E log(chi2_K/K)`` from the same probes is
    biased by many standard errors (the test can see the difference)."""
    from fsinfo_fast.estimators.probes import draw_probes

    J = _floor_jacobian(B)
    exact = exact_fsinfo_diag(J[:1], SIGMA, 1e-10)
    r = estimate_diag(DenseProducts(J), sigma=SIGMA, num_probes=K, seed=21).fsinfo_diag
    _check("floor", r.value, r.ci_halfwidth, exact, what=f"FSInfo_diag at the floor (K={K})",
           band=BAND)
    assert (r.bias_bound > 0).all() and (r.bias_bound < 1e-10).all()
    U = draw_probes(J.shape[1], seed=21, sample_ids=torch.arange(B), count=K)
    s = (torch.einsum("bmd,bkm->bkd", J, U) ** 2).mean(dim=1)
    plug = (torch.log(s / SIGMA**2 + 1e-10) - log_chi2_mean_offset(K)).mean(dim=1) / 2
    assert abs(unbiasedness_z(plug - HALF_LOG_2PIE, exact)) > 10


# near-floor columns carried by a few output directions: (singular values, sigma); sigma = 1e5
# puts D_k / sigma^2 at 1e-11..1e-10 (the floor's scale), 3e5 mostly below it
NEAR_FLOOR_CORRELATED = {
    "rank3": (torch.tensor([3.0, 2.0, 1.0]), 1e5),
    "cond1e6": (geometric_spectrum(64, 1e6), 1e5),
    "cond1e6_below": (geometric_spectrum(64, 1e6), 3e5),
}


@pytest.mark.parametrize("K", [4, 16])
@pytest.mark.parametrize("name", list(NEAR_FLOOR_CORRELATED))
def test_diag_floor_correlated_columns_skew_allowance(name, K, monkeypatch):
    """Columns at the floor whose terms move together: their part of the estimate is a mean
    of right-skewed values with few effective degrees of freedom, where the symmetric jackknife
    t-interval undercovers (0.89-0.93 here); the skew allowance of the near-floor part
    (``diagonal._floor_skew``) restores the band. Without it the same probes undercover (the
    test can see the difference)."""
    import fsinfo_fast.estimators.diagonal as diag

    s, sigma = NEAR_FLOOR_CORRELATED[name]
    J = spectral_jacobian(s, 96, 64, batch=B, seed=len(name))
    exact = exact_fsinfo_diag(J[:1], sigma, 1e-10)
    P = DenseProducts(J)
    r = estimate_diag(P, sigma=sigma, num_probes=K, seed=31).fsinfo_diag
    _check(name, r.value, r.ci_halfwidth, exact, what=f"FSInfo_diag near the floor (K={K})",
           band=BAND)
    monkeypatch.setattr(diag, "_floor_skew", lambda terms, *a: torch.zeros_like(terms[:, 0]))
    old = estimate_diag(P, sigma=sigma, num_probes=K, seed=31).fsinfo_diag
    assert torch.equal(old.value, r.value)
    assert (old.ci_halfwidth <= r.ci_halfwidth).all()
    if K == 4:
        assert coverage(old.value, old.ci_halfwidth, exact) < BAND[0]


def test_diag_skew_allowance_absent_far_from_the_floor(monkeypatch):
    """Far above the floor (every column's ``x >= 1e8``) the allowance is not evaluated: the
    half-widths are bit-identical with and without it."""
    import fsinfo_fast.estimators.diagonal as diag

    J = spectral_jacobian(geometric_spectrum(64, 1e6), 96, 64, batch=8, seed=3)
    P = DenseProducts(J)
    r = estimate_diag(P, sigma=SIGMA, num_probes=8, seed=1).fsinfo_diag

    def fail(*a):
        raise AssertionError("evaluated far from the floor")

    monkeypatch.setattr(diag, "_floor_skew", fail)
    again = estimate_diag(P, sigma=SIGMA, num_probes=8, seed=1).fsinfo_diag
    assert torch.equal(again.ci_halfwidth, r.ci_halfwidth)


@pytest.mark.slow
def test_diag_floor_real_encoder_near_the_floor():
    """The issue's case: a random MobileNetV2 (inverted residual blocks, ReLU6, BatchNorm) cut
    after its fourth block has every ``D_k / sigma^2`` at or below the floor. The plug-in was
    off by 0.025 nats/dim at K = 20 with a 1e-12 half-width; now the error is at rounding
    level and inside the interval for every seed."""
    pytest.importorskip("transformers")
    from fsinfo_fast.data import natural_images
    from fsinfo_fast.models.third_party import build

    model = build("mobilenetv2", size=32)
    enc = nn.Sequential(model.conv_stem, *model.layer[:4]).eval()
    x, _ = natural_images(size=32, n=1)
    D = ref.fisher_diag(enc, x)[0]
    assert float(D.max()) / SIGMA**2 < 1e-10  # the regime of the issue
    exact = ref.fsinfo(enc, x, SIGMA, "diag").value
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.engine import make_products

    n = 64
    P = make_products(prepare(enc, x.expand(n, -1, -1, -1).contiguous(), check_interaction=1))
    for K in (4, 20):
        r = estimate_diag(P, sigma=SIGMA, num_probes=K, seed=2).fsinfo_diag
        err = r.value - exact
        assert float(err.mean().abs()) < 1e-9, float(err.mean())
        assert ((err.abs() <= r.ci_halfwidth).all()), float(err.abs().max())
        assert float(r.ci_halfwidth.max()) < 1e-9
