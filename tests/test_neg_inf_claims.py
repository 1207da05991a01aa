"""A floorless FSInfo_diag of ``-inf`` is a claim that an input dimension does not reach the output
at all. From float32 products it was made wherever a column of ``J`` rounded to 0 in float32:
products that underflow (a Jacobian entry of 1e-60) and, far more commonly, a saturated ``tanh``
(autograd's ``1 - y^2`` is exactly 0 in float32 once ``|z| > 9``, in float64 only past 19). The
claim is now checked against the encoder's float64 copy (one float64 VJP per batch,
``Linearization._confirm_neg_inf``): ``auto`` takes the float64 oracle where it is false, an
explicit randomized or fast exact route raises ``PrecisionError``. A real crop keeps its exact
``-inf``. And ``auto``'s fast exact route, whose interval is a measured rounding allowance, gives
way to the oracle where that allowance misses the tolerance (it returned an interval of
``(-inf, inf)`` on the saturated ``tanh``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.result import MetricResult


class Underflow(nn.Module):
    """Two input dimensions reach the output through ``1e-30 * 1e-30`` (0 in float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 10)  # m = 12 >= d = 10

    def forward(self, x):
        x = x.flatten(1)
        tiny = x[:, :2] * 1e-30
        return torch.cat([self.lin(x[:, 2:10]), tiny * 1e-30], 1)


class Saturated(nn.Module):
    """``tanh(scale * x)`` at the input: a few dimensions saturate in float32, not in float64."""

    def __init__(self, scale: float, d: int = 64, m: int = 48) -> None:
        super().__init__()
        self.scale = scale
        self.lin = nn.Linear(d, m)

    def forward(self, x):
        return torch.tanh(self.lin(torch.tanh(x.flatten(1) * self.scale)))


class Cropped(Saturated):
    """The saturated encoder with its last 8 input dimensions cut off (a real crop)."""

    def forward(self, x):
        x = x.flatten(1)
        return super().forward(torch.cat([x[:, :-8], torch.zeros_like(x[:, -8:])], 1))


def _oracle(enc, x, **kw):
    return ff.fsinfo(enc, x, 0.1, estimator="exact", **kw).value


@pytest.mark.parametrize("make", [Underflow, lambda: Saturated(5.0)], ids=["underflow", "tanh"])
def test_auto_gives_the_finite_floorless_value_where_float32_rounds_a_column_to_zero(make):
    torch.manual_seed(0)
    enc = make().eval()
    x = torch.randn(2, 10 if isinstance(enc, Underflow) else 64)
    ref = _oracle(enc, x, floor=0.0)
    assert torch.isfinite(ref).all()  # the float64 oracle: every column is nonzero
    r = ff.fsinfo(enc, x, 0.1, floor=0.0)
    assert torch.isfinite(r.value).all(), r.value  # it was -inf with a zero half-width
    torch.testing.assert_close(r.value, ref, rtol=0, atol=1e-9)
    assert r.estimator == "exact" and "nonzero in float64" in r.info["auto"]
    lo, hi = r.ci95()
    assert bool(((lo <= ref) & (ref <= hi)).all())


@pytest.mark.parametrize("estimator", ["randomized", "deflated"])
def test_an_explicit_float32_route_raises_instead_of_a_false_neg_inf(estimator):
    torch.manual_seed(0)
    enc = Saturated(5.0).eval()
    x = torch.randn(2, 64)
    with pytest.raises(ff.PrecisionError, match="nonzero in float64.*estimator='exact'"):
        ff.fsinfo(enc, x, 0.1, floor=0.0, estimator=estimator)


