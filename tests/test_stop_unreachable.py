"""``StoppingRule.stop_unreachable``: a sample whose planned last stage would pass
``max_probes`` stops at the end of its stage 2 (unconverged) instead of drawing probes to the
cap; ``estimator="auto"`` sets it, because its exact route takes over such a sample anyway.
The samples that converge are untouched: bit for bit the same values, intervals and counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators import StoppingRule, estimate_diag, hutchinson_trace

pytestmark = pytest.mark.usefixtures("one_thread")


def _products(batch=4, d=48, m=16, seed=0):
    """Samples of very different column spreads: some converge within the cap, some cannot."""
    J = torch.randn(batch, m, d, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    for i in range(batch):
        J[i] *= torch.linspace(0.2, 1.0, d, dtype=torch.float64) ** (2 * i)
    return DenseProducts(J)


def _runs(fn):
    return fn(False), fn(True)


def test_hopeless_samples_stop_at_stage_two_the_others_are_unchanged():
    P = _products()
    cap = 100
    full, early = _runs(lambda flag: estimate_diag(P, sigma=0.1, seed=3, atol=0.05,
                                                   max_probes=cap,
                                                   stop_unreachable=flag).fsinfo_diag)
    ok = full.converged
    assert bool(ok.any()) and not bool(ok.all()), "the case needs both kinds of sample"
    assert torch.equal(early.converged, ok)
    for f in ("value", "stderr", "ci_halfwidth"):
        assert torch.equal(getattr(early, f)[ok], getattr(full, f)[ok]), f
    assert torch.equal(early.probes_per_sample[ok], full.probes_per_sample[ok])
    bad = ~ok
    assert (full.probes_per_sample[bad] == cap).all()
    # stopped where stage 2 ended: well before the cap, an interval from stage 2's probes
    assert (early.probes_per_sample[bad] < cap // 2).all()
    assert (early.info["pilot_probes"][bad] == 4).all()  # reported from stage 2
    assert torch.isfinite(early.ci_halfwidth[bad]).all() and (early.stderr[bad] > 0).all()


def _trace(P, what, rtol, cap, flag):
    if what == "trace":
        return hutchinson_trace(P, sigma=0.1, seed=3, rtol=rtol, max_probes=cap,
                                stop_unreachable=flag)
    return estimate_diag(P, sigma=0.1, seed=3, dfil_rtol=rtol, max_probes=cap,
                         stop_unreachable=flag).dfil


@pytest.mark.parametrize("what", ["trace", "dfil_same_probes"])
def test_relative_targets_give_up_only_where_even_an_optimistic_plan_fails(what):
    """Skewed per-probe traces: a stage 3 cut at the cap can still meet ``rtol`` at its own
    value (two of these samples do at rtol 0.1 within 100 probes), so the give-up is planned
    against ``|v_2| + 2 h_2``: nothing changes there; at rtol 0.03 within 300 no sample
    converges, and every one stops early."""
    P = _products()
    full, early = _runs(lambda flag: _trace(P, what, 0.1, 100, flag))
    assert bool(full.converged.any())
    for f in ("value", "ci_halfwidth", "converged", "probes_per_sample"):
        assert torch.equal(getattr(early, f), getattr(full, f)), f
    full, early = _runs(lambda flag: _trace(P, what, 0.03, 300, flag))
    assert not bool(full.converged.any()) and not bool(early.converged.any())
    assert (full.probes_per_sample == 300).all()
    assert (early.probes_per_sample < 100).all() and early.num_probes < 100


def test_a_batch_that_cannot_converge_stops_drawing_early():
    P = _products()
    full, early = _runs(lambda flag: estimate_diag(P, sigma=0.1, seed=3, atol=0.005,
                                                   max_probes=200, stop_unreachable=flag))
    assert not bool(full.fsinfo_diag.converged.any())
    assert full.fsinfo_diag.num_probes == 200
    assert early.fsinfo_diag.num_probes < 50  # the batch's last stage 2 end
    assert int(P.vjp_passes) > 0


def test_the_flag_is_a_validated_stopping_field():
    assert StoppingRule(atol=0.1).stop_unreachable is False
    assert StoppingRule(atol=0.1).stop_batch is False
    with pytest.raises(ff.InvalidInputError, match="stop_unreachable must be a bool"):
        StoppingRule(atol=0.1, stop_unreachable=1)
    with pytest.raises(ff.InvalidInputError, match="stop_batch must be a bool"):
        StoppingRule(atol=0.1, stop_batch="yes")


def _batch_runs(fn):
    """``fn(stop_batch)`` under ``stop_unreachable``, without and with the batch stop, and the
    products each spent."""
    out = []
    for flag in (False, True):
        P = _products()
        out.append((fn(P, flag), int(P.vjp_passes) + int(P.jvp_passes)))
    return out


@pytest.mark.parametrize("what", ["fsinfo_diag", "trace"])
def test_stop_batch_stops_every_sample_with_the_first_unconverged_one(what):
    """``StoppingRule.stop_batch``: once a sample is recorded unconverged, the others stop
    before the next round (``auto`` replaces the whole batch then, so their rounds would be
    drawn for nothing): reported from every probe so far, ``converged=False``. The sample that
    gave up first is untouched."""
    def run(P, flag):
        if what == "trace":
            return hutchinson_trace(P, sigma=0.1, seed=3, rtol=0.07, max_probes=100,
                                    stop_unreachable=True, stop_batch=flag)
        return estimate_diag(P, sigma=0.1, seed=3, atol=0.05, max_probes=100,
                             stop_unreachable=True, stop_batch=flag).fsinfo_diag

    (alone, spent_alone), (batch, spent_batch) = _batch_runs(run)
    bad = ~alone.converged
    assert bool(bad.any())
    first = int(alone.probes_per_sample[bad].min())
    assert int(alone.probes_per_sample.max()) > first, "the case needs a later sample"
    assert not bool(batch.converged.any())
    assert (batch.probes_per_sample == first).all() and batch.num_probes == first
    assert spent_batch < spent_alone
    first_out = bad & (alone.probes_per_sample == first)
    assert torch.equal(batch.info["stopped_with_batch"], ~first_out)
    assert "stopped_with_batch" not in alone.info
    i = int(torch.nonzero(first_out)[0])
    for f in ("value", "stderr", "ci_halfwidth"):
        assert torch.equal(getattr(batch, f)[i], getattr(alone, f)[i]), f
    # the others: the plain mean of every probe drawn for them
    assert torch.isfinite(batch.value).all() and (batch.stderr > 0).all()


def test_stop_batch_changes_nothing_where_every_sample_converges():
    def run(P, flag):
        return estimate_diag(P, sigma=0.1, seed=3, atol=0.3, max_probes=100,
                             stop_unreachable=True, stop_batch=flag).fsinfo_diag

    (alone, spent_alone), (batch, spent_batch) = _batch_runs(run)
    assert bool(alone.converged.all()) and int(alone.probes_per_sample.min()) < 100
    assert len(set(alone.probes_per_sample.tolist())) > 1  # samples stop at different counts
    for f in ("value", "stderr", "ci_halfwidth", "converged", "probes_per_sample"):
        assert torch.equal(getattr(batch, f), getattr(alone, f)), f
    assert spent_batch == spent_alone


def _wide(d=600, m=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(d, m), nn.Tanh()).eval()
    return enc, torch.rand(2, d, generator=g)


def test_auto_takes_the_exact_route_without_spending_probes_to_the_cap():
    """A tolerance no estimate meets within min(m, d) = 600 probes: ``auto`` used to draw all
    600 before its exact route (twice the exact cost); now it stops where stage 2 plans past
    the cap. An explicitly randomized estimate still uses every probe the cap allows."""
    enc, x = _wide()
    lin = ff.linearize(enc, x, seed=0)
    r = lin.fsinfo(0.1, atol=1e-5)  # (the fast route's rounding allowance is ~2e-6)
    assert r.estimator == "exact-fast"
    assert "within 600 probes" in r.info["auto"]
    spent = r.info["auto_randomized_passes"]
    assert 0 < spent < 600 // 4
    exact = lin.exact()
    torch.testing.assert_close(r.value, exact.fsinfo(0.1, "diag").value, rtol=1e-5, atol=1e-6)
    d = ff.linearize(enc, x, seed=0).dfil(0.1, rtol=1e-4, method="hutchinson")
    assert d.estimator == "exact-fast"
    spent = d.info.get("auto_randomized_passes", 0) + d.info.get("auto_prediction_passes", 0)
    assert 0 < spent < 600 // 4
    rr = ff.linearize(enc, x, seed=0).fsinfo(0.1, estimator="randomized", atol=1e-6,
                                             max_probes=600)
    assert rr.num_probes == 600 and not bool(rr.converged.any())


def _low_rank(d=1000, m=600, r=3, seed=0):
    """Strongly correlated columns (a rank-3 map plus a little noise): the plain estimator
    cannot reach 0.01 nats/dim within 5000 probes, the deflated one does in a few dozen."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, m)
    with torch.no_grad():
        U, V = torch.randn(m, r, generator=g), torch.randn(d, r, generator=g)
        layer.weight.copy_(3 * U @ V.T / d**0.5 + 0.05 * torch.randn(m, d, generator=g) / d**0.5)
    return nn.Sequential(layer, nn.Tanh()).eval(), torch.rand(1, d, generator=g)


