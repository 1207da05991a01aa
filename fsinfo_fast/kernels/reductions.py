"""The fused probe reduction of FSInfo_diag / dFIL (float64 group sums and squared norms)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InvalidInputError
from . import interpreting
from ._common import cdiv, check_device


@triton.jit
def _sq_accumulate_kernel(G, S, P, K, D, GMAX, J0, NDB, T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, r, d-block) owns group (J0 + r) % GMAX of sample b on its d-block and adds
    the probes j = r, r + GMAX, ... < K in order (as index_add_ does), so no atomics and one
    read of G. Per-block partial squared norms go to P[b, j, d-block]."""
    pid = tl.program_id(0)
    r = pid // NDB
    dblk = pid % NDB
    b = tl.program_id(1).to(tl.int64)
    offs = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    grp = (J0 + r) % GMAX
    srow = (b * GMAX + grp) * D
    acc = tl.load(S + srow + offs, mask=dmask, other=0.0)
    for t in range(T):  # T is constexpr: see _common (triton 3.6 interpreter)
        j = r + t * GMAX
        ok = j < K
        g = tl.load(G + (b * K + j) * D + offs, mask=dmask & ok, other=0.0).to(tl.float64)
        g2 = g * g
        acc = tl.where(ok, acc + g2, acc)
        tl.store(P + (b * K + j) * NDB + dblk, tl.sum(g2, axis=0), mask=ok)
    tl.store(S + srow + offs, acc, mask=dmask)


def sq_accumulate(G: Tensor, group_sums: Tensor, j0: int) -> Tensor:
    if G.ndim != 3 or group_sums.ndim != 3:
        raise InvalidInputError(
            f"sq_accumulate expects G [B, K, d] and group_sums [B, Gmax, d], got "
            f"{tuple(G.shape)} and {tuple(group_sums.shape)}"
        )
    b, k, d = G.shape
    gmax = group_sums.shape[1]
    if group_sums.shape[0] != b or group_sums.shape[2] != d or gmax < 1:
        raise InvalidInputError(
            f"group_sums {tuple(group_sums.shape)} does not match G {tuple(G.shape)} (Gmax >= 1)"
        )
    if group_sums.dtype != torch.float64:
        raise InvalidInputError(f"group_sums must be float64, got {group_sums.dtype}")
    if not G.dtype.is_floating_point:
        raise InvalidInputError(f"G must be floating point, got {G.dtype}")
    if isinstance(j0, bool) or not isinstance(j0, int):
        raise InvalidInputError(f"j0 must be an int, got {j0!r}")
    check_device(G, group_sums)
    norms = torch.zeros(b, k, dtype=torch.float64, device=G.device)
    if b == 0 or k == 0 or d == 0:
        return norms
    G = G.contiguous()
    S = group_sums if group_sums.is_contiguous() else group_sums.contiguous()
    r = min(k, gmax)
    block = min(triton.next_power_of_2(d), 4096 if interpreting() else 1024)
    if not interpreting():
        # few groups and samples: smaller d-blocks so that the GPU gets enough programs
        while block > 128 and r * b * cdiv(d, block) < 1024:
            block //= 2
    ndb = cdiv(d, block)
    partial = torch.empty(b, k, ndb, dtype=torch.float64, device=G.device)
    _sq_accumulate_kernel[(r * ndb, b)](
        G, S, partial, k, d, gmax, j0 % gmax, ndb, T=cdiv(k, gmax), BLOCK_D=block
    )
    if S is not group_sums:
        group_sums.copy_(S)
    return partial[:, :, 0].clone() if ndb == 1 else partial.sum(dim=2)
