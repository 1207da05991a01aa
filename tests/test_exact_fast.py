"""The fast exact route (``estimator="exact-fast"``) against the float64 oracle (tier B).

One-hot products of the batch's own backend (working dtype, float64 accumulation) must give the
oracle's ``diag(J^T J)`` and trace, on both sides (``d <= m``: JVP columns, ``m < d``: VJP rows),
whatever the chunking, and the oracle's values must lie inside the reported rounding allowance
(a nonzero half-width: the route is not claimed exact to the last bit).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fsinfo_fast as ff
from fsinfo_fast import reference
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import make_products
from fsinfo_fast.estimators.exact_fast import FLOOR_ULPS, exact_fast_fisher
from fsinfo_fast.formulas import sum_rel_bound
from fsinfo_fast.testing import assert_close_verbose

#: The float32 products must agree with the oracle far inside the metric's 0.01 nats/dim.
ACCURACY = 1e-4


def _check_against_oracle(enc, x, lin=None, sigma=0.1):
    lin = lin or ff.linearize(enc, x, seed=0)
    fx = lin.exact_fast()
    # the oracle's forward-mode columns need the math attention kernel (the CPU flash kernel
    # has no forward-mode rule); it computes the same function
    with sdpa_kernel([SDPBackend.MATH]):
        ex = reference.exact_fisher(enc, x, spectrum=False)
    assert fx.side == ("columns" if lin.d <= lin.m else "rows")
    assert fx.passes == min(lin.d, lin.m)
    # every diagonal entry and the trace within the claimed relative allowance
    rel = (fx.diag - ex.diag).abs() / ex.diag.clamp_min(1e-300)
    assert bool((rel <= fx.rel_err[:, None]).all()), (rel.amax(1), fx.rel_err)
    assert bool(((fx.trace - ex.trace).abs() <= fx.rel_err * ex.trace).all())
    assert bool((fx.rel_err > 0).all())  # never claims exactness
    for r, o in ((lin.fsinfo(sigma, estimator="exact-fast"), ex.fsinfo(sigma)),
                 (lin.dfil(sigma, estimator="exact-fast"), ex.dfil(sigma))):
        assert r.estimator == "exact-fast" and bool((r.stderr == 0).all())
        lo, hi = r.ci95()
        assert bool(((lo <= o.value) & (o.value <= hi)).all()), (r.metric, r.value, o.value)
        assert bool((r.ci_halfwidth > 0).all()) and torch.equal(r.ci_halfwidth, r.bias_bound)
    fs = lin.fsinfo(sigma, estimator="exact-fast")
    assert float((fs.value - ex.fsinfo(sigma).value).abs().max()) <= ACCURACY
    assert float(fs.ci_halfwidth.max()) <= 1e-3  # useful: far below atol 0.01
    return fx


@pytest.mark.parametrize("name", ["linear_m>d", "tanh_mlp_m<d", "tanh_mlp_m>d",
                                  "cnn_bn_maxpool_m<d", "cnn_bn_maxpool_m>d", "residual_m=d",
                                  "attention_m=d"])
def test_exact_fast_matches_the_oracle_on_the_zoo(zoo, name):
    model, x = zoo[name]
    _check_against_oracle(model, x)


def test_exact_fast_on_paper_zoo_model_both_sides():
    from fsinfo_fast.models import vgg5

    torch.manual_seed(0)
    model = vgg5().eval()
    x = torch.rand(2, 3, 8, 8)
    assert _check_against_oracle(ff.split(model, 0), x).side == "columns"  # m = 2048 > d = 192
    x = torch.rand(1, 3, 32, 32)  # split 5 (the first linear layer): m = 128 < d = 3072
    assert _check_against_oracle(ff.split(model, 5), x).side == "rows"


def test_tiny_memory_budget_gives_the_same_answer(zoo):
    model, x = zoo["cnn_bn_maxpool_m<d"]
    for name in ("cnn_bn_maxpool_m<d", "tanh_mlp_m>d"):
        model, x = zoo[name]
        big = ff.linearize(model, x, seed=0).exact_fast()
        tiny = ff.linearize(model, x, seed=0, memory_budget=1).exact_fast()
        assert tiny.info["exact_fast_chunk"] == 1 and big.info["exact_fast_chunk"] > 1
        assert_close_verbose(tiny.diag, big.diag, rtol=1e-6, atol=0)
        assert torch.equal(tiny.checked, big.checked)


def test_transformers_model_both_sides():
    pytest.importorskip("transformers")
    from fsinfo_fast.models.third_party import build

    g = torch.Generator().manual_seed(0)
    vit = build("vit", size=16)  # 3x16x16 -> 5 tokens x 32: m = 160 < d = 768
    x = torch.rand(1, 3, 16, 16, generator=g)
    assert _check_against_oracle(ff.split(vit, "layers.0"), x).side == "rows"
    small = build("vit", size=8, patch_size=4, num_channels=1)  # d = 64 < m = 5 x 32
    x = torch.rand(2, 1, 8, 8, generator=g)
    assert _check_against_oracle(ff.split(small, "layers.0"), x).side == "columns"


def test_auto_uses_the_fast_route_not_the_oracle():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh()).eval()
    x = torch.rand(2, 1, 6, 6)  # d = 36: the exact route's 36 products beat 40+ probes
    lin = ff.linearize(enc, x, seed=0)
    r = lin.fsinfo(0.1, atol=1e-4, max_probes=20)  # cannot converge: auto finishes exactly
    assert r.estimator == "exact-fast" and "fast exact route" in r.info["auto"]
    assert "did not reach the tolerance" in r.info["auto"]
    # the products spent before the switch: counted, within the cap (the deflated route's
    # pilot included), and no more once the tolerance is predicted out of reach
    assert 0 < r.info["auto_randomized_passes"] <= 20
    assert lin._exact is None  # the float64 oracle never ran
    d = lin.dfil(0.1)  # the exact quantities are there: dFIL reads them
    assert d.estimator == "exact-fast" and "already computed" in d.info["auto"]
    ex = reference.exact_fisher(enc, x, spectrum=False)
    for res, o in ((r, ex.fsinfo(0.1)), (d, ex.dfil(0.1))):
        assert bool(((res.value - o.value).abs() <= res.ci_halfwidth).all())
    s = lin.fsinfo_sigma(-1.0)
    assert s.estimator == "exact-fast"
    exact_sigma = ex.fsinfo_sigma(-1.0, floor=0.0).sigma
    assert bool(((s.ci_low <= exact_sigma) & (exact_sigma <= s.ci_high)).all())
    # once the oracle is there, auto reads it (it is exact and free)
    lin.exact()
    assert lin.fsinfo(0.1).estimator == "exact"


def test_the_allowance_measures_a_rounding_error():
    """A fast route whose products are off by a relative 1e-3 must report an allowance that
    covers it (the float64 check columns see the error)."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh()).eval()
    x = torch.randn(2, 10)
    p = make_products(prepare(enc, x), "torch")
    check = make_products(prepare(enc, x, dtype=torch.float64), "torch")

    class Off:
        batch, d, m, dtype, device, backend = p.batch, p.d, p.m, p.dtype, p.device, "off"

        def jvp(self, V):
            return p.jvp(V) * (1 + 1e-3)

    fx = exact_fast_fisher(Off(), check_products=check, seed=0)
    ex = reference.exact_fisher(enc, x, spectrum=False)
    true_rel = ((fx.diag - ex.diag).abs() / ex.diag).amax(1)
    assert bool((true_rel > 1e-3).all())
    assert bool((fx.measured >= 0.9 * true_rel).all()) and bool((fx.rel_err >= true_rel).all())
    plain = exact_fast_fisher(p, check_products=check, seed=0)
    u = torch.finfo(torch.float32).eps / 2
    assert bool((plain.rel_err < 1e-4).all()) and bool((plain.rel_err >= FLOOR_ULPS * u).all())


