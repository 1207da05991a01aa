r"""The exact oracle: dense per-sample Jacobians in float64 and everything computed from them.

Small and obviously correct on purpose: every fast path, test and benchmark compares with this.

For each sample ``x_b`` (flattened to ``d`` numbers) the Jacobian ``J_b = df/dx`` (``m x d``) is
built with ``torch.func`` on the cheaper side: ``m`` VJPs when ``m <= d`` (rows), else ``d`` JVPs
(columns), vmapped in chunks that bound memory. From it, exactly:

- ``tr(J^T J) = ||J||_F^2``,
- ``diag(J^T J)_k = ||J e_k||^2`` (squared column norms),
- the eigenvalues of ``J^T J`` on the smaller side (squared singular values of ``J``), and
  with them ``log det(J^T J / sigma^2 + lambda I_d)``, using
  ``log det(J^T J/s + lambda I_d) = (d - m) log(lambda) + log det(J J^T/s + lambda I_m)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ..encoder import (
    PreparedEncoder,
    check_prior_var,
    check_sigma,
    check_target,
    func_errors,
    prepare,
    quiet_vmap_loop,
)
from ..errors import InvalidInputError, SingularFisherWarning, warn_user
from ..formulas import DIAG_FLOOR, as_sigma, fsinfo_from_spectrum, sigma_for_target
from ..result import MetricResult

__all__ = [
    "jacobian",
    "fisher_trace",
    "fisher_diag",
    "fisher_eigvals",
    "fisher_logdet",
    "fsinfo",
    "dfil",
    "fsinfo_sigma",
    "ExactFisher",
    "exact_fisher",
]

Encoder = Callable[[Tensor], Tensor]

#: Memory the oracle lets one chunk of one-hot products use.
DEFAULT_BUDGET_BYTES = 1 << 30
#: On the CPU a chunk stays within this too (an explicit ``budget_bytes`` only lowers it): its
#: tensors are fresh allocations there, pages faulted in and zeroed chunk after chunk (VGG5 at
#: 32 px, 4 samples: 9.1-10.5 s against 7.0-9.1 s at 128 MiB, the system time 7-14 s against
#: 0.5-7 s; 8 MiB was 1.3-5.8x slower: per-chunk overhead, the dense Jacobian being built anyway).
CPU_BUDGET_BYTES = 128 << 20


def _chunk(n: int, per_item_bytes: int, budget: int, device: torch.device) -> int:
    if device.type == "cpu":
        budget = min(budget, CPU_BUDGET_BYTES)
    return int(max(1, min(n, budget // max(1, 3 * per_item_bytes))))


@torch.no_grad()  # function transforms still differentiate; this only skips parameter graphs
def _jacobian_prepared(enc: PreparedEncoder, chunk_size: int | None, budget: int) -> Tensor:
    """``[B, m, d]`` Jacobian of a prepared (float64) encoder, sample by sample (attention
    through PyTorch's composite "math" kernel: the fused CPU/GPU kernels have no forward-mode
    rule, and the columns, ``m > d``, are JVPs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with func_errors(), sdpa_kernel([SDPBackend.MATH]):
        return _jacobian_rows_or_columns(enc, chunk_size, budget)


def _map(f, eye: Tensor, chunk_size: int) -> Tensor:
    """``f`` over the one-hot rows of ``eye``: vmapped, or one by one where an op has no vmap
    batching rule (``nn.RReLU`` in eval mode: aten::rrelu_with_noise)."""
    try:
        with quiet_vmap_loop():
            return vmap(f, chunk_size=chunk_size)(eye)
    except RuntimeError as err:
        if "vmap" not in str(err).lower():
            raise
        return torch.stack([f(e) for e in eye])


def _jacobian_rows_or_columns(enc: PreparedEncoder, chunk_size: int | None,
                              budget: int) -> Tensor:
    b, d, m = enc.batch, enc.d, enc.m
    out = torch.empty(b, m, d, dtype=enc.x.dtype, device=enc.x.device)
    per_item = enc.saved_bytes
    for i in range(b):
        xi = enc.x[i : i + 1]
        if m <= d:  # m VJPs give the rows
            _, pullback = vjp(enc.fn, xi)
            eye = torch.eye(m, dtype=xi.dtype, device=xi.device).unsqueeze(1)  # [m, 1, m]
            cs = chunk_size or _chunk(m, per_item, budget, xi.device)
            rows = _map(lambda u, pb=pullback: pb(u)[0], eye, cs)  # [m, 1, d]
            out[i] = rows[:, 0, :]
        else:  # d JVPs give the columns
            eye = torch.eye(d, dtype=xi.dtype, device=xi.device).unsqueeze(1)  # [d, 1, d]
            cs = chunk_size or _chunk(d, per_item, budget, xi.device)
            cols = _map(lambda v, xi=xi: jvp(enc.fn, (xi,), (v,))[1], eye, cs)  # [d, 1, m]
            out[i] = cols[:, 0, :].T
    return out


def jacobian(
    encoder: Encoder, x: Tensor, *, chunk_size: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Tensor:
    """Exact per-sample Jacobian in float64.

    Args:
        encoder: module or callable mapping ``[B, *in_shape]`` to ``[B, *out_shape]``. Modules are
            deep-copied and cast to float64; the caller's module is not changed.
        x: batch ``[B, *in_shape]``.
        chunk_size: one-hot products per vmapped chunk (default: from ``budget_bytes``).
        budget_bytes: memory one chunk may use (on the CPU at most :data:`CPU_BUDGET_BYTES`).

    Returns:
        ``[B, m, d]`` float64, ``J[b] = d f(x_b) / d x_b`` with input and output flattened.

    Example:
        >>> import torch
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 3.0], [1.0, 1.0]])
        >>> J = jacobian(lambda x: x @ A.T.to(x.dtype), torch.randn(2, 2))
        >>> J.shape, bool(torch.equal(J[0], A.double()))
        (torch.Size([2, 3, 2]), True)
    """
    enc = prepare(encoder, x, dtype=torch.float64)
    return _jacobian_prepared(enc, chunk_size, budget_bytes)


def fisher_diag(encoder: Encoder, x: Tensor, **kw) -> Tensor:
    """``[B, d]`` exact ``diag(J^T J)`` (squared column norms of ``J``), float64 (sigma = 1)."""
    return (jacobian(encoder, x, **kw) ** 2).sum(dim=1)


def fisher_trace(encoder: Encoder, x: Tensor, **kw) -> Tensor:
    """``[B]`` exact ``tr(J^T J) = ||J||_F^2``, float64 (sigma = 1)."""
    return (jacobian(encoder, x, **kw) ** 2).sum(dim=(1, 2))


def eigvals_from_jacobian(J: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues of ``J^T J`` on the smaller side and a numerically-zero mask.

    The squares of ``J``'s singular values (an SVD of ``J`` itself, not an eigendecomposition of
    ``J^T J``, which squares the condition number: a ``J`` with singular values from 1e-6 to 1e6
    has a Gram matrix the float64 eigensolver cannot tell from a singular one, and its log-det
    FSInfo came out ``-inf``).

    Returns:
        ``(mu, zero)``: ``mu`` ``[B, min(m, d)]`` ascending; ``zero`` marks singular values at or
        below ``max(s) * max(m, d) * eps`` (the usual numerical-rank threshold), set to 0.
    """
    _, m, d = J.shape
    sv = torch.linalg.svdvals(J).flip(-1)  # [B, min(m, d)] ascending
    tol = sv.amax(dim=1, keepdim=True) * max(m, d) * torch.finfo(J.dtype).eps
    zero = sv <= tol
    mu = torch.where(zero, torch.zeros_like(sv), sv.square())
    return mu, zero


def fisher_eigvals(encoder: Encoder, x: Tensor, **kw) -> Tensor:
    """``[B, min(m, d)]`` eigenvalues of ``J^T J`` on the smaller side (ascending, float64).

    The other ``d - min(m, d)`` eigenvalues of the ``d x d`` matrix are exactly 0."""
    return eigvals_from_jacobian(jacobian(encoder, x, **kw))[0]


def _singular_mask(zero: Tensor, m: int, d: int, lam: float) -> Tensor:
    if lam > 0:
        return torch.zeros(zero.shape[0], dtype=torch.bool, device=zero.device)
    return zero.any(dim=1) | (m < d)


def _warn_singular(singular: Tensor, m: int, d: int) -> None:
    if bool(singular.any()):
        n = int(singular.sum())
        why = f"m = {m} < d = {d}, so rank(J^T J) < d" if m < d else "J^T J has zero eigenvalues"
        warn_user(
            f"the Fisher information matrix is singular for {n} sample(s) ({why}): their "
            "log-det FSInfo is -inf. Use variant='diag' (the paper's published numbers) or give "
            "prior_var= for the finite Bayesian (van Trees) version.",
            SingularFisherWarning,
        )


def fisher_logdet(
    encoder: Encoder, x: Tensor, sigma: float | Tensor = 1.0, prior_var: float | None = None,
    **kw,
) -> Tensor:
    """``[B]`` exact ``log det(J^T J / sigma^2 + lambda I_d)`` with ``lambda = 1/prior_var``.

    ``-inf`` (with a :class:`SingularFisherWarning`) where the matrix is singular and there is no
    prior term; never NaN."""
    check_sigma(sigma, x.shape[0] if isinstance(x, Tensor) else None)
    lam = check_prior_var(prior_var)
    J = jacobian(encoder, x, **kw)
    _, m, d = J.shape
    mu, zero = eigvals_from_jacobian(J)
    _warn_singular(_singular_mask(zero, m, d, lam), m, d)
    from ..formulas import HALF_LOG_2PIE

    return 2.0 * d * (fsinfo_from_spectrum(mu, d, sigma, lam) + HALF_LOG_2PIE)


def _check_variant(variant: str) -> None:
    if variant not in ("diag", "logdet"):
        raise InvalidInputError(
            f"variant must be 'diag' (the paper's published numbers) or 'logdet' (the full "
            f"definition), got {variant!r}"
        )


def _check_options(variant: str, prior_var: float | None, floor: float,
                   lanczos_order: int | None = None) -> float:
    """Check the variant and the keywords that belong to one variant only (each was accepted
    and ignored by the other: ``floor`` by the log det, ``lanczos_order`` by the diagonal)."""
    _check_variant(variant)
    lam = check_prior_var(prior_var)
    if variant == "diag" and prior_var is not None:
        raise InvalidInputError("prior_var applies to variant='logdet' only")
    if isinstance(floor, bool) or not (isinstance(floor, (int, float)) and math.isfinite(floor)
                                       and floor >= 0):
        raise InvalidInputError(f"floor must be finite and >= 0, got {floor!r}")
    if variant == "logdet" and floor != DIAG_FLOOR:
        raise InvalidInputError(
            "floor applies to variant='diag' only (the constant inside the diagonal's log); the "
            "log-det variant has none (prior_var regularises it)")
    if variant == "diag" and lanczos_order is not None:
        raise InvalidInputError("lanczos_order applies to variant='logdet' only (its stochastic "
                                "Lanczos quadrature)")
    return lam


@dataclass(frozen=True)
class ExactFisher:
    r"""Exact per-sample Fisher quantities at ``sigma = 1``, from the dense float64 Jacobian.

    Everything the metrics need, computed once: the diagonal and the trace of ``J^T J`` and
    (with ``spectrum``) its eigenvalues on the smaller side. Every sigma, floor and prior is then
    closed-form arithmetic (:mod:`fsinfo_fast.formulas`).

    Attributes:
        diag: ``[B, d]`` float64 ``diag(J^T J)`` (squared column norms of ``J``).
        trace: ``[B]`` float64 ``tr(J^T J) = ||J||_F^2``.
        eigvals: ``[B, min(m, d)]`` float64 eigenvalues (ascending, numerically-zero ones set to
            0), or ``None`` when not computed.
        zero: ``[B, min(m, d)]`` bool mask of the numerically-zero eigenvalues (or ``None``).
        d, m: input and output dimensions.
    """

    diag: Tensor
    trace: Tensor
    eigvals: Tensor | None
    zero: Tensor | None
    d: int
    m: int

    @property
    def batch(self) -> int:
        return int(self.trace.shape[0])

    def _need_spectrum(self) -> None:
        if self.eigvals is None:
            raise InvalidInputError(
                "this ExactFisher was computed without the spectrum (spectrum=False); the "
                "log-det variant needs it"
            )

    def fsinfo(self, sigma: float | Tensor = 0.1, variant: str = "diag", *,
               prior_var: float | None = None, floor: float = DIAG_FLOOR) -> MetricResult:
        """Exact FSInfo (see :func:`fsinfo`)."""
        check_sigma(sigma, self.batch)
        lam = _check_options(variant, prior_var, floor)
        d, m = self.d, self.m
        if variant == "diag":
            value = fsinfo_from_spectrum(self.diag, d, sigma, floor)
            singular, metric, info = None, "fsinfo_diag", {"floor": floor}
        else:
            self._need_spectrum()
            singular = _singular_mask(self.zero, m, d, lam)
            _warn_singular(singular, m, d)
            value = fsinfo_from_spectrum(self.eigvals, d, sigma, lam)
            metric, info = "fsinfo_logdet", {"prior_var": prior_var}
        return MetricResult(
            value=value, stderr=torch.zeros_like(value), metric=metric, units="nats/dim",
            estimator="exact", sigma=as_sigma(sigma, self.batch, value.device), d=d, m=m,
            passes=min(m, d), singular=singular, info={"backend": "reference", **info},
        )

    def dfil(self, sigma: float | Tensor = 0.1) -> MetricResult:
        """Exact dFIL ``tr(J^T J) / (sigma^2 d)`` (see :func:`dfil`)."""
        check_sigma(sigma, self.batch)
        s = as_sigma(sigma, self.batch, self.trace.device)
        value = self.trace / (s**2 * self.d)
        return MetricResult(
            value=value, stderr=torch.zeros_like(value), metric="dfil", units="1/dim",
            estimator="exact", sigma=s, d=self.d, m=self.m, passes=min(self.d, self.m),
            info={"backend": "reference"},
        )

    def fsinfo_sigma(self, target: float | Tensor = -1.0, variant: str = "diag", *,
                     prior_var: float | None = None, floor: float = DIAG_FLOOR) -> Tensor:
        """Exact FSInfoGuard ``sigma*`` per sample (see :func:`fsinfo_sigma`)."""
        lam = _check_options(variant, prior_var, floor)
        if not torch.isfinite(torch.as_tensor(target, dtype=torch.float64)).all():
            raise InvalidInputError(f"target must be finite (nats per dimension), got {target!r}")
        if variant == "diag":
            return sigma_for_target(self.diag, self.d, target, floor)
        self._need_spectrum()
        _warn_singular(_singular_mask(self.zero, self.m, self.d, lam), self.m, self.d)
        return sigma_for_target(self.eigvals, self.d, target, lam)


def exact_fisher(
    encoder: Encoder, x: Tensor, *, spectrum: bool = True, chunk_size: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> ExactFisher:
    """The exact Fisher quantities of every sample (one dense float64 Jacobian per sample).

    Args:
        encoder, x, chunk_size, budget_bytes: as in :func:`jacobian`.
        spectrum: also compute the eigenvalues of ``J^T J`` (an ``O(min(m, d)^3)`` eigensolve
            per sample; needed for the log-det variant only).
    """
    enc = prepare(encoder, x, dtype=torch.float64)
    J = _jacobian_prepared(enc, chunk_size, budget_bytes)
    mu = zero = None
    if spectrum:
        mu, zero = eigvals_from_jacobian(J)
    return ExactFisher(diag=(J**2).sum(dim=1), trace=(J**2).sum(dim=(1, 2)), eigvals=mu,
                       zero=zero, d=enc.d, m=enc.m)


def fsinfo(
    encoder: Encoder,
    x: Tensor,
    sigma: float | Tensor = 0.1,
    variant: str = "diag",
    *,
    prior_var: float | None = None,
    floor: float = DIAG_FLOOR,
    chunk_size: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> MetricResult:
    r"""Exact FSInfo per sample, in nats per input dimension.

    ``variant="logdet"`` (the definition; a surrogate entropy, not a bound):

    .. math:: \mathrm{FSInfo}(x) = \frac{1}{2d}\log\det\Big(\frac{J^TJ}{\sigma^2} + \lambda I\Big)
              - \frac12 \log(2\pi e)

    with ``lambda = 1/prior_var`` (0 without a prior: then ``-inf`` whenever ``J^T J`` is
    singular, always when ``m < d``). ``variant="diag"`` (the paper's published numbers):

    .. math:: \mathrm{FSInfo}_{diag}(x) = \frac{1}{2d}\sum_k \log\Big(\frac{(J^TJ)_{kk}}{\sigma^2}
              + \mathrm{floor}\Big) - \frac12\log(2\pi e)

    which by Hadamard's inequality is ``>=`` the log-det value without a prior (it over-states
    leakage; a prior term can lift the log det above it).

    Args:
        encoder: module or callable ``[B, *in] -> [B, *out]``.
        x: batch ``[B, *in]``.
        sigma: noise standard deviation on the smashed data (float or ``[B]``).
        variant: ``"diag"`` or ``"logdet"``.
        prior_var: prior variance of each input dimension (log-det variant only).
        floor: the constant the paper adds inside the diagonal log (``1e-10``).

    Returns:
        :class:`~fsinfo_fast.result.MetricResult` with ``stderr = 0``.
    """
    check_sigma(sigma, x.shape[0] if isinstance(x, Tensor) else None)
    _check_options(variant, prior_var, floor)
    ex = exact_fisher(encoder, x, spectrum=variant == "logdet", chunk_size=chunk_size,
                      budget_bytes=budget_bytes)
    return ex.fsinfo(sigma, variant, prior_var=prior_var, floor=floor)


def dfil(
    encoder: Encoder, x: Tensor, sigma: float | Tensor = 0.1, *,
    chunk_size: int | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> MetricResult:
    r"""Exact dFIL per sample: :math:`\mathrm{tr}(J^TJ)/(\sigma^2 d)` (Maeng et al. 2023).

    Proven bound (Cramer-Rao): any *unbiased* attacker has ``E||x_hat - x||^2 / d >= 1/dFIL``.
    """
    check_sigma(sigma, x.shape[0] if isinstance(x, Tensor) else None)
    ex = exact_fisher(encoder, x, spectrum=False, chunk_size=chunk_size, budget_bytes=budget_bytes)
    return ex.dfil(sigma)


def fsinfo_sigma(
    encoder: Encoder, x: Tensor, target: float | Tensor = -1.0, variant: str = "diag", *,
    prior_var: float | None = None, floor: float = DIAG_FLOOR,
    chunk_size: int | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Tensor:
    r"""Exact FSInfoGuard noise scale per sample: the sigma whose FSInfo equals ``target``.

    Closed form without a prior or floor: :math:`\sigma^* = \exp(\mathrm{FSInfo}_{\sigma=1}-\tau)`;
    otherwise the monotone equation is solved to float64 precision
    (:func:`fsinfo_fast.formulas.sigma_for_target`). Returns ``[B]`` float64.
    """
    _check_options(variant, prior_var, floor)
    # the fast path's check: a string or a [k != B] target raised torch's raw errors here
    check_target(target, x.shape[0] if isinstance(x, Tensor) and x.ndim > 0 else None)
    ex = exact_fisher(encoder, x, spectrum=variant == "logdet", chunk_size=chunk_size,
                      budget_bytes=budget_bytes)
    return ex.fsinfo_sigma(target, variant, prior_var=prior_var, floor=floor)
