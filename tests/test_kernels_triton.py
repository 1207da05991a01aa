"""Triton ops (fsinfo_fast.kernels.TritonOps) against the reference TorchOps.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
any kernel module is imported) on tiny shapes whose sizes are not multiples of the block sizes.
Tests marked ``gpu`` need real CUDA tensors and compiled kernels: run them on a GPU machine with
``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_triton.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as Fn

pytest.importorskip("triton", reason="triton is not installed")

from fsinfo_fast.engine.ops import TorchOps, get_ops, ops_availability  # noqa: E402
from fsinfo_fast.errors import InvalidInputError  # noqa: E402
from fsinfo_fast.kernels import TritonOps, availability, interpreting  # noqa: E402

T = TritonOps()
R = TorchOps()

needs_interp = pytest.mark.skipif(
    not interpreting(), reason="CPU kernel tests need TRITON_INTERPRET=1 (set by conftest)"
)

FLOATS = [torch.float32, torch.float64]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- availability / import


_NO_INTERP_SCRIPT = r"""
import os, sys, torch
import fsinfo_fast.kernels as k
assert 'triton' not in sys.modules, 'triton imported at package import'
assert not torch.cuda.is_initialized()
print('IMPORT_OK')
from fsinfo_fast.engine.ops import get_ops, ops_availability
from fsinfo_fast.errors import BackendUnavailableError
print('AVAIL', repr(k.availability('triton')))
print('AVAIL', repr(ops_availability('triton')))
try:
    get_ops('triton')
except BackendUnavailableError as e:
    print('RAISED', str(e).replace(chr(10), ' '))
# the kernels compile for an H100 (sm_90) without a GPU: one configuration of each
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fsinfo_fast.kernels import elementwise as E, maxpool as M, reductions as R, lanczos as L
from fsinfo_fast.kernels import probes as P
i = dict(K='i32', C='i32', F='i32', NS='i32', NFB='i32', LIN='i32', LOUT='i32', NLB='i32', D='i32',
         GMAX='i32', J0='i32', NDB='i32', n='i32', J='i32', NEB='i32', NB='i32', NBB='i32')
f64 = {a: '*fp64' for a in ('W', 'Q', 'QP', 'BP', 'BAS', 'WO', 'TMP', 'A', 'BETA')}
cases = [
    (E._gate_pack_kernel, dict(M='*u8', P='*u8'), dict(BLOCK=512)),
    (E._bcast_kernel, dict(V='*fp32', S='*bf16', O='*fp32'),
     dict(IS_GATE=False, BLOCK_K=8, BLOCK_F=512)),
    (E._bcast_kernel, dict(V='*fp64', S='*u8', O='*fp64'),
     dict(IS_GATE=True, BLOCK_K=8, BLOCK_F=512)),
    (M._maxpool_kernel, dict(X='*fp64', I='*i64', O='*fp64'),
     dict(SCATTER=True, BLOCK_K=8, BLOCK_L=256)),
    (M._maxpool_kernel, dict(X='*fp32', I='*i64', O='*fp32'),
     dict(SCATTER=False, BLOCK_K=8, BLOCK_L=256)),
    (R._sq_accumulate_kernel, dict(G='*fp32', S='*fp64', P='*fp64'), dict(T=2, BLOCK_D=1024)),
    (L._lanczos_step_kernel, f64, dict(NBLK=3, BLOCK_N=64, BLOCK_J=32)),
    (P._probe_kernel, dict(KEYS='*i64', O='*fp32'), dict(GAUSS=True, BLOCK=512)),
]
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except Exception as exc:
    print('COMPILE_SKIP', exc)
    sys.exit(0)
for fn, ptrs, const in cases:
    sig = {a: ptrs.get(a, i.get(a)) for a in fn.arg_names}
    sig.update({a: 'constexpr' for a in const})
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    kern = triton.compile(src, target=GPUTarget('cuda', 90, 32))
    assert kern.asm['ptx']
    print('COMPILED', fn.__name__, ','.join(f'{a}={v}' for a, v in const.items()))
