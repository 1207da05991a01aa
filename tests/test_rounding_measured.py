"""The randomized routes measure their float32 rounding (``Linearization._rounding_measured``).

Their intervals counted a fixed allowance of 64 unit roundoffs per diagonal entry; products that
lose digits by cancellation exceed it by orders of magnitude. Autograd's ``1 - tanh(z)^2`` at
``z ~ 8`` keeps about one significant digit in float32, so a ``tanh(1e-3 x + 8)`` front layer put
the floorless FSInfo_diag 6-7 half-widths and dFIL 12% (13 half-widths) off the float64 oracle with
``converged`` True. One Gaussian cotangent's VJP in float64 and in the working dtype now gives an
unbiased estimate of that bias (the single-probe FSInfo_diag term is unbiased for each, and the two
share the cotangent), and twice it plus its standard error enters the interval where it exceeds
the fixed allowance; ``auto`` takes an exact route where the wider interval misses the tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.estimators.exact_fast import fsinfo_bias, rounding_floor
from fsinfo_fast.linearization import Linearization


class Front(nn.Module):
    """``tanh(a x + b)`` before a dense map: every column saturates alike for ``b = 8``."""

    def __init__(self, a: float, b: float, d: int = 256) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(torch.tanh(self.a * x.flatten(1) + self.b))


def _setup(a: float, b: float, d: int = 256, batch: int = 3):
    torch.manual_seed(0)
    return Front(a, b, d).eval(), torch.randn(batch, d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saturated_front_fsinfo_interval_covers_oracle(seed):
    enc, x = _setup(1e-3, 8.0)
    lin = ff.linearize(enc, x, seed=seed)
    oracle = lin.exact().fsinfo(torch.tensor(0.1), floor=0.0).value
    r = lin.fsinfo(0.1, floor=0.0, estimator="randomized")
    err = (r.value - oracle).abs()
    assert bool((err > 0.03).all())  # the float32 products' bias itself (about 0.058)
    assert bool((err <= r.ci_halfwidth).all()), (err / r.ci_halfwidth).tolist()
    fixed = float(fsinfo_bias(torch.tensor([rounding_floor(torch.float32)]))[0])
    assert min(r.info["rounding_measured"]) > 10 * fixed
    assert not bool(r.converged.any())  # atol 0.01 is out of reach in float32
    assert bool((r.bias_bound >= 0.05).all())


@pytest.mark.parametrize("seed", [0, 3])
def test_saturated_front_dfil_interval_covers_oracle(seed):
    enc, x = _setup(1e-3, 8.0)
    lin = ff.linearize(enc, x, seed=seed)
    oracle = lin.exact().dfil(torch.tensor(0.1)).value
    r = lin.dfil(0.1, estimator="randomized")
    err = (r.value - oracle).abs()
    assert bool((err > 0.08 * oracle).all())  # 12% off from rounding
    assert bool((err <= r.ci_halfwidth).all()), (err / r.ci_halfwidth).tolist()
    assert not bool(r.converged.any())


def test_auto_takes_an_exact_route_where_rounding_misses_the_tolerance():
    """At d = m = 1024 ``auto`` kept the randomized estimates (FSInfo_diag and dFIL 6-13
    half-widths off, converged True)."""
    enc, x = _setup(1e-3, 8.0, d=1024, batch=2)
    lin = ff.linearize(enc, x)
    f = lin.fsinfo(0.1, floor=0.0)
    assert f.estimator == "exact" and "measured against float64" in f.info["auto"]
    assert f.info["auto_randomized_passes"] > 0
    d = ff.linearize(enc, x).dfil(0.1)  # (a fresh batch: lin holds the oracle now)
    assert d.estimator == "exact" and "measured against float64" in d.info["auto"]
    oracle = lin.exact()
    assert torch.allclose(f.value, oracle.fsinfo(torch.tensor(0.1), floor=0.0).value)
    assert torch.allclose(d.value, oracle.dfil(torch.tensor(0.1)).value)


def test_ordinary_encoder_keeps_its_interval():
    """Without cancellation the measurement is at the fixed allowance's size: the interval is
    the probe interval, the check recorded."""
    enc, x = _setup(1.0, 0.0)
    lin = ff.linearize(enc, x)
    for r in (lin.fsinfo(0.1, estimator="randomized"), lin.dfil(0.1, estimator="randomized")):
        meas = r.info["rounding_measured"]
        assert len(meas) == 3 and max(meas) < 1e-4, meas
        assert bool(r.converged.all())
        assert bool((r.ci_halfwidth - r.bias_bound <= 0.01 * (1 + r.value.abs())).all())


def test_measured_allowance_off_matches_the_fixed_interval(monkeypatch):
    """The check changes the interval only by the measured excess over the fixed allowance."""
    enc, x = _setup(1e-3, 8.0)
    on = ff.linearize(enc, x).fsinfo(0.1, floor=0.0, estimator="randomized")
    monkeypatch.setattr(Linearization, "_rounding_fixed", lambda self, r, *a, **k: r)
    off = ff.linearize(enc, x).fsinfo(0.1, floor=0.0, estimator="randomized")
    assert torch.equal(on.value, off.value)
    meas = torch.tensor(on.info["rounding_measured"], dtype=torch.float64)
    fixed = fsinfo_bias(torch.full_like(meas, rounding_floor(torch.float32)))
    assert torch.allclose(on.ci_halfwidth - off.ci_halfwidth, meas - fixed)


def test_floored_sigma_star_interval_covers_oracle():
    """The floored sigma* solve widens its ends by the measured allowance at every sigma."""
    enc, x = _setup(0.05, 8.0)
    lin = ff.linearize(enc, x)
    s = lin.fsinfo_sigma(-1.0, floor=1e-6, estimator="randomized")
    ex = lin.fsinfo_sigma(-1.0, floor=1e-6, estimator="exact").sigma
    assert bool(((s.ci_low <= ex) & (ex <= s.ci_high)).all()), (s.ci_low, ex, s.ci_high)


def test_unmeasurable_rounding_is_recorded():
    """A callable that cannot run in float64 keeps the fixed allowance and says so."""
    torch.manual_seed(0)
    lin32 = nn.Linear(64, 48).eval()

    def enc(x):
        return torch.tanh(lin32(x.float()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ff.fsinfo(enc, torch.randn(2, 64), 0.1)
    assert r.estimator == "randomized"
    assert "float64" in r.info["rounding_unmeasured"]
    assert "rounding_measured" not in r.info


def test_coverage_with_rounding_bias_near_the_probe_noise():
    """``tanh(1e-3 x + 7.5)`` at 32 probes: a rounding bias (about 0.02 nats/dim) of the size
    of the probe half-width; the randomized interval covered the oracle in 0.36 of 160 runs
    with the fixed allowance."""
    enc, x = _setup(1e-3, 7.5, d=256, batch=4)
    oracle = ff.linearize(enc, x).exact().fsinfo(torch.tensor(0.1), floor=0.0).value
    hits = n = 0
    for seed in range(40):
        r = ff.linearize(enc, x, seed=seed).fsinfo(0.1, floor=0.0, estimator="randomized",
                                                    num_probes=32)
        hits += int(((r.value - oracle).abs() <= r.ci_halfwidth).sum())
        n += r.value.numel()
    assert hits / n >= 0.95, hits / n


class SoftmaxFront(nn.Module):
    """``Linear(100 softmax(30 x))``: one probability is 1.0 in float32, so the backward of its
    input cancels to exactly 0 for most cotangents (80%) and not for the others."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(torch.softmax(30 * x.flatten(1), -1) * 100)


