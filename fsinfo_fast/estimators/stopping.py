r"""How many probes: a fixed number, or rounds until every sample's interval is narrow enough.

All estimators share :class:`StoppingRule` and :func:`run_rounds`. With a tolerance, probes are
drawn in rounds (``min_probes`` first, then ``max(round_size, ceil((growth - 1) k))`` more
after ``k`` probes, at most ``max_probes``); after each round every sample's two-sided interval
half-width ``t_{(1+c)/2, dof} * stderr (+ bias_bound)`` is compared with the target

.. math:: h_b \le \mathrm{atol} \quad\text{or}\quad h_b \le \mathrm{rtol}\,|\hat\theta_b|

(either suffices; ``atol`` is in the value's units, e.g. nats per input dimension for FSInfo).
A sample that meets it is *frozen*: its estimate, error bar and probe count are recorded at that
round and later probes of the batch do not change it. The round schedule does not depend on the
batch, so a sample's estimate is the same alone or in any batch. Samples still open at
``max_probes`` are recorded with ``converged = False``.

Early stopping on the estimated interval makes the reported interval slightly optimistic (a
sequential-testing effect: a sample stops where its variance estimate happens to be low). The
start and the growth of the rounds are :func:`initial_probes` and :data:`DEFAULT_GROWTH`
(4 probes, then +50% per round); the coverage under this schedule is measured, not assumed
(``benchmarks/coverage.py``; see :func:`initial_probes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .base import t_quantile

__all__ = [
    "DEFAULT_GROWTH",
    "DEFAULT_ROUND",
    "START_PROBES",
    "START_TRACE_PROBES",
    "Frozen",
    "StoppingRule",
    "initial_probes",
    "run_rounds",
    "tolerance_met",
]

#: The first round of the diagonal estimator (FSInfo_diag and dFIL from its probes), see
#: :func:`initial_probes` ...
START_PROBES = 4
#: ... and of the stand-alone trace estimators (Hutchinson, Hutch++).
START_TRACE_PROBES = 10
#: Rounds after the first grow the probe count by this factor ...
DEFAULT_GROWTH = 1.5
#: ... adding at least this many probes.
DEFAULT_ROUND = 2


def _check_int(name: str, val: object, lo: int) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        raise InvalidInputError(f"{name} must be an int >= {lo}, got {val!r}")


def _check_tol(name: str, val: object) -> None:
    if val is None:
        return
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise InvalidInputError(f"{name} must be a positive float or None, got {val!r}")
    if not (math.isfinite(val) and val > 0):
        raise InvalidInputError(f"{name} must be positive and finite, got {val!r}")


@dataclass(frozen=True)
class StoppingRule:
    """When to stop drawing probes.

    Args:
        num_probes: a fixed number of probes (``>= 2``, needed for a standard error). If given,
            exactly this many are used; ``atol``/``rtol`` then only set ``converged``.
        atol: target half-width of the interval, in the value's units (``> 0``).
        rtol: target half-width relative to ``|value|`` (``> 0``).
        min_probes: probes before the standard error is trusted (``>= 2``).
        max_probes: cap on the probes per sample (``>= min_probes``).
        round_size: the fewest probes added per round after the first (``>= 1``).
        confidence: two-sided confidence level of the interval, in ``(0, 1)``.
        growth: after ``k`` probes the next round adds ``max(round_size, ceil((growth - 1) k))``
            (``>= 1``; ``1``: fixed rounds of ``round_size``). Geometric rounds keep the number
            of product calls (and of looks at the data) logarithmic in the probe count.

    One of ``num_probes``, ``atol`` or ``rtol`` must be given.

    Example:
        >>> list(StoppingRule(atol=0.1, min_probes=4, round_size=3, max_probes=9).schedule())
        [(0, 4, False), (4, 3, False), (7, 2, True)]
        >>> [s + c for s, c, _ in StoppingRule(atol=0.1, min_probes=4, round_size=2,
        ...                                     growth=1.5, max_probes=60).schedule()]
        [4, 6, 9, 14, 21, 32, 48, 60]
    """

    num_probes: int | None = None
    atol: float | None = None
    rtol: float | None = None
    min_probes: int = 10
    max_probes: int = 1000
    round_size: int = 10
    confidence: float = 0.95
    growth: float = 1.0

    def __post_init__(self) -> None:
        if self.num_probes is not None:
            if isinstance(self.num_probes, bool) or not isinstance(self.num_probes, int):
                raise InvalidInputError(f"num_probes must be an int, got {self.num_probes!r}")
            if self.num_probes < 2:
                raise InvalidInputError(
                    f"num_probes must be >= 2 (a standard error needs two probes), got "
                    f"{self.num_probes}"
                )
        _check_tol("atol", self.atol)
        _check_tol("rtol", self.rtol)
        _check_int("min_probes", self.min_probes, 2)
        _check_int("max_probes", self.max_probes, 2)
        _check_int("round_size", self.round_size, 1)
        if self.max_probes < self.min_probes:
            raise InvalidInputError(
                f"max_probes ({self.max_probes}) must be >= min_probes ({self.min_probes})"
            )
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < c < 1.0):
            raise InvalidInputError(f"confidence must be in (0, 1), got {c!r}")
        g = self.growth
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (1.0 <= g <= 16.0):
            raise InvalidInputError(f"growth must be a number in [1, 16], got {g!r}")
        if self.num_probes is None and self.atol is None and self.rtol is None:
            raise InvalidInputError(
                "give num_probes (a fixed probe count) or a tolerance (atol and/or rtol) for "
                "adaptive stopping"
            )

    @property
    def adaptive(self) -> bool:
        """True when probes are drawn in rounds until the tolerance is met."""
        return self.num_probes is None

    def schedule(self) -> Iterator[tuple[int, int, bool]]:
        """``(start, count, last)`` of each round: fixed by the rule, never by the data."""
        if not self.adaptive:
            yield 0, int(self.num_probes), True
            return
        k = min(self.min_probes, self.max_probes)
        yield 0, k, k >= self.max_probes
        while k < self.max_probes:
            step = max(self.round_size, math.ceil(round((self.growth - 1.0) * k, 9)))
            c = min(step, self.max_probes - k)
            yield k, c, k + c >= self.max_probes
            k += c

    def met(self, value: Tensor, halfwidth: Tensor) -> Tensor:
        """``[B]`` bool: the interval meets ``atol`` or ``rtol`` (all True without a tolerance)."""
        return tolerance_met(value, halfwidth, self.atol, self.rtol)

    @property
    def targets(self) -> tuple[float | None, float | None]:
        """``(atol, rtol)``."""
        return self.atol, self.rtol


def initial_probes(
    *,
    num_probes: int | None = None,
    max_probes: int = 1000,
    min_probes: int | None = None,
    quantity: str = "fsinfo_diag",
) -> int:
    r"""The first round of an adaptive estimator: 4 probes for the diagonal estimator
    (``quantity="fsinfo_diag"``, which also gives dFIL from the same probes), 10 for a
    stand-alone trace estimator (``"trace"``); ``num_probes`` if fixed, ``min_probes`` if given;
    capped at ``max_probes``, at least 2.

    Why and why this is honest. Every interval here is a Student-t interval whose degrees of
    freedom grow with the probes (``K - 1``), so the first round only decides how early the
    estimate may be *looked at*: a sample that meets its tolerance at ``K`` probes reports the
    interval at ``K``. Two effects bound the start from below. (1) Below 4 probes the
    t-quantile (12.7 at ``K = 2``, 4.3 at ``K = 3``, 3.2 at ``K = 4``) makes the half-width 10, 4
    and 3 standard deviations, so a lower start buys almost nothing and adds product calls.
    (2) Sequential stopping: a sample stops where its variance estimate happens to be low, so
    early looks with few degrees of freedom undercover. With exactly Gaussian per-probe values
    and +50% rounds the coverage at the stop drops to 0.915 from a start of 4 and 0.937 from 10
    (20000 simulated runs, worst per-probe spread). FSInfo_diag is protected from it by the
    exactly known part of its variance (:func:`~fsinfo_fast.estimators.diagonal.
    fsinfo_diag_summary`), so it starts at 4 (a full-resolution encoder such as ResNet-18
    split 7 at 224 px then stops at the first round: about 0.007 nats/dim at ``K = 4``); a
    trace has no such bound and starts at 10. The coverage at the probe counts the defaults
    actually use is measured by ``benchmarks/coverage.py`` (``benchmarks/results/
    coverage.md``) and checked in reduced form by ``tests/test_coverage_study.py``. Where the
    exact oracle is cheaper than the start, ``auto`` uses it instead (``fsinfo_fast.metrics``).

    Example:
        >>> initial_probes(), initial_probes(quantity="trace"), initial_probes(num_probes=7)
        (4, 10, 7)
    """
    if num_probes is not None:
        return int(num_probes)
    if quantity not in ("fsinfo_diag", "trace"):
        raise InvalidInputError(f"quantity must be 'fsinfo_diag' or 'trace', got {quantity!r}")
    start = START_PROBES if quantity == "fsinfo_diag" else START_TRACE_PROBES
    k = start if min_probes is None else int(min_probes)
    return max(2, min(k, int(max_probes)))


def tolerance_met(
    value: Tensor, halfwidth: Tensor, atol: float | None, rtol: float | None
) -> Tensor:
    """``[B]`` bool: ``halfwidth <= atol`` or ``halfwidth <= rtol |value|`` (True if both None)."""
    if atol is None and rtol is None:
        return torch.ones_like(value, dtype=torch.bool)
    ok = torch.zeros_like(value, dtype=torch.bool)
    if atol is not None:
        ok |= halfwidth <= atol
    if rtol is not None:
        ok |= halfwidth <= rtol * value.abs()
    return ok


@dataclass
class Frozen:
    """Recorded per-sample results of one quantity (``[B]`` float64 each; ``dof`` int64).

    ``ci_halfwidth = t_{dof} * stderr + bias_bound``.
    """

    value: Tensor
    stderr: Tensor
    ci_halfwidth: Tensor
    dof: Tensor
    bias_bound: Tensor


#: ``summarize()`` returns, per quantity name, ``(value [B], stderr [B], dof)`` or
#: ``(value, stderr, dof, bias_bound [B])`` (a deterministic error allowance added to the
#: half-width) or ``(value, stderr, dof, bias_bound, halfwidth [B])`` (an interval that is not
#: ``t * stderr``, e.g. the log-scale interval of a trace; it includes ``bias_bound``).
Summary = dict[str, tuple]


def run_rounds(
    rule: StoppingRule,
    *,
    batch: int,
    device: torch.device,
    process: Callable[[int, int], None],
    summarize: Callable[[], Summary],
    targets: Mapping[str, tuple[float | None, float | None]],
) -> tuple[dict[str, Frozen], Tensor, Tensor, int]:
    """Drive the rounds of an estimator and freeze each sample when it meets the rule.

    Args:
        rule: the stopping rule.
        batch: ``B``.
        device: device of the per-sample tensors.
        process: ``process(start, count)`` consumes probes ``start .. start+count-1``.
        summarize: current ``{name: (value, stderr, dof[, bias_bound])}`` from all probes
            processed so far.
        targets: ``{name: (atol, rtol)}`` for the quantities whose intervals must all meet
            their tolerance (the others are recorded alongside).

    Returns:
        ``(frozen, converged, probes_per_sample, probes_drawn)``: the recorded quantities, the
        ``[B]`` converged mask, the ``[B]`` probe counts, and the probes drawn for the batch.
        Samples with a non-finite value (an exact ``-inf``) have stderr 0 and count as met.
    """
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    probes = torch.zeros(batch, dtype=torch.int64, device=device)
    frozen: dict[str, Frozen] = {}
    drawn = 0
    for start, count, last in rule.schedule():
        process(start, count)
        drawn = start + count
        summ = summarize()
        if not frozen:
            for name, parts in summ.items():
                nan = torch.full_like(parts[0], math.nan)
                dofs = torch.zeros(batch, dtype=torch.int64, device=device)
                frozen[name] = Frozen(nan.clone(), nan.clone(), nan.clone(), dofs, nan.clone())
        ok = torch.ones(batch, dtype=torch.bool, device=device)
        hws = {}
        for name, parts in summ.items():
            v, se, dof = parts[:3]
            bias = parts[3] if len(parts) > 3 else torch.zeros_like(v)
            exact = ~torch.isfinite(v)
            se = torch.where(exact, torch.zeros_like(se), se)
            bias = torch.where(exact, torch.zeros_like(bias), bias)
            if len(parts) > 4:
                hw = torch.where(exact, torch.zeros_like(parts[4]), parts[4])
            else:
                hw = t_quantile(dof, rule.confidence) * se
                hw = torch.where(se == 0, torch.zeros_like(hw), hw) + bias  # inf*0 for dof < 1
            hws[name] = (v, se, hw, dof, bias)
            if name in targets:
                ok &= tolerance_met(v, hw, *targets[name]) | exact
        newly = ~done & (ok | last)
        if bool(newly.any()):
            for name, (v, se, hw, dof, bias) in hws.items():
                f = frozen[name]
                f.value[newly], f.stderr[newly] = v[newly], se[newly]
                f.ci_halfwidth[newly] = hw[newly]
                f.bias_bound[newly] = bias[newly]
                f.dof[newly] = dof
            converged[newly] = ok[newly]
            probes[newly] = drawn
            done |= newly
        if bool(done.all()):
            break
    return frozen, converged, probes, drawn
