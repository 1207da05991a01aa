"""Half-precision encoders are linearised in float32 (:func:`fsinfo_fast.encoder.working_dtype`).

bfloat16 / float16 Jacobian products err by far more than the metrics' intervals count (the test
below measures it), so ``ff.linearize`` computes the products of a half-precision encoder or input
on a float32 copy and records it in ``info["working_dtype"]``; a requested dtype must be float32
or float64."""

from __future__ import annotations

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast import reference
from fsinfo_fast.data import natural_images
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import make_products
from fsinfo_fast.errors import EncoderError, InvalidInputError, InvalidInputTypeError
from fsinfo_fast.models import get_model

HALF = [torch.bfloat16, torch.float16]


def _vgg5_s2(dtype):
    torch.manual_seed(0)
    enc = ff.split(get_model("vgg5").eval(), at=2).to(dtype)
    x = natural_images(size=32, n=2)[0].to(dtype)
    return enc, x


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_encoder_products_are_float32_and_match_the_oracle(dtype):
    enc, x = _vgg5_s2(dtype)
    lin = ff.linearize(enc, x, backend="engine", seed=0)
    assert lin.enc.x.dtype == torch.float32
    J = reference.jacobian(enc, x)  # [B, m, d] float64, the same (half) weights
    g = torch.Generator().manual_seed(1)
    V = torch.randn(lin.batch, 3, lin.m, generator=g)
    want = torch.einsum("bkm,bmd->bkd", V.double(), J)
    assert _rel(lin.products.vjp(V), want) < 1e-5
    # why: the same products in the encoder's own half precision are off by far more
    half = make_products(prepare(enc, x), "engine")
    assert half.dtype == dtype
    assert _rel(half.vjp(V.to(dtype)), want) > 1e-3

    r, d = lin.fsinfo(0.1), lin.dfil(0.1)
    for res in (r, d):
        assert str(dtype) in res.info["working_dtype"] and "float32" in res.info["working_dtype"]
    # exactly the float32 copy's results on the same probes
    enc32 = ff.split(get_model("vgg5").eval(), at=2)
    enc32.load_state_dict({k: v.float() for k, v in enc.state_dict().items()})
    lin32 = ff.linearize(enc32, x.float(), backend="engine", seed=0)
    torch.testing.assert_close(r.value, lin32.fsinfo(0.1).value, rtol=0, atol=0)
    torch.testing.assert_close(d.value, lin32.dfil(0.1).value, rtol=0, atol=0)
    assert "working_dtype" not in lin32.fsinfo(0.1).info


def test_half_input_to_a_float32_encoder_runs_in_float32():
    enc, x = _vgg5_s2(torch.float32)
    lin = ff.linearize(enc, x.to(torch.bfloat16))  # the encoder alone would refuse bf16 input
    assert lin.enc.x.dtype == torch.float32
    assert "torch.bfloat16" in lin.fsinfo(0.1).info["working_dtype"]


def test_requested_dtype():
    enc, x = _vgg5_s2(torch.bfloat16)
    lin = ff.linearize(enc, x, dtype=torch.float64)
    assert lin.enc.x.dtype == torch.float64 and "working_dtype" not in lin.dfil(0.1).info
    with pytest.raises(InvalidInputError, match="float32 or torch.float64"):
        ff.linearize(enc, x, dtype=torch.bfloat16)
    with pytest.raises(InvalidInputTypeError, match="torch.dtype"):
        ff.linearize(enc, x, dtype="float32")


def test_a_half_precision_callable_says_to_pass_a_module():
    enc, x = _vgg5_s2(torch.bfloat16)
    with pytest.raises(EncoderError, match="nn.Module"):
        ff.linearize(lambda t: enc(t), x)  # its weights stay bf16 while the input is float32


def test_engine_report_sees_the_float32_copy():
    from fsinfo_fast.engine import engine_report

    enc, x = _vgg5_s2(torch.bfloat16)
    rep = engine_report(enc, x)
    assert rep["captured"] and not rep["fallbacks"]
    assert rep["dtype"] == "torch.float32" and "torch.bfloat16" in rep["dtype_note"]
    rep32 = engine_report(*_vgg5_s2(torch.float32))
    assert rep32["dtype"] == "torch.float32" and rep32["dtype_note"] is None


def test_not_a_tensor_still_gets_the_input_error():
    enc, _ = _vgg5_s2(torch.bfloat16)
    with pytest.raises(InvalidInputTypeError):
        ff.linearize(enc, [[1.0, 2.0]])


class _CachedWeights(torch.nn.Module):
    """Keeps a tensor computed from its weights in a plain attribute after the first forward
    (as transformers LeViT's attention_bias_cache does): a non-leaf tensor deepcopy refuses."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.cache = {}

    def forward(self, x):
        if "w" not in self.cache:
            self.cache["w"] = self.conv.weight * 2.0
        return torch.tanh(torch.nn.functional.conv2d(x, self.cache["w"].to(x.dtype)))


def test_float64_copy_of_a_module_with_a_cache():
    """The float64 oracle and dtype=float64 raised "Only Tensors created explicitly by the user
    support the deepcopy protocol" once such a module had run a forward."""
    torch.manual_seed(0)
    enc = _CachedWeights().eval()
    x = torch.rand(2, 3, 6, 6)
    enc(x)  # fills the cache with a non-leaf tensor
    fresh = _CachedWeights().eval()
    fresh.load_state_dict(enc.state_dict())
    want = ff.fsinfo(fresh.double(), x.double(), sigma=0.1, estimator="exact").value
    got = ff.fsinfo(enc, x, sigma=0.1, estimator="exact").value
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    lin = ff.linearize(enc, x, dtype=torch.float64)
    torch.testing.assert_close(lin.exact().fsinfo(0.1).value, want, rtol=0, atol=1e-12)
    assert enc.cache["w"].dtype == torch.float32 and enc.cache["w"].grad_fn is not None
