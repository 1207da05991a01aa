r"""The alternative a user would try: curvlinops' diagonal estimators on a ``J^T J`` operator.

`curvlinops <https://github.com/f-dangel/curvlinops>`_ (``curvlinops-for-pytorch``) estimates the
diagonal of a square linear operator with Hutchinson's method (Bekas et al. 2007,
:func:`curvlinops.hutchinson_diag`) and with XDiag (Epperly, Tropp and Webber 2024,
:func:`curvlinops.xdiag`). A user who wants FSInfo_diag from it builds the per-sample operator

.. math:: A_b = J_b^T J_b \in \mathbb{R}^{d \times d}, \qquad
          A_b X = J_b^T (J_b X)

from ``torch.func`` products (one JVP and one VJP per column of ``X``: two Jacobian products
per matrix-vector product), hands it to those estimators and takes the plug-in log-sum

.. math:: \widehat{\mathrm{FSInfo}}_{diag} = \frac{1}{2d}\sum_k
          \log\Big(\frac{\max(\hat a_k, 0)}{\sigma^2} + \mathrm{floor}\Big) - \frac12\log 2\pi e.

What this route does **not** give, recorded in every row: no interval (curvlinops returns a
point estimate of the diagonal, no variance), no debiasing of the logarithm (``E log a_hat <
log a``), and Hutchinson's ``v * (A v)`` entries can be negative (they are clamped at 0, where
the floor ``1e-10`` then dominates the term). curvlinops requires fewer matrix-vector products
than the dimension (``num_matvecs < d``) and XDiag an even number.

:class:`JacobianGramOperator` is the operator; :class:`CurvlinopsDiag` the benchmark provider
(``curvlinops-hutchinson``, ``curvlinops-xdiag``). A provider that is requested while
curvlinops is not installed raises :class:`ImportError` with the install line: the runner
records an ``error`` row and ``fsinfo-fast bench`` exits 1 (never a quiet skip).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ..formulas import DIAG_FLOOR, fsinfo_from_spectrum
from .cases import Case
from .providers import Outcome, Provider

__all__ = ["CURVLINOPS_METHODS", "CurvlinopsDiag", "JacobianGramOperator", "curvlinops_diagonal",
           "curvlinops_fsinfo_diag", "require_curvlinops"]

#: curvlinops' diagonal estimators, by the provider suffix.
CURVLINOPS_METHODS = ("hutchinson", "xdiag")

_INSTALL = ("pip install --no-deps curvlinops-for-pytorch==3.0.1 (--no-deps: its backpack "
            "dependency would pull torchvision, which replaces the pinned torch; `make venv` "
            "does this)")


def require_curvlinops() -> Any:
    """Import curvlinops, or raise :class:`ImportError` with the install line."""
    try:
        import curvlinops
    except ImportError as err:
        raise ImportError(f"the curvlinops providers need curvlinops: {_INSTALL}") from err
    return curvlinops


def _operator_base() -> type:
    from curvlinops._torch_base import PyTorchLinearOperator

    return PyTorchLinearOperator


def JacobianGramOperator(encoder: Any, x: Tensor, *, chunk_size: int | None = 64) -> Any:
    r"""The ``d x d`` operator ``J^T J`` of ``encoder`` at one sample, as a curvlinops
    ``PyTorchLinearOperator`` (``A @ X`` for ``X`` of shape ``[d, K]`` or ``[d]``).

    Args:
        encoder: maps ``[1, *in]`` to ``[1, *out]``.
        x: one sample ``[1, *in]`` (the linearisation point).
        chunk_size: columns of ``X`` per vmapped chunk (``None``: all at once).

    Returns:
        A curvlinops linear operator (self-adjoint), with ``passes`` counting the Jacobian
        products (one JVP and one VJP per column) done so far.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2).double()
        >>> A = JacobianGramOperator(lin, torch.randn(1, 3, dtype=torch.float64))
        >>> W = lin.weight.detach()
        >>> bool(torch.allclose(A @ torch.eye(3, dtype=torch.float64), W.T @ W))
        True
    """
    require_curvlinops()
    base = _operator_base()
    in_shape = tuple(x.shape[1:])
    xf = x.reshape(-1).detach()
    d = xf.numel()

    def f(z: Tensor) -> Tensor:
        return encoder(z.reshape(1, *in_shape)).reshape(-1)

    class _Gram(base):  # type: ignore[misc, valid-type]
        SELF_ADJOINT = True

        def __init__(self) -> None:
            super().__init__([(d,)], [(d,)])
            _, self._pullback = vjp(f, xf)
            self.passes = 0

        @torch.no_grad()
        def _matmat(self, X: list[Tensor]) -> list[Tensor]:
            V = X[0].T.to(xf.dtype)  # [K, d]
            JV = vmap(lambda v: jvp(f, (xf,), (v,))[1], chunk_size=chunk_size)(V)  # [K, m]
            JtJV = vmap(lambda u: self._pullback(u)[0], chunk_size=chunk_size)(JV)  # [K, d]
            self.passes += 2 * V.shape[0]
            return [JtJV.T.to(X[0].dtype)]

        def _adjoint(self) -> Any:
            return self

        @property
        def device(self) -> torch.device:
            return xf.device

        @property
        def dtype(self) -> torch.dtype:
            return xf.dtype

    return _Gram()


class CurvlinopsDiag(Provider):
    """FSInfo_diag from curvlinops' Hutchinson or XDiag diagonal of ``J^T J`` (plug-in log-sum).

    Args:
        method: ``"hutchinson"`` (Rademacher) or ``"xdiag"``.
        chunk_size: columns per vmapped chunk of the operator's products.

    ``num_probes`` is curvlinops' ``num_matvecs`` (rounded up to even for XDiag); each costs a
    JVP and a VJP, so ``passes = 2 num_matvecs``. Probes are drawn by curvlinops from torch's
    global generator, seeded per call with ``seed`` (under ``fork_rng``, so the caller's stream
    is untouched).
    """

    kind = "randomized"
    tasks = ("fsinfo_diag",)
    min_probes = 2
    opt_in = True  # the comparison runs where a case or the craft section asks for it
    backend = "torch.func"

    def __init__(self, method: str = "hutchinson", chunk_size: int | None = 64) -> None:
        if method not in CURVLINOPS_METHODS:
            raise ValueError(f"method must be one of {CURVLINOPS_METHODS}, got {method!r}")
        self.method = method
        self.chunk_size = chunk_size
        self.name = f"curvlinops-{method}"
        self.description = (
            f"curvlinops {'hutchinson_diag (Rademacher)' if method == 'hutchinson' else 'xdiag'}"
            " on a torch.func J^T J operator (JVP + VJP per matvec), plug-in log-sum of the "
            "diagonal clamped at 0; no interval, no debiasing")

    def max_probes(self, case: Case) -> int | None:
        """curvlinops refuses ``num_matvecs >= d``."""
        return case.d - 1

    def setup(self, case: Case) -> None:
        require_curvlinops()  # requested but missing: an error row, never a skip

    def run(self, case: Case, num_probes: int | None = None, seed: int = 0) -> Outcome:
        v, k, negative = curvlinops_fsinfo_diag(
            case.encoder, case.x, case.sigma, method=self.method,
            num_matvecs=int(num_probes or self.min_probes), seed=seed,
            chunk_size=self.chunk_size)
        return Outcome(v.cpu(), passes=2 * k, num_probes=k,
                       info={"negative_diag_fraction": negative, "interval": None,
                             "debiased": False})


def curvlinops_diagonal(encoder: Any, x: Tensor, *, method: str, num_matvecs: int,
                        seed: int = 0, chunk_size: int | None = 64) -> tuple[Tensor, int]:
    """``[B, d]`` float64 curvlinops estimates of ``diag(J_b^T J_b)``, and the matvecs used.

    Args:
        encoder: maps ``[1, *in]`` to ``[1, *out]`` (applied one sample at a time).
        x: the batch ``[B, *in]``.
        method: ``"hutchinson"`` or ``"xdiag"``.
        num_matvecs: curvlinops' ``num_matvecs`` (rounded up to even for XDiag; ``< d``).
        seed: seeds torch's global generator (under ``fork_rng``) before the first sample.
        chunk_size: columns per vmapped chunk of the operator's products.

    Raises:
        ImportError: curvlinops is not installed (with the install line).
        ValueError: ``num_matvecs >= d`` (curvlinops refuses it) or an unknown method.
    """
    cl = require_curvlinops()
    if method not in CURVLINOPS_METHODS:
        raise ValueError(f"method must be one of {CURVLINOPS_METHODS}, got {method!r}")
    d = int(x[0].numel())
    k = int(num_matvecs)
    if method == "xdiag" and k % 2:
        k += 1
    if k >= d:
        raise ValueError(f"curvlinops needs num_matvecs < d = {d}, got {k}")
    est = cl.hutchinson_diag if method == "hutchinson" else cl.xdiag
    out = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        for i in range(x.shape[0]):
            A = JacobianGramOperator(encoder, x[i : i + 1], chunk_size=chunk_size)
            out.append(est(A, k).detach().double())
    return torch.stack(out), k


def curvlinops_fsinfo_diag(encoder: Any, x: Tensor, sigma: float, *, method: str,
                           num_matvecs: int, seed: int = 0,
                           chunk_size: int | None = 64) -> tuple[Tensor, int, float]:
    """FSInfo_diag ``[B]`` (nats/dim, float64) from curvlinops' diagonal: the plug-in log-sum
    with the estimate clamped at 0 (no interval, no debiasing); also the matvecs used and the
    fraction of negative diagonal entries that were clamped."""
    diag, k = curvlinops_diagonal(encoder, x, method=method, num_matvecs=num_matvecs,
                                  seed=seed, chunk_size=chunk_size)
    negative = float((diag < 0).double().mean())
    v = fsinfo_from_spectrum(diag.clamp_min(0.0), diag.shape[1], float(sigma), DIAG_FLOOR)
    return v, k, negative
