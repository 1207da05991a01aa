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
    true = ex.fsinfo_sigma(torch.tensor(-1.0), "diag")
    assert bool(((s.ci_low <= true) & (true <= s.ci_high)).all())
    # sigma* = exp(FSInfo(1) - target) from the held exact quantities: FSInfo(1) = FSInfo(0.1)
    # + log(0.1) floorless
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


def test_a_sub_batch_that_cannot_be_served_sends_the_batch_the_old_way(monkeypatch):
    """Where the samples alone cannot be served (a check their own values decide), the batch
    takes the exact route as one, and info["auto"] says why."""
    enc, x = _setup(8000.0)

    served = L.Linearization._exact_result

    def fails(self, *args, **kwargs):  # (the sub-batch of the one flagged sample only)
        if self.batch == 1:
            raise ff.EncoderError("a check this sub-batch fails")
        return served(self, *args, **kwargs)

    monkeypatch.setattr(L.Linearization, "_exact_result", fails)
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
