r"""Cost model in Jacobian products (passes) per sample, for choosing an estimator.

A *pass* is one JVP or one VJP of one probe (a forward pass costs about as much). The exact
oracle needs ``min(m, d)`` passes (one-hot VJPs or JVPs) whatever the tolerance; the randomized
estimators need a number that depends on the probes ``K`` and, for SLQ, the Lanczos order.
``estimator="auto"`` can compare :func:`expected_passes` of the candidates.
"""

from __future__ import annotations

from ..errors import InvalidInputError

__all__ = ["expected_passes", "ESTIMATORS", "SLQ_ORDER_ESTIMATE"]

#: Names understood by :func:`expected_passes`.
ESTIMATORS = ("exact", "diag", "hutchinson", "hutch++", "slq")

#: First-round estimate of the adaptive SLQ order (``order=None``): what a well-conditioned
#: Fisher matrix or one with a prior needs at 0.01 nats/dim (8-30 steps measured); log-spaced
#: spectra over several decades need up to ``n`` (the estimate is then low, and ``auto`` caps
#: the order so that the randomized route never costs much more than the oracle).
SLQ_ORDER_ESTIMATE = 30


def expected_passes(
    estimator: str,
    *,
    d: int,
    m: int,
    num_probes: int = 0,
    order: int | None = 30,
    sketch_size: int = 0,
    prior: bool = False,
) -> int:
    """Jacobian products per sample.

    Args:
        estimator: one of :data:`ESTIMATORS`.
        d, m: input and output dimensions.
        num_probes: probes ``K`` (residual probes for Hutch++).
        order: Lanczos order (SLQ), capped at ``min(m, d)``; None: the adaptive order, estimated
            as :data:`SLQ_ORDER_ESTIMATE`.
        sketch_size: Hutch++ sketch columns ``k`` (capped at the side's dimension).
        prior: whether the log det has a prior term (without one and ``m < d`` SLQ costs 0).

    Returns:
        ``min(m, d)`` (exact), ``K`` (diag, Hutchinson), ``3 k + K`` (Hutch++),
        ``2 order K`` (SLQ; 0 when ``m < d`` and no prior: the value is ``-inf``).

    Example:
        >>> expected_passes("slq", d=3072, m=8192, num_probes=10, order=30)
        600
        >>> expected_passes("exact", d=3072, m=8192)
        3072
    """
    n = min(m, d)
    if estimator == "exact":
        return n
    if estimator in ("diag", "hutchinson"):
        return num_probes
    if estimator == "hutch++":
        return 3 * min(sketch_size, n) + num_probes
    if estimator == "slq":
        if m < d and not prior:
            return 0
        k = SLQ_ORDER_ESTIMATE if order is None else order
        return 2 * min(k, n) * num_probes
    raise InvalidInputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
