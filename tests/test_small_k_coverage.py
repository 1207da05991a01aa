"""Coverage of fixed-``num_probes`` intervals where one direction dominates ``J^T J``.

A Gaussian probe's trace term is ``a + sum_i lambda_i z_i^2``; with one eigenvalue carrying the
variance it is ``a + b chi2_1``, the most skewed law for its variance. The mean of ``K`` such
values comes low together with a small spread, so a symmetric interval built from the same
probes' spread puts the truth above it too often (the log-scale t-interval: 0.89-0.94 at
``K = 4..32`` on a rank-one Jacobian, 0.84 at ``K = 4`` with a flat bulk under the spike).
The same-sample multiplier (:func:`~fsinfo_fast.estimators.hutchinson.same_sample_multiplier`)
is calibrated to cover that law exactly; these tests check it over many seeds, on the worst
case, on less skewed laws and through the estimators, and that nearly Gaussian per-probe
values are not grossly over-covered; the FSInfo_diag near-floor case is still open (xfail).
"""

from __future__ import annotations

import math

import pytest
import torch

from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators import estimate_diag, hutchinson_trace
from fsinfo_fast.estimators.base import t_quantile
from fsinfo_fast.estimators.hutchinson import (
    TraceHalfwidth,
    same_sample_multiplier,
    sample_skewness,
    skew_calibration,
    skewed_t_quantile,
)
from fsinfo_fast.testing import (
    TOL,
    coupled_columns_linear,
    coverage,
    exact_fsinfo_diag,
    exact_trace,
    spectral_jacobian,
)

pytestmark = pytest.mark.usefixtures("one_thread")

B = TOL.seeds  # independent runs (samples of one batch) per check
BAND = TOL.coverage_band(B)
#: Fixed-count intervals valid for the most skewed per-probe law over-cover less skewed ones:
#: by design (tests below) 0.955-0.975 on Gaussian per-probe values at ``K = 32..5``. Above
#: this they would be grossly conservative (the constant worst-case multiplier at every ``K``:
#: 0.99-1.0 at ``K <= 16``; it is what ``K = 4`` gets, where nearly Gaussian values cover
#: 0.995+, so ``K = 4`` is not checked against this bound on such spectra).
NOT_GROSS = TOL.same_sample_coverage_high
SIGMA = 0.1
KS = [4, 8, 16, 32]


def _rank1(extra_bulk: bool = False) -> torch.Tensor:
    """``[B, 48, 48]`` copies of ``7 u v^T`` (plus, with ``extra_bulk``, a flat bulk of the
    same trace: 48 singular values ``7 / sqrt(48)``)."""
    s = [7.0] + ([7.0 / math.sqrt(48)] * 47 if extra_bulk else [])
    return spectral_jacobian(torch.tensor(s), 48, 48, batch=B, seed=11)


def _pivot_coverage(t: torch.Tensor, mu: float, conf: float = 0.95) -> float:
    """Coverage of ``xbar +- m se`` (same-sample multiplier) over the rows of ``t [N, K]``."""
    k = t.shape[1]
    x = t.mean(dim=1)
    se = t.std(dim=1, correction=1) / math.sqrt(k)
    m = same_sample_multiplier(sample_skewness(t), k - 1, conf)
    return float(((x - mu).abs() <= m * se).double().mean())


@pytest.mark.parametrize("k", [4, 5, 8, 16, 32])
def test_multiplier_exact_for_one_dominant_direction(k):
    """``a + b chi2_1`` per-probe values (any ``a``, ``b``): coverage 0.95 within 3 binomial
    standard errors over 40000 draws independent of the calibration's (another generator)."""
    g = torch.Generator().manual_seed(1000 + k)
    n = 40_000
    z = torch.randn(n, k, generator=g, dtype=torch.float64) ** 2
    band = 3 * math.sqrt(0.95 * 0.05 / n)
    for a, b in [(0.0, 1.0), (5.0, 0.3)]:
        cov = _pivot_coverage(a + b * z, a + b)
        assert abs(cov - 0.95) <= band, (k, a, b, cov)


