r"""Error lower bounds implied by the metrics, per sample and worst case over a batch.

Two kinds, kept apart on purpose:

- :func:`dfil_bound` is **proven** (Cramer-Rao): any *unbiased* attacker reconstructing ``x`` from
  ``z = f(x) + N(0, sigma^2 I)`` has ``E||x_hat - x||^2 / d >= 1 / dFIL(x)``. It says nothing
  about biased attackers (for example those that use a data prior).
- :func:`fsinfo_bound` is a **surrogate**: ``exp(-2 FSInfo) / (2 pi e)``, the per-dimension
  variance of a Gaussian with the FSInfo entropy. It is not a theorem against attackers that use a
  prior; read it as a calibrated leakage scale. For full-rank Fisher information,
  ``1/dFIL <= exp(-2 FSInfo_diag)/(2 pi e) <= exp(-2 FSInfo)/(2 pi e)``.

The worst case over a batch is the least private sample: the smallest bound (largest leakage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .result import MetricResult

__all__ = ["Bound", "dfil_bound", "fsinfo_bound"]

_TWO_PI_E = 2.0 * math.pi * math.e


@dataclass(frozen=True)
class Bound:
    """Per-sample lower bounds on the per-dimension reconstruction MSE.

    Attributes:
        value: ``[B]`` float64 bound (in squared input units per dimension).
        low, high: ``[B]`` the bound's image of the metric's 95% interval (equal to ``value`` for
            exact metrics). The bound is monotone in the metric, so these are exact images.
        proven: whether the bound is a theorem (dFIL, unbiased attackers) or a surrogate (FSInfo).
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


def _metric_and_interval(metric: MetricResult | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(metric, MetricResult):
        lo, hi = metric.ci95()
        return metric.value, lo, hi
    v = torch.as_tensor(metric, dtype=torch.float64)
    return v, v, v


def dfil_bound(dfil: MetricResult | Tensor) -> Bound:
    """Cramer-Rao bound ``1 / dFIL`` per sample (proven, unbiased attackers only).

    Example:
        >>> import torch
        >>> b = dfil_bound(torch.tensor([4.0, 0.5], dtype=torch.float64))
        >>> b.value.tolist(), b.worst()
        ([0.25, 2.0], (0, 0.25))
    """
    if isinstance(dfil, MetricResult) and dfil.metric != "dfil":
        raise ValueError(f"dfil_bound needs a dFIL result, got {dfil.metric}")
    v, lo, hi = _metric_and_interval(dfil)
    # larger dFIL -> smaller bound: the interval flips; a non-positive lower end means no bound
    high = torch.where(lo > 0, 1.0 / lo, torch.full_like(lo, math.inf))
    return Bound(value=1.0 / v, low=1.0 / hi, high=high, proven=True, kind="dfil")


def fsinfo_bound(fsinfo: MetricResult | Tensor) -> Bound:
    """Surrogate bound ``exp(-2 FSInfo) / (2 pi e)`` per sample (FSInfo in nats per dimension).

    Example:
        >>> import math, torch
        >>> unit_gaussian = -0.5 * math.log(2 * math.pi * math.e)
        >>> b = fsinfo_bound(torch.tensor([unit_gaussian], dtype=torch.float64))
        >>> round(float(b.value[0]), 12)  # FSInfo of a unit Gaussian -> variance 1
        1.0
    """
    if isinstance(fsinfo, MetricResult) and fsinfo.units != "nats/dim":
        raise ValueError(f"fsinfo_bound needs FSInfo in nats/dim, got {fsinfo.units}")
    v, lo, hi = _metric_and_interval(fsinfo)
    f = lambda t: torch.exp(-2.0 * t) / _TWO_PI_E  # noqa: E731
    return Bound(value=f(v), low=f(hi), high=f(lo), proven=False, kind="fsinfo")
