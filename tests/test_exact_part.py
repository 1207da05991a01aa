"""``auto`` sends to an exact route only the samples whose own measured rounding missed the
tolerance (``Linearization._exact_part``).

A saturated activation in one sample of a batch used to send the whole batch through the fast
exact route: in the default ``fsinfo-fast guard`` run 5 of its batches of 32 were flagged for one
sample each, and those whole-batch routes took 73 s of the run's 119 s. Now the flagged sample
alone is linearised again (same backend, seed and sample id) and takes the exact route; the
others keep their randomized estimates, so a sample's result no longer depends on its
batch-mates.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
import fsinfo_fast.linearization as L
from fsinfo_fast.profile.runner import _label, _metric_fields


class Front(nn.Module):
    """``tanh(1e-3 x)`` before a dense map: a sample shifted by ``5000-8000`` saturates (autograd's
    ``1 - tanh^2`` keeps few digits in float32), the others do not."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(torch.tanh(1e-3 * x.flatten(1)))


D = 512  # (at d = 256 auto's first choice is the fast exact route for the whole batch)


def _setup(shift: float, flagged=(1,), batch: int = 4):
    torch.manual_seed(0)
    enc = Front(D).eval()
    x = torch.randn(batch, D)
    for i in flagged:
        x[i] += shift
    return enc, x


@pytest.fixture
def fast_batches(monkeypatch):
    """The batch sizes the fast exact route ran on."""
    seen: list[int] = []
    orig = L.exact_fast_fisher

    def spy(products, **kw):
        seen.append(int(products.batch))
        return orig(products, **kw)

    monkeypatch.setattr(L, "exact_fast_fisher", spy)
    return seen


@pytest.mark.parametrize("shift, route", [(8000.0, "exact"), (5400.0, "exact-fast")])
def test_only_the_flagged_sample_takes_the_exact_route(shift, route, fast_batches):
    enc, x = _setup(shift)
    lin = ff.linearize(enc, x)
    r = lin.fsinfo(0.1, floor=0.0)
    assert r.estimator == "mixed", r.info.get("auto")
    assert r.info["exact_samples"] == [1] and r.info["exact_samples_estimator"] == [route]
    assert "1 of 4 sample(s) took an exact route" in r.info["auto"]
    assert "measured against float64" in r.info["auto"]
    assert fast_batches == [1]  # one sample's products, not the batch's
    assert lin._exact_fast is None and lin._exact is None
    # the others: the randomized estimate itself (same probes, same measured rounding)
    rand = ff.linearize(enc, x).fsinfo(0.1, floor=0.0, estimator="randomized")
    keep = torch.tensor([0, 2, 3])
    for name in ("value", "ci_halfwidth", "stderr", "bias_bound"):
        assert torch.equal(getattr(r, name)[keep], getattr(rand, name)[keep]), name
    assert not bool(rand.converged[1]) and bool(r.converged.all())
    assert r.passes > rand.passes
    # the flagged one: its exact value, as alone in a batch of its own
    oracle = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).fsinfo(
        0.1, floor=0.0, estimator="exact")
    err = float((r.value[1] - oracle.value[0]).abs())
    assert err <= float(r.ci_halfwidth[1]) + 1e-12 and float(r.ci_halfwidth[1]) < 0.01
    alone = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).fsinfo(0.1, floor=0.0)
    assert alone.estimator == route and torch.equal(alone.value, r.value[1:2])
    if route == "exact":
        assert r.info["rounding_measured"][1] is None  # (float64: nothing to measure)
    else:
        assert r.info["rounding_measured"][1] == alone.info["rounding_measured"][0]


