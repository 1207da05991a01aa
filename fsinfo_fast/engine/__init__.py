"""How Jacobian products are computed (estimators never know).

Every backend returns an object implementing the :class:`~fsinfo_fast.estimators.Products`
protocol for one batch: ``jvp(V)`` maps ``[B, K, d]`` tangents to ``[B, K, m]``, ``vjp(U)`` maps
``[B, K, m]`` cotangents to ``[B, K, d]``.

Backends: ``"torch"`` (torch.func, always available) and the compiled ones (``"engine"``,
``"triton"``, ``"cpp"``, ``"cuda"``) where built. ``"auto"`` (or the ``FSINFO_FAST_BACKEND``
environment variable) picks the fastest available one, falling back silently (debug log); a
backend requested explicitly that cannot run raises :class:`BackendUnavailableError` with the
reasons.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ..encoder import PreparedEncoder
from ..errors import BackendUnavailableError, InvalidInputError
from .torchfunc import TorchFuncProducts, default_memory_budget

__all__ = [
    "BACKENDS",
    "TorchFuncProducts",
    "available_backends",
    "default_memory_budget",
    "make_products",
    "resolve_backend",
]

log = logging.getLogger(__name__)

#: All backend names, fastest first (the order ``auto`` tries).
BACKENDS = ("cuda", "triton", "cpp", "engine", "torch")
ENV_VAR = "FSINFO_FAST_BACKEND"


def _availability(name: str) -> tuple[bool, str]:
    if name == "torch":
        return True, "torch.func (always available)"
    # The compiled backends are not part of this version of the package.
    return False, f"the '{name}' backend is not built into this version of fsinfo_fast"


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend (never initialises CUDA)."""
    return {name: _availability(name) for name in BACKENDS}


def resolve_backend(backend: str | None = "auto") -> str:
    """Name of the backend to use for a request.

    ``"auto"`` (or ``None``) takes ``$FSINFO_FAST_BACKEND`` if set, else the fastest available.
    """
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend == "auto":
            for name in BACKENDS:
                ok, why = _availability(name)
                if ok:
                    return name
                log.debug("backend %s skipped: %s", name, why)
    if backend not in BACKENDS:
        raise InvalidInputError(
            f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}"
        )
    ok, why = _availability(backend)
    if not ok:
        others = ", ".join(n for n in BACKENDS if _availability(n)[0])
        raise BackendUnavailableError(
            f"backend {backend!r} was requested but cannot run: {why}. Available: {others}"
        )
    return backend


_FACTORIES: dict[str, Callable[..., object]] = {"torch": TorchFuncProducts}


def make_products(enc: PreparedEncoder, backend: str | None = "auto", **kw) -> object:
    """Build the products object of ``backend`` for a prepared batch."""
    return _FACTORIES[resolve_backend(backend)](enc, **kw)
