r"""Hutch++ (Meyer, Musco, Musco and Woodruff 2021) for ``tr(J^T J)`` (and dFIL).

Hutch++ ("Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021) splits the trace of a PSD
matrix ``A`` into the part captured by a low-rank sketch, computed exactly, and a Hutchinson
estimate of the rest:

.. math::

    Q = \mathrm{orth}(A S),\qquad
    \mathrm{tr}(A) = \mathrm{tr}(Q^T A Q) + E\,\|J_{side}\,(I - QQ^T)\,g\|^2 ,

with ``S`` a Gaussian sketch of ``k`` columns and ``g`` the residual probes. On the input side
``A = J^T J`` (``n = d``, ``A S = J^T (J S)``: a JVP and a VJP per column, then
``tr(Q^T A Q) = ||J Q||_F^2`` with ``k`` JVPs and one JVP per residual probe); on the output side
``A = J J^T`` (``n = m``, the roles of JVP and VJP swapped). Both sides have the same non-zero
spectrum, hence the same accuracy; ``side="auto"`` takes the smaller ``n`` (less memory and a
cheaper QR). Cost: ``3 k + K`` products per sample.

**Standard error**, conditional on the sketch: for *any* orthonormal ``Q``,
``tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T)) = tr(A)``, so given ``Q`` the estimator is unbiased
and its only randomness is the residual Hutchinson mean. Its conditional variance is estimated
by the residual probes' sample variance over ``K`` (the interval is the log-scale t-interval of
the residual mean, :func:`~fsinfo_fast.estimators.hutchinson.log_t_halfwidth`, ``K - 1`` dof,
shifted by the exact sketch part); because the
conditional mean does not depend on ``Q``, the conditional variance averages to the total
variance, so the interval is honest unconditionally too. A rounding allowance
``sqrt(n) eps |value|`` is added in quadrature: when the sketch spans the whole range
(``k >= rank``) the residual is zero and the estimate is exact up to rounding. Adaptive
stopping adds residual probes only; the sketch is drawn once.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Unpack

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .base import Estimate, Products, check_finite, detached, sample_ids_for, square_sum64
from .hutchinson import (
    _check_side_kind,
    mean_and_stderr,
    residual_halfwidth,
    sample_skewness,
    skew_weight,
    trace_scale,
    with_rounding,
)
from .probes import draw_probes, resolve_seed
from .stopping import StopKeywords, StoppingRule, estimate_from, resolve_rule, run_rounds

__all__ = ["hutchpp_trace", "SKETCH_STREAM"]

#: Probe stream of the sketch ``S`` (the residual probes use stream 0).
SKETCH_STREAM = 1


def hutchpp_trace(
    products: Products,
    *,
    sigma: float | Tensor | None = None,
    sketch_size: int | None = None,
    side: str = "auto",
    kind: str = "gaussian",
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    stop: StoppingRule | None = None,
    **rule: Unpack[StopKeywords],
) -> Estimate:
    r"""Per-sample Hutch++ estimate of ``tr(J^T J)``, or of dFIL when ``sigma`` is given.

    Args:
        products: batched Jacobian products.
        sigma: noise scale; if given the value is dFIL ``tr(J^T J) / (sigma^2 d)``.
        sketch_size: sketch columns ``k`` (default: the rule's ``num_probes`` if fixed, else
            its ``min_probes``; Meyer et al.'s equal split of the budget), capped at ``n``.
        side: ``"input"`` (``A = J^T J``), ``"output"`` (``A = J J^T``) or ``"auto"`` (smaller).
        kind: residual probe distribution, ``"gaussian"`` or ``"rademacher"`` (the sketch is
            always Gaussian).
        seed, sample_ids: probe seed and ``[B]`` global sample ids.
        stop: the :class:`~fsinfo_fast.estimators.StoppingRule` of the *residual* probes
            (unset start and rounds: 30, then rounds of 10).
        **rule: the keywords of :class:`~.stopping.StopKeywords` (``num_probes``,
            ``atol``, ``rtol``, ``max_probes``, ...): the
            same as ``stop=StoppingRule(...)`` with these fields (not together with ``stop``).

    Returns:
        :class:`~fsinfo_fast.estimators.Estimate`; ``passes = 3 k + K``; ``info["sketch_size"]``.

    Example:
        >>> from fsinfo_fast.engine.dense import DenseProducts
        >>> J = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))[None]
        >>> est = hutchpp_trace(DenseProducts(J), sketch_size=2, num_probes=4)
        >>> round(float(est.value[0]), 10), est.passes   # rank 2: the sketch captures it all
        (10.0, 10)
    """
    products = detached(products)
    if side == "auto":
        side = "input" if products.d <= products.m else "output"
    _check_side_kind(side, kind)
    rule = resolve_rule(stop, "hutch++", **rule)
    confidence = rule.confidence
    n = products.d if side == "input" else products.m
    if sketch_size is None:
        sketch_size = rule.num_probes if rule.num_probes is not None else rule.min_probes
    if isinstance(sketch_size, bool) or not isinstance(sketch_size, int) or sketch_size < 1:
        raise InvalidInputError(f"sketch_size must be an int >= 1, got {sketch_size!r}")
    k = min(sketch_size, n)
    seed = resolve_seed(seed)
    ids = sample_ids_for(products, sample_ids)
    scale = trace_scale(products, sigma)
    dev, dt = products.device, products.dtype

    # A = F^T F with F the "forward" map on the probe side: J (input side) or J^T (output side)
    def fwd(X: Tensor) -> Tensor:
        return products.jvp(X) if side == "input" else products.vjp(X)

    def bwd(Y: Tensor) -> Tensor:
        return products.vjp(Y) if side == "input" else products.jvp(Y)

    S = draw_probes(
        n,
        seed=seed,
        sample_ids=ids,
        start=0,
        count=k,
        kind="gaussian",
        dtype=dt,
        device=dev,
        stream=SKETCH_STREAM,
    )
    FS = fwd(S)
    check_finite(FS, ids, 0, f"Hutch++ sketch ({side} side)")
    AS = bwd(FS)
    check_finite(AS, ids, 0, f"Hutch++ sketch ({side} side)")
    Q = torch.linalg.qr(AS.to(torch.float64).transpose(1, 2), mode="reduced").Q  # [B, n, k]
    Qt = Q.transpose(1, 2).contiguous()  # [B, k, n], orthonormal rows
    FQ = fwd(Qt.to(dt))
    check_finite(FQ, ids, 0, f"Hutch++ sketch trace ({side} side)")
    sketch_trace = (FQ.to(torch.float64) ** 2).sum(dim=(1, 2))  # [B]
    chunks: list[Tensor] = []

    def process(start: int, count: int, active: Tensor | None = None) -> None:
        G = draw_probes(
            n,
            seed=seed,
            sample_ids=ids,
            start=start,
            count=count,
            kind=kind,
            dtype=torch.float64,
            device=dev,
        )
        G = G - (G @ Q) @ Qt  # (I - Q Q^T) g
        out = fwd(G.to(dt))
        check_finite(out, ids, start, f"Hutch++ residual ({side} side)")
        chunks.append(square_sum64(out))

    def summarize(lo: int, rows: Tensor | None = None,
                  names: Container[str] | None = None):  # one quantity; rows unused
        t = torch.cat(chunks, dim=1)
        chunks[:] = [t]
        mean, se_mc = mean_and_stderr(t[:, lo:])
        k_res = t.shape[1] - lo
        total = sketch_trace + mean
        se = with_rounding(se_mc, total, n, dt)
        # the skew is the residual mean's: its log-scale interval, shifted by the exact sketch
        hw_fn = residual_halfwidth(mean * scale, se_mc * scale, se * scale, confidence,
                                   skew_weight(kind), sample_skewness(t[:, lo:]))

        return {"value": (total * scale, se * scale, k_res - 1, torch.zeros_like(total), hw_fn)}

    frozen, converged, probes, drawn, pilot = run_rounds(
        rule,
        batch=products.batch,
        device=dev,
        process=process,
        summarize=summarize,
        targets={"value": rule.targets},
    )
    return estimate_from(
        rule, frozen["value"], converged=converged, probes=probes, drawn=drawn, pilot=pilot,
        passes=3 * k + drawn, bias_bound=False,
        info={
            "method": "hutch++",
            "quantity": "dfil" if sigma is not None else "trace",
            "side": side,
            "kind": kind,
            "sketch_size": k,
            "seed": seed,
            "se_method": "conditional on the sketch: residual sample std / sqrt(K)",
            "interval": ("log-scale t of the residual mean (upper side, symmetric) after a "
                         "pilot; skewness-calibrated multiplier at a fixed count"),
        },
    )
