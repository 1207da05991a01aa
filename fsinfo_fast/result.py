"""Result objects returned by the metrics: per-sample values with error bars and provenance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["MetricResult", "Aggregate"]

_Z95 = 1.959963984540054


@dataclass(frozen=True)
class Aggregate:
    """A scalar summary over samples with its standard error (float64)."""

    value: float
    stderr: float
    index: int | None = None  # which sample, for the worst case

    def ci95(self) -> tuple[float, float]:
        """Normal 95% interval ``value +- 1.96 stderr``."""
        return (self.value - _Z95 * self.stderr, self.value + _Z95 * self.stderr)


@dataclass(frozen=True)
class MetricResult:
    """Per-sample metric values with standard errors.

    Attributes:
        value: ``[B]`` float64 per-sample values (``units`` says in what).
        stderr: ``[B]`` float64 standard errors (0 for the exact estimator).
        metric: ``"fsinfo_diag"``, ``"fsinfo_logdet"`` or ``"dfil"``.
        units: ``"nats/dim"`` for FSInfo; ``"1/dim"`` for dFIL (Fisher information per input
            dimension, in inverse squared input units).
        estimator: ``"exact"`` or ``"randomized"``.
        sigma: ``[B]`` float64 noise scale used.
        d: input dimension; m: output dimension.
        num_probes: probes used per sample (``None`` for exact).
        passes: Jacobian products (JVP or VJP) per sample.
        ci_halfwidth: ``[B]`` half-width of the 95% interval (0 for exact).
        singular: ``[B]`` bool, where the Fisher matrix was found singular (log-det is ``-inf``).
        converged: ``[B]`` bool: the interval met the requested tolerance (always True for the
            exact estimator; False where the probe cap stopped the sample first).
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

    def ci95(self) -> tuple[Tensor, Tensor]:
        """Per-sample 95% interval ``(low, high)`` (``low = -inf`` where ``bound``: the value is
        then only an upper bound)."""
        low = self.value - self.ci_halfwidth
        low = torch.where(self.bound, torch.full_like(low, -math.inf), low)
        return low, self.value + self.ci_halfwidth

    def to_bits(self) -> MetricResult:
        """The same result in bits per input dimension (FSInfo only)."""
        if self.units != "nats/dim":
            raise ValueError(
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
                these very samples, ``sqrt(sum stderr^2) / B``. If True it is the standard error of
                the mean as an estimate of the data distribution's mean (the sample standard
                deviation over ``sqrt(B)``, which already includes the estimator noise).
        """
        v = self.value
        n = v.shape[0]
        if population:
            se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.inf
        else:
            se = float(torch.sqrt((self.stderr**2).sum()) / n)
        return Aggregate(float(v.mean()), se)

    def worst(self) -> Aggregate:
        """The most leaking sample: the largest value (FSInfo and dFIL both grow with leakage)."""
        i = int(torch.argmax(self.value))
        return Aggregate(float(self.value[i]), float(self.stderr[i]), index=i)

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(f"{float(v):.4g}" for v in self.value[:4])
        more = ", ..." if n > 4 else ""
        se = float(self.stderr.max()) if n else 0.0
        return (
            f"MetricResult({self.metric}, [{head}{more}] {self.units}, "
            f"max stderr {se:.2g}, estimator={self.estimator}, B={n}, d={self.d}, m={self.m})"
        )
