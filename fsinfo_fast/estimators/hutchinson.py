r"""Hutchinson's trace estimator for ``tr(J^T J)`` (and dFIL) from Jacobian products.

For probes ``v`` with ``E[v v^T] = I`` (Gaussian or Rademacher; Hutchinson 1989,
"A stochastic estimator of the trace of the influence matrix for Laplacian smoothing splines"):

.. math::

    \mathrm{tr}(J^TJ) = E\,\|J v\|^2 \ (v \in \mathbb{R}^d,\ \text{input side, one JVP})
                      = E\,\|J^T u\|^2 \ (u \in \mathbb{R}^m,\ \text{output side, one VJP}).

The estimate is the mean of ``K`` iid per-probe values ``t_j``; its standard error is the sample
standard deviation over ``sqrt(K)`` (plus a rounding allowance ``sqrt(n) eps |value|`` in
quadrature, see :func:`with_rounding`). **Interval** (:func:`log_t_halfwidth`): the per-probe
values are right-skewed when a few singular values dominate (a weighted chi-square with few
effective degrees of freedom); the plain Student-t interval ``t_{K-1} se`` then undercovers,
because a low mean comes with a low standard deviation (1000 seeds on the test suite's
geometric spectra: 0.84-0.90 at ``K = 4``, 0.88-0.93 at ``K = 10``, 0.92-0.95 at ``K = 50``).
The half-width is therefore the upper side of the t-interval for ``log tr``,
``x (exp(t_{K-1} se / x) - 1) >= t_{K-1} se`` (``x`` the estimate), used on both sides: with
Gaussian probes, on the same spectra (4000 seeds) 0.92-0.94 at ``K = 4``, 0.93-0.94 at
``K = 10``, 0.95-0.96 at ``K = 50``, and indistinguishable from the t-interval where the
per-probe values are nearly Gaussian (VGG5 split 2 at 32 px: 0.050 vs 0.051 relative
half-width at ``K = 4``). Rademacher probes get the mean of the two half-widths
(:func:`log_t_halfwidth`, ``weight = 1/2``). That interval is the one of the adaptive rule's
last stage, whose mean and spread come from different probes. Where they come from the same
probes (a fixed ``num_probes``, or a sample recorded from a pilot stage) a low mean comes with
a low spread, and the log-scale interval undercovered where one direction dominates ``J^T J``
(rank one: 0.89-0.94 at ``K = 4..32``; one spike over a flat bulk: 0.84 at ``K = 4``); there
the half-width is ``m se`` with the multiplier of :func:`same_sample_multiplier`, exact for
that worst case and growing with the probes' sample skewness (:class:`TraceHalfwidth`,
:func:`skew_calibration`). With ``sigma`` given,
everything is scaled to dFIL, ``tr(J^T J) / (sigma^2 d)`` (Maeng et al. 2023), in 1/dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Container
from typing import Unpack

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ._skew_table import SKEW_BETA_95, SKEWED_T_95, TABLE_CONFIDENCE
from .base import (
    Estimate,
    Products,
    RowProducts,
    check_finite,
    detached,
    sample_ids_for,
    sigma_for,
    square_sum64,
)
from .probes import PROBE_KINDS, draw_probes, resolve_seed
from .stopping import StopKeywords, StoppingRule, estimate_from, resolve_rule, run_rounds

__all__ = [
    "hutchinson_trace",
    "log_t_halfwidth",
    "skew_weight",
    "sample_skewness",
    "same_sample_multiplier",
    "skew_calibration",
    "skewed_t_quantile",
    "TraceHalfwidth",
    "residual_halfwidth",
    "SIDES",
    "dominant_columns",
]

#: Which side the probes live on: ``input`` (``v in R^d``, JVPs), ``output`` (``u in R^m``, VJPs).
SIDES = ("input", "output")


def _check_side_kind(side: str, kind: str) -> None:
    if side not in SIDES:
        raise InvalidInputError(f"side must be one of {SIDES}, got {side!r}")
    if kind not in PROBE_KINDS:
        raise InvalidInputError(f"kind must be one of {PROBE_KINDS}, got {kind!r}")


def trace_scale(products: Products, sigma: float | Tensor | None) -> Tensor:
    """``[B]`` factor from ``tr(J^T J)`` to the reported value: ``1/(sigma^2 d)`` or 1."""
    if sigma is None:
        return torch.ones(products.batch, dtype=torch.float64, device=products.device)
    s = sigma_for(products, sigma)
    return 1.0 / (s**2 * products.d)


def mean_and_stderr(t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over probes of ``t [B, K]`` and its standard error ``std / sqrt(K)``."""
    k = t.shape[1]
    return t.mean(dim=1), t.std(dim=1, correction=1) / k**0.5