def test_auto_reroutes_a_wrongly_chosen_plain_route_to_the_deflated_estimator(monkeypatch):
    """4 probes can hide a heavy tail (21 of 1160 seeded CRAFT pool4 runs chose the plain
    route and needed 1241-1850 probes, or the exact route after the cap). Forced onto the plain
    route, ``auto`` gives it a cap of ``_REROUTE_AT`` probes under ``stop_unreachable`` and
    reroutes the batch to the deflated estimator when it cannot converge there."""
    from fsinfo_fast import linearization as L

    enc, x = _low_rank()
    lin = ff.linearize(enc, x, seed=0)
    plain = lin.fsinfo(0.1, estimator="randomized", atol=0.01, max_probes=2000)
    assert not bool(plain.converged.any())  # the plain route is hopeless here
    exact = lin.exact().fsinfo(0.1, "diag").value
    monkeypatch.setattr(L.Linearization, "_diag_route",
                        lambda self, *a, **k: ("plain", "forced by the test"))
    lin = ff.linearize(enc, x, seed=0)
    r = lin.fsinfo(0.1, atol=0.01)
    assert r.estimator == "randomized" and r.info["diag_method"] == "deflated"
    assert r.info["diag_method_why"].startswith("rerouted: forced by the test")
    assert f"within {L._REROUTE_AT} probes" in r.info["diag_method_why"]
    assert bool(r.converged.all()) and float(r.ci_halfwidth[0]) <= 0.01
    assert abs(float(r.value[0] - exact[0])) <= float(r.ci_halfwidth[0])
    p = lin.products
    assert int(p.vjp_passes) + int(p.jvp_passes) < 200  # min(m, d) = 600 for the exact route


