"""The public metrics: :func:`fsinfo`, :func:`dfil`, :func:`fsinfo_sigma`, :func:`dfil_sigma`.

Each routes to the exact oracle (``estimator="exact"``), to the randomized estimators
(``"randomized"``), or picks the cheaper of the two for the request (``"auto"``, the default):
the oracle costs ``min(m, d)`` Jacobian products per sample whatever the tolerance, a randomized
estimator the probes it needs. ``auto`` runs the randomized estimator with its probe budget capped
at ``min(m, d)`` and finishes with the oracle for a batch it could not resolve within that budget,
so it never costs more than about twice the cheaper route.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import reference
from .encoder import PreparedEncoder, check_prior_var, check_sigma, prepare
from .engine import default_memory_budget, make_products
from .errors import InvalidInputError
from .estimators import estimate_diag, expected_passes, hutchinson_trace, hutchpp_trace, slq_logdet
from .estimators.base import Estimate
from .formulas import DIAG_FLOOR, as_sigma
from .result import MetricResult

__all__ = ["fsinfo", "dfil", "fsinfo_sigma", "dfil_sigma"]

log = logging.getLogger(__name__)

Encoder = Callable[[Tensor], Tensor]
_ESTIMATORS = ("auto", "exact", "randomized")
_DFIL_METHODS = ("auto", "diag", "hutchinson", "hutch++")
#: Probes a randomized estimator starts with (its first round).
_MIN_PROBES = 10
#: ... the diagonal log-sum (its jackknife interval, first trusted at this many probes: at 10 a
#: 3-seed calibration on ResNet-18 split 7 at 32 px showed a 95% error of 0.018 for atol 0.01)
_MIN_DIAG_PROBES = 20
#: ... and the trace estimators, whose t-intervals need more probes for honest coverage.
_MIN_TRACE_PROBES = 30
#: How many samples the sample-independence check encodes alone.
_INTERACTION_CHECKS = 2


def _check_estimator(estimator: str) -> None:
    if estimator not in _ESTIMATORS:
        raise InvalidInputError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")


def _check_variant(variant: str) -> None:
    if variant not in ("diag", "logdet"):
        raise InvalidInputError(
            f"variant must be 'diag' (the paper's published numbers) or 'logdet' (the full "
            f"definition), got {variant!r}"
        )


def _check_common(x: Any, sigma: Any, floor: float = 0.0) -> None:
    check_sigma(sigma, x.shape[0] if isinstance(x, Tensor) and x.ndim > 0 else None)
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
        raise InvalidInputError(f"floor must be finite and >= 0, got {floor!r}")


def _stopping_kw(atol, rtol, num_probes, max_probes, cap: int | None) -> dict[str, Any]:
    if num_probes is None and atol is None and rtol is None:
        raise InvalidInputError(
            "the randomized estimator needs atol, rtol or num_probes (all were None)"
        )
    mp = max_probes if cap is None else max(_MIN_PROBES, min(max_probes, cap))
    kw: dict[str, Any] = {"num_probes": num_probes, "atol": atol, "rtol": rtol,
                          "max_probes": mp}
    if num_probes is not None:
        kw["max_probes"] = max(num_probes, kw["max_probes"])
    return kw


def _use_exact(estimator: str, cost_randomized: int, enc: PreparedEncoder) -> bool:
    """``auto``: exact when its ``min(m, d)`` products cost no more than the randomized start
    (and its dense Jacobian fits in memory)."""
    n = min(enc.m, enc.d)
    return estimator == "exact" or (
        estimator == "auto" and n <= cost_randomized and _oracle_fits(enc)
    )


def _oracle_fits(enc: PreparedEncoder) -> bool:
    """Whether one sample's dense float64 Jacobian (and its Gram matrix) fits in memory."""
    need = 8 * (enc.m * enc.d + min(enc.m, enc.d) ** 2)
    return need <= default_memory_budget(enc.x.device)


