"""Low-rank Jacobians: a bottleneck or dead ReLUs give ``rank(J)`` below the deflated sketch's.

Two defects were found on such encoders with the defaults: a conv+ReLU layer whose live outputs
span 43-52 of its 144 dimensions made the sketch raise ``FloatingPointError`` (it could not
orthogonalise more columns than the range holds), and on a bottleneck the sketch held the whole
range, the remainder's probe noise vanished and the intervals (about 5e-12 nats/dim) claimed far
more than the float32 products give (values 1.5e-8 off the oracle: 3000 half-widths; dFIL 1e6).
Now the sketch completes a rank-deficient block with directions outside the range
(:func:`~fsinfo_fast.estimators.deflated._complete`) and every randomized FSInfo_diag and dFIL
interval counts the products' rounding (:func:`fsinfo_fast.linearization.rounding_allowance`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast import reference
from fsinfo_fast.estimators.deflated import _orth_against
from fsinfo_fast.estimators.exact_fast import FLOOR_ULPS
from fsinfo_fast.linearization import rounding_allowance


def _encoder(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "dead-relu":  # rank 52 and 43 of m = 144 (d = 192)
        enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
        return enc, torch.rand(2, 3, 8, 8)
    x = torch.rand(2, 3, 8, 8)
    r = int(kind.split("-")[1])  # bottleneck of width r: rank r (d = 192, m = 160)
    torch.manual_seed(r)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, r), nn.Tanh(), nn.Linear(r, 160)).eval(), x


@pytest.mark.parametrize("kind", ["dead-relu", "bottleneck-8", "bottleneck-20", "bottleneck-30"])
def test_defaults_on_low_rank_jacobians_cover_the_oracle(kind):
    enc, x = _encoder(kind)
    ex = ff.linearize(enc, x).exact()
    want_f, want_d = ex.fsinfo(0.1).value, ex.dfil(0.1).value
    rank = torch.linalg.matrix_rank(reference.jacobian(enc, x))  # [B]
    for seed in range(3):
        lin = ff.linearize(enc, x, seed=seed)
        f = lin.fsinfo(0.1, estimator="deflated")
        # at least one sample's sketch outgrows the range of its J (the path that failed)
        assert f.info["diag_method"] == "deflated"
        assert bool((torch.tensor(f.info["rank"]) > rank).any()), (f.info["rank"], rank)
        # the defaults (auto: deflated or the fast exact route, whichever is cheaper)
        auto = ff.linearize(enc, x, seed=seed)
        for r, want in ((f, want_f), (auto.fsinfo(0.1), want_f), (auto.dfil(0.1), want_d)):
            assert bool(((r.value - want).abs() <= r.ci_halfwidth).all()), (
                r.metric, r.estimator, (r.value - want).abs() / r.ci_halfwidth)
            assert bool((r.bias_bound > 0).all())
        eps = f.info["rounding_allowance"]
        assert eps == FLOOR_ULPS * torch.finfo(torch.float32).eps / 2


def test_a_sample_alone_gets_its_batch_result():
    enc, x = _encoder("dead-relu")
    both = ff.linearize(enc, x, seed=1).fsinfo(0.1, estimator="deflated")
    for i in range(2):
        alone = ff.linearize(enc, x[i:i + 1], seed=1, sample_ids=torch.tensor([i])).fsinfo(
            0.1, estimator="deflated")
        torch.testing.assert_close(alone.value, both.value[i:i + 1], rtol=1e-9, atol=1e-9)
        assert alone.info["rank"] == [both.info["rank"][i]]


def _orth(full):
    return float((full.transpose(1, 2) @ full - torch.eye(full.shape[2],
                                                           dtype=full.dtype)).abs().max())


def test_orth_against_completes_a_block_that_lies_in_the_span():
    g = torch.Generator().manual_seed(0)
    m = 30
    live = torch.zeros(m, dtype=torch.bool)
    live[:10] = True  # a range of dimension 10 (the other coordinates are dead outputs)
    A = torch.randn(1, m, 12, generator=g, dtype=torch.float64) * live[None, :, None]
    Q = torch.linalg.qr(A[:, :, :8]).Q  # 8 held columns
    Y = A @ torch.randn(1, 12, 6, generator=g, dtype=torch.float64)  # only 2 new directions
    Qn = _orth_against(Q, Y, 1e-12)
    assert Qn.shape == (1, m, 6) and _orth(torch.cat([Q, Qn], dim=2)) < 1e-12
    # the new directions of the range come first, the rest lies outside it (dead coordinates)
    proj = Y - Q @ (Q.transpose(1, 2) @ Y)
    span = torch.linalg.qr(proj).Q[:, :, :2]
    got = Qn[:, :, :2]
    assert float((got @ got.transpose(1, 2) - span @ span.transpose(1, 2)).abs().max()) < 1e-9
    assert float(Qn[0, :10, 2:].abs().max()) < 1e-12


def test_orth_against_leaves_a_full_rank_block_as_it_was():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 40, 20, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(A[:, :, :8]).Q
    Y = A[:, :, 8:]
    proj = Y - Q @ (Q.transpose(1, 2) @ Y)
    proj = proj - Q @ (Q.transpose(1, 2) @ proj)
    want = torch.linalg.qr(proj).Q
    want = torch.linalg.qr(want - Q @ (Q.transpose(1, 2) @ want)).Q
    assert torch.equal(_orth_against(Q, Y, 1e3 * torch.finfo(torch.float32).eps), want)


def test_rounding_allowance():
    v = torch.tensor([0.5, -1.0], dtype=torch.float64)
    eps = FLOOR_ULPS * torch.finfo(torch.float32).eps / 2
    f, e = rounding_allowance("fsinfo_diag", v, torch.float32)
    assert e == eps and torch.allclose(f, torch.full_like(v, -math.log1p(-eps) / 2))
    d, _ = rounding_allowance("dfil", v, torch.float64)
    assert torch.allclose(d, FLOOR_ULPS * torch.finfo(torch.float64).eps / 2 * v.abs())
    z, e0 = rounding_allowance("fsinfo_logdet", v, torch.float32)
    assert e0 == 0.0 and not bool(z.any())