def test_auto_sends_only_the_hopeless_sample_to_the_exact_route():
    """Under ``auto`` a sample that gives up within the cap (here on the deflated route: sample
    0 at rank 183) takes the exact route alone; the other one (saturated: it converges on a
    sketch of rank 122 and 14 remainder probes) keeps its randomized estimate, as alone. The
    batch took the exact route as a whole, its other samples stopped with the first that gave
    up (``stop_batch``): in the default ``fsinfo-fast guard`` 4 batches of 32 went through the
    fast exact route so, each for one sample. The estimators' ``stop_batch`` stays (checked
    below); in a batch, a sample given up at the rank choice stops every sample after the
    remainder's stage 1."""
    enc, x = _wide()
    x = torch.stack([x[0], 30 * x[1]])
    alone = [ff.linearize(enc, x[[i]], sample_ids=torch.tensor([i]), seed=0).fsinfo(
        0.1, atol=0.001) for i in (0, 1)]
    assert alone[0].estimator == "exact-fast" and alone[1].estimator == "randomized"
    assert bool(alone[1].converged.all())
    lin = ff.linearize(enc, x, seed=0)
    r = lin.fsinfo(0.1, atol=0.001)
    assert r.estimator == "mixed", r.info.get("auto")
    assert r.info["exact_samples"] == [0] and r.info["exact_samples_estimator"] == ["exact-fast"]
    # the record says which sample gave up, and no other stopped with it
    assert "for 1 sample(s)" in r.info["exact_samples_auto"][0]
    assert "stopped with it" not in r.info["auto"]
    # (as alone, up to the batched products' float32 rounding: 4e-8 here; the same products)
    torch.testing.assert_close(r.value[1:], alone[1].value, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.ci_halfwidth[1:], alone[1].ci_halfwidth, rtol=0.01, atol=0)
    assert bool(r.converged.all())
    assert r.info["products_per_sample"][1] == alone[1].info["products_per_sample"][0]
    assert torch.equal(r.value[:1], alone[0].value)
    truth = lin.exact().fsinfo(0.1, "diag").value
    assert bool(((r.value - truth).abs() <= r.ci_halfwidth).all()), (r.value - truth)
    runs = [ff.estimators.estimate_diag_deflated(
        lin.products, sigma=0.1, atol=0.001, max_probes=600, stop_unreachable=True,
        stop_batch=flag).fsinfo_diag for flag in (False, True)]
    without, batch = (f.info for f in runs)
    assert runs[0].converged.tolist() == [False, True]  # sample 1 converges on its own
    assert not bool(runs[1].converged.any())
    assert batch["gave_up_at_rank_choice"] == [True, False]
    assert batch["stopped_with_batch"].tolist() == [False, True]
    assert batch["remainder_probes"] == 4  # stage 1 only
    assert sum(without["products_per_sample"]) > sum(batch["products_per_sample"])


