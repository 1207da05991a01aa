"""Result objects returned by the metrics: per-sample values with error bars and provenance."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidInputError, InvalidInputTypeError
from .estimators.base import t_quantile

__all__ = ["MetricResult", "Aggregate", "SigmaResult", "Z95", "max_interval", "mean_halfwidth",
           "selection_ratio"]

#: The two-sided 95% normal quantile (the one place it is written down).
Z95 = 1.959963984540054
_Z95 = Z95


@dataclass(frozen=True)
class Aggregate:
    """A scalar summary over samples with its standard error and 95% half-width (float64).

    The interval convention is the per-sample one: ``ci95() = value -+ ci_halfwidth``, the
    half-width holding the probe-noise part (``1.96 * stderr`` by default) plus any
    deterministic error allowance (``bias_bound``).
    """

    value: float
    stderr: float
    index: int | None = None  # which sample, for the worst case
    ci_halfwidth: float | None = None
    bias_bound: float = 0.0
    bound: bool = False  # the value is only an upper bound
    #: explicit interval ends where it is not symmetric (the worst case's, for the largest
    #: true value of the batch); None: ``value -+ ci_halfwidth``
    low: float | None = None
    high: float | None = None
    #: what it summarises, where known (``r.mean()``, ``r.worst()``): the bounds check them (a
    #: bits summary read as nats gave a bound above Cramer-Rao's, helper 125)
    metric: str | None = None
    units: str | None = None

    def __post_init__(self) -> None:
        if self.ci_halfwidth is None:
            object.__setattr__(self, "ci_halfwidth", Z95 * self.stderr + self.bias_bound)

    def __float__(self) -> float:
        """The value (``float(r.mean())``; its interval: :meth:`ci95`)."""
        return float(self.value)

    def ci95(self) -> tuple[float, float]:
        """95% interval: ``(low, high)`` where given, else ``(value - ci_halfwidth, value +
        ci_halfwidth)`` (``-inf`` low end when the value is only an upper bound)."""
        if self.low is not None and self.high is not None:
            return (self.low, self.high)
        if self.ci_halfwidth == math.inf:  # no claim (also for an infinite value: no nan)
            return (-math.inf, math.inf)
        low = -math.inf if self.bound else self.value - self.ci_halfwidth
        return (low, self.value + self.ci_halfwidth)


def check_q(q: object) -> float:
    """A quantile level as a float in ``(0, 1]``: any real number (a Python or numpy scalar) or
    a one-element real tensor; checked before any work (FSInfoGuard.calibrate,
    :meth:`SigmaResult.dataset`)."""
    if isinstance(q, Tensor) and q.numel() == 1 and not (q.dtype == torch.bool
                                                          or q.is_complex()):
        q = float(q)
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise InvalidInputTypeError(
            f"q must be a real number in (0, 1], got {type(q).__name__} {q!r}")
    if not 0 < float(q) <= 1:
        raise InvalidInputError(f"q must be in (0, 1], got {q!r}")
    return float(q)


def selection_ratio(n: int, dof: int | None) -> float:
    """How much wider one side of a sample's 95% interval must be for ``n`` such sides to hold
    at once (Bonferroni: one-sided ``0.025 / n`` each), as the ratio of Student-t quantiles on
    the noise's ``dof`` degrees of freedom (``None``: normal). 1 for ``n <= 1``.

    The interval of an extreme over samples needs it on the side selection biases: the largest
    of ``n`` noisy estimates overstates its sample's value (by about 2 standard errors among
    near-tied samples: its own interval covered the largest true value in 0.69 of runs), and
    any of the ``n`` lower ends may be the one too high."""
    if n <= 1:
        return 1.0
    dof = 10**6 if dof is None else max(int(dof), 1)
    return t_quantile(dof, 1.0 - 0.05 / n) / t_quantile(dof, 0.95)


def max_interval(value: Sequence[float], halfwidth: Sequence[float],
                 dof: Sequence[int | None], bound: Sequence[bool] | None = None
                 ) -> tuple[float, float]:
    """95% interval for the largest true value among ``n`` samples from their own intervals
    ``value_i -+ halfwidth_i``: the largest upper end (the sample holding the maximum has its
    own), and the largest lower end after widening each by :func:`selection_ratio` (a one-sided
    upper bound, ``bound_i``, has no lower end)."""
    n = len(value)
    bound = [False] * n if bound is None else bound
    high = max(v + h for v, h in zip(value, halfwidth, strict=True))
    lows = [v - h * selection_ratio(n, k) for v, h, k, b in zip(value, halfwidth, dof, bound,
                                                               strict=True) if not b]
    return (max(lows) if lows else -math.inf), high


def mean_halfwidth(stderr: Sequence[float], halfwidth: Sequence[float],
                   bias: Sequence[float] | None = None) -> float:
    """95% half-width of the mean of ``n`` per-sample estimates, from their own intervals.

    Each sample's half-width is its probe-noise part (``t * stderr``, with the small-probe
    Student-t factor its estimator used) plus a deterministic allowance (quadrature error,
    plug-in bias, rounding: ``bias``). The noise parts are combined as independent, the
    allowances added: ``sqrt(sum_i (hw_i - b_i)^2) / n + mean_i b_i``. One sample's interval is
    its own; an allowance is never averaged away, and no factor narrower than the samples' own
    ``t`` is applied (the profile's table used ``1.96 * sqrt(sum se_i^2) / n``: +-0.0056 for a
    sample whose interval was +-0.0080, and zero width where every interval was rounding
    allowance). Without ``bias`` (records that do not keep it) the part of ``hw_i`` beyond
    ``1.96 se_i`` counts as allowance: never narrower than with it.
    """
    n = len(halfwidth)
    if n == 0:
        raise InvalidInputError("no samples to average")
    if bias is None:
        bias = [max(h - Z95 * s, 0.0) for s, h in zip(stderr, halfwidth, strict=True)]
    noise = math.sqrt(sum(max(h - b, 0.0) ** 2 for h, b in zip(halfwidth, bias, strict=True)))
    return noise / n + sum(bias) / n


def _batch_indices(idx: object, b: int) -> list[int]:
    """Batch indices ``idx`` selects among ``b`` samples, in order: an int (negative counts
    from the end), a slice, a sequence of ints, an integer tensor or a ``[b]`` bool mask."""
    if type(idx).__module__ == "numpy" and hasattr(idx, "shape") and idx.shape != ():
        idx = torch.as_tensor(idx)  # (a numpy array of indices or a bool mask)
    if isinstance(idx, (list, tuple)) and idx and all(isinstance(i, bool) for i in idx):
        idx = torch.tensor(idx)  # (a list of bools: a mask)
    if isinstance(idx, Tensor):
        if idx.dtype == torch.bool:
            if idx.shape != (b,):
                raise IndexError(f"a bool mask must have shape ({b},), got {tuple(idx.shape)}")
            return idx.nonzero().flatten().tolist()
        if idx.is_floating_point() or idx.is_complex() or idx.dim() > 1:
            raise IndexError("an index tensor must hold integers (at most one dimension), "
                             f"got {idx.dtype} of shape {tuple(idx.shape)}")
        idx = idx.tolist()
    if isinstance(idx, slice):
        return list(range(b))[idx]
    items = [idx] if isinstance(idx, numbers.Integral) else idx
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or any(
        isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items
    ):
        raise IndexError(f"samples are selected by an int, a slice, a sequence of ints, an "
                         f"integer tensor or a bool mask, got {type(idx).__name__} {idx!r}")
    out = []
    for i in items:
        if not -b <= int(i) < b:
            raise IndexError(f"sample index {i} is out of range for {b} samples")
        out.append(int(i) % b)
    return out


def _take(t: Tensor | None, rows: list[int]) -> Tensor | None:
    return None if t is None else t[torch.tensor(rows, dtype=torch.long, device=t.device)]


def _selection(idx: object, b: int, info: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """The rows ``idx`` selects among ``b`` samples and the selection's ``info``: the batch's,
    with ``batch_indices`` those rows' indices in the original batch (a selection of a
    selection names the original's)."""
    rows = _batch_indices(idx, b)
    parent = info.get("batch_indices")
    return rows, {**info, "batch_indices": rows if parent is None else [parent[i] for i in rows]}