def test_the_held_samples_serve_later_requests(fast_batches):
    """A later request (another sigma, a floor, dFIL, sigma*) reuses the sample's exact
    quantities; no new products for it."""
    enc, x = _setup(8000.0)
    lin = ff.linearize(enc, x)
    first = lin.fsinfo(0.1, floor=0.0)
    ex = ff.linearize(enc, x).exact()
    for r, want in ((lin.fsinfo(0.3, floor=1e-6), ex.fsinfo(torch.tensor(0.3), floor=1e-6)),
                    (lin.dfil(0.1), ex.dfil(torch.tensor(0.1)))):
        assert r.estimator == "mixed" and r.info["exact_samples"] == [1], r.info.get("auto")
        assert abs(float(r.value[1] - want.value[1])) <= float(r.ci_halfwidth[1]) + 1e-12
        assert bool((r.value[[0, 2, 3]] - want.value[[0, 2, 3]]).abs().le(
            r.ci_halfwidth[[0, 2, 3]]).all())
    assert fast_batches == [1] and len(lin._parts) == 1
    s = lin.fsinfo_sigma(-1.0)
    assert s.estimator == "mixed" and s.info["exact_samples"] == [1]
    true = ex.fsinfo_sigma(torch.tensor(-1.0), "diag").sigma
    keep = torch.tensor([0, 2, 3])
    assert bool(((s.ci_low[keep] <= true[keep]) & (true[keep] <= s.ci_high[keep])).all())
    # sample 1 (the oracle's): the floored equation solved by its held oracle, as alone (the
    # closed form exp(FSInfo(1) - target) neglected the floor with an interval of width 0);
    # the batch's oracle agrees within float64 rounding
    alone = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).fsinfo_sigma(
        -1.0, estimator="exact")
    assert torch.equal(s.sigma[1:2], alone.sigma) and torch.equal(s.ci_high[1:2], alone.ci_high)
    # (its interval: the oracle's rounding, read where a saturated tanh keeps few digits)
    assert float(alone.ci_low[0]) < float(alone.sigma[0]) < float(alone.ci_high[0])
    assert float(alone.ci_high[0] / alone.ci_low[0]) < 1 + 1e-6
    assert float(s.sigma[1]) == pytest.approx(float(true[1]), rel=1e-12)
    assert fast_batches == [1] and len(lin._parts) == 1
    # FSInfo(1) = FSInfo(0.1) + log(0.1) floorless: the closed form is within the floor's effect
    assert float(s.sigma[1]) == pytest.approx(
        float(torch.exp(first.value[1] + torch.log(torch.tensor(0.1, dtype=torch.float64))
                        + 1.0)), rel=1e-9)


def test_a_request_with_a_fixed_probe_count_keeps_its_estimate():
    """``num_probes`` is kept under auto (as the batch's exact quantities are not used there)."""
    enc, x = _setup(8000.0)
    lin = ff.linearize(enc, x)
    assert lin.fsinfo(0.1, floor=0.0).estimator == "mixed"
    r = lin.fsinfo(0.1, floor=0.0, num_probes=8)
    assert r.estimator == "randomized" and not bool(r.converged[1])


def test_every_sample_flagged_takes_the_batch_route(fast_batches):
    enc, x = _setup(8000.0, flagged=(0, 1))
    r = ff.linearize(enc, x[:2]).fsinfo(0.1, floor=0.0)
    assert r.estimator == "exact" and "exact_samples" not in r.info
    assert fast_batches == [2]


def test_a_sample_result_does_not_depend_on_its_batch_mates():
    """Sample 0 in a batch with a flagged sample and in a batch of its own: the same estimate."""
    enc, x = _setup(8000.0)
    both = ff.linearize(enc, x[:2]).fsinfo(0.1, floor=0.0)
    alone = ff.linearize(enc, x[:1]).fsinfo(0.1, floor=0.0)
    assert both.estimator == "mixed" and alone.estimator == "randomized"
    assert torch.equal(both.value[:1], alone.value)
    assert torch.equal(both.ci_halfwidth[:1], alone.ci_halfwidth)


def test_profile_records_name_each_sample_route():
    enc, x = _setup(8000.0)
    r = ff.linearize(enc, x).fsinfo(0.1, floor=0.0)
    f = _metric_fields("fsinfo_diag", r, _label(r, "auto"))
    labels = f["fsinfo_diag_estimator"]
    assert labels[0] == labels[2] == labels[3] == "randomized"
    assert labels[1].startswith("exact (auto: the torch.float32 products' rounding")
    assert "1 of 4 sample(s)" not in labels[1]  # (its own reason, not the batch's)
    assert f["fsinfo_diag_probes"][1] is None and f["fsinfo_diag_probes"][0] > 0
    assert f["fsinfo_diag_rounding"][1] is None and f["fsinfo_diag_rounding"][0] is not None



