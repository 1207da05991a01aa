"""The compiled ops (csrc/, fsinfo_fast._C) against the reference TorchOps on the same inputs.

CPU kernels run here; CUDA kernels only on a GPU machine (``gpu`` marker). The CUDA sources are
compile-checked with nvcc where it exists. Everything skips with the reason when the extension is
not built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsinfo_fast.engine import compiled
from fsinfo_fast.engine.ops import TorchOps, get_ops, ops_availability

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

_CPP_OK, _CPP_WHY = compiled.availability("cpp")
needs_cpp = pytest.mark.skipif(not _CPP_OK, reason=f"C++ ops unavailable: {_CPP_WHY}")


def _cuda_ok() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return compiled.availability("cuda")


REF = TorchOps()


@pytest.fixture(scope="module")
def cpp():
    if not _CPP_OK:
        pytest.skip(f"C++ ops unavailable: {_CPP_WHY}")
    return get_ops("cpp")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# Test data (shared by the CPU, opcheck and GPU tests)
# ------------------------------------------------------------------------------------------

B, K, FEAT = 3, 5, 37  # F not a multiple of 8


def _gate_inputs(dtype, device="cpu", seed=0):
    g = _gen(seed)
    mask = torch.rand(B, FEAT, generator=g) > 0.4
    V = torch.randn(B, K, FEAT, generator=g, dtype=torch.float64).to(dtype)
    return mask.to(device), V.to(device)


def _pool_inputs(dtype, device="cpu", seed=0):
    """Indices of a real max-pool with overlapping windows (kernel 3, stride 2)."""
    g = _gen(seed)
    C, H, W = 4, 9, 11
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    y, idx = F.max_pool2d(x, kernel_size=3, stride=2, return_indices=True)
    idx = idx.reshape(B, C, -1)
    lin = H * W
    V = torch.randn(B, K, C, lin, generator=g, dtype=torch.float64).to(dtype)
    U = torch.randn(B, K, C, idx.shape[-1], generator=g, dtype=torch.float64).to(dtype)
    return V.to(device), U.to(device), idx.to(device), lin


def _lanczos_inputs(j, n=37, N=4, dtype=torch.float64, device="cpu", seed=0):
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, n, j + 1, generator=g, dtype=torch.float64))
    Q = Q.transpose(1, 2)  # orthonormal rows
    basis = Q[:, :j].contiguous()
    q = Q[:, j - 1].contiguous()
    q_prev = (Q[:, j - 2] if j >= 2 else torch.zeros(N, n, dtype=torch.float64)).contiguous()
    w = torch.randn(N, n, generator=g, dtype=torch.float64)
    b_prev = torch.rand(N, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (w, q, q_prev, b_prev, basis)]


def _tridiag(kind: str, N: int, k: int, seed=0):
    g = _gen(seed)
    if kind == "random":
        a = torch.randn(N, k, generator=g, dtype=torch.float64)
        b = torch.randn(N, k - 1, generator=g, dtype=torch.float64)
    elif kind == "clustered":  # eigenvalues in tight clusters (Lanczos on a low-rank J^T J)
        centers = torch.tensor([1e-3, 1.0, 5.0], dtype=torch.float64)
        a = centers[torch.randint(0, 3, (N, k), generator=g)]
        a = a + 1e-9 * torch.randn(N, k, generator=g, dtype=torch.float64)
        b = 1e-7 * torch.randn(N, k - 1, generator=g, dtype=torch.float64)
    elif kind == "diagonal":  # beta = 0: already diagonal
        a = torch.randn(N, k, generator=g, dtype=torch.float64)
        b = torch.zeros(N, k - 1, dtype=torch.float64)
    elif kind == "lanczos":  # a genuine Lanczos tridiagonal of an SPD matrix, wide spectrum
        n = max(k, 40)
        lam = torch.logspace(-6, 3, n, dtype=torch.float64)
        a = torch.zeros(N, k, dtype=torch.float64)
        b = torch.zeros(N, k - 1, dtype=torch.float64)
        for r in range(N):
            q = torch.randn(n, generator=g, dtype=torch.float64)
            q /= q.norm()
            Qs = [q]
            qp, bp = torch.zeros(n, dtype=torch.float64), 0.0
            for j in range(k):
                w = lam * q
                a[r, j] = q @ w
                w = w - a[r, j] * q - bp * qp
                Qm = torch.stack(Qs)
                w = w - Qm.T @ (Qm @ w)
                w = w - Qm.T @ (Qm @ w)
                if j < k - 1:
                    bp = w.norm().item()
                    b[r, j] = bp
                    qp, q = q, w / bp
                    Qs.append(q)
    else:
        raise ValueError(kind)
    return a, b


# ------------------------------------------------------------------------------------------
# CPU ops vs the reference
# ------------------------------------------------------------------------------------------


@needs_cpp
def test_gate_pack_matches_reference(cpp):
    mask, _ = _gate_inputs(torch.float32)
    out = cpp.gate_pack(mask)
    assert out.dtype == torch.uint8 and out.shape == (B, (FEAT + 7) // 8)
    assert torch.equal(out, REF.gate_pack(mask))
    assert torch.equal(REF.gate_unpack(out, FEAT), mask)
    # non-contiguous input
    wide = torch.rand(B, 2 * FEAT, generator=_gen(3)) > 0.5
    assert torch.equal(cpp.gate_pack(wide[:, ::2]), REF.gate_pack(wide[:, ::2]))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_apply_matches_reference(cpp, dtype):
    mask, V = _gate_inputs(dtype)
    packed = REF.gate_pack(mask)
    out = cpp.gate_apply(V, packed)
    assert out.dtype == dtype and out.shape == V.shape
    assert torch.equal(out, REF.gate_apply(V, packed))
    assert torch.equal(out, V * mask[:, None, :])  # a wrong bit order would fail here
    Vt = V.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous tangents
    assert torch.equal(cpp.gate_apply(Vt, packed), REF.gate_apply(V, packed))


@needs_cpp
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_scale_apply_matches_reference(cpp, vdtype, sdtype):
    _, V = _gate_inputs(vdtype)
    s = torch.rand(B, FEAT, generator=_gen(1), dtype=torch.float64).to(sdtype)
    out = cpp.scale_apply(V, s)
    assert out.dtype == vdtype and out.shape == V.shape
    torch.testing.assert_close(out, REF.scale_apply(V, s), rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maxpool_gather_scatter_match_reference(cpp, dtype):
    V, U, idx, lin = _pool_inputs(dtype)
    gathered = cpp.maxpool_gather(V, idx)
    assert torch.equal(gathered, REF.maxpool_gather(V, idx))
    scattered = cpp.maxpool_scatter(U, idx, lin)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(scattered, REF.maxpool_scatter(U, idx, lin), rtol=tol, atol=tol)
    # overlapping windows really overlap: some input positions receive several cotangents
    counts = torch.zeros(B, 4, lin, dtype=torch.int64).scatter_add_(2, idx, torch.ones_like(idx))
    assert counts.max() >= 2
    # adjointness: <gather(V), U> == <V, scatter(U)>
    lhs = (gathered.double() * U.double()).sum()
    rhs = (V.double() * scattered.double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_maxpool_rejects_out_of_range_index(cpp):
    V, U, idx, lin = _pool_inputs(torch.float64)
    bad = idx.clone()
    bad[0, 0, 0] = lin
    with pytest.raises(RuntimeError, match="out of range"):
        cpp.maxpool_gather(V, bad)
    with pytest.raises(RuntimeError, match="out of range"):
        cpp.maxpool_scatter(U, bad, lin)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_groups,j0", [(3, 2), (7, 5), (16, 0), (4, -3)])
def test_sq_accumulate_matches_reference(cpp, dtype, n_groups, j0):
    g = _gen(2)
    Kp = 11  # K > Gmax for the small group counts: several probes share a group
    G = torch.randn(B, Kp, FEAT, generator=g, dtype=torch.float64).to(dtype)
    start = torch.rand(B, n_groups, FEAT, generator=g, dtype=torch.float64)
    ours, ref = start.clone(), start.clone()
    norms = cpp.sq_accumulate(G, ours, j0)
    ref_norms = REF.sq_accumulate(G, ref, j0 % n_groups)
    assert norms.dtype == torch.float64 and norms.shape == (B, Kp)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    assert not torch.equal(ours, start)


@needs_cpp
def test_sq_accumulate_non_contiguous_group_sums(cpp):
    G = torch.randn(B, 6, FEAT, generator=_gen(4), dtype=torch.float64)
    base = torch.zeros(FEAT, 4, B, dtype=torch.float64)
    ours = base.permute(2, 1, 0)  # [B, 4, F], not contiguous
    ref = torch.zeros(B, 4, FEAT, dtype=torch.float64)
    norms = cpp.sq_accumulate(G, ours, 1)
    torch.testing.assert_close(norms, REF.sq_accumulate(G, ref, 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(base.permute(2, 1, 0), ref, rtol=1e-12, atol=0)


@needs_cpp
@pytest.mark.parametrize("j", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lanczos_step_matches_reference(cpp, j, dtype):
    w, q, qp, bp, basis = _lanczos_inputs(j, dtype=dtype)
    a, w_new, beta = cpp.lanczos_step(w, q, qp, bp, basis)
    ra, rw, rb = REF.lanczos_step(w, q, qp, bp, basis)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for ours, ref in ((a, ra), (w_new, rw), (beta, rb)):
        assert ours.dtype == dtype and ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    assert not torch.equal(w_new, w)  # a new tensor, the input is untouched
    if dtype == torch.float64:  # the result is orthogonal to the basis
        assert torch.einsum("njd,nd->nj", basis, w_new).abs().max() < 1e-12


@needs_cpp
@pytest.mark.parametrize("kind", ["random", "clustered", "diagonal", "lanczos"])
@pytest.mark.parametrize("k", [1, 2, 30])
def test_tridiag_eigh_matches_eigh(cpp, kind, k):
    N = 6
    a, b = _tridiag(kind, N, k)
    theta, tau = cpp.tridiag_eigh(a, b)
    rtheta, rtau = REF.tridiag_eigh(a, b)
    assert theta.shape == tau.shape == (N, k) and theta.dtype == tau.dtype == torch.float64
    scale = rtheta.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    assert ((theta - rtheta).abs() / scale).max() < 1e-10
    assert (theta[:, 1:] >= theta[:, :-1]).all()
    torch.testing.assert_close(
        tau.sum(dim=1), torch.ones(N, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert (tau >= 0).all()
    if kind in ("random", "diagonal", "lanczos"):  # separated eigenvalues: weights unique
        # eigenvector perturbation ~ eps ||T|| / gap (tiny Ritz values of a wide spectrum)
        d = rtheta.diff(dim=1).abs()
        inf = torch.full((N, 1), float("inf"), dtype=torch.float64)
        gap = torch.minimum(torch.cat([inf, d], 1), torch.cat([d, inf], 1)).clamp_min(1e-300)
        assert ((tau - rtau).abs() <= 1e-10 + 1e-14 * scale / gap).all()
        if kind != "lanczos":
            assert (tau - rtau).abs().max() < 1e-10
    # Gauss quadrature of smooth functions (invariant to rotations inside a cluster)
    for fn in (torch.exp, lambda t: t**2):
        torch.testing.assert_close(
            (tau * fn(theta / scale)).sum(1),
            (rtau * fn(rtheta / scale)).sum(1),
            rtol=1e-10,
            atol=1e-12,
        )


@needs_cpp
@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_tridiag_eigh_extreme_scales_and_split_blocks(cpp, scale):
    g = _gen(7)
    a = torch.randn(8, 50, generator=g, dtype=torch.float64) * scale
    b = torch.randn(8, 49, generator=g, dtype=torch.float64) * scale
    b[:, ::7] = 0  # the matrix splits into independent blocks
    theta, tau = cpp.tridiag_eigh(a, b)
    rtheta, _ = REF.tridiag_eigh(a, b)
    assert torch.isfinite(theta).all() and torch.isfinite(tau).all()
    assert ((theta - rtheta).abs().amax(1) / rtheta.abs().amax(1)).max() < 1e-13
    torch.testing.assert_close(tau.sum(1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)


@needs_cpp
def test_tridiag_eigh_diagonal_weight_sits_on_alpha0(cpp):
    a = torch.tensor([[3.0, -1.0, 2.0, 0.5]], dtype=torch.float64)
    b = torch.zeros(1, 3, dtype=torch.float64)
    theta, tau = cpp.tridiag_eigh(a, b)
    assert torch.equal(theta, torch.tensor([[-1.0, 0.5, 2.0, 3.0]], dtype=torch.float64))
    assert torch.equal(tau, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))


@needs_cpp
def test_tridiag_eigh_non_finite_gives_nan_not_hang(cpp):
    a, b = _tridiag("random", 2, 8)
    a[1, 3] = float("nan")
    theta, tau = cpp.tridiag_eigh(a, b)
    assert torch.isfinite(theta[0]).all() and torch.isnan(theta[1]).all()


@needs_cpp
def test_compiled_ops_reject_bad_input(cpp):
    with pytest.raises(RuntimeError, match="packed"):
        cpp.gate_apply(torch.zeros(2, 3, 9), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpp.scale_apply(torch.zeros(2, 3, 9, dtype=torch.int32), torch.zeros(2, 9))
    with pytest.raises(RuntimeError, match="float64"):
        cpp.sq_accumulate(torch.zeros(2, 3, 9), torch.zeros(2, 2, 9), 0)
    with pytest.raises(RuntimeError, match="beta"):
        cpp.tridiag_eigh(
            torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
        )
    keys = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="keys"):
        torch.ops.fsinfo_fast.probe_uniforms(keys.view(1, 3), 4)
    with pytest.raises(RuntimeError, match="pairs must be >= 0"):
        torch.ops.fsinfo_fast.probe_uniforms(keys, -1)
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        torch.ops.fsinfo_fast.probe_signs(keys, 4, torch.float8_e4m3fn)


# ------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch)
# ------------------------------------------------------------------------------------------


def _opcheck_cases():
    mask, V = _gate_inputs(torch.float32)
    packed = REF.gate_pack(mask)
    Vp, Up, idx, lin = _pool_inputs(torch.float64)
    G = torch.randn(B, 7, FEAT, generator=_gen(5))
    gs = torch.zeros(B, 3, FEAT, dtype=torch.float64)
    a, b = _tridiag("random", 4, 6)
    keys = torch.tensor([0, -1, 2**62 + 3], dtype=torch.int64)
    return [
        ("gate_pack", (mask,)),
        ("gate_apply", (V, packed)),
        ("scale_apply", (V, torch.rand(B, FEAT).to(torch.bfloat16))),
        ("scale_apply", (V.double(), torch.rand(B, FEAT))),
        ("maxpool_gather", (Vp, idx)),
        ("maxpool_scatter", (Up, idx, lin)),
        ("sq_accumulate", (G, gs, 2)),
        ("lanczos_step", tuple(_lanczos_inputs(3))),
        ("tridiag_eigh", (a, b)),
        ("probe_uniforms", (keys, 5)),
        ("probe_signs", (keys, 7, torch.float32)),
        ("probe_signs", (keys, 3, torch.bfloat16)),
        # the linear ops have backward formulas (checked against autograd by gradcheck below)
        ("gate_apply", (V.double().requires_grad_(), packed)),
        (
            "scale_apply",
            (
                V.double().requires_grad_(),
                torch.rand(B, FEAT, dtype=torch.float64, requires_grad=True),
            ),
        ),
        ("maxpool_gather", (Vp.clone().requires_grad_(), idx)),
        ("maxpool_scatter", (Up.clone().requires_grad_(), idx, lin)),
    ]


@needs_cpp
def test_every_registered_op_has_an_opcheck_case():
    assert {name for name, _ in _opcheck_cases()} == set(compiled.OP_NAMES)
    for name in compiled.OP_NAMES:
        assert hasattr(torch.ops.fsinfo_fast, name)


@needs_cpp
@pytest.mark.parametrize("case", range(16))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fsinfo_fast, name).default, args)


@needs_cpp
def test_linear_ops_gradcheck():
    mask, V = _gate_inputs(torch.float64)
    packed = REF.gate_pack(mask)
    Vp, Up, idx, lin = _pool_inputs(torch.float64)
    # small slices keep gradcheck's finite differences cheap
    V = V[:, :1].clone().requires_grad_()
    s = torch.rand(B, FEAT, dtype=torch.float64, requires_grad=True)
    Vp, Up, idx = Vp[:1, :1].clone().requires_grad_(), Up[:1, :1].clone().requires_grad_(), idx[:1]
    ops = torch.ops.fsinfo_fast
    assert torch.autograd.gradcheck(lambda v: ops.gate_apply(v, packed), (V,))
    assert torch.autograd.gradcheck(lambda v, s: ops.scale_apply(v, s), (V, s))
    assert torch.autograd.gradcheck(lambda v: ops.maxpool_gather(v, idx), (Vp,))
    assert torch.autograd.gradcheck(lambda u: ops.maxpool_scatter(u, idx, lin), (Up,))


@needs_cpp
def test_ops_under_torch_compile_match_eager():
    mask, V = _gate_inputs(torch.float32)
    s = torch.rand(B, FEAT, dtype=torch.float16)

    def f(V, mask, s):
        p = torch.ops.fsinfo_fast.gate_pack(mask)
        return torch.ops.fsinfo_fast.scale_apply(torch.ops.fsinfo_fast.gate_apply(V, p) * 2, s)

    compiled_f = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled_f(V, mask, s), f(V, mask, s), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Packaging: availability, lazy loading, nvcc compile check
# ------------------------------------------------------------------------------------------


def test_availability_reports_reason():
    for name in ("cpp", "cuda"):
        ok, why = compiled.availability(name)
        assert isinstance(ok, bool) and isinstance(why, str) and why
        assert ops_availability(name) == (ok, why)
    ok, why = compiled.availability("cuda")
    if not torch.cuda.is_available():
        assert not ok and ("without CUDA" in why or "no CUDA GPU" in why or "not built" in why)


def test_import_does_not_load_extension_or_cuda():
    code = (
        "import sys, fsinfo_fast, fsinfo_fast.engine, fsinfo_fast.engine.ops\n"
        "assert 'fsinfo_fast._C' not in sys.modules, 'import loaded _C'\n"
        "assert 'fsinfo_fast.engine.compiled' not in sys.modules\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "from fsinfo_fast.engine import compiled\n"
        "assert 'fsinfo_fast._C' not in sys.modules, 'compiled loaded _C eagerly'\n"
        "compiled.availability('cpp')\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unavailable_extension_reports_not_built(monkeypatch):
    monkeypatch.setattr(compiled, "_ext", None)
    monkeypatch.setattr(compiled, "_ext_error", None)
    import importlib

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "fsinfo_fast._C":
            raise ModuleNotFoundError("No module named 'fsinfo_fast._C'", name="fsinfo_fast._C")
        return real(name, *a, **k)

    monkeypatch.setattr(compiled.importlib, "import_module", fake_import)
    ok, why = compiled.availability("cpp")
    assert not ok and "not built" in why
    from fsinfo_fast.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="not built"):
        compiled.CppOps()


_NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
)


@pytest.mark.skipif(_NVCC is None, reason="nvcc not found")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    assert sources, "no .cu sources in csrc/cuda"
    for src in sources:
        out = subprocess.run(
            [
                _NVCC,
                "-c",
                "-std=c++17",
                "-arch=sm_90",
                "-O2",
                f"-I{CSRC}",
                "-o",
                str(tmp_path / (src.stem + ".o")),
                str(src),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


def _cuda_include_dir() -> Path | None:
    cands = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if _NVCC:
        cands.append(str(Path(os.path.realpath(_NVCC)).parents[1]))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c) / "include"
    return None


_GXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(
    _NVCC is None or _GXX is None or _cuda_include_dir() is None,
    reason="no nvcc / CUDA headers / C++ compiler",
)
def test_cuda_binding_syntax_checks(tmp_path):
    """The torch side of the CUDA build (ops_cuda.cpp) parses against this torch's headers.

    A CPU wheel of torch ships the c10/cuda headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is enough for a syntax check.
    """
    from torch.utils import cpp_extension

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    real = [Path(p) / "c10/cuda/impl/cuda_cmake_macros.h" for p in cpp_extension.include_paths()]
    if not any(p.exists() for p in real):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    src = (Path(cpp_extension.__file__)).read_text()
    std = "-std=c++20" if "-std=c++20" in src else "-std=c++17"
    cmd = [
        _GXX,
        std,
        "-fsyntax-only",
        f"-I{tmp_path / 'stub'}",
        f"-I{CSRC}",
        f"-I{_cuda_include_dir()}",
    ]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    out = subprocess.run(
        cmd + [str(CSRC / "cuda" / "ops_cuda.cpp")], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-4000:]


# ------------------------------------------------------------------------------------------
# CUDA ops vs the reference (GPU machines)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_ops():
    ok, why = _cuda_ok()
    if not ok:
        pytest.skip(f"CUDA ops unavailable: {why}")
    return get_ops("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_elementwise_ops(cuda_ops, dtype):
    mask, V = _gate_inputs(dtype, "cuda")
    packed = cuda_ops.gate_pack(mask)
    assert torch.equal(packed, REF.gate_pack(mask))
    assert torch.equal(cuda_ops.gate_apply(V, packed), REF.gate_apply(V, packed))
    for sdtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        s = torch.rand(B, FEAT, generator=_gen(1), dtype=torch.float64).to(sdtype).cuda()
        torch.testing.assert_close(
            cuda_ops.scale_apply(V, s), REF.scale_apply(V, s), rtol=0, atol=0
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_maxpool_ops(cuda_ops, dtype):
    V, U, idx, lin = _pool_inputs(dtype, "cuda")
    assert torch.equal(cuda_ops.maxpool_gather(V, idx), REF.maxpool_gather(V, idx))
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(
        cuda_ops.maxpool_scatter(U, idx, lin), REF.maxpool_scatter(U, idx, lin), rtol=tol, atol=tol
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_sq_accumulate(cuda_ops, dtype):
    g = _gen(2)
    G = torch.randn(B, 11, 1000, generator=g, dtype=torch.float64).to(dtype).cuda()
    start = torch.rand(B, 4, 1000, generator=g, dtype=torch.float64).cuda()
    ours, ref = start.clone(), start.clone()
    torch.testing.assert_close(
        cuda_ops.sq_accumulate(G, ours, 6), REF.sq_accumulate(G, ref, 2), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("j", [1, 7])
def test_cuda_lanczos_step(cuda_ops, j):
    args = _lanczos_inputs(j, n=3000, device="cuda")
    for ours, ref in zip(cuda_ops.lanczos_step(*args), REF.lanczos_step(*args), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "clustered", "diagonal", "lanczos"])
@pytest.mark.parametrize("k", [1, 30])
def test_cuda_tridiag_eigh(cuda_ops, kind, k):
    a, b = _tridiag(kind, 6, k)
    theta, tau = cuda_ops.tridiag_eigh(a.cuda(), b.cuda())
    rtheta, rtau = REF.tridiag_eigh(a, b)
    scale = rtheta.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    assert ((theta.cpu() - rtheta).abs() / scale).max() < 1e-10
    torch.testing.assert_close(
        (tau.cpu() * (theta.cpu() / scale).exp()).sum(1),
        (rtau * (rtheta / scale).exp()).sum(1),
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(
        tau.sum(1).cpu(), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.gpu
def test_cuda_opcheck():
    ok, why = _cuda_ok()
    if not ok:
        pytest.skip(f"CUDA ops unavailable: {why}")
    from fsinfo_fast.estimators.probes import _HASH_OPS

    for name, args in _opcheck_cases():
        if name in _HASH_OPS:  # host ops: probes on a GPU are hashed by torch or Triton
            continue
        cargs = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.fsinfo_fast, name).default, cargs)
