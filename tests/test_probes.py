"""Probes: reproducible, batch- and round-independent, with the right moments."""

from __future__ import annotations

import math

import pytest
import torch

from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError
from fsinfo_fast.estimators.probes import draw_probes, resolve_seed


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_same_arguments_bit_identical(kind):
    ids = torch.tensor([0, 3, 9])
    a = draw_probes(17, seed=5, sample_ids=ids, start=2, count=6, kind=kind)
    b = draw_probes(17, seed=5, sample_ids=ids, start=2, count=6, kind=kind)
    assert torch.equal(a, b)
    c = draw_probes(17, seed=6, sample_ids=ids, start=2, count=6, kind=kind)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n", [1, 7, 8])
def test_batch_and_round_independent(kind, n):
    ids = torch.tensor([4, 11, 2, 30])
    full = draw_probes(n, seed=1, sample_ids=ids, start=0, count=10, kind=kind)
    # other batch composition and order
    sub = draw_probes(n, seed=1, sample_ids=torch.tensor([2, 4]), start=0, count=10, kind=kind)
    assert torch.equal(sub[0], full[2]) and torch.equal(sub[1], full[0])
    # split into rounds
    parts = [
        draw_probes(n, seed=1, sample_ids=ids, start=s, count=c, kind=kind)
        for s, c in [(0, 3), (3, 1), (4, 6)]
    ]
    assert torch.equal(torch.cat(parts, dim=1), full)


def test_streams_dims_kinds_and_samples_differ():
    ids = torch.tensor([0, 1])
    base = draw_probes(8, seed=0, sample_ids=ids, count=2)
    assert not torch.equal(base[0], base[1])  # samples
    assert not torch.equal(base[:, 0], base[:, 1])  # probes
    assert not torch.equal(base, draw_probes(8, seed=0, sample_ids=ids, count=2, stream=1))
    assert not torch.equal(base[..., :7], draw_probes(7, seed=0, sample_ids=ids, count=2))


def test_gaussian_moments():
    P = draw_probes(64, seed=3, sample_ids=torch.arange(200), count=50)  # 640k entries
    x = P.flatten()
    n = x.numel()
    se = 1 / math.sqrt(n)
    assert abs(float(x.mean())) < 5 * se
    assert abs(float(x.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((x**3).mean())) < 5 * math.sqrt(15) * se
    assert abs(float((x**4).mean()) - 3) < 5 * math.sqrt(96) * se
    # tail mass beyond 2 sigma: 0.0455
    p = float((x.abs() > 2).double().mean())
    assert abs(p - 0.04550026) < 5 * math.sqrt(0.0455 * 0.9545 / n)
    # entries uncorrelated across coordinates, probes and samples
    C = torch.corrcoef(P.reshape(-1, 64).T)
    assert float((C - torch.eye(64)).abs().max()) < 6 / math.sqrt(P.shape[0] * P.shape[1])
    r = torch.corrcoef(torch.stack([P[:, 0].flatten(), P[:, 1].flatten()]))[0, 1]
    assert abs(float(r)) < 5 / math.sqrt(200 * 64)
    r = torch.corrcoef(torch.stack([P[0::2].flatten(), P[1::2].flatten()]))[0, 1]
    assert abs(float(r)) < 5 / math.sqrt(100 * 50 * 64)
    assert torch.isfinite(P).all()


def test_rademacher_values_and_moments():
    P = draw_probes(33, seed=2, sample_ids=torch.arange(100), count=40, kind="rademacher")
    assert set(P.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(P.mean())) < 5 / math.sqrt(P.numel())
    C = torch.corrcoef(P.reshape(-1, 33).T)
    assert float((C - torch.eye(33)).abs().max()) < 6 / math.sqrt(4000)


def test_dtype_and_generator_seed():
    ids = torch.tensor([0, 1])
    p64 = draw_probes(5, seed=0, sample_ids=ids, count=3)
    p32 = draw_probes(5, seed=0, sample_ids=ids, count=3, dtype=torch.float32)
    assert p32.dtype == torch.float32 and torch.equal(p32, p64.float())
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(
        draw_probes(5, seed=g1, sample_ids=ids, count=3),
        draw_probes(5, seed=g2, sample_ids=ids, count=3),
    )
    assert resolve_seed(-3) == -3  # any int, taken modulo 2^64
    draw_probes(5, seed=-3, sample_ids=ids, count=1)
    draw_probes(5, seed=2**70, sample_ids=ids, count=1)


def test_argument_errors():
    ids = torch.tensor([0])
    with pytest.raises(InvalidInputError, match="kind"):
        draw_probes(3, seed=0, sample_ids=ids, count=1, kind="uniform")
    with pytest.raises(InvalidInputError, match="count"):
        draw_probes(3, seed=0, sample_ids=ids, count=-1)
    with pytest.raises(InvalidInputError, match="n must"):
        draw_probes(0, seed=0, sample_ids=ids, count=1)
    with pytest.raises(InvalidInputError, match="sample_ids"):
        draw_probes(3, seed=0, sample_ids=torch.tensor([0.5]), count=1)
    with pytest.raises(InvalidInputTypeError, match="seed"):
        draw_probes(3, seed=1.5, sample_ids=ids, count=1)
