"""Fuzz round 6, the low-level estimators: defects found by fuzzing, each test failing before
its fix."""

from __future__ import annotations

import math

import pytest
import torch

from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.errors import InvalidInputError
from fsinfo_fast.estimators import (
    DiagProbeState,
    StoppingRule,
    estimate_diag,
    hutchinson_trace,
    hutchpp_trace,
    slq_logdet,
)
from fsinfo_fast.testing import coverage

pytestmark = pytest.mark.usefixtures("one_thread")

HALF_LOG_2PIE = 0.5 * math.log(2 * math.pi * math.e)


def _logdet_truth(J1: torch.Tensor, sigma: float, prior_var: float) -> float:
    d = J1.shape[1]
    A = J1.T @ J1 / sigma**2 + torch.eye(d, dtype=torch.float64) / prior_var
    return torch.linalg.slogdet(A).logabsdet.item() / (2 * d) - HALF_LOG_2PIE


@pytest.mark.parametrize("method", ["lanczos", "golub_kahan"])
@pytest.mark.parametrize("prior_var", [2.0, 0.1])
def test_slq_output_side_with_more_outputs_than_inputs(method, prior_var):
    """``side="output"`` with ``m > d`` dropped the ``(d - m) log lam`` term: biased by ``(m -
    d) log(lam) / (2d)`` (0.23 nats/dim at prior_var 0.1), the 95% interval covering 0 of 200
    runs. Now the same coverage as the input side."""
    g = torch.Generator().manual_seed(3)
    J1 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    J = J1.expand(200, -1, -1).contiguous()
    truth = _logdet_truth(J1, 0.5, prior_var)
    r = slq_logdet(DenseProducts(J), sigma=0.5, prior_var=prior_var, side="output",
                   method=method, atol=0.03)
    cov = coverage(r.value, r.ci_halfwidth, torch.tensor(truth, dtype=torch.float64))
    assert cov >= 0.9, cov
    assert abs(r.value.mean().item() - truth) < 0.01


def test_slq_output_side_without_prior_is_refused_where_m_exceeds_d():
    """Without a prior, ``J J^T`` is singular when ``m > d``: its SLQ value was reported as an
    upper bound (-3.05) lying below the truth (-0.40)."""
    J = torch.randn(1, 6, 5, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="J J\\^T is singular"):
        slq_logdet(DenseProducts(J), sigma=0.5, side="output", atol=0.03)
    r = slq_logdet(DenseProducts(J), sigma=0.5, side="input", atol=0.03)  # still served
    assert torch.isfinite(r.value).all()


def test_hutchpp_interval_where_the_sketch_spans_the_range():
    """The sketch holding all of ``J`` leaves a residual of ~0: its log-scale interval centred
    there overflowed to ``inf`` (fixed count) and the adaptive rule ran to ``max_probes``
    unconverged. Now a rounding-sized interval that covers the exact value."""
    J = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))[None]
    r = hutchpp_trace(DenseProducts(J), sketch_size=2, num_probes=4)
    assert torch.isfinite(r.ci_halfwidth).all() and (r.ci_halfwidth < 1e-10).all()
    assert (r.value - 10.0).abs().item() <= r.ci_halfwidth.item()
    g = torch.Generator().manual_seed(7)
    J = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    r = hutchpp_trace(DenseProducts(J), rtol=0.02)
    assert bool(r.converged.all()) and r.probes_per_sample.max().item() < 100
    truth = (J**2).sum((1, 2))
    assert ((r.value - truth).abs() <= r.ci_halfwidth).all()


def test_hutchpp_interval_unchanged_where_the_residual_is_random():
    """Where the residual carries the Monte Carlo error the interval is the log-scale one as
    before (the rounding share is ~1e-16 of it)."""
    from fsinfo_fast.estimators.hutchinson import log_t_halfwidth

    g = torch.Generator().manual_seed(1)
    J = torch.randn(3, 30, 40, generator=g, dtype=torch.float64)
    r = hutchpp_trace(DenseProducts(J), sketch_size=4, num_probes=10, seed=2)
    assert torch.isfinite(r.ci_halfwidth).all() and (r.ci_halfwidth > 1e-3 * r.value).all()
    assert (r.ci_halfwidth >= log_t_halfwidth(torch.zeros(3, dtype=torch.float64), r.stderr,
                                              9, 0.95) * 0.999).all()