def test_a_sub_batch_trusts_its_batch_float64_function_check():
    """The flagged sample alone sat far below the batch's output scale, where the float32
    forward's cancellation (``(y + 1e3) - 1e3``) is 4.5% of its output: a sub-batch that
    re-ran the float64 copy's function check at its own scale raised EncoderError (helper 87);
    the batch passed it, and the whole-batch route served it before."""

    class Cancels(Front):
        def forward(self, x):
            x = x.flatten(1)
            w = torch.exp(-x.mean(1, keepdim=True) / 1000).detach()  # 3e-4 for the shifted one
            return (self.lin(torch.tanh(1e-3 * x)) * w + 1e3) - 1e3

    torch.manual_seed(0)
    enc = Cancels(D).eval()
    x = torch.randn(4, D)
    x[1] += 8000.0
    r = ff.linearize(enc, x).fsinfo(0.1, floor=0.0)
    assert r.estimator == "mixed" and r.info["exact_samples"] == [1]
    assert bool(r.converged.all())


def test_a_sub_batch_that_cannot_be_served_sends_the_batch_the_old_way(one_sample_parts_fail):
    """Where the samples alone cannot be served (a check their own values decide), the batch
    takes the exact route as one, and info["auto"] says why."""
    enc, x = _setup(8000.0)
    r = ff.linearize(enc, x).fsinfo(0.1, floor=0.0)
    assert r.estimator in ("exact", "exact-fast") and "exact_samples" not in r.info
    assert "alone could not be served (EncoderError: a check this sub-batch fails)" in \
        r.info["auto"]


def test_each_flagged_sample_names_its_own_route():
    """Three flagged samples in one sub-batch, one served by the fast exact route and two by
    the oracle: each sample's reason was the sub-batch's text ("2 of 3 samples ... took the
    float64 oracle's values"), the exact-fast one's too, and it cited a key the mixed result
    did not have (helper 88)."""
    torch.manual_seed(0)
    enc = Front(D).eval()
    x = torch.randn(6, D)
    for i, shift in ((1, 5400.0), (2, 8000.0), (3, 7000.0)):
        x[i] += shift
    r = ff.linearize(enc, x).fsinfo(1.0, floor=0.0)
    assert r.estimator == "mixed" and r.info["exact_samples"] == [1, 2, 3]
    routes = dict(zip(r.info["exact_samples"], r.info["exact_samples_estimator"], strict=True))
    said = dict(zip(r.info["exact_samples"], r.info["exact_samples_auto"], strict=True))
    assert r.info["exact_fast_oracle_samples"] == [k for k, v in routes.items() if v == "exact"]
    for k, route in routes.items():
        assert said[k].endswith("this sample took the fast exact route" if route == "exact-fast"
                                else "this sample took the float64 oracle (see info['auto'])")
        assert "2 of 3" not in said[k]
    assert "exact-fast" in routes.values() and "exact" in routes.values()


# -- a floorless -inf that float64 refutes: those samples take the oracle, not the batch --------

def _dead_in_float32(batch: int = 6, dead=(1,), flagged=()):
    """Samples ``dead`` shifted by 12000: ``tanh(1e-3 x)`` has every derivative 0 in float32
    (``|z| > 9``), none in float64 (``|z| < 19``), so their floorless FSInfo_diag is ``-inf``
    from float32 products and finite in truth; ``flagged`` shifted by 6300 (the rounding)."""
    enc, x = _setup(12000.0, dead, batch)
    for i in flagged:
        x[i] += 6300.0
    return enc, x


