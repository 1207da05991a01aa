"""The randomized routes' measured rounding allowance on a float32 softmax whose top
probability rounds to 1 (the float32 products lose one output direction, most of the trace).

One cotangent reads a chi-square share of that loss: the spread over the columns, which share
it, said nothing of it, and the intervals missed (explicit randomized dFIL 1 in 100 seeds,
FSInfo_diag without a floor 5-8 in 50, at finite half-widths). Where the first cotangent's
reading is far beyond the floor, it is read again over ``PAIR_ESCALATE`` cotangents with a
t interval over them (:meth:`fsinfo_fast.Linearization._rounding_measured`)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast import linearization as L

from .test_exact_part import Front


def _saturated(d: int, m: int, gap: float, scale: float = 0.01):
    torch.manual_seed(0)
    lin = torch.nn.Linear(d, m)
    with torch.no_grad():
        lin.weight.mul_(scale)
        lin.bias.zero_()
        lin.bias[0] = gap
    enc = torch.nn.Sequential(lin, torch.nn.Softmax(-1))
    return enc, torch.randn(1, d)


def _covered(fn, enc, x, seeds, **kw) -> list[int]:
    truth = fn(enc, x, estimator="exact", **kw).value.item()
    missed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in seeds:
            r = fn(enc, x, estimator="randomized", seed=seed, **kw)
            if not abs(r.value.item() - truth) <= r.ci_halfwidth.item():
                missed.append(seed)
    return missed


def test_randomized_dfil_covers_a_float32_saturated_softmax():
    """Seed 9 missed before (2.7e-25 +- 1.6e-24 for 8.8e-24: one cotangent read 3% lost)."""
    enc, x = _saturated(300, 64, 25.0)
    assert _covered(ff.dfil, enc, x, range(16), sigma=0.1) == []


@pytest.mark.parametrize("cfg", [(300, 64, 25.0), (100, 80, 20.0)])
def test_randomized_fsinfo_without_floor_covers_a_saturated_softmax(cfg):
    """FSInfo_diag without a floor (and at a noise the floor does not reach) read the float32
    loss from one cotangent: 5-8 of 50 intervals missed, at finite half-widths."""
    enc, x = _saturated(*cfg)
    missed = _covered(ff.fsinfo, enc, x, range(20), sigma=0.1, floor=0.0)
    assert missed == []
    missed = _covered(ff.fsinfo, enc, x, range(20), sigma=1e-12)
    assert missed == []


def _top_softmax(d: int, m: int, gap: float):
    """A softmax head whose top logit is ``gap`` above the rest, 3 samples (helper 122)."""
    g = torch.Generator().manual_seed(d * 1000 + m)
    lin = torch.nn.Linear(d, m)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, d, generator=g) / d**0.5)
        b = torch.zeros(m)
        b[0] = gap
        lin.bias.copy_(b)
    return torch.nn.Sequential(lin, torch.nn.Softmax(dim=-1)).eval(), torch.randn(3, d,
                                                                                   generator=g)


def test_a_loss_below_the_floor_multiple_but_past_the_interval_is_read_again():
    """A float32 bias of about 5e-5 nats/dim (30x the fixed allowance) under intervals of 3e-6
    to 6e-4: one cotangent read a chi-square share of it and 13 of 60 intervals missed, under
    ``auto`` too (it is far inside the tolerance). The reading is taken again where it is above
    the half-width over ``PAIR_ESCALATE_HW``."""
    enc, x = _top_softmax(64, 100, 22.0)
    truth = ff.fsinfo(enc, x, 0.1, estimator="exact").value
    missed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(12):
            r = ff.fsinfo(enc, x, 0.1, seed=seed)
            missed += int((~((r.value - truth).abs() <= r.ci_halfwidth)).sum())
    assert missed == 0


def test_escalation_reads_more_cotangents_only_where_rounding_shows():
    enc, x = _saturated(100, 80, 20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ff.fsinfo(enc, x, 0.1, floor=0.0, estimator="randomized")
    assert r.info["rounding_check_products"] >= L.PAIR_ESCALATE
    # an ordinary float32 encoder (d >= 64: one cotangent) keeps its one
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32))
    xs = torch.randn(3, 96)
    lin = ff.linearize(mlp, xs)
    for f in (lin.fsinfo(0.1, estimator="randomized", num_probes=8),
              lin.dfil(0.1, estimator="randomized", num_probes=8)):
        assert f.info.get("rounding_check_products", 0) <= 2
    assert lin._pair_more_cache is None


def test_cotangent_spread_widens_a_reading_the_columns_hide():
    """A rank-one rounding loss read by several cotangents: the allowance carries the spread
    over them (t quantile), not only over the columns each one shares."""
    enc, x = _saturated(300, 64, 25.0)
    lin = ff.linearize(enc, x, seed=9)
    g64, g, lost, partial, stats = lin._pair()
    assert g64.shape[1] == 1  # (d >= 64: one cotangent first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = lin.dfil(0.1, estimator="randomized")
    truth = ff.dfil(enc, x, 0.1, estimator="exact").value
    assert lin._pair_more_cache is not None
    assert bool((r.value - truth).abs() <= r.ci_halfwidth)



def test_a_samples_reading_does_not_depend_on_its_batch():
    """The extra cotangents run for the batch, but only a sample whose own first reading is far
    beyond the floor reads them: beside a saturated sample, the others keep the allowance (and
    interval) they have alone (same sample ids, same probes)."""
    torch.manual_seed(0)
    enc = Front(512).eval()
    x = torch.randn(4, 512)
    x[1] += 5400.0  # (rounding beyond the floor, not far beyond it)
    x[2] += 8000.0  # (far beyond it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ff.linearize(enc, x).fsinfo(1.0, floor=0.0, estimator="randomized")
        keep = torch.tensor([0, 1, 3])
        alone = ff.linearize(enc, x[keep], sample_ids=keep).fsinfo(
            1.0, floor=0.0, estimator="randomized")
    assert r.info["rounding_check_products"] >= L.PAIR_ESCALATE
    assert torch.equal(torch.tensor(r.info["rounding_measured"])[keep],
                       torch.tensor(alone.info["rounding_measured"]))
    assert torch.equal(r.ci_halfwidth[keep], alone.ci_halfwidth)