@pytest.mark.parametrize("floor", [0.0, 1e-3])
def test_the_fast_exact_route_takes_the_lost_columns_float64_entries(floor, oracle_batches):
    """The fast exact route computes every column: those float32 rounds to 0 take their float64
    entries (one float64 JVP each, as the other routes count them), so it serves where it
    raised PrecisionError (floorless: a false -inf) or gave an infinite half-width (a checked
    column was one of them: relative error 1), and auto needs no oracle there."""
    class Front(nn.Module):  # (tanh(1e-3 x): 20 dimensions of sample 2 at tanh(12), 0 in
        def __init__(self):  # float32, 1.5e-10 in float64; the others far from saturation)
            super().__init__()
            self.lin = nn.Linear(256, 256)

        def forward(self, x):
            return self.lin(torch.tanh(1e-3 * x.flatten(1)))

    torch.manual_seed(0)
    enc = Front().eval()
    x = torch.randn(4, 256)
    x[2, :20] += 12000.0
    lin = ff.linearize(enc, x)
    r = lin.fsinfo(0.1, floor=floor, estimator="exact-fast")
    assert oracle_batches == []  # (no oracle)
    assert lin.exact_fast().info["exact_fast_lost_columns"] == [0, 0, 20, 0]
    assert bool(torch.isfinite(r.value).all()) and float(r.ci_halfwidth.max()) < 1e-5
    ref = _oracle(enc, x, floor=floor)
    # each lost column counted once (twice put the value 0.1-1 nats/dim high)
    assert bool(((r.value - ref).abs() <= r.ci_halfwidth).all()), (r.value - ref)
    d = ff.linearize(enc, x).dfil(0.1, estimator="exact-fast")
    want = ff.dfil(enc, x, 0.1, estimator="exact").value
    assert bool(((d.value - want).abs() <= d.ci_halfwidth).all()), (d.value - want)


def test_sigma_star_of_the_floorless_diag_is_not_zero_there():
    """``fsinfo_sigma`` of the diagonal variant reads the floorless FSInfo at sigma = 1: a false
    -inf gave sigma* = 0 with the interval [0, 0]."""
    torch.manual_seed(0)
    enc = Underflow().eval()
    x = torch.randn(2, 10)
    r = ff.fsinfo_sigma(enc, x, target=-1.0, floor=0.0)
    assert bool((r.sigma > 0).all()) and bool(torch.isfinite(r.sigma).all())


