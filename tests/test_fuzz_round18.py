"""Round 18 fuzz findings (helpers 69-71): the torchmetrics modules' states under
``set_dtype``, ``load_state_dict`` and copies, and non-tensor batches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.errors import InvalidInputTypeError

pytest.importorskip("torchmetrics")


def _enc(d=8, m=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 12), nn.Tanh(), nn.Linear(12, m)).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_set_dtype_keeps_the_sums_in_float64(dtype):
    """``set_dtype(torch.half)`` cast the running sums: a dFIL sum of 4 samples near 800 came
    out as 780.0 (0.12 off, 40 of its half-widths) and its sum of squares overflowed (stderr
    NaN). The states keep float64 (and the counters int64); the values equal float64's."""
    enc, x = _enc(), torch.randn(4, 8)
    ref = ff.DFILMetric(enc, sigma=0.01)
    ref.update(x)
    m = ff.DFILMetric(enc, sigma=0.01)
    m.set_dtype(dtype)
    m.update(x)
    assert m.total.dtype == torch.float64 and m.count.dtype == torch.int64
    for k, v in ref.compute().items():
        torch.testing.assert_close(m.compute()[k], v, rtol=0, atol=0)
    m.set_dtype(dtype)  # after an update: the sums already there are kept too
    assert m.total_sq.dtype == torch.float64 and torch.isfinite(m.total_sq)
    torch.testing.assert_close(m.compute()["stderr"], ref.compute()["stderr"], rtol=0, atol=0)


def test_load_state_dict_continues_the_sample_ids_and_drops_the_cache():
    """A metric restored by ``load_state_dict`` numbered its next batch from 0 again, reusing
    the probes of the samples it had counted (identical per-sample estimates, an
    ``estimator_stderr`` that treats them as independent), and ``compute()`` returned the
    result cached before the load. It now goes on as the uninterrupted metric does."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(24, 30), nn.Tanh(), nn.Linear(30, 20)).double().eval()
    x1 = torch.randn(3, 24, dtype=torch.float64)
    kw = dict(estimator="randomized", num_probes=8)
    full = ff.FSInfoMetric(enc, sigma=0.1, **kw)
    full.update(x1)
    full.update(x1)
    a = ff.FSInfoMetric(enc, sigma=0.1, **kw)
    a.persistent(True)
    a.update(x1)
    b = ff.FSInfoMetric(enc, sigma=0.1, **kw)
    b.persistent(True)
    b.update(torch.randn(2, 24, dtype=torch.float64))
    before = b.compute()["mean"].clone()
    b.load_state_dict(a.state_dict())
    assert int(b.compute()["count"]) == 3 and not torch.equal(b.compute()["mean"], before)
    torch.testing.assert_close(b.compute()["mean"], a.compute()["mean"], rtol=0, atol=0)
    b.update(x1)
    for k in ("mean", "estimator_stderr", "ci_halfwidth"):
        torch.testing.assert_close(b.compute()[k], full.compute()[k], rtol=0, atol=0)


def test_a_copy_of_the_metric_measures_the_same_live_encoder():
    """``deepcopy`` / ``clone()`` copied the encoder the metric only references, so
    torchmetrics' ``MetricTracker`` (which clones the metric at ``increment()``) reported each
    epoch's FSInfo of the weights at the start of that epoch."""
    from torchmetrics.wrappers import MetricTracker

    enc, x = _enc(), torch.randn(3, 8)
    m = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    assert m.clone().encoder is enc and copy.deepcopy(m).encoder is enc
    tracker = MetricTracker(m, maximize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            tracker.increment()
            with torch.no_grad():  # this epoch's training changes the model in place
                enc[2].weight.mul_(3.0)
            tracker.update(x)
            got = tracker.compute()["mean"]
            true = ff.fsinfo(enc, x, sigma=0.1, estimator="exact").value.mean()
            torch.testing.assert_close(got, true, rtol=1e-12, atol=0)
    # the copy's states are its own
    c = m.clone()
    c.update(x)
    assert int(c.count) == 1 * 3 + int(m.count)


@pytest.mark.parametrize("batch", [[[0.1] * 8, [0.2] * 8], {"pixel_values": torch.randn(2, 8)}])
def test_metrics_and_guard_refuse_a_non_tensor_batch(batch):
    """A list or mapping batch met ``x.shape`` / ``x.detach()``: a raw AttributeError (ff.fsinfo
    said what to pass); no running id is spent on it."""
    enc = _enc()
    for call in (lambda: ff.FSInfoMetric(enc, sigma=0.1).update(batch),
                 lambda: ff.DFILMetric(enc, sigma=0.1)(batch),
                 lambda: ff.FSInfoGuard(enc)(batch),
                 lambda: ff.FSInfoGuard(enc, sigma=0.1)(batch)):
        with pytest.raises(InvalidInputTypeError, match="x must be a torch.Tensor"):
            call()
    m = ff.FSInfoMetric(enc, sigma=0.1)
    with pytest.raises(InvalidInputTypeError):
        m.update(batch)
    assert m._next_id == 0


class _TwoLayer(nn.Module):
    def __init__(self, d=8, h=12, m=6):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, m)


