"""The SLQ probes of one batch shared between requests (:class:`SLQProbeStore`): a log det at
another sigma or prior, and dFIL from the same probes (:func:`slq_trace`), equal a fresh call's
and spend only the Krylov steps that were not taken yet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.errors import InvalidInputError
from fsinfo_fast.estimators import SLQProbeStore, slq_logdet, slq_trace
from fsinfo_fast.estimators.lanczos import StateReleasedError

FIELDS = ("value", "stderr", "ci_halfwidth", "probes_per_sample", "converged", "bias_bound")


def _batch(b: int = 3, m: int = 9, d: int = 7, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    return (J * torch.logspace(0, -2, d, dtype=torch.float64)).to(dtype)


def _rtol(dtype) -> float:
    """The products' rounding: 100 machine epsilons of their dtype (measured differences:
    1e-14 relative in float64, 2e-7 in float32)."""
    return 100 * torch.finfo(dtype).eps


RTOL64 = _rtol(torch.float64)


def _same(a, b, fields=FIELDS, rtol=RTOL64):
    """Equal up to the products' rounding: counts and flags exactly, values to ``rtol``.

    Not bit for bit: a dense/BLAS product's output for one probe depends in its last bits on
    how many probes share the call (measured: 2e-16 relative on a first Lanczos step taken in a
    call of 10 probes vs 3), and which probes share a Krylov step depends on the requests a
    store served before (and on ``probe_chunk`` in a fresh call). Requests on the same rounds
    come out bit for bit (checked below)."""
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if x is None and y is None:
            continue
        if x.dtype.is_floating_point:  # on the value's scale (a spread, an allowance)
            atol = rtol * float(b.value.abs().max())
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f)
        else:
            assert torch.equal(x, y), f


REQS = [
    dict(sigma=0.1, prior_var=1.0, atol=0.1),
    dict(sigma=torch.tensor([0.3, 1.0, 0.05], dtype=torch.float64), prior_var=4.0, atol=0.08),
    dict(sigma=0.2, prior_var=0.5, num_probes=13),
]


@pytest.mark.parametrize("dtype, method", [(torch.float64, "lanczos"),
                                           (torch.float32, "golub_kahan")])
@pytest.mark.parametrize("memory_bytes", [None, 0])
def test_logdet_from_a_shared_store_equals_fresh(dtype, method, memory_bytes):
    """Each request served from one store (any order; bases kept, or released after each
    block and rebuilt where a request needs higher orders) equals a fresh call bit for bit,
    and spends only the products the store had not spent yet."""
    J = _batch(dtype=dtype)
    ids = torch.tensor([4, 0, 9])
    fresh = [slq_logdet(DenseProducts(J), seed=5, sample_ids=ids, method=method, **kw)
             for kw in REQS]
    for order in ([0, 1, 2], [2, 1, 0]):
        P = DenseProducts(J)
        st = SLQProbeStore(P, seed=5, sample_ids=ids, method=method, memory_bytes=memory_bytes)
        for i in order:
            before = P.passes
            r = slq_logdet(P, seed=5, sample_ids=ids, method=method, store=st, **REQS[i])
            _same(r, fresh[i], rtol=_rtol(dtype))
            if order == [0, 1, 2] and i == 1 and memory_bytes is None:  # the same rounds
                _same(r, fresh[i], rtol=0.0)
            assert torch.equal(r.info["orders"], fresh[i].info["orders"])
            assert P.passes - before == r.passes  # the reported passes are the ones spent
        if memory_bytes is None:  # every Krylov step taken once: fewer than the fresh calls
            assert P.passes < sum(f.passes for f in fresh)
            assert st.rebuilt == 0
    # a mismatched request is refused rather than served from other probes
    with pytest.raises(InvalidInputError, match="seed"):
        slq_logdet(P, seed=6, sample_ids=ids, method=method, store=st, **REQS[0])


def test_released_block_is_rebuilt_not_reused():
    J = _batch()
    P = DenseProducts(J)
    st = SLQProbeStore(P, memory_bytes=0)
    slq_logdet(P, sigma=1.0, prior_var=1.0, num_probes=4, order=4, quad_atol=0.0, store=st)
    assert st.blocks[0].released and st.rebuilt == 0
    with pytest.raises(StateReleasedError):
        st.blocks[0].advance(6)
    r = slq_logdet(P, sigma=1.0, prior_var=1.0, num_probes=4, order=6, quad_atol=0.0, store=st)
    f = slq_logdet(DenseProducts(J), sigma=1.0, prior_var=1.0, num_probes=4, order=6,
                   quad_atol=0.0)
    _same(r, f)
    assert st.rebuilt == 1 and r.passes == f.passes


@pytest.mark.parametrize("dtype, method", [(torch.float64, "lanczos"),
                                           (torch.float32, "golub_kahan")])
def test_trace_after_logdet_spends_only_the_extra_steps(dtype, method):
    """dFIL from the log det's probes: the probes held cost nothing, each new one exactly one
    Krylov step (two products), the reported passes are the products spent, and the result
    equals a fresh slq_trace call (which equals Hutchinson on the same probes)."""
    J = _batch(dtype=dtype)
    P = DenseProducts(J)
    st = SLQProbeStore(P, method=method, seed=2)
    lg = slq_logdet(P, sigma=0.1, prior_var=1.0, num_probes=20, method=method, seed=2, store=st)
    assert st.k == 20 and P.passes == lg.passes
    for k, new in ((14, 0), (20, 0), (33, 13)):
        before = P.passes
        tr = slq_trace(P, sigma=0.1, num_probes=k, method=method, seed=2, store=st)
        assert tr.passes == P.passes - before == 2 * new
        assert tr.info["reused_probes"] == min(k, 20 if new == 0 else 20)
        fresh = slq_trace(DenseProducts(J), sigma=0.1, num_probes=k, method=method, seed=2)
        _same(tr, fresh, FIELDS[:5], rtol=_rtol(dtype))
        assert fresh.passes == 2 * k
    # adaptive: the three-stage rule's rounds, served from the 33 held probes first
    before = P.passes
    tr = slq_trace(P, sigma=0.1, rtol=0.05, method=method, seed=2, store=st)
    drawn = tr.num_probes
    assert tr.passes == P.passes - before == 2 * max(0, drawn - 33)
    _same(tr, slq_trace(DenseProducts(J), sigma=0.1, rtol=0.05, method=method, seed=2),
          FIELDS[:5], rtol=_rtol(dtype))
    # the next log det reuses the trace's probes' first steps too
    before = P.passes
    lg2 = slq_logdet(P, sigma=0.3, prior_var=1.0, num_probes=30, method=method, seed=2, store=st)
    _same(lg2, slq_logdet(DenseProducts(J), sigma=0.3, prior_var=1.0, num_probes=30,
                          method=method, seed=2), rtol=_rtol(dtype))
    assert lg2.passes == P.passes - before


def test_trace_terms_are_hutchinson_terms():
    """||v||^2 T_11 = ||J v||^2 for the same Rademacher input-side probes (Lanczos and
    Golub-Kahan), to rounding."""
    from fsinfo_fast.estimators import hutchinson_trace

    J = _batch(m=9, d=7)
    h = hutchinson_trace(DenseProducts(J), side="input", kind="rademacher", num_probes=12,
                         seed=1)
    for method in ("lanczos", "golub_kahan"):
        s = slq_trace(DenseProducts(J), side="input", method=method, num_probes=12, seed=1)
        torch.testing.assert_close(s.value, h.value, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.stderr, h.stderr, rtol=1e-9, atol=0)


def _rotated(d: int, sv: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(sv) @ V.T


@pytest.mark.parametrize("name, sv, kw", [
    ("top-heavy, adaptive rtol 0.05", torch.logspace(0, -3, 12, dtype=torch.float64),
     dict(rtol=0.05)),
    ("cond 1e4, fixed 30 probes", torch.logspace(0, -2, 12, dtype=torch.float64),
     dict(num_probes=30)),
])
@pytest.mark.usefixtures("one_thread")
def test_slq_trace_coverage(name, sv, kw):
    """The interval is honest: 1000 independent replications (sample ids seed the probes, so
    one batch of the same J is 1000 seeds), 95% coverage within [0.93, 0.97] and the bias of
    the mean within 3 standard errors.

    (A fixed small count undercovers, as for every trace estimator with this interval: with
    2000 seeds, 0.928 / 0.919 at 6 probes and 0.941 / 0.932 at 10 on these two spectra, the
    same numbers as hutchinson_trace on the same Rademacher probes; the three-stage rule is
    what a tolerance runs.)"""
    reps, sigma = 1000, 0.5
    J = _rotated(12, sv, 0)
    true = float((J**2).sum()) / (sigma**2 * 12)
    Jb = J[None].expand(reps, -1, -1).contiguous()
    est = slq_trace(DenseProducts(Jb), sigma=sigma, seed=11, max_probes=4000,
                    sample_ids=torch.arange(reps), **kw)
    cover = float(((est.value - true).abs() <= est.ci_halfwidth).double().mean())
    err = est.value - true
    z = float(err.mean() / (err.std() / math.sqrt(reps)))
    assert 0.93 <= cover <= 0.97, (name, cover)
    assert abs(z) <= 3.0, (name, z)
    assert bool(est.converged.all())


class _Counting:
    """A product backend that counts the products it computes (per sample)."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def jvp(self, V):
        self.count += V.shape[1]
        return self.inner.jvp(V)

    def vjp(self, U):
        self.count += U.shape[1]
        return self.inner.vjp(U)


