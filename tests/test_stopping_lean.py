"""``run_rounds`` asks ``summarize`` only for the quantities a decision needs
(``estimators.stopping``): the sizing summaries of stages 1 and 2 give the targeted quantities
only, the others are summarised where a sample is recorded from them. The results must be
bit-identical to the protocol that summarised every quantity at every boundary (the test hook
``stopping._SUMMARIZE_ALL``): values, standard errors, intervals, dof, probe counts, converged
masks, on dense Jacobians and a small encoder, for every target combination, a fixed count, an
exact ``-inf`` sample, a ``max_probes`` cut in stage 2, a shared probe state and deflation.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fsinfo_fast as ff
from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators import (
    DiagProbeState,
    estimate_diag,
    estimate_diag_deflated,
    hutchinson_trace,
    hutchpp_trace,
    slq_logdet,
    stopping,
)
from fsinfo_fast.estimators import diagonal as diagonal_mod

SIGMA = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _rows_always(monkeypatch):
    """Rounds on the samples still running whenever they can (``auto`` weighs measured times,
    so the products each sample computed, ``info["computed_per_sample"]``, could differ
    between two runs; ``always`` is deterministic and exercises the sub-batches)."""
    from fsinfo_fast.estimators import base

    monkeypatch.setattr(base, "ROW_SUBSETS", "always")


def _bits(t: Tensor) -> Tensor:
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def _same(a, b, where="") -> None:
    """Bit-identical (NaN and signed zeros included), recursively through dicts and objects."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bits(a), _bits(b)), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {set(a) ^ set(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b), where
        for k in a.__dataclass_fields__:
            _same(getattr(a, k), getattr(b, k), f"{where}.{k}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _both(monkeypatch, fn):
    """``fn()`` with the lean protocol and with every quantity summarised every time."""
    monkeypatch.setattr(stopping, "_SUMMARIZE_ALL", False)
    lean = fn()
    monkeypatch.setattr(stopping, "_SUMMARIZE_ALL", True)
    full = fn()
    monkeypatch.setattr(stopping, "_SUMMARIZE_ALL", False)
    return lean, full


def _jac(batch=4, d=48, m=16, seed=0, zero_col=None):
    """Samples of different column spreads (so that they stop in different rounds)."""
    J = torch.randn(batch, m, d, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    for i in range(batch):
        J[i] *= torch.linspace(0.2, 1.0, d, dtype=torch.float64) ** (2 * i)
    if zero_col is not None:  # an exact -inf FSInfo_diag (floor 0) for this sample
        J[zero_col, :, 3] = 0.0
    return J


DIAG_CASES = {
    "fsinfo_atol": dict(atol=0.05),
    "fsinfo_rtol": dict(rtol=0.05),
    "dfil_only": dict(dfil_rtol=0.1),
    "dfil_stop_on": dict(stop_on="dfil", rtol=0.1),
    "joint": dict(atol=0.05, dfil_rtol=0.1),
    "fixed": dict(num_probes=9),
    "fixed_with_target": dict(num_probes=9, atol=0.05),
    # max_probes reached in stage 2 (4 + 2 probes): recorded from stage 2, the non-targeted
    # quantity is summarised there after all
    "cut_in_stage2": dict(atol=1e-4, max_probes=6),
    "cut_in_stage2_dfil": dict(dfil_rtol=1e-4, max_probes=6),
    # ... and in stage 3
    "cut_in_stage3": dict(atol=1e-4, max_probes=10),
    "cut_in_stage3_dfil": dict(dfil_rtol=1e-4, max_probes=14),
    "small_rounds": dict(atol=0.05, min_probes=3, round_size=2, growth=1.0, max_probes=300),
}


@pytest.mark.parametrize("case", sorted(DIAG_CASES))
@pytest.mark.parametrize("floor", [1e-10, 0.0])
def test_diag_bit_identical(monkeypatch, case, floor):
    P = DenseProducts(_jac())
    kw = DIAG_CASES[case]
    lean, full = _both(monkeypatch, lambda: estimate_diag(P, sigma=SIGMA, floor=floor, seed=3,
                                                          **kw))
    _same(lean, full, case)
    pilot = lean.fsinfo_diag.info["pilot_probes"]
    if "num_probes" not in kw and "max_probes" not in kw:  # samples stop in several rounds
        assert lean.fsinfo_diag.probes_per_sample.unique().numel() >= 2
    if case.startswith("cut_in_stage2"):  # reported from stage 2 (stage 1's 4 probes left out)
        assert (pilot == 4).all() and not lean.fsinfo_diag.converged.any()
    if case.startswith("cut_in_stage3"):  # reported from stage 3 (stages 1 and 2 left out)
        assert (pilot > 4).all() and not lean.fsinfo_diag.converged.any()


@pytest.mark.parametrize("case", ["fsinfo_atol", "joint", "dfil_only", "cut_in_stage2",
                                  "cut_in_stage3"])
def test_diag_exact_sample_bit_identical(monkeypatch, case):
    """A zero column with floor 0: FSInfo_diag is exactly -inf at stage 1 (recorded at once
    when it is targeted, with dFIL summarised for it there)."""
    P = DenseProducts(_jac(zero_col=1))
    kw = DIAG_CASES[case]
    lean, full = _both(monkeypatch, lambda: estimate_diag(P, sigma=SIGMA, floor=0.0, seed=5,
                                                          **kw))
    _same(lean, full, case)
    assert torch.isneginf(lean.fsinfo_diag.value[1])
    if "atol" in kw and kw.get("max_probes") is None:
        assert int(lean.fsinfo_diag.probes_per_sample[1]) == 4  # recorded from stage 1


def test_shared_state_replay_bit_identical(monkeypatch):
    """The linearization's route: FSInfo_diag first, then dFIL replaying the same state."""
    J = _jac(batch=3, seed=7)

    def run():
        P = DenseProducts(J)
        st = DiagProbeState.for_products(P, seed=2, snapshot_bytes=1 << 24)
        a = estimate_diag(P, sigma=SIGMA, seed=2, atol=0.05, state=st)
        b = estimate_diag(P, sigma=SIGMA, seed=2, stop_on="dfil", rtol=0.1, state=st)
        return a, b

    lean, full = _both(monkeypatch, run)
    _same(lean, full, "replay")


@pytest.mark.parametrize("kw", [dict(atol=0.05), dict(dfil_rtol=0.1),
                                dict(atol=0.05, dfil_rtol=0.1), dict(num_probes=8),
                                dict(atol=1e-4, max_probes=12), dict(dfil_rtol=1e-4, max_probes=12),
                                dict(atol=1e-4, max_probes=18)])
@pytest.mark.parametrize("zero_col", [None, 2])
def test_deflated_bit_identical(monkeypatch, kw, zero_col):
    P = DenseProducts(_jac(d=32, m=12, zero_col=zero_col))
    floor = 0.0 if zero_col is not None else 1e-10
    lean, full = _both(monkeypatch, lambda: estimate_diag_deflated(
        P, sigma=SIGMA, floor=floor, rank=3, seed=4, **kw))
    _same(lean, full, str(kw))


@pytest.mark.parametrize("kw", [dict(rtol=0.05), dict(num_probes=6),
                                dict(rtol=1e-4, max_probes=20)])
def test_traces_and_slq_bit_identical(monkeypatch, kw):
    P = DenseProducts(_jac(batch=3, d=16, m=8))
    for fn in (lambda: hutchinson_trace(P, sigma=SIGMA, seed=1, **kw),
               lambda: hutchpp_trace(P, sigma=SIGMA, seed=1, sketch_size=2, **kw)):
        lean, full = _both(monkeypatch, fn)
        _same(lean, full, str(kw))
    slq_kw = {k: v for k, v in kw.items() if k != "rtol"}
    if "rtol" in kw:
        slq_kw["atol"] = 0.05 if kw["rtol"] > 1e-3 else 1e-4
    lean, full = _both(monkeypatch, lambda: slq_logdet(P, sigma=SIGMA, seed=1, **slq_kw))
    _same(lean, full, f"slq {slq_kw}")


class _Enc(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3)).eval()

    def forward(self, x):
        return self.net(x)


def test_linearization_bit_identical(monkeypatch):
    enc = _Enc().eval()
    x = torch.rand(3, 1, 10, 10, generator=torch.Generator().manual_seed(1))

    def run():
        lin = ff.linearize(enc, x)
        a = lin.fsinfo(SIGMA, atol=0.01, estimator="randomized")
        b = lin.dfil(SIGMA, rtol=0.01, estimator="randomized")
        return (a.value, a.ci_halfwidth, a.probes_per_sample, b.value, b.ci_halfwidth,
                b.probes_per_sample)

    lean, full = _both(monkeypatch, run)
    _same(lean, full, "linearize")


def test_dfil_only_skips_the_fsinfo_sizing_summaries(monkeypatch):
    """The point of the protocol: stopping on dFIL alone, FSInfo_diag is summarised only where
    samples are recorded (stage 3), not at the sizing boundaries of stages 1 and 2 (and the
    other way round for the trace)."""
    P = DenseProducts(_jac())
    calls = {"fs": 0, "tr": 0}
    fs0, tr0 = diagonal_mod.fsinfo_diag_summary, diagonal_mod.trace_summary

    def fs(*a, **k):
        calls["fs"] += 1
        return fs0(*a, **k)

    def tr(*a, **k):
        calls["tr"] += 1
        return tr0(*a, **k)

    monkeypatch.setattr(diagonal_mod, "fsinfo_diag_summary", fs)
    monkeypatch.setattr(diagonal_mod, "trace_summary", tr)
    counts = {}
    for name, kw in (("dfil", dict(dfil_rtol=0.1)), ("fsinfo", dict(atol=0.05))):
        for hook in (False, True):
            monkeypatch.setattr(stopping, "_SUMMARIZE_ALL", hook)
            calls.update(fs=0, tr=0)
            estimate_diag(P, sigma=SIGMA, seed=3, **kw)
            counts[name, hook] = dict(calls)
    monkeypatch.setattr(stopping, "_SUMMARIZE_ALL", False)
    # lean: the non-targeted summary only at the stage-3 boundaries; the targeted one as before
    assert counts["dfil", False]["tr"] == counts["dfil", True]["tr"], counts
    assert 1 <= counts["dfil", False]["fs"] <= counts["dfil", True]["fs"] - 2, counts
    assert counts["fsinfo", False]["fs"] == counts["fsinfo", True]["fs"], counts
    assert 1 <= counts["fsinfo", False]["tr"] <= counts["fsinfo", True]["tr"] - 2, counts


def test_stage2_floor_minimises_stages_2_and_3():
    """stage2_floor(N) is the n2 >= n1 minimising n2 + N (t_{n2-1}/z)^2 (checked against a brute
    force over 2..256), grows with N, and is what planned_probes' stage 2 holds at least."""
    import math

    from fsinfo_fast.estimators.base import t_quantile
    from fsinfo_fast.estimators.stopping import stage2_floor
    from fsinfo_fast.result import Z95 as z

    plans = torch.tensor([0.0, 0.5, 3.0, 4.0, 20.0, 185.0, 1e3, 1e5, math.inf],
                         dtype=torch.float64)
    got = stage2_floor(plans, 4)
    for p, g in zip(plans.tolist(), got.tolist(), strict=True):
        q = 0.0 if not math.isfinite(p) else p
        cost = {n: n + q * (t_quantile(n - 1, 0.95) / z) ** 2 for n in range(4, 257)}
        best = min(cost, key=cost.get)
        assert g == best, (p, g, best)
    assert got[:-1].tolist() == sorted(got[:-1].tolist())  # non-decreasing in the plan
    assert got.tolist()[:5] == [4.0, 4.0, 5.0, 6.0, 10.0]
    assert float(stage2_floor(torch.tensor([20.0], dtype=torch.float64), 9)[0]) == 10.0
    assert float(stage2_floor(torch.tensor([0.0], dtype=torch.float64), 9)[0]) == 9.0