def _rms_encoder():
    """A LLaMA-style RMSNorm block, ``d = m = 160``: the rank pilot predicts a remainder near
    what the cap leaves after the sketch (README, "coverage is over seeds")."""

    class RMS(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

        def forward(self, h):
            return self.w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    torch.manual_seed(2)
    enc = nn.Sequential(nn.Linear(16, 16), RMS(16), nn.Linear(16, 16)).eval()
    return enc, torch.randn(2, 10, 16)


def test_auto_gives_up_where_the_rank_pilot_predicts_past_the_cap():
    """The rank choice's own prediction (pilot + sketch + predicted remainder) past the cap
    gives up there, under ``stop_unreachable``: the remainder could converge only where its
    stage 2 happened to see a low spread, and those intervals undercover. Seed 0, the default:
    the deflated route's sketch of rank 54 (116 products) left 44 of the 160 for a remainder
    predicted at 60 and 44 probes; it converged with stage 2 of 5 probes and sample 0's value
    was 2.6 half-widths off the oracle. Now the exact route serves it."""
    enc, x = _rms_encoder()
    oracle = ff.linearize(enc, x, seed=0).exact().fsinfo(0.1, "diag").value
    lin = ff.linearize(enc, x, seed=0)
    est = ff.estimators.estimate_diag_deflated(
        lin.products, sigma=0.1, atol=0.01, max_probes=160, stop_unreachable=True,
        stop_batch=False).fsinfo_diag
    info = est.info
    over = [info["rank_pilot_probes"] + 2 * r + k > 160
            for r, k in zip(info["rank"], info["predicted_probes"], strict=True)]
    assert any(over)
    assert info["gave_up_at_rank_choice"] == over
    assert not bool(est.converged[torch.tensor(over)].any())
    # the same estimator asked for explicitly draws to its cap (no give-up there)
    capped = ff.estimators.estimate_diag_deflated(lin.products, sigma=0.1, atol=0.01,
                                                  max_probes=160).fsinfo_diag
    assert not any(capped.info["gave_up_at_rank_choice"])
    assert capped.info["remainder_probes"] > 4
    r = lin.fsinfo(0.1)
    assert r.estimator == "exact-fast"
    assert bool(((r.value - oracle).abs() <= r.ci_halfwidth).all())


@pytest.mark.parametrize("method", ["hutchinson", "diag"])
def test_auto_dfil_sends_only_its_samples_that_miss_the_cap_to_the_exact_route(
        method, monkeypatch):
    """dFIL's probe-cap switch, as FSInfo_diag's: the samples that cannot converge within the
    cap (three saturated ones here) take the fast exact route alone, the other keeps its
    randomized estimate (it took the batch's route, the others stopping with the first that
    gave up). The prediction that would choose the exact route for the batch first is turned
    off so that the estimate runs."""
    import fsinfo_fast.linearization as L

    monkeypatch.setattr(L.Linearization, "_dfil_predicted_exact", lambda self, *a, **k: (None, {}))
    enc, x = _wide()
    x = torch.stack([30 * x[1], 30 * x[1], 30 * x[1], x[0]])
    lin = ff.linearize(enc, x, seed=0)
    r = lin.dfil(0.1, rtol=0.01, method=method)
    assert r.estimator == "mixed", r.info.get("auto")
    assert r.info["exact_samples"] == [0, 1, 2]
    assert "did not reach the tolerance within" in r.info["exact_samples_auto"][0]
    assert "stopped with it" not in r.info["auto"]
    assert bool(r.converged.all())
    truth = lin.exact().dfil(torch.tensor(0.1, dtype=torch.float64)).value
    assert bool(((r.value - truth).abs() <= r.ci_halfwidth).all()), (r.value - truth)
    alone = ff.linearize(enc, x[3:], sample_ids=torch.tensor([3]), seed=0).dfil(
        0.1, rtol=0.01, method=method)
    assert alone.estimator == "randomized"
    torch.testing.assert_close(r.value[3:], alone.value, rtol=1e-6, atol=0)


def test_a_hopeless_sample_that_cannot_be_served_alone_sends_the_batch(one_sample_parts_fail):
    """Where the sample that gave up cannot be served on its own (a check its sub-batch fails),
    the batch takes the exact route as one, and info["auto"] says why."""
    enc, x = _wide()
    x = torch.stack([x[0], 30 * x[1]])
    r = ff.linearize(enc, x, seed=0).fsinfo(0.1, atol=0.001)
    assert r.estimator == "exact-fast" and "exact_samples" not in r.info
    assert "alone could not be served (EncoderError: a check this sub-batch fails)" in \
        r.info["auto"]
