r"""The unbiased estimator of ``log(D + a)`` from a scaled chi-square (the floor of FSInfo_diag).

Setting: ``s = D X / K`` with ``X ~ chi2_K`` (the mean of ``K`` squared Gaussian probe values of
a column, ``D = (J^T J)_kk``), and a known ``a > 0`` (``floor * sigma^2``). The plug-in
``log(s + a) - E[log(chi2_K/K)]`` is biased upwards by up to ``-E[log(chi2_K/K)]`` (0.05 at
``K = 20``) when ``D`` is near or below ``a``. Since ``s`` is a complete sufficient statistic of
the scale family, there is exactly one unbiased function of ``s``, and it has a closed form.
With ``alpha = K/2``, ``x = alpha s / a`` and ``G = alpha s / D ~ Gamma(alpha, 1)``:

.. math::

    E\big[\log a + H_\alpha(x)\big] = \log(D + a), \qquad
    H_\alpha(x) = \sum_{n\ge1} \frac{(-1)^{n+1} x^n}{n\,(\alpha)_n}
                = \int_0^x \frac{1 - M(1, \alpha, -t)}{t}\,dt ,

(``(alpha)_n`` the rising factorial, ``M`` Kummer's function). Proof: ``(alpha)_n^{-1}
Gamma(alpha + n)/Gamma(alpha) = 1`` makes ``E[x^n] / (alpha)_n = (D/a)^n``, so for ``D < a`` the
series of ``log(1 + D/a)`` is reproduced term by term (absolutely convergent), and both sides are
analytic in ``D`` on ``Re D > 0`` (``H_alpha`` grows like ``log x``), so they agree for every
``D > 0``. ``H_alpha`` is increasing, ``H_alpha(0) = 0``, and for large ``x``

.. math::

    H_\alpha(x) = \log x - \psi(\alpha) + E_\alpha(x), \quad
    E_\alpha(x) = \int_x^\infty \frac{M(1,\alpha,-t)}{t}dt
    \sim (\alpha - 1) \sum_{n\ge0} \frac{(2-\alpha)_n}{(n+1)\,x^{n+1}} ,

so far above the floor the estimator is the floor-free ``log s - E[log(chi2_K/K)]`` plus the
small correction ``E_alpha(x)`` (``(alpha - 1)/x``; the plug-in adds ``log(1 + alpha/x)`` there,
whence its bias ``~ 1/x``). ``M(1, alpha, -t)`` solves ``t M' + (alpha - 1 + t) M = alpha - 1``
and lies in ``(0, 1]`` for ``alpha >= 1``.

Numerics (float64), per ``alpha`` (cached): the power series for ``x <= 1/2`` (30 terms), the
asymptotic series for ``x >= 32 (alpha + 12) + 40`` (12 terms; the exponentially small part of
``M`` is below ``1e-17`` there), and in between a quintic Hermite interpolant in ``log x`` on a
grid of step ``1/16``, whose values are integrals of ``M(1, alpha, -e^y)`` (``scipy``'s
``hyp1f1``, relative error about ``2e-13``) by 8-point Gauss-Legendre per cell, and whose first
and second derivatives are exact (``dE/dy = -M``, ``d^2E/dy^2 = (alpha - 1 + x) M - (alpha - 1)``).
:data:`H_ABS_ERR` bounds the absolute error of :func:`log_floor_term` and is checked against
``mpmath`` in the tests; estimators report it as a bias bound.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["H_ABS_ERR", "floor_correction", "h_alpha", "log_floor_term", "x_hi"]

#: Bound on the absolute error of ``H_alpha`` (hence of one column's term) as computed here,
#: for ``alpha`` in ``[1/2, 5000]``; the tests compare with ``mpmath`` at 40 digits. Measured
#: at most 1.32e-11 (``alpha = 1/2``, ``x ~ 3.36``, the table region; it was set to 1e-11 there,
#: helper 137), hence 2e-11.
H_ABS_ERR = 2e-11

_X_LO = 0.5
_N_SERIES = 30
_N_ASYM = 12
_STEP = 1.0 / 16.0
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


def x_hi(alpha: float) -> float:
    """Where the asymptotic series of ``E_alpha`` takes over (``32 (alpha + 12) + 40``)."""
    return 32.0 * (alpha + _N_ASYM) + 40.0


def _series_coeffs(alpha: float) -> np.ndarray:
    """``(-1)^{n+1} / (n (alpha)_n)`` for ``n = 1..N``."""
    c = np.empty(_N_SERIES)
    poch = 1.0
    for n in range(1, _N_SERIES + 1):
        poch *= alpha + n - 1
        c[n - 1] = (-1.0) ** (n + 1) / (n * poch)
    return c


def _asym_coeffs(alpha: float) -> np.ndarray:
    """``(alpha - 1) (2 - alpha)_n / (n + 1)`` for ``n = 0..N-1`` (coefficients of
    ``x^{-(n+1)}`` in ``E_alpha``)."""
    c = np.empty(_N_ASYM)
    poch = 1.0
    for n in range(_N_ASYM):
        c[n] = (alpha - 1.0) * poch / (n + 1)
        poch *= 2.0 - alpha + n
    return c


def _kummer(alpha: float, t: np.ndarray) -> np.ndarray:
    """``M(1, alpha, -t)`` (float64)."""
    from scipy.special import hyp1f1

    return hyp1f1(1.0, alpha, -t)


def _asym_e(alpha: float, x: np.ndarray) -> np.ndarray:
    c = _asym_coeffs(alpha)
    r = 1.0 / x
    acc = np.zeros_like(x)
    for cn in c[::-1]:
        acc = (acc + cn) * r
    return acc


class _Table:
    """Quintic Hermite table of ``E_alpha`` on ``y = log x`` in ``[log 1/2, log x_hi]``."""

    def __init__(self, alpha: float) -> None:
        from scipy.special import digamma

        self.alpha = alpha
        self.psi = float(digamma(alpha))
        self.x_hi = x_hi(alpha)
        y0, y1 = math.log(_X_LO), math.log(self.x_hi)
        n = int(math.ceil((y1 - y0) / _STEP))
        self.y0, self.n = y0, n
        y = y0 + _STEP * np.arange(n + 1)
        self.x_top = math.exp(y[-1])
        # cell integrals of M(1, alpha, -e^y) dy by Gauss-Legendre
        mid = 0.5 * (y[:-1] + y[1:])
        nodes = mid[:, None] + 0.5 * _STEP * _GL_X[None, :]
        cells = 0.5 * _STEP * (_kummer(alpha, np.exp(nodes)) * _GL_W).sum(axis=1)
        tail = _asym_e(alpha, np.array([self.x_top]))[0]
        e = np.empty(n + 1)
        e[n] = tail
        e[:n] = tail + np.cumsum(cells[::-1])[::-1]
        x = np.exp(y)
        m = _kummer(alpha, x)
        self.e = torch.from_numpy(e)
        self.d1 = torch.from_numpy(-m)
        self.d2 = torch.from_numpy((alpha - 1.0 + x) * m - (alpha - 1.0))
        self.series = torch.from_numpy(_series_coeffs(alpha))
        self.asym = torch.from_numpy(_asym_coeffs(alpha))

    def e_mid(self, x: Tensor) -> Tensor:
        """``E_alpha(x)`` for ``1/2 <= x <= x_top`` (quintic Hermite in ``log x``)."""
        dev = x.device
        e, d1, d2 = (t.to(dev) for t in (self.e, self.d1, self.d2))
        u = (torch.log(x) - self.y0) / _STEP
        i = u.floor().clamp(0, self.n - 1).long()
        t = (u - i).clamp(0.0, 1.0)
        h = _STEP
        p0, p1 = e[i], e[i + 1]
        m0, m1 = d1[i] * h, d1[i + 1] * h
        a0, a1 = d2[i] * h * h, d2[i + 1] * h * h
        t2 = t * t
        t3 = t2 * t
        t4 = t3 * t
        t5 = t4 * t
        h00 = 1 - 10 * t3 + 15 * t4 - 6 * t5
        h01 = 10 * t3 - 15 * t4 + 6 * t5
        h10 = t - 6 * t3 + 8 * t4 - 3 * t5
        h11 = -4 * t3 + 7 * t4 - 3 * t5
        h20 = 0.5 * (t2 - 3 * t3 + 3 * t4 - t5)
        h21 = 0.5 * (t3 - 2 * t4 + t5)
        return h00 * p0 + h01 * p1 + h10 * m0 + h11 * m1 + h20 * a0 + h21 * a1

    def h_small(self, x: Tensor) -> Tensor:
        """``H_alpha(x)`` for ``0 <= x <= 1/2`` (power series)."""
        c = self.series.to(x.device)
        acc = torch.zeros_like(x)
        for cn in c.flip(0):
            acc = (acc + cn) * x
        return acc

    def e_large(self, x: Tensor) -> Tensor:
        """``E_alpha(x)`` for ``x >= x_hi`` (asymptotic series)."""
        c = self.asym.to(x.device)
        r = 1.0 / x
        acc = torch.zeros_like(x)
        for cn in c.flip(0):
            acc = (acc + cn) * r
        return acc


@lru_cache(maxsize=512)
def _table(alpha: float) -> _Table:
    return _Table(alpha)


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not (0.5 <= a <= 5000.0) or (2 * a) != round(2 * a):
        raise ValueError(f"alpha = K/2 must be a half-integer in [1/2, 5000], got {alpha!r}")
    return a


@lru_cache(maxsize=4096)
def _asym_tuple(alpha: float) -> tuple[float, ...]:
    return tuple(float(c) for c in _asym_coeffs(alpha))


def _asym_terms(alpha: float, x_min: float) -> tuple[float, ...]:
    """The coefficients of the asymptotic series still above ``1e-19`` at ``x >= x_min``."""
    c = _asym_tuple(alpha)
    n = 0
    while n < len(c) and abs(c[n]) > 1e-19 * x_min ** (n + 1):
        n += 1
    return c[:n]


def floor_correction(x: Tensor, alpha: float, x_min: float | None = None, *,
                     overwrite: bool = False) -> Tensor:
    r"""``E_alpha(x) = H_alpha(x) - log x + psi(alpha)`` elementwise, for ``x > 0`` (float64).

    The amount by which the unbiased floor term exceeds the floor-free unbiased
    ``log s - E[log(chi2_K / K)]``; tends to ``-log x`` as ``x -> 0`` and to ``(alpha-1)/x``
    as ``x -> inf``. Where every ``x`` is beyond :func:`x_hi` (columns far above the floor) it
    is the asymptotic series alone, with only the terms above ``1e-19`` (one or two far from
    the floor): about the cost of the plug-in's ``log1p``. ``x_min``: ``x.min()`` if known.
    ``overwrite``: ``x`` is a temporary the caller no longer needs (the series then works in
    its memory; the values are the same either way).
    """
    alpha = _check_alpha(alpha)
    if x.numel() == 0:
        return torch.zeros_like(x)
    lo_x = float(x.min()) if x_min is None else x_min
    if lo_x >= x_hi(alpha):
        coef = _asym_terms(alpha, lo_x)
        if not coef:
            return torch.zeros_like(x)
        # Horner: ((c_n r + c_{n-1}) r + ...) r, the first product c_n r without a fill
        r = x.reciprocal_() if overwrite else torch.reciprocal(x)
        if overwrite and len(coef) == 1:
            return r.mul_(coef[0])
        acc = r * coef[-1]
        for cn in coef[-2::-1]:
            acc.add_(cn).mul_(r)
        return acc
    tab = _table(alpha)
    lo = x < tab.x_top
    if not bool(lo.any()):
        return tab.e_large(x)
    out = torch.empty_like(x)
    hi = ~lo
    if bool(hi.any()):
        out[hi] = tab.e_large(x[hi])
    # each regime evaluated on its own entries only
    small = x <= _X_LO
    mid = lo & ~small
    if bool(mid.any()):
        out[mid] = tab.e_mid(x[mid])
    if bool(small.any()):
        xs = x[small]
        out[small] = tab.h_small(xs) - torch.log(xs) + tab.psi
    return out


def h_alpha(x: Tensor, alpha: float) -> Tensor:
    r"""``H_alpha(x)`` elementwise for ``x >= 0`` (float64; ``H_alpha(0) = 0``)."""
    tab = _table(_check_alpha(alpha))
    x = x.to(torch.float64)
    out = torch.empty_like(x)
    small = x <= _X_LO
    out[small] = tab.h_small(x[small])
    big = ~small
    xb = x[big]
    out[big] = torch.log(xb) - tab.psi + floor_correction(xb, alpha)
    return out


def log_floor_term(s: Tensor, k: int, a: Tensor | float) -> Tensor:
    r"""Unbiased estimate of ``log(D + a)`` from ``s ~ D chi2_k / k`` (elementwise, float64).

    ``log a + H_{k/2}(k s / (2a))``; equals ``log a`` where ``s = 0``.

    Args:
        s: ``[...]`` float64, ``>= 0``.
        k: degrees of freedom (probes), ``>= 1``.
        a: ``> 0``, broadcastable to ``s``.

    Example:
        >>> s = torch.tensor([0.0, 1e-3, 1.0, 1e6], dtype=torch.float64)
        >>> t = log_floor_term(s, 4, 1.0)
        >>> bool(t[0] == 0.0), bool((t.diff() > 0).all())
        (True, True)
    """
    a = torch.as_tensor(a, dtype=torch.float64, device=s.device)
    return torch.log(a) + h_alpha(k * s / (2.0 * a), k / 2.0)
