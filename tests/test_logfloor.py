"""The unbiased floor term of FSInfo_diag (fsinfo_fast.estimators.logfloor).

Checked two independent ways: ``H_alpha`` against ``mpmath``'s ``2F2`` at 40 digits (its closed
form ``H_alpha(x) = (x/alpha) 2F2(1, 1; 2, alpha + 1; -x)``), and the property that makes it the
estimator: ``E[log a + H_alpha(alpha s / a)] = log(D + a)`` for ``s ~ D chi2_K / K``, by
adaptive quadrature over the Gamma density (no Monte Carlo).
"""

from __future__ import annotations

import math

import pytest
import torch

from fsinfo_fast.estimators.logfloor import (
    H_ABS_ERR,
    floor_correction,
    h_alpha,
    log_floor_term,
    x_hi,
)

ALPHAS = [0.5, 1.0, 2.0, 3.5, 10.5, 49.5, 500.0]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_h_alpha_matches_mpmath(alpha):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    g = torch.Generator().manual_seed(int(2 * alpha))
    top = math.log(40 * x_hi(alpha))
    # random points over the whole range, plus both ends of every regime
    xs = torch.exp(torch.empty(16, dtype=torch.float64).uniform_(math.log(1e-9), top, generator=g))
    xs = torch.cat([xs, torch.tensor([0.5, 0.5000001, x_hi(alpha), x_hi(alpha) * 1.07])])
    got = h_alpha(xs, alpha)
    for x, v in zip(xs.tolist(), got.tolist(), strict=True):
        want = mpmath.mpf(x) / alpha * mpmath.hyp2f2(1, 1, 2, alpha + 1, -mpmath.mpf(x))
        assert abs(v - float(want)) <= H_ABS_ERR, (alpha, x, v, float(want))


@pytest.mark.parametrize("alpha", [1.0, 1.5, 5.0, 50.0])
@pytest.mark.parametrize("u", [1e-3, 0.1, 1.0, 10.0, 1e6])
def test_unbiased_by_quadrature(alpha, u):
    """``E[H_alpha(u G)] = log(1 + u)`` for ``G ~ Gamma(alpha, 1)`` (i.e. ``D/a = u``)."""
    from scipy import integrate, special

    def f(g):
        h = float(h_alpha(torch.tensor([u * g], dtype=torch.float64), alpha))
        return h * math.exp((alpha - 1) * math.log(g) - g - special.gammaln(alpha))

    hi = special.gammaincinv(alpha, 1 - 1e-16)
    val, err = integrate.quad(f, 0, hi, limit=400, epsabs=1e-13, epsrel=1e-13, points=[alpha])
    assert abs(val - math.log1p(u)) < 1e-11 + 10 * err


def test_plugin_is_biased_where_the_exact_term_is_not():
    """The old plug-in ``log(s + a) - E log(chi2_K/K)`` is off by ``-E log(chi2_K/K)`` at the
    floor; the exact term's expectation is ``log a`` there (quadrature, K = 20)."""
    from scipy import integrate, special

    alpha, u = 10.0, 1e-6
    dens = lambda g: math.exp((alpha - 1) * math.log(g) - g - special.gammaln(alpha))  # noqa: E731
    offset = float(special.digamma(alpha) - math.log(alpha))
    plug = integrate.quad(lambda g: math.log1p(u * g / alpha * alpha) * dens(g), 0, 80)[0]
    exact = integrate.quad(
        lambda g: float(h_alpha(torch.tensor([u * g], dtype=torch.float64), alpha)) * dens(g),
        0,
        80,
    )[0]
    assert abs((plug - offset) - math.log1p(u)) > 0.05  # -E log(chi2_20/20) = 0.0508
    assert abs(exact - math.log1p(u)) < 1e-12


def test_limits_and_monotonicity():
    x = torch.logspace(-12, 12, 500, dtype=torch.float64)
    for alpha in (1.0, 2.0, 10.0):
        h = h_alpha(x, alpha)
        assert bool((h.diff() > 0).all())  # increasing
        assert h[0] == pytest.approx(1e-12 / alpha, rel=1e-9)  # H ~ x / alpha at 0
    e = floor_correction(torch.tensor([1e9], dtype=torch.float64), 3.0)
    assert float(e) == pytest.approx(2.0 / 1e9, rel=1e-8)  # E ~ (alpha - 1) / x
    s = torch.tensor([0.0, 1e-30, 1.0], dtype=torch.float64)
    t = log_floor_term(s, 4, 1e-12)
    assert float(t[0]) == math.log(1e-12) and float(t[1]) == pytest.approx(math.log(1e-12))
    with pytest.raises(ValueError, match="half-integer"):
        h_alpha(x, 0.7)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.5, 10.0, 200.0])
@pytest.mark.parametrize("lo", [1e-3, 1e3, 1e6, 1e9, 1e14])
def test_floor_correction_overwrite_same_bits(alpha, lo):
    """``overwrite=True`` (the series in the caller's temporary) gives the same bits, and the
    default leaves ``x`` alone."""
    x = torch.logspace(math.log10(lo), 16, 3001, dtype=torch.float64)
    keep = x.clone()
    ref = floor_correction(x, alpha)
    assert torch.equal(x, keep)
    got = floor_correction(x.clone(), alpha, overwrite=True)
    assert torch.equal(ref.view(torch.int64), got.view(torch.int64))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_h_alpha_bound_on_a_dense_grid(alpha):
    """``H_ABS_ERR`` holds on a dense grid of the table region, where ``alpha = 1/2`` reached
    1.32e-11 at ``x ~ 3.36`` (over the former bound 1e-11; helper 137)."""
    mpmath = pytest.importorskip("mpmath")
    import numpy as np

    xs = torch.tensor(np.logspace(np.log10(0.5), np.log10(40.0), 300), dtype=torch.float64)
    got = h_alpha(xs, alpha)
    worst = 0.0
    with mpmath.workdps(40):
        for x, v in zip(xs.tolist(), got.tolist(), strict=True):
            want = mpmath.mpf(x) / alpha * mpmath.hyp2f2(1, 1, 2, alpha + 1, -mpmath.mpf(x))
            worst = max(worst, abs(v - float(want)))
    assert worst <= H_ABS_ERR, (alpha, worst)
