"""Honest intervals under adaptive stopping (issue 11; ``estimators.stopping``): at the stop, the
reported 95% interval covers at its nominal rate and the estimate is unbiased, for every
estimator that stops through ``run_rounds``.

Each "seed" is one sample of a batch of ``TOL.seeds`` copies of the same synthetic Jacobian with
independent probes (probes depend on the sample id); the truth comes from ``J`` directly. Bands:
``TOL.coverage_band(1000) = [0.930, 0.970]`` and ``|bias z| < TOL.z_unbiased`` (3 standard
errors of the mean over the seeds). The cases include an ill-conditioned, low-effective-rank
Jacobian (the top few singular values carry the trace: skewed per-probe values, the case where
stopping on the estimated interval undercovers and biases most) and, for FSInfo_diag, columns at
the paper's floor. Tolerances: the public default FSInfo_diag ``atol = 0.01`` where the probe
counts allow (near the floor), else looser (the tolerance only scales the count): ``0.03`` on a
well-spread ``d = 64`` Jacobian, dFIL ``rtol = 0.02`` (diag probes) and ``0.05`` on the
low-effective-rank traces (``0.01`` would need ~10^5 probes per seed there).
"""

from __future__ import annotations

import pytest
import torch

from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators import estimate_diag, hutchinson_trace, hutchpp_trace
from fsinfo_fast.estimators.stopping import StoppingRule
from fsinfo_fast.testing import (
    TOL,
    coverage,
    exact_fsinfo_diag,
    exact_trace,
    geometric_spectrum,
    spectral_jacobian,
    unbiasedness_z,
)

S = TOL.seeds
BAND = TOL.coverage_band(S)


pytestmark = pytest.mark.usefixtures("one_thread")


def _check(what, est, exact, *, converged=1.0):
    cov = coverage(est.value, est.ci_halfwidth, exact)
    z = unbiasedness_z(est.value, exact)
    k = est.probes_per_sample.double()
    msg = (f"{what}: coverage {cov:.3f} (band [{BAND[0]:.3f}, {BAND[1]:.3f}]), bias z {z:+.2f}, "
           f"probes mean {float(k.mean()):.0f}, converged {float(est.converged.double().mean())}")
    print(msg)
    assert BAND[0] <= cov <= BAND[1], msg
    assert abs(z) < TOL.z_unbiased, msg
    assert float(est.converged.double().mean()) >= converged, msg
    # a sample that did not converge is one whose last stage was cut by max_probes (flagged)
    cap = est.probes_per_sample.max()
    assert (est.converged | (est.probes_per_sample == cap)).all(), msg
    # the estimate never contains the pilot's probes
    assert (est.probes_per_sample > est.info["pilot_probes"]).all(), msg
    return cov, z


# name -> (singular values, m, d)
TRACE_CASES = {
    # cond 1e6 over 16 values: the top three carry 99.9% of tr(J^T J), per-probe values are a
    # weighted chi-square with ~2 effective degrees of freedom
    "low_effective_rank": (geometric_spectrum(16, 1e6), 24, 16),
    "top_heavy": (torch.tensor([3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.1]), 40, 10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRACE_CASES))
@pytest.mark.parametrize("how", ["gaussian-output", "rademacher-input", "hutch++"])
def test_trace_adaptive_coverage_and_bias(name, how):
    """Hutchinson (both probe kinds, from the default start of 4 probes, which was 10 under the
    first-look rule) and Hutch++ at rtol 0.05 on skewed per-probe values."""
    s, m, d = TRACE_CASES[name]
    J = spectral_jacobian(s, m, d, batch=S, seed=len(name))
    P = DenseProducts(J)
    stop = StoppingRule(rtol=0.05, max_probes=20000)
    if how == "hutch++":
        est = hutchpp_trace(P, sketch_size=4, seed=1, stop=stop)
    elif how == "rademacher-input":
        est = hutchinson_trace(P, kind="rademacher", side="input", seed=1, stop=stop)
    else:
        est = hutchinson_trace(P, kind="gaussian", side="output", seed=1, stop=stop)
    # with ~2 effective degrees of freedom a second stage that drew one of the rare very large
    # per-probe values can ask for more than max_probes: that sample is flagged (~1 in 1000)
    _check(f"{how} on {name}", est, exact_trace(J[:1]), converged=0.995)
    assert (est.ci_halfwidth[est.converged] <= 0.05 * est.value[est.converged]).all()