def test_errors():
    enc = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).eval()
    x = torch.randn(2, 6)
    with pytest.raises(ff.InvalidInputError, match="spectrum"):
        ff.fsinfo(enc, x, variant="logdet", prior_var=1.0, estimator="exact-fast")
    with pytest.raises(ff.InvalidInputError, match="estimator"):
        ff.fsinfo(enc, x, estimator="fast")
    p = make_products(prepare(enc, x), "torch")
    with pytest.raises(ff.InvalidInputError, match="float64 check"):
        exact_fast_fisher(p, check_products=None)
    other = make_products(prepare(enc, x[:1], dtype=torch.float64), "torch")
    with pytest.raises(ff.InvalidInputError, match="do not match"):
        exact_fast_fisher(p, check_products=other)
    # a float64 encoder needs no check products: its allowance is the float64 floor, plus the
    # float64 sums' bound (m squares an entry, d entries the trace)
    enc64 = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).double().eval()
    fx = exact_fast_fisher(make_products(prepare(enc64, x.double()), "torch"),
                           check_products=None)
    assert fx.check_passes == 0
    want = FLOOR_ULPS * torch.finfo(torch.float64).eps / 2 + sum_rel_bound(4 + 6 + 1)
    assert bool((fx.rel_err == want).all())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("shape", "dtype"), [((3, 5, 7), torch.float32),
                                              ((2, 4, 300_000), torch.float32),
                                              ((7, 300_000), torch.float32),
                                              ((2, 3_211_264), torch.float32),
                                              ((6, 1), torch.float64),
                                              ((0, 9), torch.float32)])
