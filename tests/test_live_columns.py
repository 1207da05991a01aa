"""The fast exact route on the input dimensions that reach the output (tier B).

An encoder that never sees some input dimensions (a crop, a strided 1x1 convolution that skips
pixels, a ReLU on the input that is off for this sample) has zero columns in ``J``. The
validation's VJP of a seeded Gaussian cotangent is zero exactly there
(:attr:`~fsinfo_fast.encoder.PreparedEncoder.live`); the fast exact route then computes only the
other columns, after one JVP on the zero-marked ones came back exactly 0, and ``auto`` weighs
that smaller cost. A crop keeping 3 of 300 inputs made the adaptive Rademacher trace undercover
(a 4-atom per-probe law: 0.85-0.89, ``converged=True``); it is now exact in 4 products.
"""

from __future__ import annotations

import math

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast import reference
from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators.exact_fast import exact_fast_fisher, exact_products
from fsinfo_fast.testing import coupled_columns_linear


class Crop(torch.nn.Module):
    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, z):
        return z[:, : self.keep]


def _crop_encoder(keep=3, d_out=200):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(keep, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, keep, generator=g) / math.sqrt(keep))
    return torch.nn.Sequential(Crop(keep), lin).eval()


def _inside(r, truth):
    lo, hi = r.ci95()
    return bool(((lo <= truth) & (truth <= hi)).all())


def test_crop_of_three_inputs_takes_the_exact_route_on_its_columns():
    enc = _crop_encoder()
    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(1))
    ex = reference.exact_fisher(enc, x, spectrum=False)
    n = 200
    xs = x.expand(n, 300).clone()
    r = ff.dfil(enc, xs, sigma=0.1, rtol=0.05, sample_ids=torch.arange(n))
    assert r.estimator == "exact-fast", r.info
    assert "297 of 300 input dimensions do not reach the output" in r.info["exact_fast_live"]
    assert "the 3 input dimensions that reach the output" in r.info["auto"]
    # 3 one-hot JVPs + the zero check, + its float64 twin (an underflow gives exact zeros in
    # float32 too) + the float64 check of those 3 columns
    assert r.passes == 4 + 1 + 3
    assert _inside(r, ex.dfil(0.1).value) and bool((r.ci_halfwidth > 0).all())
    f = ff.fsinfo(enc, x, sigma=0.1)
    assert f.estimator == "exact-fast" and _inside(f, ex.fsinfo(0.1).value)
    # floorless: the 297 unseen dimensions make it -inf exactly, as the oracle says
    f0 = ff.fsinfo(enc, x, sigma=0.1, floor=0.0, estimator="exact-fast")
    assert bool(torch.isneginf(f0.value).all()) and bool(torch.isneginf(ex.fsinfo(0.1,
                                                                                floor=0.0).value).all())


