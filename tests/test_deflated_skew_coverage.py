"""Deflated intervals at a fixed ``num_probes`` where the remainder left by the sketch is nearly
one direction (helper 137's finding): J 48x64 with 17 equal singular values and a 1e-3 bulk,
rank-16 sketch, K = 6 remainder probes, 4000 replications (one fixed seed, own probes per
sample id; binomial se at 0.95 is 0.0034). Before the fix (plain log-scale t on the remainder):
dFIL 0.923, FSInfo_diag 0.930; after (the skewness-calibrated same-sample interval of the plain
Hutchinson route, shared through ``TraceHalfwidth``): 0.951 and 0.954-0.963. The 0.935
threshold is 3.5 se above the old dFIL coverage and 4.6 se below the new one."""

import math

import torch

from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators.deflated import estimate_diag_deflated
from fsinfo_fast.estimators.hutchinson import TraceHalfwidth, residual_halfwidth
from fsinfo_fast.formulas import DIAG_FLOOR, HALF_LOG_2PIE


def _spike_j() -> torch.Tensor:
    m, d = 48, 64
    g = torch.Generator().manual_seed(5)
    sv = torch.tensor([1.0] * 17 + [1e-3] * 31, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    return (U * sv) @ V.T


def test_deflated_fixed_k_nearly_rank_one_remainder_covers():
    J = _spike_j()
    n, sigma = 4000, 0.1
    D = J.square().sum(0)
    fs_true = float(0.5 * torch.log(D / sigma**2 + DIAG_FLOOR).mean() - HALF_LOG_2PIE)
    df_true = float(D.sum() / (sigma**2 * J.shape[1]))
    Jb = J.unsqueeze(0).expand(n, *J.shape).contiguous()
    r = estimate_diag_deflated(DenseProducts(Jb), sigma=sigma, seed=0,
                               sample_ids=torch.arange(n), rank=16, num_probes=6)
    for est, tv in ((r.dfil, df_true), (r.fsinfo_diag, fs_true)):
        lo, hi = est.ci()
        cov = float(((lo <= tv) & (tv <= hi)).double().mean())
        assert cov >= 0.935, (est.info["quantity"], cov)
        # not absurdly wide: measured mean half-width 0.34 (dFIL) and 0.74-0.86 (FSInfo_diag)
        # of the value (0.16 and 0.40 before, undercovering)
        assert float(est.ci_halfwidth.mean()) / abs(tv) < 1.2, est.info["quantity"]


def test_residual_halfwidth_is_the_trace_halfwidth_without_rounding():
    """With no rounding share the residual interval is exactly the plain route's, both the
    log-scale one and the same-sample one (one piece of code for both)."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    se = 0.3 * v
    skew = torch.tensor([0.0, 0.5, 1.0, 2.0, 2.8], dtype=torch.float64)
    plain = TraceHalfwidth(v, 0.95, 1.0, skew)
    res = residual_halfwidth(v, se, se, 0.95, 1.0, skew)
    for dof in (3, 5, 11):
        assert torch.allclose(res(se, dof), plain(se, dof), rtol=1e-14, atol=0)
        assert torch.allclose(res.same_sample(se, dof), plain.same_sample(se, dof),
                              rtol=1e-14, atol=0)
    # a pure rounding share: t-interval, finite where the residual is 0
    z = residual_halfwidth(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                           torch.ones(1, dtype=torch.float64), 0.95)
    from fsinfo_fast.estimators.base import t_quantile
    assert math.isclose(float(z.same_sample(torch.ones(1, dtype=torch.float64), 5)),
                        t_quantile(5, 0.95), rel_tol=1e-14)
