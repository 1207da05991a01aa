"""Tier B and error paths of the estimators: exact quadrature, reproducibility, batch
independence, adaptive stopping, pass accounting, non-finite probes, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError, NonFiniteProbeError
from fsinfo_fast.estimators import (
    Estimate,
    Products,
    StoppingRule,
    draw_probes,
    estimate_diag,
    expected_passes,
    hutchinson_trace,
    hutchpp_trace,
    log_chi2_mean_offset,
    slq_logdet,
    slq_quadrature,
)
from fsinfo_fast.formulas import HALF_LOG_2PIE
from fsinfo_fast.testing import (
    TOL,
    assert_close_verbose,
    exact_fsinfo_diag,
    exact_fsinfo_logdet,
    exact_log_quadform,
    exact_trace,
    geometric_spectrum,
    spectral_jacobian,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mixed_batch(b: int = 4, m: int = 9, d: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    return J * torch.logspace(0, -2, d, dtype=torch.float64)  # columns of different scales


ESTIMATORS = {
    "diag": lambda P, **kw: estimate_diag(P, sigma=0.1, **kw).fsinfo_diag,
    "dfil_diag": lambda P, **kw: estimate_diag(P, sigma=0.1, **kw).dfil,
    "hutchinson": lambda P, **kw: hutchinson_trace(P, sigma=0.1, **kw),
    "hutchpp": lambda P, **kw: hutchpp_trace(P, sigma=0.1, sketch_size=3, **kw),
    "slq": lambda P, **kw: slq_logdet(P, sigma=0.1, prior_var=1.0, order=5, **kw),
    "slq_gk": lambda P, **kw: slq_logdet(P, sigma=0.1, order=5, method="golub_kahan", **kw),
}


# --- SLQ: the quadrature is exact once the order reaches n ------------------------------------


@pytest.mark.parametrize(
    "spectrum, m, d, prior_var, method, side",
    [
        (geometric_spectrum(12, 1e3), 20, 12, None, "lanczos", "input"),  # cond(A) = 1e6
        (geometric_spectrum(12, 1e6), 20, 12, None, "golub_kahan", "input"),  # cond(J) = 1e6
        (geometric_spectrum(12, 1e6), 20, 12, 1e-4, "lanczos", "input"),
        (geometric_spectrum(9, 1e6), 9, 15, 1.0, "lanczos", "output"),
        (geometric_spectrum(9, 1e6), 9, 15, 1.0, "golub_kahan", "output"),
        (torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 0.5]), 20, 12, 2.0, "lanczos", "input"),
        (torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 0.5]), 20, 12, 2.0, "golub_kahan", "input"),
    ],
)
def test_slq_exact_at_full_order(spectrum, m, d, prior_var, method, side):
    J = spectral_jacobian(spectrum, m, d, batch=2, seed=3)
    n = d if side == "input" else m
    ids = torch.arange(2)
    probes = [
        draw_probes(n, seed=0, sample_ids=ids, count=4, kind=k) for k in ("rademacher", "gaussian")
    ]
    e1 = torch.zeros(2, 1, n, dtype=torch.float64)
    e1[:, 0, 0] = 1.0
    probes.append(e1)
    for V in probes:
        P = DenseProducts(J)
        t, passes = slq_quadrature(
            P, V, sigma=0.1, prior_var=prior_var, order=n, side=side, method=method
        )
        exact = exact_log_quadform(J, V, 0.1, prior_var, side)
        assert not t.zero.any() and not t.bound.any() and t.converged.all()
        assert_close_verbose(
            t.value,
            exact,
            rtol=TOL.quadrature_atol,
            atol=TOL.quadrature_atol,
            name=f"v^T log(A) v ({method}, {side})",
        )
        # the reported bracket contains the exact value
        slack = TOL.quadrature_atol * exact.abs().clamp_min(1.0)
        assert (exact <= t.value + t.rounding + slack).all()
        assert (exact >= t.value - t.quad_error - t.rounding - slack).all()
        assert passes == P.passes <= 2 * n * V.shape[1]


@pytest.mark.parametrize("method", ["lanczos", "golub_kahan"])
def test_slq_breakdown_stops_early_and_is_exact(method):
    # 3 distinct non-zero singular values + a null space: 4 distinct eigenvalues with a prior
    s = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    J = spectral_jacobian(s, 20, 12, batch=2, seed=1)
    V = draw_probes(12, seed=0, sample_ids=torch.arange(2), count=4, kind="rademacher")
    P = DenseProducts(J)
    t, passes = slq_quadrature(P, V, sigma=1.0, prior_var=1.0, order=12, method=method,
                               quad_atol=1e-10)
    assert_close_verbose(t.value, exact_log_quadform(J, V, 1.0, 1.0), rtol=1e-10, atol=1e-10)
    assert passes <= 2 * 4 * 4 and (t.order == 4).all()  # stopped after 4 steps, not 12
    # an eigenvector as probe: invariant after one step
    _, _, Rh = torch.linalg.svd(J[0])
    v = Rh[1].expand(2, 1, 12).contiguous()
    t, passes = slq_quadrature(
        DenseProducts(J), v, sigma=1.0, prior_var=1.0, order=12, method=method
    )
    assert_close_verbose(t.value, torch.full((2, 1), math.log(4.0 + 1.0), dtype=torch.float64))
    assert passes <= 2
    # without a prior J^T J is singular, but only numerically (a rotated null space, not an
    # exactly zero column): a finite upper bound, flagged, never -inf or NaN
    t, _ = slq_quadrature(DenseProducts(J), V, sigma=1.0, order=12, method=method)
    assert t.bound.all() and torch.isfinite(t.value).all() and not t.zero.any()
    est = slq_logdet(DenseProducts(J), sigma=1.0, order=12, num_probes=4, method=method)
    assert torch.isfinite(est.value).all() and est.bound.all() and not est.singular.any()
    assert torch.isfinite(est.ci_halfwidth).all() and not torch.isnan(est.stderr).any()
    # an upper bound of the log det with the null eigenvalues lifted to anything below the
    # precision floor (~1e-13 here), let alone of the true -inf
    lifted = exact_fsinfo_logdet(J, 1.0, prior_var=1e20)
    assert (est.value + est.ci_halfwidth > lifted).all()


def test_slq_m_less_than_d_without_prior_is_minus_inf_for_free():
    J = spectral_jacobian(geometric_spectrum(5, 10.0), 5, 9, batch=3)
    P = DenseProducts(J)
    est = slq_logdet(P, sigma=0.1, num_probes=10)
    assert torch.isneginf(est.value).all() and est.singular.all() and est.converged.all()
    assert est.passes == 0 == P.passes and not torch.isnan(est.stderr).any()
    assert torch.isneginf(exact_fsinfo_logdet(J, 0.1)).all()
    # with a prior: finite, (d - m) log(lambda) added, agrees with the exact value at order n
    est = slq_logdet(DenseProducts(J), sigma=0.1, prior_var=4.0, num_probes=30)
    exact = exact_fsinfo_logdet(J, 0.1, 4.0)
    assert est.info["side"] == "output"
    assert (est.value - exact).abs().max() < 4 * est.stderr.max() + 1e-12


def test_slq_exact_probes_give_exact_logdet():
    """Quadrature exact at order n plus Rademacher probes on a diagonal A: zero variance."""
    J = torch.diag(torch.tensor([3.0, 1.0, 0.1], dtype=torch.float64))[None].expand(2, 3, 3)
    for method in ("lanczos", "golub_kahan"):
        est = slq_logdet(DenseProducts(J), sigma=0.5, num_probes=3, method=method)
        assert_close_verbose(est.value, exact_fsinfo_logdet(J, 0.5), rtol=1e-12)


# --- diag estimator details --------------------------------------------------------------------


def test_diag_jackknife_matches_brute_force():
    J = _mixed_batch(b=2)
    K, sigma, d = 6, 0.3, 7
    kw = dict(sigma=sigma, floor=0.0, num_probes=K, seed=4)
    plain = estimate_diag(DenseProducts(J), exact_diagonal=False, **kw)
    est = estimate_diag(DenseProducts(J), **kw)
    U = draw_probes(9, seed=4, sample_ids=torch.arange(2), count=K)
    g2 = torch.einsum("bmd,bkm->bkd", J, U) ** 2

    def terms(sub):  # debiased per-column terms from a subset of probes: [B, d]
        return torch.log(sub.mean(dim=1)) - log_chi2_mean_offset(sub.shape[1]) - 2 * math.log(sigma)

    def jack(full, loo):  # delete-one jackknife variance over dim 1 of loo
        return (K - 1) / K * ((loo - loo.mean(dim=1, keepdim=True)) ** 2).sum(dim=1)

    t_full = terms(g2)
    t_loo = torch.stack([terms(torch.cat([g2[:, :j], g2[:, j + 1 :]], dim=1)) for j in range(K)], 1)
    full = t_full.mean(dim=1) / 2 - HALF_LOG_2PIE
    var = jack(full, t_loo.mean(dim=2) / 2)
    f = plain.fsinfo_diag
    assert_close_verbose(f.value, full, name="diag value")
    assert_close_verbose(f.stderr, var.sqrt(), name="delete-one jackknife")
    from fsinfo_fast.estimators import t_quantile

    assert_close_verbose(f.ci_halfwidth, t_quantile(K - 1) * var.sqrt(), name="t interval")
    # exact diagonal part: the per-column jackknife variances are replaced by psi'(K/2)
    from scipy.special import polygamma

    per_col = jack(t_full, t_loo).sum(dim=1) / (4 * d * d)
    known = d * float(polygamma(1, K / 2.0)) / (4 * d * d)  # trigamma
    from scipy.stats import norm

    floor_se = float(norm.ppf(0.975)) / t_quantile(K - 1) * math.sqrt(known)
    want = torch.clamp((var - per_col + known).clamp_min(0).sqrt(), min=floor_se)
    assert_close_verbose(est.fsinfo_diag.value, full, name="value unchanged")
    assert_close_verbose(est.fsinfo_diag.stderr, want, name="exact-diagonal jackknife")
    t = g2.sum(dim=2)
    assert_close_verbose(est.dfil.value, t.mean(dim=1) / (sigma**2 * 7))
    assert_close_verbose(est.dfil.stderr, t.std(dim=1) / math.sqrt(K) / (sigma**2 * 7))


def test_diag_groups_bound_memory_and_keep_dof():
    J = _mixed_batch(b=3)
    est = estimate_diag(DenseProducts(J), sigma=0.1, num_probes=45, jackknife_groups=10)
    assert (est.fsinfo_diag.info["dof"] == 9).all() and (est.dfil.info["dof"] == 44).all()
    assert torch.isfinite(est.fsinfo_diag.stderr).all() and (est.fsinfo_diag.stderr > 0).all()


def test_diag_zero_column_and_floor():
    J = _mixed_batch(b=2)
    J[1, :, 3] = 0.0
    est = estimate_diag(DenseProducts(J), sigma=0.1, floor=0.0, num_probes=8)
    f = est.fsinfo_diag
    assert torch.isfinite(f.value[0]) and torch.isneginf(f.value[1])
    assert f.singular.tolist() == [False, True] and f.stderr[1] == 0
    assert not torch.isnan(f.stderr).any() and not torch.isnan(f.ci_halfwidth).any()
    # with the paper's floor the zero column contributes log(1e-10) exactly
    est = estimate_diag(DenseProducts(J), sigma=0.1, floor=1e-10, num_probes=400)
    exact = exact_fsinfo_diag(J, 0.1, 1e-10)
    assert torch.isfinite(est.fsinfo_diag.value).all()
    assert ((est.fsinfo_diag.value - exact).abs() < 4 * est.fsinfo_diag.stderr).all()


def test_float32_products_match_float64():
    J = _mixed_batch(b=3)
    for name, fn in ESTIMATORS.items():
        a = fn(DenseProducts(J), num_probes=6, seed=2)
        b = fn(DenseProducts(J.float()), num_probes=6, seed=2)
        assert b.value.dtype == torch.float64
        assert_close_verbose(b.value, a.value, rtol=TOL.float32_rtol, atol=1e-5, name=name)


# --- reproducibility, batch independence, pass accounting -------------------------------------


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_reproducible_and_seed_dependent(name):
    fn, J = ESTIMATORS[name], _mixed_batch()
    a = fn(DenseProducts(J), num_probes=5, seed=11)
    b = fn(DenseProducts(J), num_probes=5, seed=11)
    c = fn(DenseProducts(J), num_probes=5, seed=12)
    for f in ("value", "stderr", "ci_halfwidth"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.value, c.value)
    g = fn(DenseProducts(J), num_probes=5, seed=torch.Generator().manual_seed(3))
    h = fn(DenseProducts(J), num_probes=5, seed=torch.Generator().manual_seed(3))
    assert torch.equal(g.value, h.value)


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("adaptive", [False, True])
def test_batch_independent(name, adaptive):
    fn, J = ESTIMATORS[name], _mixed_batch(b=4)
    ids = torch.tensor([10, 3, 7, 0])
    kw = (
        dict(atol=1e-9, rtol=0.05, min_probes=4, round_size=3, max_probes=40)
        if adaptive
        else dict(num_probes=6)
    )
    full = fn(DenseProducts(J), seed=5, sample_ids=ids, **kw)
    for b in range(4):
        alone = fn(DenseProducts(J[b : b + 1]), seed=5, sample_ids=ids[b : b + 1], **kw)
        assert_close_verbose(
            alone.value,
            full.value[b : b + 1],
            rtol=1e-12,
            atol=0,
            name=f"{name}: sample {b} alone vs in the batch",
        )
        assert_close_verbose(alone.stderr, full.stderr[b : b + 1], rtol=1e-12, atol=0)
        assert int(alone.probes_per_sample[0]) == int(full.probes_per_sample[b])
    sub = fn(DenseProducts(J[[2, 0]]), seed=5, sample_ids=ids[[2, 0]], **kw)
    assert_close_verbose(sub.value, full.value[[2, 0]], rtol=1e-12, atol=0)


def test_passes_are_counted():
    J = _mixed_batch()
    cases = [
        (lambda P: estimate_diag(P, sigma=0.1, num_probes=7), 7, (0, 7)),
        (lambda P: hutchinson_trace(P, side="input", num_probes=7), 7, (7, 0)),
        (lambda P: hutchinson_trace(P, side="output", num_probes=7), 7, (0, 7)),
        (lambda P: hutchpp_trace(P, sketch_size=2, num_probes=7, side="input"), 13, (2 + 2 + 7, 2)),
        (lambda P: slq_logdet(P, sigma=0.1, prior_var=1.0, order=4, num_probes=7), 56, (28, 28)),
    ]
    for run, passes, (jv, vj) in cases:
        P = DenseProducts(J)
        est = run(P)
        est = est.fsinfo_diag if hasattr(est, "fsinfo_diag") else est
        assert est.passes == passes == P.passes and (P.jvp_passes, P.vjp_passes) == (jv, vj)
        assert (
            expected_passes(
                {
                    "chi2_debiased_diag": "diag",
                    "hutchinson": "hutchinson",
                    "hutch++": "hutch++",
                    "slq_lanczos": "slq",
                }[est.info["method"]],
                d=7,
                m=9,
                num_probes=7,
                order=4,
                sketch_size=2,
                prior=True,
            )
            == passes
        )
    assert expected_passes("exact", d=7, m=9) == 7
    assert expected_passes("slq", d=9, m=7, num_probes=7) == 0
    with pytest.raises(InvalidInputError, match="estimator"):
        expected_passes("magic", d=1, m=1)


def test_diag_dfil_is_output_side_gaussian_hutchinson():
    J = _mixed_batch()
    a = estimate_diag(DenseProducts(J), sigma=0.1, num_probes=8, seed=3).dfil
    b = hutchinson_trace(DenseProducts(J), sigma=0.1, num_probes=8, seed=3, side="output")
    assert_close_verbose(a.value, b.value, rtol=1e-14, atol=0)


def test_hutchpp_sketch_spanning_the_range_is_exact():
    J = spectral_jacobian(torch.tensor([3.0, 1.0, 0.5]), 9, 7, batch=2)
    est = hutchpp_trace(DenseProducts(J), sketch_size=3, num_probes=4, side="input")
    assert_close_verbose(est.value, exact_trace(J), rtol=1e-12)
    assert (est.ci_halfwidth >= (est.value - exact_trace(J)).abs()).all()
    assert (est.stderr < 1e-12 * est.value).all()


# --- adaptive stopping -------------------------------------------------------------------------


def test_adaptive_meets_atol_and_freezes_samples():
    """Three stages: stage 1 (probes 0..9) sizes stage 2 (10..n0-1), whose spread sizes stage 3
    (n0..K-1); the sample is reported from stage 3 alone, with Stein's half-width (stage 2's
    interval, its standard error scaled to stage 3's count), which meets atol by
    construction."""
    J = _mixed_batch(b=4)
    J[0] *= torch.logspace(0, -3, 7, dtype=torch.float64)  # harder sample: more spread columns
    P = DenseProducts(J)
    est = estimate_diag(
        P, sigma=0.1, floor=0.0, atol=0.03, min_probes=10, round_size=10, growth=1.0,
        max_probes=2000,
    )
    f = est.fsinfo_diag
    n0s = f.info["pilot_probes"]
    assert f.converged.all() and (f.ci_halfwidth <= 0.03).all()
    assert f.num_probes == int(f.probes_per_sample.max()) == P.vjp_passes == f.passes
    assert ((f.probes_per_sample - 10) % 10 == 0).all() and (n0s % 10 == 0).all()
    assert (f.probes_per_sample > n0s).all() and (n0s >= 20).all()
    sigma = 0.1
    for b in range(4):
        k, n0, ids = int(f.probes_per_sample[b]), int(n0s[b]), torch.tensor([b])
        # the value: the exactly debiased estimate from the fresh probes n0..k-1 only
        U = draw_probes(J.shape[1], seed=0, sample_ids=ids, start=n0, count=k - n0)
        g2 = (U[0] @ J[b]) ** 2  # [k - n0, d]
        terms = torch.log(g2.mean(dim=0)) - log_chi2_mean_offset(k - n0) - 2 * math.log(sigma)
        value = terms.mean() / 2 - HALF_LOG_2PIE
        assert_close_verbose(f.value[b], value, rtol=1e-12, atol=0)
        assert int(f.info["dof"][b]) == min(n0 - 10, 20) - 1  # stage 2's jackknife dof


def test_adaptive_trace_is_stein_on_fresh_probes():
    """Hutchinson by hand: stage 3's mean, stage 2's log-scale interval with its standard
    error scaled by sqrt(n2 / n3) and its dof."""
    from fsinfo_fast.estimators import initial_probes
    from fsinfo_fast.estimators.hutchinson import log_t_halfwidth

    J = _mixed_batch(b=3)
    est = hutchinson_trace(DenseProducts(J), rtol=0.1, seed=4, max_probes=5000)
    n1 = initial_probes(quantity="trace")  # the trace's start (4)
    for b in range(3):
        k, k2 = int(est.probes_per_sample[b]), int(est.info["pilot_probes"][b])
        U = draw_probes(J.shape[1], seed=4, sample_ids=torch.tensor([b]), count=k)[0]
        t = ((U @ J[b]) ** 2).sum(dim=1)  # per-probe ||J^T u||^2
        s2, s3 = t[n1:k2], t[k2:k]
        assert_close_verbose(est.value[b], s3.mean(), rtol=1e-12, atol=0)
        se = s2.std() / math.sqrt(len(s2)) * math.sqrt(len(s2) / len(s3))
        hw = log_t_halfwidth(s2.mean()[None], se[None], len(s2) - 1)
        assert_close_verbose(est.ci_halfwidth[b : b + 1], hw, rtol=1e-9, atol=0)
        assert float(hw) <= 0.1 * float(s3.mean())


@pytest.mark.parametrize("name", ["hutchinson", "hutchpp", "slq", "dfil_diag"])
def test_adaptive_rtol_and_atol_other_estimators(name):
    fn, J = ESTIMATORS[name], _mixed_batch()
    if name == "dfil_diag":
        est = estimate_diag(DenseProducts(J), sigma=0.1, dfil_rtol=0.1, max_probes=5000).dfil
        assert est.converged.all() and (est.ci_halfwidth <= 0.1 * est.value).all()
        return
    if name != "slq":  # FSInfo can be near 0: rtol is for the traces
        est = fn(DenseProducts(J), rtol=0.1, min_probes=10, max_probes=5000)
        assert est.converged.all()
        assert (est.ci_halfwidth <= 0.1 * est.value.abs()).all()
        atol = float(est.ci_halfwidth.max())  # reachable, in the value's units
    else:
        atol = 0.01  # nats per dimension
    P = DenseProducts(J)
    est = fn(P, atol=atol, min_probes=10, max_probes=5000)
    assert (est.ci_halfwidth <= atol).all() and est.converged.all()
    assert est.num_probes == int(est.probes_per_sample.max()) < 5000
    assert est.passes == P.passes


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_max_probes_cap_reports_not_converged(name):
    fn, J = ESTIMATORS[name], _mixed_batch(b=2)
    est = fn(DenseProducts(J), atol=1e-12, min_probes=4, round_size=4, max_probes=10)
    assert not est.converged.any()
    assert est.num_probes == 10 and (est.probes_per_sample == 10).all()
    assert torch.isfinite(est.value).all() and (est.ci_halfwidth > 1e-12).all()


def test_fixed_probes_with_tolerance_sets_converged():
    J = _mixed_batch(b=2)
    est = hutchinson_trace(DenseProducts(J), num_probes=20, rtol=1e-9)
    assert est.num_probes == 20 and not est.converged.any()
    est = hutchinson_trace(DenseProducts(J), num_probes=20)
    assert est.converged.all()


def test_stopping_schedule():
    assert list(StoppingRule(num_probes=7).schedule()) == [(0, 7, True)]
    assert list(StoppingRule(atol=1.0, min_probes=5, round_size=5, max_probes=5).schedule()) == [
        (0, 5, True)
    ]
    sched = list(StoppingRule(rtol=0.1, min_probes=3, round_size=4, max_probes=12).schedule())
    # (a last round of one probe joins the round before it: a stage needs two for a spread)
    assert sched == [(0, 3, False), (3, 4, False), (7, 5, True)]
    assert list(StoppingRule(atol=1.0, min_probes=4, max_probes=5).schedule()) == [(0, 5, True)]
    # the default start and geometric rounds: few calls, each boundary fixed by the rule
    from fsinfo_fast.estimators.stopping import DEFAULT_GROWTH, DEFAULT_ROUND, initial_probes

    rule = StoppingRule(atol=0.01, min_probes=initial_probes(), round_size=DEFAULT_ROUND,
                        growth=DEFAULT_GROWTH, max_probes=1000)
    ks = [s + c for s, c, _ in rule.schedule()]
    assert ks[:8] == [4, 6, 9, 14, 21, 32, 48, 72] and ks[-1] == 1000 and len(ks) == 15
    steps = [max(DEFAULT_ROUND, math.ceil(0.5 * a)) for a in ks[:-2]]
    assert [b - a for a, b in zip(ks[:-2], ks[1:-1], strict=True)] == steps
    assert initial_probes(max_probes=3) == 3 and initial_probes(num_probes=9) == 9
    assert initial_probes(min_probes=1) == 2
    for bad in (0.5, 20.0, True, "2"):
        with pytest.raises(InvalidInputError, match="growth"):
            StoppingRule(atol=0.1, growth=bad)
    # the estimators' defaults use it
    J = _mixed_batch(b=2)
    est = hutchinson_trace(DenseProducts(J), sigma=0.1, rtol=1e-9, max_probes=20)
    assert est.num_probes == 20 and (est.probes_per_sample == 20).all()
    P = DenseProducts(J)
    est = estimate_diag(P, sigma=0.1, atol=1e-9, max_probes=14)
    assert P.vjp_passes == 14 and not est.fsinfo_diag.converged.any()


# --- non-finite contributions raise ------------------------------------------------------------


class PoisonedProducts:
    """Wraps Products and puts NaN into one probe of one sample on the n-th call."""

    def __init__(self, inner: Products, *, call: int, sample: int, probe: int, op: str):
        self.inner, self.call, self.sample, self.probe, self.op = inner, call, sample, probe, op
        self.batch, self.d, self.m = inner.batch, inner.d, inner.m
        self.dtype, self.device = inner.dtype, inner.device
        self.calls = 0

    def _maybe(self, out, op):
        if op == self.op:
            self.calls += 1
            if self.calls == self.call:
                out = out.clone()
                out[self.sample, self.probe, 0] = math.inf if op == "jvp" else math.nan
        return out

    def jvp(self, V):
        return self._maybe(self.inner.jvp(V), "jvp")

    def vjp(self, U):
        return self._maybe(self.inner.vjp(U), "vjp")


@pytest.mark.parametrize(
    "run, op, call, expected_probe",
    [
        (lambda P, **kw: estimate_diag(P, sigma=0.1, **kw), "vjp", 2, 7),
        (lambda P, **kw: hutchinson_trace(P, side="input", **kw), "jvp", 2, 7),
        (lambda P, **kw: hutchpp_trace(P, side="input", sketch_size=2, **kw), "jvp", 4, 7),
        (lambda P, **kw: slq_logdet(P, sigma=0.1, prior_var=1.0, order=3, **kw), "jvp", 4, 7),
    ],
)
def test_non_finite_probe_raises(run, op, call, expected_probe):
    J = _mixed_batch(b=3)
    P = PoisonedProducts(DenseProducts(J), call=call, sample=1, probe=3, op=op)
    with pytest.raises(
        NonFiniteProbeError,
        match=f"probe {expected_probe} of sample 21 "
        r"\(batch index 1\)",
    ):
        run(
            P,
            atol=1e-9,
            min_probes=4,
            round_size=4,
            max_probes=12,
            sample_ids=torch.tensor([20, 21, 22]),
        )


# --- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_probes=1), "num_probes must be >= 2"),
        (dict(num_probes=2.5), "num_probes must be an int"),
        (dict(atol=0.0), "atol must be positive"),
        (dict(atol=-1.0), "atol must be positive"),
        (dict(rtol=math.nan), "rtol must be positive"),
        (dict(atol=0.1, min_probes=1), "min_probes"),
        (dict(atol=0.1, min_probes=20, max_probes=10), "max_probes"),
        (dict(atol=0.1, round_size=0), "round_size"),
        (dict(atol=0.1, confidence=1.5), "confidence"),
        (dict(), "give num_probes"),
    ],
)
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_stopping_argument_errors(name, kw, match):
    with pytest.raises(InvalidInputError, match=match):
        ESTIMATORS[name](DenseProducts(_mixed_batch(b=1)), **kw)


def test_other_argument_errors():
    P = DenseProducts(_mixed_batch(b=2))
    with pytest.raises(InvalidInputError, match="side"):
        hutchinson_trace(P, side="left", num_probes=4)
    with pytest.raises(InvalidInputError, match="kind"):
        hutchinson_trace(P, kind="uniform", num_probes=4)
    with pytest.raises(InvalidInputError, match="sketch_size"):
        hutchpp_trace(P, sketch_size=0, num_probes=4)
    with pytest.raises(InvalidInputError, match="order"):
        slq_logdet(P, sigma=0.1, order=0, num_probes=4)
    with pytest.raises(InvalidInputError, match="method"):
        slq_logdet(P, sigma=0.1, method="cg", num_probes=4)
    with pytest.raises(InvalidInputError, match="prior_var"):
        slq_logdet(P, sigma=0.1, prior_var=0.0, num_probes=4)
    with pytest.raises(InvalidInputTypeError, match="prior_var"):
        slq_logdet(P, sigma=0.1, prior_var="1", num_probes=4)
    with pytest.raises(InvalidInputError, match="floor"):
        estimate_diag(P, sigma=0.1, floor=-1.0, num_probes=4)
    with pytest.raises(InvalidInputError, match="jackknife_groups"):
        estimate_diag(P, sigma=0.1, jackknife_groups=1, num_probes=4)
    with pytest.raises(InvalidInputError, match="dfil_rtol"):
        estimate_diag(P, sigma=0.1, dfil_rtol=0.0)
    with pytest.raises(InvalidInputError, match="sigma"):
        estimate_diag(P, sigma=-0.1, num_probes=4)
    with pytest.raises(InvalidInputError, match="sigma"):
        estimate_diag(P, sigma=torch.ones(3), num_probes=4)
    with pytest.raises(InvalidInputTypeError, match="sigma"):
        estimate_diag(P, sigma="0.1", num_probes=4)
    with pytest.raises(InvalidInputError, match="sample_ids"):
        estimate_diag(P, sigma=0.1, num_probes=4, sample_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(InvalidInputTypeError, match="Products protocol"):
        hutchinson_trace(object(), num_probes=4)
    with pytest.raises(InvalidInputError, match="shape"):
        slq_quadrature(P, torch.ones(2, 1, 3), sigma=0.1)
    with pytest.raises(InvalidInputError, match="non-zero"):
        slq_quadrature(P, torch.zeros(2, 1, 7), sigma=0.1, prior_var=1.0)
    with pytest.raises(InvalidInputError, match=r"\[B, m, d\]"):
        DenseProducts(torch.ones(3, 3))
    with pytest.raises(InvalidInputTypeError):
        DenseProducts(torch.ones(1, 3, 3, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="jvp expects"):
        P.jvp(torch.ones(2, 1, 9, dtype=torch.float64))


def test_estimate_helpers_and_protocol():
    P = DenseProducts(_mixed_batch(b=2))
    assert isinstance(P, Products)
    est = slq_logdet(P, sigma=0.1, prior_var=1.0, num_probes=4)
    assert isinstance(est, Estimate) and len(est) == 2
    lo, hi = est.ci()
    assert torch.allclose(hi - lo, 2 * est.ci_halfwidth)
    bits = est.scaled(1 / math.log(2))
    assert torch.allclose(bits.value, est.value / math.log(2))
    assert torch.allclose(bits.stderr, est.stderr / math.log(2))
    # per-sample sigma: FSInfo + log(sigma) does not depend on sigma (same probes)
    sig = torch.tensor([0.1, 2.0], dtype=torch.float64)
    a = estimate_diag(P, sigma=sig, floor=0.0, num_probes=5).fsinfo_diag
    b = estimate_diag(P, sigma=1.0, floor=0.0, num_probes=5).fsinfo_diag
    assert_close_verbose(a.value + torch.log(sig), b.value)


def test_memory_chunking_does_not_change_results(monkeypatch):
    J = _mixed_batch(b=3)
    a = slq_logdet(DenseProducts(J), sigma=0.1, prior_var=1.0, order=5, num_probes=7)
    b = slq_logdet(DenseProducts(J), sigma=0.1, prior_var=1.0, order=5, num_probes=7, probe_chunk=3)
    assert_close_verbose(b.value, a.value, rtol=1e-12, atol=0)
    assert_close_verbose(b.stderr, a.stderr, rtol=1e-12, atol=0)
    # packing stopped probes out of product calls works per chunk: at least as many passes
    assert a.passes <= b.passes <= 2 * 5 * 7
    with pytest.raises(InvalidInputError, match="probe_chunk"):
        slq_logdet(DenseProducts(J), sigma=0.1, num_probes=7, probe_chunk=0)
    import fsinfo_fast.estimators.diagonal as diagonal

    c = estimate_diag(DenseProducts(J), sigma=0.1, num_probes=9)
    monkeypatch.setattr(diagonal, "_SLICE_ELEMS", 2 * 3 * 7)  # two probes per slice
    e = estimate_diag(DenseProducts(J), sigma=0.1, num_probes=9)
    assert_close_verbose(e.fsinfo_diag.value, c.fsinfo_diag.value, rtol=1e-12, atol=0)
    assert_close_verbose(e.fsinfo_diag.stderr, c.fsinfo_diag.stderr, rtol=1e-12, atol=0)
    assert_close_verbose(e.dfil.stderr, c.dfil.stderr, rtol=1e-12, atol=0)


# --- the probe state shared between requests (what Linearization keeps per seed) -----------


def _diag_fields(e):
    return (e.value, e.stderr, e.ci_halfwidth, e.probes_per_sample, e.converged)


@pytest.mark.parametrize("subsets", ["always", "auto", "never"])
def test_diag_state_reused_across_requests_equals_fresh(monkeypatch, subsets):
    """One DiagProbeState serving two requests (different sigma, floor and targets) gives each
    sample exactly the result of a fresh estimate_diag call, in either order and in any batch,
    and the second request only computes the probes the first did not: with the rounds on the
    samples still running (``always``) every probe of every sample is computed once, and each
    sample holds the most either request drew for it; with whole-batch rounds (``never``)
    every sample holds the most any sample drew; ``auto`` (measured costs) lies between."""
    from fsinfo_fast.estimators import base
    from fsinfo_fast.estimators.diagonal import DiagProbeState

    monkeypatch.setattr(base, "ROW_SUBSETS", subsets)

    J = _mixed_batch(b=4)
    J[0] *= torch.logspace(0, -3, 7, dtype=torch.float64)
    ids = torch.tensor([5, 1, 7, 2])
    reqs = [
        dict(sigma=0.1, atol=0.05),
        dict(sigma=torch.tensor([0.3, 1.0, 0.2, 0.5], dtype=torch.float64), floor=1e-10,
             atol=0.02, dfil_rtol=0.05),
    ]
    fresh = [estimate_diag(DenseProducts(J), seed=3, sample_ids=ids, **kw) for kw in reqs]
    for order in ([0, 1], [1, 0]):
        P = DenseProducts(J)
        st = DiagProbeState.for_products(P, seed=3, sample_ids=ids, snapshot_bytes=1 << 26)
        spent = torch.zeros(4, dtype=torch.int64)
        for i in order:
            r = estimate_diag(P, seed=3, sample_ids=ids, state=st, **reqs[i])
            for a, b in zip(_diag_fields(r.fsinfo_diag), _diag_fields(fresh[i].fsinfo_diag),
                            strict=True):
                assert torch.equal(a, b)
            for a, b in zip(_diag_fields(r.dfil), _diag_fields(fresh[i].dfil), strict=True):
                assert torch.equal(a, b)
            spent += r.fsinfo_diag.info["computed_per_sample"]
        most = max(f.fsinfo_diag.num_probes for f in fresh)
        assert st.k == most
        own = torch.maximum(*(f.fsinfo_diag.probes_per_sample for f in fresh))
        if subsets == "never":
            assert P.vjp_passes == most and torch.equal(spent, torch.full((4,), most))
        elif subsets == "always":
            assert torch.equal(st.counts, own) and torch.equal(spent, own)
        else:
            assert bool((st.counts >= own).all()) and bool((spent >= own).all())
    # batch independence: sample 7 alone, from its own state, gives the same result
    P1 = DenseProducts(J[2:3])
    st1 = DiagProbeState.for_products(P1, seed=3, sample_ids=ids[2:3], snapshot_bytes=1 << 26)
    kw = {**reqs[1], "sigma": reqs[1]["sigma"][2:3]}
    r1 = estimate_diag(P1, seed=3, sample_ids=ids[2:3], state=st1, **kw)
    for a, b in zip(_diag_fields(r1.fsinfo_diag), _diag_fields(fresh[1].fsinfo_diag), strict=True):
        assert torch.equal(a, b[2:3])


def test_diag_state_dropped_snapshot_says_so():
    from fsinfo_fast.estimators.diagonal import DiagProbeState, SnapshotDroppedError

    J = _mixed_batch(b=2)
    P = DenseProducts(J)
    st = DiagProbeState.for_products(P, seed=0)  # no snapshot budget
    estimate_diag(P, sigma=0.1, atol=1e-9, max_probes=9, state=st)  # rounds 4, 6, 9
    assert st.k == 9 and st.available() == [9] and st.dropped == [4, 6]
    with pytest.raises(SnapshotDroppedError, match="dropped"):
        estimate_diag(P, sigma=0.2, atol=1e-9, max_probes=9, state=st)
    with pytest.raises(SnapshotDroppedError, match="not a round boundary"):
        st.stats(5)
    with pytest.raises(InvalidInputError, match="same seed"):
        estimate_diag(P, sigma=0.1, num_probes=9, seed=1, state=st)
    # fixed K = 9 is served from the current count without products
    r = estimate_diag(P, sigma=0.1, num_probes=9, state=st)
    assert r.fsinfo_diag.passes == 0 and r.fsinfo_diag.info["reused_probes"] == 9


# --- one options object --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_stop_rule_equals_keywords(name):
    """``stop=StoppingRule(...)`` is the same request as the individual keywords (the thin
    convenience form); giving both raises instead of silently preferring one."""
    fn, J = ESTIMATORS[name], _mixed_batch(b=2)
    kw = dict(atol=0.2, rtol=0.2, min_probes=4, round_size=3, max_probes=60)
    a = fn(DenseProducts(J), seed=3, **kw)
    b = fn(DenseProducts(J), seed=3, stop=StoppingRule(**kw))
    assert torch.equal(a.value, b.value) and torch.equal(a.ci_halfwidth, b.ci_halfwidth)
    assert torch.equal(a.probes_per_sample, b.probes_per_sample)
    assert b.info["stopping"].startswith("three-stage") and "pilot_probes" in b.info
    fixed = fn(DenseProducts(J), seed=3, stop=StoppingRule(num_probes=5))
    assert fixed.info["stopping"] == "fixed: 5 probes" and (fixed.probes_per_sample == 5).all()
    with pytest.raises(InvalidInputError, match="not both"):
        fn(DenseProducts(J), stop=StoppingRule(num_probes=5), max_probes=10)
    with pytest.raises(InvalidInputTypeError, match="StoppingRule"):
        fn(DenseProducts(J), stop={"num_probes": 5})
    # a misspelt stopping keyword raises (the keywords are one **rule, not named parameters)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_probe'\]"):
        fn(DenseProducts(J), num_probe=5)


def test_stopping_keywords_are_declared_once():
    """The estimators take the stopping fields as one ``**rule: Unpack[StopKeywords]``, not as
    the same eight named parameters in every signature; StopKeywords is StoppingRule's fields
    less none."""
    import dataclasses
    import inspect

    from fsinfo_fast.estimators import estimate_diag_deflated, slq_trace
    from fsinfo_fast.estimators.stopping import STOP_KEYWORDS

    assert STOP_KEYWORDS == {f.name for f in dataclasses.fields(StoppingRule)}
    for fn in (estimate_diag, estimate_diag_deflated, hutchinson_trace, hutchpp_trace,
               slq_logdet, slq_trace):
        params = inspect.signature(fn).parameters
        assert not STOP_KEYWORDS & set(params), fn.__name__
        assert params["rule"].kind is inspect.Parameter.VAR_KEYWORD, fn.__name__
        assert "stop" in params, fn.__name__


def test_stop_rule_estimator_defaults():
    from fsinfo_fast.estimators.stopping import ESTIMATOR_DEFAULTS

    rule = StoppingRule(atol=0.1)
    assert rule.for_estimator("diag").min_probes == 4 and rule.for_estimator("diag").growth == 1.5
    assert rule.for_estimator("slq").round_size == 10
    assert StoppingRule(atol=0.1, max_probes=3).for_estimator("hutch++").min_probes == 3
    assert set(ESTIMATOR_DEFAULTS) == {"diag", "trace", "hutch++", "slq", "generic"}
    with pytest.raises(InvalidInputError, match="estimator"):
        rule.for_estimator("magic")
    # dFIL alone from the diagonal estimator's probes: stop_on, or dfil_rtol alone
    J = _mixed_batch(b=2)
    a = estimate_diag(DenseProducts(J), sigma=0.1, dfil_rtol=0.2, max_probes=200).dfil
    b = estimate_diag(DenseProducts(J), sigma=0.1, stop=StoppingRule(rtol=0.2, max_probes=200),
                      stop_on="dfil").dfil
    assert torch.equal(a.value, b.value) and torch.equal(a.converged, b.converged)
    with pytest.raises(InvalidInputError, match="stop_on"):
        estimate_diag(DenseProducts(J), sigma=0.1, stop=StoppingRule(rtol=0.2), stop_on="x")


def test_diag_adaptive_batch_independent_near_the_floor():
    """Samples whose stages end at different rounds, one of them at the paper's floor: each
    sample's value, interval and allowance are those it gets alone (a summary of one stage
    never sees the other samples' statistics: their floor terms and far-column masks)."""
    J = _mixed_batch(b=4, m=12, d=9)
    J[1] *= 1e-5  # (J^T J)_kk / sigma^2 ~ 1e-10..1e-14: at the floor
    J[3] *= torch.logspace(0, -2, 9, dtype=torch.float64)
    ids = torch.tensor([5, 1, 8, 2])
    kw = dict(sigma=0.1, seed=7, atol=0.05, dfil_rtol=0.1, max_probes=3000)
    full = estimate_diag(DenseProducts(J), sample_ids=ids, **kw)
    assert len(set(full.fsinfo_diag.probes_per_sample.tolist())) > 1
    for b in range(4):
        alone = estimate_diag(DenseProducts(J[b : b + 1]), sample_ids=ids[b : b + 1], **kw)
        for q in ("fsinfo_diag", "dfil"):
            e, f = getattr(alone, q), getattr(full, q)
            assert torch.equal(e.probes_per_sample, f.probes_per_sample[b : b + 1])
            for field in ("value", "stderr", "ci_halfwidth"):  # as test_batch_independent
                assert_close_verbose(getattr(e, field), getattr(f, field)[b : b + 1],
                                     rtol=1e-12, atol=0, name=f"{q} {field} of sample {b}")
        assert torch.equal(alone.fsinfo_diag.bias_bound, full.fsinfo_diag.bias_bound[b : b + 1])


