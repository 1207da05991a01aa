"""The float64 forward-/reverse-mode check of every sample (``Linearization._modes``): where
the two modes' Jacobians differ beyond float64 rounding (a saturated softmax), no route claims
an interval."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast import linearization as L

from .helpers import NoForwardAD


class _Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(32, 40)

    def forward(self, x):
        return torch.softmax(self.lin(x.flatten(1)), dim=1)


def _batch():
    """Sample 0 an ordinary input; sample 1 with logits in the hundreds (its largest
    probability rounds to 1 in float64: the modes' Jacobians differ by tens of percent)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, generator=g)
    x[1] *= 300
    return x


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [w for w in seen if "forward- and reverse-mode" in str(w.message)]


def test_the_modes_disagree_on_the_saturated_sample_only():
    lin = ff.linearize(_Softmax().eval(), _batch(), seed=0)
    base = lin._modes()[4]  # every column at its own scale
    assert float(base[0]) < L.MODES_SCREEN  # float64 rounding
    assert float(base[1]) > 1e-3   # far beyond it
    assert lin._modes() is lin._modes()  # once per batch


@pytest.mark.parametrize("estimator", ["auto", "exact", "exact-fast", "randomized", "deflated"])
def test_no_route_claims_an_interval_where_the_modes_disagree(estimator):
    """Before: the deflated route reported converged=True with a half-width of 6e-5, 1e4
    half-widths off the oracle (which measured the other mode's Jacobian); the others'
    intervals missed it by 5 half-widths or took one mode's value with half-width 0."""
    lin = ff.linearize(_Softmax().eval(), _batch(), seed=0)
    r, said = _quiet(lin.fsinfo, 0.1, floor=0.0, estimator=estimator)
    assert math.isinf(float(r.ci_halfwidth[1])) and not bool(r.converged[1])
    # (bias_bound kept finite: a batch mean's half-width subtracts it, inf - inf)
    assert math.isfinite(float(r.bias_bound[1]))
    m = r.mean()
    assert m.ci_halfwidth == math.inf and m.ci95() == (-math.inf, math.inf)
    assert r.ci95()[0][1] == -math.inf and r.ci95()[1][1] == math.inf
    assert math.isfinite(float(r.value[1]))  # the value is kept
    assert math.isfinite(float(r.ci_halfwidth[0]))  # the ordinary sample keeps its interval
    assert r.info["modes_disagree"][1] > L.MODES_REL >= r.info["modes_disagree"][0]
    assert "sample(s) [1]" in r.info["modes_why"] and len(said) == 1
    ref = ff.reference.fsinfo(_Softmax().eval(), _batch()[:1], 0.1, floor=0.0).value
    lo, hi = r.ci95()
    assert float(lo[0]) <= float(ref[0]) <= float(hi[0])


def test_dfil_and_the_noise_scales_are_flagged_too():
    lin = ff.linearize(_Softmax().eval(), _batch(), seed=0)
    for r in (_quiet(lin.dfil, 0.1)[0], _quiet(lin.dfil, 0.1, estimator="exact")[0]):
        assert math.isinf(float(r.ci_halfwidth[1])) and not bool(r.converged[1])
        assert math.isfinite(float(r.ci_halfwidth[0])) and "modes_why" in r.info
    s, said = _quiet(lin.dfil_sigma, 0.5)
    assert float(s.ci_low[1]) == 0 and float(s.ci_high[1]) == math.inf
    assert not bool(s.converged[1]) and len(said) == 1
    assert float(s.ci_low[0]) <= float(s.sigma[0]) <= float(s.ci_high[0]) < math.inf
    for est in ("auto", "exact"):
        s, said = _quiet(lin.fsinfo_sigma, -60.0, floor=0.0, estimator=est)
        assert float(s.ci_low[1]) == 0 and float(s.ci_high[1]) == math.inf, est
        assert not bool(s.converged[1]) and len(said) == 1
        assert float(s.ci_high[0]) < math.inf


def test_the_floor_decides_whether_the_disagreement_matters():
    """With the default floor the saturated sample's columns sit far below it (the value is
    the floor's): the modes' disagreement moves no term, and nothing is flagged. At sigma*
    of a target the floor does not reach, it matters again."""
    lin = ff.linearize(_Softmax().eval(), _batch(), seed=0)
    r, said = _quiet(lin.fsinfo, 0.1)
    assert not said and "modes_disagree" not in r.info
    assert bool(torch.isfinite(r.ci_halfwidth).all())
    s, said = _quiet(lin.fsinfo_sigma, -5.0)  # (sigma* 4e-31: the floor's share 1e-70)
    assert len(said) == 1 and float(s.ci_high[1]) == math.inf
    assert float(s.ci_low[0]) <= float(s.sigma[0]) <= float(s.ci_high[0]) < math.inf


class _Mix(nn.Module):
    """16 outputs linear in the first 16 inputs, beside a saturated softmax of the other 16:
    the disagreement sits in columns far smaller than the others (helper 93). ``near``: the
    logits of a softmax ``1e4`` times as steep sit at fixed values with a gap of 38 at
    ``x[16:] = 0.5`` (its largest probability rounds to 1), so its columns are about 1e-11,
    at the default floor's level for ``sigma = 1e-9``."""

    def __init__(self, near: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 40)
        self.near = near
        c0 = torch.rand(40)
        c0[0] = 38.0
        self.register_buffer("c0", c0)

    def forward(self, x):
        if self.near:
            z = self.c0 + 1e4 * (x[:, 16:] - 0.5) @ self.b.weight.T
        else:
            z = 300 * self.b(x[:, 16:])
        return torch.cat([self.a(x[:, :16]), torch.softmax(z, 1)], 1)


def _jacobians(enc, x):
    from torch.func import jacfwd, jacrev

    e64 = copy.deepcopy(enc).double()

    def f(z):
        return e64(z.unsqueeze(0))[0]

    with torch.no_grad():
        return jacfwd(f)(x[0].double()), jacrev(f)(x[0].double())


def _fsinfo_of(J, sigma, floor):
    return float(0.5 * torch.log(J.square().sum(0) / sigma**2 + floor).mean())


@pytest.mark.parametrize("near,floor,sigma", [(False, 0.0, 0.1), (True, 1e-10, 1e-9)])
def test_a_disagreement_in_small_columns_is_not_diluted_by_large_ones(near, floor, sigma):
    """A share over u^T J v with the columns at their sizes (the first version) read 3e-17
    and 4e-14 here: the large columns' terms hid a 40-66% disagreement in the small ones,
    which moves FSInfo_diag by 0.39 and 0.063 nats/dim between the modes (the oracle's
    half-width was 0). Weighted as FSInfo weighs the columns (each at its own scale, the
    floor's level counted) the share is of order 1."""
    enc = _Mix(near).eval()
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    x[:, 16:] = 0.5 if near else x[:, 16:]
    Jf, Jr = _jacobians(enc, x)
    # (0.39 and 0.063 nats/dim: beyond the default atol of 0.01)
    assert abs(_fsinfo_of(Jf, sigma, floor) - _fsinfo_of(Jr, sigma, floor)) > 0.05
    for est in ("exact", "auto"):
        r, said = _quiet(ff.linearize(enc, x).fsinfo, sigma, floor=floor, estimator=est)
        assert math.isinf(float(r.ci_halfwidth[0])) and not bool(r.converged[0]) and said
    # at sigma 0.1 and the default floor the softmax's columns sit far below the floor: no
    # disagreement that matters, and none flagged
    assert abs(_fsinfo_of(Jf, 0.1, 1e-10) - _fsinfo_of(Jr, 0.1, 1e-10)) < 1e-6
    r, said = _quiet(ff.linearize(enc, x).fsinfo, 0.1, estimator="exact")
    assert not said and bool(r.converged[0])
    # (the oracle's rounding, read where the log weighs the columns: not the small ones' 40-66%)
    assert 0 < float(r.ci_halfwidth[0]) < 1e-9


class _Tiny(nn.Module):
    """``_Mix`` beside one input whose column is ``1e-120``: its ``D k sqrt(D_k)`` underflows."""

    def __init__(self):
        super().__init__()
        self.m = _Mix()

    def forward(self, x):
        return torch.cat([self.m(x[:, :32]), x[:, 32:] * 1e-120], 1)


def test_an_underflowing_column_does_not_silence_the_sample():
    """Before (helper 94): the floor's term of a column of 1e-120 was 0/0, its NaN read as
    agreement: the whole sample's share 0, the oracle's 0.345 nats/dim mode gap unflagged."""
    x = torch.randn(1, 33, generator=torch.Generator().manual_seed(1))
    lin = ff.linearize(_Tiny().eval(), x)
    assert float(lin._modes()[4][0]) > 1e-3
    r, said = _quiet(lin.fsinfo, 0.1, floor=0.0, estimator="exact")
    assert math.isinf(float(r.ci_halfwidth[0])) and said


class _ZeroInReverse(nn.Module):
    """Four inputs feed the largest logit of a saturated softmax (gap 41) only, a linear map
    after it: reverse mode gives their columns as exactly 0 (``g - <p, g>`` cancels), forward
    mode as about 5e-19 (helper 94)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(40, 8)
        c0 = torch.full((40,), -1.0)
        c0[0] = 40.0
        self.register_buffer("c0", c0)
        self.register_buffer("w", torch.randn(4))

    def forward(self, x):
        z = self.c0 + F.pad((x[:, 16:20] * self.w).sum(1, keepdim=True), (0, 39))
        return torch.cat([self.a(x[:, :16]), self.b(torch.softmax(z, 1))], 1)


def test_columns_zero_in_reverse_mode_only_are_seen():
    """Before: those columns took weight 0 (or the smallest live column's, 1e16 times too
    small), the share read 5e-17, and at sigma = 1e-15 the oracle's FSInfo_diag (forward mode
    here: m > d) stood 0.70 nats/dim above reverse mode's with half-width 0 (floorless: reverse
    mode's -inf). A JVP over the columns reverse mode gives as 0 compares forward mode's."""
    enc = _ZeroInReverse().eval()
    x = torch.randn(1, 20, generator=torch.Generator().manual_seed(1))
    Jf, Jr = _jacobians(enc, x)
    assert float(Jr[:, 16:].abs().max()) == 0.0
    assert float(Jf[:, 16:].norm(dim=0).min()) > 0
    lin = ff.linearize(enc, x)
    assert abs(_fsinfo_of(Jf, 1e-15, 1e-10) - _fsinfo_of(Jr, 1e-15, 1e-10)) > 0.5
    for floor in (1e-10, 0.0):
        r, said = _quiet(lin.fsinfo, 1e-15, floor=floor, estimator="exact")
        assert math.isinf(float(r.ci_halfwidth[0])) and said, floor
    assert "reverse mode gives as exactly 0" in r.info["modes_why"]  # (floorless: -inf there)
    # at sigma 0.1 those columns (5e-19) sit far below the floor's 1e-6: the modes agree on
    # the metric, and nothing is flagged
    assert abs(_fsinfo_of(Jf, 0.1, 1e-10) - _fsinfo_of(Jr, 0.1, 1e-10)) < 1e-12
    r, said = _quiet(lin.fsinfo, 0.1, estimator="exact")
    assert not said and 0 < float(r.ci_halfwidth[0]) < 1e-9  # (the oracle's rounding)


def test_a_weighting_is_measured_once(monkeypatch):
    """The scale-free share screens; a result's own weighting costs one float64 JVP, once."""
    lin = ff.linearize(_Softmax().eval(), _batch(), seed=0)
    lin._modes()
    calls = []
    real = L.Linearization._modes_share
    monkeypatch.setattr(L.Linearization, "_modes_share",
                        lambda self, *a: calls.append(a) or real(self, *a))
    for _ in range(2):
        _quiet(lin.fsinfo, 0.1, floor=0.0)  # (the scale-free share itself: no JVP)
        _quiet(lin.dfil, 0.1)
        _quiet(lin.fsinfo, 1e-9, estimator="exact")
    # dFIL's weighting and the floor's at sigma 1e-9, once each, and the oracle's reading of J
    # as a whole (its rounding allowance, :meth:`_oracle_measured`), once
    assert sorted(c[0] for c in calls) == ["dfil", "flat", "fsinfo"]


