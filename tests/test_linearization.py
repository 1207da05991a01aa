"""The Linearization object: validation once, shared products, wrappers, results' shape."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
import fsinfo_fast.reference.oracle as oracle
from fsinfo_fast.encoder import clear_validation_cache
from fsinfo_fast.result import mean_halfwidth


class _Counting(nn.Module):
    """A small conv encoder that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3)).eval()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def _x(b=3, n=12, seed=1):
    return torch.rand(b, 1, n, n, generator=torch.Generator().manual_seed(seed))


def test_second_batch_of_same_shape_reuses_the_structural_validation():
    clear_validation_cache()
    enc = _Counting().eval()
    ff.linearize(enc, _x(seed=1))
    first = enc.calls
    assert first >= 3  # the validating forward and the two samples encoded alone
    enc.calls = 0
    lin = ff.linearize(enc, _x(seed=2))
    # the value-dependent checks run on this batch (the forward with its backward, the two
    # samples alone, the JVP of the forward/reverse check); the vmap check is reused
    assert lin.enc.cached and 0 < enc.calls < first
    # the output is still checked when it is used (lazy), and equals the encoder's
    torch.testing.assert_close(lin.enc.y, enc.net(_x(seed=2)).reshape(3, -1))
    # another shape, or training mode, is validated again
    enc.calls = 0
    ff.linearize(enc, _x(n=10))
    assert enc.calls >= 3
    enc.train()
    enc.net.train()
    enc.calls = 0
    ff.linearize(enc, _x(seed=3))
    assert enc.calls >= 3


class _Scale(nn.Module):
    def forward(self, x):
        return (x * 1e20).flatten(1)[:, :5] * 1e20  # overflows to inf for inputs above ~1e-2


def test_cached_validation_still_refuses_bad_input_and_nonfinite_output():
    clear_validation_cache()
    enc = _Counting().eval()
    ff.linearize(enc, _x())
    bad = _x()
    bad[1, 0, 0, 0] = math.nan
    with pytest.raises(ff.InvalidInputError, match="NaN"):
        ff.linearize(enc, bad)
    scale = _Scale()
    ff.linearize(scale, _x() * 1e-5)
    # cached: the value checks still run on this batch, the non-finite output among them
    with pytest.raises(ff.EncoderError, match="NaN or inf"):
        ff.linearize(scale, _x())
    # prepare(recheck=False) (a batch checked already in another dtype) checks it when used
    lazy = ff.encoder.prepare(scale, _x(), check_interaction=2, cache=True, recheck=False)
    assert lazy.cached
    with pytest.raises(ff.EncoderError, match="NaN or inf"):
        _ = lazy.y


def test_cast_copy_is_revalidated_after_in_place_parameter_change():
    """The float64 oracle's cast copy must not go stale when the weights change in place."""
    clear_validation_cache()
    enc = _Counting().eval()
    x = _x().double()
    a = ff.encoder.prepare(enc, x, dtype=torch.float64, cache=True)
    b = ff.encoder.prepare(enc, x, dtype=torch.float64, cache=True)
    assert b.cached and b.module is a.module
    with torch.no_grad():
        enc.net[0].weight.mul_(2.0)
    c = ff.encoder.prepare(enc, x, dtype=torch.float64, cache=True)
    assert not c.cached
    torch.testing.assert_close(c.y, enc.net.double()(x).reshape(3, -1))


def test_wrappers_equal_linearization_methods():
    enc = _Counting().eval()
    x = _x()
    lin = ff.linearize(enc, x, seed=5)
    for kw in ({"num_probes": 12}, {"atol": 0.05}):
        assert torch.equal(ff.fsinfo(enc, x, 0.2, estimator="randomized", seed=5, **kw).value,
                           lin.fsinfo(0.2, estimator="randomized", **kw).value)
    assert torch.equal(ff.dfil(enc, x, 0.2, estimator="randomized", seed=5, num_probes=12).value,
                       ff.linearize(enc, x, seed=5).dfil(0.2, estimator="randomized",
                                                         num_probes=12).value)


