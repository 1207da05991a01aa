"""TF32 off while a metric runs on CUDA (:mod:`fsinfo_fast._precision`), the user's settings
restored exactly; and the device-mismatch error. The flags live in PyTorch's global context on
every build, so their handling is tested here on the CPU; what TF32 does to the numbers on a GPU
is tested by tests/test_gpu_api.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast import _precision

# Each scenario sets the switches the way a user might, then reads the legacy flags (which may
# raise once the APIs were mixed), enters and leaves ieee_fp32("cuda") (and once with an error
# inside), and reads them again: everything must read as before, and "ieee" inside.
_SCENARIO = r"""
import sys, warnings
warnings.simplefilter("ignore")
import torch
from fsinfo_fast._precision import ieee_fp32
b = torch.backends
scen = sys.argv[1]
if scen == "legacy":
    b.cuda.matmul.allow_tf32 = True
    b.cudnn.allow_tf32 = False
elif scen == "high":
    torch.set_float32_matmul_precision("high")
elif scen == "new":
    b.cuda.matmul.fp32_precision = "tf32"
    b.cudnn.conv.fp32_precision = "ieee"

def state():
    out = [b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision]
    for get in (lambda: b.cudnn.allow_tf32, lambda: b.cuda.matmul.allow_tf32,
                torch.get_float32_matmul_precision):
        try:
            out.append(get())
        except RuntimeError:
            out.append("raises")
    return out

before = state()
with ieee_fp32("cuda"):
    inside = state()[:3]
    with ieee_fp32(torch.device("cuda", 0)):
        pass
    assert state()[:3] == inside
try:
    with ieee_fp32("cuda"):
        raise KeyError
except KeyError:
    pass
after = state()
assert inside == ["ieee"] * 3, inside
assert after == before, (before, after)
with ieee_fp32("cpu"):
    assert state() == before
print("ok", before)
"""


@pytest.mark.parametrize("scenario", ["default", "legacy", "high", "new"])
def test_ieee_fp32_restores_the_users_settings(scenario):
    out = subprocess.run([sys.executable, "-c", _SCENARIO, scenario], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok"), out.stdout


class _Recorder(nn.Module):
    """A conv encoder that records the cuDNN conv TF32 switch at every forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.seen: list[str] = []

    def forward(self, x):
        self.seen.append(torch.backends.cudnn.conv.fp32_precision)
        return torch.tanh(self.conv(x))


@pytest.mark.parametrize("backend", ["torch", "engine"])
def test_every_metric_forward_runs_without_tf32(monkeypatch, backend):
    """With the CPU treated as CUDA, every forward the metrics run (validation, the engine's
    capture or torch.func's products, the oracle) sees TF32 off, and the switch reads as before
    afterwards."""
    monkeypatch.setattr(_precision, "_is_cuda", lambda device: True)
    enc = _Recorder().eval()
    x = torch.randn(2, 2, 5, 5)
    before = torch.backends.cudnn.conv.fp32_precision
    lin = ff.linearize(enc, x, backend=backend)
    lin.fsinfo(0.1, estimator="randomized", num_probes=4)
    lin.dfil(0.1, estimator="randomized", num_probes=4)
    lin.fsinfo_sigma(-1.0, estimator="randomized", num_probes=4)
    lin.exact()
    assert enc.seen and set(enc.seen) == {"ieee"}, enc.seen
    assert torch.backends.cudnn.conv.fp32_precision == before


def test_device_mismatch_raises_with_the_fix():
    enc = nn.Linear(3, 2).to("meta")
    # a meta encoder has no values: the fix is to materialise it, not to move x to meta
    want = r"on the meta device .*x on cpu, the encoder on meta.*Materialise"
    with pytest.raises(ff.InvalidInputError, match=want):
        ff.fsinfo(enc, torch.randn(2, 3), sigma=0.1)
    # a plain function, or a module without parameters, is not checked
    r = ff.fsinfo(lambda t: 2 * t, torch.randn(2, 3, dtype=torch.float64), sigma=0.1,
                  estimator="exact")
    assert r.value.shape == (2,)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_metrics_ignore_a_users_autocast(backend):
    """Inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` the metrics still compute in float32
    (the same numbers as outside; before, the engine refused the encoder and torch.func raised a
    dtype error), and the user's autocast is on again after the call."""
    from fsinfo_fast.data import natural_images
    from fsinfo_fast.models import get_model

    torch.manual_seed(0)
    enc = ff.split(get_model("vgg5").eval(), at=2)
    x = natural_images(size=32, n=2)[0]
    lin0 = ff.linearize(enc, x, backend=backend, seed=0)
    want = (lin0.fsinfo(0.1).value, lin0.dfil(0.1).value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc(x).dtype == torch.bfloat16  # autocast does reach this encoder
        lin = ff.linearize(enc, x, backend=backend, seed=0)
        got = (lin.fsinfo(0.1).value, lin.dfil(0.1).value)
        assert torch.is_autocast_enabled("cpu")
    assert lin.products.backend == lin0.products.backend
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


def test_metrics_work_inside_inference_mode():
    """``torch.inference_mode()`` (Lightning's validation loop runs in it): the products need
    autograd, so the metrics turn inference mode off for their work. Before, FSInfoMetric.update
    there raised NotDifferentiableError and the engine a raw autograd RuntimeError."""
    pytest.importorskip("torchmetrics")
    from fsinfo_fast.data import natural_images
    from fsinfo_fast.models import get_model

    torch.manual_seed(0)
    enc = ff.split(get_model("vgg5").eval(), at=2)
    x = natural_images(size=32, n=2)[0]
    want = ff.linearize(enc, x, seed=0).fsinfo(0.1).value
    with torch.inference_mode():
        for backend in ("auto", "torch"):
            got = ff.linearize(enc, x, backend=backend, seed=0).fsinfo(0.1).value
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        metric = ff.FSInfoMetric(enc, sigma=0.1)
        metric.update(x)
        assert torch.isfinite(metric.compute()["mean"])
        out = ff.FSInfoGuard(enc, target=-1.0)(x)
        assert out.shape == enc(x).shape
        assert torch.is_inference_mode_enabled()
