r"""The closed-form pieces of the metrics, as pure functions of spectra.

Everything here works on a per-sample *spectrum-like* vector ``mu`` (eigenvalues of ``J^T J``, or
its diagonal for the diagonal variant) and is shared by the exact reference and the randomized
estimators, so the two can differ only in how ``mu`` (or its log-sum) is obtained.

With ``c`` the constant added inside the logarithm (the prior precision ``lambda`` for the
log-det variant, the ``1e-10`` floor for the diagonal variant) and ``d`` the input dimension:

.. math::

    \mathrm{FSInfo}(x) = \frac{1}{2d} \sum_{k=1}^{d} \log\Big(\frac{\mu_k}{\sigma^2} + c\Big)
                         - \frac{1}{2}\log(2\pi e)

where entries of ``mu`` not given (``len(mu) < d``, the zero eigenvalues of the larger side)
contribute ``log(c)`` each (``-inf`` when ``c = 0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import InvalidInputError, check_int

#: ``(1/2) log(2 pi e)``: the per-dimension entropy of a unit Gaussian, in nats.
HALF_LOG_2PIE: float = 0.5 * math.log(2.0 * math.pi * math.e)

#: The floor the paper's code adds inside the logarithm of the diagonal variant.
DIAG_FLOOR: float = 1e-10

__all__ = [
    "DIAG_FLOOR",
    "HALF_LOG_2PIE",
    "as_sigma",
    "fsinfo_from_spectrum",
    "sigma_for_target",
    "nats_to_bits",
    "sum_rel_bound",
    "SUBNORMAL",
]


#: The smallest positive float64 (subnormal): what one square that underflowed to 0 may be.
SUBNORMAL: float = 2.0**-1074


def sum_rel_bound(n: int) -> float:
    """``n u / (1 - n u)`` (``u`` float64's unit roundoff): the relative error bound of a float64
    sum of ``n`` non-negative terms in any order (``inf`` where ``n u >= 1``).

    Example:
        >>> sum_rel_bound(1000) < 1.2e-13
        True
    """
    nu = n * torch.finfo(torch.float64).eps / 2
    return nu / (1.0 - nu) if nu < 1 else math.inf


def logsum_rounding(mu: Tensor, d: int, sigma: Tensor, c: float) -> Tensor:
    """``[B]``: a bound on the float64 rounding of :func:`fsinfo_from_spectrum` itself (its
    ``n`` logs, each within a unit roundoff of its term, their sum, and the constant), for the
    spectrum ``mu`` ``[B, n]`` at noise ``sigma`` (``[B]``) and constant ``c`` (the ``d - n``
    implicit terms ``log(c)`` counted where ``c > 0``)."""
    terms = torch.log(mu / sigma.square().unsqueeze(1) + c).abs()
    total = torch.where(torch.isfinite(terms), terms, 0.0).sum(dim=1)
    n = mu.shape[1]
    if d > n and c > 0:
        total = total + (d - n) * abs(math.log(c))
    u = torch.finfo(torch.float64).eps / 2
    return (sum_rel_bound(n + 2) + u) * (total / (2 * d) + HALF_LOG_2PIE)


def nats_to_bits(value: Tensor | float) -> Tensor | float:
    """Convert nats to bits (divide by ``ln 2``)."""
    return value / math.log(2.0)


def as_sigma(sigma: float | Tensor, batch: int, device: torch.device | None = None) -> Tensor:
    """Broadcast a noise scale to a float64 tensor of shape ``[B]``."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    if s.ndim == 0:
        s = s.expand(batch)
    return s.reshape(batch)


def _check_spectrum(mu: Tensor) -> Tensor:
    """``mu`` as float64 ``[B, n]``, small negative rounding clamped to 0."""
    if not isinstance(mu, Tensor) or mu.ndim != 2:
        shape = tuple(mu.shape) if isinstance(mu, Tensor) else type(mu).__name__
        raise InvalidInputError(
            f"mu must be a [B, n] tensor (one spectrum per sample), got {shape}; for one "
            "sample pass mu[None]")
    return mu.to(torch.float64).clamp_min(0.0)


def fsinfo_from_spectrum(
    mu: Tensor, d: int, sigma: float | Tensor, c: float = 0.0
) -> Tensor:
    r"""FSInfo (nats per input dimension) from a per-sample spectrum.

    Args:
        mu: ``[B, n]`` non-negative values (eigenvalues of ``J^T J`` on the smaller side, or the
            diagonal of ``J^T J``), ``n <= d``. Small negative rounding is clamped to 0.
        d: the input dimension; ``d - n`` implicit zeros contribute ``log(c)`` each.
        sigma: noise scale, a float or a ``[B]`` tensor.
        c: constant inside the logarithm (prior precision or floor), ``>= 0``.

    Returns:
        ``[B]`` float64: :math:`\frac{1}{2d}\sum_k \log(\mu_k/\sigma^2 + c) - \frac12\log 2\pi e`.
        ``-inf`` where a term is ``log 0``; never NaN for finite inputs.

    Example:
        >>> import torch
        >>> mu = torch.tensor([[4.0, 1.0]], dtype=torch.float64)
        >>> v = fsinfo_from_spectrum(mu, d=2, sigma=1.0)
        >>> round(float(v + HALF_LOG_2PIE), 6)  # (log 4 + log 1) / 4
        0.346574
    """
    mu = _check_spectrum(mu)
    b, n = mu.shape
    d, c = _check_d_c(d, c, n)
    s = as_sigma(sigma, b, mu.device)
    # sigma enters squared: a negative one read as |sigma|, NaN gave NaN
    if not bool((s >= 0).all()):
        raise InvalidInputError(f"sigma must be >= 0 (the noise's standard deviation), got "
                                f"{sigma!r}")
    return _fsinfo_at_log_sigma(mu, d, torch.log(s), c)


def _check_d_c(d: int, c: float, n: int) -> tuple[int, float]:
    """``d`` (an int ``>= max(n, 1)``) and ``c`` (a finite float ``>= 0``), checked."""
    import numbers

    d = check_int(d, "d", lo=1)
    if n > d:
        raise InvalidInputError(f"spectrum has {n} entries but d = {d}")
    if isinstance(c, Tensor) and c.numel() == 1:
        c = c.item()
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(float(c)) \
            or c < 0:
        raise InvalidInputError(
            f"c (the constant inside the logarithm: prior precision or floor) must be a finite "
            f"number >= 0, got {c!r}")
    return d, float(c)


def _fsinfo_at_log_sigma(mu: Tensor, d: int, log_s: Tensor, c: float) -> Tensor:
    """:func:`fsinfo_from_spectrum` at ``log(sigma)`` (``[B]``, ``-inf`` allowed): each term
    ``log(mu_k / sigma^2 + c)`` as ``log mu_k - 2 log sigma`` (``c = 0``) or its ``logaddexp``
    with ``log c``, finite wherever the value is (``sigma^2`` overflowed at ``1e155``, underflowed
    at ``1e-160``); a zero entry is ``log c`` at every sigma (also ``sigma = 0``, its limit), and
    a ``-inf`` term (``c = 0``) makes the value ``-inf`` (as at every ``sigma > 0``)."""
    n = mu.shape[1]
    x = torch.log(mu) - 2.0 * log_s[:, None]
    x = torch.where(mu == 0, torch.full_like(x, -math.inf), x)  # 0 / sigma^2 = 0
    term = x if c == 0 else torch.logaddexp(x, torch.full_like(x, math.log(c)))
    total = term.sum(dim=1)
    if n < d:
        total = total + (d - n) * (math.log(c) if c > 0 else -math.inf)
    neg = (term == -math.inf).any(dim=1) | (n < d and c == 0)
    total = torch.where(neg, torch.full_like(total, -math.inf), total)
    return total / (2.0 * d) - HALF_LOG_2PIE


def sigma_for_target(
    mu: Tensor, d: int, target: float | Tensor, c: float = 0.0, iters: int = 200
) -> Tensor:
    r"""Noise scale that makes :func:`fsinfo_from_spectrum` equal ``target`` (FSInfoGuard).

    With ``c = 0`` this is the paper's closed form
    :math:`\sigma^* = \exp(\mathrm{FSInfo}_{\sigma=1} - \tau)`. With ``c > 0`` (prior or floor) the
    map ``log sigma -> FSInfo`` is still strictly decreasing, and the root is found by bisection in
    ``log sigma`` to float64 resolution, seeded with the closed form.

    Args:
        mu: ``[B, n]`` spectrum as in :func:`fsinfo_from_spectrum`.
        d: input dimension.
        target: the target FSInfo ``tau`` in nats per dimension (float or ``[B]``).
        c: constant inside the logarithm.
        iters: bisection steps (each halves the bracket in ``log sigma``).

    Returns:
        ``[B]`` float64 sigma*. ``0`` where FSInfo is ``-inf`` at every sigma, or (``c > 0``)
        where the spectrum is 0 and FSInfo is its asymptote, below the target (no noise needed);
        ``inf`` where no finite sigma lowers FSInfo to ``target`` (with ``c > 0`` FSInfo never
        drops below ``log(c)/2 - log(2 pi e)/2``).

    Example:
        >>> import torch
        >>> mu = torch.tensor([[4.0, 1.0]], dtype=torch.float64)
        >>> s = sigma_for_target(mu, d=2, target=-1.0)
        >>> round(float(fsinfo_from_spectrum(mu, 2, s)), 9)
        -1.0
    """
    mu = _check_spectrum(mu)
    b = mu.shape[0]
    d, c = _check_d_c(d, c, mu.shape[1])
    tau = as_sigma(target, b, mu.device)
    if bool(torch.isnan(tau).any()):
        # NaN compares false everywhere: the bracket search returned its start, a finite sigma
        raise InvalidInputError(f"target must be a number (FSInfo in nats/dim), got {target!r}")
    f1 = fsinfo_from_spectrum(mu, d, 1.0, 0.0)  # c = 0 closed form
    closed = torch.exp(f1 - tau)
    if c == 0.0:
        return closed
    # FSInfo(sigma) -> 0.5 log(c) - HALF_LOG_2PIE as sigma -> inf
    floor_value = 0.5 * math.log(c) - HALF_LOG_2PIE
    out = torch.empty(b, dtype=torch.float64, device=mu.device)
    unreachable = tau <= floor_value
    out[unreachable] = math.inf
    # target +inf: only sigma = 0 gives it (the closed form's answer for c = 0; the search
    # stopped at some 1e-211)
    out[tau == math.inf] = 0.0
    # a zero spectrum (the output does not depend on the input): FSInfo is the asymptote at
    # every sigma, already below the target: no noise needed (the search ran to exp(-400))
    silent = ((mu == 0).all(dim=1) | (tau == math.inf)) & ~unreachable
    out[silent] = 0.0
    idx = (~unreachable & ~silent).nonzero().flatten()
    if idx.numel() == 0:
        return out
    m, t = mu[idx], tau[idx]

    def g(log_s: Tensor) -> Tensor:
        return _fsinfo_at_log_sigma(m, d, log_s, c) - t

    # bracket: start at the closed-form guess (finite fallback 0), widen until the sign changes
    guess = torch.log(closed[idx])
    guess = torch.where(torch.isfinite(guess), guess, torch.zeros_like(guess))
    lo, hi = guess - 1.0, guess + 1.0
    for _ in range(200):
        bad = g(lo) <= 0  # FSInfo too small at lo: go lower
        if not bad.any():
            break
        lo = torch.where(bad, lo - 2.0 * (hi - lo), lo)
    for _ in range(200):
        bad = g(hi) > 0
        if not bad.any():
            break
        hi = torch.where(bad, hi + 2.0 * (hi - lo), hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        pos = g(mid) > 0
        lo = torch.where(pos, mid, lo)
        hi = torch.where(pos, hi, mid)
        if bool(((hi - lo) <= 4 * torch.finfo(torch.float64).eps * hi.abs().clamp_min(1)).all()):
            break
    out[idx] = torch.exp(0.5 * (lo + hi))
    return out