def test_everything_after_sigma_is_keyword_only():
    enc, x = _Counting().eval(), _x()
    with pytest.raises(TypeError):
        ff.fsinfo(enc, x, 0.1, "diag")  # variant must be a keyword
    with pytest.raises(TypeError):
        ff.dfil(enc, x, 0.1, "auto")
    with pytest.raises(TypeError):
        ff.linearize(enc, x).fsinfo(0.1, "diag")


def test_exact_is_computed_once_and_serves_every_request(monkeypatch):
    enc, x = _Counting().eval(), _x()
    ref = ff.reference
    want = (ref.fsinfo(enc, x, 0.1).value, ref.dfil(enc, x, 0.3).value,
            ref.fsinfo_sigma(enc, x, -1.0).sigma)
    calls = []
    real = oracle.exact_fisher

    def counting(*a, **k):
        calls.append(k.get("spectrum"))
        return real(*a, **k)

    monkeypatch.setattr(oracle, "exact_fisher", counting)
    monkeypatch.setattr(ff.reference, "exact_fisher", counting)
    lin = ff.linearize(enc, x)
    f = lin.fsinfo(0.1, estimator="exact")
    d = lin.dfil(0.3, estimator="exact")
    s = lin.fsinfo_sigma(-1.0, estimator="exact")
    assert calls == [False]
    torch.testing.assert_close(f.value, want[0], rtol=0, atol=0)
    torch.testing.assert_close(d.value, want[1], rtol=0, atol=0)
    torch.testing.assert_close(s.sigma, want[2], rtol=0, atol=0)
    # auto now uses the cached exact quantities, whatever the cost model says
    r = lin.fsinfo(0.1, estimator="auto")
    assert r.estimator == "exact" and "already computed" in r.info["auto"]
    lin.fsinfo(0.1, variant="logdet", prior_var=1.0, estimator="exact")
    assert calls == [False, True]  # the spectrum needs the Jacobian once more, then cached
    lin.fsinfo(0.5, variant="logdet", prior_var=2.0, estimator="exact")
    assert calls == [False, True]


def test_randomized_sigma_star_is_the_sigma1_estimate_mapped_with_its_interval():
    """sigma* = exp(FSInfo_1 - tau): the FSInfo interval (whose coverage the statistics tests
    check) maps to sigma*'s, and FSInfo at sigma* is then within that interval of the target."""
    enc, x = _Counting().eval(), _x(b=4)
    lin = ff.linearize(enc, x, seed=3)
    s = lin.fsinfo_sigma(-1.0, estimator="randomized", num_probes=40)
    r1 = lin.fsinfo(1.0, estimator="randomized", num_probes=40, floor=0.0)
    torch.testing.assert_close(s.sigma, torch.exp(r1.value + 1.0))
    lo, hi = s.ci95()
    torch.testing.assert_close(lo, torch.exp(r1.value - r1.ci_halfwidth + 1.0))
    torch.testing.assert_close(hi, torch.exp(r1.value + r1.ci_halfwidth + 1.0))
    at = lin.exact().fsinfo(s.sigma, floor=0.0).value  # exact FSInfo at the estimated sigma*
    err = (at + 1.0).abs()
    assert bool((err <= 4 * r1.stderr).all()), (err, r1.stderr)
    # the data-set statistics
    assert s.dataset("max") == pytest.approx(float(s.sigma.max()))
    assert s.dataset("max", conservative=True) == pytest.approx(float(hi.max()))
    # at least half the samples at or below it (no interpolation between two samples)
    assert s.dataset("quantile", q=0.5) == pytest.approx(
        float(s.sigma.quantile(0.5, interpolation="higher")))


