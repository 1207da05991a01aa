r"""Cost model in Jacobian products (passes) per sample, for choosing an estimator.

A *pass* is one JVP or one VJP of one probe (a forward pass costs about as much). The exact
oracle needs ``min(m, d)`` passes (one-hot VJPs or JVPs) whatever the tolerance; the randomized
estimators need a number that depends on the probes ``K`` and, for SLQ, the Lanczos order.
``estimator="auto"`` can compare :func:`expected_passes` of the candidates.
"""

from __future__ import annotations

from ..errors import InvalidInputError

__all__ = ["expected_passes", "ESTIMATORS"]

#: Names understood by :func:`expected_passes`.
ESTIMATORS = ("exact", "diag", "hutchinson", "hutch++", "slq")


def expected_passes(
    estimator: str,
    *,
    d: int,
    m: int,
    num_probes: int = 0,
    order: int = 30,
    sketch_size: int = 0,
    prior: bool = False,
) -> int:
    """Jacobian products per sample.

    Args:
        estimator: one of :data:`ESTIMATORS`.
        d, m: input and output dimensions.
        num_probes: probes ``K`` (residual probes for Hutch++).
        order: Lanczos order (SLQ), capped at ``min(m, d)``.
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
        return 2 * min(order, n) * num_probes
    raise InvalidInputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
