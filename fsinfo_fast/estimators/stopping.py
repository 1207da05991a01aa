r"""How many probes: a fixed number, or rounds until every sample's interval is narrow enough.

All estimators share :class:`StoppingRule` and :func:`run_rounds`. With a tolerance, probes are
drawn in rounds (``min_probes`` first, then ``round_size`` more each round, at most
``max_probes``); after each round every sample's two-sided interval half-width
``t_{(1+c)/2, dof} * stderr`` is compared with the target

.. math:: h_b \le \mathrm{atol} \quad\text{or}\quad h_b \le \mathrm{rtol}\,|\hat\theta_b|

(either suffices; ``atol`` is in the value's units, e.g. nats per input dimension for FSInfo).
A sample that meets it is *frozen*: its estimate, error bar and probe count are recorded at that
round and later probes of the batch do not change it. The round schedule does not depend on the
batch, so a sample's estimate is the same alone or in any batch. Samples still open at
``max_probes`` are recorded with ``converged = False``.

Early stopping on the estimated interval makes the reported interval slightly optimistic (a
sequential-testing effect); ``min_probes`` keeps the standard error from being trusted while it
rests on too few probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .base import t_quantile

__all__ = ["StoppingRule", "Frozen", "run_rounds", "tolerance_met"]


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
        round_size: probes added per round after the first (``>= 1``).
        confidence: two-sided confidence level of the interval, in ``(0, 1)``.

    One of ``num_probes``, ``atol`` or ``rtol`` must be given.

    Example:
        >>> list(StoppingRule(atol=0.1, min_probes=4, round_size=3, max_probes=9).schedule())
        [(0, 4, False), (4, 3, False), (7, 2, True)]
    """

    num_probes: int | None = None
    atol: float | None = None
    rtol: float | None = None
    min_probes: int = 10
    max_probes: int = 1000
    round_size: int = 10
    confidence: float = 0.95

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
            c = min(self.round_size, self.max_probes - k)
            yield k, c, k + c >= self.max_probes
            k += c

    def met(self, value: Tensor, halfwidth: Tensor) -> Tensor:
        """``[B]`` bool: the interval meets ``atol`` or ``rtol`` (all True without a tolerance)."""
        return tolerance_met(value, halfwidth, self.atol, self.rtol)

    @property
    def targets(self) -> tuple[float | None, float | None]:
        """``(atol, rtol)``."""
        return self.atol, self.rtol


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
    """Recorded per-sample results of one quantity (``[B]`` float64 each; ``dof`` int64)."""

    value: Tensor
    stderr: Tensor
    ci_halfwidth: Tensor
    dof: Tensor


#: ``summarize()`` returns, per quantity name, ``(value [B], stderr [B], dof)``.
Summary = dict[str, tuple[Tensor, Tensor, int]]


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
        summarize: current ``{name: (value, stderr, dof)}`` from all probes processed so far.
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
            for name, (v, _, _) in summ.items():
                nan = torch.full_like(v, math.nan)
                dofs = torch.zeros(batch, dtype=torch.int64, device=device)
                frozen[name] = Frozen(nan.clone(), nan.clone(), nan.clone(), dofs)
        ok = torch.ones(batch, dtype=torch.bool, device=device)
        hws = {}
        for name, (v, se, dof) in summ.items():
            exact = ~torch.isfinite(v)
            se = torch.where(exact, torch.zeros_like(se), se)
            hw = t_quantile(dof, rule.confidence) * se
            hw = torch.where(se == 0, torch.zeros_like(hw), hw)  # inf * 0 for dof < 1
            hws[name] = (v, se, hw, dof)
            if name in targets:
                ok &= tolerance_met(v, hw, *targets[name]) | exact
        newly = ~done & (ok | last)
        if bool(newly.any()):
            for name, (v, se, hw, dof) in hws.items():
                f = frozen[name]
                f.value[newly], f.stderr[newly] = v[newly], se[newly]
                f.ci_halfwidth[newly] = hw[newly]
                f.dof[newly] = dof
            converged[newly] = ok[newly]
            probes[newly] = drawn
            done |= newly
        if bool(done.all()):
            break
    return frozen, converged, probes, drawn