@dataclass(frozen=True)
class MetricResult:
    """Per-sample metric values with standard errors.

    Attributes:
        value: ``[B]`` float64 per-sample values (``units`` says in what).
        stderr: ``[B]`` float64 standard errors (0 for the exact estimator).
        metric: ``"fsinfo_diag"``, ``"fsinfo_logdet"`` or ``"dfil"``.
        units: ``"nats/dim"`` for FSInfo; ``"1/dim"`` for dFIL (Fisher information per input
            dimension, in inverse squared input units).
        estimator: ``"exact"`` (the float64 oracle), ``"exact-fast"`` (one-hot products in
            the working dtype; its interval is the rounding allowance), ``"randomized"``, or
            ``"mixed"``: ``auto``'s randomized estimate where some samples (possibly each,
            sent on its own) took an exact route for their own reason (their measured rounding
            missed the tolerance, float32 lost their columns, they could not converge within
            the probe cap), those samples' values, intervals and ``converged`` the exact
            route's;
            ``info["exact_samples"]`` lists them (batch indices) and
            ``info["exact_samples_estimator"]`` names each one's route.
        sigma: ``[B]`` float64 noise scale used.
        d: input dimension; m: output dimension.
        num_probes: probes used per sample (``None`` for exact).
        passes: Jacobian products (JVP or VJP) per sample.
        ci_halfwidth: ``[B]`` half-width of the 95% interval (for the exact routes their
            rounding allowance, 0 only where the value is exact, e.g. an exact ``-inf``;
            ``inf`` where no interval is claimed, e.g. a sample whose float64 forward- and
            reverse-mode Jacobians disagree: ``info["modes_why"]``).
        singular: ``[B]`` bool, where the Fisher matrix was found singular (log-det is ``-inf``).
        converged: ``[B]`` bool: the interval met the requested tolerance (True for the
            exact estimator unless its float64 Jacobian is not determined there, as above;
            False where the probe cap stopped the sample first).
        probes_per_sample: ``[B]`` int64 probes each sample's estimate used (``None``: exact).
        bound: ``[B]`` bool: the value is a one-sided **upper bound**, not an estimate (e.g. a
            log det whose spectrum reaches the working precision: eigenvalues below the
            precision floor are clamped there). ``ci95()`` is then ``(-inf, value + hw)``.
        bias_bound: ``[B]`` float64 deterministic error allowance (quadrature error, plug-in
            bias, rounding) already included in ``ci_halfwidth`` (0 where there is none).
        info: anything else worth knowing (backend, seed, variant options, fallbacks).
    """

    value: Tensor
    stderr: Tensor
    metric: str
    units: str
    estimator: str
    sigma: Tensor
    d: int
    m: int
    num_probes: int | None = None
    passes: int = 0
    ci_halfwidth: Tensor | None = None
    singular: Tensor | None = None
    converged: Tensor | None = None
    probes_per_sample: Tensor | None = None
    bound: Tensor | None = None
    bias_bound: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ci_halfwidth is None:
            object.__setattr__(self, "ci_halfwidth", _Z95 * self.stderr)
        b, dev = self.value.shape[0], self.value.device
        if self.converged is None:
            object.__setattr__(self, "converged", torch.ones(b, dtype=torch.bool, device=dev))
        if self.bound is None:
            object.__setattr__(self, "bound", torch.zeros(b, dtype=torch.bool, device=dev))
        if self.bias_bound is None:
            object.__setattr__(self, "bias_bound",
                               torch.zeros(b, dtype=torch.float64, device=dev))

    def __len__(self) -> int:
        return int(self.value.shape[0])

    #: The ``[B]`` fields :meth:`__getitem__` selects.
    _PER_SAMPLE = ("value", "stderr", "sigma", "ci_halfwidth", "singular", "converged",
                   "probes_per_sample", "bound", "bias_bound")

    def __getitem__(self, idx: object) -> MetricResult:
        """The samples ``idx`` selects (an int, a slice, a sequence of ints, an integer tensor
        or a ``[B]`` bool mask) as a result of their own: every ``[B]`` field taken at those
        samples (an int keeps a batch of one). ``info`` is the batch's, whose per-sample
        entries still index the whole batch, with ``info["batch_indices"]`` the selected
        samples' indices in it.

        Example:
            >>> import torch
            >>> r = MetricResult(value=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
            ...                  stderr=torch.zeros(3, dtype=torch.float64), metric="dfil",
            ...                  units="1/dim", estimator="exact",
            ...                  sigma=torch.ones(3, dtype=torch.float64), d=4, m=2)
            >>> r[1:].value.tolist(), r[-1].info["batch_indices"]
            ([2.0, 3.0], [2])
        """
        rows, info = _selection(idx, len(self), self.info)
        fields = {k: _take(getattr(self, k), rows) for k in self._PER_SAMPLE}
        return MetricResult(metric=self.metric, units=self.units, estimator=self.estimator,
                            d=self.d, m=self.m, num_probes=self.num_probes, passes=self.passes,
                            info=info, **fields)

    def records(self) -> list[dict[str, Any]]:
        """One plain dict per sample (Python numbers, ``inf`` kept), e.g. for
        ``pandas.DataFrame(r.records())``: ``index`` (in the batch), ``metric``, ``units``,
        ``estimator`` (the sample's own route in a ``"mixed"`` result), ``sigma``, ``value``,
        ``stderr``, ``ci_halfwidth``, ``ci_low``, ``ci_high`` (:meth:`ci95`), ``bias_bound``,
        ``converged``, ``bound``, ``singular`` and ``probes`` (None for an exact route)."""
        low, high = self.ci95()
        own = dict(zip(self.info.get("exact_samples", ()),
                       self.info.get("exact_samples_estimator", ()), strict=False))
        index = self.info.get("batch_indices", range(len(self)))
        out = []
        for k in range(len(self)):
            i = int(index[k])
            est = self.estimator if self.estimator != "mixed" else own.get(i, "randomized")
            probes = (None if self.probes_per_sample is None or i in own
                      else int(self.probes_per_sample[k]))
            out.append({
                "index": i, "metric": self.metric, "units": self.units, "estimator": est,
                "sigma": self.sigma[k].item(), "value": self.value[k].item(),
                "stderr": self.stderr[k].item(),
                "ci_halfwidth": self.ci_halfwidth[k].item(),
                "ci_low": low[k].item(), "ci_high": high[k].item(),
                "bias_bound": self.bias_bound[k].item(),
                "converged": bool(self.converged[k]), "bound": bool(self.bound[k]),
                "singular": False if self.singular is None else bool(self.singular[k]),
                "probes": probes,
            })
        return out

    def ci95(self) -> tuple[Tensor, Tensor]:
        """Per-sample 95% interval ``(low, high)`` (``low = -inf`` where ``bound``: the value is
        then only an upper bound; ``(-inf, inf)`` where the half-width is infinite)."""
        low = self.value - self.ci_halfwidth
        low = torch.where(self.bound, torch.full_like(low, -math.inf), low)
        high = self.value + self.ci_halfwidth
        none = torch.isposinf(self.ci_halfwidth)  # no claim (an infinite value: no nan)
        if bool(none.any()):
            low = torch.where(none, torch.full_like(low, -math.inf), low)
            high = torch.where(none, torch.full_like(high, math.inf), high)
        return low, high

    def to_bits(self) -> MetricResult:
        """The same result in bits per input dimension (FSInfo only)."""
        if self.units != "nats/dim":
            raise InvalidInputError(
                f"only FSInfo results (nats/dim) convert to bits, this is {self.units}"
            )
        k = 1.0 / math.log(2.0)
        return MetricResult(
            value=self.value * k, stderr=self.stderr * k, metric=self.metric, units="bits/dim",
            estimator=self.estimator, sigma=self.sigma, d=self.d, m=self.m,
            num_probes=self.num_probes, passes=self.passes, ci_halfwidth=self.ci_halfwidth * k,
            singular=self.singular, converged=self.converged,
            probes_per_sample=self.probes_per_sample, bound=self.bound,
            bias_bound=self.bias_bound * k, info=dict(self.info),
        )

    def mean(self, population: bool = False) -> Aggregate:
        """Mean over the samples of this batch.

        Args:
            population: if False (default) the standard error is that of estimating the mean of
                these very samples, ``sqrt(sum stderr^2) / B``, and the 95% half-width is
                :func:`mean_halfwidth` of the samples' own intervals. If True it is the standard
                error of the mean as an estimate of the data distribution's mean (the sample
                standard deviation over ``sqrt(B)``, which already includes the estimator
                noise), with a Student-t half-width on ``B - 1`` degrees of freedom.
        """
        v = self.value
        n = v.shape[0]
        bias = float(self.bias_bound.mean())
        if population:
            # an exact -inf (a singular log det): the distribution's spread is unknown, no
            # claim (as FSInfoMetric.compute; the sample std of -inf values is nan)
            finite_spread = n > 1 and not bool(torch.isneginf(v).any())
            se = float(v.std(unbiased=True) / math.sqrt(n)) if finite_spread else math.inf
            # the spread over n samples: Student-t with n - 1 degrees of freedom
            hw = t_quantile(n - 1) * se + bias if finite_spread else math.inf
        else:
            se = float(torch.sqrt((self.stderr**2).sum()) / n)
            hw = mean_halfwidth(self.stderr.tolist(), self.ci_halfwidth.tolist(),
                                self.bias_bound.tolist())
        return Aggregate(float(v.mean()), se, ci_halfwidth=hw, bias_bound=bias,
                         bound=bool(self.bound.any()), metric=self.metric, units=self.units)

    def worst(self) -> Aggregate:
        """The most leaking sample: the largest value (FSInfo and dFIL both grow with leakage),
        with a 95% interval for the batch's largest true value (:func:`max_interval`; its
        ``ci_halfwidth`` is the chosen sample's own, which does not cover it: the largest of
        several noisy estimates is biased upward)."""
        i = int(torch.argmax(self.value))
        dof = (None if self.probes_per_sample is None
               else [int(k) - 1 for k in self.probes_per_sample.tolist()])
        n = len(self)
        low, high = max_interval(self.value.tolist(), self.ci_halfwidth.tolist(),
                                 dof or [None] * n, self.bound.tolist())
        return Aggregate(float(self.value[i]), float(self.stderr[i]), index=i,
                         ci_halfwidth=float(self.ci_halfwidth[i]),
                         bias_bound=float(self.bias_bound[i]), bound=bool(self.bound[i]),
                         low=low, high=high, metric=self.metric, units=self.units)

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(f"{float(v):.4g}" for v in self.value[:4])
        more = ", ..." if n > 4 else ""
        se = float(self.stderr.max()) if n else 0.0
        return (
            f"MetricResult({self.metric}, [{head}{more}] {self.units}, "
            f"max stderr {se:.2g}, estimator={self.estimator}, B={n}, d={self.d}, m={self.m}"
            f"{_flag_counts(self.converged, self.bound)})"
        )


