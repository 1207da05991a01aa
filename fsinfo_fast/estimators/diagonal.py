r"""FSInfo_diag (chi-square debiased log-sum of ``diag(J^T J)``) and dFIL from the same VJPs.

With Gaussian output-side probes ``u_j ~ N(0, I_m)`` and ``g_j = J^T u_j`` (one VJP each),
``g_{jk} ~ N(0, D_k)`` with ``D_k = (J^T J)_{kk}``, so the probe mean
``s_k = (1/K) sum_j g_{jk}^2`` is distributed as ``D_k chi2_K / K`` and

.. math::

    E[\log s_k] = \log D_k + \psi(K/2) + \log(2/K)

exactly (``psi`` the digamma function). Hence, for ``floor = 0``,

.. math::

    \widehat{\mathrm{FSInfo}}_{diag} = \frac{1}{2d}\sum_{k=1}^d
        \big[\log s_k - \psi(K/2) - \log(2/K)\big] - \log\sigma - \tfrac12\log(2\pi e)

is *exactly* unbiased for the paper's diagonal FSInfo (Deng et al. 2025), for every ``K >= 1``.
The same probes give Hutchinson's trace estimate ``tr(J^T J) = E ||g_j||^2`` and hence dFIL
(Maeng et al. 2023).

**The floor** (the paper's ``1e-10`` inside ``log(D_k / sigma^2 + floor)``). A column with
``s_k = 0`` exactly is a zero column (``g_{jk} = 0`` for a non-zero column has probability 0), so
its term is ``log(floor)`` exactly (``-inf`` when ``floor = 0``). For the other columns the
correction ``log1p(floor sigma^2 / s_k)`` is added as a plug-in: it is not debiased, but its bias
is smaller than the correction itself, which is negligible once ``D_k / sigma^2 >> floor``
(``1e-10``; i.e. unless a column of ``J`` is numerically zero).

**Standard error**: delete-a-group jackknife over probes. Probe ``j`` goes to group
``j mod G_max`` (``G_max = jackknife_groups``); for ``K <= G_max`` this is the delete-one
jackknife. Each leave-group-out estimate is itself exactly debiased (constants for
``K - n_g`` probes, using ``s_{(-g),k} = (K s_k - S_{g,k}) / (K - n_g)``), and the variance is
the delete-a-group jackknife for unequal group sizes (Busing, Meijer and van der Leeden 1999),
which reduces to ``(G-1)/G sum_g (theta_(-g) - mean)^2`` for equal groups. The interval uses the
Student-t quantile with ``G - 1`` degrees of freedom. Memory: ``G_max`` running group sums of
``g^2`` per sample, ``[B, G_max, d]`` float64, independent of ``K``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..formulas import DIAG_FLOOR, HALF_LOG_2PIE
from .base import (
    Estimate,
    Products,
    check_finite,
    detached,
    ops_for,
    sample_ids_for,
    sigma_for,
)
from .hutchinson import mean_and_stderr
from .probes import draw_probes, resolve_seed
from .stopping import StoppingRule, _check_tol, run_rounds

__all__ = ["DiagEstimate", "estimate_diag", "log_chi2_mean_offset"]

#: Elements of float64 ``g^2`` materialised at once (256 MiB).
_SLICE_ELEMS = 1 << 25


def log_chi2_mean_offset(k: Tensor | float) -> Tensor:
    r"""``E[log(chi2_K / K)] = psi(K/2) + log(2/K)`` (float64), the bias removed per column."""
    k = torch.as_tensor(k, dtype=torch.float64)
    return torch.special.digamma(k / 2) + torch.log(2.0 / k)


@dataclass(frozen=True)
class DiagEstimate:
    """Both estimates from one set of probes.

    Attributes:
        fsinfo_diag: FSInfo_diag in nats per input dimension.
        dfil: dFIL ``tr(J^T J) / (sigma^2 d)`` in 1/dim.
    """

    fsinfo_diag: Estimate
    dfil: Estimate


def _diag_terms(S: Tensor, k: Tensor, log_sigma: Tensor, sigma2: Tensor, floor: float) -> Tensor:
    """Per-column debiased ``log(D_k / sigma^2 + floor)`` from sums ``S`` of ``k`` probes.

    ``S``: ``[B, ..., d]``; ``k``: broadcastable to ``S.shape[:-1]``; sigma tensors ``[B]``.
    """
    shape = (-1,) + (1,) * (S.ndim - 1)
    k = k.unsqueeze(-1)
    s = S / k
    pos = S > 0
    s_safe = torch.where(pos, s, torch.ones_like(s))
    t = torch.log(s_safe) - log_chi2_mean_offset(k) - 2.0 * log_sigma.reshape(shape)
    if floor > 0:
        t = t + torch.log1p(floor * sigma2.reshape(shape) / s_safe)
    zero_term = math.log(floor) if floor > 0 else -math.inf
    return torch.where(pos, t, torch.full_like(t, zero_term))


def estimate_diag(
    products: Products,
    *,
    sigma: float | Tensor,
    floor: float = DIAG_FLOOR,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    num_probes: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    dfil_rtol: float | None = None,
    min_probes: int = 10,
    max_probes: int = 1000,
    round_size: int = 10,
    confidence: float = 0.95,
    jackknife_groups: int = 20,
) -> DiagEstimate:
    r"""FSInfo_diag and dFIL per sample from ``K`` VJPs with Gaussian probes.

    .. math::

        \mathrm{FSInfo}_{diag} = \frac{1}{2d}\sum_k \log\Big(\frac{(J^TJ)_{kk}}{\sigma^2}
        + \mathrm{floor}\Big) - \frac12\log(2\pi e), \qquad
        \mathrm{dFIL} = \frac{\mathrm{tr}(J^TJ)}{\sigma^2 d}

    Args:
        products: batched Jacobian products (only ``vjp`` is used).
        sigma: noise scale, float or ``[B]``.
        floor: constant inside the logarithm (the paper's ``1e-10``; ``>= 0``). With
            ``floor = 0`` the estimator is exactly unbiased (and ``-inf`` for a zero column).
        seed: probe seed (or a ``torch.Generator``).
        sample_ids: ``[B]`` global sample ids (default ``arange(B)``).
        num_probes: fixed probe count ``K`` (``>= 2``).
        atol: target 95% half-width of FSInfo_diag in nats per input dimension.
        rtol: target half-width of FSInfo_diag relative to ``|value|``.
        dfil_rtol: also require dFIL's half-width ``<= dfil_rtol * dFIL`` (alone: stop on
            dFIL only).
        min_probes, max_probes, round_size, confidence: see
            :class:`~fsinfo_fast.estimators.StoppingRule`.
        jackknife_groups: at most this many jackknife groups (``>= 2``); bounds memory to
            ``[B, groups, d]`` float64.

    Returns:
        :class:`DiagEstimate` (``fsinfo_diag``, ``dfil``), float64 ``[B]`` tensors; ``passes``
        is the number of VJPs per sample. ``fsinfo_diag.singular`` marks ``-inf`` values (a
        zero column with ``floor = 0``).

    Example:
        >>> from fsinfo_fast.engine.dense import DenseProducts
        >>> J = torch.randn(2, 5, 3, dtype=torch.float64)
        >>> r = estimate_diag(DenseProducts(J), sigma=0.1, num_probes=16)
        >>> r.fsinfo_diag.value.shape, r.dfil.passes
        (torch.Size([2]), 16)
    """
    products = detached(products)
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
        raise InvalidInputError(f"floor must be finite and >= 0, got {floor!r}")
    if (
        isinstance(jackknife_groups, bool)
        or not isinstance(jackknife_groups, int)
        or (jackknife_groups < 2)
    ):
        raise InvalidInputError(f"jackknife_groups must be an int >= 2, got {jackknife_groups!r}")
    _check_tol("dfil_rtol", dfil_rtol)
    only_dfil = num_probes is None and atol is None and rtol is None and dfil_rtol is not None
    rule = StoppingRule(
        num_probes=num_probes,
        atol=atol,
        rtol=dfil_rtol if only_dfil else rtol,
        min_probes=min_probes,
        max_probes=max_probes,
        round_size=round_size,
        confidence=confidence,
    )
    targets: dict[str, tuple[float | None, float | None]] = {}
    if atol is not None or rtol is not None:
        targets["fsinfo_diag"] = (atol, rtol)
    if dfil_rtol is not None:
        targets["dfil"] = (None, dfil_rtol)
    seed = resolve_seed(seed)
    ids = sample_ids_for(products, sample_ids)
    sigma_t = sigma_for(products, sigma)
    floor = float(floor)
    b, d, m, dev = products.batch, products.d, products.m, products.device
    n_groups = jackknife_groups
    ops = ops_for(products)
    group_sums = torch.zeros(b, n_groups, d, dtype=torch.float64, device=dev)
    group_n = torch.zeros(n_groups, dtype=torch.float64, device=dev)
    traces: list[Tensor] = []
    log_sigma, sigma2 = torch.log(sigma_t), sigma_t**2
    dfil_scale = 1.0 / (sigma2 * d)

    def process(start: int, count: int) -> None:
        U = draw_probes(
            m,
            seed=seed,
            sample_ids=ids,
            start=start,
            count=count,
            kind="gaussian",
            dtype=products.dtype,
            device=dev,
        )
        G = products.vjp(U)
        check_finite(G, ids, start, "FSInfo_diag (J^T u)")
        # float64 squares in slices of probes, so the float64 copy stays bounded
        step = max(1, _SLICE_ELEMS // max(1, b * d))
        for c0 in range(0, count, step):
            Gs = G[:, c0 : c0 + step]
            j0 = start + c0
            # fused: group sums of g^2 (float64, in place) and the squared norms, one read of G
            traces.append(ops.sq_accumulate(Gs, group_sums, j0))
            groups = torch.arange(j0, j0 + Gs.shape[1], device=dev) % n_groups
            group_n.index_add_(0, groups, torch.ones(Gs.shape[1], dtype=torch.float64, device=dev))

    def summarize():
        K = float(group_n.sum())
        S = group_sums.sum(dim=1)  # [B, d]
        kt = torch.tensor(K, dtype=torch.float64, device=dev)
        theta = _diag_terms(S, kt.expand(b), log_sigma, sigma2, floor).mean(dim=1) / 2
        used = group_n > 0
        ng = group_n[used]  # [G]
        S_minus = S[:, None, :] - group_sums[:, used, :]
        # exact cancellation cannot make a non-zero column's leave-out sum vanish (probability
        # 0); guard the rounding case so a non-zero column never turns into a zero column
        S_minus = torch.where(
            (S_minus <= 0) & (S[:, None, :] > 0),
            S[:, None, :] * torch.finfo(torch.float64).eps,
            S_minus,
        )
        theta_minus = (
            _diag_terms(S_minus, (K - ng).expand(b, -1), log_sigma, sigma2, floor).mean(dim=2) / 2
        )  # [B, G]
        n_g = ng.shape[0]
        h = K / ng
        theta_j = n_g * theta - ((1 - ng / K) * theta_minus).sum(dim=1)
        pseudo = h * theta[:, None] - (h - 1) * theta_minus
        var = ((pseudo - theta_j[:, None]) ** 2 / (h - 1)).sum(dim=1) / n_g
        finite = torch.isfinite(theta)
        se = torch.where(finite, var.clamp_min(0).sqrt(), torch.zeros_like(theta))
        tmean, tse = mean_and_stderr(torch.cat(traces, dim=1))
        return {
            "fsinfo_diag": (theta - HALF_LOG_2PIE, se, n_g - 1),
            "dfil": (tmean * dfil_scale, tse * dfil_scale, int(K) - 1),
        }

    frozen, converged, probes, drawn = run_rounds(
        rule,
        batch=b,
        device=dev,
        process=process,
        summarize=summarize,
        targets=targets,
    )
    info = {"seed": seed, "confidence": confidence, "side": "output", "kind": "gaussian"}
    fs, df = frozen["fsinfo_diag"], frozen["dfil"]
    fs_est = Estimate(
        value=fs.value,
        stderr=fs.stderr,
        ci_halfwidth=fs.ci_halfwidth,
        num_probes=drawn,
        passes=drawn,
        converged=converged,
        probes_per_sample=probes,
        singular=~torch.isfinite(fs.value),
        info={
            "method": "chi2_debiased_diag",
            "quantity": "fsinfo_diag",
            "floor": floor,
            "se_method": "delete-a-group jackknife",
            "jackknife_groups": n_groups,
            "dof": fs.dof,
            **info,
        },
    )
    df_est = Estimate(
        value=df.value,
        stderr=df.stderr,
        ci_halfwidth=df.ci_halfwidth,
        num_probes=drawn,
        passes=drawn,
        converged=converged,
        probes_per_sample=probes,
        info={
            "method": "hutchinson",
            "quantity": "dfil",
            "se_method": "sample std / sqrt(K)",
            "dof": df.dof,
            **info,
        },
    )
    return DiagEstimate(fsinfo_diag=fs_est, dfil=df_est)
