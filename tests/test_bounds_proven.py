"""``exp(-2 FSInfo)/(2 pi e)`` is a proven bound against unbiased attackers, as ``1/dFIL`` is:
at most the Cramer-Rao bound ``sigma^2 tr((W^T W)^-1)/d`` of a linear encoder ``z = W x +
sigma N(0, I)`` (helper 124: it was labelled a surrogate, "not a theorem")."""

from __future__ import annotations

import math

import pytest
import torch

import fsinfo_fast as ff


def _linear(m: int, d: int, cond: float, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), min(m, d),
                       dtype=torch.float64)
    w = q1[:, : len(s)] @ torch.diag(s) @ q2[: len(s)]
    lin = torch.nn.Linear(d, m, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("m, d, cond", [(12, 8, 1.0), (12, 8, 1e3), (8, 8, 30.0)])
def test_fsinfo_bounds_sit_below_the_cramer_rao_bound(m, d, cond):
    sigma = 0.5
    enc = _linear(m, d, cond)
    x = torch.randn(2, d, dtype=torch.float64)
    w = enc.weight.detach()
    crb = sigma**2 * torch.linalg.inv(w.T @ w).trace().item() / d
    bounds = [ff.bounds.dfil_bound(ff.dfil(enc, x, sigma, estimator="exact")),
              ff.bounds.fsinfo_bound(ff.fsinfo(enc, x, sigma, estimator="exact")),
              ff.bounds.fsinfo_bound(ff.fsinfo(enc, x, sigma, estimator="exact", floor=0.0)),
              ff.bounds.fsinfo_bound(ff.fsinfo(enc, x, sigma, variant="logdet",
                                               estimator="exact")),
              ff.bounds.fsinfo_bound(ff.fsinfo(enc, x, sigma, variant="logdet", prior_var=0.3,
                                               estimator="exact"))]
    for b in bounds:
        assert b.proven
        assert bool((b.value <= crb * (1 + 1e-12)).all()), (b.kind, b.value, crb)
    if cond == 1.0:  # isotropic W^T W: the log det's bound is the Cramer-Rao bound itself
        assert bounds[3].value[0].item() == pytest.approx(crb, rel=1e-12)
    # an unbiased attacker (least squares) meets it on average
    torch.manual_seed(0)
    z = enc(x[:1]).detach() + sigma * torch.randn(20000, m, dtype=torch.float64)
    xh = torch.linalg.lstsq(w, z.T).solution.T
    mse = (xh - x[:1]).square().mean().item()
    assert mse == pytest.approx(crb, rel=0.05)
    assert max(float(b.value[0]) for b in bounds) <= mse * 1.05


def test_dfil_bound_signed_zero_is_a_zero():
    """-0.0 is a zero dFIL: bound +inf, never a -inf "proven" bound that worst() picks
    (helper 137)."""
    from fsinfo_fast.bounds import dfil_bound

    b = dfil_bound(torch.tensor([-0.0, 2.0], dtype=torch.float64))
    assert b.value.tolist() == [math.inf, 0.5] and b.low.tolist() == [math.inf, 0.5]
    assert b.worst() == (1, 0.5)
