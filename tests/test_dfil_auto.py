"""``Linearization.dfil(estimator="auto")``: the three-stage cost prediction and its choices.

``auto`` predicts the products the randomized dFIL spends under the three-stage stopping rule
(:func:`~fsinfo_fast.estimators.stopping.planned_probes`) and takes the fast exact route at once
where ``min(m, d)`` products are predicted cheaper; with FSInfo_diag's deflated estimate held it
also considers the deflated dFIL (the sketch is shared).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.estimators.stopping import StoppingRule, planned_probes, run_rounds


@pytest.mark.parametrize("rtol", [None, 0.05])
@pytest.mark.parametrize("need", [0.5, 7.0, 40.0, 333.0, 900.0, 4000.0])
def test_planned_probes_replays_the_three_stage_rule(need, rtol):
    """With every stage's spread equal to the true one (per-probe sd ``s``), run_rounds draws
    exactly what planned_probes predicts (stages 1 + 2 + 3 on the schedule), and stops
    unconverged exactly where the prediction exceeds max_probes."""
    s, max_probes = 1.0, 1000
    tol = 1.96 * s / math.sqrt(need)  # the normal interval needs `need` probes at this tol
    atol = None if rtol is not None else tol
    value = 1.0 if rtol is None else tol / rtol  # rtol * value = tol
    drawn = [0]

    def process(start, count, active):
        drawn[0] = start + count

    def summarize(lo, rows=None, names=None):
        k = drawn[0] - lo
        v = torch.full((1,), value, dtype=torch.float64)
        return {"v": (v, torch.full((1,), s / math.sqrt(k), dtype=torch.float64), k - 1)}

    rule = StoppingRule(atol=atol, rtol=rtol, max_probes=max_probes).for_estimator("trace")
    _, converged, probes, total, _ = run_rounds(
        rule, batch=1, device=torch.device("cpu"), process=process, summarize=summarize,
        targets={"v": (atol, rtol)})
    want = planned_probes(need, min_probes=rule.min_probes, max_probes=max_probes, rtol=rtol)
    assert want >= need  # stage 3 alone holds about `need`: the total is more
    if want <= max_probes:
        assert int(probes[0]) == total == want and bool(converged[0])
    else:
        assert total == max_probes and not bool(converged[0])


def _low_rank(d=256, m=48, rank=2, seed=0):
    """m < d, J of effective rank 2: Rademacher (and Gaussian) trace probes are poor."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, rank, generator=g) @ torch.randn(rank, d, generator=g)
    w = w + 0.01 * torch.randn(m, d, generator=g)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(d, m, bias=False), nn.Tanh()).eval()
    with torch.no_grad():
        enc[1].weight.copy_(w / d**0.5)
    return enc, torch.rand(2, d, generator=g)


def _check_exact(lin, d, sigma=0.1):
    assert d.estimator == "exact-fast"
    assert torch.equal(d.value, lin.exact_fast().dfil(sigma).value)
    ex = lin.exact().dfil(sigma).value  # the float64 oracle
    assert bool(((d.value - ex).abs() <= d.ci_halfwidth).all())


@pytest.mark.parametrize("seed", range(4))
def test_auto_goes_exact_at_once_from_the_first_round(seed, monkeypatch):
    """No probes held: the first round of the Rademacher estimator (4 JVPs) predicts far more
    products than min(m, d) = 48; the fast exact route is taken at once, why is recorded, and
    no randomized products beyond that round are spent."""
    enc, x = _low_rank(seed=seed)
    lin = ff.linearize(enc, x, seed=seed)
    P = lin.products
    jvps = []
    real = type(P).jvp

    def counting(self, V):
        jvps.append(V.shape[1])
        return real(self, V)

    monkeypatch.setattr(type(P), "jvp", counting)
    d = lin.dfil(0.1)
    assert "three-stage rule" in d.info["auto"] and "first round (4 Rademacher" in d.info["auto"]
    assert "fast exact route was used" in d.info["auto"]
    # 4 Rademacher JVPs and the VJP choosing their dominant columns (none taken here)
    assert d.info.get("auto_randomized_passes") is None and d.info["auto_prediction_passes"] == 5
    assert sum(jvps) == 4  # the exact route here reads rows (m < d): VJPs only
    monkeypatch.setattr(type(P), "jvp", real)
    _check_exact(lin, d)