@pytest.mark.parametrize("k", [5, 8, 16, 32])
def test_less_skewed_laws_cover_and_gaussian_not_grossly(k):
    """Less skewed per-probe laws (chi2_2, chi2_8, three spikes) cover at least nominally
    (3 SE), and Gaussian per-probe values at most 0.985 (the skewness rule, not the constant
    worst-case multiplier, which would give 0.99+ at K <= 16)."""
    g = torch.Generator().manual_seed(2000 + k)
    n = 40_000
    se3 = 3 * math.sqrt(0.95 * 0.05 / n)
    z = torch.randn(n, k, 8, generator=g, dtype=torch.float64) ** 2
    laws = {
        "chi2_2": (z[..., :2].sum(-1), 2.0),
        "chi2_8": (z.sum(-1), 8.0),
        "spikes": (z[..., 0] + 0.4 * z[..., 1] + 0.2 * z[..., 2], 1.6),
    }
    for name, (t, mu) in laws.items():
        assert _pivot_coverage(t, mu) >= 0.95 - se3, name
    gauss = torch.randn(n, k, generator=g, dtype=torch.float64)
    cov = _pivot_coverage(gauss, 0.0)
    assert 0.95 - se3 <= cov <= 0.985, cov


def test_multiplier_reduces_to_constant_and_t():
    """``K <= 4`` and ``K > 256``: the constant worst-case quantile; zero skewness: ``t``."""
    assert math.isinf(skew_calibration(3)) and math.isinf(skew_calibration(300))
    c4 = skewed_t_quantile(3)
    assert 9.0 < c4 < 10.5  # the studentized mean of 4 chi2_1 values (t_3 = 3.18)
    m = same_sample_multiplier(torch.tensor([0.0, -1.0, 2.0], dtype=torch.float64), 15, 0.95)
    t15 = t_quantile(15)
    assert m[0] == m[1] == pytest.approx(t15, rel=1e-12) and m[2] > t15
    # the Edgeworth branch joins the Monte Carlo one (within 1%)
    assert skewed_t_quantile(256) == pytest.approx(skewed_t_quantile(255) * 1.0, rel=0.01)


@pytest.mark.parametrize("k", [3, 5, 9, 40])
def test_shipped_table_is_the_monte_carlo(k):
    """The 95% constants ship as a table (the Monte Carlo costs 0.2-2 s per ``K``, paid on the
    first call of each probe count otherwise); each entry is that fixed-seed Monte Carlo, so
    recomputing it gives the same float (``scripts/skew_table.py`` regenerates the table);
    another confidence is computed."""
    from fsinfo_fast.estimators import hutchinson as h
    from fsinfo_fast.estimators._skew_table import SKEW_BETA_95, SKEWED_T_95

    assert SKEWED_T_95[k] == h._skewed_t_quantile_mc(k, 0.95) == skewed_t_quantile(k - 1)
    beta = h._skew_calibration_mc(k, 0.95) if k >= 3 else math.inf
    assert SKEW_BETA_95[k] == beta == skew_calibration(k - 1)
    assert len(SKEWED_T_95) == len(SKEW_BETA_95) == 257
    if k == 9:  # 90%: not the table's, a narrower constant
        assert skewed_t_quantile(k - 1, 0.9) < skewed_t_quantile(k - 1)


def test_same_sample_vs_fresh_sample_halfwidth():
    """``TraceHalfwidth``: the fresh-sample width (Stein's stage 3) is the log-scale t of
    before; the same-sample width is ``m se`` and is 0 where ``se`` is 0."""
    from fsinfo_fast.estimators.hutchinson import log_t_halfwidth

    v = torch.tensor([2.0, 3.0], dtype=torch.float64)
    se = torch.tensor([0.5, 0.0], dtype=torch.float64)
    skew = torch.tensor([1.0, 1.0], dtype=torch.float64)
    f = TraceHalfwidth(v, 0.95, 1.0, skew)
    assert torch.equal(f(se, 9), log_t_halfwidth(v, se, 9, 0.95, 1.0))
    same = f.same_sample(se, 9)
    assert same[1] == 0 and same[0] == pytest.approx(
        float(same_sample_multiplier(skew, 9, 0.95)[0]) * 0.5)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bulk", [False, True], ids=["rank1", "spike+bulk"])