def log_t_halfwidth(
    value: Tensor, stderr: Tensor, dof: int, confidence: float = 0.95, weight: float = 1.0
) -> Tensor:
    r"""Symmetric half-width from the t-interval of ``log(value)`` for a positive mean of
    right-skewed values: ``value (exp(t_{dof} stderr / value) - 1)`` (its longer, upper side;
    ``>= t stderr``), blended with the plain ``t stderr`` as ``weight * log + (1 - weight) * t``.

    ``weight = 1`` for Gaussian probes; ``1/2`` for Rademacher probes, whose per-probe values
    are less skewed (the diagonal of the Gram matrix contributes no randomness): measured over
    4000 seeds on the test suite's four spectra at ``K = 50``, Rademacher coverage 0.92-0.95
    (plain t), 0.94-0.95 (``weight = 1/2``) and 0.955-0.96 (``weight = 1``).

    Returns ``[B]`` float64; 0 where ``stderr`` is 0, ``t stderr`` where ``value <= 0``.
    """
    from .base import t_quantile

    q = t_quantile(dof, confidence)
    lin = q * stderr
    pos = value > 0
    safe = torch.where(pos, value, torch.ones_like(value))
    hw = torch.where(pos, safe * torch.expm1(lin / safe), lin)
    hw = weight * hw + (1.0 - weight) * lin
    return torch.where(stderr == 0, torch.zeros_like(hw), hw)


#: Draws of the Monte Carlo behind :func:`skew_calibration` (a fixed seed per ``K``, so the
#: same constants every run): ``2^18`` up to ``K = 32``, ``2^23 / K`` beyond (at least
#: ``2^15``: the coverage they calibrate is then exact to about 0.001).
_PIVOT_DRAWS = 1 << 18
_PIVOT_VALUES = 1 << 23
#: Above this many probes the same-sample multiplier is :func:`skewed_t_quantile` (Edgeworth).
_PIVOT_MC_MAX_K = 256


