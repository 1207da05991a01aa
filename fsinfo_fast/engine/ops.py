"""The fused ops of the compiled engine: one contract, several implementations.

This module is the contract. :class:`TorchOps` is the reference implementation in plain
PyTorch (always available, obviously correct); the Triton kernels
(:mod:`fsinfo_fast.kernels`), the C++ ops and the CUDA ops (``csrc/``, registered in the
``fsinfo_fast`` torch library namespace) implement the same functions with the same shapes,
dtypes and results, and are tested against these on the same inputs.

Conventions: ``B`` samples, ``K`` probes per sample, ``F`` features per sample (flattened).
Derivative state (gates, scales, argmax indices) is stored once per sample and broadcast over
the ``K`` probes. Tangents and cotangents keep their dtype (float32 or float64); a scale stored
in reduced precision (float16 / bfloat16) is upcast before the multiply.

Ops
---
``gate_pack(mask [B, F] bool) -> [B, ceil(F/8)] uint8``
    Pack a ReLU-like gate into bits: bit ``j`` (least significant first) of byte ``i`` holds
    element ``8 i + j``.
``gate_apply(V [B, K, F], packed [B, ceil(F/8)] uint8) -> [B, K, F]``
    ``V * gate`` (the JVP and the VJP of a 0/1 gate are the same op).
``scale_apply(V [B, K, F], s [B, F]) -> [B, K, F]``
    ``V * s`` (activation derivative), ``s`` upcast to ``V.dtype``.
``maxpool_gather(V [B, K, C, Lin], idx [B, C, Lout] int64) -> [B, K, C, Lout]``
    Max-pool JVP: ``out[b, k, c, o] = V[b, k, c, idx[b, c, o]]`` (``idx`` flat spatial index
    into ``Lin``, as ``max_pool2d(..., return_indices=True)`` returns it).
``maxpool_scatter(U [B, K, C, Lout], idx [B, C, Lout] int64, lin: int) -> [B, K, C, Lin]``
    Max-pool VJP: the adjoint of ``maxpool_gather`` (sums where windows overlap).
``sq_accumulate(G [B, K, d], group_sums [B, Gmax, d] float64, j0: int) -> [B, K] float64``
    The fused probe reduction of FSInfo_diag / dFIL: adds ``G[:, j]**2`` (in float64) to
    ``group_sums[:, (j0 + j) % Gmax]`` **in place** and returns the squared norms
    ``||G[:, j]||^2`` (float64). One read of ``G``.
``lanczos_step(w, q, q_prev, b_prev, basis) -> (alpha, w, beta)``
    One Lanczos iteration after the matvec, batched over ``N`` rows, float64:
    ``alpha = <q, w>``; ``w <- w - alpha q - b_prev q_prev``; two classical Gram-Schmidt
    passes against the rows of ``basis [N, j, n]`` (``j >= 1``); ``beta = ||w||``.
    Shapes: ``w, q, q_prev [N, n]``, ``b_prev [N]``; returns ``alpha [N]``, ``w [N, n]``
    (new tensor), ``beta [N]``.
``tridiag_eigh(alpha [N, k], beta [N, k-1]) -> (theta [N, k], tau [N, k])``
    Eigenvalues (ascending) of each symmetric tridiagonal matrix and the squared first
    components of its unit eigenvectors (the Gauss quadrature weights, summing to 1), float64.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch
from torch import Tensor

from ..errors import BackendUnavailableError, InvalidInputError

__all__ = ["OPS_NAMES", "Ops", "TorchOps", "get_ops", "ops_availability"]

#: Implementations of the op contract (``"torch"`` is the reference).
OPS_NAMES = ("torch", "triton", "cpp", "cuda")


class Ops(Protocol):
    name: str

    def gate_pack(self, mask: Tensor) -> Tensor: ...
    def gate_apply(self, V: Tensor, packed: Tensor) -> Tensor: ...
    def scale_apply(self, V: Tensor, s: Tensor) -> Tensor: ...
    def maxpool_gather(self, V: Tensor, idx: Tensor) -> Tensor: ...
    def maxpool_scatter(self, U: Tensor, idx: Tensor, lin: int) -> Tensor: ...
    def sq_accumulate(self, G: Tensor, group_sums: Tensor, j0: int) -> Tensor: ...
    def lanczos_step(
        self, w: Tensor, q: Tensor, q_prev: Tensor, b_prev: Tensor, basis: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]: ...
    def tridiag_eigh(self, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]: ...



def _bit_weights(device: torch.device) -> Tensor:
    return (2 ** torch.arange(8, device=device, dtype=torch.int32)).to(torch.uint8)


class TorchOps:
    """Reference implementation of the op contract in plain PyTorch."""

    name = "torch"

    @staticmethod
    def gate_pack(mask: Tensor) -> Tensor:
        if mask.ndim != 2:
            raise InvalidInputError(f"gate_pack expects [B, F] bool, got {tuple(mask.shape)}")
        b, f = mask.shape
        nbytes = (f + 7) // 8
        m = torch.zeros(b, nbytes * 8, dtype=torch.uint8, device=mask.device)
        m[:, :f] = mask.to(torch.uint8)
        w = _bit_weights(mask.device)
        return (m.view(b, nbytes, 8) * w).sum(dim=2, dtype=torch.int32).to(torch.uint8)

    @staticmethod
    def gate_unpack(packed: Tensor, f: int) -> Tensor:
        b, nbytes = packed.shape
        w = _bit_weights(packed.device)
        bits = (packed[:, :, None] & w) != 0
        return bits.reshape(b, nbytes * 8)[:, :f]

    @staticmethod
    def gate_apply(V: Tensor, packed: Tensor) -> Tensor:
        gate = TorchOps.gate_unpack(packed, V.shape[-1])
        return V * gate[:, None, :].to(V.dtype)

    @staticmethod
    def scale_apply(V: Tensor, s: Tensor) -> Tensor:
        return V * s[:, None, :].to(V.dtype)

    @staticmethod
    def maxpool_gather(V: Tensor, idx: Tensor) -> Tensor:
        b, k, c, _ = V.shape
        index = idx[:, None].expand(b, k, c, idx.shape[-1])
        return torch.gather(V, 3, index)

    @staticmethod
    def maxpool_scatter(U: Tensor, idx: Tensor, lin: int) -> Tensor:
        b, k, c, lout = U.shape
        out = U.new_zeros(b, k, c, lin)
        index = idx[:, None].expand(b, k, c, lout)
        return out.scatter_add_(3, index, U)

    @staticmethod
    def sq_accumulate(G: Tensor, group_sums: Tensor, j0: int) -> Tensor:
        g2 = G.to(torch.float64) ** 2
        n_groups = group_sums.shape[1]
        groups = torch.arange(j0, j0 + G.shape[1], device=G.device) % n_groups
        group_sums.index_add_(1, groups, g2)
        return g2.sum(dim=2)

    @staticmethod
    def lanczos_step(
        w: Tensor, q: Tensor, q_prev: Tensor, b_prev: Tensor, basis: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        a = (q * w).sum(dim=1)
        w = w - a[:, None] * q - b_prev[:, None] * q_prev
        for _ in range(2):
            h = torch.einsum("njd,nd->nj", basis, w)
            w = w - torch.einsum("njd,nj->nd", basis, h)
        return a, w, torch.linalg.vector_norm(w, dim=1)

    @staticmethod
    def tridiag_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        T = torch.diag_embed(alpha)
        if beta.shape[-1] > 0:
            T = T + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
        theta, Y = torch.linalg.eigh(T)
        return theta, Y[..., 0, :] ** 2


#: module path and class name of each non-reference implementation (imported lazily)
_IMPLS = {
    "triton": ("fsinfo_fast.kernels", "TritonOps"),
    "cpp": ("fsinfo_fast.engine.compiled", "CppOps"),
    "cuda": ("fsinfo_fast.engine.compiled", "CudaOps"),
}


def ops_availability(name: str) -> tuple[bool, str]:
    """``(available, reason)`` of an op implementation; never initialises CUDA needlessly."""
    if name == "torch":
        return True, "plain PyTorch reference ops"
    if name not in _IMPLS:
        raise InvalidInputError(f"ops must be one of {OPS_NAMES}, got {name!r}")
    modname, _ = _IMPLS[name]
    try:
        mod = importlib.import_module(modname)
    except ImportError as exc:  # the implementation module itself is missing
        return False, f"{modname} cannot be imported ({exc})"
    return mod.availability(name)


def get_ops(name: str = "torch") -> Ops:
    """The op implementation ``name``; raises :class:`BackendUnavailableError` with the reason."""
    if name == "torch":
        return TorchOps()
    ok, why = ops_availability(name)
    if not ok:
        raise BackendUnavailableError(f"{name} ops are not available: {why}")
    modname, cls = _IMPLS[name]
    return getattr(importlib.import_module(modname), cls)()