def test_per_sample_supports_and_the_union():
    """A ReLU on the input: each sample reaches the output through its own positive entries;
    the union's columns are computed for every sample, each sample's zeros stay exact."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 6, generator=g)

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.clone())

        def forward(self, z):
            return torch.tanh(torch.relu(z[:, :6]) @ self.w.T)

    enc = Gate().eval()
    x = torch.randn(4, 120, generator=torch.Generator().manual_seed(3))
    lin = ff.linearize(enc, x)
    fx = lin.exact_fast()
    union = int((x[:, :6] > 0).any(dim=0).sum())
    assert fx.passes == union + 1 and "exact_fast_live" in fx.info
    ex = reference.exact_fisher(enc, x, spectrum=False)
    rel = (fx.diag - ex.diag).abs() / ex.diag.clamp_min(1e-300)
    assert bool((rel <= fx.rel_err[:, None]).all())
    assert torch.equal(fx.diag == 0, ex.diag == 0)  # the same zeros, per sample


def test_strided_convolution_that_skips_pixels():
    """A 1x1 convolution with stride 2 sees a quarter of the pixels: 64 of 256 columns."""
    torch.manual_seed(4)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 1, stride=2), torch.nn.Tanh(),
                              torch.nn.Flatten()).eval()
    x = torch.randn(2, 1, 16, 16)
    lin = ff.linearize(enc, x)
    assert exact_products(lin.enc.live, lin.d, lin.m) == 64 + 1 < min(lin.d, lin.m)
    r = lin.dfil(0.1, estimator="exact-fast")
    f = lin.fsinfo(0.1, estimator="exact-fast")
    ex = reference.exact_fisher(enc, x, spectrum=False)
    assert r.passes == 65 + 1 + 16 and _inside(r, ex.dfil(0.1).value)  # (+1: float64 zero check)
    assert _inside(f, ex.fsinfo(0.1).value)


def test_a_wrong_live_mask_is_caught_and_every_column_computed():
    """The mask is a hint: where a column marked dead reaches the output, the check JVP sees
    it and the route computes every column (and says so)."""
    J = torch.randn(2, 30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    J[:, :, 10:] = 0  # columns 10.. are really zero
    live = torch.zeros(2, 20, dtype=torch.bool)
    live[:, :5] = True  # but 5..9 are not zero: the mask is wrong
    fx = exact_fast_fisher(DenseProducts(J), check_products=None, live=live)
    assert "do reach the output" in fx.info["exact_fast_live"]
    assert fx.passes == 20 + 1
    assert torch.allclose(fx.diag, (J**2).sum(dim=1))
    live[:, 5:10] = True  # the right mask: 10 columns + the check
    fx = exact_fast_fisher(DenseProducts(J), check_products=None, live=live)
    assert fx.passes == 11 and "10 of 20 input dimensions" in fx.info["exact_fast_live"]
    assert torch.allclose(fx.diag, (J**2).sum(dim=1))


@pytest.mark.parametrize("keep", [12, 40])
def test_auto_caps_its_probes_at_the_live_route(keep):
    """More live columns than the first round: ``auto`` caps the randomized estimate at the
    live route's products (``keep + 1``, not ``min(m, d) = 200``), predicts it would need more,
    and takes the live route."""
    enc = _crop_encoder(keep=keep)
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(6))
    ex = reference.exact_fisher(enc, x, spectrum=False)
    r = ff.dfil(enc, x, sigma=0.1)
    assert r.estimator == "exact-fast", r.info
    assert f"more than its probe cap {keep + 1}" in r.info["auto"]
    assert r.passes == keep + 1 + 1 + min(16, keep)  # (the zero check in float32 and float64)
    assert _inside(r, ex.dfil(0.1).value)


def test_exact_columns_keep_the_trace_unbiased():
    """Hutchinson with a few columns computed exactly: unbiased over 400 seeds (the columns are
    chosen before the probes), every sample with its own columns."""
    from fsinfo_fast.estimators import hutchinson_trace
    from fsinfo_fast.testing import unbiasedness_z

    g = torch.Generator().manual_seed(7)
    J = torch.randn(2, 30, 20, dtype=torch.float64, generator=g)
    J[0, :, :3] *= 10  # sample 0: 3 dominant columns
    cols = torch.zeros(2, 20, dtype=torch.bool)
    cols[0, :3] = True
    cols[1, [4, 9]] = True  # sample 1: any fixed choice is unbiased too
    truth = (J**2).sum(dim=(1, 2))
    est = torch.stack([hutchinson_trace(DenseProducts(J), side="input", kind="rademacher",
                                        seed=s, num_probes=4, exact_columns=cols).value
                       for s in range(400)])
    for b in range(2):
        assert abs(unbiasedness_z(est[:, b], truth[b])) < 4
    r = hutchinson_trace(DenseProducts(J), side="input", kind="rademacher", seed=0,
                         num_probes=4, exact_columns=cols)
    assert r.passes == 4 + 3 and r.info["exact_columns"] == [3, 2]
    with pytest.raises(ff.InvalidInputError, match=r"\[B, d\]"):
        hutchinson_trace(DenseProducts(J), side="input", num_probes=4, exact_columns=cols[0])
    with pytest.raises(ff.InvalidInputError, match="side='input'"):
        hutchinson_trace(DenseProducts(J), side="output", num_probes=4, exact_columns=cols)


def test_image_encoders_take_no_dominant_columns(zoo):
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.estimators.hutchinson import dominant_columns

    for name in ("cnn_bn_maxpool_m<d", "cnn_bn_maxpool_m>d", "attention_m=d"):
        model, x = zoo[name]
        assert not bool(dominant_columns(prepare(model, x).seen).any()), name


def test_dominant_columns_do_not_depend_on_the_batching():
    """The dominant columns are chosen from a VJP of a cotangent drawn per sample id, so a
    sample's dFIL is the same in a batch, in the reversed batch and alone (the validation's
    cotangent, seeded by batch position, made it depend on the batching). Equal up to float32
    rounding (a batch of 1 and of 6 may take different matmul kernels) with the same columns
    and the same probe counts."""
    d = 300
    enc = coupled_columns_linear(3, 0.01, d)
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(1)).expand(6, d).contiguous()
    ids = torch.arange(100, 106)
    kw = dict(estimator="randomized", method="hutchinson", rtol=0.05)
    base = ff.linearize(enc, x, sample_ids=ids).dfil(1.0, **kw)
    perm = torch.arange(5, -1, -1)
    rev = ff.linearize(enc, x[perm], sample_ids=ids[perm]).dfil(1.0, **kw)
    torch.testing.assert_close(rev.value, base.value[perm], rtol=1e-5, atol=0)
    assert torch.equal(rev.probes_per_sample, base.probes_per_sample[perm])
    assert [base.info["exact_columns"][i] for i in perm.tolist()] == rev.info["exact_columns"]
    assert any(base.info["exact_columns"])  # the case takes exact columns at all
    for i in range(6):
        alone = ff.linearize(enc, x[i:i + 1], sample_ids=ids[i:i + 1]).dfil(1.0, **kw)
        torch.testing.assert_close(alone.value, base.value[i:i + 1], rtol=1e-5, atol=0)
        assert torch.equal(alone.probes_per_sample, base.probes_per_sample[i:i + 1])
        assert alone.info["exact_columns"] == [base.info["exact_columns"][i]]