def _pivot_edgeworth(k: int, confidence: float) -> float:
    r"""``P(|T| <= x) = 2 Phi(x) - 1 + (2/K) q_2(x) phi(x) + O(K^{-2})`` solved for ``x``, with
    Hall's (1992, "The Bootstrap and Edgeworth Expansion", Sec. 2.6) second-order term of the
    studentized mean, ``q_2(x) = x [kappa (x^2 - 3)/12 - gamma^2 (x^4 + 2x^2 - 3)/18 - (x^2 +
    3)/4]``, at chi-square-1 values (``gamma^2 = 8``, ``kappa = 12``); Hall's statistic divides
    by the ``1/K`` standard deviation, hence the factor ``sqrt((K-1)/K)``."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gap(x: float) -> float:
        q2 = x * ((x * x - 3.0) - 8.0 / 18.0 * (x**4 + 2 * x * x - 3.0) - (x * x + 3.0) / 4.0)
        return 2.0 * norm.cdf(x) - 1.0 + 2.0 / k * q2 * norm.pdf(x) - confidence

    x = brentq(gap, norm.ppf(0.5 * (1.0 + confidence)), 50.0, xtol=1e-12)
    return x * math.sqrt((k - 1.0) / k)


@functools.lru_cache(maxsize=4)
def _chi1_pivot_draws(k: int):
    """``(|T|, g1)`` of Monte Carlo samples of ``k`` iid chi-square-1 values (numpy; the
    studentized mean's absolute value and the sample skewness)."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(20251205 + k))
    rows = max(1, (1 << 22) // k)
    ts, gs = [], []
    left = min(_PIVOT_DRAWS, max(_PIVOT_VALUES // k, 1 << 15))
    while left > 0:
        n = min(rows, left)
        z = rng.standard_normal((n, k))
        z *= z
        xbar = z.mean(axis=1)
        dev = z - xbar[:, None]
        m2 = (dev * dev).mean(axis=1)
        ts.append(np.abs(xbar - 1.0) / np.sqrt(m2 * k / (k - 1.0) / k))
        gs.append((dev**3).mean(axis=1) / m2**1.5)
        left -= n
    return np.concatenate(ts), np.concatenate(gs)


def skewed_t_quantile(dof: int, confidence: float = 0.95) -> float:
    r"""``c`` with ``P(|T| <= c) = confidence`` for ``T = (xbar - mu) / (s / sqrt(K))``, the
    studentized mean of ``K = dof + 1`` iid values ``a + b chi2_1`` (any ``a``, ``b > 0``: ``T``
    does not depend on them; see :func:`skew_calibration` for why this law). Monte Carlo for
    ``K <= 256`` (the draws of :func:`skew_calibration`), the second-order Edgeworth expansion
    beyond (0.5% above the Monte Carlo value at ``K = 256``). ``c_4 = 9.8``, ``c_8 = 4.9``,
    ``c_16 = 3.3``, ``c_32 = 2.6`` (``t = 3.18, 2.36, 2.13, 2.04``). ``inf`` for ``dof < 1``."""
    k = int(dof) + 1
    if k < 2:
        return math.inf
    if confidence == TABLE_CONFIDENCE and k <= _PIVOT_MC_MAX_K:
        return SKEWED_T_95[k]
    return _skewed_t_quantile_mc(k, float(confidence))


@functools.lru_cache(maxsize=2048)
def _skewed_t_quantile_mc(k: int, confidence: float) -> float:
    """:func:`skewed_t_quantile` computed (Monte Carlo to ``K = 256``, Edgeworth beyond)."""
    import numpy as np

    if k > _PIVOT_MC_MAX_K:
        return _pivot_edgeworth(k, confidence)
    t_abs, _ = _chi1_pivot_draws(k)
    return float(np.quantile(t_abs, confidence))


def skew_calibration(dof: int, confidence: float = 0.95) -> float:
    r"""``beta_K`` of the same-sample multiplier ``t_{K-1} (1 + beta_K max(g_1, 0))``
    (:class:`TraceHalfwidth`), ``g_1`` the sample skewness of the ``K = dof + 1`` per-probe
    values; ``inf`` (the constant :func:`skewed_t_quantile` is used then, valid for the same
    worst case) where no ``beta`` suffices (``K = 2``: ``g_1 = 0`` always), where the constant
    is the shorter on average for Gaussian per-probe values (``K <= 4``: at ``K = 4``, 3.1x
    the t-interval against 14x; from ``K = 5`` on the skewness rule is shorter), and for
    ``K > 256``.

    **Why.** A Gaussian probe's term ``v^T A v = sum_i lambda_i z_i^2`` (``A >= 0``) is most
    skewed for its variance when one eigenvalue carries the variance: ``a + b chi2_1`` (``a``
    the nearly constant share of the other directions), skewness ``2 sqrt 2``. Its sample
    mean comes low together with a small spread, so the t-interval and the log-scale one of
    :func:`log_t_halfwidth` (which widens with ``s / xbar``, but ``a`` keeps that ratio small)
    put the truth above the interval too often (rank one, ``a = 0``, ``d = m = 48``, 1000
    seeds: 0.89-0.94 at fixed ``K = 4..32``; one spike on a flat bulk of equal trace: 0.84 at
    ``K = 4``, 0.92 at ``K = 16``). For this family ``(T, g_1)`` is pivotal (free of ``a`` and
    ``b``: both are location-scale invariant), so ``beta_K`` is chosen (Monte Carlo,
    up to ``2^18`` draws, fixed seed) to make its coverage exactly ``confidence``: it is the
    ``confidence``-quantile of ``(|T| / t - 1) / max(g_1, 0)`` (0 where ``|T| <= t``).
    Less skewed laws get smaller ``g_1`` and need less: measured (200k draws) at ``K = 4, 8,
    16, 32``: chi2_2 and chi2_8 per-probe values and three spikes (1, 0.4, 0.2) cover
    0.95-0.97, Gaussian per-probe values 0.975, 0.969, 0.961, 0.955 with mean widths 14x,
    1.37x, 1.09x, 1.02x the t-interval's (median about 1.03x; at ``K = 4`` the sample
    skewness of Gaussian values is often large by chance, hence the constant there). The
    constant :func:`skewed_t_quantile` (no skewness) would cover the same worst case with
    3.1x, 2.1x, 1.55x, 1.27x the t-interval everywhere (Gaussian coverage 0.997-0.985).
    """
    k = int(dof) + 1
    if k < 3 or k > _PIVOT_MC_MAX_K:
        return math.inf
    if confidence == TABLE_CONFIDENCE:
        return SKEW_BETA_95[k]
    return _skew_calibration_mc(k, float(confidence))


@functools.lru_cache(maxsize=2048)
def _skew_calibration_mc(k: int, confidence: float) -> float:
    """:func:`skew_calibration` computed by its Monte Carlo (``3 <= k <= 256``; 0.2-2 s per
    ``k`` on one core, hence the table at 0.95)."""
    import numpy as np

    from .base import t_quantile

    t_abs, g1 = _chi1_pivot_draws(k)
    q = t_quantile(k - 1, float(confidence))
    gp = np.maximum(g1, 0.0)
    need = np.where(t_abs <= q, 0.0,
                    np.where(gp > 0, (t_abs / q - 1.0) / np.where(gp > 0, gp, 1.0), np.inf))
    beta = float(np.quantile(need, float(confidence), method="higher"))
    if math.isinf(beta):
        return beta
    # the shorter on average of the two valid rules where the per-probe values are Gaussian
    rng = np.random.Generator(np.random.PCG64(20251206 + k))
    z = rng.standard_normal((min(_PIVOT_DRAWS, max(_PIVOT_VALUES // k, 1 << 15)), k))
    dev = z - z.mean(axis=1, keepdims=True)
    gz = (dev**3).mean(axis=1) / ((dev * dev).mean(axis=1)) ** 1.5
    mean_m = q * (1.0 + beta * float(np.maximum(gz, 0.0).mean()))
    return beta if mean_m < float(np.quantile(t_abs, float(confidence))) else math.inf


def sample_skewness(t: Tensor) -> Tensor:
    """``[B]`` sample skewness ``m_3 / m_2^{3/2}`` (moments about the mean, divisor ``K``) of
    ``t [B, K]``; 0 where ``m_2 = 0``."""
    dev = t - t.mean(dim=1, keepdim=True)
    m2 = (dev * dev).mean(dim=1)
    m3 = (dev * dev * dev).mean(dim=1)
    pos = m2 > 0
    return torch.where(pos, m3 / torch.where(pos, m2, torch.ones_like(m2)) ** 1.5,
                       torch.zeros_like(m2))


def same_sample_multiplier(skew: Tensor, dof: int, confidence: float) -> Tensor:
    r"""``[B]`` the multiplier of the standard error for a mean and a spread of the same
    probes: ``t_{dof} (1 + beta max(skew, 0))`` with ``beta`` of :func:`skew_calibration`,
    or :func:`skewed_t_quantile` where that is ``inf``."""
    from .base import t_quantile

    beta = skew_calibration(dof, confidence)
    if math.isinf(beta):
        return torch.full_like(skew, skewed_t_quantile(dof, confidence))
    return t_quantile(dof, confidence) * (1.0 + beta * skew.clamp_min(0))


class TraceHalfwidth:
    r"""The half-width of a trace estimate (a mean of non-negative per-probe quadratic forms)
    at ``value``, as a function of a standard error and its dof (the ``hw_fn`` of
    :data:`~fsinfo_fast.estimators.stopping.Summary`).

    ``self(se, dof)``: :func:`log_t_halfwidth`, for a mean of *other* probes than those that
    gave ``se`` (the adaptive rule's last stage, whose interval takes the pilot's spread: the
    mean and the spread are independent there).

    ``self.same_sample(se, dof)``: for a mean and a spread of the *same* probes (a fixed
    ``num_probes``, or a sample recorded from its first or second stage): ``m se`` with ``m`` =
    :func:`same_sample_multiplier` of the per-probe values' sample skewness ``skew`` (``[B]``):
    exact for the most skewed per-probe law, one dominant direction (:func:`skew_calibration`;
    it replaces the log-scale interval there, which undercovered that law at every ``K`` and
    was calibrated on moderate spectra at ``K = 50`` only). ``skew=None``: the constant
    :func:`skewed_t_quantile`.

    ``mc_share`` (``[B]`` in ``[0, 1]``, ``None``: 1): the Monte Carlo share of the standard
    error of a total ``exact part + residual mean`` (Hutch++, the deflated trace; ``value`` is
    then the residual mean, whose skew it is), the rest being a rounding allowance
    (:func:`with_rounding`): both half-widths above apply to the Monte Carlo share, a
    t-interval to the rounding share, in quadrature (:func:`residual_halfwidth`).

    ``linear`` (``[B]`` in ``[0, 1]``, ``None``: 1): for a value that is a concave function
    of the probe mean rather than the mean itself (the deflated FSInfo_diag's remainder share,
    a mean of ``log(a_k + R_k)``): how linear it is there (1: a trace; 0: a logarithm of the
    mean, which is left-skewed and whose jackknife t-interval covers, see
    :func:`~.diagonal.fsinfo_diag_summary`). The same-sample multiplier is then ``t + linear
    (m - t)``, and never below the log-scale interval.
    """

    def __init__(self, value: Tensor, confidence: float, weight: float,
                 skew: Tensor | None = None, mc_share: Tensor | None = None,
                 linear: Tensor | None = None) -> None:
        self.value, self.confidence, self.weight, self.skew = value, confidence, weight, skew
        self.mc_share, self.linear = mc_share, linear

    def _log_t(self, se: Tensor, dof: int) -> Tensor:
        return log_t_halfwidth(self.value, se, dof, self.confidence, self.weight)

    def _same(self, se: Tensor, dof: int) -> Tensor:
        if self.skew is None:
            m = torch.full_like(se, skewed_t_quantile(dof, self.confidence))
        else:
            m = same_sample_multiplier(self.skew, dof, self.confidence)
        if self.linear is not None:
            from .base import t_quantile

            t = t_quantile(dof, self.confidence)
            m = t + self.linear.clamp(0, 1) * (m - t)
            m = torch.where(se == 0, torch.zeros_like(se), m * se)
            return torch.maximum(m, self._log_t(se, dof))
        return torch.where(se == 0, torch.zeros_like(se), m * se)

    def _plus_rounding(self, se: Tensor, dof: int, mc_fn) -> Tensor:
        if self.mc_share is None:
            return mc_fn(se, dof)
        from .base import t_quantile

        rnd_share = (1.0 - self.mc_share**2).clamp_min(0).sqrt()
        mc = mc_fn(se * self.mc_share, dof)
        rnd = t_quantile(dof, self.confidence) * se * rnd_share
        rnd = torch.where(rnd_share == 0, torch.zeros_like(rnd), rnd)  # inf * 0 at dof < 1
        return torch.sqrt(mc**2 + rnd**2)

    def __call__(self, se: Tensor, dof: int) -> Tensor:
        return self._plus_rounding(se, dof, self._log_t)

    def same_sample(self, se: Tensor, dof: int) -> Tensor:
        return self._plus_rounding(se, dof, self._same)


def skew_weight(kind: str) -> float:
    """The ``weight`` of :func:`log_t_halfwidth` for a probe distribution."""
    return 1.0 if kind == "gaussian" else 0.5


def with_rounding(se: Tensor, value: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """Add a rounding allowance ``sqrt(n) eps |value|`` (``eps`` of the products' dtype) to a
    Monte Carlo standard error, in quadrature.

    Negligible unless the Monte Carlo error vanishes (Rademacher probes on a diagonal Gram
    matrix, a Hutch++ sketch that spans the whole range), where it keeps the interval from
    claiming more precision than the floating-point products have. ``sqrt(n) eps`` is the
    typical relative error of a sum of ``n`` rounded terms (blocked/pairwise reductions do
    better); the worst-case ``n eps`` would be 1.8% of the value in float32 at ``n = 150528``
    (3x224x224), which would make a 1% tolerance unreachable whatever the probe count.
    """
    return torch.sqrt(se**2 + (n**0.5 * torch.finfo(dtype).eps * value.abs()) ** 2)


def within_rounding(se: Tensor, value: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """Where a spread ``se`` over probes is no more than the rounding allowance
    :func:`with_rounding` adds for ``value`` (``sqrt(n) eps |value|``): the per-probe values
    agree to their rounding, which says nothing of their law's spread (``[B]`` bool)."""
    return se <= n**0.5 * torch.finfo(dtype).eps * value.abs()


def residual_halfwidth(res: Tensor, se_mc: Tensor, se: Tensor, confidence: float,
                       weight: float = 1.0, skew: Tensor | None = None) -> TraceHalfwidth:
    """The ``hw_fn`` of a total ``exact part + residual mean`` (Hutch++, the deflated trace)
    whose standard error ``se`` is the residual's Monte Carlo one ``se_mc`` with the total's
    rounding allowance (:func:`with_rounding`) in quadrature: a :class:`TraceHalfwidth` at the
    residual ``res`` (the skewed part) with ``skew`` the sample skewness of the residual's
    per-probe values (:func:`sample_skewness`), applied to the Monte Carlo share of ``se``; the
    rounding share gets a t-interval, in quadrature. So the plain and the residual routes share
    one interval: the log-scale one after a pilot, the skewness-calibrated one where the mean
    and the spread come from the same probes. (That second half-width was missing here: the
    log-scale interval alone covered 0.92-0.93 at fixed ``K = 4..12`` where the remainder left
    by a deflation sketch was nearly rank one, helper 137. The log-scale interval of the whole
    ``se`` at ``res`` was infinite where the exact part holds all of ``J``: ``res ~ 0``,
    ``expm1(t se / res)`` overflowing.)"""
    pos = se > 0
    mc_share = torch.where(pos, se_mc / torch.where(pos, se, torch.ones_like(se)),
                           torch.ones_like(se)).clamp(0, 1)
    return TraceHalfwidth(res, confidence, weight, skew, mc_share)


#: :func:`dominant_columns`: at most this many columns per sample, holding at least this share
#: of ``sum_k seen_k^2``.
DOMINANT_MAX, DOMINANT_SHARE = 8, 0.9


def dominant_columns(seen: Tensor | None) -> Tensor | None:
    r"""The input dimensions that carry most of ``J`` where they are few (``[B, d]`` bool,
    all False where a sample has none), for :func:`hutchinson_trace`'s ``exact_columns``; None
    for ``seen=None``.

    ``seen`` (``[B, d]``) is ``J^T u`` for a Gaussian ``u`` (drawn per sample id by
    :class:`~fsinfo_fast.Linearization`): ``seen_k^2`` is an unbiased one-draw
    estimate of ``(J^T J)_kk``. Where the largest :data:`DOMINANT_MAX` of a sample's hold at
    least :data:`DOMINANT_SHARE` of its sum, the fewest of them that do are taken
    (``[B, d]`` bool, each sample on its own: the choice does not depend on the batch).
    **Why**: Rademacher input probes see those few dimensions through ``2^{k-1}`` sign
    patterns only (3 dimensions: 4 atoms, one of probability 1/4), and a sample whose pilot
    misses the rare one plans from a spread near zero (0.86 coverage where 3 of 300 inputs
    carry all but 1e-4 of ``J``). Chosen from ``u`` alone, before any probe, the exact part
    keeps the estimate unbiased; an image encoder spreads ``seen^2`` over thousands of
    dimensions and takes none (VGG5, ResNet-18 at 32 px: the largest 8 hold 3%)."""
    if seen is None:
        return None
    g2 = seen.detach().to(torch.float64).square()
    total = g2.sum(dim=1, keepdim=True)
    k = min(DOMINANT_MAX, g2.shape[1])
    top, idx = g2.topk(k, dim=1)
    cum = top.cumsum(dim=1)
    ok = (cum[:, -1:] >= DOMINANT_SHARE * total) & (total > 0)
    need = (cum < DOMINANT_SHARE * total).sum(dim=1, keepdim=True)  # columns before the share
    take = (torch.arange(k, device=g2.device)[None] <= need) & ok & (top > 0)
    return torch.zeros_like(g2, dtype=torch.bool).scatter_(1, idx, take)


def trace_summarizer(chunks: list[Tensor], scale: Tensor, n: int, dtype: torch.dtype,
                     kind: str, confidence: float, base: Tensor | None = None):
    """The :func:`~fsinfo_fast.estimators.stopping.run_rounds` summary of a Hutchinson trace
    from the per-probe terms appended to ``chunks`` (``[B, k]`` each, ``v^T A v`` with ``E[v
    v^T] = I``, probes of ``kind`` and length ``n``): the mean times ``scale``, its standard
    error with the rounding allowance of ``dtype`` (:func:`with_rounding`) and the log-scale
    t-interval (:func:`log_t_halfwidth`, weight :func:`skew_weight`). ``base`` (``[B]``): an
    exact part every term holds (the exact columns of :func:`hutchinson_trace`), left out of
    the scale the spread is compared with (:func:`within_rounding`): the spread is the free
    part's, whose own rounding is what a spread within rounding would be."""

    def summarize(lo: int, rows: Tensor | None = None,
                  names: Container[str] | None = None):  # one quantity; rows unused
        t = torch.cat(chunks, dim=1)
        chunks[:] = [t]
        mean, se = mean_and_stderr(t[:, lo:])
        # every probe gave one value up to rounding (estimate_from; bit-equal values only missed
        # probes that all drew one atom of a few-atom law and differed in the last bits: a
        # half-width of 7e-17 some 1e15 half-widths off, helper 109)
        free = mean if base is None else mean - base
        same = within_rounding(se, free, n, dtype).to(torch.float64)
        se = with_rounding(se, mean, n, dtype)
        dof = t.shape[1] - lo - 1
        v = mean * scale
        hw_fn = TraceHalfwidth(v, confidence, skew_weight(kind), sample_skewness(t[:, lo:]))
        zeros = torch.zeros_like(mean)
        return {"value": (v, se * scale, dof, zeros, hw_fn), "spread0": (same, zeros, dof)}

    return summarize


def hutchinson_trace(
    products: Products,
    *,
    sigma: float | Tensor | None = None,
    side: str = "output",
    kind: str = "gaussian",
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    stop: StoppingRule | None = None,
    exact_columns: Tensor | None = None,
    live_columns: Tensor | None = None,
    **rule: Unpack[StopKeywords],
) -> Estimate:
    r"""Per-sample Hutchinson estimate of ``tr(J^T J)``, or of dFIL when ``sigma`` is given.

    Args:
        products: batched Jacobian products (:class:`~fsinfo_fast.estimators.Products`).
        sigma: noise scale (float or ``[B]``); if given the value is dFIL
            ``tr(J^T J) / (sigma^2 d)`` (1/dim), else the raw trace.
        side: ``"output"`` (``||J^T u||^2``, one VJP per probe; Gaussian output-side probes are
            the very probes of :func:`~fsinfo_fast.estimators.estimate_diag`) or ``"input"``
            (``||J v||^2``, one JVP per probe).
        kind: ``"gaussian"`` or ``"rademacher"`` probes. Per-probe variance is
            ``2 ||A||_F^2`` (Gaussian) and ``2 (||A||_F^2 - sum_i A_ii^2)`` (Rademacher), ``A``
            the Gram matrix on the probe side.
        seed: probe seed (or a ``torch.Generator``, from which one seed is drawn).
        sample_ids: ``[B]`` global ids of the samples (default ``arange(B)``).
        stop: the :class:`~fsinfo_fast.estimators.StoppingRule` (tolerances in the value's
            units; unset start and rounds: 10 probes, then +50% per round, see
            :func:`~fsinfo_fast.estimators.stopping.initial_probes`).
        **rule: the keywords of :class:`~.stopping.StopKeywords` (``num_probes``,
            ``atol``, ``rtol``, ``max_probes``, ...): the
            same as ``stop=StoppingRule(...)`` with these fields (not together with ``stop``).
        exact_columns: ``[B, d]`` bool, each sample's input dimensions (``side="input"`` only)
            whose part of the trace, ``sum_k ||J e_k||^2``, is computed exactly (one-hot JVPs,
            as many per sample as the most any sample has; added to every per-probe value); the
            probes are zero there and estimate the rest's trace, ``E ||J (v * mask)||^2``.
            Chosen before the probes are drawn, the sum stays unbiased. For the few dimensions
            that carry most of ``J`` (see :func:`dominant_columns`): their Rademacher per-probe
            law has few atoms, which a short pilot can miss.
        live_columns: ``[B, d]`` bool, the input dimensions that reach the output (``None``:
            all), for ``side="input"``: the Rademacher signs drawn elsewhere cannot move a
            probe's value, so only these count towards
            :data:`~fsinfo_fast.estimators.stopping.DUPLICATE_DIM` (a crop keeping a few).

    Returns:
        :class:`~fsinfo_fast.estimators.Estimate`; ``passes`` = probes drawn (one product each)
        plus the exact columns' JVPs.

    Example:
        >>> from fsinfo_fast.engine.dense import DenseProducts
        >>> J = torch.eye(3, dtype=torch.float64)[None] * 2.0   # tr(J^T J) = 12
        >>> est = hutchinson_trace(DenseProducts(J), kind="rademacher", side="input",
        ...                        num_probes=4)
        >>> float(est.value[0]), float(est.stderr[0]) < 1e-13  # Rademacher: exact for diagonal A
        (12.0, True)
    """
    products = detached(products)
    _check_side_kind(side, kind)
    rule = resolve_rule(stop, "trace", **rule)
    confidence = rule.confidence
    seed = resolve_seed(seed)
    ids = sample_ids_for(products, sample_ids)
    scale = trace_scale(products, sigma)
    n = products.d if side == "input" else products.m
    chunks: list[Tensor] = []
    rows = RowProducts(products)
    keep, base, extra = None, None, 0
    if exact_columns is not None:
        if side != "input":
            raise InvalidInputError("exact_columns applies to side='input' (JVP probes)")
        cols = exact_columns.to(device=products.device, dtype=torch.bool)
        if tuple(cols.shape) != (products.batch, n):
            raise InvalidInputError(
                f"exact_columns must be [B, d] = [{products.batch}, {n}] bool, got "
                f"{tuple(cols.shape)}")
    if exact_columns is not None and bool(cols.any()):
        extra = int(cols.sum(dim=1).max())
        rows.rows(None, extra)
        # each sample's columns in order, one per probe slot (slots beyond its count stay 0)
        slot = cols.cumsum(dim=1) - 1
        e = torch.zeros(products.batch, extra, n, dtype=products.dtype, device=products.device)
        b_i, k_i = cols.nonzero(as_tuple=True)
        e[b_i, slot[b_i, k_i], k_i] = 1
        out = rows.jvp(e)
        check_finite(out, ids, 0, "Hutchinson trace (exact columns)", None)
        base = (out.to(torch.float64) ** 2).sum(dim=(1, 2))  # [B]
        keep = (~cols).to(products.dtype)[:, None, :]

    def process(start: int, count: int, active: Tensor | None = None) -> None:
        idx = rows.rows(active, count)
        sub = ids if idx is None else ids[idx]
        P = draw_probes(
            n,
            seed=seed,
            sample_ids=sub,
            start=start,
            count=count,
            kind=kind,
            dtype=products.dtype,
            device=products.device,
        )
        if keep is not None:
            P = P * (keep if idx is None else keep[idx])
        out = rows.jvp(P) if side == "input" else rows.vjp(P)
        check_finite(out, ids, start, f"Hutchinson trace ({side} side)", idx)
        t = square_sum64(out)
        if base is not None:
            t = t + (base if idx is None else base[idx])[:, None]
        if idx is not None:  # the samples that stopped are not summarised from here on
            t = t.new_full((products.batch, count), math.nan).index_copy_(0, idx, t)
        chunks.append(t)

    summarize = trace_summarizer(chunks, scale, n, products.dtype, kind, confidence, base)
    frozen, converged, probes, drawn, pilot = run_rounds(
        rule,
        batch=products.batch,
        device=products.device,
        process=process,
        summarize=summarize,
        targets={"value": rule.targets},
    )
    info_cols = {} if exact_columns is None else {
        "exact_columns": exact_columns.sum(dim=1).tolist(),
        "exact_columns_why": "the few input dimensions that carry most of J, computed exactly "
                             "(their Rademacher per-probe law has few atoms)"}
    free = None
    if kind == "rademacher":  # the signs that can move a probe's value (estimate_from)
        drawn_on = torch.ones(products.batch, n, dtype=torch.bool, device=products.device)
        if exact_columns is not None:
            drawn_on &= ~cols
        if live_columns is not None and side == "input":
            drawn_on &= live_columns.reshape(products.batch, n).to(drawn_on.device)
        free = drawn_on.sum(dim=1)
    return estimate_from(
        rule, frozen["value"], converged=converged, probes=probes, drawn=drawn, pilot=pilot,
        passes=drawn + extra, bias_bound=False, rademacher_dim=free,
        zero_spread=frozen["spread0"].value > 0,
        info={
            **info_cols,
            "method": "hutchinson",
            "quantity": "dfil" if sigma is not None else "trace",
            "side": side,
            "kind": kind,
            "seed": seed,
            "interval": (f"log-scale t (upper side, symmetric; weight {skew_weight(kind)}) "
                         "after a pilot; skewness-calibrated multiplier at a fixed count"),
            "computed_per_sample": rows.computed,
        },
    )