def test_auto_goes_exact_from_the_held_gaussian_vjps():
    """After a plain FSInfo_diag, its Gaussian VJPs predict both methods' three-stage cost; both
    exceed min(m, d): exact at once, with no further probe drawn for the prediction."""
    enc, x = _low_rank()
    lin = ff.linearize(enc, x, seed=1)
    lin.fsinfo(0.1, estimator="randomized", atol=0.2)
    d = lin.dfil(0.1)
    assert "Gaussian VJPs held" in d.info["auto"] and "three-stage rule" in d.info["auto"]
    assert "three-stage rule" in d.info["method_reason"]
    assert d.info.get("auto_randomized_passes") is None and d.info["auto_prediction_passes"] == 0
    _check_exact(lin, d)


def _spread(seed, n=512):
    """A square Gaussian J (Wishart J^T J): trace probes are good, min(m, d) = 512 large."""
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Linear(n, n, bias=False)).eval()
    with torch.no_grad():
        enc[0].weight.copy_(torch.randn(n, n, generator=g) / n**0.5)
    return enc, torch.rand(2, n, generator=g)


def test_auto_keeps_the_randomized_route_where_it_is_cheaper():
    """On a well-spread J the prediction stays well below min(m, d): the randomized estimate is
    kept (with the prediction recorded) and covers the float64 oracle; over 8 seeds the
    predicted three-stage total is within a factor 3 of the probes drawn (median)."""
    ratios = []
    for seed in range(8):
        enc, x = _spread(seed)
        lin = ff.linearize(enc, x, seed=seed)
        d = lin.dfil(0.1, rtol=0.02)
        assert d.estimator == "randomized" and d.info["method"] == "hutchinson"
        assert "three-stage rule" in d.info["auto_prediction"] and bool(d.converged.all())
        assert d.info.get("auto_randomized_passes") is None
        pred = float(d.info["auto_prediction"].split("stages 1-3: ")[1].split(" ")[0])
        ratios.append(pred / int(d.num_probes))
        if seed < 2:
            ex = lin.exact().dfil(0.1).value
            assert bool(((d.value - ex).abs() <= d.ci_halfwidth).all())
    ratios.sort()
    med = 0.5 * (ratios[3] + ratios[4])
    assert 1 / 3 < med < 3, ratios


def test_auto_considers_the_deflated_dfil_and_shares_the_sketch():
    """FSInfo_diag took the deflated route (low effective rank): dFIL's auto method choice
    predicts the deflated remainder's cost from that estimate, picks it (cheaper than min(m, d)
    and than the plain methods), reuses the sketch, and covers the oracle."""
    enc, x = _low_rank()
    lin = ff.linearize(enc, x, seed=2)
    f = lin.fsinfo(0.1)
    assert f.info["diag_method"] == "deflated"
    d = lin.dfil(0.1)
    assert d.estimator == "randomized" and d.info["method"] == "deflated"
    assert "deflated sketch of FSInfo_diag is shared" in d.info["method_reason"]
    assert d.info["sketch_reused_passes"] > 0
    ex = lin.exact().dfil(0.1).value
    assert bool(((d.value - ex).abs() <= d.ci_halfwidth).all())


def test_shared_sketch_gives_the_fresh_result():
    """A deflated request on a shared sketch equals a fresh one up to rounding (prefixes of the
    sketch are the sketches)."""
    from fsinfo_fast.estimators.deflated import DeflationSketch, estimate_diag_deflated

    enc, x = _low_rank(d=128, m=64, rank=6)
    P = ff.linearize(enc, x, seed=0).products
    sk = DeflationSketch.empty(P)
    a = estimate_diag_deflated(P, sigma=0.1, atol=0.01, seed=3, sketch=sk)
    b = estimate_diag_deflated(P, sigma=0.1, dfil_rtol=0.01, seed=3, sketch=sk)
    c = estimate_diag_deflated(P, sigma=0.1, dfil_rtol=0.01, seed=3)
    assert b.dfil.info["sketch_reused_passes"] == a.dfil.info["sketch_passes"] > 0
    torch.testing.assert_close(b.dfil.value, c.dfil.value, rtol=1e-9, atol=0)
    assert b.dfil.info["rank"] == c.dfil.info["rank"]


