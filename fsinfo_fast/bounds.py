r"""Error lower bounds implied by the metrics, per sample and worst case over a batch.

Two bounds, both against unbiased attackers:

- :func:`dfil_bound` is **proven** (Cramer-Rao): any *unbiased* attacker reconstructing ``x`` from
  ``z = f(x) + N(0, sigma^2 I)`` has ``E||x_hat - x||^2 / d >= 1 / dFIL(x)``. It says nothing
  about biased attackers (for example those that use a data prior).
- :func:`fsinfo_bound`, ``exp(-2 FSInfo) / (2 pi e)`` (the per-dimension variance of a Gaussian
  with the FSInfo entropy), is **proven** against unbiased attackers too: with ``I = J^T J /
  sigma^2``, Cramer-Rao gives ``E||x_hat - x||^2 / d >= tr(I^-1) / d >= det(I)^(-1/d)``
  (AM-GM on the eigenvalues), which is at least ``det(I + lambda)^(-1/d)`` (the log det with a
  prior ``lambda = 1 / prior_var``: the bound from it) and at least ``prod_k (I_kk + c)^(-1/d)``
  (Hadamard, and a floor ``c >= 0`` only lowers it: FSInfo_diag's bound); where ``I`` is singular
  no unbiased attacker exists. Neither bound holds against attackers that use a prior (the
  attacks of :mod:`fsinfo_fast.attacks` do, and beat both at times). For full-rank Fisher
  information,
  ``exp(-2 FSInfo_diag)/(2 pi e) <= exp(-2 FSInfo)/(2 pi e)`` (Hadamard; FSInfo the log det
  without a prior, any floor), and ``1/dFIL <= exp(-2 FSInfo_diag)/(2 pi e)`` exactly when the
  geometric mean of ``D_k + c`` is at most the arithmetic mean of ``D_k`` (which is dFIL), with
  ``D_k = (J^T J)_kk / sigma^2`` and ``c`` the floor inside FSInfo_diag's log (``floor``,
  ``1e-10`` by default). With ``floor=0`` that is AM-GM and always holds; with a floor it can
  fail, by a relative ``c / D_k`` (negligible while every ``D_k >> c``, e.g. ``1e-10`` at
  ``D_k = 1``), and by much more once the ``D_k`` come near ``c`` (a large sigma or a small
  Jacobian: FSInfo_diag stops at its asymptote ``log(c)/2 - log(2 pi e)/2`` while ``1/dFIL``
  keeps growing).

The worst case over a batch is the least private sample: the smallest bound (largest leakage).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InvalidInputError, InvalidInputTypeError
from .result import Aggregate, MetricResult, SigmaResult

__all__ = ["Bound", "dfil_bound", "fsinfo_bound"]

_TWO_PI_E = 2.0 * math.pi * math.e


@dataclass(frozen=True)
class Bound:
    """Per-sample lower bounds on the per-dimension reconstruction MSE.

    Attributes:
        value: ``[B]`` float64 bound (in squared input units per dimension).
        low, high: ``[B]`` the bound's image of the metric's 95% interval (equal to ``value`` for
            exact metrics). The bound is monotone in the metric, so these are exact images.
        proven: whether the bound is a theorem (against unbiased attackers: both kinds are).
        kind: ``"dfil"`` or ``"fsinfo"``.
    """

    value: Tensor
    low: Tensor
    high: Tensor
    proven: bool
    kind: str

    def worst(self) -> tuple[int, float]:
        """``(index, bound)`` of the least private sample (the smallest bound)."""
        i = int(torch.argmin(self.value))
        return i, float(self.value[i])


def _metric_and_interval(metric: MetricResult | Aggregate | Tensor | float,
                         who: str) -> tuple[Tensor, Tensor, Tensor]:
    """``[B]`` value and 95% interval ends of a per-sample result, a ``[B]`` tensor, or one
    sample: a summary (:class:`~fsinfo_fast.result.Aggregate`, e.g. ``r.worst()``), a float or
    a 0-d tensor (a batch of one, so that :meth:`Bound.worst` has a sample to point at)."""
    if isinstance(metric, MetricResult):
        lo, hi = metric.ci95()
        return metric.value, lo, hi
    if isinstance(metric, Aggregate):
        lo, hi = metric.ci95()
        as1 = lambda t: torch.tensor([float(t)], dtype=torch.float64)  # noqa: E731
        return as1(metric.value), as1(lo), as1(hi)
    real = isinstance(metric, numbers.Real) and not isinstance(metric, bool)
    if not (real or isinstance(metric, Tensor)) or (
            isinstance(metric, Tensor) and (metric.dtype == torch.bool or metric.is_complex())):
        raise InvalidInputTypeError(
            f"{who} takes a MetricResult, its summary (r.worst(), r.mean()), a [B] real tensor "
            f"or a float; got {type(metric).__name__}"
            + (" (a noise scale: pass the metric computed at that sigma)"
               if isinstance(metric, SigmaResult) else ""))
    v = torch.as_tensor(metric, dtype=torch.float64).detach()
    if v.ndim == 0:
        v = v.reshape(1)
    if v.ndim != 1 or v.numel() == 0:
        raise InvalidInputError(
            f"{who} takes one value per sample, a [B] tensor with B >= 1; got shape "
            f"{tuple(v.shape)}")
    if bool(torch.isnan(v).any()):
        raise InvalidInputError(f"{who} got NaN values: there is no bound to give for them")
    return v, v, v


def dfil_bound(dfil: MetricResult | Aggregate | Tensor | float) -> Bound:
    """Cramer-Rao bound ``1 / dFIL`` per sample (proven, unbiased attackers only).

    Example:
        >>> import torch
        >>> b = dfil_bound(torch.tensor([4.0, 0.5], dtype=torch.float64))
        >>> b.value.tolist(), b.worst()
        ([0.25, 2.0], (0, 0.25))
    """
    if isinstance(dfil, (MetricResult, Aggregate)) and dfil.metric not in (None, "dfil"):
        raise ValueError(f"dfil_bound needs a dFIL result, got {dfil.metric}")
    v, lo, hi = _metric_and_interval(dfil, "dfil_bound")
    # -0.0 + 0.0 = +0.0: a signed zero is a zero dFIL, whose bound is +inf (1 / -0.0 = -inf
    # was a -inf "proven" bound that worst() picked)
    v, lo, hi = v + 0.0, lo + 0.0, hi + 0.0
    if bool((v < 0).any()):
        # tr(J^T J) / (sigma^2 d) >= 0: a negative value is no dFIL, and 1/v no bound
        raise InvalidInputError(
            f"dfil_bound got a negative dFIL ({float(v.min()):.4g}); dFIL = tr(J^T J) / "
            "(sigma^2 d) is >= 0: pass the dFIL values themselves")
    # larger dFIL -> smaller bound: the interval flips; a non-positive lower end means no bound
    high = torch.where(lo > 0, 1.0 / lo, torch.full_like(lo, math.inf))
    return Bound(value=1.0 / v, low=1.0 / hi, high=high, proven=True, kind="dfil")


def fsinfo_bound(fsinfo: MetricResult | Aggregate | Tensor | float) -> Bound:
    """Bound ``exp(-2 FSInfo) / (2 pi e)`` per sample (FSInfo in nats per dimension; proven
    against unbiased attackers, below the Cramer-Rao bound ``tr(I^-1)/d``: see the module).

    Example:
        >>> import math, torch
        >>> unit_gaussian = -0.5 * math.log(2 * math.pi * math.e)
        >>> b = fsinfo_bound(torch.tensor([unit_gaussian], dtype=torch.float64))
        >>> round(float(b.value[0]), 12)  # FSInfo of a unit Gaussian -> variance 1
        1.0
    """
    if isinstance(fsinfo, (MetricResult, Aggregate)) and (
            fsinfo.units not in (None, "nats/dim") or fsinfo.metric == "dfil"):
        raise ValueError(f"fsinfo_bound needs FSInfo in nats/dim, got "
                         f"{fsinfo.metric or 'a result'} in {fsinfo.units}")
    v, lo, hi = _metric_and_interval(fsinfo, "fsinfo_bound")
    f = lambda t: torch.exp(-2.0 * t) / _TWO_PI_E  # noqa: E731
    return Bound(value=f(v), low=f(hi), high=f(lo), proven=True, kind="fsinfo")