def test_dfil_fixed_k_one_dominant_direction(k, bulk):
    """dFIL at a fixed probe count: Hutchinson (input side, Rademacher, as ``dfil(method=
    "hutchinson")``) and the Gaussian output-side probes of ``estimate_diag``, on ``7 u v^T``
    (before: 0.89-0.94) and on the spike over a flat bulk of equal trace (before: 0.84 at
    ``K = 4``, 0.90-0.92 at ``K = 16``)."""
    J = _rank1(bulk)
    P = DenseProducts(J)
    exact = exact_trace(J[:1], SIGMA)
    h = hutchinson_trace(P, sigma=SIGMA, side="input", kind="rademacher", num_probes=k, seed=5)
    d = estimate_diag(P, sigma=SIGMA, num_probes=k, seed=5).dfil
    for what, r in (("hutchinson", h), ("diag", d)):
        cov = coverage(r.value, r.ci_halfwidth, exact)
        assert BAND[0] <= cov <= NOT_GROSS, f"{what} K={k}: coverage {cov:.3f}"


@pytest.mark.xfail(strict=True, reason="open: the near-floor skew allowance (diagonal."
                   "_floor_skew, log-scale) undercovers a rank-one Jacobian at the floor; the "
                   "same-sample multiplier there over-covers the existing near-floor cases "
                   "(0.99-1.0 at K = 4)")
@pytest.mark.parametrize("k", [4, 8])
def test_fsinfo_diag_rank1_at_the_floor(k):
    """FSInfo_diag on a rank-one Jacobian (every column moves with one output direction) with
    ``D_k / sigma^2`` at the 1e-10 floor (sigma = 1e6), 4000 runs: 0.92 (K = 4) and 0.93
    (K = 8), against a band of [0.94, 0.96]; every miss with the truth above the interval.
    Not fixed yet (xfail)."""
    J = _rank1()
    sigma = 1e6
    exact = exact_fsinfo_diag(J[:1], sigma, 1e-10)
    P = DenseProducts(J)
    runs = [estimate_diag(P, sigma=sigma, num_probes=k, seed=s).fsinfo_diag for s in range(7, 11)]
    cov = sum(coverage(r.value, r.ci_halfwidth, exact) for r in runs) / len(runs)
    lo, hi = TOL.coverage_band(len(runs) * B)
    assert lo <= cov <= hi, f"K={k}: coverage {cov:.3f} outside [{lo:.3f}, {hi:.3f}]"


@pytest.mark.parametrize("k", [8, 16])
def test_nearly_gaussian_trace_not_grossly_conservative(k):
    """A well-spread spectrum (48 singular values in [0.5, 1.5]), nearly Gaussian per-probe
    values: the fixed-count dFIL interval covers, and at most ``NOT_GROSS`` (0.97-0.98 at
    ``K = 8``, 0.96-0.97 at ``K = 16`` over four probe seeds; the constant worst-case
    multiplier would give 0.99+)."""
    s = torch.linspace(0.5, 1.5, 48, dtype=torch.float64)
    J = spectral_jacobian(s, 48, 48, batch=B, seed=3)
    exact = exact_trace(J[:1], SIGMA)
    r = estimate_diag(DenseProducts(J), sigma=SIGMA, num_probes=k, seed=9).dfil
    cov = coverage(r.value, r.ci_halfwidth, exact)
    assert BAND[0] <= cov <= NOT_GROSS, f"K={k}: coverage {cov:.3f}"