def test_diag_state_of_another_batch_is_refused():
    """A ``DiagProbeState`` used on one batch gave its statistics to another batch of the
    same shape ([0.226, 0.347] for truth [2.479, 2.349])."""
    g = torch.Generator().manual_seed(0)
    A = DenseProducts(torch.randn(2, 5, 4, generator=g, dtype=torch.float64))
    B = DenseProducts(3 * torch.randn(2, 5, 4, generator=g, dtype=torch.float64))
    st = DiagProbeState.for_products(A, seed=5, snapshot_bytes=1 << 20)
    a1 = estimate_diag(A, sigma=1.0, num_probes=8, seed=5, state=st)
    a2 = estimate_diag(A, sigma=1.0, num_probes=8, seed=5, state=st)  # the same products: fine
    assert torch.equal(a1.fsinfo_diag.value, a2.fsinfo_diag.value)
    with pytest.raises(InvalidInputError, match="other products"):
        estimate_diag(B, sigma=1.0, num_probes=8, seed=5, state=st)
    # a Generator seed is resolved and compared as an int seed is (it was not checked)
    with pytest.raises(InvalidInputError, match="same seed"):
        estimate_diag(A, sigma=1.0, num_probes=8, seed=torch.Generator().manual_seed(9),
                      state=st)


def test_fixed_count_above_a_given_cap_is_refused():
    """``num_probes=50, max_probes=10`` ran 50 probes (500 products per sample for SLQ)."""
    J = torch.randn(2, 6, 5, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="above max_probes"):
        StoppingRule(num_probes=50, max_probes=10)
    with pytest.raises(InvalidInputError, match="above max_probes"):
        hutchinson_trace(DenseProducts(J), num_probes=50, max_probes=10)
    # the default cap still follows a large fixed count
    assert StoppingRule(num_probes=5000).max_probes == 5000
    import fsinfo_fast as ff

    m = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    lin = ff.linearize(m, torch.randn(2, 6))
    for call in (lambda: lin.fsinfo(0.1, estimator="randomized", num_probes=50, max_probes=10),
                 lambda: lin.dfil(0.1, estimator="randomized", num_probes=50, max_probes=10),
                 lambda: lin.fsinfo_sigma(-1.0, estimator="randomized", num_probes=50,
                                          max_probes=10)):
        with pytest.raises(InvalidInputError, match="above max_probes"):
            call()


def test_deflated_dfil_interval_counts_rounding_where_the_sketch_holds_j():
    """The deflated dFIL's interval had no rounding allowance: where the sketch held all of a
    rank-2 ``J`` it was ~1e-27 wide with the value 1.4e-12 off the truth."""
    from fsinfo_fast.estimators import estimate_diag_deflated
    from fsinfo_fast.testing import exact_trace

    g = torch.Generator().manual_seed(0)
    J = (torch.randn(3, 12, 2, generator=g, dtype=torch.float64)
         @ torch.randn(3, 2, 10, generator=g, dtype=torch.float64))
    truth = exact_trace(J, 0.1)
    for kw in (dict(num_probes=6, rank=4), dict(atol=0.01, start_rank=4)):
        r = estimate_diag_deflated(DenseProducts(J), sigma=0.1, **kw).dfil
        assert torch.isfinite(r.ci_halfwidth).all()
        assert ((r.value - truth).abs() <= r.ci_halfwidth).all(), (kw, r.value - truth,
                                                                   r.ci_halfwidth)
        assert (r.ci_halfwidth < 1e-14 * truth.abs() * 100).all()  # a rounding-sized interval