def test_a_real_crop_keeps_its_exact_neg_inf():
    """Dead input dimensions are 0 in float64 too: the -inf stands, on the randomized route,
    with a half-width near 0, even where other dimensions saturate in float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    for enc in (Cropped(1.0).eval(), Cropped(5.0).eval()):
        ref = _oracle(enc, x, floor=0.0)
        assert bool(torch.isneginf(ref).all())
        for est in ("auto", "randomized"):
            r = ff.fsinfo(enc, x, 0.1, floor=0.0, estimator=est)
            assert bool(torch.isneginf(r.value).all()) and r.estimator != "exact"
            assert bool((r.ci_halfwidth < 1e-3).all())


def test_a_float64_encoder_pays_no_check():
    torch.manual_seed(0)
    enc = Cropped(1.0).double().eval()
    lin = ff.linearize(enc, torch.randn(2, 64, dtype=torch.float64))
    r = lin.fsinfo(0.1, floor=0.0, estimator="randomized")
    assert bool(torch.isneginf(r.value).all()) and lin._lost_cache is None


def test_without_a_float64_copy_the_neg_inf_stands_with_a_warning():
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    enc = lambda v: net(v[:, :6])  # noqa: E731  (float32 weights: no float64 run)
    x = torch.randn(2, 10)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = ff.fsinfo(enc, x, 0.1, floor=0.0)
    assert bool(torch.isneginf(r.value).all()) and "float64" in r.info["neg_inf_unconfirmed"]
    assert any("pass a floor > 0" in str(w.message) for w in seen)


def test_auto_leaves_a_fast_exact_route_whose_rounding_allowance_misses_the_tolerance():
    """The saturated tanh at the default floor: auto's fast exact route measured a relative
    error of 1 on its checked columns, an allowance of inf, and returned (-inf, inf)."""
    torch.manual_seed(0)
    enc = Saturated(12.0).eval()
    x = torch.randn(2, 64)
    ref = _oracle(enc, x)
    r = ff.fsinfo(enc, x, 0.1)
    assert r.estimator == "exact" and "rounding allowance" in r.info["auto"]
    torch.testing.assert_close(r.value, ref, rtol=0, atol=1e-12)
    assert bool(torch.isfinite(r.ci_halfwidth).all())
    fast = ff.fsinfo(enc, x, 0.1, estimator="exact-fast")  # asked for: kept, honest
    # (its columns lost to float32 take their float64 entries; the partly saturated ones'
    # rounding keeps the allowance above the tolerance: 0.017 and 0.13 nats/dim)
    assert bool((fast.ci_halfwidth > 0.01).any())
    assert bool(((fast.value - ref).abs() <= fast.ci_halfwidth).all())
    d = ff.dfil(enc, x, 0.1, estimator="auto", rtol=0.001)
    assert bool(d.converged.all())


def test_an_infinite_half_width_gives_the_whole_line_not_nan():
    v = torch.tensor([-math.inf, 1.0], dtype=torch.float64)
    hw = torch.tensor([math.inf, math.inf], dtype=torch.float64)
    r = MetricResult(value=v, stderr=torch.zeros(2, dtype=torch.float64), metric="fsinfo_diag",
                     units="nats/dim", estimator="exact-fast", sigma=torch.full((2,), 0.1),
                     d=4, m=4, ci_halfwidth=hw, bias_bound=hw)
    lo, hi = r.ci95()
    assert lo.tolist() == [-math.inf, -math.inf] and hi.tolist() == [math.inf, math.inf]
    agg = ff.Aggregate(value=-math.inf, stderr=0.0, ci_halfwidth=math.inf)
    assert agg.ci95() == (-math.inf, math.inf)


class Tiny(nn.Module):
    """Every input dimension reaches the output through ``1e-30 * 1e-30``: dFIL 0 in float32."""

    def forward(self, x):
        return torch.cat([x * 1e-30 * 1e-30, x[:, :2] * 1e-30 * 1e-30], 1)


@pytest.mark.parametrize("estimator", ["auto", "randomized", "deflated", "exact-fast"])
def test_a_floored_fsinfo_counts_the_lost_columns_exactly(estimator):
    """With a floor the lost columns entered as log(floor): at floor 1e-300 that put the value
    42 nats/dim below the oracle with a tight interval and converged=True. They now enter with
    their float64 diagonal entries (one float64 JVP each)."""
    torch.manual_seed(0)
    enc = Underflow().eval()
    x = torch.randn(2, 10)
    ref = _oracle(enc, x, floor=1e-300)
    r = ff.fsinfo(enc, x, 0.1, floor=1e-300, estimator=estimator, atol=0.01)
    assert r.info["lost_columns"] == [2, 2] and "float64" in r.info["lost_columns_why"]
    # (one seeded run: within 3 half-widths; it was 42 nats/dim off)
    assert bool(((r.value - ref).abs() <= 3 * r.ci_halfwidth).all()), (r.value, ref)


def test_dfil_counts_the_lost_columns_exactly():
    """A Jacobian of 1e-60 everywhere: dFIL was 0 with a zero half-width on every float32 route
    (auto's reason called every column dead)."""
    torch.manual_seed(0)
    enc = Tiny().eval()
    x = torch.randn(2, 6)
    ref = ff.dfil(enc, x, 0.1, estimator="exact").value
    assert bool((ref > 0).all())
    for est in ("auto", "randomized", "exact-fast"):
        r = ff.dfil(enc, x, 0.1, estimator=est)
        torch.testing.assert_close(r.value, ref, rtol=1e-9, atol=0)
        assert r.info["lost_columns"] == [6, 6] or r.estimator == "exact"


def test_a_log_det_with_lost_columns_is_not_claimed():
    torch.manual_seed(0)
    enc = Tiny().eval()  # (a few lost columns beside normal ones: the oracle's float64
    x = torch.randn(2, 6)  # eigenvalues cannot hold them either, and it says -inf)
    ref = _oracle(enc, x, variant="logdet")
    assert torch.isfinite(ref).all()
    with pytest.raises(ff.PrecisionError, match="the log det cannot count them"):
        ff.fsinfo(enc, x, 0.1, variant="logdet", estimator="randomized")
    r = ff.fsinfo(enc, x, 0.1, variant="logdet")
    assert r.estimator == "exact"
    torch.testing.assert_close(r.value, ref, rtol=0, atol=1e-9)


def test_an_explicit_fast_exact_route_says_when_it_misses_the_tolerance():
    torch.manual_seed(0)
    enc = Saturated(12.0).eval()
    x = torch.randn(2, 64)
    r = ff.fsinfo(enc, x, 0.1, estimator="exact-fast", atol=0.01)
    # (the partly saturated columns' rounding: 0.017 and 0.13 nats/dim; the columns float32
    # rounds to 0 take their float64 entries, which had made it infinite)
    assert bool((r.ci_halfwidth > 0.01).all()) and not bool(r.converged.any())
    ok = ff.fsinfo(Saturated(0.5).eval(), x, 0.1, estimator="exact-fast", atol=0.01)
    assert bool(ok.converged.all())


def test_sigma_star_with_the_floor_where_a_crop_meets_lost_columns():
    """A crop (floorless -inf, exact) beside columns lost to float32: sigma* with the floor is
    solved on the probes, the lost columns' float64 terms added at each sigma (the solve
    refused them: auto took the oracle, an explicit randomized route raised)."""
    torch.manual_seed(0)
    enc = Cropped(5.0).eval()
    x = torch.randn(2, 64)
    ref = ff.fsinfo_sigma(enc, x, target=-3.0, estimator="exact").sigma
    r = ff.fsinfo_sigma(enc, x, target=-3.0)
    assert bool(((r.ci_low <= ref) & (ref <= r.ci_high)).all()), (r.sigma, ref)
    got = ff.fsinfo_sigma(enc, x, target=-3.0, estimator="randomized")
    assert "floor_solve" in got.info and min(got.info["lost_columns"]) > 0
    assert bool(((got.ci_low <= ref) & (ref <= got.ci_high)).all()), (got.sigma, ref)


def test_more_lost_columns_than_computed_exactly_go_to_the_oracle_or_raise():
    """Beyond LOST_MAX lost columns in a sample: auto takes the float64 oracle, an explicit
    route raises PrecisionError naming the limit."""
    from fsinfo_fast.linearization import LOST_MAX

    torch.manual_seed(0)
    d = LOST_MAX + 8
    enc = Tiny().eval()
    x = torch.randn(1, d)
    with pytest.raises(ff.PrecisionError,
                       match=f"more than the {LOST_MAX} per sample computed exactly"):
        ff.fsinfo(enc, x, 0.1, floor=1e-300, estimator="randomized")
    r = ff.fsinfo(enc, x, 0.1, floor=1e-300)
    ref = _oracle(enc, x, floor=1e-300)
    assert r.estimator == "exact"
    torch.testing.assert_close(r.value, ref, rtol=0, atol=1e-9)


def _all_saturated(dtype, z: float = 20.0, d: int = 8, m: int = 16):
    """``tanh(x W^T + b)`` with every pre-activation at ``+-z``: ``1 - tanh^2`` rounds to 0 in
    float32 and float64 alike, so ``J`` is computed as 0 while the true one is not."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, d, generator=g, dtype=torch.float64)
    W = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = z * torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0).double() - x[0] @ W.T
    lin = nn.Linear(d, m).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    return nn.Sequential(lin, nn.Tanh()).to(dtype).eval(), x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_log_det_of_a_saturated_jacobian_is_not_an_exact_neg_inf(dtype):
    """Every ``tanh`` saturated: the SLQ log det without a prior read the zero products as a
    singular ``J^T J``, ``-inf`` with half-width 0 (``singular``), where the truth is -39.8
    nats/dim (helper 103). The randomized route raises now; ``auto`` takes the oracle, which
    claims nothing there (half-width ``inf``)."""
    enc, x = _all_saturated(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ff.PrecisionError, match="log det of -inf"):
            ff.fsinfo(enc, x, 1.0, variant="logdet", estimator="randomized")
        r = ff.fsinfo(enc, x, 1.0, variant="logdet")
    assert not (torch.isneginf(r.value) & torch.isfinite(r.ci_halfwidth)).any()


def test_a_structural_log_det_neg_inf_stands_beside_lost_columns():
    """``m < d`` without a prior: the log det is ``-inf`` exactly whatever the float32
    rounding; a unit saturated in float32 only (a lost column) made ``auto`` and the
    randomized route raise ``PrecisionError`` (helper 103). Beside a crop's structural zero
    column the truth is ``-inf`` too, and the randomized route's upper bound stands."""
    torch.manual_seed(0)
    d = 16
    b = torch.zeros(d)
    b[0] = 10.0  # (float32's 1 - tanh^2 is 0 there, float64's is not)
    V, Vb = torch.randn(4, d), torch.randn(32, d - 2)
    x = torch.zeros(1, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for est in ("auto", "randomized"):
            r = ff.fsinfo(lambda v: torch.tanh(v * 0.1 + b.to(v.dtype)) @ V.T.to(v.dtype), x,
                          1.0, variant="logdet", estimator=est)
            assert torch.isneginf(r.value).all() and bool(r.singular.all()), est
        r = ff.fsinfo(lambda v: torch.tanh(v[:, :d - 2] * 0.1 + b[:d - 2].to(v.dtype))
                      @ Vb.T.to(v.dtype), x, 1.0, variant="logdet", estimator="randomized")
    assert torch.isneginf(r.value).all() or bool(r.bound.all())