"""


def test_without_interpreter_import_availability_and_sm90_compile():
    """One subprocess without TRITON_INTERPRET: importing the package imports neither triton nor
    CUDA; without a GPU the ops are unavailable with a reason naming the missing GPU (and
    get_ops raises it); every kernel compiles to PTX for sm_90 (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _NO_INTERP_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "IMPORT_OK" in lines
    avail = [eval(line[6:]) for line in lines if line.startswith("AVAIL ")]  # noqa: S307
    assert len(avail) == 2
    for ok, why in avail:
        if torch.cuda.is_available():
            assert ok, why
        else:
            assert ok is False and "GPU" in why and "TRITON_INTERPRET" in why, why
    if not torch.cuda.is_available():
        assert any(line.startswith("RAISED") and "GPU" in line for line in lines), out.stdout
    if not any(line.startswith("COMPILE_SKIP") for line in lines):
        assert sum(line.startswith("COMPILED") for line in lines) == 8, out.stdout


@needs_interp
def test_available_under_interpreter():
    ok, why = availability("triton")
    assert ok and "interpreter" in why
    assert ops_availability("triton")[0]
    assert isinstance(get_ops("triton"), TritonOps)


# ---------------------------------------------------------------- gates and scales


@needs_interp
@pytest.mark.parametrize("f", [37, 16, 1])
def test_gate_pack_matches(f):
    mask = torch.rand(2, f, generator=_gen(f)) > 0.5
    got = T.gate_pack(mask)
    want = R.gate_pack(mask)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(R.gate_unpack(got, f), mask)


def test_gate_pack_rejects_bad_shape():
    with pytest.raises(InvalidInputError):
        T.gate_pack(torch.ones(2, 3, 4, dtype=torch.bool))


@needs_interp
@pytest.mark.parametrize("dtype", FLOATS)
def test_gate_apply_matches(dtype):
    B, K, F = 2, 3, 37
    g = _gen(1)
    V = torch.randn(B, K, F, generator=g, dtype=dtype)
    V[0, 1, 5] = float("nan")  # NaN * 0 stays NaN, as in V * gate
    mask = torch.rand(B, F, generator=g) > 0.4
    packed = R.gate_pack(mask)
    got = T.gate_apply(V, packed)
    want = R.gate_apply(V, packed)
    assert got.dtype == dtype and got.shape == (B, K, F)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_interp
@pytest.mark.parametrize("vdtype", FLOATS)
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_apply_matches(vdtype, sdtype):
    B, K, F = 2, 3, 37
    g = _gen(2)
    V = torch.randn(B, K, F, generator=g, dtype=vdtype)
    s = torch.rand(B, F, generator=g).to(sdtype)
    got = T.scale_apply(V, s)
    want = R.scale_apply(V, s)
    assert got.dtype == vdtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_interp
def test_broadcast_ops_take_noncontiguous_input():
    g = _gen(3)
    V = torch.randn(2, 37, 3, generator=g).transpose(1, 2)  # [2, 3, 37], not contiguous
    s = torch.rand(37, 2, generator=g).t()
    torch.testing.assert_close(T.scale_apply(V, s), R.scale_apply(V, s), rtol=0, atol=0)


# ---------------------------------------------------------------- max-pool


def _pool_case(dtype, k=3, kernel=3, stride=2, seed=4):
    """Real max-pool indices with overlapping windows (kernel 3, stride 2)."""
    g = _gen(seed)
    B, C, H, W = 2, 3, 7, 6
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    _, idx = Fn.max_pool2d(x, kernel, stride, return_indices=True)
    idx = idx.flatten(2)  # [B, C, Lout]
    lin = H * W
    return g, B, C, lin, idx


@needs_interp
@pytest.mark.parametrize("dtype", FLOATS)
def test_maxpool_gather_matches(dtype):
    g, B, C, lin, idx = _pool_case(dtype)
    V = torch.randn(B, 3, C, lin, generator=g, dtype=dtype)
    got = T.maxpool_gather(V, idx)
    want = R.maxpool_gather(V, idx)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_interp
@pytest.mark.parametrize("dtype", FLOATS)
def test_maxpool_scatter_matches_overlapping(dtype):
    g, B, C, lin, idx = _pool_case(dtype)
    # overlapping windows really do share argmaxes here (else the test would not test sums)
    counts = torch.zeros(B, C, lin).scatter_add_(2, idx, torch.ones(idx.shape))
    assert counts.max() >= 2
    U = torch.randn(B, 3, C, idx.shape[-1], generator=g, dtype=dtype)
    got = T.maxpool_scatter(U, idx, lin)
    want = R.maxpool_scatter(U, idx, lin)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # adjoint identity <gather(V), U> == <V, scatter(U)>
    V = torch.randn(B, 3, C, lin, generator=g, dtype=dtype)
    lhs = (T.maxpool_gather(V, idx) * U).sum()
    rhs = (V * got).sum()
    torch.testing.assert_close(lhs, rhs, rtol=tol * 10, atol=tol * 10)


# ---------------------------------------------------------------- probe reduction


@needs_interp
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k,gmax,j0", [(3, 5, 0), (7, 3, 2), (5, 2, 5)])
def test_sq_accumulate_matches(dtype, k, gmax, j0):
    B, d = 2, 37
    g = _gen(10 + k)
    G = torch.randn(B, k, d, generator=g, dtype=dtype)
    sums0 = torch.rand(B, gmax, d, generator=g, dtype=torch.float64)
    s_t, s_r = sums0.clone(), sums0.clone()
    got = T.sq_accumulate(G, s_t, j0)
    want = R.sq_accumulate(G, s_r, j0)
    assert got.dtype == torch.float64 and got.shape == (B, k)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    # group sums: in place and in the same order as index_add_ (bit-identical)
    torch.testing.assert_close(s_t, s_r, rtol=0, atol=0)
    assert not torch.equal(s_t, sums0)


@needs_interp
def test_sq_accumulate_several_blocks_noncontiguous_sums():
    B, K, d, gmax = 2, 4, 4099, 3  # d > the interpreter block: several partial norms
    g = _gen(20)
    G = torch.randn(B, K, d, generator=g)
    base = torch.rand(B, d, gmax, generator=g, dtype=torch.float64)
    s_t = base.clone().transpose(1, 2)  # [B, gmax, d], not contiguous: still updated in place
    s_r = base.clone().transpose(1, 2)
    got = T.sq_accumulate(G, s_t, 1)
    want = R.sq_accumulate(G, s_r, 1)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(s_t, s_r, rtol=0, atol=0)


# ---------------------------------------------------------------- Lanczos


def _lanczos_case(N, n, j, seed):
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, n, j + 1, generator=g, dtype=torch.float64))
    basis = Q[:, :, :j].transpose(1, 2).contiguous()  # [N, j, n] orthonormal rows
    q = basis[:, -1]
    q_prev = Q[:, :, j] if j == 1 else basis[:, -2]
    w = torch.randn(N, n, generator=g, dtype=torch.float64)
    b_prev = torch.rand(N, generator=g, dtype=torch.float64)
    return w, q.contiguous(), q_prev.contiguous(), b_prev, basis