def test_diag_state_snapshots_keep_only_passing_rows_and_stage_boundaries_last(monkeypatch):
    """A snapshot holds the rows that passed its boundary (samples stopping at different
    counts no longer cost a whole batch's sums each); where the budget runs out, boundaries
    that are nobody's stage end go first, and an unpinned one is not kept at a pinned one's
    expense (a floored sigma* at 224 px lost its stage-1 boundary to later rounds and failed)."""
    from fsinfo_fast.estimators import base
    from fsinfo_fast.estimators.diagonal import DiagProbeState, SnapshotDroppedError

    monkeypatch.setattr(base, "ROW_SUBSETS", "always")  # rounds on the rows asked for only
    P = DenseProducts(_mixed_batch(b=3))
    row = 20 * P.d * 8  # one sample's group sums
    st = DiagProbeState.for_products(P, seed=0, snapshot_bytes=4 * row)
    st.extend(P, 4)
    st.extend(P, 2, rows=torch.tensor([True, False, False]))  # sample 0 passes 4 alone
    assert {k: int(v[0].sum()) for k, v in st._snaps.items()} == {4: 1}
    st.extend(P, 2, rows=torch.tensor([False, True, True]))  # then the others: one snapshot
    assert {k: int(v[0].sum()) for k, v in st._snaps.items()} == {4: 3}
    fresh = DiagProbeState.for_products(P, seed=0)
    fresh.extend(P, 4)
    torch.testing.assert_close(st.stats(4).group_sums, fresh.stats(4).group_sums, rtol=1e-12,
                               atol=0)
    # budget of 4 rows: 4 (3 rows, pinned) is kept, the unpinned 6 cannot push it out
    st.pin(4)
    st.extend(P, 3)  # snapshot at 6 (3 rows) would need 6 rows
    assert sorted(st._snaps) == [4] and 6 in st.dropped
    st.stats(4)
    with pytest.raises(SnapshotDroppedError, match="dropped"):
        st.stats(6)
    # without the pin the oldest goes first, as before
    st2 = DiagProbeState.for_products(P, seed=0, snapshot_bytes=4 * row)
    st2.extend(P, 4)
    st2.extend(P, 2)
    st2.extend(P, 3)
    assert sorted(st2._snaps) == [6] and st2.dropped == [4]