def test_dfil_sigma_per_sample_and_dataset():
    enc, x = _Counting().eval(), _x(b=4)
    lin = ff.linearize(enc, x)
    r = lin.dfil_sigma(0.05, estimator="exact")
    trace = lin.exact().trace
    torch.testing.assert_close(r.sigma, (0.05 * trace / lin.d).sqrt())
    assert r.dataset("rms") == pytest.approx(math.sqrt(0.05 * float(trace.mean()) / lin.d))
    with pytest.raises(ff.InvalidInputError, match="bound"):
        lin.dfil_sigma(-1.0)


def test_aggregate_uses_the_per_sample_interval_convention():
    enc, x = _Counting().eval(), _x(b=4)
    r = ff.linearize(enc, x).fsinfo(0.1, estimator="randomized", num_probes=16)
    m = r.mean()
    lo, hi = m.ci95()
    # the samples' own (Student-t) intervals, combined: wider than 1.96 standard errors
    assert hi - m.value == pytest.approx(mean_halfwidth(r.stderr.tolist(),
                                                        r.ci_halfwidth.tolist(),
                                                        r.bias_bound.tolist()))
    assert hi - m.value > 1.959963984540054 * m.stderr + m.bias_bound
    w = r.worst()
    assert w.ci_halfwidth == pytest.approx(float(r.ci_halfwidth[w.index]))
    _, whi = w.ci95()  # for the batch's largest true value: reaches the largest upper end
    assert whi == pytest.approx(float((r.value + r.ci_halfwidth).max()))


def test_bad_arguments_raise_typed_errors():
    enc, x = _Counting().eval(), _x()
    lin = ff.linearize(enc, x)
    with pytest.raises(ff.InvalidInputError, match="variant"):
        lin.fsinfo(0.1, variant="full")
    with pytest.raises(ff.InvalidInputError, match="estimator"):
        lin.dfil(0.1, estimator="fast")
    with pytest.raises(ff.InvalidInputError, match="floor"):
        lin.fsinfo(0.1, floor=-1.0)
    with pytest.raises(ff.InvalidInputError, match="target"):
        lin.fsinfo_sigma(math.inf)
    with pytest.raises(ff.InvalidInputError, match=r"shape \[B\]"):
        lin.fsinfo_sigma(torch.zeros(5))
    with pytest.raises(ff.InvalidInputError, match="backend"):
        ff.linearize(enc, x, backend=3)


@pytest.mark.parametrize("subsets", ["never", "always"])
def test_diagonal_requests_share_one_probe_state_and_equal_fresh_calls(monkeypatch, subsets):
    """FSInfo_diag at two sigmas, dFIL (method auto -> the same VJPs) and sigma* replay one
    DiagProbeState: the later requests draw no VJP where the earlier ones already went, and
    each equals a fresh estimate_diag call with the same arguments. With whole-batch rounds
    every sample holds the most any drew; with the rounds on the samples still running each
    holds its own, and dFIL draws for each sample only the probes beyond those it holds."""
    from fsinfo_fast.estimators import base, estimate_diag

    monkeypatch.setattr(base, "ROW_SUBSETS", subsets)
    enc, x = _Counting().eval(), _x(b=3)
    lin = ff.linearize(enc, x, seed=7)
    P = lin.products
    n_vjp = []
    real = type(P).vjp

    def counting(self, U):
        n_vjp.append(U.shape[1])
        return real(self, U)

    monkeypatch.setattr(type(P), "vjp", counting)
    f = lin.fsinfo(0.1, estimator="randomized", atol=0.02)
    # (the rounding check's VJPs, Linearization._pair, run once per batch, reported apart)
    drawn = sum(n_vjp) - f.info["rounding_check_products"]
    assert drawn == int(f.probes_per_sample.max())
    n_vjp.clear()
    f2 = lin.fsinfo(0.3, estimator="randomized", atol=0.02)
    s = lin.fsinfo_sigma(-1.0, estimator="randomized", atol=0.02)
    assert n_vjp == []  # replayed: same probes, new sigma / floor
    assert f2.info["reused_probes"] == drawn
    assert s.estimator == "randomized"
    held = lin._dstate.counts.clone()
    d = lin.dfil(0.1, estimator="randomized", rtol=0.05, method="diag")
    beyond = sum(n_vjp) - d.info["rounding_check_products"]
    # each equals a fresh call (these draw their own VJPs: counted no more)
    monkeypatch.setattr(type(P), "vjp", real)

    def same(a, b):  # sub-batches may round their float32 products in other kernels
        if subsets == "never":
            assert torch.equal(a, b), (a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)

    same(f.value, estimate_diag(P, sigma=0.1, atol=0.02, seed=7).fsinfo_diag.value)
    same(f2.value, estimate_diag(P, sigma=0.3, atol=0.02, seed=7).fsinfo_diag.value)
    want = estimate_diag(P, sigma=0.1, dfil_rtol=0.05, seed=7).dfil
    same(d.value, want.value)
    if subsets == "never":
        assert beyond == max(0, int(want.num_probes) - drawn)  # only the probes beyond
    else:
        new = (want.probes_per_sample - held).clamp_min(0)  # each sample's own beyond
        assert bool((held < f.probes_per_sample.max()).any())  # the samples held different
        assert torch.equal(d.info["computed_per_sample"], new)
        assert torch.equal(lin._dstate.counts, torch.maximum(held, want.probes_per_sample))


