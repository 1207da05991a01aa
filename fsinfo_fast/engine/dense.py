r"""Products from an explicit per-sample Jacobian (the test and reference backend).

:class:`DenseProducts` implements the :class:`~fsinfo_fast.estimators.Products` protocol from a
dense ``[B, m, d]`` tensor ``J`` with batched matrix products, and counts the products it
computes, so tests can check the estimators' pass accounting. Use it with a float64 ``J`` from
:mod:`fsinfo_fast.testing` or :func:`fsinfo_fast.reference.jacobian`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._progress import tick
from ..errors import InvalidInputError, InvalidInputTypeError

__all__ = ["DenseProducts"]


class DenseProducts:
    r"""Batched ``J v`` and ``J^T u`` from an explicit Jacobian.

    Args:
        J: ``[B, m, d]`` floating tensor; ``J[b]`` is the Jacobian of sample ``b``.

    Attributes:
        batch, m, d, dtype, device: as in the protocol.
        jvp_passes, vjp_passes: products computed so far, per sample (a call with ``K`` probes
            counts ``K``).

    Example:
        >>> J = torch.arange(6.0, dtype=torch.float64).reshape(1, 2, 3)
        >>> P = DenseProducts(J)
        >>> P.jvp(torch.ones(1, 1, 3, dtype=torch.float64))
        tensor([[[ 3., 12.]]], dtype=torch.float64)
        >>> P.vjp(torch.ones(1, 1, 2, dtype=torch.float64)), P.passes
        (tensor([[[3., 5., 7.]]], dtype=torch.float64), 2)
    """

    backend = "dense"

    def __init__(self, J: Tensor) -> None:
        if not isinstance(J, Tensor) or not J.is_floating_point():
            raise InvalidInputTypeError("J must be a floating-point tensor of shape [B, m, d]")
        if J.ndim != 3 or 0 in J.shape:
            raise InvalidInputError(f"J must have shape [B, m, d], got {tuple(J.shape)}")
        self.J = J
        self.batch, self.m, self.d = (int(s) for s in J.shape)
        self.dtype, self.device = J.dtype, J.device
        self.jvp_passes = 0
        self.vjp_passes = 0

    @property
    def passes(self) -> int:
        """Jacobian products computed so far, per sample (JVPs + VJPs)."""
        return self.jvp_passes + self.vjp_passes

    def select(self, idx: Tensor) -> DenseProducts:
        """The products of the samples ``idx`` (``[n]`` int64 row indices)."""
        return DenseProducts(self.J[idx])

    def _check(self, T: Tensor, n: int, name: str) -> None:
        if T.ndim != 3 or T.shape[0] != self.batch or T.shape[2] != n:
            raise InvalidInputError(
                f"{name} expects [B, K, {n}] with B = {self.batch}, got {tuple(T.shape)}"
            )

    def jvp(self, V: Tensor) -> Tensor:
        """``[B, K, d] -> [B, K, m]``: ``J_b V[b, k]``."""
        self._check(V, self.d, "jvp")
        self.jvp_passes += V.shape[1]
        tick(V.shape[0] * V.shape[1])
        return torch.bmm(V.to(self.dtype), self.J.transpose(1, 2))

    def vjp(self, U: Tensor) -> Tensor:
        """``[B, K, m] -> [B, K, d]``: ``J_b^T U[b, k]``."""
        self._check(U, self.m, "vjp")
        self.vjp_passes += U.shape[1]
        tick(U.shape[0] * U.shape[1])
        return torch.bmm(U.to(self.dtype), self.J)
