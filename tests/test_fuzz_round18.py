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


def _autograd_fsinfo_diag(enc, x, sigma, floor):
    """FSInfo_diag from per-sample Jacobians by plain autograd (no vmap) of the float64
    encoder ``enc``: the ground truth."""
    import math

    vals = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].double()
        J = torch.autograd.functional.jacobian(lambda v: enc(v).reshape(-1), xi).reshape(
            -1, xi.numel())
        col = (J**2).sum(0)
        vals.append(0.5 * torch.log(col / sigma**2 + floor).mean()
                    - 0.5 * math.log(2 * math.pi * math.e))
    return torch.stack(vals)


class _ConvBNTokens(nn.Module):
    """A convolution and an eval BatchNorm turned into tokens (LeViT's patch embedding)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


def test_batch_norm_before_tokens_is_measured():
    """PyTorch's batched (vmap) backward of an eval ``batch_norm`` is wrong where the
    cotangent reaches it through ``flatten(2).transpose(1, 2)`` (torch 2.13, relative 1.2),
    so the vmap check refused such an encoder (transformers LeViT at 32 px) as a wrong
    batching rule. torch.func's routes compute eval BatchNorm as its affine map: accepted, and
    the oracle and both backends agree with plain autograd's per-sample Jacobians."""
    from fsinfo_fast.encoder import batch_norm_eval_as_affine

    enc = _ConvBNTokens().eval().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    bn = enc.bn
    h = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        batch_norm_eval_as_affine(h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                  False, 0.1, bn.eps), bn(h), rtol=1e-13, atol=1e-13)
    truth = _autograd_fsinfo_diag(enc, x, 0.1, 1e-10)
    torch.testing.assert_close(ff.fsinfo(enc, x, 0.1, estimator="exact").value, truth,
                               rtol=1e-10, atol=0)
    for backend in ("torch", "engine"):
        r = ff.fsinfo(enc, x, 0.1, backend=backend, estimator="randomized", seed=1)
        assert bool(((r.value - truth).abs() <= 2 * r.ci_halfwidth).all()), (backend, r.value)


def test_transformers_levit_is_measured_at_32px():
    pytest.importorskip("transformers")
    from fsinfo_fast.models.third_party import build

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    enc = ff.split(build("levit", size=32), at="patch_embeddings")
    lin = ff.linearize(enc, x, seed=0)
    enc64 = ff.split(build("levit", size=32).double(), at="patch_embeddings")  # same weights
    truth = _autograd_fsinfo_diag(enc64, x, 0.1, 1e-10)
    torch.testing.assert_close(lin.exact().fsinfo(0.1, "diag").value, truth, rtol=1e-9,
                               atol=0)
    r = lin.fsinfo(0.1)
    assert bool(((r.value - truth).abs() <= r.ci_halfwidth).all())


def _leaky(slope):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.LeakyReLU(slope),
                         nn.Linear(12, 8)).eval()


def test_a_module_attribute_edit_is_a_new_encoder():
    """A plain attribute (a LeakyReLU's slope) edited after ``ff.linearize``: the
    Linearization went on and mixed its held probes of the old function with new ones (an
    interval covering neither), and a new ``ff.linearize`` reused the validation cache's float64
    copy with the old slope, refused as "another function in float64". Both now see it."""
    torch.manual_seed(5)
    x = torch.randn(2, 16)
    enc = _leaky(0.01)
    lin = ff.linearize(enc, x, seed=1)
    lin.fsinfo(0.1, estimator="randomized", atol=0.05)
    lin.exact()
    enc[2].negative_slope = 0.03
    with pytest.raises(ff.EncoderError, match="module attribute"):
        lin.fsinfo(0.1, estimator="randomized", atol=0.02)
    again, fresh = ff.linearize(enc, x, seed=1), ff.linearize(_leaky(0.03), x, seed=1)
    for call in (lambda v: v.exact().fsinfo(0.1, "diag").value, lambda v: v.fsinfo(0.1).value,
                 lambda v: v.dfil(0.1).value):
        torch.testing.assert_close(call(again), call(fresh), rtol=1e-12, atol=0)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, t):
        return torch.tanh(t * self.s)


def _saturated(s):
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), _Scale(s)).eval()
    with torch.no_grad():
        m[1].weight.copy_(torch.eye(4))
        m[1].bias.zero_()
    return m


def test_an_attribute_edit_does_not_reach_the_lost_columns_through_a_stale_copy():
    """A saturated tanh whose scale changes from 4 to 4.5: float32 outputs identical, so the
    same-function check passed, and the columns float32 loses were recomputed on the cached
    float64 copy with the old scale (dFIL 134x the truth, a zero-width interval). The new
    ``ff.linearize`` now builds a fresh copy: the fresh model's values."""
    torch.manual_seed(5)
    x = 2.5 + 0.5 * torch.rand(2, 4)
    enc = _saturated(4.0)
    ff.linearize(enc, x, seed=1).dfil(0.1)
    enc[2].s = 4.5
    got = ff.linearize(enc, x, seed=1).dfil(0.1)
    want = ff.linearize(_saturated(4.5), x, seed=1).dfil(0.1)
    torch.testing.assert_close(got.value, want.value, rtol=1e-9, atol=0)
    assert bool(((got.value - want.value).abs() <= got.ci_halfwidth + 1e-30).all())