# name -> (singular values, m, d, sigma, atol). sigma = 1e5 puts (J^T J)_kk / sigma^2 at
# 1e-11..1e-10, at the paper's floor 1e-10 (where the first-look rule covered 0.921 and 0.867
# with a bias of -4.2 and -9.5 standard errors); atol 0.01 is the public default (on the
# well-spread case at d = 64 it would need ~1000 probes per seed: 0.03 there, the tolerance only
# scales the count)
DIAG_CASES = {
    "well_spread": (geometric_spectrum(64, 1e1), 96, 64, 0.1, 0.03),
    "near_floor": (geometric_spectrum(64, 1e1), 96, 64, 1e5, 0.01),
    "near_floor_low_effective_rank": (geometric_spectrum(64, 1e6), 96, 64, 1e5, 0.01),
}

@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIAG_CASES))
def test_diag_adaptive_coverage_and_bias(name):
    """FSInfo_diag from the default start (4 probes), and dFIL from the same probes recorded
    alongside (its interval is the last stage's own).

    On the low-effective-rank case at the floor the near-floor part of the estimate is a mean
    of strongly right-skewed values (few effective degrees of freedom): the symmetric jackknife
    interval undercovered there (fixed K = 4..32: 0.90-0.94; adaptive 0.916) until the skew
    allowance of the near-floor part (``diagonal._floor_skew``); now 0.94-0.96 over seeds 2-5.
    As for the skewed traces, a stage 2 that drew a rare very large value can plan past
    ``max_probes``: that sample is flagged (1-2 in 1000)."""
    s, m, d, sigma, atol = DIAG_CASES[name]
    J = spectral_jacobian(s, m, d, batch=S, seed=len(name))
    r = estimate_diag(DenseProducts(J), sigma=sigma, seed=2, stop=StoppingRule(atol=atol))
    converged = 0.995 if name == "near_floor_low_effective_rank" else 1.0
    _check(f"FSInfo_diag on {name}", r.fsinfo_diag, exact_fsinfo_diag(J[:1], sigma, 1e-10),
           converged=converged)
    ok = r.fsinfo_diag.converged
    assert (r.fsinfo_diag.ci_halfwidth[ok] <= atol).all()
    _check(f"dFIL alongside on {name}", r.dfil, exact_trace(J[:1], sigma), converged=converged)


@pytest.mark.slow
def test_diag_dfil_adaptive():
    """dFIL from the diagonal estimator's probes, stopping on dFIL alone (rtol 0.02 on a flat
    spectrum: ~500 probes per seed; 0.01 would need four times as many), and jointly with
    FSInfo_diag (what Linearization serves)."""
    J = spectral_jacobian(torch.ones(64), 96, 64, batch=S, seed=3)
    exact = exact_trace(J[:1], 0.1)
    r = estimate_diag(DenseProducts(J), sigma=0.1, seed=5,
                      stop=StoppingRule(rtol=0.02, max_probes=5000), stop_on="dfil")
    _check("dFIL (diag probes) rtol 0.02", r.dfil, exact)
    assert (r.dfil.ci_halfwidth <= 0.02 * r.dfil.value).all()
    s, m, d, sigma, atol = DIAG_CASES["well_spread"]
    J = spectral_jacobian(s, m, d, batch=S, seed=4)
    r = estimate_diag(DenseProducts(J), sigma=sigma, seed=6, stop=StoppingRule(atol=atol),
                      dfil_rtol=0.05)
    _check("joint: dFIL", r.dfil, exact_trace(J[:1], sigma))
    _check("joint: FSInfo_diag", r.fsinfo_diag, exact_fsinfo_diag(J[:1], sigma, 1e-10))