def test_planned_probes_past_the_schedule_is_inf():
    """A need beyond the schedule's 2^40 probes (a tolerance near zero) is an infinite plan,
    not a StopIteration: dfil's cost prediction then says the cap stops it."""
    assert planned_probes(1e30, min_probes=4, max_probes=1000, rtol=1e-9) == math.inf
    assert planned_probes(1e30, min_probes=4, max_probes=1000) == math.inf
    enc, x = _spread(0, n=64)
    lin = ff.linearize(enc, x, seed=0)
    lin.fsinfo(0.1, estimator="randomized", num_probes=8)  # Gaussian VJPs held
    d = lin.dfil(0.1, rtol=1e-4)  # (1e-12: the oracle, see test_neg_inf_claims.py)
    assert d.estimator == "exact-fast" and "more than its probe cap 64:" in d.info["auto"]


def test_auto_weighs_the_deflated_dfil_where_plain_probes_need_many(monkeypatch):
    """dFIL alone, nothing held, J of effective rank 4 with min(m, d) = 384 >= DEFLATE_ABOVE:
    the Rademacher first round predicts far more than the cap, so the deflated dFIL is weighed
    from its own rank choice; it is taken, its estimate reuses the rank pilot and the sketch
    (no product paid twice), the whole call spends far fewer products than the exact route it
    would otherwise take, and over 30 seeds the 95% interval covers the float64 oracle."""
    enc, x = _low_rank(d=512, m=384, rank=4)
    ex = ff.linearize(enc, x).exact().dfil(0.1).value
    covered, totals = 0, []
    for seed in range(30):
        lin = ff.linearize(enc, x, seed=seed)
        P = lin.products
        counted = []
        for name in ("jvp", "vjp"):
            real = getattr(P, name)
            monkeypatch.setattr(P, name, lambda V, _r=real, _c=counted: (_c.append(V.shape[1]),
                                                                _r(V))[1])
        d = lin.dfil(0.1)
        assert d.estimator == "randomized" and d.info["method"] == "deflated"
        assert bool(d.converged.all())
        assert "deflated: pilot, sketch + remainder" in d.info["method_reason"]
        assert "not taken" not in d.info["method_reason"]
        # the prediction spent 4 Rademacher JVPs (and the VJP choosing their dominant
        # columns), the pilot's 8 VJPs and 16 sketch columns
        assert d.info["auto_prediction_passes"] == 4 + 1 + 8 + 2 * 16
        assert d.info["rank_pilot_reused_probes"] == 8 and d.info["sketch_passes"] == 0
        assert d.info["sketch_reused_passes"] == 2 * 16
        total = d.passes + d.info["auto_prediction_passes"]
        # every product counted once: nothing redrawn (the rounding check's, run once per
        # batch, reported apart)
        assert sum(counted) == total + d.info["rounding_check_products"]
        totals.append(total)
        covered += int(((d.value - ex).abs() <= d.ci_halfwidth).sum())
    assert max(totals) < min(lin.m, lin.d) / 4
    assert covered >= 51, covered  # of 60 intervals (expected 57; 51 is 3.5 sd below)


def test_flat_spectrum_does_not_grow_or_take_the_deflated_dfil():
    """A Wishart J^T J (flat spectrum) at a tight rtol: every method predicts more than
    DEFLATE_ABOVE, so the deflated dFIL is weighed, but its first sketch block saves little;
    it is listed as not taken and its prediction stops at that block (8 pilot VJPs and 16
    columns, not the hundreds of columns a rank choice for this tolerance would grow)."""
    for seed in range(2):
        enc, x = _spread(seed)
        lin = ff.linearize(enc, x, seed=seed)
        lin.fsinfo(0.1)
        d = lin.dfil(0.1, rtol=0.005)
        assert d.info.get("method") != "deflated"
        assert "deflated: " in d.info["method_reason"] and "[not taken: " in d.info["method_reason"]
        assert d.info["auto_prediction_passes"] <= 8 + 2 * 16


