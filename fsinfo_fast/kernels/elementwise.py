"""Gate packing and the fused per-sample broadcasts (bit gates, reduced-precision scales)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InvalidInputError
from ._common import block_f, block_k, cdiv, check_device


@triton.jit
def _gate_pack_kernel(M, P, F, NB, NBB, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // NBB).to(tl.int64)
    blk = pid % NBB
    offs_byte = blk * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)
    f = offs_byte[:, None] * 8 + bit[None, :]
    m = tl.load(M + b * F + f, mask=f < F, other=0).to(tl.int32)
    m = (m != 0).to(tl.int32)
    val = tl.sum(m << bit[None, :], axis=1)
    tl.store(P + b * NB + offs_byte, val.to(tl.uint8), mask=offs_byte < NB)


@triton.jit
def _bcast_kernel(
    V, S, O, K, F, NS, NFB, IS_GATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr
):
    """O[b, k, f] = V[b, k, f] * state[b, f], state a bit gate (IS_GATE) or a scale."""
    pid = tl.program_id(0)
    b = (pid // NFB).to(tl.int64)
    fblk = pid % NFB
    offs_f = fblk * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    ptr = (b * K + offs_k).to(tl.int64)[:, None] * F + offs_f[None, :]
    m = kmask[:, None] & fmask[None, :]
    v = tl.load(V + ptr, mask=m, other=0.0)
    if IS_GATE:
        byte = tl.load(S + b * NS + offs_f // 8, mask=fmask, other=0).to(tl.int32)
        s = ((byte >> (offs_f % 8)) & 1).to(v.dtype)
    else:
        s = tl.load(S + b * NS + offs_f, mask=fmask, other=0.0).to(v.dtype)
    tl.store(O + ptr, v * s[None, :], mask=m)


def gate_pack(mask: Tensor) -> Tensor:
    if mask.ndim != 2:
        raise InvalidInputError(f"gate_pack expects [B, F] bool, got {tuple(mask.shape)}")
    check_device(mask)
    b, f = mask.shape
    nb = (f + 7) // 8
    out = torch.empty(b, nb, dtype=torch.uint8, device=mask.device)
    if out.numel() == 0:
        return out
    m = mask.contiguous()
    m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
    block = min(triton.next_power_of_2(nb), 512)
    nbb = cdiv(nb, block)
    _gate_pack_kernel[(b * nbb,)](m, out, f, nb, nbb, BLOCK=block)
    return out


def _bcast(V: Tensor, state: Tensor, is_gate: bool) -> Tensor:
    if V.ndim != 3:
        raise InvalidInputError(f"expected V [B, K, F], got {tuple(V.shape)}")
    b, k, f = V.shape
    ns = (f + 7) // 8 if is_gate else f
    if state.shape != (b, ns):
        what = "packed gate [B, ceil(F/8)]" if is_gate else "scale [B, F]"
        raise InvalidInputError(f"expected {what} = {(b, ns)}, got {tuple(state.shape)}")
    if is_gate and state.dtype != torch.uint8:
        raise InvalidInputError(f"packed gate must be uint8, got {state.dtype}")
    check_device(V, state)
    out = torch.empty_like(V, memory_format=torch.contiguous_format)
    if V.numel() == 0:
        return out
    V = V.contiguous()
    state = state.contiguous()
    bk = block_k(k)
    bf = block_f(f, bk)
    nfb = cdiv(f, bf)
    _bcast_kernel[(b * nfb, cdiv(k, bk))](
        V, state, out, k, f, ns, nfb, IS_GATE=is_gate, BLOCK_K=bk, BLOCK_F=bf
    )
    return out


def gate_apply(V: Tensor, packed: Tensor) -> Tensor:
    return _bcast(V, packed, True)


def scale_apply(V: Tensor, s: Tensor) -> Tensor:
    return _bcast(V, s, False)