@pytest.mark.parametrize("weak", [0.01, 0.1])
def test_dfil_rademacher_with_three_dominant_inputs(weak):
    """dFIL under ``auto`` (Hutchinson, Rademacher input-side probes) where 3 of 300 inputs
    carry nearly all of ``J`` (the other 297 reach the output through weights ``weak`` as
    large), ``rtol=0.05``: the per-probe law was nearly 4 atoms, one of probability 1/4, and
    the samples whose pilot missed it planned from a spread near zero (0.86 at ``weak=0.01``,
    0.89 at 0.1, ``converged=True``; found by the round-7 coverage fuzz behind an exact crop,
    which now takes the fast exact route on its 3 live columns, ``tests/test_live_columns.py``).
    The few dominant columns are now computed exactly, chosen per sample from the
    validation's VJP (:func:`~fsinfo_fast.estimators.hutchinson.dominant_columns`); 1000
    runs here."""
    g = torch.Generator().manual_seed(0)
    strong = torch.randn(200, 3, generator=g) / math.sqrt(3)
    other = torch.randn(200, 300, generator=g) / math.sqrt(300)

    class ThreeDominant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.strong = torch.nn.Parameter(strong)
            self.other = torch.nn.Parameter(other)

        def forward(self, z):
            return z[:, :3] @ self.strong.T + weak * z @ self.other.T

    import fsinfo_fast as ff

    enc = ThreeDominant().eval()
    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(1))
    truth = ff.dfil(enc, x, sigma=0.1, estimator="exact").value
    n = 1000
    r = ff.dfil(enc, x.expand(n, 300).clone(), sigma=0.1, rtol=0.05, sample_ids=torch.arange(n))
    assert r.info.get("method") == "hutchinson"
    assert max(r.info["exact_columns"]) <= 8 and min(r.info["exact_columns"]) >= 0
    cov = coverage(r.value, r.ci_halfwidth, truth)
    lo, hi = TOL.coverage_band(n)
    assert lo <= cov <= hi, f"coverage {cov:.3f} outside [{lo:.3f}, {hi:.3f}]"
    assert bool(r.converged.all())


@pytest.mark.slow
def test_slq_logdet_with_a_prior_on_a_rank_one_jacobian():
    """The randomized log det (SLQ, Rademacher probes) with ``prior_var=1`` on a rank-one
    Jacobian (``Linear(100 -> 1) -> Linear(1 -> 100)``), default ``atol``: the per-probe values
    are a PSD matrix's quadratic forms less a constant (``log(A / s^2 + lam) - log(lam) >= 0``),
    one direction dominating, and the t-interval covered 0.90-0.92 (found by the round-7
    coverage fuzz); the trace's log-scale interval on the shifted values covers. 1200 runs at
    sigma 1 (31 s; at sigma 0.1, 0.917 before and 0.940 after, 86 s, not run here)."""
    sigma = 1.0
    import fsinfo_fast as ff

    g = torch.Generator().manual_seed(0)
    l1 = torch.nn.Linear(100, 1, bias=False)
    l2 = torch.nn.Linear(1, 100, bias=False)
    with torch.no_grad():
        l1.weight.copy_(torch.randn(1, 100, generator=g) / 10.0)
        l2.weight.copy_(torch.randn(100, 1, generator=g))
    enc = torch.nn.Sequential(l1, l2).eval()
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    kw = dict(sigma=sigma, variant="logdet", prior_var=1.0)
    truth = ff.fsinfo(enc, x, estimator="exact", **kw).value
    n = 1200
    r = ff.fsinfo(enc, x.expand(n, 100).clone(), estimator="randomized",
                  sample_ids=torch.arange(n), **kw)
    cov = coverage(r.value, r.ci_halfwidth, truth)
    lo, hi = TOL.coverage_band(n)
    assert lo <= cov <= hi, f"coverage {cov:.3f} outside [{lo:.3f}, {hi:.3f}]"


def test_dfil_rademacher_with_three_coupled_inputs_carrying_half():
    """Rademacher dFIL (``method="hutchinson"``) where 3 identical columns carry half of the
    trace and 297 orthogonal ones the rest (they add a constant to every probe): the 4-atom law
    of the closed gap below the dominant-column rule's 90% share, where a stage 2 that missed
    the rare atom planned from a spread near zero (0.90-0.93 over 1000 runs, fuzz round 8c).
    Closed by the re-check of Stein's last stage (``tests/test_stopping_recheck.py``)."""
    import fsinfo_fast as ff

    d = 300
    enc = coupled_columns_linear(3, 0.1, d)
    truth = float((enc.weight.detach().double() ** 2).sum()) / d
    n = 1000
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(1)).expand(n, d).contiguous()
    r = ff.linearize(enc, x, seed=2, sample_ids=torch.arange(n)).dfil(
        1.0, estimator="randomized", method="hutchinson", rtol=0.1)
    cov = coverage(r.value, r.ci_halfwidth, truth)
    lo, hi = TOL.coverage_band(n)
    assert lo <= cov <= hi, f"coverage {cov:.3f} outside [{lo:.3f}, {hi:.3f}]"