@pytest.mark.parametrize("kind", ["elementwise", "rank_one"])
def test_dfil_auto_method_picks_the_cheaper_probes(kind):
    """After FSInfo_diag, ``dfil(method="auto")`` predicts the cost of both routes from the
    Gaussian VJPs held. An elementwise map has a diagonal J^T J: input-side Rademacher probes
    are exact (zero variance), so it takes them. A rank-one J has one column direction:
    Rademacher's variance is no smaller than the Gaussian's, and the VJPs are already there."""
    torch.manual_seed(0)
    if kind == "elementwise":
        enc = nn.Sequential(nn.Flatten(), nn.Tanh()).eval()
    else:
        w = torch.randn(1, 64)
        enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 1, bias=False), nn.Tanh(),
                            nn.Linear(1, 32, bias=False)).eval()
        with torch.no_grad():
            enc[1].weight.copy_(w)
    x = torch.rand(2, 1, 8, 8)
    lin = ff.linearize(enc, x, seed=1)
    lin.fsinfo(0.1, estimator="randomized", atol=0.05)
    d = lin.dfil(0.1, estimator="randomized", rtol=0.02)
    want = "hutchinson" if kind == "elementwise" else "diag"
    assert d.info["method"] == want, d.info["method_reason"]
    ex = lin.exact().dfil(0.1).value
    assert bool(((d.value - ex).abs() <= d.ci_halfwidth + 1e-12 * ex).all())