def test_a_false_neg_inf_sends_only_its_own_sample_to_the_oracle(oracle_batches):
    """One such sample in 6 sent the whole batch through the float64 oracle (helper 88: 2.82 s
    against 0.11 s); now it alone takes it, and the others keep their randomized estimates."""
    enc, x = _dead_in_float32()
    lin = ff.linearize(enc, x)
    r = lin.fsinfo(0.1, floor=0.0)
    assert r.estimator == "mixed", r.info.get("auto")
    assert r.info["exact_samples"] == [1] and r.info["exact_samples_estimator"] == ["exact"]
    assert "nonzero in float64" in r.info["exact_samples_auto"][0]
    assert oracle_batches == [1]  # one sample's oracle, not the batch's
    alone = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).fsinfo(
        0.1, floor=0.0, estimator="exact")
    assert torch.equal(r.value[1:2], alone.value)
    # (the oracle's rounding: its tanh saturated past float32's resolution keeps some digits in
    # float64, read by the saturating activations' perturbation)
    assert float(r.ci_halfwidth[1]) == float(alone.ci_halfwidth[0])
    assert 0 < float(r.ci_halfwidth[1]) < 1e-4
    assert bool(torch.isfinite(r.value).all()) and bool(r.converged.all())
    # the others: their estimates as without the dead sample (same ids, same probes)
    keep = torch.tensor([0, 2, 3, 4, 5])
    rest = ff.linearize(enc, x[keep], sample_ids=keep).fsinfo(0.1, floor=0.0)
    assert rest.estimator == "randomized"
    for name in ("value", "ci_halfwidth", "bias_bound"):
        assert torch.equal(getattr(r, name)[keep], getattr(rest, name)), name
    assert r.passes == rest.passes + r.info["exact_samples_passes"]
    assert r.info["exact_samples_passes"] == D  # (min(m, d) float64 products)
    # a later request reads the held oracle: no new one
    oracle_batches.clear()
    r2 = lin.fsinfo(0.2, floor=0.0)
    assert r2.estimator == "mixed" and r2.info["exact_samples"] == [1]
    assert "earlier request" in r2.info["exact_samples_auto"][0]
    assert oracle_batches == []
    assert r2.info["exact_samples_passes"] == 0  # (held: no new products billed)
    want = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).fsinfo(
        0.2, floor=0.0, estimator="exact")
    assert torch.equal(r2.value[1:2], want.value)


def test_a_false_neg_inf_with_a_fixed_probe_count_is_put_right_for_that_sample():
    """A fixed probe count keeps the others' estimates; the -inf cannot stand."""
    enc, x = _dead_in_float32(4)
    r = ff.linearize(enc, x).fsinfo(0.1, floor=0.0, num_probes=8)
    assert r.estimator == "mixed" and r.info["exact_samples"] == [1]
    assert bool(torch.isfinite(r.value).all())
    assert r.probes_per_sample[0] == 8


def test_a_false_neg_inf_and_a_rounding_flag_in_one_batch(oracle_batches, fast_batches):
    """The dead sample (the oracle, sent by the lost-column check) and a rounding-flagged one
    (sent by the rounding check: the fast exact route, then the oracle, its own allowance
    missing too) in one request: each its own sub-batch, route and reason, the products
    counted once each."""
    enc, x = _dead_in_float32(6, dead=(1,), flagged=(3,))
    r = ff.linearize(enc, x).fsinfo(0.1, floor=0.0)
    assert r.estimator == "mixed", r.info.get("auto")
    assert r.info["exact_samples"] == [1, 3]
    assert r.info["exact_samples_estimator"] == ["exact", "exact"]
    said = r.info["exact_samples_auto"]
    assert "nonzero in float64" in said[0] and "earlier request" not in said[0]
    assert "measured against float64" in said[1] and "earlier request" not in said[1]
    assert fast_batches == [1] and oracle_batches == [1, 1]  # (sample 1 straight to the oracle)
    keep = torch.tensor([0, 2, 4, 5])
    rest = ff.linearize(enc, x[keep], sample_ids=keep).fsinfo(0.1, floor=0.0)
    assert r.passes == rest.passes + r.info["exact_samples_passes"]
    assert r.info["exact_samples_passes"] == D
    for k in (1, 3):
        alone = ff.linearize(enc, x[k:k + 1], sample_ids=torch.tensor([k])).fsinfo(
            0.1, floor=0.0, estimator="exact")
        assert abs(float(r.value[k] - alone.value[0])) <= float(r.ci_halfwidth[k]) + 1e-12


def test_every_sample_dead_in_float32_takes_the_batch_oracle(oracle_batches):
    enc, x = _dead_in_float32(2, dead=(0, 1))
    r = ff.linearize(enc, x).fsinfo(0.1, floor=0.0)
    assert r.estimator == "exact" and "exact_samples" not in r.info
    assert oracle_batches == [2]


# -- more lost columns than computed exactly, and sigma* with the floor -------------------------

