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

**Rounding.** float64 is not exact arithmetic, and a zero half-width would claim it is. Every
result of :class:`ExactFisher` carries an allowance for the oracle's own rounding, from three
parts, per sample:

- autograd's: each column of the computed ``J`` is taken to be within a relative ``a_b`` of the
  true one (:attr:`ExactFisher.ad_err`: :data:`AD_ULPS` unit roundoffs a priori; a
  :class:`~fsinfo_fast.Linearization` sets ``SAFETY`` times what it reads where that is
  larger: its float64 forward- against reverse-mode check, and the rounding both modes share
  in saturating activations, :mod:`~fsinfo_fast.reference.saturation`; a column computed as
  exactly 0 that the latter moves is no structural zero, and gets an upper bound of its own);
- the sums of squares: ``diag`` sums ``m`` squares, the trace ``m d``: a relative
  ``gamma_n = n u / (1 - n u)`` (``u`` float64's unit roundoff), and up to ``n`` times the
  smallest subnormal where squares underflow;
- the SVD's (log det): the computed singular values are those of a matrix within
  ``max(m, d) eps s_max`` of ``J`` (the usual numerical-rank tolerance, the backward-stable
  SVD's bound), and by Weyl's inequality each moves by at most that plus ``||dJ||_F <= a_b
  ||J||_F``.

So every diagonal entry and the trace lie in ``[x / (1 + e), x / (1 - e)]`` and every singular
value in ``[s - delta, s + delta]``; FSInfo grows with each entry of its spectrum, so the value
at the lower and at the upper spectrum bracket the truth (and give ``sigma*``'s interval the
same way), the half-width the larger distance, plus the log-sum's own rounding. ``-inf`` is
claimed only where it is exact: ``m < d`` without a prior, or a column of the float64 ``J``
that is exactly 0 (every path through the graph multiplied by an exact 0; a square sum that
underflowed is not one). Where the lower bracket reaches ``-inf`` otherwise (a singular value
within ``delta`` of 0 without a prior: ``J^T J`` singular to float64's resolution, e.g. a
bottleneck narrower than ``d``), the value is the upper bracket's and flagged ``bound`` (an
upper bound, ``ci95() = (-inf, value]``), with a :class:`SingularFisherWarning`.
The allowance is a model (measured autograd errors scaled by a safety factor, worst-case
summation and SVD bounds), not a proof; the bare :func:`fsinfo` and :func:`exact_fisher`
measure nothing (the a-priori allowance, and every column exactly 0 taken as structural).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .._progress import tick
from ..encoder import (
    PreparedEncoder,
    check_prior_var,
    check_sigma,
    check_target,
    func_errors,
    prepare,
    quiet_vmap_loop,
)
from ..errors import InvalidInputError, NonFiniteProbeError, SingularFisherWarning, warn_user
from ..formulas import (
    DIAG_FLOOR,
    HALF_LOG_2PIE,
    SUBNORMAL,
    as_sigma,
    fsinfo_from_spectrum,
    logsum_rounding,
    sigma_for_target,
    sum_rel_bound,
)
from ..result import MetricResult, SigmaResult

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

#: The float64 unit roundoff.
U64 = torch.finfo(torch.float64).eps / 2
#: A priori, autograd's float64 Jacobian columns are within this many unit roundoffs (relative)
#: of the true ones (the fast exact route's floor for float64 products, ``FLOOR_ULPS``).
AD_ULPS = 64.0

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
    """``f`` over the one-hot rows of ``eye``: vmapped ``chunk_size`` rows at a time (each
    chunk counted on a progress meter, :func:`fsinfo_fast._progress.tick`), or one by one
    where an op has no vmap batching rule (``nn.RReLU`` in eval mode: aten::rrelu_with_noise)."""
    try:
        with quiet_vmap_loop():
            parts = []
            for s in range(0, eye.shape[0], chunk_size):
                parts.append(vmap(f)(eye[s : s + chunk_size]))
                tick(parts[-1].shape[0])
            return torch.cat(parts)
    except RuntimeError as err:
        if "vmap" not in str(err).lower():
            raise
        out = []
        for e in eye:
            out.append(f(e))
            tick(1)
        return torch.stack(out)


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


def _svd_spectrum(J: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sv, zero, err)``: the singular values of ``J`` as computed (ascending, none set to
    0), the mask of those within ``err`` of 0, and ``err`` (``[B]``), the SVD's bound on their
    absolute error: ``max(m, d) eps s_max``."""
    _, m, d = J.shape
    sv = torch.linalg.svdvals(J).flip(-1)
    err = sv.amax(dim=1) * max(m, d) * torch.finfo(J.dtype).eps
    return sv, sv <= err.unsqueeze(1), err


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
        why = (f"m = {m} < d = {d}, so rank(J^T J) < d" if m < d else
               "a column of J is exactly 0: an input dimension that does not reach the output")
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
    """``[B]`` ``log det(J^T J / sigma^2 + lambda I_d)`` with ``lambda = 1/prior_var``, the
    float64 point value.

    ``-inf`` (with a :class:`SingularFisherWarning`) where the matrix is singular without a
    prior term, by the numerical-rank threshold of :func:`eigvals_from_jacobian` (a singular
    value at or below ``max(m, d) eps s_max`` counts as 0: float64 cannot tell it from one); never
    NaN. :meth:`ExactFisher.fsinfo` gives the interval, and a bound where that threshold
    decides."""
    check_sigma(sigma, x.shape[0] if isinstance(x, Tensor) else None)
    lam = check_prior_var(prior_var)
    J = jacobian(encoder, x, **kw)
    _, m, d = J.shape
    mu, zero = eigvals_from_jacobian(J)
    _warn_singular(_singular_mask(zero, m, d, lam), m, d)
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
    from ..estimators.lanczos import _check_order  # (every route: the exact one ignored 0)

    _check_order(lanczos_order, "lanczos_order")
    return lam


def _finite(hw: Tensor) -> Tensor:
    """``bias_bound`` for a half-width that is all allowance: ``hw``, 0 where it is ``inf`` (no
    claim; an infinite ``bias_bound`` made batch means' half-widths ``inf - inf``)."""
    return torch.where(torch.isfinite(hw), hw, 0.0)


@dataclass(frozen=True)
class ExactFisher:
    r"""Exact per-sample Fisher quantities at ``sigma = 1``, from the dense float64 Jacobian.

    Everything the metrics need, computed once: the diagonal and the trace of ``J^T J`` and
    (with ``spectrum``) its eigenvalues on the smaller side. Every sigma, floor and prior is then
    closed-form arithmetic (:mod:`fsinfo_fast.formulas`), with the oracle's own rounding as the
    interval (the module docstring's "Rounding").

    Attributes:
        diag: ``[B, d]`` float64 ``diag(J^T J)`` (squared column norms of ``J``).
        trace: ``[B]`` float64 ``tr(J^T J) = ||J||_F^2``.
        eigvals: ``[B, min(m, d)]`` float64 eigenvalues (ascending, the squared singular values
            as computed; the columns exactly 0 in ``J`` make as many exact zeros), or ``None``
            when not computed.
        zero: ``[B, min(m, d)]`` bool mask of the eigenvalues float64 does not tell from 0
            (singular values within ``svd_err``), or ``None``.
        d, m: input and output dimensions.
        ad_err: ``[B]`` relative rounding of the computed ``J``'s columns (autograd's; each
            column within that share of its own norm), or ``None``: :data:`AD_ULPS` unit
            roundoffs (a priori; :meth:`with_ad_err` sets a measured one).
        fro_err: ``[B]`` the same as a whole, ``||J_computed - J||_F / ||J||_F`` (the trace's
            and the singular values' allowance), or ``None``: :data:`AD_ULPS` unit roundoffs.
        svd_err: ``[B]`` the SVD's bound on its singular values' absolute error (with the
            spectrum), or ``None``.
        singular_values: ``[B, min(m, d)]`` the singular values of ``J`` (ascending, as
            computed: their squares, ``eigvals``, under- and overflow), or ``None``.
        col_floor: ``[B, d]`` an upper bound of the true squared norm of columns computed as
            exactly 0 that are not structural zeros (a saturated ``tanh``'s, found by
            :func:`~fsinfo_fast.reference.saturation.perturbed_vjp`; 0 elsewhere), or
            ``None``.
        zero_cols: ``[B, d]`` bool: columns of the computed ``J`` that are exactly 0, or
            ``None`` (then ``diag == 0`` is taken as exact).
        col_err: ``[B, d]`` each column's error against its computed norm, ``|dJ_k| <=
            col_err_k R_k``, or ``None``: ``Linearization._oracle_measured`` reads each
            column's own change under the saturating activations' rounding (valid at every
            noise and floor; ``ad_err`` is then at least its largest), and
            ``Linearization._oracle_weighted`` a tighter one for one result (one noise and
            floor: a reading of each column's weight in the log times its error, ``rho_k
            e_k``, turned into ``e_k``, never below the column's own). :meth:`fsinfo` (diag)
            and :meth:`sigma_interval` (diag) intersect the bracket it gives with
            ``ad_err``'s; the other methods do not read it.
    """

    diag: Tensor
    trace: Tensor
    eigvals: Tensor | None
    zero: Tensor | None
    d: int
    m: int
    ad_err: Tensor | None = None
    fro_err: Tensor | None = None
    svd_err: Tensor | None = None
    singular_values: Tensor | None = None
    col_floor: Tensor | None = None
    zero_cols: Tensor | None = None
    col_err: Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.trace.shape[0])

    def with_ad_err(self, ad_err: Tensor, fro_err: Tensor | None = None) -> ExactFisher:
        """This with a measured relative rounding of ``J``'s columns and of ``J`` as a whole
        (``[B]`` each; ``fro_err`` None: kept; never below the a-priori :data:`AD_ULPS` unit
        roundoffs)."""
        floor = AD_ULPS * U64
        fro = self.fro_err if fro_err is None else torch.clamp_min(fro_err.to(self.trace), floor)
        return dataclasses.replace(self, ad_err=torch.clamp_min(ad_err.to(self.trace), floor),
                                   fro_err=fro)

    def _a_priori(self, err: Tensor | None) -> Tensor:
        return err if err is not None else torch.full_like(self.trace, AD_ULPS * U64)

    def rel_err(self) -> tuple[Tensor, Tensor]:
        """``([B], [B])`` float64: the relative error bound ``e`` of every diagonal entry and
        of the trace (``x / (1 + e) <= true <= x / (1 - e)``): columns off by ``a`` make
        squared norms off by ``(1 + a)^2 - 1``, and a float64 sum of ``n`` squares adds
        ``gamma_n`` (``n = m`` for an entry, ``m d`` for the trace; the trace's ``a`` is
        :attr:`fro_err`)."""
        j = (1 + self._a_priori(self.ad_err)).square() - 1
        f = (1 + self._a_priori(self.fro_err)).square() - 1
        return (j + sum_rel_bound(self.m + 1) * (1 + j),
                f + sum_rel_bound(self.m * self.d + 1) * (1 + f))

    def _diag_bracket(self, s: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(point, low, high)`` ``[B, d]``: the diagonal as computed and the entries that
        bracket the true one at noise ``s`` and floor ``c`` (:meth:`_spectra`'s, intersected
        with :attr:`col_err`'s where it is read: ``D_k (1 - e_k)^2 / (1 + gamma)`` to ``D_k
        (1 + e_k)^2 / (1 - gamma)``, ``gamma`` the float64 sum's, plus the squares that
        underflowed; the columns exactly 0 and :attr:`col_floor`'s as there)."""
        point, low, high, _, _ = self._spectra("diag")
        if self.col_err is None:
            return point, low, high
        e = torch.where(point > 0, self.col_err.to(point), 0.0)  # (0 * inf: no NaN)
        g = sum_rel_bound(self.m + 1)
        t_low = point * (1 - e).clamp_min(0).square() / (1 + g)
        t_high = torch.where(self._zero_cols(), 0.0,
                             point * (1 + e).square() / (1 - g) + (self.m + 1) * SUBNORMAL)
        if self.col_floor is not None:
            t_high = torch.maximum(t_high, self.col_floor)
        return point, torch.maximum(low, t_low), torch.minimum(high, t_high)

    def _bracket(self, variant: str, s: Tensor, c: float
                 ) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
        """:meth:`_spectra`'s five, the diagonal's bracket read per column where
        :attr:`col_err` is (:meth:`_diag_bracket`)."""
        if variant == "diag":
            return (*self._diag_bracket(s, c), self.d, torch.ones_like(s))
        return self._spectra(variant)

    def _zero_cols(self) -> Tensor:
        return self.zero_cols if self.zero_cols is not None else self.diag == 0

    def _need_spectrum(self) -> None:
        if self.eigvals is None:
            raise InvalidInputError(
                "this ExactFisher was computed without the spectrum (spectrum=False); the "
                "log-det variant needs it"
            )

    def _spectra(self, variant: str) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
        """``(point, low, high, terms, scale)``: the spectrum as computed and the two that
        bracket the true one entry by entry (``[B, n]``), how many float64 terms the log-sum
        adds, and ``[B]`` the scale ``t`` they are in: the log det's spectra are of ``t J``
        (``t`` a power of two near ``1 / s_max``: squared singular values of 1e-162 underflowed
        to 0, and the log det read ``-inf``), to be read at noise ``t sigma``; 1 for the
        diagonal."""
        zc = self._zero_cols()
        if variant == "diag":
            e = self.rel_err()[0].unsqueeze(1)
            low = self.diag / (1 + e)
            high = torch.where(e < 1, self.diag / (1 - e).clamp_min(U64), math.inf)
            # squares that underflowed: up to m subnormals each (none in an exact-zero column)
            high = torch.where(zc, 0.0, high + (self.m + 1) * SUBNORMAL)
            if self.col_floor is not None:  # (computed 0, not structurally: the reading's)
                high = torch.maximum(high, self.col_floor)
            return self.diag, low, high, self.d, torch.ones_like(self.trace)
        self._need_spectrum()
        sv = (self.singular_values if self.singular_values is not None
              else self.eigvals.clamp_min(0).sqrt())
        top = sv.amax(dim=1)
        t = torch.where(top > 0, torch.exp2(-torch.floor(torch.log2(
            torch.where(top > 0, top, 1.0)))), 1.0)
        sv = sv * t.unsqueeze(1)
        a, e_tr = self._a_priori(self.fro_err), self.rel_err()[1]
        svd = (self.svd_err * t if self.svd_err is not None else torch.zeros_like(self.trace))
        # Weyl: the SVD's own error, plus ||dJ||_2 <= ||dJ||_F <= a ||J_true||_F (||J||_F from
        # the singular values: the trace's squares under- and overflow)
        fro = (torch.linalg.vector_norm(sv, dim=1) * torch.sqrt(1 + e_tr)
               / (1 - a).clamp_min(U64))
        delta = svd + torch.where(a < 1, a * fro, math.inf)
        if self.col_floor is not None:  # (columns computed 0 whose truth is not: in dJ too)
            delta = delta + self.col_floor.sum(dim=1).sqrt() * t
        delta = delta.unsqueeze(1)
        low = (sv - delta).clamp_min(0).square()
        high = (sv + delta).square()
        # k columns exactly 0: J^T J has at least k exact zero eigenvalues, of which the d - n
        # beyond the smaller side are implicit: the smallest k - (d - n) computed ones are 0
        n = sv.shape[1]
        k = (zc.sum(dim=1, keepdim=True) - (self.d - n)).clamp_min(0)
        exact0 = torch.arange(n, device=sv.device).unsqueeze(0) < k
        point = sv.square()
        return (torch.where(exact0, 0.0, point), torch.where(exact0, 0.0, low),
                torch.where(exact0, 0.0, high), n, t)

    def _exact_neg_inf(self, variant: str, c: float) -> Tensor:
        """``[B]`` bool: FSInfo is ``-inf`` exactly (without a floor or prior: ``m < d`` for
        the log det, or a column of ``J`` exactly 0)."""
        if c > 0:
            return torch.zeros_like(self.trace, dtype=torch.bool)
        zero = self._zero_cols().any(dim=1)
        return zero | (self.m < self.d) if variant == "logdet" else zero

    def _bracketed(self, variant: str, s: Tensor, c: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(value, half-width, bound, exact -inf)`` per sample at noise ``s`` and constant
        ``c``: the value at the computed spectrum, or the upper bracket's where the lower one
        reaches ``-inf`` and the upper does not (``bound``); no claim (half-width ``inf``)
        where the upper bracket is not finite and that is not exact."""
        point, low, high, n, t = self._bracket(variant, s, c)
        d, st = self.d, s * t
        value = fsinfo_from_spectrum(point, d, st, c)
        lo = fsinfo_from_spectrum(low, d, st, c)
        hi = fsinfo_from_spectrum(high, d, st, c)
        arith = logsum_rounding(point, d, st, c)
        exact = self._exact_neg_inf(variant, c)
        value = torch.where(exact, -math.inf, value)
        none = ~exact & ~torch.isfinite(hi)  # (an allowance without bound, or underflow)
        bound = torch.isneginf(lo) & ~exact & ~none
        hw = torch.where(bound, arith, torch.maximum(hi - value, value - lo) + arith)
        hw = torch.where(none, math.inf, torch.where(exact, 0.0, hw))
        value = torch.where(bound, hi, value)
        return value, hw, bound, exact

    def _bound_warning(self, bound: Tensor) -> dict[str, str]:
        if not bool(bound.any()):
            return {}
        why = (f"sample(s) {bound.nonzero().flatten().tolist()}: J^T J is singular to float64's "
               "resolution (a singular value within the SVD's and autograd's rounding of 0, "
               "e.g. a layer narrower than the input), so the log det without a prior is only "
               "bounded above: value = that upper bound, bound=True, ci95() = (-inf, value]")
        warn_user(f"{why}. Give prior_var= for the finite Bayesian (van Trees) version, or use "
                  "variant='diag'.", SingularFisherWarning)
        return {"bound_reason": why}

    def fsinfo(self, sigma: float | Tensor = 0.1, variant: str = "diag", *,
               prior_var: float | None = None, floor: float = DIAG_FLOOR) -> MetricResult:
        """Exact FSInfo (see :func:`fsinfo`), its interval the oracle's rounding."""
        check_sigma(sigma, self.batch)
        lam = _check_options(variant, prior_var, floor)
        d, m = self.d, self.m
        s = as_sigma(sigma, self.batch, self.diag.device)
        if variant == "diag":
            value, hw, bound, exact = self._bracketed("diag", s, floor)
            singular, metric, info = None, "fsinfo_diag", {"floor": floor}
        else:
            value, hw, bound, exact = self._bracketed("logdet", s, lam)
            singular = exact
            _warn_singular(singular, m, d)
            metric, info = "fsinfo_logdet", {"prior_var": prior_var}
            info.update(self._bound_warning(bound))
        info["oracle_rel_err"] = self.rel_err()[0].tolist()
        return MetricResult(
            value=value, stderr=torch.zeros_like(value), metric=metric, units="nats/dim",
            estimator="exact", sigma=s, d=d, m=m, passes=min(m, d), singular=singular,
            ci_halfwidth=hw, bias_bound=_finite(hw), bound=bound,
            info={"backend": "reference", **info},
        )

    def dfil(self, sigma: float | Tensor = 0.1) -> MetricResult:
        """Exact dFIL ``tr(J^T J) / (sigma^2 d)`` (see :func:`dfil`), its interval the
        oracle's rounding (the trace's, the division's, and squares that underflowed: 0 only
        where ``J`` is exactly 0)."""
        check_sigma(sigma, self.batch)
        s = as_sigma(sigma, self.batch, self.trace.device)
        value = self.trace / (s**2 * self.d)
        e = self.rel_err()[1]
        under = torch.where(self._zero_cols().all(dim=1), 0.0,
                            (self.m * self.d + 1) * SUBNORMAL / (s**2 * self.d))
        hw = torch.where(e < 1, value * (e / (1 - e).clamp_min(U64) + 3 * U64) + under, math.inf)
        return MetricResult(
            value=value, stderr=torch.zeros_like(value), metric="dfil", units="1/dim",
            estimator="exact", sigma=s, d=self.d, m=self.m, passes=min(self.d, self.m),
            ci_halfwidth=hw, bias_bound=_finite(hw),
            info={"backend": "reference", "oracle_rel_err": e.tolist()},
        )

    def sigma_interval(self, target: float | Tensor = -1.0, variant: str = "diag", *,
                       prior_var: float | None = None, floor: float = DIAG_FLOOR
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``(sigma*, low, high)`` (``[B]`` float64 each): FSInfoGuard's noise scale from the
        computed spectrum and its interval from the two that bracket the true one (FSInfo grows
        with every entry, so each solves for its own ``sigma*``), widened by the log-sum's
        rounding and the solver's resolution. Where the log det is only bounded (see
        :meth:`fsinfo`), ``sigma*`` is the upper bracket's (the most noise it may need); where
        the upper bracket is not finite (no claim), the upper end is ``inf``."""
        lam = _check_options(variant, prior_var, floor)
        check_target(target, self.batch)  # (a string or a [k != B] target: torch's raw errors)
        c = floor if variant == "diag" else lam
        point, low, high, n, t = self._bracket(
            variant, torch.ones(self.batch, dtype=torch.float64, device=self.trace.device), c)
        exact = self._exact_neg_inf(variant, c)
        if variant == "logdet":
            _warn_singular(exact, self.m, self.d)
        tau = as_sigma(target, self.batch, point.device)
        # an upper bracket that is not finite (an allowance without bound): no upper end (the
        # bisection read inf / inf and settled at sigma^2's overflow, 2^512, helper 97)
        none = ~torch.isfinite(high).all(dim=1) & ~exact
        high = torch.where(none.unsqueeze(1), point, high)
        bound = torch.isneginf(fsinfo_from_spectrum(low, self.d, 1.0, c)) & ~exact & ~none
        if variant == "logdet":
            self._bound_warning(bound)
        # (the spectra of t J: their sigma* is t times J's)
        sig = sigma_for_target(torch.where(bound.unsqueeze(1), high, point), self.d, tau, c) / t
        sig = torch.where(exact, 0.0, sig)
        # the log-sum's rounding at sigma*: the target read that much higher or lower
        s = torch.where(torch.isfinite(sig) & (sig > 0), sig, torch.ones_like(sig))
        arith = logsum_rounding(point, self.d, s * t, c)
        # (the bisection stops within 4 eps of the root in log sigma)
        lo = sigma_for_target(low, self.d, tau + arith, c) / t * (1 - 16 * U64)
        hi = sigma_for_target(high, self.d, tau - arith, c) / t * (1 + 16 * U64)
        lo, hi = torch.where(exact, 0.0, lo), torch.where(exact, 0.0, hi)
        hi = torch.where(none, math.inf, hi)
        return sig, torch.minimum(lo, sig), torch.maximum(hi, sig)

    def fsinfo_sigma(self, target: float | Tensor = -1.0, variant: str = "diag", *,
                     prior_var: float | None = None, floor: float = DIAG_FLOOR) -> SigmaResult:
        """Exact FSInfoGuard ``sigma*`` per sample (see :func:`fsinfo_sigma`) as a
        :class:`~fsinfo_fast.result.SigmaResult` (the kind every ``fsinfo_sigma`` returns),
        its interval :meth:`sigma_interval`'s; ``converged`` False where that claims no upper
        end for a finite ``sigma*``."""
        sig, lo, hi = self.sigma_interval(target, variant, prior_var=prior_var, floor=floor)
        tau = as_sigma(target, self.batch, sig.device)
        # (an upper end of inf for a finite sigma*: the oracle claims no interval there)
        conv = torch.isfinite(hi) | ~torch.isfinite(sig)
        return SigmaResult(sigma=sig, target=tau, metric=f"fsinfo_{variant}", estimator="exact",
                           ci_low=lo, ci_high=hi, converged=conv,
                           info={"backend": "reference",
                                 "oracle_rel_err": self.rel_err()[0].tolist()})


def check_finite_jacobian(J: Tensor) -> None:
    """Raise :class:`~fsinfo_fast.NonFiniteProbeError` where a sample's float64 Jacobian
    (``[B, m, d]``) has a NaN or infinite entry: an infinite derivative at this input (``sqrt``
    or ``log`` at 0, ``|x|^p`` with ``p < 1``) or an overflow. The metrics are not defined
    there, and a value computed from it was NaN (as the randomized routes' probes refuse it)."""
    bad = ~torch.isfinite(J).flatten(1).all(dim=1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise NonFiniteProbeError(
            f"the float64 Jacobian of sample(s) {idx[:8]} (batch index) has non-finite entries: "
            "a non-finite derivative of the encoder at this input (e.g. sqrt or log at 0, "
            "|x|^p with p < 1) or an overflow, so FSInfo and dFIL are not defined there; move "
            "the input off that point (or drop the sample)")


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
    check_finite_jacobian(J)
    mu = zero = svd = sv = None
    if spectrum:
        sv, zero, svd = _svd_spectrum(J)
        mu = sv.square()
    return ExactFisher(diag=(J**2).sum(dim=1), trace=(J**2).sum(dim=(1, 2)), eigvals=mu,
                       zero=zero, d=enc.d, m=enc.m, svd_err=svd, singular_values=sv,
                       zero_cols=(J == 0).all(dim=1))


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
) -> SigmaResult:
    r"""Exact FSInfoGuard noise scale per sample: the sigma whose FSInfo equals ``target``.

    Closed form without a prior or floor: :math:`\sigma^* = \exp(\mathrm{FSInfo}_{\sigma=1}-\tau)`;
    otherwise the monotone equation is solved to float64 precision
    (:func:`fsinfo_fast.formulas.sigma_for_target`). Returns a
    :class:`~fsinfo_fast.result.SigmaResult` (``.sigma``: ``[B]`` float64; its interval the
    oracle's rounding).
    """
    _check_options(variant, prior_var, floor)
    # the fast path's check: a string or a [k != B] target raised torch's raw errors here
    check_target(target, x.shape[0] if isinstance(x, Tensor) and x.ndim > 0 else None)
    ex = exact_fisher(encoder, x, spectrum=variant == "logdet", chunk_size=chunk_size,
                      budget_bytes=budget_bytes)
    return ex.fsinfo_sigma(target, variant, prior_var=prior_var, floor=floor)
