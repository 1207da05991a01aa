"""The re-check of Stein's last stage (:func:`fsinfo_fast.estimators.stopping.run_rounds`).

Stein's interval takes stage 2's spread; where the per-probe law has a rare large part (a
spike over a bulk that Rademacher probes see exactly, or a few coupled input columns: atoms of
probability 1/4) a short stage 2 that missed it planned from a spread near zero, and the
interval undercovered (0.85-0.92 over 1000-2000 runs). A sample whose last stage's own spread
exceeds stage 2's by more than ``max(RECHECK_RATIO, F_{1 - RECHECK_LEVEL})`` (in variance) now
reports the wider of Stein's interval and the stage's own, and, where that misses the
tolerance, extends the stage to the size its own interval asks for.
"""

from __future__ import annotations

import math

import pytest
import torch

from fsinfo_fast.estimators import stopping
from fsinfo_fast.estimators.stopping import StoppingRule, run_rounds
from fsinfo_fast.testing import TOL, coupled_columns_linear, coverage

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(values: torch.Tensor, rule: StoppingRule):
    """``run_rounds`` over fixed per-probe values ``[B, K]`` (plain t-interval)."""
    chunks: list[torch.Tensor] = []

    def process(start, count, active=None):
        chunks.append(values[:, start:start + count])

    def summarize(lo, rows=None, names=None):
        t = torch.cat(chunks, dim=1)[:, lo:]
        se = t.std(dim=1, correction=1) / math.sqrt(t.shape[1])
        return {"value": (t.mean(dim=1), se, t.shape[1] - 1)}

    return run_rounds(rule, batch=values.shape[0], device=values.device, process=process,
                      summarize=summarize, targets={"value": rule.targets})


def _pilot_misses_the_atoms() -> torch.Tensor:
    """Per-probe values 1 for the first 20 probes (stages 1 and 2 of ``rtol=0.1``: rounds of
    10), then alternating 1 and 9 (mean 5)."""
    v = torch.ones(1, 2000, dtype=torch.float64)
    v[0, 20::2] = 9.0
    return v


def test_a_pilot_spread_of_zero_is_no_zero_halfwidth(monkeypatch):
    """Stages 1 and 2 see one value, stage 3 two: Stein's interval from a spread of 0 was a
    zero half-width around the mean of stage 3 (a claim of exactness); the re-check widens it
    to the stage's own, which misses the tolerance, so the stage is extended and its interval
    covers the mean of what it saw."""
    rule = StoppingRule(rtol=0.1, max_probes=2000)
    values = _pilot_misses_the_atoms()
    frozen, converged, probes, _, pilot = _run(values, rule)
    f = frozen["value"]
    assert int(pilot[0]) == 20
    assert float(f.ci_halfwidth[0]) > 0
    assert abs(float(f.value[0]) - 5.0) <= float(f.ci_halfwidth[0])
    assert int(probes[0]) > 30  # extended past stage 3's planned round of 10
    assert bool(converged[0]) == (float(f.ci_halfwidth[0]) <= 0.1 * abs(float(f.value[0])))
    assert f.rechecked is not None and bool(f.rechecked[0])
    # without the re-check: Stein's zero half-width at stage 3's mean
    monkeypatch.setattr(stopping, "RECHECK_RATIO", math.inf)
    frozen, _, probes, _, _ = _run(values, rule)
    assert float(frozen["value"].ci_halfwidth[0]) == 0.0 and int(probes[0]) == 30
    assert frozen["value"].rechecked is None


def test_spread_grew_threshold():
    """Triggered beyond ``max(RECHECK_RATIO, F quantile)`` in variance, not below; a pilot
    spread of 0 against a positive one triggers; a small pilot (dof 2) needs its F quantile."""
    from fsinfo_fast.estimators.stopping import _f_upper, _spread_grew

    def parts(se):
        se = torch.tensor(se, dtype=torch.float64)
        return {"value": (torch.ones_like(se), se)}

    t = {"value": (None, 0.1)}
    n = 100  # both stages of 100 probes: the F quantile is below the ratio
    assert _f_upper(n - 1, n - 1, stopping.RECHECK_LEVEL) < stopping.RECHECK_RATIO
    r = math.sqrt(stopping.RECHECK_RATIO)
    grew = _spread_grew(parts([0.99 * r, 1.01 * r, 1.0, 1.0]), parts([1.0, 1.0, 0.0, 1.0]), t,
                        n, n)
    assert grew.tolist() == [False, True, True, False]
    crit = _f_upper(99, 2, stopping.RECHECK_LEVEL)
    assert crit > stopping.RECHECK_RATIO
    se3 = math.sqrt(0.99 * crit * 3 / 100)  # variance ratio 0.99 crit: not triggered
    assert not bool(_spread_grew(parts([se3]), parts([1.0]), t, 3, 100)[0])