class CropFront(Front):
    """:class:`Front` that never sees its last 8 input dimensions: the floorless FSInfo_diag is
    ``-inf`` exactly and the floor matters for sigma* (``(J^T J)_kk = 0``)."""

    def forward(self, x):
        x = x.flatten(1)
        return super().forward(torch.cat([x[:, :-8], torch.zeros_like(x[:, -8:])], 1))


def _crop_batch():
    """Sample 1: every seen dimension lost in float32 (504, more than LOST_MAX); sample 2: 20 of
    them (computed exactly); samples 0 and 3 plain."""
    torch.manual_seed(0)
    enc = CropFront(D).eval()
    x = torch.randn(4, D)
    x[1] += 12000.0
    x[2, :20] += 12000.0
    return enc, x


def test_a_sample_with_too_many_lost_columns_alone_takes_the_oracle(oracle_batches):
    """More than LOST_MAX lost columns in one sample sent the whole batch to the oracle, for
    FSInfo_diag with a floor and for dFIL; now that sample alone, and the others' lost columns
    are counted exactly as before."""
    enc, x = _crop_batch()
    lin = ff.linearize(enc, x)
    ex = ff.linearize(enc, x).exact()
    one = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).exact()
    oracle_batches.clear()
    s = torch.tensor(0.1, dtype=torch.float64)
    # (dFIL with a fixed probe count: auto's method choice sends this batch to the fast
    # exact route as one, sample 1's float32 trace being 0)
    for r, want, alone in ((lin.fsinfo(0.1), ex.fsinfo(s), one.fsinfo(s)),
                           (lin.dfil(0.1, num_probes=8), ex.dfil(s), one.dfil(s))):
        assert r.estimator == "mixed", r.info.get("auto")
        assert r.info["exact_samples"] == [1] and r.info["exact_samples_estimator"] == ["exact"]
        assert "more than the 256 per sample" in r.info["exact_samples_auto"][0]
        assert r.info["lost_columns"][1:3] == [504, 20]
        assert 0 < float(r.ci_halfwidth[1]) < 1e-3 * float(r.value[1].abs())  # (rounding)
        assert torch.equal(r.value[1:2], alone.value)
        assert torch.equal(r.value[1], want.value[1])
        if r.metric == "fsinfo_diag":  # (sample 2's 20 lost columns counted exactly)
            assert bool(((r.value - want.value).abs() <= r.ci_halfwidth + 1e-9).all())
    assert oracle_batches == [1]  # one sample's oracle, held for dFIL
    # the others: as in a batch without sample 1 (same ids, same probes)
    keep = torch.tensor([0, 2, 3])
    rest = ff.linearize(enc, x[keep], sample_ids=keep).fsinfo(0.1)
    assert torch.equal(lin.fsinfo(0.1).value[keep], rest.value)


def test_floored_sigma_solves_the_randomized_samples_and_the_held_one_alone(oracle_batches):
    """sigma* where the floor matters (a crop) on a batch where one sample took the oracle and
    one has lost columns: the floored equation was refused for both (a mixed estimate, lost
    columns) and the whole batch went to the oracle; now the randomized samples are solved on
    their probes (the lost columns' float64 terms counted at each sigma) and the held one by
    its own oracle."""
    enc, x = _crop_batch()
    want = ff.linearize(enc, x).exact().fsinfo_sigma(-1.0).sigma
    oracle_batches.clear()
    got = ff.linearize(enc, x).fsinfo_sigma(-1.0)
    assert got.estimator == "mixed" and got.info["exact_samples"] == [1], got.info.get("auto")
    assert "floor_solve" in got.info and "(J^T J)_kk = 0" in got.info["floor_matters"]
    assert oracle_batches == [1]
    alone = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).fsinfo_sigma(
        -1.0, estimator="exact")
    assert torch.equal(got.sigma[1:2], alone.sigma)
    torch.testing.assert_close(got.sigma[1], want[1], rtol=1e-9, atol=0)
    keep = torch.tensor([0, 2, 3])
    assert bool(((got.ci_low[keep] <= want[keep]) & (want[keep] <= got.ci_high[keep])).all())
    assert bool((got.ci_low[keep] < got.ci_high[keep]).all())