@needs_interp
@pytest.mark.parametrize("j", [1, 2, 5])
def test_lanczos_step_matches(j):
    w, q, qp, bp, basis = _lanczos_case(3, 37, j, seed=30 + j)
    w0 = w.clone()
    a_t, w_t, b_t = T.lanczos_step(w, q, qp, bp, basis)
    a_r, w_r, b_r = R.lanczos_step(w, q, qp, bp, basis)
    assert torch.equal(w, w0)  # input untouched, a new w returned
    for got, want in ((a_t, a_r), (w_t, w_r), (b_t, b_r)):
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # w is orthogonal to the basis afterwards
    assert torch.einsum("njd,nd->nj", basis, w_t).abs().max() < 1e-12


@needs_interp
def test_lanczos_step_several_blocks():
    # n not a multiple of the block and j > 16 so the row is swept in several blocks
    w, q, qp, bp, basis = _lanczos_case(2, 1100, 20, seed=40)
    got = T.lanczos_step(w, q, qp, bp, basis)
    want = R.lanczos_step(w, q, qp, bp, basis)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tridiag_eigh_delegates_and_matches():
    g = _gen(50)
    alpha = torch.randn(3, 6, generator=g, dtype=torch.float64)
    beta = torch.rand(3, 5, generator=g, dtype=torch.float64)
    th, tau = T.tridiag_eigh(alpha, beta)
    th_r, tau_r = R.tridiag_eigh(alpha, beta)
    torch.testing.assert_close(th, th_r, rtol=0, atol=1e-14)
    torch.testing.assert_close(tau, tau_r, rtol=0, atol=1e-14)
    torch.testing.assert_close(tau.sum(1), torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------- in-kernel probes


@needs_interp
@pytest.mark.parametrize("n", [1, 37, 38])
def test_draw_probes_rademacher_bit_identical(n):
    from fsinfo_fast.estimators.probes import draw_probes

    ids = torch.tensor([0, 7, 123456789])
    for dtype in (torch.float64, torch.float32, torch.float16):
        kw = dict(
            seed=2**63 + 5,
            sample_ids=ids,
            start=3,
            count=4,
            kind="rademacher",
            dtype=dtype,
            stream=1,
        )
        got = T.draw_probes(n, **kw)
        assert got.dtype == dtype and got.shape == (3, 4, n)
        assert torch.equal(got, draw_probes(n, **kw))


@needs_interp
@pytest.mark.parametrize("n", [1, 37, 38])
def test_draw_probes_gaussian_within_ulps(n):
    from fsinfo_fast.estimators.probes import draw_probes

    ids = torch.tensor([2, 5])
    kw = dict(seed=11, sample_ids=ids, start=0, count=5, kind="gaussian")
    got = T.draw_probes(n, dtype=torch.float64, **kw)
    want = draw_probes(n, dtype=torch.float64, **kw)
    ulp = torch.finfo(torch.float64).eps * want.abs().clamp_min(1.0)
    assert ((got - want).abs() <= 4 * ulp).all()
    got32 = T.draw_probes(n, dtype=torch.float32, **kw)
    torch.testing.assert_close(got32, want.float(), rtol=2e-7, atol=2e-7)
    # probe j is the same whichever round it is drawn in
    part = T.draw_probes(n, dtype=torch.float64, seed=11, sample_ids=ids[1:], start=2, count=3)
    assert torch.equal(part[0], got[1, 2:])


def test_draw_probes_rejects_bad_arguments():
    ids = torch.tensor([0])
    with pytest.raises(InvalidInputError):
        T.draw_probes(4, seed=0, sample_ids=ids, count=1, kind="uniform")
    with pytest.raises(InvalidInputError):
        T.draw_probes(0, seed=0, sample_ids=ids, count=1)


# ---------------------------------------------------------------- errors and edge cases


@needs_interp
def test_shape_errors_and_empty_inputs():
    with pytest.raises(InvalidInputError):
        T.gate_apply(torch.randn(2, 3, 9), torch.zeros(2, 1, dtype=torch.uint8))  # needs 2 bytes
    with pytest.raises(InvalidInputError):
        T.scale_apply(torch.randn(2, 3, 9), torch.randn(2, 8))
    with pytest.raises(InvalidInputError):
        T.sq_accumulate(torch.randn(2, 3, 4), torch.zeros(2, 2, 4, dtype=torch.float32), 0)
    with pytest.raises(InvalidInputError):
        T.lanczos_step(
            torch.randn(2, 4),
            torch.randn(2, 4),
            torch.randn(2, 4),
            torch.randn(2),
            torch.randn(2, 1, 5),
        )
    empty = T.gate_apply(torch.randn(2, 0, 9), torch.zeros(2, 2, dtype=torch.uint8))
    assert empty.shape == (2, 0, 9)
    norms = T.sq_accumulate(torch.randn(2, 0, 4), torch.zeros(2, 2, 4, dtype=torch.float64), 0)
    assert norms.shape == (2, 0)


# ---------------------------------------------------------------- GPU (compiled kernels)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(),
    reason="needs a CUDA GPU and compiled kernels (run with TRITON_INTERPRET=0)",
)


