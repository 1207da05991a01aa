"""One batched Lanczos iteration (after the matvec) in one kernel, float64."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InvalidInputError
from . import interpreting
from ._common import cdiv, check_device, next_pow2


@triton.jit
def _lanczos_step_kernel(
    W,
    Q,
    QP,
    BP,
    BAS,
    WO,
    TMP,
    A,
    BETA,
    n,
    J,
    NBLK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """One program per row: alpha = <q, w>; w1 = w - alpha q - b_prev q_prev; two classical
    Gram-Schmidt passes against the j basis rows; beta = ||w3||. Four sweeps over the row:

    1. alpha                       (reads q, w)
    2. w1 -> WO, h1 = V w1         (reads w, q, q_prev, V)
    3. w2 = w1 - V^T h1 -> TMP, h2 = V w2
    4. w3 = w2 - V^T h2 -> WO, ||w3||^2

    Each sweep writes a different buffer than it reads, and a block barrier separates the
    sweeps, so threads that hold a replicated (broadcast) copy of an element never read a value
    another thread has already overwritten."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    bbase = row * J * n
    offs = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_J)
    jmask = offs_j < J
    jrow = offs_j.to(tl.int64)[:, None] * n

    acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    for i in range(NBLK):
        o = i * BLOCK_N + offs
        m = o < n
        q = tl.load(Q + base + o, mask=m, other=0.0)
        w = tl.load(W + base + o, mask=m, other=0.0)
        acc += q * w
    a = tl.sum(acc, axis=0)
    bp = tl.load(BP + row)

    h = tl.zeros([BLOCK_J], dtype=tl.float64)
    for i in range(NBLK):
        o = i * BLOCK_N + offs
        m = o < n
        q = tl.load(Q + base + o, mask=m, other=0.0)
        w = tl.load(W + base + o, mask=m, other=0.0)
        qp = tl.load(QP + base + o, mask=m, other=0.0)
        w1 = w - a * q - bp * qp
        tl.store(WO + base + o, w1, mask=m)
        v = tl.load(BAS + bbase + jrow + o[None, :], mask=jmask[:, None] & m[None, :], other=0.0)
        h += tl.sum(v * w1[None, :], axis=1)
    tl.debug_barrier()

    h2 = tl.zeros([BLOCK_J], dtype=tl.float64)
    for i in range(NBLK):
        o = i * BLOCK_N + offs
        m = o < n
        w1 = tl.load(WO + base + o, mask=m, other=0.0)
        v = tl.load(BAS + bbase + jrow + o[None, :], mask=jmask[:, None] & m[None, :], other=0.0)
        w2 = w1 - tl.sum(v * h[:, None], axis=0)
        tl.store(TMP + base + o, w2, mask=m)
        h2 += tl.sum(v * w2[None, :], axis=1)
    tl.debug_barrier()

    ss = tl.zeros([BLOCK_N], dtype=tl.float64)
    for i in range(NBLK):
        o = i * BLOCK_N + offs
        m = o < n
        w2 = tl.load(TMP + base + o, mask=m, other=0.0)
        v = tl.load(BAS + bbase + jrow + o[None, :], mask=jmask[:, None] & m[None, :], other=0.0)
        w3 = w2 - tl.sum(v * h2[:, None], axis=0)
        tl.store(WO + base + o, w3, mask=m)
        ss += w3 * w3
    tl.store(A + row, a)
    tl.store(BETA + row, tl.sqrt(tl.sum(ss, axis=0)))


def lanczos_step(
    w: Tensor, q: Tensor, q_prev: Tensor, b_prev: Tensor, basis: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    if w.ndim != 2 or q.shape != w.shape or q_prev.shape != w.shape:
        raise InvalidInputError(
            f"lanczos_step expects w, q, q_prev [N, n] of one shape, got {tuple(w.shape)}, "
            f"{tuple(q.shape)}, {tuple(q_prev.shape)}"
        )
    nrows, n = w.shape
    if (
        b_prev.shape != (nrows,)
        or basis.ndim != 3
        or basis.shape[0] != nrows
        or basis.shape[2] != n
    ):
        raise InvalidInputError(
            f"lanczos_step expects b_prev [N] and basis [N, j, n] for N={nrows}, n={n}, got "
            f"{tuple(b_prev.shape)} and {tuple(basis.shape)}"
        )
    check_device(w, q, q_prev, b_prev, basis)
    dtype = w.dtype
    if not dtype.is_floating_point:
        raise InvalidInputError(f"lanczos_step expects floating point tensors, got {dtype}")
    j = basis.shape[1]
    f64 = torch.float64
    w_, q_, qp_, bp_, bas_ = (t.to(f64).contiguous() for t in (w, q, q_prev, b_prev, basis))
    alpha = torch.empty(nrows, dtype=f64, device=w.device)
    beta = torch.empty(nrows, dtype=f64, device=w.device)
    w_out = torch.empty(nrows, n, dtype=f64, device=w.device)
    if nrows > 0 and n > 0:
        tmp = torch.empty_like(w_out)
        bj = next_pow2(max(j, 1))
        cap = 4096 if interpreting() else 1024
        bn = min(triton.next_power_of_2(n), max(16, (8192 if interpreting() else 2048) // bj), cap)
        _lanczos_step_kernel[(nrows,)](
            w_,
            q_,
            qp_,
            bp_,
            bas_,
            w_out,
            tmp,
            alpha,
            beta,
            n,
            j,
            NBLK=cdiv(n, bn),
            BLOCK_N=bn,
            BLOCK_J=bj,
            num_warps=4 if bj * bn <= 2048 else 8,
        )
    elif nrows > 0:
        alpha.zero_()
        beta.zero_()
    return alpha.to(dtype), w_out.to(dtype), beta.to(dtype)
