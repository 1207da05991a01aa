"""The engine's products on a one-sample batch and on one-sample sub-batches.

LayerNorm and GroupNorm went through their fused backward kernels with the saved input, mean
and rstd repeated K times by ``expand(...).reshape(...)``; for one sample that reshape is a
stride-0 view, which the kernels read as dense memory: wrong products (FSInfo_diag -0.380
against 0.226, dFIL 14.7 against 58.4 on an MLP + LayerNorm) or NaN (a GroupNorm encoder
raised NonFiniteProbeError on the defaults; PoolFormer at B = 2 once the adaptive rounds ran on
a one-sample sub-batch). Every backend must give the torch.func backend's products on the same
probes, whatever the batch or sub-batch size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.engine import available_backends


class _Tokens(nn.Module):
    """Patch tokens, a token LayerNorm and softmax attention (the 3-D case)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        return self.attn(t, t, t, need_weights=False)[0]


def _encoders():
    torch.manual_seed(0)
    return {
        "mlp_layernorm": (nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.LayerNorm(32),
                                        nn.GELU(), nn.Linear(32, 24)), (3, 4, 4)),
        "conv_groupnorm": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8),
                                         nn.Conv2d(8, 4, 3, stride=2, padding=1)), (3, 8, 8)),
        "tokens_layernorm_attention": (_Tokens(), (3, 16, 16)),
    }


BACKENDS = [b for b in ("engine", "cpp") if available_backends()[b][0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(_encoders()))
@pytest.mark.parametrize("batch", [1, 3])
def test_products_equal_torch_backend(name, batch, backend):
    enc, shape = _encoders()[name]
    enc = enc.eval()
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(1))
    ref = ff.linearize(enc, x, backend="torch").products
    g = torch.Generator().manual_seed(2)
    V = torch.randn(batch, 8, ref.d, generator=g)
    U = torch.randn(batch, 8, ref.m, generator=g)
    want_j, want_v = ref.jvp(V), ref.vjp(U)
    P = ff.linearize(enc, x, backend=backend).products
    torch.testing.assert_close(P.jvp(V), want_j, rtol=1e-4, atol=1e-5 * want_j.abs().max())
    torch.testing.assert_close(P.vjp(U), want_v, rtol=1e-4, atol=1e-5 * want_v.abs().max())
    one = P.select(torch.tensor([batch - 1]))  # the sub-batch the adaptive rounds run on
    torch.testing.assert_close(one.vjp(U[-1:]), want_v[-1:], rtol=1e-4,
                               atol=1e-5 * want_v.abs().max())
    torch.testing.assert_close(one.jvp(V[-1:]), want_j[-1:], rtol=1e-4,
                               atol=1e-5 * want_j.abs().max())


def test_one_sample_metrics_agree_across_backends():
    """The fuzzed case: the defaults on a one-sample GroupNorm encoder raised
    NonFiniteProbeError; the same seed now gives the same FSInfo_diag and dFIL on every
    backend, and the interval covers the oracle."""
    enc, shape = _encoders()["conv_groupnorm"]
    enc = enc.eval()
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    want = ff.linearize(enc, x).exact()
    got = {}
    for backend in ["torch", *BACKENDS]:
        lin = ff.linearize(enc, x, seed=0, backend=backend)
        r = lin.fsinfo(0.1, estimator="randomized")
        d = lin.dfil(0.1, estimator="randomized", method="diag")
        got[backend] = (r.value, d.value)
        assert abs(float(r.value - want.fsinfo(0.1).value)) <= float(r.ci_halfwidth)
    for backend in BACKENDS:
        torch.testing.assert_close(got[backend][0], got["torch"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[backend][1], got["torch"][1], rtol=1e-4, atol=0)