def _bench(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_ops_match_torchops_realistic(dtype):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, K, C, H, W = 8, 64, 64, 16, 16
    F = C * H * W
    V = torch.randn(B, K, F, device=dev, dtype=dtype)
    mask = torch.rand(B, F, device=dev) > 0.5
    packed = R.gate_pack(mask)
    assert torch.equal(T.gate_pack(mask), packed)
    assert torch.equal(T.gate_apply(V, packed), R.gate_apply(V, packed))
    for sdt in (torch.float16, torch.bfloat16):
        s = torch.rand(B, F, device=dev).to(sdt)
        assert torch.equal(T.scale_apply(V, s), R.scale_apply(V, s))
    x = torch.randn(B, C, 2 * H + 1, 2 * W + 1, device=dev)
    _, idx = Fn.max_pool2d(x, 3, 2, return_indices=True)
    idx = idx.flatten(2)
    lin = x.shape[2] * x.shape[3]
    Vin = torch.randn(B, K, C, lin, device=dev, dtype=dtype)
    assert torch.equal(T.maxpool_gather(Vin, idx), R.maxpool_gather(Vin, idx))
    U = torch.randn(B, K, C, idx.shape[-1], device=dev, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        T.maxpool_scatter(U, idx, lin), R.maxpool_scatter(U, idx, lin), rtol=tol, atol=tol
    )
    s_t = torch.rand(B, 16, F, device=dev, dtype=torch.float64)
    s_r = s_t.clone()
    torch.testing.assert_close(
        T.sq_accumulate(V, s_t, 5), R.sq_accumulate(V, s_r, 5), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(s_t, s_r, rtol=1e-14, atol=0)  # torch's index_add_ uses atomics
    for j in (1, 2, 30):
        w, q, qp, bp, basis = (t.to(dev) for t in _lanczos_case(16, 3072, j, seed=j))
        got = T.lanczos_step(w, q, qp, bp, basis)
        want = R.lanczos_step(w, q, qp, bp, basis)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@gpu
@needs_cuda
def test_gpu_probes_match_draw_probes():
    from fsinfo_fast.estimators.probes import draw_probes

    ids = torch.arange(8, device="cuda") * 3 + 1
    for kind in ("rademacher", "gaussian"):
        kw = dict(seed=123, sample_ids=ids, start=5, count=64, kind=kind, dtype=torch.float64)
        got = T.draw_probes(4097, **kw)
        want = draw_probes(4097, **kw)
        if kind == "rademacher":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@gpu
@needs_cuda
def test_gpu_speed_vs_torchops():
    """Prints the speed of each op against TorchOps (B=8, K=64, F=64*16*16, float32).

    Asserts only that the two clearly fused ops (bit-unpack + multiply; float64 square + group
    add + norm) are not slower than 1.5x TorchOps; the printed ratios are the result for the
    others (scale_apply and maxpool are one torch kernel each already; lanczos_step runs one
    program per row against cuBLAS batched GEMVs)."""
    dev = torch.device("cuda")
    B, K, C, H, W = 8, 64, 64, 16, 16
    F = C * H * W
    V = torch.randn(B, K, F, device=dev)
    packed = R.gate_pack(torch.rand(B, F, device=dev) > 0.5)
    s = torch.rand(B, F, device=dev).half()
    x = torch.randn(B, C, 2 * H, 2 * W, device=dev)
    _, idx = Fn.max_pool2d(x, 3, 2, padding=1, return_indices=True)
    idx = idx.flatten(2)
    lin = 4 * H * W
    Vin = torch.randn(B, K, C, lin, device=dev)
    U = torch.randn(B, K, C, idx.shape[-1], device=dev)
    sums = torch.zeros(B, 8, F, device=dev, dtype=torch.float64)
    w, q, qp, bp, basis = (t.to(dev) for t in _lanczos_case(B * 8, 3072, 30, seed=0))
    cases = {
        "gate_apply": lambda o: o.gate_apply(V, packed),
        "scale_apply": lambda o: o.scale_apply(V, s),
        "maxpool_gather": lambda o: o.maxpool_gather(Vin, idx),
        "maxpool_scatter": lambda o: o.maxpool_scatter(U, idx, lin),
        "sq_accumulate": lambda o: o.sq_accumulate(V, sums, 0),
        "lanczos_step": lambda o: o.lanczos_step(w, q, qp, bp, basis),
    }
    ratios = {}
    for name, fn in cases.items():
        t_ref = _bench(lambda fn=fn: fn(R))
        t_tri = _bench(lambda fn=fn: fn(T))
        ratios[name] = t_ref / t_tri
        print(
            f"{name:16s} torch {t_ref * 1e3:8.3f} ms  triton {t_tri * 1e3:8.3f} ms  "
            f"speed-up {t_ref / t_tri:5.2f}x"
        )
    for name in ("gate_apply", "sq_accumulate"):
        assert ratios[name] > 1 / 1.5, (name, ratios[name])