def test_the_check_says_where_it_cannot_run():
    W = torch.randn(16, 8)

    def enc(x):  # float32 weights: no float64 copy, so no exact route and no check
        return torch.tanh(x @ W)

    r = ff.fsinfo(enc, torch.randn(2, 16), 0.1, estimator="randomized", num_probes=8)
    assert "modes_unchecked" in r.info and "modes_why" not in r.info


@pytest.mark.parametrize("name", ["vit", "convnext", "resnet"])
def test_no_flag_on_transformers_encoders(name):
    from fsinfo_fast.models import third_party

    pytest.importorskip("transformers")
    model = third_party.build(name, size=32)
    enc = ff.split(model, third_party.SPLITS[name][0])
    lin = ff.linearize(enc, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    assert float(lin._modes()[4].max()) < 1e-13
    r, said = _quiet(lin.fsinfo, 0.1, num_probes=4)
    assert not said and "modes_disagree" not in r.info and "modes_unchecked" not in r.info


def test_a_guard_calibrated_over_a_flagged_sample_says_so():
    guard = ff.FSInfoGuard(_Softmax().eval(), target=-60.0, floor=0.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        guard.calibrate(_batch())
    said = [str(w.message) for w in seen]
    assert any("forward- and reverse-mode" in m for m in said)
    assert any("1 of the calibration set's 2 sigma* did not meet" in m for m in said)
    res = guard.calibration["result"]
    assert res.converged.tolist() == [True, False] and float(res.ci_high[1]) == math.inf


class _NoJvpNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return NoForwardAD.apply(self.lin(x))


def test_a_double_backward_jvp_is_recorded():
    """No forward-mode rule: the check's JVP is the VJP's transpose, a weaker check, said."""
    r, said = _quiet(ff.fsinfo, _NoJvpNet().eval(), torch.randn(2, 16), 0.1,
                     estimator="randomized", num_probes=8)
    assert not said and "double backward" in r.info["modes_jvp"]
    assert "modes_unchecked" not in r.info