class _TypeCast(_TwoLayer):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).type(self.how))


class _CastFree(_TwoLayer):
    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class _FFT64(_TwoLayer):
    """An FFT computed in complex64 (the result promoted back through a complex128 constant
    on a float64 input, as a dtype-following forward does)."""

    def __init__(self, low=True):
        super().__init__(h=16)
        self.low = low

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        z = torch.fft.fft(h.to(torch.complex64) if self.low else h.to(torch.complex128))
        z = z * torch.ones(1, dtype=torch.complex128 if h.dtype == torch.float64 else z.dtype)
        return self.l2(z.real * 0.5 + z.imag * 0.25)


@pytest.mark.parametrize("how", [torch.FloatTensor, "torch.FloatTensor", torch.float32])
def test_the_float64_copy_keeps_float64_through_a_tensor_type_cast(how):
    """``.type(torch.FloatTensor)`` inside forward kept the float64 copy in float32: no oracle,
    ``dtype=torch.float64`` refused. The copy now casts to float64 there, as for ``.float()``:
    the oracle equals the cast-free module's."""
    x = torch.randn(2, 8)
    want = ff.fsinfo(_CastFree(), x, sigma=0.1, estimator="exact").value
    got = ff.fsinfo(_TypeCast(how).eval(), x, sigma=0.1, estimator="exact").value
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_complex64_inside_forward():
    """A complex64 FFT on x's path: the float64 dtype check saw only real dtypes (a float64
    batch was accepted, then refused by the adjoint check as "a .float() cast"); the float64
    copy kept complex64 (no oracle). A float64 batch is now refused naming complex64, and the
    copy computes in complex128: its oracle equals the complex128 module's."""
    x = torch.randn(2, 8)
    want = ff.fsinfo(_FFT64(low=False).eval().double(), x.double(), sigma=0.1,
                     estimator="exact").value
    got = ff.fsinfo(_FFT64().eval(), x, sigma=0.1, estimator="exact").value
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    lin = ff.linearize(_FFT64().eval(), x, dtype=torch.float64)
    torch.testing.assert_close(lin.fsinfo(0.1).value, want, rtol=1e-9, atol=0)
    with pytest.raises(ff.EncoderError, match="computes in torch.complex64 inside"):
        ff.linearize(_FFT64().eval().double(), x.double())


class _Autocast(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(64, 48), nn.Linear(48, 32)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.l1(x)
        return self.l2(torch.tanh(h.to(x.dtype)))


def test_an_autocast_region_is_named_in_the_refusal():
    """The modes' disagreement of a forward with a bfloat16 autocast region was blamed on
    torch.no_grad() or a custom autograd.Function; the message now names bfloat16 and points
    to dtype=torch.float64, which measures it (autocast leaves float64 alone)."""
    enc = _Autocast().eval()
    x = torch.randn(2, 64)  # (the stream after the weights': a batch the rounding shows on)
    with pytest.raises(ff.EncoderError, match=r"computes in torch.bfloat16 inside \(a torch"):
        ff.linearize(enc, x)
    lin = ff.linearize(_Autocast().eval(), x, dtype=torch.float64)
    enc64 = _Autocast().eval().double()
    enc64.forward = lambda v: enc64.l2(torch.tanh(enc64.l1(v)))  # without the region
    want = ff.fsinfo(enc64, x.double(), sigma=0.1, estimator="exact").value
    torch.testing.assert_close(lin.fsinfo(0.1).value, want, rtol=1e-9, atol=0)


class _PlainAttr(_TwoLayer):
    def __init__(self):
        super().__init__()
        self.P = torch.randn(12, 12)  # not a parameter or buffer: .to() does not cast it

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)) @ self.P)


def test_a_module_whose_copy_mixes_dtypes_is_not_told_to_pass_a_module():
    """The float64 copy of a module with a float32 plain attribute failed with "Pass an
    nn.Module (it is cast automatically)", which it is; the message names the causes."""
    with pytest.raises(ff.EncoderError, match="register_buffer") as err:
        ff.fsinfo(_PlainAttr().eval(), torch.randn(2, 8), sigma=0.1, estimator="exact")
    assert "Pass an nn.Module" not in str(err.value)
