"""How Jacobian products are computed (estimators never know).

Every backend returns an object implementing the
:class:`~fsinfo_fast.estimators.Products` protocol for one batch: ``jvp(V)`` maps ``[B, K, d]``
tangents to ``[B, K, m]``, ``vjp(U)`` maps ``[B, K, m]`` cotangents to ``[B, K, d]``.
"""

from .torchfunc import TorchFuncProducts, default_memory_budget

__all__ = ["TorchFuncProducts", "default_memory_budget"]
