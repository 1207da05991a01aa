"""The public metrics: :func:`fsinfo`, :func:`dfil`, :func:`fsinfo_sigma`, :func:`dfil_sigma`.

Each is a thin wrapper over :class:`fsinfo_fast.Linearization` (built by
:func:`fsinfo_fast.linearize`): ``ff.fsinfo(encoder, x, sigma, **kw)`` is
``ff.linearize(encoder, x, backend=..., seed=..., sample_ids=..., memory_budget=...)
.fsinfo(sigma, **kw)``. Each routes to the exact oracle (``estimator="exact"``), to the randomized
estimators (``"randomized"``), or picks the cheaper of the two for the request (``"auto"``, the
default): the oracle costs ``min(m, d)`` Jacobian products per sample whatever the tolerance, a
randomized estimator the probes it needs. ``auto`` runs the randomized estimator with its probe
budget capped at ``min(m, d)`` and finishes with the oracle for a batch it could not resolve
within that budget, so it never costs more than about twice the cheaper route; where it switches,
``result.info["auto"]`` says why. For FSInfo_diag and dFIL that exact route is the fast exact
route (``estimator="exact-fast"``: ``min(m, d)`` one-hot products of the fastest backend in the
working dtype, float64 accumulation, a measured rounding allowance as the interval; see
:mod:`fsinfo_fast.estimators.exact_fast`), unless the oracle was already computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .formulas import DIAG_FLOOR
from .linearization import linearize
from .result import MetricResult, SigmaResult

__all__ = ["fsinfo", "dfil", "fsinfo_sigma", "dfil_sigma"]

Encoder = Callable[[Tensor], Tensor]


def fsinfo(
    encoder: Encoder,
    x: Tensor,
    sigma: float | Tensor = 0.1,
    *,
    variant: str = "diag",
    estimator: str = "auto",
    atol: float | None = 0.01,
    rtol: float | None = None,
    num_probes: int | None = None,
    max_probes: int | None = None,
    prior_var: float | None = None,
    floor: float = DIAG_FLOOR,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    backend: str = "auto",
    memory_budget: int | None = None,
    progress: bool = False,
    lanczos_order: int | None = None,
) -> MetricResult:
    r"""Per-sample FSInfo in nats per input dimension (higher = more leakage).

    ``variant="diag"`` gives the paper's published numbers,
    :math:`\frac{1}{2d}\sum_k\log((J^TJ)_{kk}/\sigma^2 + 10^{-10}) - \frac12\log 2\pi e`,
    estimated from ``K`` VJPs with the exact chi-square debiasing of the log (unbiased for
    ``floor = 0``; the floor enters as a plug-in correction, negligible unless
    ``(J^TJ)_{kk}/\sigma^2`` is near ``1e-10``). ``variant="logdet"`` gives the definition
    :math:`\frac{1}{2d}\log\det(J^TJ/\sigma^2 + \lambda I) - \frac12\log 2\pi e`
    (``lambda = 1/prior_var``) by stochastic Lanczos quadrature; ``-inf`` when ``J^T J`` is
    singular and there is no prior (always when ``m < d``). Where the randomized estimator
    cannot resolve the spectrum at the products' precision it returns a finite upper bound,
    flagged in ``bound`` (``ci95()`` is then ``(-inf, value + hw)``). Both are Gaussian-surrogate
    entropies, not bounds: see :mod:`fsinfo_fast.bounds` for what is proven.

    Args:
        encoder: ``nn.Module`` or callable mapping ``[B, *in]`` to ``[B, *out]`` (eval mode).
        x: batch ``[B, *in]``.
        sigma: noise standard deviation on the smashed data (0.1 nominal when none is added),
            a float or ``[B]``.
        variant: ``"diag"`` or ``"logdet"``.
        estimator: ``"exact"`` (the float64 oracle), ``"exact-fast"`` (one-hot products in the
            working dtype, diag variant only), ``"randomized"``, or ``"auto"``.
        atol: target 95% half-width in nats per dimension (randomized).
        rtol: target half-width relative to ``|value|`` (randomized).
        num_probes: a fixed probe count instead of adaptive stopping; kept under
            ``estimator="auto"`` too (no switch to an exact route after the probes):
            ``converged`` says whether its interval met ``atol`` / ``rtol``. Where the exact
            route's ``min(m, d)`` products cost no more than those probes, ``auto`` takes it
            instead (the exact value; ``info["auto"]`` says so).
        max_probes: cap on the probes per sample (an int >= 2). None (the default): ``min(m,
            d)`` under ``estimator="auto"``, the products of the exact route it would fall
            back to (the log det keeps its smaller cap, ``min(m, d) / (2 order)``); 1000
            (:data:`fsinfo_fast.linearization.DEFAULT_MAX_PROBES`) for ``"randomized"``.
        prior_var: prior variance per input dimension (log-det variant).
        floor: constant inside the diagonal variant's logarithm (the paper's ``1e-10``).
        seed: probe seed (int or ``torch.Generator``); the same seed gives the same probes on
            every backend.
        sample_ids: ``[B]`` global sample ids seeding each sample's probes (default
            ``arange(B)``): a sample's result then does not depend on how samples are batched.
        backend: how products are computed (``"auto"``, ``"torch"``, ...; see
            :mod:`fsinfo_fast.engine`).
        memory_budget: bytes a chunk of probes may use (default: a share of free memory).
        progress: show a progress bar (tqdm, on stderr) counting the Jacobian products the
            call computes (against their count where it is known ahead: the exact routes'
            one-hot products).
        lanczos_order: maximum Lanczos steps per probe for the log-det variant (None: adaptive
            up to ``min(m, d)``, where the quadrature is exact; under ``auto``, capped so that
            the randomized route costs at most about the oracle's products). Each probe stops
            once its quadrature bracket is below 5% of ``atol``; what remains is in the
            interval (:func:`~fsinfo_fast.estimators.slq_logdet`).

    Computing more than one metric for the same batch? Use :func:`fsinfo_fast.linearize`: it
    validates the encoder once and shares the probes between FSInfo, dFIL and ``sigma*``.

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
    lin = linearize(encoder, x, backend=backend, seed=seed, sample_ids=sample_ids,
                    memory_budget=memory_budget, progress=progress)
    return lin.fsinfo(sigma, variant=variant, estimator=estimator, atol=atol, rtol=rtol,
                      num_probes=num_probes, max_probes=max_probes, prior_var=prior_var,
                      floor=floor, lanczos_order=lanczos_order)


def dfil(
    encoder: Encoder,
    x: Tensor,
    sigma: float | Tensor = 0.1,
    *,
    estimator: str = "auto",
    rtol: float | None = 0.01,
    atol: float | None = None,
    num_probes: int | None = None,
    max_probes: int | None = None,
    method: str = "auto",
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    backend: str = "auto",
    memory_budget: int | None = None,
    progress: bool = False,
) -> MetricResult:
    r"""Per-sample dFIL, :math:`\mathrm{tr}(J^TJ)/(\sigma^2 d)` (Maeng et al. 2023), in 1/dim.

    Any *unbiased* attacker has ``E||x_hat - x||^2/d >= 1/dFIL`` (Cramer-Rao; proven).

    Args:
        encoder, x, sigma, estimator, seed, sample_ids, backend, memory_budget, progress: as
            in :func:`fsinfo`.
        rtol: target 95% half-width relative to the value (randomized; 1% by default).
        atol: target half-width in 1/dim.
        num_probes, max_probes: fixed probe count / cap (``max_probes=None``: ``min(m, d)``
            under ``auto``, ``method="lanczos"`` keeping its own cap; 1000 for
            ``"randomized"``; see :func:`fsinfo`).
        method: ``"hutchinson"`` (Rademacher input-side probes, one JVP each; the lowest
            variance on the paper's encoders: about 0.5% 95% half-width at 64 probes on VGG5 and
            ResNet-18 at 3x32x32), ``"hutch++"`` (Meyer et al. 2021; pays ``3k`` products for a
            sketch, which only wins for fast-decaying spectra), ``"diag"`` (the Gaussian VJP
            probes of the FSInfo_diag estimator: free when FSInfo_diag was computed on the same
            :class:`~fsinfo_fast.Linearization`, but about 1.7x wider per probe),
            ``"deflated"``, ``"lanczos"`` (the log det's SLQ probes, ``||v||^2 T_11``: free on
            a :class:`~fsinfo_fast.Linearization` that computed the log-det FSInfo, two
            products per new probe), or ``"auto"`` (the method predicted to spend the fewest
            new products from the probes the linearization holds, else ``"hutchinson"``).

    Returns:
        :class:`~fsinfo_fast.result.MetricResult` (``units="1/dim"``).
    """
    lin = linearize(encoder, x, backend=backend, seed=seed, sample_ids=sample_ids,
                    memory_budget=memory_budget, progress=progress)
    return lin.dfil(sigma, estimator=estimator, rtol=rtol, atol=atol, num_probes=num_probes,
                    max_probes=max_probes, method=method)


def fsinfo_sigma(
    encoder: Encoder,
    x: Tensor,
    target: float | Tensor = -1.0,
    *,
    variant: str = "diag",
    estimator: str = "auto",
    atol: float | None = 0.01,
    rtol: float | None = None,
    num_probes: int | None = None,
    max_probes: int | None = None,
    prior_var: float | None = None,
    floor: float = DIAG_FLOOR,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    backend: str = "auto",
    memory_budget: int | None = None,
    progress: bool = False,
    lanczos_order: int | None = None,
) -> SigmaResult:
    r"""FSInfoGuard noise scale per sample: the sigma at which FSInfo equals ``target``.

    :math:`\sigma^*(x) = \exp(\mathrm{FSInfo}_{\sigma=1}(x) - \tau)
    = \det(J^TJ)^{1/2d} e^{-\tau} / \sqrt{2\pi e}` (with the diagonal variant the determinant is
    the product of the diagonal). The exact route also honours the floor / prior by solving the
    monotone equation to float64 precision. The randomized route uses the closed form on the
    estimated ``FSInfo_{sigma=1}`` (the diagonal floor is neglected there: its effect is below
    ``floor * sigma^2 / (J^TJ)_kk``); an error of ``delta`` nats/dim in that estimate scales
    ``sigma*`` by ``exp(delta)``, which the result's interval carries. The randomized log-det
    variant with a prior is not supported (``auto`` uses the oracle for it).

    Args:
        encoder, x, variant, estimator, atol, rtol, num_probes, max_probes, prior_var, floor,
            seed, sample_ids, backend, memory_budget, progress, lanczos_order: as in
            :func:`fsinfo`.
        target: the target FSInfo ``tau`` in nats per dimension (float or ``[B]``).

    Returns:
        :class:`~fsinfo_fast.result.SigmaResult`: ``sigma`` ``[B]`` float64 (``0`` where FSInfo
        is ``-inf`` at every sigma; ``inf`` where a prior makes the target unreachable), its
        95% interval, and ``dataset("max" | "quantile" | "mean")`` for one data-set sigma.

    Example:
        >>> import torch, fsinfo_fast as ff
        >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).double().eval()
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> s = ff.fsinfo_sigma(enc, x, target=-1.0, estimator="exact")
        >>> ff.fsinfo(enc, x, sigma=s.sigma, estimator="exact").value.round(decimals=6).tolist()
        [-1.0, -1.0, -1.0]
    """
    lin = linearize(encoder, x, backend=backend, seed=seed, sample_ids=sample_ids,
                    memory_budget=memory_budget, progress=progress)
    return lin.fsinfo_sigma(target, variant=variant, estimator=estimator, atol=atol, rtol=rtol,
                            num_probes=num_probes, max_probes=max_probes, prior_var=prior_var,
                            floor=floor, lanczos_order=lanczos_order)


def dfil_sigma(
    encoder: Encoder,
    x: Tensor,
    bound: float,
    *,
    estimator: str = "auto",
    rtol: float | None = 0.01,
    num_probes: int | None = None,
    max_probes: int | None = None,
    method: str = "auto",
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    backend: str = "auto",
    memory_budget: int | None = None,
    progress: bool = False,
) -> SigmaResult:
    r"""Noise scales for a target dFIL bound (Maeng et al. 2023's calibration).

    Per sample :math:`\sigma_b = \sqrt{b\,\mathrm{tr}(J_b^TJ_b)/d}` puts that sample's
    ``1/dFIL`` (the per-dimension MSE bound for unbiased attackers, squared input units) at
    ``bound``; ``.dataset("rms")`` is the data-set calibration
    :math:`\sigma = \sqrt{b \cdot \mathrm{mean}_x \mathrm{tr}(J^TJ) / d}`, which puts the
    reciprocal of the batch-mean dFIL at ``b``.

    Args:
        encoder, x, estimator, rtol, num_probes, max_probes, method, seed, sample_ids, backend,
            memory_budget, progress: as in :func:`dfil`.
        bound: the target ``1/dFIL`` (squared input units, ``> 0``).

    Returns:
        :class:`~fsinfo_fast.result.SigmaResult` (``metric="dfil"``).
    """
    lin = linearize(encoder, x, backend=backend, seed=seed, sample_ids=sample_ids,
                    memory_budget=memory_budget, progress=progress)
    return lin.dfil_sigma(bound, estimator=estimator, rtol=rtol, num_probes=num_probes,
                          max_probes=max_probes, method=method)