def _encoder():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 14)).double()
    return enc.eval(), torch.rand(3, 1, 3, 4, dtype=torch.float64)


def _req(lin, i):
    if i == 0:
        return lin.fsinfo(0.1, variant="logdet", prior_var=1.0, estimator="randomized",
                          atol=0.1)
    if i == 1:
        return lin.fsinfo(0.3, variant="logdet", prior_var=2.0, estimator="randomized",
                          atol=0.08)
    if i == 2:
        return lin.fsinfo_sigma(-1.0, variant="logdet", estimator="randomized", atol=0.1)
    return lin.dfil(0.1, estimator="randomized", method="lanczos", rtol=0.1)


def test_linearization_shares_slq_probes():
    """Through ff.linearize: a second log det (another sigma, prior), fsinfo_sigma and dFIL
    (method='lanczos') reuse the held probes, each equal to a fresh Linearization's result (to
    the products' rounding), the passes each reports being the products it spent."""
    enc, x = _encoder()
    lin = ff.linearize(enc, x, seed=3)
    lin._products = P = _Counting(lin.products)
    spent = 0
    for i in range(4):
        before = P.count
        r = _req(lin, i)
        f = _req(ff.linearize(enc, x, seed=3), i)
        if i == 2:
            torch.testing.assert_close(r.sigma, f.sigma, rtol=_rtol(torch.float64), atol=0)
            r, f = r.info["fsinfo_sigma1"], f.info["fsinfo_sigma1"]
        _same(r, f, FIELDS[:5])
        assert r.passes == P.count - before
        assert r.passes <= f.passes
        if i > 0:
            assert r.info["reused_probes"] > 0
        spent += r.passes
    assert spent == P.count == lin._slq.passes


def test_dfil_auto_takes_the_held_slq_probes():
    """After a log det, dfil(method='auto') predicts the Lanczos route's cost from the held
    probes (recorded in method_reason) and, where it needs no new probes, takes it for free."""
    enc, x = _encoder()
    lin = ff.linearize(enc, x, seed=3)
    lin.fsinfo(0.1, variant="logdet", prior_var=1.0, estimator="randomized", atol=0.1)
    held = lin._slq.k
    d = lin.dfil(0.1, estimator="randomized", rtol=0.3)
    assert "lanczos" in d.info["method_reason"] and f"the {held} SLQ probes" in d.info[
        "method_reason"]
    assert d.info["method"] == "lanczos" and d.passes == 2 * max(0, d.num_probes - held)
    exact = float(lin.exact().dfil(0.1).value.max())
    assert bool(((d.value - exact).abs() <= 3 * d.ci_halfwidth).all()) or exact != exact
    # a fixed probe count within those held costs nothing
    e = lin.dfil(0.1, estimator="randomized", num_probes=min(held, 20))
    assert e.info["method"] == "lanczos" and e.passes == 0