def _finish(est: Estimate, exact: Callable[[], MetricResult], enc: PreparedEncoder,
            estimator: str, what: str, stop: dict[str, Any]) -> MetricResult | None:
    """``auto`` only: the oracle's result when the randomized estimate missed its tolerance
    within the probe cap and the oracle fits in memory (else None: keep the estimate, which
    records ``converged=False``, with a warning)."""
    if estimator != "auto" or bool(est.converged.all()):
        return None
    if _oracle_fits(enc):
        log.debug("randomized %s did not converge within %d probes; using the oracle", what,
                  stop["max_probes"])
        return exact()
    warnings.warn(
        f"{what}: the tolerance was not met within {stop['max_probes']} probes for "
        f"{int((~est.converged).sum())} sample(s), and the exact oracle does not fit in memory "
        f"(m = {enc.m}, d = {enc.d}); returning the randomized estimate with its error bar "
        "(raise max_probes or loosen the tolerance)",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _to_result(est: Estimate, *, metric: str, units: str, sigma: Tensor, d: int, m: int,
               backend: str, **info: Any) -> MetricResult:
    return MetricResult(
        value=est.value, stderr=est.stderr, metric=metric, units=units, estimator="randomized",
        sigma=sigma, d=d, m=m, num_probes=est.num_probes, passes=est.passes,
        ci_halfwidth=est.ci_halfwidth, singular=est.singular, converged=est.converged,
        probes_per_sample=est.probes_per_sample, bound=est.bound, bias_bound=est.bias_bound,
        info={"backend": backend, **est.info, **info},
    )


def fsinfo(
    encoder: Encoder,
    x: Tensor,
    sigma: float | Tensor = 0.1,
    variant: str = "diag",
    estimator: str = "auto",
    atol: float | None = 0.01,
    *,
    rtol: float | None = None,
    num_probes: int | None = None,
    max_probes: int = 1000,
    prior_var: float | None = None,
    floor: float = DIAG_FLOOR,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    backend: str = "auto",
    memory_budget: int | None = None,
    lanczos_order: int = 30,
) -> MetricResult:
    r"""Per-sample FSInfo in nats per input dimension (higher = more leakage).

    ``variant="diag"`` gives the paper's published numbers,
    :math:`\frac{1}{2d}\sum_k\log((J^TJ)_{kk}/\sigma^2 + 10^{-10}) - \frac12\log 2\pi e`,
    estimated from ``K`` VJPs with the exact chi-square debiasing of the log (unbiased for
    ``floor = 0``; the floor enters as a plug-in correction, negligible unless
    ``(J^TJ)_{kk}/\sigma^2`` is near ``1e-10``). ``variant="logdet"`` gives the definition
    :math:`\frac{1}{2d}\log\det(J^TJ/\sigma^2 + \lambda I) - \frac12\log 2\pi e`
    (``lambda = 1/prior_var``) by stochastic Lanczos quadrature; ``-inf`` when ``J^T J`` is
    singular and there is no prior (always when ``m < d``). Both are Gaussian-surrogate
    entropies, not bounds: see :mod:`fsinfo_fast.bounds` for what is proven.

    Args:
        encoder: ``nn.Module`` or callable mapping ``[B, *in]`` to ``[B, *out]`` (eval mode).
        x: batch ``[B, *in]``.
        sigma: noise standard deviation on the smashed data (0.1 nominal when none is added),
            a float or ``[B]``.
        variant: ``"diag"`` or ``"logdet"``.
        estimator: ``"exact"`` (the float64 oracle), ``"randomized"``, or ``"auto"``.
        atol: target 95% half-width in nats per dimension (randomized).
        rtol: target half-width relative to ``|value|`` (randomized).
        num_probes: a fixed probe count instead of adaptive stopping.
        max_probes: cap on the probes per sample.
        prior_var: prior variance per input dimension (log-det variant).
        floor: constant inside the diagonal variant's logarithm (the paper's ``1e-10``).
        seed: probe seed (int or ``torch.Generator``); the same seed gives the same probes on
            every backend.
        sample_ids: ``[B]`` global sample ids seeding each sample's probes (default
            ``arange(B)``): a sample's result then does not depend on how samples are batched.
        backend: how products are computed (``"auto"``, ``"torch"``, ...; see
            :mod:`fsinfo_fast.engine`).
        memory_budget: bytes a chunk of probes may use (default: a share of free memory).
        lanczos_order: Lanczos steps per probe for the log-det variant.

    Returns:
        :class:`~fsinfo_fast.result.MetricResult`: ``value``, ``stderr``, ``ci95()`` of shape
        ``[B]``, the estimator used, probes and passes per sample.

    Example:
        >>> import torch, fsinfo_fast as ff
        >>> enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Tanh()).eval()
        >>> x = torch.rand(2, 1, 8, 8)
        >>> r = ff.fsinfo(enc, x, sigma=0.1, estimator="randomized", num_probes=32)
        >>> exact = ff.fsinfo(enc, x, sigma=0.1, estimator="exact")
        >>> bool(((r.value - exact.value).abs() < 5 * r.stderr + 1e-9).all())
        True
    """
    _check_estimator(estimator)
    _check_variant(variant)
    _check_common(x, sigma, floor)
    lam = check_prior_var(prior_var)
    if variant == "diag" and prior_var is not None:
        raise InvalidInputError("prior_var applies to variant='logdet' only")

    def exact() -> MetricResult:
        return reference.fsinfo(encoder, x, sigma, variant, prior_var=prior_var, floor=floor)

    if estimator == "exact":
        return exact()
    enc = prepare(encoder, x, check_interaction=_INTERACTION_CHECKS)
    n = min(enc.m, enc.d)
    k0 = num_probes or (_MIN_DIAG_PROBES if variant == "diag" else _MIN_PROBES)
    if variant == "diag":
        cost = expected_passes("diag", d=enc.d, m=enc.m, num_probes=k0)
    else:
        cost = expected_passes("slq", d=enc.d, m=enc.m, num_probes=k0, order=lanczos_order,
                               prior=lam > 0)
        if cost == 0:  # m < d without a prior: -inf exactly, the oracle says so without work
            estimator = "exact"
    if _use_exact(estimator, cost, enc):
        return exact()
    cap = None
    if estimator == "auto":  # never spend more probes than the oracle's products
        cap = n if variant == "diag" else max(2, n // (2 * min(lanczos_order, n)))
    stop = _stopping_kw(atol, rtol, num_probes, max_probes, cap)
    products = make_products(enc, backend, memory_budget=memory_budget)
    s = as_sigma(sigma, enc.batch, enc.x.device)
    if variant == "diag":
        est = estimate_diag(products, sigma=s, floor=floor, seed=seed, sample_ids=sample_ids,
                            min_probes=min(k0, stop["max_probes"]), **stop).fsinfo_diag
        metric, extra = "fsinfo_diag", {"floor": floor}
    else:
        est = slq_logdet(products, sigma=s, prior_var=prior_var, order=lanczos_order, seed=seed,
                         sample_ids=sample_ids, **stop)
        metric, extra = "fsinfo_logdet", {"prior_var": prior_var}
    fallback = _finish(est, exact, enc, estimator, metric, stop)
    if fallback is not None:
        return fallback
    return _to_result(est, metric=metric, units="nats/dim", sigma=s, d=enc.d, m=enc.m,
                      backend=products.backend, **getattr(products, "info", {}), **extra)


def dfil(
    encoder: Encoder,
    x: Tensor,
    sigma: float | Tensor = 0.1,
    estimator: str = "auto",
    rtol: float | None = 0.01,
    *,
    atol: float | None = None,
    num_probes: int | None = None,
    max_probes: int = 1000,
    method: str = "auto",
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    backend: str = "auto",
    memory_budget: int | None = None,
) -> MetricResult:
    r"""Per-sample dFIL, :math:`\mathrm{tr}(J^TJ)/(\sigma^2 d)` (Maeng et al. 2023), in 1/dim.

    Any *unbiased* attacker has ``E||x_hat - x||^2/d >= 1/dFIL`` (Cramer-Rao; proven).

    Args:
        encoder, x, sigma, estimator, seed, sample_ids, backend, memory_budget: as in
            :func:`fsinfo`.
        rtol: target 95% half-width relative to the value (randomized; 1% by default).
        atol: target half-width in 1/dim.
        num_probes, max_probes: fixed probe count / cap.
        method: ``"hutchinson"`` (Rademacher input-side probes, one JVP each; the lowest
            variance on the paper's encoders: about 0.5% 95% half-width at 64 probes on VGG5 and
            ResNet-18 at 3x32x32), ``"hutch++"`` (Meyer et al. 2021; pays ``3k`` products for a
            sketch, which only wins for fast-decaying spectra), ``"diag"`` (the Gaussian VJP
            probes of the FSInfo_diag estimator), or ``"auto"`` (Hutchinson).

    Returns:
        :class:`~fsinfo_fast.result.MetricResult` (``units="1/dim"``).
    """
    _check_estimator(estimator)
    _check_common(x, sigma)
    if method not in _DFIL_METHODS:
        raise InvalidInputError(f"method must be one of {_DFIL_METHODS}, got {method!r}")

    def exact() -> MetricResult:
        return reference.dfil(encoder, x, sigma)

    if estimator == "exact":
        return exact()
    enc = prepare(encoder, x, check_interaction=_INTERACTION_CHECKS)
    n = min(enc.m, enc.d)
    method = "hutchinson" if method == "auto" else method
    # trace t-intervals undercover on top-heavy spectra below ~30 probes (see estimators)
    k0 = num_probes or (_MIN_PROBES if method == "diag" else _MIN_TRACE_PROBES)
    sketch = min(n, 10) if method == "hutch++" else 0
    cost = expected_passes("hutch++" if method == "hutch++" else "hutchinson", d=enc.d, m=enc.m,
                           num_probes=k0, sketch_size=sketch)
    if _use_exact(estimator, cost, enc):
        return exact()
    cap = max(2, n - 3 * sketch) if estimator == "auto" else None
    stop = _stopping_kw(atol, rtol, num_probes, max_probes, cap)
    products = make_products(enc, backend, memory_budget=memory_budget)
    s = as_sigma(sigma, enc.batch, enc.x.device)
    common = {"sigma": s, "seed": seed, "sample_ids": sample_ids}
    if method == "diag":
        stop["dfil_rtol"], stop["rtol"] = stop.pop("rtol"), None
        if stop["dfil_rtol"] is None and stop["atol"] is not None:
            raise InvalidInputError("method='diag' stops on rtol (or num_probes), not atol")
        est = estimate_diag(products, floor=0.0, **common, **stop).dfil
    elif method == "hutchinson":
        est = hutchinson_trace(products, side="input", kind="rademacher",
                               min_probes=min(k0, stop["max_probes"]), **common, **stop)
    else:
        est = hutchpp_trace(products, sketch_size=sketch, min_probes=min(k0, stop["max_probes"]),
                            **common, **stop)
    fallback = _finish(est, exact, enc, estimator, "dfil", stop)
    if fallback is not None:
        return fallback
    return _to_result(est, metric="dfil", units="1/dim", sigma=s, d=enc.d, m=enc.m,
                      backend=products.backend, **getattr(products, "info", {}))


def fsinfo_sigma(
    encoder: Encoder,
    x: Tensor,
    target: float | Tensor = -1.0,
    variant: str = "diag",
    estimator: str = "auto",
    atol: float | None = 0.01,
    *,
    prior_var: float | None = None,
    floor: float = DIAG_FLOOR,
    **kwargs: Any,
) -> Tensor:
    r"""FSInfoGuard noise scale per sample: the sigma at which FSInfo equals ``target``.

    :math:`\sigma^*(x) = \exp(\mathrm{FSInfo}_{\sigma=1}(x) - \tau)
    = \det(J^TJ)^{1/2d} e^{-\tau} / \sqrt{2\pi e}` (with the diagonal variant the determinant is
    the product of the diagonal). The exact route also honours the floor / prior by solving the
    monotone equation to float64 precision. The randomized route uses the closed form on the
    estimated ``FSInfo_{sigma=1}`` (the diagonal floor is neglected there: its effect is below
    ``floor * sigma^2 / (J^TJ)_kk``); an error of ``delta`` nats/dim in that estimate scales
    ``sigma*`` by ``exp(delta)``. The randomized log-det variant with a prior is not supported
    (``auto`` uses the oracle for it).

    Args:
        encoder, x, variant, estimator, atol, prior_var, floor: as in :func:`fsinfo`.
        target: the target FSInfo ``tau`` in nats per dimension (float or ``[B]``).
        **kwargs: ``num_probes``, ``seed``, ``sample_ids``, ``backend``, ... of :func:`fsinfo`.

    Returns:
        ``[B]`` float64 sigma* (``0`` where FSInfo is ``-inf`` at every sigma; ``inf`` where a
        prior makes the target unreachable).
    """
    _check_estimator(estimator)
    _check_variant(variant)
    tau = torch.as_tensor(target, dtype=torch.float64)
    if not bool(torch.isfinite(tau).all()):
        raise InvalidInputError(f"target must be finite (nats per dimension), got {target!r}")
    if variant == "logdet" and prior_var is not None:
        if estimator == "randomized":
            raise InvalidInputError(
                "the randomized FSInfoGuard sigma for the log-det variant with a prior is not "
                "supported; use estimator='exact' (or 'auto')"
            )
        estimator = "exact"
    if estimator == "exact":
        check_prior_var(prior_var)
        return reference.fsinfo_sigma(encoder, x, target, variant, prior_var=prior_var,
                                      floor=floor)
    r = fsinfo(encoder, x, 1.0, variant, estimator, atol, prior_var=prior_var,
               floor=0.0 if variant == "diag" else floor, **kwargs)
    if r.estimator == "exact":  # auto chose the oracle: solve exactly (floor included)
        return reference.fsinfo_sigma(encoder, x, target, variant, prior_var=prior_var,
                                      floor=floor)
    return torch.exp(r.value - tau.to(r.value.device))


def dfil_sigma(
    encoder: Encoder,
    x: Tensor,
    bound: float,
    estimator: str = "auto",
    **kwargs: Any,
) -> float:
    r"""Data-set noise scale for a target dFIL bound (Maeng et al. 2023's calibration).

    :math:`\sigma = \sqrt{b \cdot \mathrm{mean}_x \mathrm{tr}(J^TJ) / d}`, so that the reciprocal of
    the batch-mean dFIL equals ``b`` (the per-dimension MSE bound for unbiased attackers, in
    squared input units).
    """
    _check_estimator(estimator)
    if isinstance(bound, bool) or not (
        isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0
    ):
        raise InvalidInputError(
            f"bound must be a positive float (squared input units), got {bound!r}"
        )
    r = dfil(encoder, x, 1.0, estimator, **kwargs)
    return math.sqrt(bound * float(r.value.mean()))

