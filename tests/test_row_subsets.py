"""Rounds on the samples still running (``estimators.base.RowProducts``, ``ROW_SUBSETS``).

Once a sample of a batch has stopped, the adaptive estimators draw the next rounds for the
others only, on a sub-batch of the products (``products.select``). A sample's probes come
from its own id, so this changes no probe: every estimator must give the same results with
whole-batch rounds (``never``) and sub-batch rounds (``always``), on dense Jacobians and
through the engine and ``torch.func`` backends, while each sample computes only its own
probes. "The same" is up to the rounding of the products: a sub-batch can take other BLAS or
convolution kernels than the whole batch (bit for bit on the Intel CPUs this was first run on,
last-bit differences on an AMD EPYC), so values compare to ``rtol`` 1e-12 (float64 products) or
1e-6 (float32 products), probe counts and flags exactly. Also: the sub-batch products equal the
whole batch's rows to that rounding, the cost rule
picks the cheapest of the whole batch, a held sub-batch and a new one, and an error names the
sample's index in the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import make_products
from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.errors import InvalidInputError, NonFiniteProbeError
from fsinfo_fast.estimators import (
    DeflatedProbeState,
    base,
    estimate_diag,
    estimate_diag_deflated,
    hutchinson_trace,
)
from fsinfo_fast.estimators.base import RowProducts
from fsinfo_fast.testing import geometric_spectrum, spectral_jacobian

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA = 0.1


def _hetero(m: int = 40, d: int = 30) -> torch.Tensor:
    """Four samples whose estimates stop at very different probe counts: flat spectra (a few
    probes) and ill-conditioned ones (hundreds)."""
    parts = [
        spectral_jacobian(torch.ones(min(m, d), dtype=torch.float64), m, d, seed=1),
        spectral_jacobian(geometric_spectrum(min(m, d), 1e3), m, d, seed=2),
        spectral_jacobian(geometric_spectrum(min(m, d), 3.0), m, d, seed=3),
        spectral_jacobian(geometric_spectrum(6, 30.0), m, d, seed=4),
    ]
    return torch.cat(parts)


def _fields(e):
    return (e.value, e.stderr, e.ci_halfwidth, e.probes_per_sample, e.converged)


#: relative rounding allowed between whole-batch and sub-batch rounds, by product dtype
RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def _same(a, b, rtol: float = RTOL[torch.float64]) -> None:
    for x, y in zip(_fields(a), _fields(b), strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=0)
        else:
            assert torch.equal(x, y), (x, y)
    assert a.num_probes == b.num_probes


def _both(monkeypatch, fn):
    out = {}
    for mode in ("never", "always"):
        monkeypatch.setattr(base, "ROW_SUBSETS", mode)
        out[mode] = fn()
    return out["never"], out["always"]


def test_hutchinson_sub_batches_change_nothing_but_the_products(monkeypatch):
    J = _hetero()
    ids = torch.tensor([3, 0, 9, 4])
    never, always = _both(monkeypatch, lambda: hutchinson_trace(
        DenseProducts(J), sigma=SIGMA, side="input", kind="rademacher", rtol=0.02, seed=5,
        sample_ids=ids))
    _same(never, always)
    pps = always.probes_per_sample
    assert len(set(pps.tolist())) >= 3  # the samples stop at different counts
    assert torch.equal(always.info["computed_per_sample"], pps)
    assert torch.equal(never.info["computed_per_sample"], torch.full_like(pps, never.num_probes))


@pytest.mark.parametrize("stop", [dict(atol=0.05), dict(atol=0.03, dfil_rtol=0.05)])
def test_diag_sub_batches_change_nothing_but_the_products(monkeypatch, stop):
    J = _hetero()
    never, always = _both(monkeypatch, lambda: estimate_diag(
        DenseProducts(J), sigma=SIGMA, seed=2, **stop))
    _same(never.fsinfo_diag, always.fsinfo_diag)
    _same(never.dfil, always.dfil)
    pps = always.fsinfo_diag.probes_per_sample
    assert len(set(pps.tolist())) >= 2
    assert torch.equal(always.fsinfo_diag.info["computed_per_sample"], pps)
    assert int(never.fsinfo_diag.info["computed_per_sample"].min()) == never.fsinfo_diag.num_probes


def test_deflated_sub_batches_change_nothing_but_the_products(monkeypatch):
    """The sketch grows only for the samples whose rank choice still grows it, the remainder
    rounds run for the samples still running: the same ranks, values and intervals."""
    J = torch.cat([spectral_jacobian(geometric_spectrum(30, c), 48, 30, seed=s)
                   for s, c in ((1, 1e4), (2, 10.0), (3, 1e2))])
    states, prods = {}, {}

    def run():
        # a state serves the products object it first served (as SLQProbeStore does)
        P = prods[base.ROW_SUBSETS] = DenseProducts(J)
        st = DeflatedProbeState.for_products(P, seed=1)
        states[base.ROW_SUBSETS] = st
        return estimate_diag_deflated(P, sigma=SIGMA, atol=0.005, start_rank=4,
                                      seed=1, state=st)

    never, always = _both(monkeypatch, run)
    _same(never.fsinfo_diag, always.fsinfo_diag)
    _same(never.dfil, always.dfil)
    ranks = always.fsinfo_diag.info["rank"]
    assert never.fsinfo_diag.info["rank"] == ranks and len(set(ranks)) >= 2
    pps = always.fsinfo_diag.probes_per_sample
    assert len(set(pps.tolist())) >= 2
    assert torch.equal(always.fsinfo_diag.info["remainder_computed_per_sample"], pps)
    sk, sk0 = states["always"].sketch, states["never"].sketch
    assert sk.held.tolist() == ranks and sk._spent.tolist() == [2 * r for r in ranks]
    assert sk0.held.tolist() == [max(ranks)] * 3
    for b, r in enumerate(ranks):  # each sample's columns (to the products' rounding)
        torch.testing.assert_close(sk.Q[b, :, :r], sk0.Q[b, :, :r], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sk.W[b, :, :r], sk0.W[b, :, :r], rtol=1e-12, atol=1e-14)
    # a later request that needs more columns grows the samples that hold fewer (in another
    # block than a fresh sketch: the same span, equal up to the rounding of Gram-Schmidt)
    monkeypatch.setattr(base, "ROW_SUBSETS", "always")
    P = prods["always"]
    P.jvp_passes = 0
    fixed = estimate_diag_deflated(P, sigma=SIGMA, rank=max(ranks), num_probes=8, seed=1,
                                   state=states["always"])
    fresh = estimate_diag_deflated(DenseProducts(J), sigma=SIGMA, rank=max(ranks),
                                   num_probes=8, seed=1)
    for f in ("value", "stderr"):
        torch.testing.assert_close(getattr(fixed.fsinfo_diag, f), getattr(fresh.fsinfo_diag, f),
                                   rtol=1e-9, atol=0)
    assert sk.held.tolist() == [max(ranks)] * 3
    assert P.jvp_passes == max(ranks) - min(ranks)  # only the missing columns


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1), nn.GELU())
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.eval()

    def forward(self, x):
        return self.net(x)


def _conv_batch(b: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, 8, 8, generator=g)
    x[0] *= 0.05  # samples far apart: different probe needs
    x[3] = x[3] * 3.0 - 1.0
    return _Conv(), x


@pytest.mark.parametrize("backend", ["engine", "torch"])
def test_selected_products_equal_the_batch_rows(backend):
    enc, x = _conv_batch()
    P = make_products(prepare(enc, x), backend)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(5, 3, P.d, generator=g)
    U = torch.randn(5, 3, P.m, generator=g)
    a, b = P.jvp(V), P.vjp(U)
    idx = torch.tensor([1, 3, 4])
    S = P.select(idx)
    assert (S.batch, S.d, S.m, S.backend) == (3, P.d, P.m, P.backend)
    tol = dict(rtol=RTOL[torch.float32], atol=1e-6)
    torch.testing.assert_close(S.jvp(V[idx]), a[idx], **tol)
    torch.testing.assert_close(S.vjp(U[idx]), b[idx], **tol)
    D = DenseProducts(torch.randn(5, 4, 3, dtype=torch.float64, generator=g)).select(idx)
    assert D.batch == 3


@pytest.mark.parametrize("backend", ["engine", "torch"])
def test_linearization_through_sub_batches_equals_whole_batches(monkeypatch, backend):
    """The README's route (``ff.linearize``, FSInfo_diag then dFIL sharing its probes) on a
    conv encoder: the same results with sub-batch rounds (float32 products), fewer products."""
    enc, x = _conv_batch()

    def run():
        lin = ff.linearize(enc, x, backend=backend, seed=3)
        return (lin.fsinfo(SIGMA, variant="diag", atol=0.01, estimator="randomized"),
                lin.dfil(SIGMA, rtol=0.01, estimator="randomized"))

    (fn, dn), (fa, da) = _both(monkeypatch, run)
    for a, b in ((fn, fa), (dn, da)):
        for f in ("value", "ci_halfwidth"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f),
                                       rtol=RTOL[torch.float32], atol=0, msg=f)
        for f in ("probes_per_sample", "converged"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    spent = fa.info["computed_per_sample"]
    assert torch.equal(spent, fa.probes_per_sample)
    assert int(spent.sum()) < fa.num_probes * len(x)  # some sample stopped early


def test_cost_rule_picks_the_cheapest_products(monkeypatch):
    """Whole batch, a held sub-batch holding the active rows, or a new one: the fewest
    row-products, a new one SUBSET_BUILD_ROWS more (ties: a held one, then the whole batch);
    a function of the counts only."""
    monkeypatch.setattr(base, "ROW_SUBSETS", "auto")
    monkeypatch.setattr(base, "SUBSET_BUILD_ROWS", 100)
    P = DenseProducts(torch.randn(8, 5, 4, dtype=torch.float64))
    rp = RowProducts(P)
    act = torch.zeros(8, dtype=torch.bool)
    act[:3] = True
    assert rp.rows(act, 10) is None  # 80 < 30 + 100
    assert rp.rows(act, 20) is None  # a tie, 160 = 60 + 100: the whole batch
    assert rp.rows(act, 25).tolist() == [0, 1, 2]  # 75 + 100 < 200
    act[2] = False
    assert rp.rows(act, 20).tolist() == [0, 1, 2]  # held [0, 1, 2]: 60 < 40 + 100
    assert rp.rows(act, 200).tolist() == [0, 1]  # 400 + 100 < 600
    assert RowProducts(P).rows(act, 20).tolist() == [0, 1]  # held across calls (same P)
    assert rp.rows(torch.ones(8, dtype=torch.bool), 20) is None
    monkeypatch.setattr(base, "ROW_SUBSETS", "never")
    assert rp.rows(act, 1000) is None
    monkeypatch.setattr(base, "ROW_SUBSETS", "sometimes")
    with pytest.raises(InvalidInputError, match="ROW_SUBSETS"):
        rp.rows(act, 10)
    # products without select: always the whole batch
    monkeypatch.setattr(base, "ROW_SUBSETS", "always")

    class NoSelect:
        batch, d, m, dtype, device = 8, 4, 5, torch.float64, torch.device("cpu")

        def jvp(self, V):
            return V.new_zeros(V.shape[0], V.shape[1], 5)

        def vjp(self, U):
            return U.new_zeros(U.shape[0], U.shape[1], 4)

    assert RowProducts(NoSelect()).rows(act, 1000) is None


def test_non_finite_probe_names_the_batch_index(monkeypatch):
    """A sub-batch's non-finite product names the sample's id and its index in the whole
    batch."""
    monkeypatch.setattr(base, "ROW_SUBSETS", "always")
    J = _hetero()

    class Bad(DenseProducts):
        def select(self, idx):
            return BadSub(self.J[idx], idx)

    class BadSub(DenseProducts):
        def __init__(self, J, idx):
            super().__init__(J)
            self.idx = idx

        def jvp(self, V):
            out = super().jvp(V)
            out[self.idx.tolist().index(1)] = math.nan  # whole-batch row 1
            return out

    with pytest.raises(NonFiniteProbeError, match=r"sample 11 \(batch index 1\)"):
        hutchinson_trace(Bad(J), sigma=SIGMA, side="input", kind="rademacher", rtol=0.02,
                         sample_ids=torch.tensor([10, 11, 12, 13]))


def test_ragged_states_refuse_what_they_do_not_hold(monkeypatch):
    """The per-sample counts' error paths: one extend for samples at different counts, the
    statistics of a sample at a count it does not hold, a sketch prefix beyond a sample's rank,
    a sketch grow for samples at different ranks."""
    from fsinfo_fast.estimators import DiagProbeState, SnapshotDroppedError
    from fsinfo_fast.estimators.deflated import DeflationSketch

    P = DenseProducts(torch.randn(3, 6, 5, dtype=torch.float64))
    st = DiagProbeState.for_products(P, seed=0, snapshot_bytes=1 << 20)
    st.extend(P, 4)
    st.extend(P, 100, rows=torch.tensor([True, False, False]))
    assert st.counts.tolist() == [104, 4, 4] and st.k == 104
    with pytest.raises(InvalidInputError, match="different counts"):
        st.extend(P, 4)  # 104 and 4
    with pytest.raises(SnapshotDroppedError, match="fewer probes"):
        st.stats(104)  # samples 1 and 2 hold 4
    assert st.stats(104, rows=torch.tensor([True, False, False])).k == 104
    s4 = st.stats(4)  # sample 0 from its snapshot at 4, the others live
    assert torch.isnan(st.norms()[1:, 4:]).all() and not torch.isnan(s4.norms).any()
    monkeypatch.setattr(base, "ROW_SUBSETS", "always")
    sk = DeflationSketch.empty(P)
    sk.grow(P, 2, 0, torch.arange(3), rows=torch.tensor([True, True, False]))
    assert sk.held.tolist() == [2, 2, 0] and sk.rank == 2
    assert bool((sk.Q[2] == 0).all())  # not held: zero, never read
    with pytest.raises(InvalidInputError, match="grow it first"):
        sk.prefix(torch.tensor([2, 2, 1]))
    with pytest.raises(InvalidInputError, match="different counts"):
        sk.grow(P, 1, 0, torch.arange(3))
    sk.grow_to(P, 3, 0, torch.arange(3))
    assert sk.held.tolist() == [3, 3, 3]


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_dfil_cost_model_counts_each_samples_own_probes(monkeypatch, mode):
    """dFIL's ``auto`` method choice predicts each sample's three-stage total from its own
    need, less the Gaussian VJPs that sample holds (``diag``); the batch's figure is their mean
    where the rounds run on the samples still running, the worst sample's where every round
    runs on the whole batch. (Before, it was the worst sample's total less the fewest VJPs any
    sample held: a sample that stopped early made every sample look far from done.)"""
    from fsinfo_fast.estimators.stopping import START_PROBES, planned_probes
    from fsinfo_fast.result import Z95

    monkeypatch.setattr(base, "ROW_SUBSETS", mode)
    enc, x = _conv_batch()
    lin = ff.linearize(enc, x, seed=3)
    lin.fsinfo(SIGMA, estimator="randomized", atol=0.01)
    counts = lin._dstate.counts.to(torch.float64)
    if mode == "auto":
        assert len(set(counts.tolist())) >= 2  # the samples hold different counts
    mp = 10**6
    c = lin._dfil_costs(torch.tensor(SIGMA, dtype=torch.float64), 0.01, None, mp)["diag"]
    # each sample's need, from its own held VJPs (the mean and spread of ||J^T u||^2)
    st = lin._dstate
    norms = st.norms()
    held = torch.isfinite(norms)
    scale = 1.0 / (SIGMA**2 * lin.d)
    mean = torch.where(held, norms, 0.0).sum(1) / counts
    var = torch.where(held, (norms - mean[:, None]) ** 2, 0.0).sum(1) / (counts - 1) * scale**2
    need = var * (Z95 / (0.01 * mean * scale)) ** 2
    tot = torch.tensor([planned_probes(float(n), min_probes=START_PROBES, max_probes=mp,
                                       rtol=0.01) for n in need], dtype=torch.float64)
    new = (tot - counts).clamp_min(0)
    want = float(new.mean()) if mode == "auto" else float(new.max())
    assert c["new"] == pytest.approx(want, rel=1e-9)
    assert c["total"] == pytest.approx(float(tot.max()), rel=1e-9)
    if mode == "auto":  # the old figure, worst total less the fewest held, was larger here
        assert c["new"] < float(tot.max() - counts.min())


def test_lanczos_dfil_cost_stays_the_worst_samples(monkeypatch):
    """The SLQ store's rounds run on the whole batch, so dFIL's ``lanczos`` cost is the worst
    sample's whatever ROW_SUBSETS says (two products per probe beyond those held)."""
    enc, x = _conv_batch()
    got = {}
    for mode in ("never", "auto"):
        monkeypatch.setattr(base, "ROW_SUBSETS", mode)
        lin = ff.linearize(enc, x, seed=3)
        lin.fsinfo(SIGMA, variant="logdet", estimator="randomized", num_probes=6,
                   lanczos_order=8, prior_var=1.0)
        got[mode] = lin._dfil_costs(lin._sigma(SIGMA), 0.01, None, 10**6)["lanczos"]
    assert got["never"] == got["auto"]
    c = got["auto"]
    assert c["new"] == 2.0 * max(0.0, c["total"] - 6) and "batch mean" not in c["from"]
