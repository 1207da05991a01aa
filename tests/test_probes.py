"""Probes: reproducible, batch- and round-independent, with the right moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fsinfo_fast.errors import BackendUnavailableError, InvalidInputError, InvalidInputTypeError
from fsinfo_fast.estimators import probes
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
    # torch.manual_seed's range; negative seeds are taken modulo 2^64 as there
    assert resolve_seed(-3) == -3
    assert torch.equal(draw_probes(5, seed=-3, sample_ids=ids, count=2),
                       draw_probes(5, seed=2**64 - 3, sample_ids=ids, count=2))
    assert resolve_seed(np.int64(5)) == 5 and resolve_seed(torch.tensor(6)) == 6
    for bad in (2**64, 2**70, -(2**63) - 1):
        with pytest.raises(InvalidInputError, match="seed must lie"):
            resolve_seed(bad)  # would wrap onto another seed silently
    for bad in (True, 1.0, torch.tensor(1.5), "3"):
        with pytest.raises(InvalidInputTypeError, match="seed must be an int"):
            resolve_seed(bad)


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


# ------------------------------------------------------------------------------------------
# The contract pinned, and the C++ hashing path (fsinfo_fast._C) against the pure-torch one
# ------------------------------------------------------------------------------------------

_CPP_OK, _CPP_WHY = probes._cpp_hash_available()
needs_cpp_hash = pytest.mark.skipif(not _CPP_OK, reason=f"C++ probe hashing: {_CPP_WHY}")
HASH_IMPLS = ["torch", pytest.param("cpp", marks=needs_cpp_hash)]


@pytest.fixture
def force_hash(monkeypatch):
    def force(impl):
        monkeypatch.setattr(probes, "_FORCE_HASH", impl)

    return force


@pytest.mark.parametrize("impl", HASH_IMPLS)
def test_pinned_values(impl, force_hash):
    """Values the stored results were computed with (the reproducibility contract).

    Rademacher signs are integer bits (exact anywhere); Gaussian entries go through torch's
    log/cos/sin, which may differ by an ulp on another CPU, hence the 1e-14 relative tolerance.
    """
    force_hash(impl)
    g = draw_probes(5, seed=0, sample_ids=torch.tensor([0, 2**63 - 1]), start=3, count=2)
    want = [
        ["-0x1.4924113f1a417p-1", "-0x1.88691a0bdfc85p+0", "-0x1.77ebf73504635p-1",
         "-0x1.1f31063d41deap-1", "-0x1.49c7a3848748cp-1"],
        ["-0x1.760ff3a30f174p-1", "-0x1.b865b43d1bc89p-3", "-0x1.5e0f277fdea94p-2",
         "-0x1.f135760b32db6p-4", "0x1.489cf6690088ep-1"],
        ["-0x1.e6be823dc0815p-1", "-0x1.613b1fc86a84dp+0", "-0x1.34a95cd45efbbp-2",
         "-0x1.5f97d8eb2f095p-1", "-0x1.316ead703c61cp-1"],
        ["-0x1.10914d8c44a06p-5", "0x1.9891650d24925p-1", "-0x1.b932d5a12103bp-1",
         "0x1.dabe4f7d84502p-1", "0x1.030c765ad6347p+1"],
    ]  # fmt: skip
    want = torch.tensor([[float.fromhex(h) for h in row] for row in want], dtype=torch.float64)
    torch.testing.assert_close(g.reshape(4, 5), want, rtol=1e-14, atol=0)
    r = draw_probes(
        64,
        seed=0,
        sample_ids=torch.tensor([1, -(2**63)]),
        start=1,
        count=2,
        kind="rademacher",
        stream=2,
    )
    rows = r.reshape(4, 64).tolist()
    bits = [int("".join("1" if v < 0 else "0" for v in row), 2) for row in rows]
    assert bits == [0xAB969CB33152CF55, 0xAE6064205727AC24, 0x94C2861C8C9105DE, 0x83A520F93F31CA8F]


def _draw_both(force_hash, n, **kw):
    force_hash("torch")
    a = draw_probes(n, **kw)
    force_hash("cpp")
    b = draw_probes(n, **kw)
    return a, b


def _bit_equal(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


_IDS = [
    torch.tensor([0]),
    torch.tensor([5, 0, 3]),
    # large and negative-looking int64 ids (the hash sees them modulo 2^64)
    torch.tensor([2**63 - 1, -(2**63), -1, 2**62 + 12345, 987654321987]),
]


@needs_cpp_hash
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 33, 256, 1025])
@pytest.mark.parametrize("ids", range(len(_IDS)))
def test_cpp_hash_bit_identical_to_torch(force_hash, kind, n, ids):
    for (start, count), stream, seed, dtype in [
        ((0, 3), 0, 0, torch.float64),
        ((4, 2), 1, -3, torch.float32),
        ((1, 5), 7, 2**64 - 9, torch.float16),
        ((9, 1), 2, 12345, torch.bfloat16),
        ((0, 0), 0, 0, torch.float64),
    ]:
        kw = dict(
            seed=seed,
            sample_ids=_IDS[ids],
            start=start,
            count=count,
            kind=kind,
            dtype=dtype,
            stream=stream,
        )
        a, b = _draw_both(force_hash, n, **kw)
        assert _bit_equal(a, b), (kind, n, ids, start, count, stream, seed, dtype)
        assert a.shape == (len(_IDS[ids]), count, n)


@needs_cpp_hash
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_hash_bit_identical_many_chunks(force_hash, kind, threads):
    """Several hashing chunks, rows split over threads, an odd n: same bits as pure torch."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, count in [(16383, 9), (70001, 2), (3072, 40)]:
            a, b = _draw_both(
                force_hash,
                n,
                seed=4,
                sample_ids=torch.tensor([3, -8]),
                start=2,
                count=count,
                kind=kind,
                dtype=torch.float32,
            )
            assert _bit_equal(a, b), (n, count)
    finally:
        torch.set_num_threads(prev)


