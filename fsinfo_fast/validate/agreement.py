r"""Agreement between a leakage metric and an attack across split points (the paper's protocol).

For split points ``0 .. n-1`` ordered from the shallowest, with a metric's mean ``m_i`` and the
attack's mean reconstruction error ``MSE_i`` at each:

.. math::

    \text{metric drop}_i = \frac{m_0 - m_i}{m_0},\qquad
    \text{attack rise}_i = \frac{\mathrm{MSE}_i - \mathrm{MSE}_0}{\mathrm{MSE}_i}

(both relative to the shallowest split, so both are 0 there), and the agreement is the Pearson
correlation of the two sequences over the ``n`` splits. A metric that predicts the attack well
has ``r`` near ``+1``: where the metric says leakage fell, the attacker's error rose.

Caveats (kept as the paper defines them, not corrected): the drop divides by ``m_0``, so for a
metric whose shallowest value is negative (FSInfo can be negative) its sign flips; with ``n`` of
5 or 6 points the correlation is very uncertain (the Fisher-z interval says how much). With fewer
than 3 split points the statistic is undefined (two points always correlate at +-1 and the drop
and rise have one non-trivial point): :func:`agreement` reports ``nan`` with a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..result import Z95

__all__ = ["Agreement", "agreement", "pearson", "relative_drop", "relative_rise", "MIN_SPLITS"]

#: Fewest split points at which :func:`agreement` reports a correlation.
MIN_SPLITS = 3


def _vector(values: Sequence[float], name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise InvalidInputError(
            f"{name} needs a 1-D sequence (one value per split point), got shape {v.shape}")
    if v.size < 2:
        raise InvalidInputError(f"{name} needs at least 2 split points, got {v.size}")
    return v


def relative_drop(values: Sequence[float]) -> np.ndarray:
    """``(m_0 - m_i) / m_0`` for each split ``i`` (the metric's relative drop)."""
    v = _vector(values, "relative_drop")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (v[0] - v) / v[0]


def relative_rise(mse: Sequence[float]) -> np.ndarray:
    """``(MSE_i - MSE_0) / MSE_i`` for each split ``i`` (the attack error's relative rise)."""
    v = _vector(mse, "relative_rise")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (v - v[0]) / v


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    r"""Pearson correlation ``sum (a-abar)(b-bbar) / sqrt(sum (a-abar)^2 sum (b-bbar)^2)``.

    ``nan`` when either sequence is constant or holds a non-finite value.

    Example:
        >>> pearson([0, 1, 2], [0, 2, 4]), pearson([0, 1, 2], [2, 1, 0])
        (1.0, -1.0)
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise InvalidInputError(f"pearson needs two 1-D sequences of one length, got "
                                f"{x.shape} and {y.shape}")
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if den == 0.0:
        return float("nan")
    return float(max(-1.0, min(1.0, float((dx * dy).sum()) / den)))


@dataclass(frozen=True)
class Agreement:
    """The paper's agreement statistic of one metric with one attack.

    Attributes:
        pearson: the correlation of ``metric_drop`` with ``attack_rise`` (``nan`` if undefined).
        ci95: Fisher-z 95% interval of the correlation (``None`` below 4 splits).
        p_value: two-sided p-value of ``r = 0`` (t-test with ``n - 2`` degrees of freedom).
        n: split points used.
        metric_drop, attack_rise: the two sequences.
        note: why ``pearson`` is undefined (``None`` when it is defined): fewer than 3 splits,
            ``m_0 = 0`` (the drop divides by it), an attack MSE of 0 (the rise divides by it),
            a non-finite value, or a constant drop or rise.
    """

    pearson: float
    ci95: tuple[float, float] | None
    p_value: float | None
    n: int
    metric_drop: list[float]
    attack_rise: list[float]
    note: str | None = None

    def as_dict(self) -> dict:
        def num(v: float) -> float | None:
            return float(v) if v is not None and math.isfinite(v) else None

        return {"pearson": num(self.pearson),
                "ci95": [num(c) for c in self.ci95] if self.ci95 else None,
                "p_value": num(self.p_value) if self.p_value is not None else None, "n": self.n,
                "metric_drop": [num(v) for v in self.metric_drop],
                "attack_rise": [num(v) for v in self.attack_rise], "note": self.note}


def agreement(metric: Sequence[float], mse: Sequence[float]) -> Agreement:
    """Pearson correlation of a metric's relative drop with the attack MSE's relative rise.

    Args:
        metric: the metric's value at each split point, shallowest first.
        mse: the attack's mean reconstruction MSE at the same split points.

    Returns:
        :class:`Agreement`; with fewer than 3 split points ``pearson`` is ``nan`` and ``note``
        says why (two points always give ``r = +-1``, which carries no information).

    Example:
        >>> a = agreement([4.0, 2.0, 1.0], [0.1, 0.2, 0.4])
        >>> a.metric_drop, [round(v, 12) for v in a.attack_rise], round(a.pearson, 6)
        ([0.0, 0.5, 0.75], [0.0, 0.5, 0.75], 1.0)
    """
    drop, rise = relative_drop(metric), relative_rise(mse)
    if drop.shape != rise.shape:
        raise InvalidInputError(
            f"metric has {drop.size} split points but the attack has {rise.size}"
        )
    n = int(drop.size)
    if n < MIN_SPLITS:
        return Agreement(pearson=float("nan"), ci95=None, p_value=None, n=n,
                         metric_drop=drop.tolist(), attack_rise=rise.tolist(),
                         note=f"undefined with {n} split points (needs {MIN_SPLITS}: two points "
                              "always correlate at +-1)")
    r = pearson(drop, rise)
    note = None if math.isfinite(r) else _why_undefined(metric, mse, drop, rise)
    ci = None
    p = None
    if math.isfinite(r):
        if n >= 4:
            zr = math.atanh(max(-0.999999999, min(0.999999999, r)))
            h = Z95 / math.sqrt(n - 3)
            ci = (math.tanh(zr - h), math.tanh(zr + h))
        if n >= 3:
            from ..estimators.student_t import t_two_sided_tail

            if abs(r) >= 1.0:
                p = 0.0
            else:
                tstat = r * math.sqrt((n - 2) / (1.0 - r * r))
                p = t_two_sided_tail(tstat, n - 2)
    return Agreement(pearson=r, ci95=ci, p_value=p, n=n, metric_drop=drop.tolist(),
                     attack_rise=rise.tolist(), note=note)


def _why_undefined(metric: Sequence[float], mse: Sequence[float], drop: np.ndarray,
                   rise: np.ndarray) -> str:
    """Why the correlation of ``drop`` and ``rise`` is undefined, for :attr:`Agreement.note`."""
    m = np.asarray(metric, dtype=np.float64)
    e = np.asarray(mse, dtype=np.float64)
    bad_m = [i for i, v in enumerate(m) if not math.isfinite(v)]
    bad_e = [i for i, v in enumerate(e) if not math.isfinite(v)]
    if bad_m or bad_e:
        parts = ([f"the metric at split(s) {bad_m}"] if bad_m else []) + (
            [f"the attack MSE at split(s) {bad_e}"] if bad_e else [])
        return "undefined: non-finite value of " + " and ".join(parts)
    if m[0] == 0:
        return ("undefined: the metric is 0 at the shallowest split, and the relative drop "
                "(m_0 - m_i) / m_0 divides by it")
    zero = [i for i, v in enumerate(e) if v == 0]
    if zero:
        return (f"undefined: the attack MSE is 0 at split(s) {zero}, and the relative rise "
                "(MSE_i - MSE_0) / MSE_i divides by it")
    if not (np.isfinite(drop).all() and np.isfinite(rise).all()):  # pragma: no cover
        return "undefined: the relative drop or rise is not finite"
    if np.ptp(drop) == 0:
        return "undefined: the metric's relative drop is the same at every split (constant)"
    if np.ptp(rise) == 0:
        return "undefined: the attack's relative rise is the same at every split (constant)"
    return "undefined"  # pragma: no cover