def test_choose_rank_is_the_ranks_the_estimate_takes():
    """choose_rank on a state, then the estimate on that state with the same arguments: the
    same ranks, the rank pilot and sketch reused (the estimate pays its remainder only), and
    each value equals a fresh estimate's."""
    from fsinfo_fast.estimators.deflated import (
        DeflatedProbeState,
        choose_rank,
        estimate_diag_deflated,
    )

    enc, x = _low_rank(d=128, m=96, rank=6)
    P = ff.linearize(enc, x, seed=0).products
    kw = dict(sigma=0.1, seed=3, dfil_rtol=0.01)
    st = DeflatedProbeState.for_products(P, seed=3)
    ch = choose_rank(P, state=st, **kw)
    assert ch.pilot_new == 8 and ch.sketch_new == 2 * int(ch.ranks.max()) > 0
    assert bool((ch.predicted <= ch.predicted_plain).all())
    r = estimate_diag_deflated(P, state=st, **kw).dfil
    fresh = estimate_diag_deflated(P, **kw).dfil
    assert r.info["rank"] == fresh.info["rank"] == ch.ranks.tolist()
    assert r.info["rank_pilot_reused_probes"] == 8 and r.info["sketch_passes"] == 0
    assert r.passes == r.info["remainder_probes"]
    torch.testing.assert_close(r.value, fresh.value, rtol=1e-9, atol=0)


@pytest.mark.parametrize("path, weighed", [("encoder.stages.0", None),
                                           ("encoder.stages.1", True)])
def test_the_deflated_dfil_prediction_spends_little_where_it_is_not_taken(path, weighed):
    """A transformers ResNet (built offline from its config) cut after a stage, a batch of 3
    natural crops. Where the plain methods predict more than _DEFLATED_DFIL_ABOVE new products
    per sample (batch mean; after stage 1 always, after stage 0 about 500, either side), the
    deflated dFIL is weighed and not taken, and what its prediction spent (rank pilot and
    sketch) stays within its bound (the first block, or 15% of the route it would replace);
    where they predict fewer it is not weighed and spends nothing. The result covers the
    float64 oracle either way."""
    pytest.importorskip("transformers")
    from fsinfo_fast.data import natural_images
    from fsinfo_fast.linearization import _DEFLATED_DFIL_SPEND
    from fsinfo_fast.models.third_party import build

    x, _ = natural_images(size=32, n=3, seed=0)
    lin = ff.linearize(ff.split(build("resnet", size=32), path), x)
    lin.fsinfo(0.1)
    d = lin.dfil(0.1)
    why = d.info.get("method_reason", "")
    assert d.info.get("method") != "deflated"
    if weighed:
        assert "deflated: pilot, sketch" in why
    if "deflated: pilot, sketch" in why:
        n = min(lin.m, lin.d)
        assert d.info["auto_prediction_passes"] <= 8 + max(2 * 16,
                                                           _DEFLATED_DFIL_SPEND * (n + 16))
    else:
        assert "deflated" not in why and d.info.get("auto_prediction_passes", 0) == 0, why
    ex = lin.exact().dfil(0.1).value
    assert bool(((d.value - ex).abs() <= d.ci_halfwidth).all())


def test_randomized_estimator_weighs_the_deflated_dfil_under_its_own_rule():
    """estimator='randomized' (no exact route, its own probe cap): the deflated dFIL is weighed
    under the rule its estimate runs with, so the estimate takes the predicted ranks and reuses
    the pilot and sketch, and the products of the prediction are recorded."""
    enc, x = _low_rank(d=512, m=384, rank=4)
    lin = ff.linearize(enc, x, seed=0)
    lin.fsinfo(0.1, estimator="randomized", num_probes=8)  # Gaussian VJPs held
    d = lin.dfil(0.1, estimator="randomized")
    assert d.estimator == "randomized" and d.info["method"] == "deflated"
    assert d.info["auto_prediction_passes"] == 8 + 2 * 16
    assert d.info["sketch_passes"] == 0 and d.info["sketch_reused_passes"] == 2 * 16
    assert d.info["rank_pilot_reused_probes"] == 8