def test_a_column_that_cancels_to_zero_for_some_products_is_not_measured_as_fine():
    """Such a column was taken for lost from one cotangent (its float64 value added on top of
    the routes' own count of it: 2.6-8.6 half-widths off, converged True); now a column is
    lost only where 32 more cotangents give 0 too; a column 0 in some products only enters the
    allowance with its paired ratio over those 33 products, or with a route that saw 0 in
    every probe there (14 probes: 0.8^14), and ``auto`` takes the oracle."""
    torch.manual_seed(0)
    enc, x = SoftmaxFront(128).eval(), torch.randn(2, 128)
    for seed in range(3):
        lin = ff.linearize(enc, x, seed=seed)
        oracle = lin.exact().fsinfo(torch.tensor(1e-3)).value
        r = ff.linearize(enc, x, seed=seed).fsinfo(1e-3, estimator="randomized")
        assert bool(((r.value - oracle).abs() <= r.ci_halfwidth).all())
        assert not bool(r.converged[0]) and r.info["rounding_measured"][0] > 0.02
        a = ff.linearize(enc, x, seed=seed).fsinfo(1e-3)
        # (the samples whose own rounding missed: sample 0 at least, the oracle's values)
        assert a.estimator in ("exact", "mixed") and "rounding" in a.info["auto"]
        rows = a.info.get("exact_samples", [0, 1])
        assert 0 in rows and set(a.info.get("exact_samples_estimator", ["exact"])) == {"exact"}
        assert torch.allclose(a.value[rows], oracle[rows])
        # (the oracle of a sample alone and in the batch: float64 rounding apart, 7e-10 here)
        assert bool(((a.value - oracle).abs() <= a.ci_halfwidth + 1e-8).all())


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "lanczos"])
def test_jvp_methods_measure_their_own_rounding(method):
    """The dFIL methods that take JVPs round otherwise than VJPs (the softmax's cancelled
    column is mixed with the others in a JVP): Hutchinson was 22% off with a half-width of
    0.4% (47 half-widths, converged True). A JVP pair now measures them."""
    torch.manual_seed(0)
    enc, x = SoftmaxFront(256).eval(), torch.randn(2, 256)
    lin = ff.linearize(enc, x, seed=0)
    oracle = lin.exact().dfil(torch.tensor(0.1)).value
    r = ff.linearize(enc, x, seed=0).dfil(0.1, estimator="randomized", method=method)
    assert bool(((r.value - oracle).abs() <= r.ci_halfwidth).all())
    assert not bool(r.converged[0])


