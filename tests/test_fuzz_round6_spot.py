"""Round-6 fuzz: checks whose outcome depends on the batch's values run on every batch.

``ff.linearize`` caches its validation per encoder and input shape, and the engine caches its
capture and its cross-check against torch.func. A check the first batch passed used to be
trusted for every later batch of that shape, although a clamp, a batch maximum or a zero
variance decides it by the values."""

import pytest
import torch
import torch.nn as nn

import fsinfo_fast as ff


class _NoGradClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        with torch.no_grad():
            y.clamp_(-1, 1)
        return y


class _BatchMaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.c(x / x.amax())  # the maximum over the whole batch


def _quiet_and_loud(seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.rand(2, 3, 6, 6, generator=g) * 0.05  # conv outputs inside (-1, 1)
    xb = torch.randn(2, 3, 6, 6, generator=g) * 3  # often outside: the clamp bites
    return xa, xb


@pytest.mark.parametrize("backend", ["torch", "engine", "auto"])
def test_no_grad_clamp_refused_on_a_later_batch_that_exercises_it(backend):
    torch.manual_seed(0)
    m = _NoGradClamp().eval()
    xa, xb = _quiet_and_loud()
    ff.linearize(m, xa, backend=backend, seed=0).fsinfo(0.1, estimator="randomized",
                                                        num_probes=4)
    lin = ff.linearize(m, xb, backend=backend, seed=0)  # the check runs with the products
    with pytest.raises(ff.EncoderError, match="forward-mode and reverse-mode"):
        lin.fsinfo(0.1, estimator="randomized", num_probes=4)
    with pytest.raises(ff.EncoderError, match="forward-mode and reverse-mode"):
        ff.linearize(m, xb, backend=backend, seed=0).exact()


def test_batch_coupling_refused_on_a_later_batch_that_shows_it():
    torch.manual_seed(0)
    m = _BatchMaxNorm().eval()
    xa = torch.rand(2, 3, 6, 6)
    xa[:, 0, 0, 0] = 1.0  # every image sets the batch maximum: no coupling visible
    xb = torch.rand(2, 3, 6, 6) * torch.tensor([1.0, 0.5]).view(2, 1, 1, 1)
    xb[0, 0, 0, 0] = 1.0
    ff.linearize(m, xa).fsinfo(0.1, estimator="randomized", num_probes=4)
    with pytest.raises(ff.SampleInteractionError, match="sample 1"):
        ff.linearize(m, xb)


# -- the engine's cross-check against torch.func runs on every batch -----------------------------
class _LegacyClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y.data.clamp_(-1, 1)  # autograd's Jacobian is conv's alone
        return y


def _metrics(m, x, backend):
    lin = ff.linearize(m, x, backend=backend, seed=0)
    r = lin.fsinfo(0.1, estimator="randomized", num_probes=8)
    d = lin.dfil(0.1, num_probes=8)
    return r, d


def test_data_clamp_that_bites_later_is_refused_by_engine_and_rerouted_by_auto():
    torch.manual_seed(0)
    m = _LegacyClamp().eval()
    xa, xb = _quiet_and_loud()
    truth_r, truth_d = _metrics(m, xb, "torch")
    _metrics(m, xa, "engine")  # the clamp does nothing: the engine agrees
    with pytest.raises(ff.BackendUnavailableError, match="depends on this batch's values"):
        _metrics(m, xb, "engine")
    r, d = _metrics(m, xb, "auto")
    assert r.info["backend"] == "torch"
    assert "engine -> torch" in r.info["backend_fallback"]
    torch.testing.assert_close(r.value, truth_r.value)
    torch.testing.assert_close(d.value, truth_d.value)
    # the refusal is this batch's only: a quiet batch is served by the engine again
    assert ff.linearize(m, xa * 0.5, backend="engine", seed=0).products.backend == "engine"


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.stop_grad = False

    def forward(self, x):
        g = torch.sigmoid(self.conv(x))
        if self.stop_grad:
            g = g.detach()
        return x * g


def test_python_flag_adding_detach_is_recaptured():
    torch.manual_seed(0)
    m = _Gated().eval()
    x = torch.randn(2, 3, 6, 6)
    _metrics(m, x, "engine")
    m.stop_grad = True
    truth_r, truth_d = _metrics(m, x, "torch")
    r, d = _metrics(m, x, "engine")  # the cached graph differentiates through the gate
    assert r.info["backend"] == "engine"
    torch.testing.assert_close(r.value, truth_r.value)
    torch.testing.assert_close(d.value, truth_d.value)


class _Standardise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        mu = x.mean(dim=(1, 2, 3), keepdim=True)
        return self.conv((x - mu) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-2))


class _PaddedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        pad = (x == 0).all(-1)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        mask = causal & ~pad[:, None, :]  # a left-padded row sees no key
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("case", ["zero variance", "fully masked row"])
def test_engine_nan_derivative_on_a_later_batch_falls_back_under_auto(case):
    torch.manual_seed(0)
    if case == "zero variance":
        m, xa, xb = _Standardise().eval(), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
        xb[1] = 0.5  # a blank image
    else:
        m, xa, xb = _PaddedAttention().eval(), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        xb[1, :2] = 0  # sample 1 left-padded by two tokens
    _metrics(m, xa, "auto")
    r, _ = _metrics(m, xb, "auto")  # was NonFiniteProbeError
    if case == "zero variance":  # std is now one node whose rule gives autograd's 0 there
        assert r.info["backend"] in ("engine", "cpp") and "backend_fallback" not in r.info
    else:
        assert r.info["backend"] == "torch" and "engine -> torch" in r.info["backend_fallback"]
    truth, _ = _metrics(m, xb, "torch")
    torch.testing.assert_close(r.value, truth.value)


def test_fresh_encoder_inside_inference_mode():
    """The validation's backward needs a normal tensor: a snapshot taken under
    ``torch.inference_mode()`` is an inference tensor (a fresh encoder there raised "Setting
    requires_grad=True on inference tensor"; a cached one passed only because its hit skipped
    the backward)."""
    torch.manual_seed(0)
    m = _NoGradClamp().eval()
    xa, _ = _quiet_and_loud()
    with torch.inference_mode():
        r = ff.linearize(m, xa, seed=0).fsinfo(0.1, estimator="randomized", num_probes=4)
    assert bool(torch.isfinite(r.value).all())
