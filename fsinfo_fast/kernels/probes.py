"""In-kernel generation of the project's counter-based splitmix64 probes.

The same numbers as :func:`fsinfo_fast.estimators.probes.draw_probes` (the per-(sample, probe)
keys are computed by that module's own integer code, ``B * count`` values; the kernel hashes the
entries, the bulk of the work): Rademacher probes are bit-identical; Gaussian ones use the same
53-bit uniforms and Box-Muller formula in float64, so they agree to a few ulps (``log``, ``cos``,
``sin`` are the device's libm / numpy's under the interpreter).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InvalidInputError
from ..estimators import probes as _p
from . import interpreting
from ._common import cdiv, check_device


@triton.jit
def _fmix64(z):
    """splitmix64 finaliser on uint64 (wrap-around arithmetic, logical shifts)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _probe_kernel(KEYS, O, n, NEB, GAUSS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // NEB).to(tl.int64)
    blk = pid % NEB
    key = tl.load(KEYS + row).to(tl.uint64, bitcast=True)
    golden = tl.full([], 0x9E3779B97F4A7C15, tl.uint64)
    if GAUSS:
        # BLOCK pairs -> 2 * BLOCK entries
        p = blk * BLOCK + tl.arange(0, BLOCK)
        e1 = (2 * p.to(tl.uint64) + 1) * golden
        h1 = _fmix64(key + e1)
        h2 = _fmix64(key + e1 + golden)
        scale = tl.full([], 2.0**-53, tl.float64)
        u1 = ((h1 >> 11).to(tl.float64) + 0.5) * scale
        u2 = ((h2 >> 11).to(tl.float64) + 0.5) * scale
        r = tl.sqrt(-2.0 * tl.log(u1))  # fp64 sqrt is correctly rounded (sqrt_rn is fp32-only)
        theta = tl.full([], 2.0 * math.pi, tl.float64) * u2
        z0 = r * tl.cos(theta)
        z1 = r * tl.sin(theta)
        out = O + row * n + 2 * p
        tl.store(out, z0.to(O.dtype.element_ty), mask=2 * p < n)
        tl.store(out + 1, z1.to(O.dtype.element_ty), mask=2 * p + 1 < n)
    else:
        e = blk * BLOCK + tl.arange(0, BLOCK)
        h = _fmix64(key + (e.to(tl.uint64) + 1) * golden)
        neg = (h >> 63) != 0
        v = tl.where(neg, -1.0, 1.0)
        tl.store(O + row * n + e, v.to(O.dtype.element_ty), mask=e < n)


def draw_probes(
    n: int,
    *,
    seed,
    sample_ids: Tensor,
    start: int = 0,
    count: int,
    kind: str = "gaussian",
    dtype: torch.dtype = torch.float64,
    device=None,
    stream: int = 0,
) -> Tensor:
    """Same signature and numbers as :func:`fsinfo_fast.estimators.probes.draw_probes`."""
    if kind not in _p.PROBE_KINDS:
        raise InvalidInputError(f"kind must be one of {_p.PROBE_KINDS}, got {kind!r}")
    for name, val, lo in (("n", n, 1), ("count", count, 0), ("start", start, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise InvalidInputError(f"{name} must be an int >= {lo}, got {val!r}")
    if not isinstance(sample_ids, Tensor) or sample_ids.ndim != 1 or sample_ids.is_floating_point():
        raise InvalidInputError("sample_ids must be a 1-d integer tensor of global sample ids")
    if not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be floating point, got {dtype}")
    seed = _p.resolve_seed(seed)
    device = torch.device(device) if device is not None else sample_ids.device
    ids = sample_ids.to(device=device, dtype=torch.int64)
    b = ids.shape[0]
    out = torch.empty(b, count, n, dtype=dtype, device=device)
    if b == 0 or count == 0:
        return out
    check_device(ids)
    if dtype not in (torch.float32, torch.float64):
        # float64 -> float16/bfloat16 in one rounding, as draw_probes does (a kernel store may
        # round through float32, and bf16 stores are broken in the interpreter)
        return draw_probes(
            n,
            seed=seed,
            sample_ids=ids,
            start=start,
            count=count,
            kind=kind,
            dtype=torch.float64,
            device=device,
            stream=stream,
        ).to(dtype)
    keys = _p._probe_keys(seed, stream, n, kind, ids, start, count)  # as draw_probes builds them
    gauss = kind == "gaussian"
    m = (n + 1) // 2 if gauss else n  # work items per row (pairs for Gaussian)
    block = min(triton.next_power_of_2(m), 4096 if interpreting() else 512)
    neb = cdiv(m, block)
    _probe_kernel[(b * count * neb,)](keys.contiguous(), out, n, neb, GAUSS=gauss, BLOCK=block)
    return out