def test_square_sum64_is_the_whole_float64_sum(shape, dtype, threads):
    """The blocked float64 sum of squares gives the same bits as converting the whole tensor,
    at 1 and 2 threads: rows of 300,000 entries (3 rows per 8 MiB block; a 1-row tail joins
    the block before it), rows of over 2^20 entries (VGG ``features.0`` at 224 px: one row
    per 8 MiB; blocks of at least as many rows as threads, else torch splits a row across
    threads, other bits); a float64 input is left unchanged."""
    from fsinfo_fast.estimators.base import square_sum64

    assert torch.equal(square_sum64(torch.tensor(3.0)), torch.tensor(9.0, dtype=torch.float64))
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    before = t.clone()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = t.to(torch.float64).square().sum(dim=-1)
        got = square_sum64(t)
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert torch.equal(got, want)
        assert torch.equal(t, before)
        # non-contiguous with the last dimension contiguous (a batch-first view of products
        # computed probe-first, as the engine returns them): the same bits
        nc = t.transpose(0, 1) if t.ndim > 2 else t[::2]
        assert torch.equal(square_sum64(nc), nc.to(torch.float64).square().sum(dim=-1))
        # a strided last dimension is summed in another order: equal to float64 rounding
        tr = t.transpose(0, -1)
        assert_close_verbose(square_sum64(tr), tr.to(torch.float64).square().sum(dim=-1),
                             rtol=1e-13, atol=0)
    finally:
        torch.set_num_threads(old)


def test_cpu_chunks_stay_small_whatever_the_budget(monkeypatch):
    """On the CPU a chunk's one-hot probes and products stay within ``CPU_CHUNK_BYTES``
    (fresh pages above the allocator's mmap threshold cost more than the products there);
    elsewhere the budget alone sizes them. On the columns side (``d <= m``) each column's
    squares are summed whole: the same bits here at any chunking (where a backend's float32
    products depend on the number of probes per call, they move within the rounding
    allowance); on the rows side each chunk's float64 sum is added, so the chunking groups
    the additions (equal to float64 rounding)."""
    from fsinfo_fast.estimators import exact_fast

    cs = exact_fast._chunk_size
    big = 1 << 40
    assert cs(3072, 32, 3072, 65536, 4, big, torch.device("cpu")) == 1
    assert cs(3072, 1, 3072, 4096, 4, big, torch.device("cpu")) == (8 << 20) // (4 * 7168)
    assert cs(3072, 32, 3072, 65536, 4, big, torch.device("cuda")) == 3072
    assert cs(3072, 32, 3072, 65536, 4, 1000, torch.device("cpu")) == 1
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh()).eval()
    x = torch.rand(3, 3, 8, 8)
    diags = []
    for cap in (1 << 62, 8 << 20, 1):
        monkeypatch.setattr(exact_fast, "CPU_CHUNK_BYTES", cap)
        fx = ff.linearize(enc, x, seed=0).exact_fast()
        diags.append(fx.diag)
    assert fx.info["exact_fast_chunk"] == 1 and fx.side == "columns"
    assert torch.equal(diags[0], diags[1]) and torch.equal(diags[0], diags[2])
    rows = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.Tanh()).eval()
    x = torch.randn(5, 300)
    got = []
    for cap in (1 << 62, 1):
        monkeypatch.setattr(exact_fast, "CPU_CHUNK_BYTES", cap)
        fx = ff.linearize(rows, x, seed=0).exact_fast()
        got.append(fx.diag)
    assert fx.side == "rows" and fx.info["exact_fast_chunk"] == 1
    assert_close_verbose(got[1], got[0], rtol=1e-14, atol=0)