def _flag_counts(converged: Tensor, bound: Tensor | None) -> str:
    """The ``repr``'s note of the samples that missed their tolerance and of the upper bounds
    (``", 2 not converged"``; empty where there are none): the values alone look final."""
    notes = []
    n = int((~converged).sum())
    if n:
        notes.append(f"{n} not converged")
    k = 0 if bound is None else int(bound.sum())
    if k:
        notes.append(f"{k} upper bound{'s' if k > 1 else ''} only")
    return "".join(f", {t}" for t in notes)


@dataclass(frozen=True)
class SigmaResult:
    r"""Per-sample noise scales that reach a target (FSInfoGuard's ``sigma*``, dFIL calibration).

    Attributes:
        sigma: ``[B]`` float64 per-sample noise scale (in the smashed data's units).
        target: ``[B]`` float64 target: FSInfo ``tau`` in nats per input dimension, or the dFIL
            bound ``b`` (per-dimension MSE of unbiased attackers, squared input units).
        metric: ``"fsinfo_diag"``, ``"fsinfo_logdet"`` or ``"dfil"``.
        estimator: that of the metric result it was computed from (``"exact"``,
            ``"exact-fast"``, ``"randomized"`` or ``"mixed"``, see :class:`MetricResult`), or
            ``"mixed"`` for batches concatenated over several.
        ci_low, ci_high: ``[B]`` 95% interval of ``sigma`` from the estimate's interval (equal to
            ``sigma`` for the exact estimator).
        converged: ``[B]`` bool (see :class:`MetricResult`).
        info: provenance (backend, probes, the metric result it was computed from).

    Example:
        >>> import torch
        >>> s = SigmaResult(sigma=torch.tensor([1.0, 3.0], dtype=torch.float64),
        ...                 target=torch.tensor([-1.0, -1.0], dtype=torch.float64),
        ...                 metric="fsinfo_diag", estimator="exact")
        >>> s.dataset("max"), s.dataset("mean")
        (3.0, 2.0)
    """

    sigma: Tensor
    target: Tensor
    metric: str
    estimator: str
    ci_low: Tensor | None = None
    ci_high: Tensor | None = None
    converged: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ci_low is None:
            object.__setattr__(self, "ci_low", self.sigma.clone())
        if self.ci_high is None:
            object.__setattr__(self, "ci_high", self.sigma.clone())
        if self.converged is None:
            object.__setattr__(self, "converged", torch.ones_like(self.sigma, dtype=torch.bool))

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    def __getitem__(self, idx: object) -> SigmaResult:
        """The samples ``idx`` selects (as :meth:`MetricResult.__getitem__`): ``sigma``,
        ``target``, the interval and ``converged`` at those samples; ``info`` the batch's with
        ``info["batch_indices"]``."""
        rows, info = _selection(idx, len(self), self.info)
        return SigmaResult(sigma=_take(self.sigma, rows), target=_take(self.target, rows),
                           metric=self.metric, estimator=self.estimator,
                           ci_low=_take(self.ci_low, rows), ci_high=_take(self.ci_high, rows),
                           converged=_take(self.converged, rows), info=info)

    def records(self) -> list[dict[str, Any]]:
        """One plain dict per sample (``index``, ``metric``, ``estimator``, ``target``,
        ``sigma``, ``ci_low``, ``ci_high``, ``converged``; ``inf`` kept where no finite noise
        reaches the target), e.g. for ``pandas.DataFrame(s.records())``."""
        index = self.info.get("batch_indices", range(len(self)))
        return [{"index": int(index[k]), "metric": self.metric, "estimator": self.estimator,
                 "target": self.target[k].item(), "sigma": self.sigma[k].item(),
                 "ci_low": self.ci_low[k].item(), "ci_high": self.ci_high[k].item(),
                 "converged": bool(self.converged[k])} for k in range(len(self))]

    def ci95(self) -> tuple[Tensor, Tensor]:
        """Per-sample 95% interval of ``sigma``."""
        return self.ci_low, self.ci_high

    #: Data-set statistics :meth:`dataset` knows.
    STATISTICS = ("max", "quantile", "mean", "rms")

    def dataset(self, statistic: str = "max", q: float = 0.95, *,
                conservative: bool = False) -> float:
        """One data-set noise scale from the per-sample ones.

        Args:
            statistic: ``"max"`` (every sample reaches the target or better), ``"quantile"``
                (a fraction ``q`` does), ``"mean"``, or ``"rms"`` (``sqrt(mean sigma^2)``: for
                dFIL this is Maeng et al.'s calibration ``sqrt(b mean_x tr(J^T J) / d)``, which
                puts the reciprocal of the batch-mean dFIL at ``b``).
            q: the quantile for ``statistic="quantile"``, in ``(0, 1]``.
            conservative: use the upper ends of the per-sample 95% intervals instead of the
                estimates (more noise, never less protection from estimation error).
        """
        if statistic not in self.STATISTICS:
            raise InvalidInputError(
                f"statistic must be one of {self.STATISTICS}, got {statistic!r}")
        s = self.ci_high if conservative else self.sigma
        if statistic == "max":
            return float(s.max())
        if statistic == "mean":
            return float(s.mean())
        if statistic == "rms":
            return float((s**2).mean().sqrt())
        q = check_q(q)
        # "higher": at least a fraction q of the samples are at or below it (linear
        # interpolation fell between two samples: 4 of 5 at q = 0.95)
        return float(torch.quantile(s, q, interpolation="higher"))

    def __repr__(self) -> str:
        head = ", ".join(f"{float(v):.4g}" for v in self.sigma[:4])
        more = ", ..." if len(self) > 4 else ""
        return (f"SigmaResult({self.metric}, sigma [{head}{more}], estimator={self.estimator}, "
                f"B={len(self)}{_flag_counts(self.converged, None)})")
