"""Encoders with ops that torch.func's vmap cannot batch, and encoders whose float64 copy is
another function: each test fails before its fix."""

from __future__ import annotations

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.errors import EncoderError

pytestmark = pytest.mark.usefixtures("one_thread")


class _RReLUIdentity(torch.autograd.Function):
    """``2 x`` whose hand-written backward calls an op without a vmap batching rule
    (``rrelu`` with both slopes 1: the identity, so the backward is still linear)."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * torch.nn.functional.rrelu(g, 1.0, 1.0, training=False)

    @staticmethod
    def jvp(ctx, t):
        return 2 * t


class _BackwardWithoutRule(torch.nn.Module):
    def __init__(self, d: int, m: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, m)

    def forward(self, x):
        return torch.tanh(_RReLUIdentity.apply(self.lin(x)))


def _close_to_oracle(enc, x, **kw):
    want = ff.fsinfo(enc, x, sigma=0.1, estimator="exact").value
    r = ff.fsinfo(enc, x, sigma=0.1, **kw)
    return r, want


def test_forward_op_without_a_batching_rule_is_measured():
    """nn.RReLU in eval mode (aten::rrelu_with_noise has no vmap rule): every route of the
    default estimator raised (its JVPs ran the forward under vmap, the double-backward route
    too). The double-backward pullback is now built outside vmap, so the JVPs run where the
    VJPs do: the default, the fast exact route, the deflated estimator and dFIL agree with the
    float64 oracle."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.RReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    for kw in ({}, {"estimator": "exact-fast"}):
        r, want = _close_to_oracle(enc, x, **kw)
        torch.testing.assert_close(r.value, want, rtol=0, atol=1e-5)
    r, want = _close_to_oracle(enc, x, estimator="deflated")
    assert bool(((r.value - want).abs() <= r.ci_halfwidth + 1e-9).all())
    got = ff.dfil(enc, x, sigma=0.1, estimator="exact-fast").value
    torch.testing.assert_close(got, ff.dfil(enc, x, sigma=0.1, estimator="exact").value,
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("d,m", [(12, 5), (5, 12)])
def test_backward_op_without_a_batching_rule_runs_probe_by_probe(d, m):
    """A custom autograd.Function whose backward calls an op without a vmap batching rule:
    the torch backend's batched VJPs raised torch's 'vmap: we do not yet support' (the oracle
    looped). Its products now run one probe at a time, recorded in
    info['vmap_fallback'], with the oracle's values."""
    torch.manual_seed(0)
    enc, x = _BackwardWithoutRule(d, m), torch.randn(3, d)
    r, want = _close_to_oracle(enc, x, estimator="exact-fast", backend="torch")
    torch.testing.assert_close(r.value, want, rtol=0, atol=1e-5)
    r, want = _close_to_oracle(enc, x, estimator="randomized", backend="torch", atol=0.05)
    assert "no vmap batching rule" in r.info["vmap_fallback"]
    assert bool(((r.value - want).abs() <= r.ci_halfwidth).all())
    got = ff.dfil(enc, x, sigma=0.1, backend="torch", estimator="randomized", rtol=0.05)
    exact = ff.dfil(enc, x, sigma=0.1, estimator="exact").value
    assert bool(((got.value - exact).abs() <= got.ci_halfwidth).all())


class _SeededProj(torch.nn.Module):
    """A projection drawn in forward from a seeded generator, in the input's dtype (so the
    float64 copy draws other numbers) or always in float32 (the same function)."""

    def __init__(self, own_dtype: bool):
        super().__init__()
        self.own_dtype = own_dtype

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        dt = x.dtype if self.own_dtype else torch.float32
        return torch.tanh(x @ torch.randn(x.shape[-1], 4, generator=g, dtype=dt).to(x.dtype))


def test_float64_copy_computing_another_function_is_refused():
    """An encoder whose float64 copy computes another function (random numbers drawn in the
    input's dtype, a branch on x.dtype): the float64 oracle answered for the float64 function
    (FSInfo 0.17 / 0.68) and the default for the float32 one (0.22 / -0.53), both as exact.
    The exact routes now refuse it with the reason; the randomized estimator (working dtype
    only) still measures it, and the same draw in a fixed dtype is measured exactly."""
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    for kw in ({}, {"estimator": "exact"}, {"estimator": "exact-fast"}):
        with pytest.raises(EncoderError, match="another function in float64"):
            ff.fsinfo(_SeededProj(True), x, sigma=0.1, **kw)
    r = ff.fsinfo(_SeededProj(True), x, sigma=0.1, estimator="randomized", num_probes=8)
    assert torch.isfinite(r.value).all()

    class Branch(torch.nn.Module):
        def forward(self, x):
            return torch.tanh((2.0 if x.dtype == torch.float64 else 1.0) * x[..., :4])

    with pytest.raises(EncoderError, match="another function in float64"):
        ff.dfil(Branch(), x, sigma=0.1, estimator="exact-fast")
    # a plain callable: auto stays randomized and says why
    r = ff.fsinfo(lambda t: Branch()(t), x, sigma=0.1)
    assert "another function in float64" in r.info["exact_unavailable"]
    # the same function in both dtypes: measured, the fast route equal to the oracle
    r, want = _close_to_oracle(_SeededProj(False), x)
    torch.testing.assert_close(r.value, want, rtol=0, atol=1e-5)