# -- the default probe cap (max_probes=None) ----------------------------------------------------
def _wide(d=1040, m=1100, seed=0):
    """A dense layer with min(m, d) = 1040 > DEFAULT_MAX_PROBES: the two defaults differ."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(d, m), nn.Tanh()).eval()
    return enc, torch.rand(1, d, generator=g)


def _products(lin):
    p = lin.products
    return int(p.vjp_passes) + int(p.jvp_passes)


@pytest.mark.parametrize("name", ["fsinfo", "dfil", "fsinfo_sigma", "dfil_sigma"])
def test_max_probes_defaults_to_none(name):
    import inspect

    for fn in (getattr(ff.Linearization, name), getattr(ff, name)):
        assert inspect.signature(fn).parameters["max_probes"].default is None, fn


def test_max_probes_none_is_min_m_d_under_auto(one_thread):
    """A tolerance no estimate can meet: under auto the cap is min(m, d) = 1040 probes with the
    default (1000 with an explicit max_probes=1000, as before), the randomized FSInfo_diag gives
    up as soon as it is predicted to pass it and takes the fast exact route; dFIL's prediction
    compares against that cap."""
    from fsinfo_fast.linearization import DEFAULT_MAX_PROBES

    enc, x = _wide()
    n = 1040
    assert DEFAULT_MAX_PROBES == 1000 < n
    runs = {}
    for mp in (None, 1000):
        lin = ff.linearize(enc, x, seed=0)
        r = lin.fsinfo(0.1, atol=1e-9, max_probes=mp)
        # the fast exact route's float32 rounding allowance misses 1e-9 too: the float64 oracle
        assert r.estimator == "exact" and "missed the tolerance" in r.info["auto"]
        assert f"within {n if mp is None else mp} probes" in r.info["auto"]
        runs[mp] = (r.info["auto_randomized_passes"], _products(lin))
        lin = ff.linearize(enc, x, seed=0)
        d = lin.dfil(0.1, rtol=1e-7, max_probes=mp)
        assert d.estimator == "exact" and "missed the tolerance" in d.info["auto"]
        assert f"more than its probe cap {n if mp is None else mp}:" in d.info["auto"]
    # the same sketch and pilot (same seed); the sample cannot converge under either cap, and
    # auto stops it as soon as that is predicted (StoppingRule.stop_unreachable): the same few
    # products either way, not the cap's worth before the exact route
    assert runs[None] == runs[1000]
    assert 0 < runs[None][0] < n // 4
    # an explicit cap above min(m, d) is still cut to it under auto
    lin = ff.linearize(enc, x, seed=0)
    d = lin.dfil(0.1, rtol=1e-7, max_probes=5000)
    assert f"more than its probe cap {n}:" in d.info["auto"]


def test_max_probes_none_is_the_constant_for_randomized(one_thread):
    """An explicitly randomized estimator with the default cap stops at DEFAULT_MAX_PROBES even
    where min(m, d) is far smaller (the exact route is not its business)."""
    from fsinfo_fast.linearization import DEFAULT_MAX_PROBES

    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    enc = nn.Sequential(nn.Linear(20, 30), nn.Tanh()).eval()
    x = torch.rand(2, 20, generator=g)
    lin = ff.linearize(enc, x, seed=0)
    r = lin.fsinfo(0.1, estimator="randomized", atol=1e-9)
    assert r.num_probes == DEFAULT_MAX_PROBES and not bool(r.converged.any())
    d = ff.dfil(enc, x, 0.1, estimator="randomized", rtol=1e-9, method="hutchinson")
    # (+1: the VJP choosing the dominant input columns, none taken here)
    assert d.num_probes == DEFAULT_MAX_PROBES and int(d.passes) == DEFAULT_MAX_PROBES + 1
    assert d.info["exact_columns"] == [0, 0]
    assert not bool(d.converged.any())
    s = lin.dfil_sigma(1.0, estimator="randomized", rtol=1e-9, method="hutchinson")
    assert s.info["dfil_sigma1"].num_probes == DEFAULT_MAX_PROBES


_BAD_TYPE = [2.5, 1000.0, True, False, "1000", [10]]
_BAD_VALUE = [1, 0, -5]


@pytest.mark.parametrize("name", ["fsinfo", "dfil", "fsinfo_sigma", "dfil_sigma"])
@pytest.mark.parametrize("estimator", ["auto", "randomized", "exact"])
def test_invalid_max_probes_raise(name, estimator):
    enc = nn.Sequential(nn.Linear(6, 5), nn.Tanh()).eval()
    x = torch.rand(2, 6)
    lin = ff.linearize(enc, x)
    first = {"fsinfo": 0.1, "dfil": 0.1, "fsinfo_sigma": -1.0, "dfil_sigma": 1.0}[name]
    for call in (getattr(lin, name), lambda *a, **k: getattr(ff, name)(enc, x, *a, **k)):
        for bad in _BAD_TYPE:
            with pytest.raises(ff.InvalidInputTypeError, match="max_probes must be an int"):
                call(first, estimator=estimator, max_probes=bad)
        for bad in _BAD_VALUE:
            with pytest.raises(ff.InvalidInputError, match="max_probes must be >= 2"):
                call(first, estimator=estimator, max_probes=bad)
        call(first, estimator=estimator, max_probes=2, num_probes=2)  # the least cap is fine


def test_max_probes_none_keeps_the_lanczos_cap_with_held_probes(one_thread):
    """dFIL ``method="lanczos"`` under auto keeps its own cap, the SLQ probes held (free) plus
    min(m, d) / 2 new ones, also where the held probes exceed min(m, d): None gives what the
    old default 1000 gave (48 = 40 held + 16 // 2), not min(m, d) = 16."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, 24), nn.Tanh()).eval()
    x = torch.rand(2, 16)
    for mp in (None, 1000):
        lin = ff.linearize(enc, x, seed=0)
        lin.fsinfo(0.1, variant="logdet", estimator="randomized", num_probes=40)
        d = lin.dfil(0.1, rtol=1e-4, method="lanczos", max_probes=mp)
        assert d.estimator == "exact-fast"
        assert "from the 40 SLQ probes held" in d.info["auto"], d.info["auto"]
        assert "more than its probe cap 48:" in d.info["auto"], d.info["auto"]


def test_a_compiled_encoder_is_linearised_through_its_original_module():
    """``torch.compile(encoder)``: the engine cannot trace compiled code (auto fell back to
    torch.func after a 13 s compile in the validation's forward); its ``_orig_mod`` is the same
    function, linearised instead and recorded. ``ff.split`` cuts a compiled model likewise."""
    from fsinfo_fast.models import get_model

    torch.manual_seed(0)
    model = get_model("vgg5").eval()
    enc = ff.split(model, at=2)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = ff.linearize(enc, x, seed=0).fsinfo(0.1)
    lin = ff.linearize(torch.compile(enc), x, seed=0)
    got = lin.fsinfo(0.1)
    assert lin.products.backend == want.info["backend"] != "torch"
    assert "torch.compile" in got.info["compiled"] and "compiled" not in want.info
    torch.testing.assert_close(got.value, want.value, rtol=0, atol=0)
    cut = ff.split(torch.compile(model), at=2)  # module paths of the original model
    torch.testing.assert_close(cut(x), enc(x), rtol=0, atol=0)
    # the split of a compiled model says so too (it did not: only a compiled encoder did)
    from_cut = ff.linearize(cut, x, seed=0).fsinfo(0.1)
    assert "torch.compile" in from_cut.info["compiled"]
    torch.testing.assert_close(from_cut.value, want.value, rtol=0, atol=0)


def test_a_fixed_num_probes_is_kept_under_auto():
    """``num_probes`` is a fixed count: ``auto`` returns that estimate with its interval and
    ``converged`` for the tolerance. It used to replace it by the fast exact route (3072
    one-hot products here) with the message 'did not reach the tolerance within 3072 probes'
    after the 2 asked for."""
    from fsinfo_fast.models import get_model

    torch.manual_seed(0)
    enc = ff.split(get_model("vgg5").eval(), at=2)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = ff.linearize(enc, x, seed=0).fsinfo(0.1, num_probes=2)
    same = ff.linearize(enc, x, seed=0).fsinfo(0.1, num_probes=2, estimator="randomized")
    assert torch.equal(r.value, same.value) and torch.equal(r.ci_halfwidth, same.ci_halfwidth)
    d = ff.linearize(enc, x, seed=0).dfil(0.1, num_probes=2)
    for res in (r, d):
        assert res.estimator == "randomized" and res.num_probes == 2, (res.estimator, res.info)
        assert "auto" not in res.info and not bool(res.converged.all())