@needs_cpp_hash
def test_cpp_hash_other_float_dtypes(force_hash):
    """dtypes the kernels do not write directly (float8) are cast from float64 on both paths."""
    for kind in ("gaussian", "rademacher"):
        a, b = _draw_both(
            force_hash,
            9,
            seed=1,
            sample_ids=torch.tensor([0, 7]),
            count=3,
            kind=kind,
            dtype=torch.float8_e4m3fn,
        )
        assert _bit_equal(a, b)
        force_hash("cpp")
        p64 = draw_probes(9, seed=1, sample_ids=torch.tensor([0, 7]), count=3, kind=kind)
        assert _bit_equal(b, p64.to(torch.float8_e4m3fn))


@needs_cpp_hash
def test_cpp_ops_are_the_torch_hash():
    """probe_uniforms / probe_signs equal _uniform53(_fmix(key + e G)) and its sign bit."""
    keys = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF], dtype=torch.int64)
    pairs = 37
    e1 = (2 * torch.arange(pairs) + 1) * probes._signed(probes._GOLDEN)
    u = torch.ops.fsinfo_fast.probe_uniforms(keys, pairs)
    assert u.shape == (2, 6, pairs) and u.dtype == torch.float64
    assert torch.equal(u[0], probes._uniform53(probes._fmix(keys[:, None] + e1)))
    e2 = e1 + probes._signed(probes._GOLDEN)
    assert torch.equal(u[1], probes._uniform53(probes._fmix(keys[:, None] + e2)))
    assert float(u.min()) > 0 and float(u.max()) < 1
    e = (torch.arange(75) + 1) * probes._signed(probes._GOLDEN)
    neg = probes._fmix(keys[:, None] + e) < 0
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        s = torch.ops.fsinfo_fast.probe_signs(keys, 75, dtype)
        assert s.dtype == dtype and torch.equal(s, torch.where(neg, -1.0, 1.0).to(dtype))
    assert torch.ops.fsinfo_fast.probe_uniforms(keys[:0], 4).shape == (2, 0, 4)
    assert torch.ops.fsinfo_fast.probe_signs(keys, 0, torch.float32).shape == (6, 0)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.fsinfo_fast.probe_uniforms(keys.int(), 4)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fsinfo_fast.probe_signs(keys, 4, torch.int32)


def test_fmix_leaves_its_input_alone():
    z = torch.tensor([1, -2, 2**62], dtype=torch.int64)
    before = z.clone()
    h = probes._fmix(z)
    assert torch.equal(z, before) and not torch.equal(h, z)
    assert [probes._signed(probes._fmix_int(v)) for v in before.tolist()] == h.tolist()


def test_hash_backend_choice(force_hash, monkeypatch):
    name, why = probes.probe_hash_backend("cpu")
    assert name == ("cpp" if _CPP_OK else "torch") and why
    assert probes.probe_hash_backend("meta")[0] == "torch"
    force_hash("torch")
    assert probes.probe_hash_backend("cpu")[0] == "torch"
    force_hash("cpp")
    with pytest.raises(BackendUnavailableError, match="CPU"):
        probes.probe_hash_backend("meta")
    # an extension without the ops (built from older sources): torch path, or an error if forced
    monkeypatch.setattr(probes, "_hash_cpp", (False, "no CPU probe hashing ops"))
    with pytest.raises(BackendUnavailableError, match="no CPU probe hashing ops"):
        probes.probe_hash_backend("cpu")
    force_hash(None)
    assert probes.probe_hash_backend("cpu") == (
        "torch",
        "int64 torch arithmetic (no CPU probe hashing ops)",
    )
    P = draw_probes(6, seed=0, sample_ids=torch.tensor([2]), count=2)  # the torch path runs
    assert P.shape == (1, 2, 6) and torch.isfinite(P).all()
    force_hash("gpu")
    with pytest.raises(InvalidInputError, match="probe hashing"):
        probes.probe_hash_backend("cpu")


def test_info_reports_probe_hash():
    from fsinfo_fast.info import collect

    assert collect()["probe_hash"].startswith("cpp (" if _CPP_OK else "torch (")
