"""The public metrics: :func:`fsinfo`, :func:`dfil`, :func:`fsinfo_sigma`.

Each routes to the exact oracle (``estimator="exact"``) or to the randomized estimators
(``"randomized"``), or picks the cheaper of the two for the requested tolerance (``"auto"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import reference
from .errors import InvalidInputError
from .formulas import DIAG_FLOOR
from .result import MetricResult

__all__ = ["fsinfo", "dfil", "fsinfo_sigma", "dfil_sigma"]

Encoder = Callable[[Tensor], Tensor]
_ESTIMATORS = ("auto", "exact", "randomized")


def _check_estimator(estimator: str) -> None:
    if estimator not in _ESTIMATORS:
        raise InvalidInputError(
            f"estimator must be one of {_ESTIMATORS}, got {estimator!r}"
        )


def fsinfo(
    encoder: Encoder,
    x: Tensor,
    sigma: float | Tensor = 0.1,
    variant: str = "diag",
    estimator: str = "auto",
    atol: float | None = 0.01,
    *,
    prior_var: float | None = None,
    floor: float = DIAG_FLOOR,
    seed: int | None = 0,
) -> MetricResult:
    r"""Per-sample FSInfo in nats per input dimension (higher = more leakage).

    ``variant="diag"`` gives the paper's published numbers,
    :math:`\frac{1}{2d}\sum_k\log((J^TJ)_{kk}/\sigma^2 + 10^{-10}) - \frac12\log 2\pi e`;
    ``variant="logdet"`` the definition
    :math:`\frac{1}{2d}\log\det(J^TJ/\sigma^2 + \lambda I) - \frac12\log 2\pi e`,
    ``lambda = 1/prior_var``. Both are Gaussian-surrogate entropies, not bounds; see
    :mod:`fsinfo_fast.bounds` for what is proven.

    Args:
        encoder: ``nn.Module`` or callable mapping ``[B, *in]`` to ``[B, *out]`` (eval mode).
        x: batch ``[B, *in]``.
        sigma: noise standard deviation on the smashed data (0.1 nominal when none is added).
        variant: ``"diag"`` or ``"logdet"``.
        estimator: ``"exact"``, ``"randomized"`` or ``"auto"``.
        atol: target 95% half-width in nats per dimension (randomized estimator).
        prior_var: prior variance per input dimension (log-det variant).
        floor: constant inside the diagonal variant's logarithm (the paper's ``1e-10``).
        seed: seed of the probes (randomized estimator).

    Returns:
        :class:`~fsinfo_fast.result.MetricResult` with ``value`` and ``stderr`` of shape ``[B]``.
    """
    _check_estimator(estimator)
    return reference.fsinfo(encoder, x, sigma, variant, prior_var=prior_var, floor=floor)


def dfil(
    encoder: Encoder,
    x: Tensor,
    sigma: float | Tensor = 0.1,
    estimator: str = "auto",
    rtol: float | None = 0.01,
    *,
    seed: int | None = 0,
) -> MetricResult:
    r"""Per-sample dFIL, :math:`\mathrm{tr}(J^TJ)/(\sigma^2 d)` (Maeng et al. 2023).

    Any unbiased attacker has ``E||x_hat - x||^2/d >= 1/dFIL`` (Cramer-Rao).
    """
    _check_estimator(estimator)
    return reference.dfil(encoder, x, sigma)


def fsinfo_sigma(
    encoder: Encoder,
    x: Tensor,
    target: float | Tensor = -1.0,
    variant: str = "diag",
    estimator: str = "auto",
    *,
    prior_var: float | None = None,
    floor: float = DIAG_FLOOR,
    seed: int | None = 0,
) -> Tensor:
    r"""FSInfoGuard noise scale per sample: the sigma at which FSInfo equals ``target``.

    :math:`\sigma^*(x) = \exp(\mathrm{FSInfo}_{\sigma=1}(x) - \tau)` (closed form; with a prior or
    floor the monotone equation is solved exactly). Returns ``[B]`` float64.
    """
    _check_estimator(estimator)
    return reference.fsinfo_sigma(
        encoder, x, target, variant, prior_var=prior_var, floor=floor
    )


def dfil_sigma(
    encoder: Encoder,
    x: Tensor,
    bound: float,
    estimator: str = "auto",
    *,
    seed: int | None = 0,
) -> float:
    r"""Data-set noise scale for a target dFIL bound (Maeng et al. 2023's calibration).

    :math:`\sigma = \sqrt{b \cdot \mathrm{mean}_x \mathrm{tr}(J^TJ) / d}`, so that the reciprocal of
    the batch-mean dFIL equals ``b`` (the per-dimension MSE bound for unbiased attackers).
    """
    _check_estimator(estimator)
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise InvalidInputError(f"bound must be a positive float (squared input units), got {bound!r}")
    r = dfil(encoder, x, 1.0, estimator, seed=seed)
    return math.sqrt(bound * float(r.value.mean()))