def test_floored_sigma_star_converged_counts_the_rounding_at_the_solution():
    """The sigma = 1 estimate sees no rounding (its columns far above the floor); at sigma*
    (1e-13) the measured allowance is 0.065 nats/dim, past atol = 0.01: converged is False
    there (it was copied from the sigma = 1 estimate)."""

    class Cropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(128, 256)

        def forward(self, x):
            return self.lin(torch.tanh(1e-3 * x.flatten(1)[:, :128] + 8.0))

    torch.manual_seed(0)
    enc, x = Cropped().eval(), torch.randn(3, 256)
    lin = ff.linearize(enc, x, seed=0)
    s = lin.fsinfo_sigma(-1.0, floor=1e-6, estimator="randomized")
    assert "floor_solve" in s.info
    assert not bool(s.converged.any())
    ex = lin.exact()
    lo = ex.fsinfo(s.ci_low.double(), floor=1e-6).value
    hi = ex.fsinfo(s.ci_high.double(), floor=1e-6).value
    assert bool(((lo >= -1.0) & (hi <= -1.0)).all())  # the interval holds the oracle's sigma*


def test_a_partial_column_far_below_the_floor_costs_nothing():
    """A partial column whose diagonal is far below ``floor sigma^2`` (floor 1e-6) cannot move
    FSInfo_diag (and is a small share of the trace): its allowance is bounded by what it can
    contribute (it made the sample's half-width infinite)."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(24, 64)

        def forward(self, x):
            x = x.flatten(1)
            return torch.cat([self.lin(x[:, 8:]), torch.softmax(x[:, :8], -1)], 1)

    torch.manual_seed(0)
    enc, x = Mixed().eval(), torch.randn(2, 32)
    x[:, 0] = 17.0  # a near-saturated 8-way softmax
    lin = ff.linearize(enc, x, seed=0)
    assert bool(lin._pair()[3].any())  # a partial column
    oracle = lin.exact()
    f = lin.fsinfo(0.1, estimator="randomized", floor=1e-6)
    d = lin.dfil(0.1, estimator="randomized", method="hutchinson")
    for r, want in ((f, oracle.fsinfo(torch.tensor(0.1), floor=1e-6).value),
                    (d, oracle.dfil(torch.tensor(0.1)).value)):
        assert bool(torch.isfinite(r.ci_halfwidth).all())
        assert max(r.info["rounding_measured"]) < 1e-3 * float(want.abs().max())
        assert bool(((r.value - want).abs() <= r.ci_halfwidth).all())


def test_fast_exact_route_counts_the_measured_rounding():
    """A transformers ConvNeXt cut at a stage with sparse inputs (90% exact zeros): two nearly
    dead columns (diagonal 1e-17) come out 174-394x too large in float32; the fast exact
    route's own float64 check (a few columns) missed them, so ``auto`` (after the randomized
    interval's measured allowance missed the tolerance) returned exact-fast values 500-1000
    half-widths off the floorless oracle with converged True. Its interval now holds the
    measured allowance too, and the oracle takes over."""
    from fsinfo_fast.models.third_party import build

    torch.manual_seed(0)
    enc = ff.split(build("convnext", size=32).eval(), "encoder.stages.1")
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    x = x * (torch.rand_like(x) < 0.1)
    lin = ff.linearize(enc, x, seed=0)
    oracle = lin.exact().fsinfo(torch.tensor(0.1), floor=0.0).value
    fast = ff.linearize(enc, x, seed=0).fsinfo(0.1, floor=0.0, estimator="exact-fast")
    assert bool(((fast.value - oracle).abs() <= fast.ci_halfwidth).all())
    assert min(fast.info["rounding_measured"]) > 1e-3  # (its own check: about 2e-6)
    r = ff.linearize(enc, x, seed=0).fsinfo(0.1, floor=0.0)
    assert bool(((r.value - oracle).abs() <= r.ci_halfwidth).all()), (r.estimator, r.info)


def test_guard_calibration_warns_where_sigma_star_missed_the_tolerance():
    """FSInfoGuard.calibrate returned the data-set sigma of unconverged sigma* silently (the
    result said converged=False, nothing else did)."""
    enc, x = _setup(1e-3, 8.0, d=256, batch=2)
    g = ff.FSInfoGuard(enc, target=-1.0, floor=0.0, estimator="randomized")
    with pytest.warns(RuntimeWarning, match="did not meet the tolerance"):
        g.calibrate(x)
    assert not bool(g.calibration["result"].converged.all())