@pytest.mark.parametrize("k,share", [
    (3, 0.1),
    pytest.param(6, 0.1, marks=pytest.mark.xfail(
        strict=True, reason="open: 6 coupled columns (atoms 0, 4, 16, 36 with probabilities "
        "20/64 .. 2/64): 0.888 before the re-check, 0.923 after; the rest of the misses are "
        "samples whose stage 3 missed the rare atoms too")),
])
def test_rademacher_dfil_with_coupled_columns_over_a_diagonal(k, share):
    """Rademacher dFIL (``method="hutchinson"``, rtol 0.1) where ``k`` identical columns carry
    10% of the trace and a diagonal the rest: all of the probe variance is the coupled
    columns' (few atoms). 0.894 (k = 3) and 0.888 (k = 6) over 1000 runs before the
    re-check."""
    import fsinfo_fast as ff

    enc = coupled_columns_linear(k, math.sqrt(k * (1 - share) / share / (300 - k)))
    truth = float((enc.weight.detach().double() ** 2).sum()) / 300
    n = TOL.seeds
    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(5)).expand(n, 300)
    r = ff.linearize(enc, x.contiguous(), seed=2, sample_ids=torch.arange(n)).dfil(
        1.0, estimator="randomized", method="hutchinson", rtol=0.1)
    assert 0 < int(r.info["rechecked"].sum()) < n and "rechecked_why" in r.info
    cov = coverage(r.value, r.ci_halfwidth, truth)
    lo, hi = TOL.coverage_band(n)
    assert lo <= cov <= hi, f"coverage {cov:.3f} outside [{lo:.3f}, {hi:.3f}]"


def test_image_encoders_take_no_recheck():
    """On an image encoder (VGG5 split 2, 32 px) the per-probe laws are near normal: no sample
    of FSInfo_diag (atol 0.01) or dFIL (rtol 0.01 and 0.05) is re-checked, so their probe
    counts are Stein's three stages as before."""
    import fsinfo_fast as ff
    from fsinfo_fast.models.vgg import vgg5

    torch.manual_seed(0)
    enc = ff.split(vgg5().eval(), 2)
    enc = getattr(enc, "encoder", enc)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lin = ff.linearize(enc, x, seed=0)
    results = [lin.fsinfo(0.1, variant="diag", atol=0.01), lin.dfil(0.1, rtol=0.01),
               ff.linearize(enc, x, seed=0).dfil(0.1, rtol=0.05)]
    for r in results:
        assert r.probes_per_sample is not None  # a randomized route
        assert "rechecked" not in r.info, r.info.get("rechecked")


@pytest.mark.xfail(strict=True, reason="open: a rank-one spike with 3% of the trace over a "
                   "diagonal, Rademacher dFIL at rtol 0.05: 0.851 before the re-check, 0.901 "
                   "after (the spike's law is nearly chi2_1; stages 2 and 3 both miss its tail "
                   "in the rest)")
def test_rademacher_dfil_spike_over_a_diagonal():
    """``J = w I + a b^T`` (``d = 1000``, unit ``a``, ``b``; the spike carries 3% of the trace):
    Rademacher probes see ``w I`` exactly, so the probe variance is the spike's, a nearly
    chi-square(1) law. ``auto`` takes this route at rtol 0.05 (it predicts ~20 new products)."""
    import fsinfo_fast as ff

    d, share, n = 1000, 0.03, TOL.seeds
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    J = torch.eye(d, dtype=torch.float64) * math.sqrt((1 - share) / share / d)
    J += torch.outer(a / a.norm(), b / b.norm())
    enc = torch.nn.Linear(d, d, bias=False).eval()
    with torch.no_grad():
        enc.weight.copy_(J.float())
    truth = float((enc.weight.detach().double() ** 2).sum()) / d
    x = torch.randn(1, d, generator=g).expand(n, d).contiguous()
    r = ff.linearize(enc, x, seed=1, sample_ids=torch.arange(n)).dfil(
        1.0, estimator="randomized", method="hutchinson", rtol=0.05)
    cov = coverage(r.value, r.ci_halfwidth, truth)
    lo, hi = TOL.coverage_band(n)
    assert lo <= cov <= hi, f"coverage {cov:.3f} outside [{lo:.3f}, {hi:.3f}]"