def test_a_later_call_with_another_tolerance_does_not_read_an_earlier_calls_result():
    """The sub-batch's result was held per (metric, floor, prior, sigma): a second call at a
    tighter atol read the first call's fast exact result (half-width 0.0078, converged=True at
    atol 0.007) where its own route takes the oracle (helper 91)."""
    enc, x = _setup(5500.0)
    lin = ff.linearize(enc, x)
    first = lin.fsinfo(0.1, floor=0.0)
    assert first.info["exact_samples_estimator"] == ["exact-fast"], first.info.get("auto")
    hw = float(first.ci_halfwidth[1])
    tight = 0.9 * hw
    r = lin.fsinfo(0.1, floor=0.0, atol=tight)
    # (its held fast exact quantities miss the tighter tolerance: that sample's oracle)
    assert r.info["exact_samples_estimator"] == ["exact"], r.info.get("auto")
    assert 0 < float(r.ci_halfwidth[1]) < 1e-9 and bool(r.converged.all())
    alone = ff.linearize(enc, x[1:2], sample_ids=torch.tensor([1])).fsinfo(
        0.1, floor=0.0, estimator="exact")
    assert torch.equal(r.value[1:2], alone.value)


def test_a_fixed_probe_count_does_not_take_other_calls_held_samples():
    """With num_probes, a batch-mate's false -inf spliced in every sample held from earlier
    calls (sample 1, flagged by an earlier auto call, became exact here only where sample 3
    was dead; helper 91)."""
    got = []
    for dead in (False, True):
        enc, x = _setup(8000.0)
        if dead:
            x[3] += 12000.0
        lin = ff.linearize(enc, x)
        assert 1 in lin.fsinfo(0.1, floor=0.0).info["exact_samples"]
        r = lin.fsinfo(0.1, floor=0.0, num_probes=8)
        assert r.info.get("exact_samples", []) == ([3] if dead else [])
        got.append(r)
    for name in ("value", "ci_halfwidth", "converged"):
        assert torch.equal(getattr(got[0], name)[:3], getattr(got[1], name)[:3]), name
    assert not bool(got[1].converged[1])  # (8 probes: sample 1's own estimate)


def test_the_fast_exact_route_sends_its_samples_with_too_many_lost_columns_alone(
        oracle_batches):
    """auto's dFIL takes the fast exact route for this batch (sample 1's float32 trace is 0);
    that sample's 504 lost columns (more than computed exactly) sent the batch to the oracle
    (helpers 90 and 91); now that sample's oracle rows join the fast route."""
    enc, x = _crop_batch()
    r = ff.linearize(enc, x).dfil(0.1)
    assert r.estimator == "exact-fast" and r.info["exact_fast_oracle_samples"] == [1], \
        r.info.get("auto")
    # (why that sample: its float32 trace is 0 where float64's is not, which the route's
    # rounding check reads as a relative error of 1, no upper end, before the lost-column
    # count, more than the 256 per sample, does)
    assert ("more than the 256 per sample" in r.info["auto"]
            or "missed the tolerance for 1 of 4 samples, which took the float64 oracle's"
            in r.info["auto"])
    assert oracle_batches == [1]
    want = ff.linearize(enc, x).exact().dfil(torch.tensor(0.1, dtype=torch.float64)).value
    assert bool(((r.value - want).abs() <= r.ci_halfwidth + 1e-30).all()), (r.value - want)


def test_a_batch_whose_every_sample_went_its_own_way_says_so():
    """Sample 1 (297 lost columns, more than computed exactly) took the oracle alone, the three
    others could not converge within the probe cap and took the fast exact route alone: the
    record said "the others keep the randomized estimate" with none left (helper 92)."""

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(600, 700)

        def forward(self, x):
            return torch.tanh(self.lin(torch.tanh(1e-3 * x.flatten(1))))

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc = Mix().eval()
    x = torch.rand(4, 600, generator=g) * 1000
    x[1] *= 20
    x[2, :300] += 5500.0
    r = ff.linearize(enc, x, seed=0).fsinfo(0.1, floor=1e-10, atol=0.001)
    assert r.estimator == "mixed" and r.info["exact_samples"] == [0, 1, 2, 3], r.info.get("auto")
    assert "every sample, each sent on its own" in r.info["auto"]
    assert "the others keep" not in r.info["auto"]
    assert bool(r.converged.all())
