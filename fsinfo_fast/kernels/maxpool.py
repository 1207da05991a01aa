"""Max-pool tangent gather (JVP) and cotangent scatter-add (VJP) over K probes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InvalidInputError
from ._common import block_f, block_k, cdiv, check_device


@triton.jit
def _maxpool_kernel(
    X,
    I,
    O,
    K,
    C,
    LIN,
    LOUT,
    NLB,
    SCATTER: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Gather: O[b,k,c,o] = X[b,k,c,I[b,c,o]];  scatter: O[b,k,c,I[b,c,o]] += X[b,k,c,o].

    The indices of one (b, c, output block) are loaded once and used for BLOCK_K probes.
    Out-of-range indices are masked (never read or written out of bounds)."""
    pid = tl.program_id(0)
    bc = (pid // NLB).to(tl.int64)
    lblk = pid % NLB
    b = bc // C
    c = bc % C
    offs_l = lblk * BLOCK_L + tl.arange(0, BLOCK_L)
    lmask = offs_l < LOUT
    idx = tl.load(I + bc * LOUT + offs_l, mask=lmask, other=0).to(tl.int64)
    lmask = lmask & (idx >= 0) & (idx < LIN)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    row = (b * K + offs_k.to(tl.int64)) * C + c
    m = kmask[:, None] & lmask[None, :]
    pin = row[:, None] * LIN + idx[None, :]
    pout = row[:, None] * LOUT + offs_l[None, :]
    if SCATTER:
        u = tl.load(X + pout, mask=m, other=0.0)
        tl.atomic_add(O + pin, u, mask=m, sem="relaxed")
    else:
        v = tl.load(X + pin, mask=m, other=0.0)
        tl.store(O + pout, v, mask=m)


def _check(X: Tensor, idx: Tensor, what: str) -> tuple[int, int, int, int]:
    if X.ndim != 4 or idx.ndim != 3:
        raise InvalidInputError(
            f"{what} expects X [B, K, C, L] and idx [B, C, Lout], got {tuple(X.shape)} and "
            f"{tuple(idx.shape)}"
        )
    b, k, c, _ = X.shape
    if idx.shape[:2] != (b, c):
        raise InvalidInputError(f"{what}: idx {tuple(idx.shape)} does not match X {tuple(X.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise InvalidInputError(f"{what}: idx must be an integer tensor, got {idx.dtype}")
    check_device(X, idx)
    return b, k, c, idx.shape[2]


def maxpool_gather(V: Tensor, idx: Tensor) -> Tensor:
    b, k, c, lout = _check(V, idx, "maxpool_gather")
    lin = V.shape[3]
    out = torch.empty(b, k, c, lout, dtype=V.dtype, device=V.device)
    if out.numel() == 0:
        return out
    V = V.contiguous()
    idx = idx.contiguous()
    bk = block_k(k)
    bl = block_f(lout, bk)
    nlb = cdiv(lout, bl)
    _maxpool_kernel[(b * c * nlb, cdiv(k, bk))](
        V, idx, out, k, c, lin, lout, nlb, SCATTER=False, BLOCK_K=bk, BLOCK_L=bl
    )
    return out


def maxpool_scatter(U: Tensor, idx: Tensor, lin: int) -> Tensor:
    b, k, c, lout = _check(U, idx, "maxpool_scatter")
    if U.shape[3] != lout:
        raise InvalidInputError(
            f"maxpool_scatter: U {tuple(U.shape)} does not match idx {tuple(idx.shape)}"
        )
    if isinstance(lin, bool) or not isinstance(lin, int) or lin < 0:
        raise InvalidInputError(f"maxpool_scatter: lin must be an int >= 0, got {lin!r}")
    if U.dtype not in (torch.float32, torch.float64):
        # atomic adds in reduced precision are not available on every GPU; keep the reference
        from ..engine.ops import TorchOps

        return TorchOps.maxpool_scatter(U, idx, lin)
    out = torch.zeros(b, k, c, lin, dtype=U.dtype, device=U.device)
    if U.numel() == 0 or out.numel() == 0:
        return out
    U = U.contiguous()
    idx = idx.contiguous()
    bk = block_k(k)
    bl = block_f(lout, bk)
    nlb = cdiv(lout, bl)
    _maxpool_kernel[(b * c * nlb, cdiv(k, bk))](
        U, idx, out, k, c, lin, lout, nlb, SCATTER=True, BLOCK_K=bk, BLOCK_L=bl
    )
    return out