def _spike(d=1000):
    """A linear encoder ``d x d`` with one singular value 1 over a flat 1e-3 bulk."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.full((d,), 1e-3, dtype=torch.float64)
    s[0] = 1.0
    lin = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(((U * s) @ V.T).float())
    return lin.eval(), torch.rand(1, d, generator=torch.Generator().manual_seed(1))


def test_auto_does_not_accept_a_stage_cut_by_the_cap():
    """The log det with a prior under ``auto`` on a rank-one spike over a flat bulk (d = m =
    1000) ran SLQ to its cap of 16 probes: stage 2 cut there met the tolerance by its own 6
    probes' spread where that came out low, and such results missed 30 of 200 seeds (all
    ``converged``; seed 8 by 7.3 half-widths). Under ``auto`` a stage cut by the cap is no
    longer converged: the exact route answers. An explicit estimator keeps its capped
    result (seed 8: the interval missing the oracle, as before), not converged (round 20: a
    stage cut by the cap is never converged, tests/test_fuzz_round20.py)."""
    enc, x = _spike()
    r = ff.linearize(enc, x, seed=8).fsinfo(0.1, variant="logdet", prior_var=1.0)
    # (round 20: auto now sees at once that a cap of 16 probes leaves no room for SLQ's three
    # stages, and spends none)
    assert r.estimator == "exact" and "leaves no room for the three stages" in r.info["auto"]
    truth = r.value  # (the exact route: the oracle)
    capped = ff.linearize(enc, x, seed=8).fsinfo(0.1, variant="logdet", prior_var=1.0,
                                                 estimator="randomized", max_probes=16)
    missed = (capped.value - truth).abs() > capped.ci_halfwidth
    assert bool(missed.any())
    assert not bool(capped.converged[missed].any())


def test_guard_reports_no_accuracy_of_a_users_model_on_bundled_labels(tmp_path):
    """``fsinfo-fast guard --model mymodule:builder --data digits`` reported "acc clean 0.0%"
    against digit labels the model was never trained on (any model with 10 or more outputs
    passed the label check); accuracy is now not measured there, and the note says why."""
    import json

    from fsinfo_fast.cli import main

    pytest.importorskip("transformers")
    out = tmp_path / "g.json"
    assert main(["guard", "--model", "fsinfo_fast.models.third_party:vit_classifier_small32",
                 "--data", "digits", "--splits", "vit.layers.0", "--max-samples", "4",
                 "--calibration", "2", "--quiet", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["accuracy_clean"] is None
    assert "are not the classes of --model" in rep["accuracy_note"]


def test_a_loader_batch_is_refused_with_what_to_pass():
    enc = _enc()
    x = torch.randn(2, 8)
    with pytest.raises(InvalidInputTypeError, match=r"Pass the inputs only, e.g. batch\[0\]"):
        ff.FSInfoMetric(enc, sigma=0.1).update((x, torch.tensor([0, 1])))
    with pytest.raises(InvalidInputTypeError, match="batch\\['pixel_values'\\]"):
        ff.fsinfo(enc, {"pixel_values": x}, sigma=0.1)


def test_model_spec_accepts_a_file_path(tmp_path, monkeypatch):
    """``--model mymodels.py:build`` said "No module named 'mymodels.py'"; a path to a file
    with the function is accepted (relative to the current directory or absolute)."""
    from fsinfo_fast.profile.errors import ModelSpecError
    from fsinfo_fast.profile.sources import build_model

    sub = tmp_path / "models dir"
    sub.mkdir()
    (sub / "mymodels.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).train()\n")
    monkeypatch.chdir(tmp_path)
    m = build_model("models dir/mymodels.py:build")
    assert isinstance(m, nn.Sequential) and not m.training
    assert isinstance(build_model(f"{sub}/mymodels.py:build"), nn.Sequential)
    with pytest.raises(ModelSpecError, match="no file"):
        build_model("nowhere/mymodels.py:build")
    with pytest.raises(ModelSpecError, match="has no function"):
        build_model("models dir/mymodels.py:missing")


def test_split_suggests_the_path_under_a_wrapper():
    """``encoder.layer.0`` (the classic Hugging Face name) on a ``ViTForImageClassification``
    got no suggestion, and the module list came after a long torch.fx trace error; the
    suggestion now matches the last components, and the top-level modules come first."""
    pytest.importorskip("transformers")
    from fsinfo_fast.errors import SplitError
    from fsinfo_fast.models.third_party import build

    model = build("vit", size=32, num_labels=10)
    with pytest.raises(SplitError) as err:
        ff.split(model, at="encoder.layer.0")
    msg = str(err.value)
    assert "Did you mean 'vit.layers.0'" in msg
    assert msg.index("Top-level modules: vit, classifier") < msg.index("torch.fx (")
