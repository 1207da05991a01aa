r"""Linearise once, answer everything: :func:`linearize` and :class:`Linearization`.

Every metric of this package is a functional of one object, the per-sample Jacobian ``J`` of the
encoder at the batch ``x``. :func:`linearize` validates the encoder once (cached per encoder and
input signature; a second batch of the same shape re-runs only the checks its values can decide,
see :func:`fsinfo_fast.encoder.prepare`), builds the product
backend once (the engine's primal runs once per batch) and returns a :class:`Linearization` whose
methods share every product they can:

- :meth:`Linearization.fsinfo` (``variant="diag"``) and :meth:`Linearization.dfil` (``method=
  "auto"``) read the same Gaussian output-side VJP probes: the diagonal estimator's probes give
  ``tr(J^T J)`` too;
- the log-det requests (:meth:`Linearization.fsinfo` ``variant="logdet"`` at any sigma or
  prior, :meth:`Linearization.fsinfo_sigma` through SLQ) share one
  :class:`~fsinfo_fast.estimators.SLQProbeStore`: its probes and the Krylov steps already
  taken are reused, and :meth:`Linearization.dfil` (``method="lanczos"``, or ``"auto"``
  where it is predicted cheapest) reads ``tr(J^T J)`` from the same probes, ``||v||^2
  T_{11}``, one Krylov step per probe not yet held;
- :meth:`Linearization.fsinfo_sigma` (FSInfoGuard's ``sigma*``) comes from the ``sigma = 1``
  quantities of those probes (``FSInfo(sigma) + log(sigma)`` does not depend on ``sigma``), and
  :meth:`Linearization.dfil_sigma` from the trace;
- on deep splits FSInfo_diag takes the deflated route; its sketch, rank pilot and remainder
  probes are held too (:class:`~fsinfo_fast.estimators.DeflatedProbeState`), so ``sigma*``,
  another sigma or floor, and the deflated dFIL replay them and draw only what is new;
- the exact route (:meth:`Linearization.exact`, the float64 oracle) is computed at most once and
  then serves every variant, sigma, floor and prior; ``estimator="auto"`` uses it whenever it is
  already there;
- the fast exact route (:meth:`Linearization.exact_fast`, ``estimator="exact-fast"``): the
  diagonal and the trace from ``min(m, d)`` one-hot products of this batch's backend in its
  working dtype (float64 accumulation, a measured rounding allowance as the interval); where
  ``auto`` switches to an exact route for FSInfo_diag or dFIL it takes this one (recorded in
  ``result.info["auto"]``), not the oracle; the samples whose fast-route allowance misses the
  tolerance take the oracle's values, those samples only (``info["exact_fast_oracle_samples"]``,
  :meth:`Linearization._exact_rows`). It switches as soon as a sample is predicted not to
  converge within the cap (``StoppingRule.stop_unreachable``), not after spending the cap.
  Where a randomized estimate's measured rounding misses the tolerance for some samples only,
  those samples take the exact route on their own (:meth:`Linearization._exact_part`,
  ``estimator="mixed"``, ``info["exact_samples"]``).

The module-level :func:`fsinfo_fast.fsinfo`, :func:`fsinfo_fast.dfil`,
:func:`fsinfo_fast.fsinfo_sigma` and :func:`fsinfo_fast.dfil_sigma` are thin wrappers:
``ff.fsinfo(encoder, x, sigma, **kw) == ff.linearize(encoder, x, ...).fsinfo(sigma, **kw)``.

Example:
    >>> import torch, fsinfo_fast as ff
    >>> enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Tanh()).eval()
    >>> lin = ff.linearize(enc, torch.rand(2, 1, 16, 16), seed=0)
    >>> r = lin.fsinfo(0.1, num_probes=16)      # FSInfo_diag from 16 VJPs per sample
    >>> d = lin.dfil(0.1, num_probes=16)        # dFIL from the same 16 VJPs
    >>> s = lin.fsinfo_sigma(-1.0, num_probes=16)   # sigma* from them too
    >>> r.value.shape, d.value.shape, s.sigma.shape
    (torch.Size([2]), torch.Size([2]), torch.Size([2]))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import reference
from ._precision import ieee_fp32, ieee_fp32_method
from ._progress import meter
from .encoder import (
    COMPILED_NOTE,
    PreparedEncoder,
    _signature,
    check_prior_var,
    check_same_function,
    check_sigma,
    check_target,
    computes_the_same,
    prepare,
    uncompiled,
    working_dtype,
)
from .engine import default_memory_budget, make_products
from .errors import (
    CostlyRouteWarning,
    EncoderError,
    FSInfoError,
    InvalidInputError,
    InvalidInputTypeError,
    PrecisionError,
    warn_user,
)
from .estimators import base as _base
from .estimators import expected_passes, hutchinson_trace, hutchpp_trace, slq_logdet
from .estimators.base import Estimate, sample_ids_for, square_sum64
from .estimators.cost import SLQ_ORDER_ESTIMATE
from .estimators.deflated import (
    DEFLATE_ABOVE,
    PILOT_PROBES,
    RANK_GROWTH,
    START_RANK,
    DeflatedProbeState,
    choose_rank,
    estimate_diag_deflated,
    predict_plain_probes,
)
from .estimators.diagonal import (
    MAX_FLOORED_PROBES,
    DiagProbeState,
    SnapshotDroppedError,
    estimate_diag,
    fsinfo_diag_restaged,
)
from .estimators.exact_fast import (
    CHECK_COLUMNS,
    FastExactFisher,
    column_norms,
    exact_fast_fisher,
    exact_products,
    fsinfo_bias,
    rounding_floor,
)
from .estimators.exact_fast import SAFETY as EXACT_SAFETY
from .estimators.hutchinson import dominant_columns
from .estimators.lanczos import SLQProbeStore, slq_trace
from .estimators.logfloor import log_floor_term
from .estimators.probes import draw_probes, resolve_seed
from .estimators.stopping import (
    DEFAULT_MAX_PROBES,
    START_PROBES,
    StoppingRule,
    _check_tol,
    check_fixed_cap,
    initial_probes,
    planned_probes,
    tolerance_met,
)
from .formulas import DIAG_FLOOR, HALF_LOG_2PIE, as_sigma, sum_rel_bound
from .reference.oracle import _check_options, _warn_singular
from .reference.saturation import perturbed_vjp
from .result import Z95, MetricResult, SigmaResult

__all__ = ["DEFAULT_MAX_PROBES", "Linearization", "linearize"]

#: The probe stream of the cotangent that chooses the dominant input columns (:meth:`Linearization.
#: _dominant`).
DOMINANT_STREAM = 21
#: The probe stream of the cotangent that finds the columns of ``J`` that are 0 in the working
#: dtype but not in float64 (:meth:`Linearization._lost`).
DEAD_STREAM = 22
#: ... and of the cotangents that confirm a column 0 there for every product
#: (:data:`LOST_CONFIRM` of them).
LOST_STREAM = 23
#: The input vectors of the JVP rounding check (:meth:`Linearization._jvp_pair`).
JVP_STREAM = 24
#: The input-side vector of the float64 forward-/reverse-mode check (:meth:`Linearization.
#: _modes`; its cotangents are the rounding check's, :meth:`Linearization._pair`).
MODES_STREAM = 25
#: The rounding check's further cotangents where its first ones show rounding beyond the
#: floor (:meth:`Linearization._pair_more`, :data:`PAIR_ESCALATE`).
ROUNDING_STREAM = 29
#: Seeds the signs of the saturating activations' perturbation
#: (:meth:`Linearization._saturation`).
SATURATION_STREAM = 26
#: Unit roundoffs of ``||J||_F`` (the cotangents' reading) beyond which the computed
#: Jacobian's own error enters the randomized log det's rounding model
#: (:meth:`Linearization._logdet_jerr`); ordinary products round at a few.
JERR_GATE = 256.0
#: The cotangents of the oracle's per-column saturation reading (:meth:`Linearization.
#: _saturation_cols`; :data:`SATURATION_COLS` of them).
SATURATION_COLS_STREAM = 27
#: The cotangents of the randomized log det's reading of the working dtype's ``||dJ||_F``
#: (:meth:`Linearization._logdet_jerr`).
JERR_STREAM = 28
#: Cotangents of the oracle's per-column saturation reading: each column's change is read as
#: the root mean square of this many Gaussian projections (a chi with 8 degrees of freedom
#: over 8: below a tenth of its mean, the reading's safety factor, with probability about 1e-7).
SATURATION_COLS = 8
#: A sample whose float64 forward- and reverse-mode ``u^T J v`` differ by more than this share
#: of the terms' size, weighted as the metric weighs the columns (:meth:`Linearization.
#: _modes_share`), has no Jacobian determined in float64: one mode cancelled digits the other
#: kept (a softmax whose largest probability rounds to 1: ``p (g - <p, g>)`` against ``p
#: (zdot - <p, zdot>)``). Measured with every column at its own scale on the bundled
#: transformers encoders (ten architectures, two splits each, bare and classifier, inputs 1x
#: and 30x): at most 3.2e-16; classifiers' softmax with logits scaled 30x: up to 5.6e-5 (one
#: RegNet input), 1000x: up to 0.66.
MODES_REL = 1e-6
#: ... the scale-free share above which a result's own weighting is measured (a float64 JVP):
#: 3000x the largest seen without a saturated softmax.
MODES_SCREEN = 1e-12
LOST_CONFIRM = 32
#: At most this many such input dimensions per sample are computed exactly in float64; beyond
#: it ``auto`` takes the oracle and another route raises.
LOST_MAX = 256
_LOST_SCALE = 2.0**40
#: The rounding check (:meth:`Linearization._pair`) draws enough cotangents for this many
#: (cotangent, column) terms (at most :data:`PAIR_MAX` cotangents; one where ``d >= 64``).
PAIR_TERMS = 64
PAIR_MAX = 16
#: ... and this many cotangents (and JVP input vectors) in all where those show rounding beyond
#: the floor: the reading's spread is then taken over independent cotangents, not over the
#: columns one cotangent shares (a saturated softmax loses one output direction in float32,
#: and one cotangent read 3% of the lost trace where 97% was lost).
PAIR_ESCALATE = 16
#: ... where the first cotangents' allowance is this many times the fixed one
#: (:func:`rounding_allowance`; ordinary float32 encoders read up to 55 times it on FSInfo_diag,
#: a fifth of it on dFIL: their extra products would not change a result).
PAIR_ESCALATE_AT = 100.0
#: ... or where it exceeds the interval's half-width over this (a rank-one loss that one
#: cotangent reads at a small share, past intervals far inside the tolerance; ordinary float32
#: encoders read far below it: VGG5 split 2, ResNet-18 split 7 and seven transformers
#: architectures at 16-32 px, 3 seeds of 2 samples, FSInfo_diag 255 times below their
#: half-widths or more but for one transformers ResNet sample at 72, dFIL 23000 times).
PAIR_ESCALATE_HW = 200.0
#: The measured rounding allowance of a randomized estimate (:meth:`Linearization.
#: _rounding_measured`) is this many times the measured bias plus ``Z95`` standard errors.
ROUNDING_SAFETY = 2.0

log = logging.getLogger(__name__)

Encoder = Callable[[Tensor], Tensor]
ESTIMATORS = ("auto", "exact", "exact-fast", "randomized", "deflated")
DFIL_METHODS = ("auto", "diag", "hutchinson", "hutch++", "deflated", "lanczos")
VARIANTS = ("diag", "logdet")
#: Probes the SLQ log det starts with (its first round); the diagonal estimator and the trace
#: estimators start at :func:`~fsinfo_fast.estimators.stopping.initial_probes`.
_SLQ_START = 10
#: Under ``auto`` the probe cap is the oracle's cost, but never below this many probes.
_CAP_FLOOR = 10
#: Memory the shared diagonal probe state may keep for earlier round boundaries (bytes; at most
#: this share of the probe memory budget).
_SNAPSHOT_SHARE = 8
_SNAPSHOT_MAX = 1 << 29
#: ``auto``'s plain-vs-deflated choice: a prediction from the plain estimator's first rounds
#: within this factor of ``DEFLATE_ABOVE`` is refined by the deflation pilot.
_PILOT_BAND = 4.0
#: ``auto``: the plain estimator, chosen from a few probes' spread, runs under a cap of this
#: many probes first (giving up as soon as it is predicted to pass it); a batch with a sample
#: that does not converge there is rerouted to the deflated estimator (4 Gaussian probes can
#: hide a heavy tail: 21 of 1160 seeded runs on the CRAFT pool4 split took the plain route
#: and needed 1241-1850 probes, where the deflated route takes about 230).
_REROUTE_AT = 2 * DEFLATE_ABOVE
#: dFIL ``auto`` weighs the deflated dFIL where every other method predicts more new products
#: per sample (:meth:`Linearization._plan`) than this (and ``min(m, d) >= DEFLATE_ABOVE``): its
#: first look costs 40 products (rank pilot and first sketch block), at most 8% of the cheapest
#: alternative then.
_DEFLATED_DFIL_ABOVE = 2 * DEFLATE_ABOVE
#: ``auto`` takes the deflated dFIL only where its rank pilot predicts the sketch leaves at most
#: this share of the plain Gaussian probes' need (the batch's mean; the pilot's own prediction
#: at rank 0 from the same probes): a smaller saving is within the noise of predictions from a
#: few probes.
_DEFLATED_DFIL_SAVES = 0.5
#: ... and grows its sketch for the prediction beyond the first block only where that block
#: already leaves at most this share (a flat spectrum: about ``1 - r/min(m, d)``).
_DEFLATED_DFIL_FIRST = 0.85
#: ... within this share of the products of the route it would replace (the cheaper of the
#: other methods and the exact route) for its rank pilot and sketch.
_DEFLATED_DFIL_SPEND = 0.15
#: How many samples the sample-independence check encodes alone.
_INTERACTION_CHECKS = 2


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{name} must be one of {choices}, got {value!r}")


def _check_max_probes(max_probes: object) -> int | None:
    """``max_probes`` as an int (None stays None: the default cap, see :func:`_cap`).

    Raises:
        InvalidInputTypeError: not an int or None (a float, a bool, a string, ...).
        InvalidInputError: an int below 2 (an interval needs two probes).
    """
    if max_probes is None:
        return None
    if isinstance(max_probes, bool) or not isinstance(max_probes, numbers.Integral):
        raise InvalidInputTypeError(
            f"max_probes must be an int >= 2 or None (None: min(m, d) under estimator='auto', "
            f"{DEFAULT_MAX_PROBES} for a randomized estimator), got "
            f"{type(max_probes).__name__} {max_probes!r}")
    if max_probes < 2:
        raise InvalidInputError(
            f"max_probes must be >= 2 (an interval needs two probes), got {max_probes!r}")
    return int(max_probes)


def _cap(max_probes: object, n: int, estimator: str, own: int | None = None) -> int:
    """The probe cap per sample a request runs under: ``max_probes`` where given; None (the
    default) is ``n`` under ``estimator="auto"`` (the products the exact route costs,
    ``min(m, d)`` or fewer: more randomized probes than that cannot be cheaper) or the route's
    ``own`` cap where
    it counts its products otherwise (dFIL ``method="lanczos"``: the SLQ probes held are free,
    each new one costs two products), else :data:`DEFAULT_MAX_PROBES`. Under ``auto`` each
    route then applies its own caps too (the SLQ log det's is below ``min(m, d)``)."""
    mp = _check_max_probes(max_probes)
    if mp is not None:
        return mp
    if estimator == "auto":
        return max(2, n if own is None else own)
    return DEFAULT_MAX_PROBES


def _stopping(atol, rtol, num_probes, max_probes, cap: int | None,
              fallback: bool = False, batch: bool = True) -> StoppingRule:
    """The estimators' :class:`~fsinfo_fast.estimators.StoppingRule` (``stop=``; its unset
    start and rounds are each estimator's defaults); ``cap`` bounds the probes under
    ``auto``; ``fallback``: an exact route takes over an unconverged sample (``auto``), so a
    sample whose planned last stage would pass the cap stops at once
    (``StoppingRule.stop_unreachable``) instead of drawing probes to the cap first, and, with
    ``batch`` (the exact route replaces the whole batch), the batch's other samples stop with
    it (``StoppingRule.stop_batch``; without it they go on: the exact route takes that sample
    alone, :meth:`Linearization._exact_part`)."""
    if num_probes is None and atol is None and rtol is None:
        raise InvalidInputError(
            "the randomized estimator needs atol, rtol or num_probes (all were None)"
        )
    mp = max_probes if cap is None else max(_CAP_FLOOR, min(max_probes, cap))
    if num_probes is not None:
        mp = max(num_probes, mp)  # max_probes given below num_probes is refused by the caller
    return StoppingRule(num_probes=num_probes, atol=atol, rtol=rtol, max_probes=mp,
                        stop_unreachable=fallback, stop_batch=fallback and batch)


def _column_weights(R: Tensor, kind: str, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``([B, d], [B, d], [B, d])``: the columns' weights ``w`` as a metric weighs them and the
    floor's part ``rest`` of each (:meth:`Linearization._modes_share`), normalised by the
    largest weight, and each column's scale for :func:`_per_column` (``w_k R_k``; for FSInfo
    ``w_k R_k / rho_k``, ``rho_k = R_k^2 / (R_k^2 + a)`` its weight in the log: a relative
    error ``e_k`` moves its term by ``rho_k e_k``, so the reading is of ``rho_k e_k``, and a
    column far below the floor's level reads as such); ``a`` ``[B, 1]``."""
    live = R > 0
    one = torch.ones_like(R)
    if kind == "dfil":
        w, rest = R, torch.zeros_like(R)
    elif kind == "flat":
        w, rest = live.to(R), torch.zeros_like(R)
    else:
        # (R / (R^2 + a) and a / ((R^2 + a) R) without R^2, which underflows below 1e-162:
        # the floorless weights of such columns read 1 / 0 = inf)
        r = torch.where(live, R, one)
        w = torch.where(live, 1.0 / (r + a / r), 0.0)
        pos = a > 0
        rest = torch.where(live & pos, 1.0 / (r + r.pow(3) / torch.where(pos, a, 1.0)), 0.0)
    top = w.amax(dim=1, keepdim=True)
    flat = top == 0  # (g 0 everywhere, or every column's weight underflowed)
    top = torch.where(flat, 1.0, top)
    w = torch.where(flat, one, w / top)
    # (w_k R_k / rho_k = 1 / top on the live columns: R_k^2 / rho_k underflows)
    scale = (torch.where(flat, one, live.to(R) / top) if kind == "fsinfo"
             else w * R)
    return w, rest / top, scale


def _rms(v: Tensor, dim: int) -> Tensor:
    """The root mean square over ``dim``, scaled against underflow (a column norm of 1e-170
    squares to 0 in float64)."""
    big = v.abs().amax(dim=dim, keepdim=True)
    return big.squeeze(dim) * (v / torch.where(big > 0, big, 1.0)).square().mean(dim=dim).sqrt()


def _per_column(gap: Tensor, z: Tensor, scale: Tensor) -> Tensor:
    """``[B]``: a disagreement ``gap`` in ``u^T dJ v`` (``[B]``, Gaussian ``u``, ``v = z w``)
    read as the relative error per column it implies: with column ``k`` off by ``e_k R_k`` its
    spread is ``sqrt(sum_k z_k^2 w_k^2 e_k^2 R_k^2)``, so ``gap / sqrt(sum_k z_k^2 s_k^2)``
    (``s`` the columns' ``scale``, :func:`_column_weights`) reads ``e_k w_k R_k / s_k``
    weighted by ``z_k^2 s_k^2`` (``inf`` where a gap meets a zero spread)."""
    vr = (z * scale.unsqueeze(1)).flatten(1)  # (scaled: R^2 underflows below 1e-162)
    big = vr.abs().amax(dim=1)
    spread = big * (vr / torch.where(big > 0, big, 1.0).unsqueeze(1)).square().sum(1).sqrt()
    return torch.where(spread > 0, gap / spread, torch.where(gap > 0, math.inf, 0.0))


def pair_count(d: int) -> int:
    """Cotangents of the rounding check at ``d`` input dimensions (:data:`PAIR_TERMS`)."""
    return max(1, min(PAIR_MAX, -(-PAIR_TERMS // max(d, 1))))


def _fixed(k: int) -> StoppingRule:
    """``k`` probes, a single round."""
    return StoppingRule(num_probes=k, min_probes=k, max_probes=k)


def _unconverged(est: Estimate) -> tuple[int, str]:
    """The samples of ``est`` that did not converge on their own (not counting those stopped
    with the batch, ``StoppingRule.stop_batch``), and a note on the others (``""`` if none)."""
    bad = ~est.converged
    with_batch = est.info.get("stopped_with_batch")
    if with_batch is None or not bool(with_batch.any()):
        return int(bad.sum()), ""
    return (int((bad & ~with_batch).sum()),
            f"; the batch stopped with it ({int(with_batch.sum())} other sample(s) unfinished)")


def rounding_allowance(metric: str, value: Tensor, dtype: torch.dtype) -> tuple[Tensor, float]:
    r"""The working dtype's rounding allowance of a randomized FSInfo_diag or dFIL: ``[B]``
    float64 (0 for other metrics) and the relative bound ``eps`` it comes from.

    The products carry a relative rounding error; the intervals of the randomized estimators
    count their probe noise, and a deflated sketch that holds the whole range of ``J`` (a
    low-rank Jacobian: a bottleneck, dead ReLUs) leaves almost none of it (measured: half-widths
    of 5e-12 nats/dim around float32 values 1.5e-8 off the oracle). As for the fast exact route
    (:mod:`fsinfo_fast.estimators.exact_fast`), every diagonal entry and the trace are taken
    within ``eps = FLOOR_ULPS * u`` (:func:`~fsinfo_fast.estimators.exact_fast.rounding_floor`;
    3.8e-6 in float32) relative, so
    FSInfo_diag within ``-log(1 - eps) / 2`` nats/dim and dFIL within ``eps |dFIL|``. The
    exact route's float64 checks measured 5e-8 to 2.5e-7 on VGG5 and ResNet-18 splits in
    float32, 15-80x inside it. The log-det variant gets none here: its SLQ interval carries
    its own rounding allowance (:mod:`fsinfo_fast.estimators.lanczos`). This is a floor:
    :meth:`Linearization._rounding_fixed` replaces it by the rounding measured against
    float64 where that is larger (products that lose digits by cancellation)."""
    eps = rounding_floor(dtype)
    if metric == "fsinfo_diag":
        return fsinfo_bias(torch.full_like(value, eps)), eps
    if metric == "dfil":
        return eps * value.abs(), eps
    return torch.zeros_like(value), 0.0


def _to_result(est: Estimate, *, metric: str, units: str, sigma: Tensor, d: int, m: int,
               info: dict[str, Any], dtype: torch.dtype) -> MetricResult:
    rounding, eps = rounding_allowance(metric, est.value, dtype)
    bias = rounding if est.bias_bound is None else est.bias_bound + rounding
    extra = {"rounding_allowance": eps} if eps else {}
    return MetricResult(
        value=est.value, stderr=est.stderr, metric=metric, units=units, estimator="randomized",
        sigma=sigma, d=d, m=m, num_probes=est.num_probes, passes=est.passes,
        ci_halfwidth=est.ci_halfwidth + rounding, singular=est.singular,
        converged=est.converged, probes_per_sample=est.probes_per_sample, bound=est.bound,
        bias_bound=bias, info={**est.info, **info, **extra},
    )


#: ``log(sigma)`` beyond which the floored sigma* solver calls a noise scale infinite (or 0)
#: (``sigma^2`` stays finite in float64).
_LOG_SIGMA_MAX = 300.0
#: Width in ``log(sigma)`` at which the solver's bracket counts as converged.
_LOG_SIGMA_TOL = 1e-10
#: Points checked beyond a crossing (``log sigma`` up to ``2^(_BEYOND - 3)`` past it).
_BEYOND = 6


def _crossing(f: Callable[[Tensor, Tensor], Tensor], t0: Tensor, want: Tensor,
              last: bool, monotone: bool = False) -> Tensor:
    r"""``[B]`` where ``f(t, rows)`` (``[B]``, evaluated for the samples ``rows``) turns from
    ``>= 0`` to ``< 0`` in ``t = log sigma``, per sample of ``want`` (NaN elsewhere): with
    ``last``, the end of the bracket at or above ``sup {t : f(t) >= 0}``, else the end at or
    below ``inf {t : f(t) < 0}`` (brackets narrowed to ``_LOG_SIGMA_TOL``). For a ``monotone``
    (decreasing) ``f``, an estimate at fixed probes, the crossing is unique. An estimate plus or
    minus its half-width need not be monotone: once a crossing is found, the points ``2^j / 4``
    (``j <`` :data:`_BEYOND`) beyond it (after it for ``last``, before it otherwise) are
    checked, and the search goes on from any with the other sign (a crossing between those
    points, or further out, would be missed). ``+inf`` where ``f >= 0`` up to ``t =``
    :data:`_LOG_SIGMA_MAX` (no finite sigma), ``-inf`` where ``f < 0`` down to
    ``-_LOG_SIGMA_MAX`` (sigma 0)."""
    out = torch.full_like(t0, math.nan)
    a = torch.full_like(t0, -math.inf)  # f(a) >= 0
    b = torch.full_like(t0, math.inf)   # f(b) < 0
    fa, fb = torch.zeros_like(t0), torch.zeros_like(t0)
    f0 = f(torch.where(want, t0, torch.zeros_like(t0)), want)
    a, fa = torch.where(want & (f0 >= 0), t0, a), torch.where(want & (f0 >= 0), f0, fa)
    b, fb = torch.where(want & (f0 < 0), t0, b), torch.where(want & (f0 < 0), f0, fb)
    for _ in range(8):  # rounds of: bracket, refine, check beyond
        step = torch.ones_like(t0)
        while True:  # bracket by doubling steps away from the known end
            open_ = want & torch.isnan(out) & (torch.isinf(a) | torch.isinf(b))
            if not bool(open_.any()):
                break
            up = open_ & torch.isinf(b)
            t = torch.where(up, a + step, b - step).clamp(-_LOG_SIGMA_MAX, _LOG_SIGMA_MAX)
            t = torch.where(open_, t, torch.zeros_like(t))
            ft = f(t, open_)
            if bool(torch.isnan(ft[open_]).any()):
                raise FloatingPointError(f"the floored FSInfo was NaN at log(sigma) = "
                                         f"{t[open_ & torch.isnan(ft)].tolist()}")
            pos = open_ & (ft >= 0)
            neg = open_ & (ft < 0)
            a, fa = torch.where(pos, t, a), torch.where(pos, ft, fa)
            b, fb = torch.where(neg, t, b), torch.where(neg, ft, fb)
            step = torch.where(open_, step * 2, step)
            out = torch.where(open_ & torch.isinf(b) & (a >= _LOG_SIGMA_MAX), math.inf, out)
            out = torch.where(open_ & torch.isinf(a) & (b <= -_LOG_SIGMA_MAX), -math.inf, out)
        side = torch.zeros_like(t0)
        for _ in range(300):  # refine: regula falsi with the Illinois rule
            live = want & torch.isnan(out) & ((b - a) > _LOG_SIGMA_TOL)
            if not bool(live.any()):
                break
            w = (fa / (fa - fb)).nan_to_num(0.5).clamp(0.0, 1.0)
            c = a + w * (b - a)
            c = torch.where((c <= a) | (c >= b) | (side.abs() > 2), (a + b) / 2, c)
            c = torch.where(live, c, torch.zeros_like(c))
            fc = f(c, live)
            pos = live & (fc >= 0)
            neg = live & (fc < 0)
            a, fa = torch.where(pos, c, a), torch.where(pos, fc, fa)
            b, fb = torch.where(neg, c, b), torch.where(neg, fc, fb)
            fb = torch.where(pos & (side > 0), fb / 2, fb)  # Illinois: halve the stale end
            fa = torch.where(neg & (side < 0), fa / 2, fa)
            # consecutive moves of one end (a bisection step after three)
            side = torch.where(pos, side.clamp_min(0) + 1, torch.where(neg, side.clamp_max(0) - 1,
                                                                       side))
        # beyond the crossing: a later f >= 0 (last) or an earlier f < 0 re-opens the search
        found = want & torch.isnan(out) & (not monotone)
        again = torch.zeros_like(want)
        for j in range(_BEYOND):
            t = torch.where(found & ~again, b + 2.0**j / 4 if last else a - 2.0**j / 4,
                            torch.zeros_like(t0)).clamp(-_LOG_SIGMA_MAX, _LOG_SIGMA_MAX)
            ft = f(t, found & ~again)
            hit = found & ~again & ((ft >= 0) if last else (ft < 0))
            if last:
                a, fa = torch.where(hit, t, a), torch.where(hit, ft, fa)
                b = torch.where(hit, math.inf, b)
            else:
                b, fb = torch.where(hit, t, b), torch.where(hit, ft, fb)
                a = torch.where(hit, -math.inf, a)
            again |= hit
        if not bool(again.any()):
            break
    return torch.where(want & torch.isnan(out), b if last else a, out)


def _copied(v: Any) -> Any:
    """``v`` with its tensors cloned (a tensor, or a dict, list or tuple of them)."""
    if isinstance(v, Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _copied(item) for k, item in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_copied(item) for item in v)
    return v


def _own_copy(hit: Any) -> Any:
    """A memoised :class:`~.estimators.diagonal.DiagEstimate` as the caller's own: both
    estimates' tensors and ``info`` copied, so an in-place edit of a returned result
    (``r.value /= math.log(2)``) does not change what the next identical request returns."""
    return dataclasses.replace(hit, **{
        f.name: dataclasses.replace(est, **{g.name: _copied(getattr(est, g.name))
                                            for g in dataclasses.fields(est)})
        for f in dataclasses.fields(hit) if isinstance(est := getattr(hit, f.name), Estimate)})


def _modes_checked(kind: str) -> Callable:
    """A public result method whose result :meth:`Linearization._modes_flagged` checks (the
    outermost call only: the methods call each other, and ``auto`` plans some requests again
    through their own method). ``kind``: ``"fsinfo"`` (the constant inside the log: ``floor``
    for the diagonal, the prior's precision for the log det) or ``"dfil"`` (none)."""

    def wrap(method: Callable) -> Callable:
        params = inspect.signature(method).parameters
        tol_default = tuple(params[k].default if k in params else None
                            for k in ("atol", "rtol"))

        @functools.wraps(method)
        def checked(self: Linearization, *args: Any, **kw: Any) -> Any:
            if self._depth:
                return method(self, *args, **kw)
            # the outermost call: a bar (progress=True) counting every product it computes
            with meter(self.progress, f"{method.__name__} (Jacobian products)"):
                return outermost(self, *args, **kw)

        def outermost(self: Linearization, *args: Any, **kw: Any) -> Any:
            self._depth += 1
            try:
                out = method(self, *args, **kw)
            finally:
                self._depth -= 1
            c = 0.0
            if kind == "fsinfo":
                c = (float(kw.get("floor", DIAG_FLOOR)) if kw.get("variant", "diag") == "diag"
                     else check_prior_var(kw.get("prior_var")))
            tol = tuple(kw.get(k, v) for k, v in zip(("atol", "rtol"), tol_default,
                                                      strict=True))
            wide = self._float64_allowed(out, c, tol)
            n = int((out.converged & ~wide.converged).sum()) if wide is not out else 0
            if (n and kw.get("estimator", "auto") == "auto" and kw.get("num_probes") is None
                    and kw.get("method", "auto") == "auto" and self._oracle_fits()):
                # the float64 Jacobian's own rounding put the route's interval past the
                # tolerance: the oracle reads it column by column (helper 101: 18 nats/dim of
                # half-width on the fast route where the oracle's was 1e-4)
                self._depth += 1
                try:
                    wide = method(self, *args, **{**kw, "estimator": "exact"})
                finally:
                    self._depth -= 1
                wide.info["auto"] = (
                    f"{out.info.get('auto') or out.estimator}; the float64 Jacobian's own "
                    "rounding (saturating activations, read as the oracle reads it) put the "
                    f"{out.estimator} interval past the tolerance for {n} sample(s), so the "
                    "float64 oracle was used")
            if kw.get("estimator") == "randomized" and kw.get("num_probes") is None:
                _warn_costly_randomized(wide, min(self.m, self.d))
            return self._modes_flagged(wide, kind, c)

        return checked

    return wrap


def _warn_costly_randomized(out: MetricResult | SigmaResult, exact_cost: int) -> None:
    """Warn (:class:`~fsinfo_fast.errors.CostlyRouteWarning`) where an explicitly randomized
    estimate left samples unconverged after at least the ``min(m, d)`` products the exact
    route needs for each (a classifier's logits: 1000 probes where 10 one-hot products give
    the exact value); their intervals stand, only wider than the tolerance."""
    spent = getattr(out, "probes_per_sample", None)  # (a SigmaResult: its probes, those
    if spent is None and out.info.get("computed_per_sample") is not None:  # reused included)
        spent = (torch.as_tensor(out.info["computed_per_sample"])
                 + int(out.info.get("reused_probes", 0)))
    miss = ~out.converged
    if spent is None or not bool(miss.any()) or "costly" in out.info:
        return  # (the randomized log det's own warning said it: info["costly"])
    worst = int(torch.as_tensor(spent)[miss.cpu()].max())
    if worst < exact_cost:
        return
    warn_user(f"estimator='randomized': {int(miss.sum())} of {len(miss)} sample(s) did not reach "
              f"the tolerance within {worst} probes (their 95% intervals stand, wider); the "
              f"exact route needs min(m, d) = {exact_cost} products a sample: "
              "estimator='auto' takes it where it is cheaper", CostlyRouteWarning)


class _Shape:
    """``batch`` and ``device`` of a prepared encoder, for the estimators' argument checks."""

    def __init__(self, enc: PreparedEncoder) -> None:
        self.batch, self.device = enc.batch, enc.x.device


class _PartUnavailable(Exception):
    """An :meth:`Linearization._exact_part` sub-batch cannot be served (the caller takes the
    batch's exact route and records why)."""


class Linearization:
    """One encoder linearised at one batch: validated once, every metric sharing its products.

    Build it with :func:`linearize`. Attributes: ``encoder``, ``x`` (a copy of the batch as
    given), ``enc`` (the :class:`~fsinfo_fast.encoder.PreparedEncoder`), ``batch``, ``d``,
    ``m``, ``seed``, ``sample_ids``, ``backend`` (as requested) and :attr:`products` (built on
    first use).

    It describes the encoder and the batch at construction: every result, memoised or computed
    later, is of that one function at that one point. The batch is copied (an in-place change
    of the caller's ``x`` does not reach it), and a method called after the encoder changed
    raises :class:`~fsinfo_fast.errors.EncoderError` (call :func:`linearize` again): what the
    validation cache's key sees (:func:`fsinfo_fast.encoder._signature`), with the parameters'
    and buffers' in-place versions: an optimizer step or an edit under ``torch.no_grad()``, a
    parameter or buffer replaced or given another storage, a hook added or removed, a train /
    eval switch. An in-place edit through ``.data`` (``p.data.mul_(2)``) bumps no version and
    is not seen; a Linearization built before it mixes the two weights (build it after).
    """

    def __init__(
        self,
        encoder: Encoder,
        x: Tensor,
        *,
        backend: str = "auto",
        seed: int | torch.Generator = 0,
        sample_ids: Tensor | None = None,
        memory_budget: int | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> None:
        _check_linearize_options(backend=backend, seed=seed, memory_budget=memory_budget,
                                 dtype=dtype, progress=progress)
        self.progress = progress
        self.encoder = encoder
        if isinstance(x, Tensor):  # a snapshot: the results describe x as it is now
            with torch.inference_mode(False):  # a normal tensor, even inside inference mode
                x = x.detach().clone()          # (an inference-mode copy refused autograd)
        self.x = x
        work, self.dtype_note = working_dtype(encoder, x, dtype)
        self.enc: PreparedEncoder = prepare(encoder, x, dtype=work,
                                            check_interaction=_INTERACTION_CHECKS, cache=True)
        self._built_as = self._state()
        self.backend = backend
        self.seed = resolve_seed(seed)
        # (a copy, as of x: ids the caller changes in place later would move the probes)
        self.sample_ids = None if sample_ids is None else sample_ids_for(
            _Shape(self.enc), sample_ids).clone()
        if self.sample_ids is not None and int(self.sample_ids.unique().numel()) < self.batch:
            warn_user(
                "sample_ids repeat within the batch: samples with the same id get the same "
                "probes, so their estimation errors are correlated and a batch mean's interval "
                "(MetricResult.mean) counts them as independent; give each sample its own id",
                UserWarning)
        self.memory_budget = memory_budget
        self._dtype_arg = dtype  # (as asked: the sub-batches of _exact_part ask the same)
        # the float64 copy checked to compute the working dtype's function on a batch holding
        # this one (an _exact_part sub-batch: that check's scale is the whole batch's)
        self._same_function_checked = False
        self._products: Any = None
        self._exact: reference.ExactFisher | None = None
        self._exact_fast: FastExactFisher | None = None
        # the oracle's diag and trace of some samples (held, diag, trace; see _exact_rows)
        self._oracle_part: tuple[Tensor, reference.ExactFisher] | None = None
        # the exact routes of some samples only: (rows [k] on the CPU, the Linearization of
        # x[rows], why, the call its last result answers, that result and its reason, the call
        # that sent it), see _exact_part
        self._parts: list[list[Any]] = []
        self._request = 0  # (counts the fsinfo and dfil calls: _exact_part's per-call results)
        self._dominant_sel: tuple[Tensor | None] | None = None  # see _dominant
        self._dominant_unbilled = 0  # its VJP, until a result counts it (_dominant_passes)
        self._diag_cache: dict[tuple, Any] = {}
        self._dstate: DiagProbeState | None = None
        self._deflated_cache: dict[tuple, Any] = {}
        self._dfstate: DeflatedProbeState | None = None  # shared by the deflated requests
        self._slq: SLQProbeStore | None = None  # the SLQ probes (log det, dFIL "lanczos")
        self._enc64: PreparedEncoder | None = None  # the float64 copy (fast route's check)
        self._p64 = None  # its torch.func products, pullback built (see _prepare64)
        self._lost_cache: tuple | None = None  # (see _lost)
        self._pair_cache: tuple | None = None  # (see _pair)
        self._jvp_pair_cache: dict[int, tuple] = {}  # (see _jvp_pair)
        self._pair_more_cache: tuple | None = None  # (see _pair_more)
        self._modes_cache: tuple | str | None = None  # (see _modes)
        self._sat_cache: Tensor | str | None = None  # (see _saturation)
        self._sat_cols_cache: Tensor | str | None = None  # (see _saturation_cols)
        self._jerr_cache: tuple | None = None  # (see _logdet_jerr)
        self._modes_shares: dict[tuple, Tensor] = {}  # each weighting's share (_modes_flagged)
        self._depth = 0  # public result methods running (see _modes_checked)
        self._modes_forward = True  # the check's JVP ran in forward mode (see _modes_share)
        self._check_products = 0  # working-dtype products the rounding checks ran
        self._check_reported = 0  # ... of which a result reported (rounding_check_products)
        self._no_exact: str | None = None  # why the exact routes cannot run ("" : they can)
        self._replan = False  # auto just found them unavailable: plan the request again

    def _state(self) -> tuple[tuple, tuple]:
        """The encoder's state as the validation cache keys it, with in-place versions: the
        weights, hooks and modes, and apart the modules' plain attributes."""
        return _signature(uncompiled(self.encoder), self.x, None, versions=True, split=True)

    def _check_unchanged(self) -> None:
        """Raise :class:`EncoderError` where the encoder changed since construction (the
        memoised probes and the exact routes would describe two different functions). Where
        only a plain attribute changed (a counter the forward increments, or a LeakyReLU's
        slope), the function decides: its output and seeded VJP at the batch are computed
        again (:func:`~fsinfo_fast.encoder.computes_the_same`)."""
        base, attrs = self._state()
        if base == self._built_as[0] and attrs != self._built_as[1] and \
                computes_the_same(self.enc):
            self._built_as = (base, attrs)
        if (base, attrs) != self._built_as:
            raise EncoderError(
                "the encoder changed since this Linearization was built (a parameter or "
                "buffer updated in place or replaced, a hook added or removed, the train / "
                "eval mode switched, or a module attribute such as a LeakyReLU's slope or a "
                "convolution's padding set): a Linearization describes the encoder at "
                "construction, and its held probes would mix the two. Call ff.linearize(encoder, "
                "x) again "
                "for the new encoder")

    # -- basic properties --------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.enc.batch

    @property
    def d(self) -> int:
        return self.enc.d

    @property
    def m(self) -> int:
        return self.enc.m

    @property
    def products(self) -> Any:
        """The Jacobian-product backend for this batch (built on first use, then reused).

        On a CUDA device the metrics call it with TF32 off (:mod:`fsinfo_fast._precision`); a
        direct call runs under the caller's TF32 settings."""
        if self._products is None:
            with ieee_fp32(self.x.device):
                self._products = make_products(self.enc, self.backend,
                                               memory_budget=self.memory_budget)
        return self._products

    def __repr__(self) -> str:
        built = self._products is not None
        return (f"Linearization(B={self.batch}, d={self.d}, m={self.m}, backend={self.backend!r}"
                f"{' -> ' + self._products.backend if built else ''}, seed={self.seed}, "
                f"exact={'cached' if self._exact is not None else 'not computed'})")

    def _sigma(self, sigma: float | Tensor) -> Tensor:
        check_sigma(sigma, self.batch)
        return as_sigma(sigma, self.batch, self.enc.x.device)

    def _info(self, **extra: Any) -> dict[str, Any]:
        p = self._products
        info: dict[str, Any] = {"backend": getattr(p, "backend", None), "seed": self.seed}
        if self.dtype_note is not None:
            info["working_dtype"] = self.dtype_note
        if uncompiled(self.encoder) is not self.encoder or getattr(
                uncompiled(self.encoder), "split_from_compiled", False):
            info["compiled"] = COMPILED_NOTE
        info.update(getattr(p, "info", None) or {})  # e.g. backend_fallback, engine fallbacks
        if self._no_exact:  # auto could not weigh the exact routes
            info["exact_unavailable"] = self._no_exact
        info.update(extra)
        return info

    # -- the exact route ---------------------------------------------------------------------
    @ieee_fp32_method
    def exact(self, *, spectrum: bool = False) -> reference.ExactFisher:
        """The exact (float64 oracle) Fisher quantities of every sample, computed at most once.

        Args:
            spectrum: also compute the eigenvalues of ``J^T J`` (needed by the log-det
                variant; the Jacobian is recomputed if an earlier call skipped them).

        Returns:
            :class:`~fsinfo_fast.reference.ExactFisher`: ``diag``, ``trace`` and (with
            ``spectrum``) ``eigvals`` at ``sigma = 1``; its ``fsinfo``, ``dfil`` and
            ``fsinfo_sigma`` methods give every exact result by closed-form arithmetic.
        """
        if not isinstance(spectrum, bool):
            raise InvalidInputTypeError(f"spectrum must be True or False, got {spectrum!r}")
        self._check_unchanged()
        if self._exact is None and not spectrum and self._oracle_part is not None:
            # some samples' oracle is held (auto's fast route sent them): the others only
            self._exact_rows(torch.ones(self.batch, dtype=torch.bool))
        if self._exact is None or (spectrum and self._exact.eigvals is None):
            self._prepare_oracle()
            with meter(self.progress, "exact Jacobian (float64 oracle)",
                       self.batch * min(self.m, self.d)):
                ex = reference.exact_fisher(self.encoder, self.x, spectrum=spectrum)
            self._exact = self._oracle_measured(ex)
        return self._exact

    def _adopt_exact(self, ex: reference.ExactFisher) -> None:
        """Take ``ex``, this batch's exact diagonal and trace computed elsewhere in float64
        (the profile's one-hot JVP sweep through a deeper split,
        :func:`~fsinfo_fast.profile.shared.exact_fisher_shared`), as the oracle's, with its
        rounding measured here as the oracle's own is (:meth:`_oracle_measured`: the a-priori
        allowance of a bare ``ExactFisher`` missed a saturated ``tanh`` by up to 1700
        half-widths). The exact methods then read it as they read :meth:`exact`'s."""
        if (ex.batch, ex.d, ex.m) != (self.batch, self.d, self.m):
            raise InvalidInputError(
                f"the exact quantities are for batch {ex.batch}, d = {ex.d}, m = {ex.m}; this "
                f"Linearization has batch {self.batch}, d = {self.d}, m = {self.m}")
        self._check_unchanged()
        if ex.zero_cols is None:  # (none recorded: every column computed as 0 is one)
            ex = dataclasses.replace(ex, zero_cols=ex.diag == 0)
        self._prepare_oracle()
        self._exact, self._oracle_part = self._oracle_measured(ex), None

    def _prepare_oracle(self) -> None:
        """What the float64 oracle needs before it runs on this batch (all of it or some rows):
        its JVPs checked against the reverse mode here, and below float64 the float64 copy's
        function checked to be the working dtype's (once)."""
        self.enc.confirm()
        if self.enc.x.dtype != torch.float64:
            self._float64_encoder()

    def _has_exact(self, spectrum: bool) -> bool:
        return self._exact is not None and (not spectrum or self._exact.eigvals is not None)

    @ieee_fp32_method
    def exact_fast(self) -> FastExactFisher:
        """``diag(J^T J)`` and the trace from ``min(m, d)`` one-hot products of this batch's
        backend (working dtype, float64 accumulation, a measured rounding allowance), computed
        at most once: the fast exact route (``estimator="exact-fast"``, and ``auto``'s exact
        route for FSInfo_diag and dFIL). See :mod:`fsinfo_fast.estimators.exact_fast`. The
        columns the working dtype rounds to 0 (:meth:`_lost`, at most :data:`LOST_MAX` a
        sample) take their float64 entries (``info["exact_fast_lost_columns"]``): they were
        0 there, and a checked one made the allowance infinite."""
        self._check_unchanged()
        if self._exact_fast is None:
            check, known = None, None
            if self.enc.x.dtype != torch.float64:
                from .engine import TorchFuncProducts

                check = TorchFuncProducts(self._float64_encoder(),
                                          memory_budget=self.memory_budget)
                live = self.enc.live
                found = self._lost() if live is not None and not bool(live.all()) else None
                if found is not None:
                    _, lost, diag, over = found
                    mask = lost & ~over[:, None].to(lost.device)
                    known = (mask, diag) if bool(mask.any()) else None
            # (the bar's total: exact_fast_fisher's, once it knows the live columns)
            with meter(self.progress, "exact diagonal (one-hot products)"):
                self._exact_fast = exact_fast_fisher(self.products, check_products=check,
                                                     seed=self.seed,
                                                     memory_budget=self.memory_budget,
                                                     live=self.enc.live, known=known)
        return self._exact_fast

    def _dominant(self) -> Tensor | None:
        """The few input dimensions that carry most of ``J``, computed exactly by the
        Rademacher trace (:func:`~.estimators.hutchinson.dominant_columns`), chosen once per
        batch from one VJP of a Gaussian cotangent drawn per sample id (stream
        :data:`DOMINANT_STREAM`, independent of every estimator's probes): a sample's choice,
        and so its result, does not depend on how the samples are batched."""
        if self._dominant_sel is None:
            p = self.products
            ids = sample_ids_for(p, self.sample_ids)
            u = draw_probes(p.m, seed=self.seed, sample_ids=ids, count=1, kind="gaussian",
                            dtype=p.dtype, device=p.device, stream=DOMINANT_STREAM)
            self._dominant_sel = (dominant_columns(p.vjp(u)[:, 0]),)
            self._dominant_unbilled = 1
        return self._dominant_sel[0]

    def _dominant_passes(self) -> int:
        """The products :meth:`_dominant` spent and no result has counted yet (then 0)."""
        n, self._dominant_unbilled = self._dominant_unbilled, 0
        return n

    def _exact_n(self, spectrum: bool = False) -> int:
        """Products per sample of the exact route: ``min(m, d)`` (the oracle, for the spectrum),
        fewer on the fast route where input dimensions do not reach the output
        (:func:`~.estimators.exact_fast.exact_products`)."""
        if spectrum:
            return min(self.m, self.d)
        return exact_products(self.enc.live, self.d, self.m)

    def _exact_n_text(self, n: int) -> str:
        if n == min(self.m, self.d):
            return f"min(m, d) = {n}"
        return f"{n} (the {n - 1} input dimensions that reach the output, +1 check)"

    def _exact_route(self, estimator: str, spectrum: bool, why: str):
        """The exact quantities a switch to the exact route reads, and the reason to record:
        the oracle when asked for (or for the spectrum) or already computed, else the fast
        exact route."""
        if estimator == "exact" or spectrum:
            return self.exact(spectrum=spectrum), why
        if self._has_exact(False):
            if estimator == "exact-fast":
                return self.exact_fast(), why
            return self._exact, f"{why}; the float64 oracle (already computed) was used"
        fx = self.exact_fast()
        if estimator == "auto":
            why = (f"{why}; the fast exact route was used ({fx.passes} one-hot "
                   f"{'JVPs' if fx.side == 'columns' else 'VJPs'} per sample in "
                   f"{fx.info.get('exact_fast_dtype')} on backend {fx.info.get('backend')!r}, "
                   "float64 accumulation)")
        return fx, why

    def _exact_unavailable(self, attempt: bool = False, confirm: bool = True,
                           prime: bool = False) -> str | None:
        """Why the exact routes (the oracle and the fast route's rounding check, both on a
        float64 copy of the encoder) cannot run here, or None. A plain callable is tried in
        float64 once (``auto`` then stays randomized and says why). An ``nn.Module`` is cast,
        and its copy prepared only where a route is about to need it (``attempt``: ``auto``
        switching to an exact route; preparing it on every call would cost a float64 forward
        and its checks where the randomized route serves): a copy that fails its own checks
        (a forward computed partly in float32, whose float64 modes then disagree beyond float64
        rounding) makes the exact routes unavailable, recorded like a callable's, instead of
        failing a call the working dtype serves. A copy computing another function than the
        working dtype's still raises (:func:`~fsinfo_fast.encoder.check_same_function`: the
        metric itself is ambiguous there). ``confirm=False``: the working dtype's deferred
        forward-/reverse-mode check is left to the routes that need it (the rounding check's
        float64 VJP does not); ``prime``: see :meth:`_prepare64`."""
        float64 = self.enc.x.dtype == torch.float64
        if self._no_exact is None:
            self._no_exact = ""
            if not float64 and not isinstance(self.encoder, nn.Module):
                self.enc.confirm()  # the working dtype's own check is no float64 matter
                try:
                    self._float64_encoder()
                except EncoderError as err:
                    self._no_exact = ("the exact routes run the encoder in float64, which this "
                                      f"callable cannot ({err})")
        if attempt and not self._no_exact and not float64 and self._enc64 is None:
            if confirm:
                self.enc.confirm()
            try:
                enc64 = self._prepare64(prime)
            except EncoderError as err:
                self._no_exact = ("the exact routes run a float64 copy of the encoder, which "
                                  f"fails its checks ({err})")
                self._replan = True
            else:  # the same function (raises where it is not); the copy just prepared (a
                # second preparation cost a weight refresh and a float64 forward per batch)
                self._float64_encoder(confirm, enc64=enc64)
        return self._no_exact or None

    def _auto_without_exact(self, estimator: str) -> str:
        """``auto`` is ``randomized`` where the exact routes cannot run (a callable that does
        not run in float64): no switch to them, no cap at their cost; every result says why
        (``info["exact_unavailable"]``)."""
        if estimator == "auto" and self._exact_unavailable() is not None:
            return "randomized"
        return estimator

    def _replanned(self, estimator: str) -> bool:
        """True (once) where ``auto`` has just found the exact routes unavailable (a module's
        float64 copy failed its checks when a switch first needed it): the request is then
        planned again from the start as ``auto`` plans it without them (:meth:`_auto_without_exact`:
        randomized, its own probe cap, no switch), reusing the probes held, rather than kept
        within the cap and the early stop of a switch that cannot happen."""
        if estimator != "auto" or not self._replan:
            return False
        self._replan = False
        return True

    def _prepare64(self, prime: bool = False) -> PreparedEncoder:
        """The encoder prepared in float64 at this batch, its own checks run (validated once
        per encoder and shape: a failure raises again, a pass is cached by ``prepare``).
        ``prime`` (the rounding check, whose float64 VJPs come next): its output from the
        forward that builds torch.func's pullback, kept for those VJPs
        (:meth:`_check_products_for`), rather than from a forward of its own (one float64
        forward per batch less)."""
        from .engine import TorchFuncProducts

        # (this batch's value-dependent checks ran at construction, in the working dtype)
        try:
            enc64 = prepare(self.encoder, self.x, dtype=torch.float64, check_interaction=0,
                            cache=True, recheck=False)
        except EncoderError:
            raise
        except Exception as err:  # noqa: BLE001  (the working dtype ran: the copy is the
            # matter, e.g. a bit view of a .half() that the copy computes in float64)
            raise EncoderError(f"its float64 copy cannot run ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:300]})") from err
        if prime and enc64._y is None:
            p64 = TorchFuncProducts(enc64, memory_budget=self.memory_budget)
            try:
                y = p64.primal()
            except Exception:  # noqa: BLE001  (the forward below says what fails; the VJPs'
                pass  # own failure is recorded by the check: rounding_unmeasured)
            else:
                if bool(torch.isfinite(y).all()):  # (else .y raises its error)
                    enc64._y = y.detach()
                    self._p64 = p64
        if enc64.y.dtype != torch.float64:  # (its checks then ran at float32's tolerance)
            raise EncoderError(
                f"the encoder returns {enc64.y.dtype} for a float64 input: it computes in a "
                "lower precision there (an x.float() inside), so its float64 copy gives no "
                "float64 products")
        return enc64

    def _float64_encoder(self, confirm: bool = True,
                         enc64: PreparedEncoder | None = None) -> PreparedEncoder:
        """The encoder prepared in float64 at this batch (cached; ``enc64``: prepared already
        by :meth:`_prepare64`); ``confirm``: run the working dtype's deferred forward-/reverse-
        mode check first (the exact routes' JVPs; the rounding check's float64 VJP does not
        need it)."""
        if confirm:
            self.enc.confirm()  # the torch.func routes' forward against reverse mode
        if self._enc64 is None:
            if enc64 is None:
                enc64 = self._prepare64()
            try:
                if not self._same_function_checked:  # (an _exact_part sub-batch: its batch's)
                    check_same_function(self.enc, enc64)
            except EncoderError:
                self._p64 = None  # (a primed pullback: no check will use it)
                raise
            self._enc64 = enc64
        return self._enc64

    def _lost(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """The input dimensions whose column of ``J`` is 0 in the working dtype but not in
        float64 (computed once per batch): products that underflow, or a saturated
        activation whose derivative rounds to 0 (autograd's ``1 - tanh^2`` in float32 past
        ``|z| = 9``). Every float32 route takes such a column for a dead one. ``None`` for a
        float64 batch (:meth:`_lost_fixed` asks only where the validation's VJP
        :attr:`~fsinfo_fast.encoder.PreparedEncoder.live` has zeros, or for a floorless
        ``-inf``: the common case pays nothing). One float64 VJP of a seeded Gaussian
        cotangent (stream :data:`DEAD_STREAM`; its square is 0 exactly where the oracle's
        diagonal is) and one in the working dtype of the same cotangent times ``2^40`` (0 there:
        every product of ordinary size gives 0; a column that underflows for some probes only
        is counted by the routes, not lost) give ``(zero64 [B, d] bool: the columns 0 in
        float64 too, lost [B, d] bool, diag [B, d], over [B] bool)`` with ``diag`` the float64
        ``(J^T J)_kk`` of the lost columns (0 elsewhere) from one float64 one-hot JVP per lost
        column of each sample (as many per sample as the one that has most), ``over`` the
        samples with more than :data:`LOST_MAX` (each sample's count, not the batch's union:
        two samples with 200 each were refused together and served alone), whose ``diag``
        rows are 0 (not computed). The float64 copy must be available
        (:meth:`_exact_unavailable`)."""
        if self._lost_cache is None:
            self._lost_cache = (self._find_lost(),)
        return self._lost_cache[0]

    def _check_products_for(self, n: int, count: int, stream: int):
        """The rounding checks' products ``(working dtype, float64 torch.func on the float64
        copy)``, the batch's sample ids and ``count`` seeded float64 Gaussian vectors of size
        ``n`` (``[B, count, n]``) from ``stream``."""
        from .engine import TorchFuncProducts

        p = self.products
        ids = sample_ids_for(p, self.sample_ids)
        enc64 = self._float64_encoder(confirm=False)
        p64 = self._p64 if self._p64 is not None and self._p64.enc is enc64 else \
            TorchFuncProducts(enc64, memory_budget=self.memory_budget)
        v = draw_probes(n, seed=self.seed, sample_ids=ids, count=count, kind="gaussian",
                        dtype=torch.float64, device=p64.device, stream=stream)
        return p, p64, ids, v

    @torch.no_grad()
    def _pair(self) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple | None]:
        """Seeded Gaussian cotangents' VJPs in float64 and through this batch's product
        backend in the working dtype, ``(g64 [B, c, d] float64, g [B, c, d] float64, lost
        [B, d] bool, partial [B, d] bool, stats)`` (computed once per batch; the float64 copy
        must be available, :meth:`_exact_unavailable`), ``c =`` :func:`pair_count` cotangents drawn
        from stream :data:`DEAD_STREAM`. A column 0 in a working-dtype VJP but not in the
        float64 one takes the VJP of the cotangent times ``2^40``, divided back (entries
        near the subnormal range). Where a column is 0 there (or in the validation's VJP)
        but not in float64, :data:`LOST_CONFIRM` more scaled cotangents (stream
        :data:`LOST_STREAM`) decide: ``lost`` where every product gives 0 (:meth:`_lost`
        computes it exactly), ``partial`` where some do and some do not (a cancellation to
        exactly 0 for some cotangents: the routes count it from the others); for those the
        same cotangents' VJPs run in float64 too, and ``stats = (s32 [B, d], s64 [B, d],
        n)`` holds the partial columns' sums of squares over the ``n`` paired products
        (``None`` without any). :meth:`_lost` and :meth:`_rounding_measured` read it."""
        if self._pair_cache is None:
            p, p64, ids, u = self._check_products_for(self.m, pair_count(self.d), DEAD_STREAM)
            g64, g0, g = self._paired_vjps(p, p64, u)
            # a sample whose every working-dtype product is 0 where float64's are not: its
            # whole Jacobian underflows (entries near 1e-48 in float32), and the routes' own
            # products see nothing of it (dFIL 0 with a zero half-width, helper 116). The
            # scaled products (_paired_vjps' g) see it, which keeps a lone underflowing column among
            # ordinary ones (a negligible share) off the lost list. (Not an energy shortfall:
            # a saturated softmax loses energy to rounding with nonzero products, which the
            # lost columns' float64 terms would then count twice, helper 119.)
            under = ((g0 == 0).all(dim=2).all(dim=1)
                     & (g64 != 0).any(dim=2).any(dim=1))[:, None]  # [B, 1]
            nz64 = (g64 != 0).any(dim=1)
            lost = (g == 0).all(dim=1) & nz64
            partial = torch.zeros_like(lost)
            stats = None
            live = self.enc.live
            # a column 0 in some working-dtype products only, by cancellation (a saturated
            # softmax's argmax input: 80% of Gaussian cotangents give exactly 0 in float32):
            # seen as a 0 here or in the validation's VJP where float64's is not
            suspect = (g == 0).any(dim=1) & nz64
            if live is not None:
                suspect |= ~live.to(suspect.device) & nz64
            if bool(suspect.any()):
                # lost only where LOST_CONFIRM more cotangents (scaled: not an underflow) give 0
                # too; some 0 and some not: the routes count it from a few products only
                v = draw_probes(p64.m, seed=self.seed, sample_ids=ids, count=LOST_CONFIRM,
                                kind="gaussian", dtype=torch.float64, device=p64.device,
                                stream=LOST_STREAM)
                more = p.vjp((v * _LOST_SCALE).to(p.dtype).to(p.device)).to(g64) / _LOST_SCALE
                self._check_products += LOST_CONFIRM
                lost &= (more == 0).all(dim=1)
                partial = suspect & (more == 0).any(dim=1) & ~(more == 0).all(dim=1)
                partial |= suspect & (g == 0).any(dim=1) & ~lost
                if bool(partial.any()):  # their products' mean square against float64's
                    more64 = p64.vjp(v)
                    s32 = g.square().sum(dim=1) + more.square().sum(dim=1)
                    s64 = g64.square().sum(dim=1) + more64.square().sum(dim=1)
                    zero = torch.zeros_like(s32)
                    stats = (torch.where(partial, s32, zero), torch.where(partial, s64, zero),
                             u.shape[1] + LOST_CONFIRM)
            if bool(under.any()):  # every float64-nonzero column of such a sample: lost
                lost |= under & nz64
                partial &= ~lost
            self._pair_cache = (g64, g, lost, partial, stats)
            self._p64 = None  # (its pullback holds the float64 forward's saved tensors)
        return self._pair_cache

    @torch.no_grad()
    def _pair_more(self) -> tuple[Tensor, Tensor]:
        """:data:`PAIR_ESCALATE` minus :meth:`_pair`'s cotangents more, from stream
        :data:`ROUNDING_STREAM`: ``(g64 [B, c', d] float64, g [B, c', d] float64)``, their
        VJPs as :meth:`_pair` takes them (an entry 0 in the working dtype only: the VJP of the
        cotangent times ``2^40``, divided back). :meth:`_rounding_measured` reads them for the
        samples whose first cotangents show rounding far beyond the floor (computed once per
        batch)."""
        if self._pair_more_cache is None:
            count = PAIR_ESCALATE - self._pair()[0].shape[1]
            p, p64, _, u = self._check_products_for(self.m, count, ROUNDING_STREAM)
            g64, _, g = self._paired_vjps(p, p64, u)
            self._pair_more_cache = (g64, g)
        return self._pair_more_cache

    def _paired_vjps(self, p, p64, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The cotangents ``u``'s VJPs in float64 (``p64``) and through the working-dtype
        products ``p``: ``(g64, g0, g)`` float64, ``g0`` the working dtype's as computed and
        ``g`` with its entries 0 where float64's are not taken from the VJP of ``u`` times
        ``2^40``, divided back (entries near the subnormal range); counts the products."""
        g64 = p64.vjp(u)
        g0 = p.vjp(u.to(p.dtype).to(p.device)).to(g64)
        self._check_products += u.shape[1]
        g = g0
        zero = (g0 == 0) & (g64 != 0)
        if bool(zero.any()):
            big = p.vjp((u * _LOST_SCALE).to(p.dtype).to(p.device)).to(g64)
            self._check_products += u.shape[1]
            g = torch.where(zero, big / _LOST_SCALE, g0)
        return g64, g0, g

    @torch.no_grad()
    def _jvp_pair(self, count: int) -> tuple[Tensor, Tensor]:
        """``(float64 ||J v||^2, working-dtype ||J' v||^2)``, ``[B, count]`` each, for
        ``count`` seeded Gaussian input vectors ``v`` (stream :data:`JVP_STREAM`): the rounding
        check of the dFIL methods that take JVPs (computed once per batch and count)."""
        if count not in self._jvp_pair_cache:
            p, p64, _, v = self._check_products_for(self.d, count, JVP_STREAM)
            n64 = square_sum64(p64.jvp(v))
            n = square_sum64(p.jvp(v.to(p.dtype).to(p.device)))
            self._check_products += v.shape[1]
            self._jvp_pair_cache[count] = (n64, n.to(n64.device))
        return self._jvp_pair_cache[count]

    @torch.no_grad()
    def _modes(self) -> tuple | str:
        """The float64 copy's forward- against reverse-mode check of every sample, its shared
        part (computed once per batch): ``(u, g, z, R, base, zero)`` with the rounding check's
        seeded Gaussian cotangents ``u`` (``[B, c, m]``, :meth:`_pair`; one where ``d >= 64``)
        and their float64 VJPs ``g = J^T u`` (the rounding check's where it ran), one seeded
        Gaussian input vector ``z`` (``[B, 1, d]``, stream :data:`MODES_STREAM`), ``R`` the
        columns' norms as ``g`` estimates them (``[B, d]``, the root mean square over the
        cotangents, scaled against underflow), ``base`` the share :meth:`_modes_share`
        measures with every column at its own scale (``[B]``: the floorless FSInfo's
        weighting), and ``zero``: for the columns reverse mode gives as exactly 0 (every
        cotangent), ``(||J v0||^2 [B], sum z_k^2 over them [B])`` with ``v0`` = ``z`` on them
        and 0 elsewhere, its JVP in forward mode (one more float64 JVP, only where such
        columns are; ``None`` without): reverse mode's exact 0 against forward mode's value,
        at any scale (a column forward mode sees at ``5e-19`` next to columns of ``1e-3``,
        behind a saturated softmax, is invisible in the weighted share); or why the check
        cannot run (no float64 copy, no float64 VJP or JVP).

        The validation's forward-/reverse-mode check (:func:`~fsinfo_fast.encoder.
        _check_adjoint`) is over the batch in the working dtype and reads a disagreement far
        below the output's size as rounding; a sample whose Jacobian sits below float64's
        resolution of its output (a saturated softmax: ``p_max`` rounds to 1) passes it, while
        the two modes' Jacobians differ by up to 58% per entry there (neither the true one):
        every route, the oracle included, then measures one arbitrary Jacobian."""
        if self._modes_cache is None:
            try:
                why = self._exact_unavailable(attempt=True, confirm=False)
            except EncoderError as err:  # (another function in float64: the exact routes raise)
                why = f"the float64 copy cannot serve ({err})"
            if why is None:
                try:
                    _, p64, ids, u = self._check_products_for(self.m, pair_count(self.d),
                                                              DEAD_STREAM)
                    # (the rounding check's VJPs where it ran: the same cotangents, the same
                    # float64 products)
                    g = self._pair_cache[0] if self._pair_cache is not None else p64.vjp(u)
                    z = draw_probes(self.d, seed=self.seed, sample_ids=ids, count=1,
                                    kind="gaussian", dtype=torch.float64, device=p64.device,
                                    stream=MODES_STREAM)
                    R = _rms(g, 1)  # (D = R^2 underflows below 1e-162)
                    self._modes_cache = (u, g, z, R, None, None, None)
                    base, col = self._modes_share("fsinfo", torch.zeros_like(R[:, 0]))
                    dead = R == 0
                    zero = None
                    if bool(dead.any()):
                        v0 = z * dead.unsqueeze(1)
                        zero = (square_sum64(self._p64_fresh().jvp(v0)).sum(dim=1),
                                v0.square().sum(dim=(1, 2)))
                except torch.OutOfMemoryError:
                    raise
                except (EncoderError, RuntimeError, NotImplementedError) as err:
                    self._modes_cache = None
                    why = (f"the float64 forward-/reverse-mode check cannot run "
                           f"({type(err).__name__}: {' '.join(str(err).split())[:200]})")
                else:
                    self._modes_cache = (u, g, z, R, base, zero, col)
            if why is not None:
                self._modes_cache = why
        return self._modes_cache

    def _p64_fresh(self):
        """torch.func products of the float64 copy, made afresh (:meth:`_prepare64`'s primed
        ones hold the float64 forward's saved tensors)."""
        from .engine import TorchFuncProducts

        return TorchFuncProducts(self._float64_encoder(confirm=False),
                                 memory_budget=self.memory_budget)

    def _modes_share(self, kind: str, a: Tensor) -> tuple[Tensor, Tensor]:
        r"""``([B], [B])`` float64: how far the float64 forward and reverse modes disagree on
        ``u^T J v`` (one float64 JVP), as a share of the terms' size, for an input vector ``v =
        z w`` weighted as the metric weighs the columns (``R_k`` the columns' norms,
        :meth:`_modes`): FSInfo (``kind="fsinfo"``) ``w_k = R_k / (R_k^2 + a)``, ``a = c
        sigma^2`` per sample (``c`` the floor or the prior's precision): every column at its
        own scale, those far below ``a`` left out (a disagreement there moves no term of the
        log); dFIL ``w_k = R_k``: the columns as they weigh in the trace; ``"flat"``: ``w_k =
        1``. The share is ``max |u^T (J v) - (J^T
        u)^T v| / (sum |u_i (J v)_i| + sum |(J^T u)_k| (|v_k| + |z_k| r_k))`` over the
        cotangents (scale-free in ``v``), ``r_k = a / ((R_k^2 + a) R_k)`` (times ``w``'s
        normalisation) the floor's part of a column: its term in the denominator at its own
        scale while its part in the disagreement is weighted by ``R_k^2 / (R_k^2 + a)``, as a
        relative change of ``D_k`` moves the log (a column far below the floor counts in the
        denominator only); 0 where ``a`` is not finite (a noise scale of ``inf``: every column
        below the floor) or the denominator overflows (every column far below it), ``inf``
        where a product is not finite. A sample whose ``g`` is 0 everywhere takes ``w = 1``;
        the columns 0 in ``g`` take weight 0 here (:meth:`_modes`' ``zero`` checks them).
        Where an op has no forward-mode rule the JVP is the VJP's transpose (double backward,
        :class:`~fsinfo_fast.engine.TorchFuncProducts`): a weaker check, recorded by
        :meth:`_modes_flagged`. Second: the relative error per column this disagreement reads
        as, ``max |u^T (J v) - (J^T u)^T v| / sqrt(sum_k v_k^2 R_k^2)`` (for Gaussian ``u`` the
        disagreement's spread where column ``k`` is off by ``e_k R_k`` is ``sqrt(sum_k v_k^2
        e_k^2 R_k^2)``: this reads the ``e_k`` weighted by ``v_k^2 R_k^2``; the oracle's
        rounding allowance, :meth:`_oracle_measured`)."""
        u, g, z, R, *_ = self._modes_cache
        p64 = self._p64_fresh()
        a = a.to(R).reshape(-1, 1)
        w, rest, scale = _column_weights(R, kind, a)
        v = z * w.unsqueeze(1)  # [B, 1, d]
        jv = p64.jvp(v)  # [B, 1, m]
        self._modes_forward = p64.forward_mode
        x = torch.einsum("bim,bjm->bij", u, jv)
        y = torch.einsum("bid,bjd->bij", g, v)
        own = (torch.einsum("bim,bjm->bij", u.abs(), jv.abs())
               + torch.einsum("bid,bjd->bij", g.abs(), v.abs()))
        finite = torch.isfinite(x) & torch.isfinite(y) & torch.isfinite(own)
        # each column's term in the denominator at its own scale (R_k w_k + the floor's share
        # a / ((R_k^2 + a) R_k) = 1 / R_k, before the normalisation), its part in the
        # disagreement at its weight in the log, R_k^2 / (R_k^2 + a): a column far below the
        # floor counts in the denominator, not in the disagreement
        own = own + torch.einsum("bid,bjd->bij", g.abs(), (z * rest.unsqueeze(1)).abs())
        share = torch.where(own > 0, (x - y).abs() / own, torch.zeros_like(own))
        share = torch.where(finite, share, math.inf)
        share = torch.where(torch.isposinf(own) & finite, 0.0, share).flatten(1).amax(dim=1)
        share = torch.where(torch.isfinite(a[:, 0]), share, torch.zeros_like(share))
        gap = torch.where(finite, (x - y).abs(), math.inf).flatten(1).amax(dim=1)
        return share, _per_column(gap, z, scale)

    def _modes_weighted(self, kind: str, a: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_modes_share` at a weighting (``kind``, ``a`` per sample), measured once per
        weighting and batch (a float64 JVP each)."""
        key = (kind, a.cpu().numpy().tobytes())
        if key not in self._modes_shares:
            self._modes_shares[key] = self._modes_share(kind, a)
        return self._modes_shares[key]

    def _modes_zero(self, kind: str, a: Tensor) -> Tensor:
        """``[B]`` float64: the columns reverse mode gives as exactly 0 (:meth:`_modes`'
        ``zero``) as forward mode sees them, against the metric's scale: FSInfo their mean
        squared norm over ``a`` (``inf`` where ``a`` is 0 and forward mode sees any: reverse
        mode's ``-inf`` column; 0 where ``a`` is not finite); dFIL their share of the trace
        (their mean squared norm times their count over ``sum_k R_k^2``). 0 where there are
        none."""
        _, _, _, R, _, zero, _ = self._modes_cache
        if zero is None:
            return torch.zeros_like(R[:, 0])
        fwd, zz = zero
        mean = fwd / torch.where(zz > 0, zz, 1.0)
        if kind == "dfil":
            n = (R == 0).sum(dim=1).to(R)
            return torch.where(fwd > 0, n * mean / R.square().sum(dim=1), 0.0)
        a = a.to(R)
        out = torch.where(fwd > 0, mean / a, 0.0)
        return torch.where(torch.isfinite(a), out, 0.0)

    def _float64_allowed(self, out: MetricResult | SigmaResult, c: float,
                         tol: tuple) -> MetricResult | SigmaResult:
        """``out`` (a public method's FSInfo_diag or dFIL) with the float64 Jacobian's own
        rounding (:meth:`_float64_rounding`) in the interval of its samples that no float64
        oracle served (the oracle's interval holds it already): every other route checks its
        products against float64 ones, which share that rounding (the fast exact route in
        float64 on a saturated ``tanh``: 3e5-1e6 half-widths off the truth, helper 100);
        ``info["float64_rounding"]`` per sample, ``converged`` False where the wider interval
        misses the tolerance ``tol = (atol, rtol)``."""
        if (not isinstance(out, MetricResult) or out.metric not in ("fsinfo_diag", "dfil")
                or out.estimator == "exact"):
            return out
        rows = torch.ones_like(out.value, dtype=torch.bool)
        took = dict(zip(out.info.get("exact_samples", []),
                        out.info.get("exact_samples_estimator", []), strict=False))
        for i, est in took.items():
            rows[i] = est != "exact"
        rows[out.info.get("exact_fast_oracle_samples", [])] = False
        if not bool(rows.any()):
            return out
        sig = out.sigma.to(out.value).reshape(-1)
        extra = self._float64_rounding(out.metric, sig, c, out.value)
        if out.estimator == "exact-fast" and self._exact_fast is not None:
            own = self._own_rounding(out.metric, sig, c, out.value, self._exact_fast.diag)
            if own is not None:
                extra = own if extra is None else torch.maximum(extra.to(own), own)
        if extra is None:
            return out
        extra = torch.where(rows & ~torch.isneginf(out.value), extra.to(out.value), 0.0)
        if not bool((extra > 0).any()):
            return out
        hw = out.ci_halfwidth + extra
        conv = out.converged & (tolerance_met(out.value, hw, *tol) | (extra == 0))
        info = {**out.info, "float64_rounding": extra.tolist()}
        return dataclasses.replace(out, ci_halfwidth=hw,
                                   bias_bound=out.bias_bound + torch.where(
                                       torch.isfinite(extra), extra, 0.0),
                                   converged=conv, info=info)

    def _own_rounding(self, metric: str, s: Tensor, c: float, value: Tensor,
                      diag: Tensor) -> Tensor | None:
        """``[B]``: :meth:`_float64_rounding` from each column's own saturation reading
        (:meth:`_saturation_cols`) against its norm in ``diag`` (``[B, d]``, the fast exact
        route's), as the oracle reads it (:meth:`_oracle_measured`): column ``k`` within a
        relative ``e_k = SAFETY |dJ_k| / ||J_k||`` of its computed norm, ``D_k`` within ``[D_k
        (1 - e_k)^2, D_k (1 + e_k)^2]``, each FSInfo_diag term moving by at most ``log(1 +
        D_k ((1 + e_k)^2 - 1) / (D_k + c s^2))`` up (``-log(1 - D_k (1 - (1 - e_k)^2) / (D_k
        + c s^2))`` down), the trace by the sum of those ranges. The scalar readings are means
        over the columns: on the fast exact route a column far off its neighbours missed the
        truth by up to 8 half-widths (helper 105). None where no saturating op moves the
        columns; ``inf`` where the reading cannot run."""
        sat = self._saturation()
        if not isinstance(sat, Tensor) or not bool((sat != 0).any()):
            return None
        own = self._own_cols(diag)
        if own is None:
            return torch.full_like(value, math.inf)
        D = diag.to(torch.float64)
        e = EXACT_SAFETY * own
        grow = (1 + e).square() - 1
        shrink = 1 - (1 - e).clamp_min(0).square()
        if metric == "dfil":
            tr = D.sum(dim=1)
            eps = torch.maximum((D * grow).sum(dim=1), (D * shrink).sum(dim=1)) / tr
            eps = torch.where(tr > 0, eps, 0.0).to(value)
            return torch.where(eps < 1, value.abs() * eps / (1 - eps).clamp_min(1e-300),
                               math.inf)
        base = D + (c * s.to(D).square()).unsqueeze(1)
        rho = torch.where(base > 0, D / base, 0.0)
        up = torch.log1p(rho * grow).sum(dim=1)
        down = rho * shrink
        dn = torch.where(down < 1, -torch.log1p(-down.clamp_max(1 - 1e-16)), math.inf).sum(dim=1)
        return (torch.maximum(up, dn) / (2 * self.d)).to(value)

    def _zero_sigma_checked(self, out: SigmaResult) -> SigmaResult:
        """A randomized ``sigma*`` of exactly 0 with the interval ``[0, 0]`` (every column of
        the sample computed as 0: FSInfo at its floor's asymptote, no noise needed) claims that
        only where those columns are structural zeros; where the saturation reading moves them
        (a ``tanh`` rounded to 1: the truth needs a tiny positive noise) the upper end is
        ``inf`` and ``converged`` False (``info["sigma_zero_unconfirmed"]``)."""
        cand = (out.sigma == 0) & (out.ci_high == 0)
        if out.estimator == "exact" or not bool(cand.any()):
            return out
        got = self._modes()
        if isinstance(got, str):
            return out
        sat = self._saturation()
        zero64 = (got[1] == 0).all(dim=1)
        moved = (torch.ones_like(zero64) if isinstance(sat, str)
                 else (sat != 0).any(dim=1).to(zero64.device))
        rows = cand & (zero64 & moved).any(dim=1).to(cand.device)
        if not bool(rows.any()):
            return out
        why = (f"sample(s) {rows.nonzero().flatten().tolist()}: sigma* = 0 from columns "
               "computed as 0 that a saturated activation's rounding moves (not structural "
               "zeros): the true sigma* is positive, its upper end not bounded here; "
               "estimator='exact' bounds it")
        return dataclasses.replace(
            out, ci_high=torch.where(rows, math.inf, out.ci_high),
            converged=out.converged & ~rows,
            info={**out.info, "sigma_zero_unconfirmed": why})

    def _float64_rounding(self, metric: str, s: Tensor, c: float,
                          value: Tensor) -> Tensor | None:
        """``[B]``: how far the float64 Jacobian's own rounding can move FSInfo_diag (at noise
        ``s`` and floor ``c``) or dFIL (``value``) beyond the a-priori :data:`~fsinfo_fast.
        reference.oracle.AD_ULPS` unit roundoffs the routes allow, from the readings the
        oracle takes (:meth:`_oracle_measured`, :meth:`_oracle_weighted`): ``E``,
        :data:`~fsinfo_fast.estimators.exact_fast.SAFETY` times the larger of the
        forward-/reverse-mode check's and the saturation reading's relative error per column,
        each column at its own scale; with a floor ``t``, the same read at the result's
        weighting (each column's weight in the log times its error). A term of FSInfo_diag
        then lies within ``[D_k / (1 + J), D_k / (1 - J)]``, ``J = E (2 + E)`` (``inf`` for ``J
        >= 1``: no claim), and with a floor below ``D_k (1 + e_k)^2`` too, ``e_k <= t /
        rho_k`` (as the oracle's brackets), which bounds FSInfo's move; the trace within a
        relative ``e / (1 - e)``, ``e = F (2 + F)``, ``F`` read as the trace weighs the
        columns. Only where a saturating op's reading moves the columns or the scale-free mode
        check exceeds :data:`MODES_SCREEN` (elsewhere the modes agree to float64 rounding,
        which the routes' own float64 floor holds). Columns computed as 0 that
        the saturation reading moves add their bound (``(SAFETY max|change|)^2``, as the
        oracle's ``col_floor``). None where nothing exceeds the a-priori allowance (or the
        check cannot run: ``info["modes_unchecked"]`` says so); ``inf`` where the saturation
        reading cannot run."""
        got = self._modes()
        if isinstance(got, str):
            return None
        sat = self._saturation()
        if isinstance(sat, str):
            return torch.full_like(value, math.inf)
        floor = reference.oracle.AD_ULPS * reference.oracle.U64
        moved = bool((sat != 0).any())
        loud = bool((got[4] > MODES_SCREEN).any())
        if not (moved or loud):  # (the modes agree to float64 rounding: the routes' own
            return None  # float64 floor holds it; readings at that level move with the batch)
        zero = torch.zeros_like(got[3][:, 0])
        kind = "fsinfo" if metric == "fsinfo_diag" else "dfil"

        def weighted(k: str, a: Tensor) -> Tensor:  # (the scale-free reading bounds it)
            return self._modes_weighted(k, a)[1] if loud else got[6]

        col = EXACT_SAFETY * got[6]
        try:
            if kind == "dfil":
                col = EXACT_SAFETY * weighted("dfil", zero)
            t = (EXACT_SAFETY * weighted("fsinfo", (c * s.square()).to(got[3]))
                 if kind == "fsinfo" and c > 0 else None)
        except torch.OutOfMemoryError:
            raise
        except (EncoderError, RuntimeError, NotImplementedError):
            return torch.full_like(value, math.inf)
        if moved:
            col = torch.maximum(col, EXACT_SAFETY * self._saturation_col(kind, zero))
        if not moved and not bool((col > floor).any()):
            return None
        col = torch.where(col > floor, col, 0.0).to(value)
        s2 = s.square().to(value)
        if kind == "dfil":  # (as the oracle's: the trace within a relative e / (1 - e))
            e = col * (2 + col)
            out = torch.where(e < 1, value.abs() * e / (1 - e).clamp_min(1e-16), math.inf)
        else:
            # (as the oracle's brackets: D_true within [D / (1 + J), D / (1 - J)], J = E (2 +
            # E); with a floor its upper end also D (1 + e_k)^2, e_k <= t / rho_k)
            j = col * (2 + col)
            up = torch.where(j < 1, -torch.log1p(-j.clamp_max(1 - 1e-16)), math.inf)
            if t is not None:
                if moved:
                    t = torch.maximum(t, EXACT_SAFETY * self._saturation_col(
                        "fsinfo", (c * s.square()).to(got[3])))
                # (t not cut at the a-priori floor: a column 1e-44 of the floor's level whose
                # digits are gone reads t = 2e-25 and E = 2e20, helper 101)
                big = torch.minimum(t.to(value), col) * (2 + col)
                low = torch.minimum(big, j / (1 + j))
                up = torch.maximum(torch.log1p(big), -torch.log1p(-low.clamp_max(1 - 1e-16)))
            out = 0.5 * up
        if moved:  # (columns computed as 0 that the rounding moves: their own bound)
            _, g, *_ = got
            gone = ((g == 0).all(dim=1) & (sat != 0).any(dim=1)).to(value.device)
            top = (EXACT_SAFETY * sat.abs().flatten(1).amax(dim=1)).square().to(value)
            n = gone.sum(dim=1).to(value)
            if kind == "dfil":
                out = out + n * top / (s2 * self.d)
            elif c > 0:
                out = out + n * torch.log1p(top / (s2 * c)) / (2 * self.d)
        # (per sample: where neither reading stands out, the routes' own floor holds it, and
        # a batch-mate's saturation does not move this sample's interval)
        own = ((sat != 0).flatten(1).any(dim=1).to(out.device)
               | (got[4] > MODES_SCREEN).to(out.device))
        return torch.where(own, out, 0.0)

    def _modes_flagged(self, out: MetricResult | SigmaResult,
                       kind: str, c: float) -> MetricResult | SigmaResult:
        """``out`` (a public method's result) with no interval claimed for the samples whose
        float64 forward- and reverse-mode Jacobians disagree (:meth:`_modes`) beyond
        :data:`MODES_REL` of ``u^T J v``'s terms, weighted as the metric weighs the columns
        (:meth:`_modes_share`) at the result's sigma (``sigma*`` for a noise scale) and ``c``
        (the floor or the prior's precision), or on the columns reverse mode gives as exactly
        0 beyond that share of the metric's scale (:meth:`_modes_zero`): their half-width
        becomes ``inf`` (a noise scale's interval ``(0, inf)``; ``bias_bound`` kept: the
        half-width says it) and ``converged`` False, the value kept; ``info["modes_disagree"]``
        holds every sample's share and ``info["modes_why"]`` says which and why, with a
        :class:`RuntimeWarning` (``info["modes_jvp"]`` where the JVP was a double backward).
        The scale-free share (:meth:`_modes`' ``base``) screens: a result's own weighting costs
        a float64 JVP (once per weighting) and is measured only where that exceeds
        :data:`MODES_SCREEN`. Where the
        check cannot run, ``info["modes_unchecked"]`` says why."""
        got = self._modes()
        if isinstance(got, str):
            out.info["modes_unchecked"] = got
            return out
        if not self._modes_forward:
            out.info["modes_jvp"] = ("double backward (an op has no forward-mode rule): the "
                                     "check compares reverse mode with its transpose")
        if isinstance(self._sat_cache, str) and out.estimator in ("exact", "mixed"):
            out.info["saturation_unread"] = (  # (_oracle_measured: no claim)
                f"{self._sat_cache}: the oracle's rounding is not bounded (half-width inf)")
        base, zero = got[4], got[5]
        if not bool((base > MODES_SCREEN).any()) and zero is None:
            return out
        s = out.sigma.to(base).reshape(-1)
        a = c * s.square() if c > 0 else torch.zeros_like(s)
        share = torch.zeros_like(base)
        if bool((base > MODES_SCREEN).any()):
            try:
                if kind == "fsinfo" and c == 0:
                    share = base
                else:
                    share = self._modes_weighted(kind, a)[0]
            except torch.OutOfMemoryError:
                raise
            except (EncoderError, RuntimeError, NotImplementedError) as err:
                out.info["modes_unchecked"] = (
                    f"the float64 forward-/reverse-mode check at this result's weighting "
                    f"cannot run ({type(err).__name__}: {' '.join(str(err).split())[:200]})")
                return out
            share = torch.where(base > MODES_SCREEN, share, 0.0)
        share = torch.maximum(share, self._modes_zero(kind, a))
        bad = share > MODES_REL
        if not bool(bad.any()):
            return out
        idx = bad.nonzero().flatten().tolist()
        top = float(share[bad].max())
        how = ("columns reverse mode gives as exactly 0 are not 0 in forward mode" if top ==
               math.inf else f"u^T J v differs by up to {top:.2g} of its terms")
        why = (f"sample(s) {idx}: float64 forward- and reverse-mode autograd give different "
               f"Jacobians here ({how}, far above float64 rounding: the Jacobian sits below "
               "float64's resolution of what one mode cancels, e.g. a softmax whose largest "
               "probability rounds to 1, or a stationary point), so the Jacobian, and this "
               f"{out.metric}, are not determined in float64 on any route (the float64 oracle "
               "included): no interval is claimed (half-width inf, converged=False)")
        warn_user(f"{out.metric}: {why}", RuntimeWarning)
        bad = bad.to(out.converged.device)
        info = {**out.info, "modes_disagree": share.tolist(), "modes_why": why}
        conv = out.converged & ~bad
        if isinstance(out, SigmaResult):
            return dataclasses.replace(
                out, ci_low=torch.where(bad, torch.zeros_like(out.ci_low), out.ci_low),
                ci_high=torch.where(bad, torch.full_like(out.ci_high, math.inf), out.ci_high),
                converged=conv, info=info)
        inf = torch.full_like(out.ci_halfwidth, math.inf)
        return dataclasses.replace(out, ci_halfwidth=torch.where(bad, inf, out.ci_halfwidth),
                                   converged=conv, info=info)

    @torch.no_grad()
    def _find_lost(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        if self.enc.x.dtype == torch.float64:
            return None
        g64, _, lost, _, _ = self._pair()
        # (squares: 0 exactly where the oracle's diagonal is)
        nz64 = (g64.square() > 0).any(dim=1)
        lost = lost & nz64
        # each sample's own lost columns (at most LOST_MAX each, whatever its batch-mates'):
        # one float64 JVP per column of the sample that has most
        counts = lost.sum(dim=1)
        over = counts > LOST_MAX
        counts = torch.where(over, torch.zeros_like(counts), counts)
        k = int(counts.max()) if counts.numel() else 0
        diag = torch.zeros(lost.shape, dtype=torch.float64, device=lost.device)
        if k:
            from .engine import TorchFuncProducts

            order = torch.argsort((~lost).to(torch.uint8), dim=1, stable=True)[:, :k]
            idx = torch.where(torch.arange(k, device=lost.device) < counts[:, None], order,
                              torch.full_like(order, -1))
            p64 = TorchFuncProducts(self._float64_encoder(), memory_budget=self.memory_budget)
            norms = column_norms(p64, idx, torch.float64, budget=(
                self.memory_budget or default_memory_budget(lost.device)))
            bi, ji = (idx >= 0).nonzero(as_tuple=True)
            diag[bi, idx[bi, ji]] = norms[bi, ji]
        return ~nz64, lost, diag, over

    def _structural(self, zero64: Tensor) -> Tensor:
        """``[B]`` bool: some column 0 in float64 (``zero64``, ``[B, d]``) that the saturating
        activations' rounding does not move (:meth:`_saturation`): a crop, a dead input; a
        ``tanh`` rounded to 1 is not one. Where that reading cannot run, none is confirmed,
        unless the forward-/reverse-mode check cannot run either (then every such column is
        taken as structural, as the oracle takes it; ``info["modes_unchecked"]``)."""
        none = torch.zeros(zero64.shape[0], dtype=torch.bool, device=zero64.device)
        if not bool(zero64.any()):
            return none
        sat = self._saturation()
        if isinstance(sat, str):
            return zero64.any(dim=1) if isinstance(self._modes(), str) else none
        return (zero64 & ~(sat != 0).any(dim=1).to(zero64.device)).any(dim=1)

    def _zero_claims(self, r: MetricResult, floorless: bool, neg: Tensor,
                     zero64: Tensor | None = None,
                     auto: bool = False) -> tuple[Tensor, str] | None:
        """The samples (``[B]`` bool) whose result claims an exact value from columns 0 in
        float64 that are no structural zeros (:meth:`_structural`: a saturated activation's
        derivative rounded to 0, in float64 too), and why; None where there are none. A
        floorless FSInfo_diag's ``-inf`` is exact where some column is structurally 0, a log
        det's without a prior also where ``m < d``; a dFIL of ``0 +- 0`` where every column
        is (``floorless``: either of the first two). ``zero64`` (``[B, d]``): the columns 0 in
        float64 (default: the forward-/reverse-mode check's float64 VJPs, :meth:`_modes`; no
        claim is questioned where it cannot run, as the oracle's is not)."""
        if floorless:  # (an infinite half-width claims nothing; auto still seeks a bound)
            cand = neg & (torch.isfinite(r.ci_halfwidth) | auto)
            if r.metric == "fsinfo_logdet" and self.m < self.d:
                return None  # (rank J^T J <= m < d: -inf exactly)
        elif r.metric == "dfil":
            cand = (r.value == 0) & (r.ci_halfwidth == 0)
        else:
            return None
        if not bool(cand.any()):
            return None
        if zero64 is None:
            got = self._modes()
            if isinstance(got, str):
                return None
            zero64 = (got[1] == 0).all(dim=1)  # (entries 0, not squares that underflow)
        zero64 = zero64.to(cand.device)
        if floorless:
            rows = cand & ~self._structural(zero64).to(cand.device)
            what = ("a log det of -inf (no prior)" if r.metric == "fsinfo_logdet"
                    else "a floorless FSInfo_diag of -inf")
        else:
            sat = self._saturation()
            moved = (torch.ones_like(zero64) if isinstance(sat, str)
                     else (sat != 0).any(dim=1).to(zero64.device))
            rows = cand & (zero64 & moved).any(dim=1)
            what = "a dFIL of 0 +- 0"
        if not bool(rows.any()):
            return None
        return rows, (f"{int(rows.sum())} sample(s) have {what}, but their columns 0 in float64 "
                      "are not all structural zeros: a saturated activation's derivative "
                      "rounds to 0 there, and one ulp of its output moves it "
                      "(reference.saturation), so the value is not exact")

    def _lost_add(self, metric: str, s: Tensor, floor: float) -> Tensor:
        """``[B]`` float64: what the lost columns (:meth:`_lost`; 0 for a sample with more
        than :data:`LOST_MAX`) add to FSInfo_diag with a floor (each term ``log(floor)``
        becomes ``log(D_k / s^2 + floor)``) or to dFIL (``D_k / (s^2 d)``) at noise ``s``."""
        _, lost, d, _ = self._lost()
        sig = s.reshape(-1, 1).to(d)
        if metric == "dfil":
            return d.sum(dim=1) / (sig.squeeze(1) ** 2 * self.d)
        term = torch.log(d / sig**2 + floor) - math.log(floor)
        return torch.where(lost, term, torch.zeros_like(term)).sum(dim=1) / (2 * self.d)

    def _lost_fixed(self, r: MetricResult, estimator: str, s: Tensor,
                    floor: float = 0.0, prior_var: float | None = None,
                    tol: tuple = (None, None), fixed: bool = False) -> MetricResult:
        """``r`` (FSInfo_diag, the log det or dFIL from products in a working dtype below
        float64) with the columns of :meth:`_lost` put right: their float64 diagonal entries
        enter FSInfo_diag with a floor (each lost column's term ``log(floor)`` becomes
        ``log(D_k / sigma^2 + floor)``) and dFIL (``+ D_k / (sigma^2 d)``) exactly, and are
        recorded (``info["lost_columns"]``, per sample). Where they cannot be (a floorless
        FSInfo_diag of ``-inf`` whose every column is nonzero in float64, a log det, more
        than :data:`LOST_MAX` of them), ``auto`` takes the float64 oracle (where it fits; the
        reason in ``info["auto"]``; for a randomized result, the samples concerned only where
        some are not, :meth:`_exact_part`, the others' lost columns put right, at tolerance
        ``tol``; ``fixed``: a fixed probe count's, see :meth:`_exact_part`) and another route
        raises
        :class:`~fsinfo_fast.errors.PrecisionError`. A crop (a column 0 in float64 too) keeps
        its exact ``-inf``. Where no float64 copy can run, a floorless ``-inf`` stands with a
        warning and ``info["neg_inf_unconfirmed"]``."""
        if r.estimator == "exact":
            return r
        floorless = r.metric == "fsinfo_diag" and floor <= 0
        neg = torch.isneginf(r.value)
        if floorless and not bool(neg.any()):
            return r  # (every column is nonzero in the working dtype)
        # (a log det without a prior claims -inf as the floorless diagonal does: the SLQ reads
        # J = 0 as singular; a saturated tanh's J rounds to 0 in float64 too, helper 103)
        singular = (r.metric == "fsinfo_logdet" and check_prior_var(prior_var) == 0
                    and bool(neg.any()))
        live = self.enc.live
        if not floorless and not singular and live is not None and bool(live.all()):
            return r  # (no column 0 in the working dtype: nothing lost; no cost)
        if self.enc.x.dtype == torch.float64:  # (nothing is lost; a claim from zeros may be)
            got = self._zero_claims(r, floorless or singular, neg, auto=estimator == "auto")
            if got is None:
                return r
            return self._exact_for(r, estimator, s, floor, prior_var, tol, fixed, *got,
                                   floorless)
        na = self._exact_unavailable(attempt=True)
        if na is not None:
            self._replan = False  # (this result is final: nothing to plan again)
            if floorless:
                r.info["neg_inf_unconfirmed"] = na
                warn_user(f"the floorless FSInfo_diag is -inf for {int(neg.sum())} sample(s) "
                          f"from {self.enc.x.dtype} products, and {na}: a column that "
                          f"underflows in {self.enc.x.dtype} would make it finite (pass a "
                          "floor > 0)", RuntimeWarning)
            return r
        found = self._lost()
        if found is None:
            return r
        zero64, lost, diag, over = found
        n_lost = lost.sum(dim=1)
        claims = (self._zero_claims(r, singular, neg, zero64, auto=estimator == "auto")
                  if r.metric == "dfil" or singular else None)
        if not floorless and not bool((n_lost > 0).any()):
            if claims is None:
                return r
            return self._exact_for(r, estimator, s, floor, prior_var, tol, fixed, *claims,
                                   floorless)
        dt = self.enc.x.dtype
        what = (f"a column of J is 0 in {dt} only: its products underflow, or a saturated "
                "activation's derivative rounds to 0")
        why, rows = None, None  # (rows: the samples only an exact route serves; None: all)
        if floorless:
            rows = neg & ~self._structural(zero64).to(neg.device)
            if not bool(rows.any()):
                return r
            why = (f"{int(rows.sum())} sample(s) have a floorless FSInfo_diag of -inf from {dt} "
                   f"products, but every column of their Jacobian is nonzero in float64 "
                   f"({what}), so the value is finite")
            if bool((zero64.to(rows.device) & rows[:, None]).any()):
                why += (" (or 0 in float64 too, where a saturated activation's derivative "
                        "rounds to 0 there: one ulp of its output moves it, "
                        "reference.saturation)")
        elif r.metric == "fsinfo_logdet":
            # (a truth of -inf whatever the lost columns: m < d without a prior, or a
            # structural zero column; helper 103: auto raised there)
            exact = self._structural(zero64).to(neg.device) | (self.m < self.d)
            exact = exact & (check_prior_var(prior_var) == 0)
            rows = (n_lost > 0).to(neg.device) & ~exact
            if claims is not None:
                rows = rows | claims[0].to(rows.device)
            if not bool(rows.any()):
                return r
            why = (f"{int(rows.sum())} sample(s) have input dimensions whose column of J"
                   f" is 0 in {dt} but not in float64 ({what}); the log det cannot count them")
            if claims is not None:
                why = f"{why}; {claims[1]}"
        else:
            add = self._lost_add(r.metric, s, floor).to(r.value)
            # (a sample whose value is the float64 oracle's already counts every column, and
            # the fast exact route its lost ones)
            add[r.info.get("exact_fast_oracle_samples", [])] = 0.0
            if "exact_fast_lost_columns" in r.info:
                add.zero_()
            info = dict(r.info)
            info["lost_columns"] = n_lost.tolist()
            info["lost_columns_why"] = (
                f"input dimensions whose column of J is 0 in {dt} but not in float64 ({what}) "
                "are counted with their float64 diagonal entries (one float64 JVP each)")
            # (the float64 entries' own rounding: a column's sum of m squares, the trace's
            # sum over d; an interval of exactly 0 around them claimed too much, helper 118)
            e64 = (sum_rel_bound(self.m + self.d + 1) * add.abs() if r.metric == "dfil" else
                   sum_rel_bound(self.m + 1) * n_lost.to(add) / (2 * self.d))
            e64 = torch.where(add != 0, e64, 0.0)
            right = dataclasses.replace(r, value=r.value + add, info=info,
                                        ci_halfwidth=r.ci_halfwidth + e64,
                                        bias_bound=r.bias_bound + e64)
            rows = over.to(r.value.device)
            rows[r.info.get("exact_fast_oracle_samples", [])] = False  # (the oracle's already)
            if not bool(rows.any()) and claims is None:
                return right
            why = (f"{int(rows.sum())} sample(s) have up to {int(n_lost.max())} input dimensions "
                   f"whose column of J is 0 in {dt} but not in float64 ({what}), more than "
                   f"the {LOST_MAX} per sample computed exactly")
            if claims is not None:
                rows = rows | claims[0].to(rows.device)
                why = claims[1] if not bool(over.any()) else f"{why}; {claims[1]}"
            if estimator == "auto":
                r = right  # (the others' put right; those samples' values are replaced)
        return self._exact_for(r, estimator, s, floor, prior_var, tol, fixed, rows, why,
                               floorless)

    def _exact_for(self, r: MetricResult, estimator: str, s: Tensor, floor: float,
                   prior_var: float | None, tol: tuple, fixed: bool, rows: Tensor | None,
                   why: str, floorless: bool) -> MetricResult:
        """:meth:`_lost_fixed`'s end: the samples ``rows`` (``None``: all) only an exact route
        serves, for the reason ``why``: under ``auto`` the float64 oracle (those samples only
        where it can), else :class:`~fsinfo_fast.errors.PrecisionError`."""
        if rows is not None and r.estimator == "exact-fast":
            rows[r.info.get("exact_fast_oracle_samples", [])] = False
            if not bool(rows.any()):  # (a floorless -inf of the fast route's oracle samples:
                return r  # a column 0 in float64 too, exact)
        if estimator == "auto" and self._oracle_fits():
            if rows is not None and r.estimator == "exact-fast" and not bool(rows.all()):
                # those samples' float64 oracle rows in the fast exact route (_exact_rows), the
                # result made again with them
                self._exact_rows(rows)
                return self._exact_result(s, f"{r.info.get('auto', 'exact-fast')}; {why}; "
                                          "those samples took the float64 oracle's values",
                                          r.metric, floor, prior_var, tol)
            if rows is not None and r.estimator == "randomized" and (self._parts
                                                                     or not bool(rows.all())):
                try:  # (those samples only: the others' values stand)
                    return self._exact_part(r, rows, s, floor, prior_var, tol,
                                            f"{why}; the float64 oracle was used", "exact",
                                            fixed)
                except _PartUnavailable as err:
                    why = (f"{why}; the batch took the float64 oracle as one: those samples "
                           f"alone could not be served ({err})")
            if r.metric == "dfil":
                out = self.exact().dfil(s)
                out.info["auto"] = f"{why}; the float64 oracle was used"
            else:
                out = self._exact_fsinfo(s, "logdet" if r.metric == "fsinfo_logdet" else "diag",
                                         prior_var, floor,
                                         f"{why}; the float64 oracle was used", "exact")
            # spent before the switch (the route's, and any randomized before it)
            out.info["auto_randomized_passes"] = (int(r.passes)
                                                  + int(r.info.get("auto_randomized_passes", 0)))
            return out
        raise PrecisionError(
            f"{why}. Use estimator='exact' (the float64 oracle)"
            + (f", a floor > 0 (the paper's {DIAG_FLOOR:g})" if floorless else "")
            + (", or run the encoder in float64" if self.enc.x.dtype != torch.float64
               else ""))

    @torch.no_grad()
    def _rounding_measured(self, metric: str, s: Tensor, floor: float,
                           value: Tensor, jvp: bool = False,
                           halfwidth: Tensor | None = None) -> Tensor:
        r"""``[B]`` float64: the measured rounding allowance of a randomized
        FSInfo_diag (nats/dim, at noise ``s`` and ``floor``) or dFIL (of ``value``) in the
        working dtype, from :meth:`_pair`'s two VJPs of each of its Gaussian cotangents ``u``.

        ``g = J'^T u`` (the working dtype's products: the Jacobian ``J'`` they apply) and
        ``g64 = J^T u`` are Gaussian with variances ``D'_k`` and ``D_k`` per column, so the
        single-probe FSInfo_diag term (``K = 1``: ``log(g^2)``, or with a floor
        :func:`~fsinfo_fast.estimators.logfloor.log_floor_term`) is exactly unbiased for
        each, and ``Delta = (1/2d) sum_k [t(g_k) - t(g64_k)]`` is an unbiased estimate of
        the rounding bias ``FSInfo(J') - FSInfo(J)`` that the probe interval does not count
        (the paired terms share ``u``: where rounding scales a column, a saturated
        activation's ``1 - tanh^2``, the difference is that column's ``log`` ratio without
        noise). The allowance is :data:`ROUNDING_SAFETY` ``(|Delta| + z se)``, ``Delta``
        the mean over the cotangents, ``z se`` the larger of ``Z95`` times the standard error
        from the spread of their ``c d`` terms and, for ``c > 1``, ``t_{c-1}`` times the
        one from the spread of the ``c`` cotangents' own estimates (the columns share each
        cotangent: a float32 softmax whose top probability rounds to 1 loses one output
        direction, and the share a cotangent reads of it is a chi-square with one degree of
        freedom: 3% where 97% was lost). Where that allowance is :data:`PAIR_ESCALATE_AT`
        times the fixed one (:func:`rounding_allowance`) or more, or more than the interval's
        ``halfwidth`` over :data:`PAIR_ESCALATE_HW` (where given), that sample's is read again
        over :data:`PAIR_ESCALATE` cotangents (:meth:`_pair_more`: the products run for the
        batch, a sample's reading is its own), never below its first reading. dFIL:
        ``R = sum_k (g_k^2 - g64_k^2) / sum_k g64_k^2`` (the relative bias of the trace,
        ``u``'s scale cancelling where rounding scales columns), ``eps = ROUNDING_SAFETY
        (|R| + z se_R)`` and the allowance ``eps / (1 - eps) |value|`` (``inf`` for ``eps
        >= 1``); ``jvp`` (the dFIL methods that take JVPs): also ``R`` from
        :meth:`_jvp_pair` (``||J'v||^2`` against ``||Jv||^2``, the lost columns' trace added
        as the result adds it; ``t_{n-1}`` times the standard error over its ``n`` input
        vectors, :func:`pair_count` ``(m)`` of them or :data:`PAIR_ESCALATE` where ``eps``
        is :data:`PAIR_ESCALATE_AT` times the floor), the larger one taken, where the VJPs'
        ``eps`` exceeds the fixed floor or columns are lost or partial (JVPs round as VJPs
        do through the same derivative factors; where a JVP mixes a cancelled column with
        others the VJPs show the cancellation). Lost columns (:meth:`_lost`: computed
        exactly) are left out of the VJP terms; a column 0 in some working-dtype products
        only (``partial``, :meth:`_pair`: a cancellation to exactly 0, whose effect one
        product does not show) enters with its ratio ``rho_k`` of mean squares over its
        ``c + LOST_CONFIRM`` paired products, taken at ``rho_k (1 +- 2 sqrt(2/n))`` or at 0
        (every probe of a route 0 there, which a few probes can be: the floor's term,
        ``-inf`` without a floor), the largest term, times :data:`ROUNDING_SAFETY`. A
        measurement from a few products (:func:`pair_count`), not a proof: products in fixed
        directions (the deflated route's sketch) can round worse than random ones, and one
        cotangent can read a rank-one loss at a small share (below :data:`PAIR_ESCALATE_AT`
        times the floor with probability near ``0.8 sqrt(that / loss)``)."""
        g64, g, lost, partial, stats = self._pair()
        sig = s.reshape(-1, 1).to(g64)
        skip = (lost | partial).unsqueeze(1)  # [B, 1, d]: counted apart

        def reading(g64: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
            # the VJPs' allowance (dFIL: eps) and the mean trace a cotangent reads; the spread
            # over the columns, and over the cotangents where there are several (the columns
            # share each one: a rounding that loses one output direction moves them together)
            c = g64.shape[1]
            a2, b2 = g.square(), g64.square()  # [B, c, d]
            tq = _base.t_quantile(c - 1)
            if metric == "dfil":
                num = torch.where(skip, torch.zeros_like(a2), a2 - b2)
                x, y = num.sum(dim=2), b2.sum(dim=2)  # [B, c]
                den = y.sum(dim=1)
                rel = x.sum(dim=1) / den
                se = (num - rel[:, None, None] * b2).square().sum(dim=(1, 2)).sqrt() / den
                z = Z95 * torch.nan_to_num(se, nan=0.0)
                if c > 1:
                    se_c = ((x - rel[:, None] * y).square().sum(dim=1) * c / (c - 1)).sqrt() / den
                    z = torch.maximum(z, tq * torch.nan_to_num(se_c, nan=0.0))
                rel = torch.where(den > 0, rel, torch.where(num.abs().sum(dim=(1, 2)) > 0,
                                                            math.inf, 0.0))
                return ROUNDING_SAFETY * (rel.abs() + z), den / c
            if floor > 0:
                a = floor * sig[:, :, None]**2
                diff = log_floor_term(a2, 1, a) - log_floor_term(b2, 1, a)
            else:
                diff = torch.log(a2) - torch.log(b2)
                diff = torch.where((a2 == 0) & (b2 == 0), torch.zeros_like(diff), diff)
            diff = torch.where(skip, torch.zeros_like(diff), diff)
            n = diff.shape[1] * diff.shape[2]  # c d terms
            per = diff.sum(dim=2) / (2 * diff.shape[2])  # [B, c]: each cotangent's estimate
            delta = per.mean(dim=1)
            se = diff.flatten(1).std(dim=1) / (2 * math.sqrt(n)) if n > 1 else 0 * delta
            z = Z95 * se
            if c > 1:
                z = torch.maximum(z, tq * per.std(dim=1) / math.sqrt(c))
            return ROUNDING_SAFETY * (delta.abs() + z), delta

        out, den = reading(g64, g)
        eps0 = rounding_floor(self.enc.x.dtype)
        fixed = (torch.full_like(out, eps0) if metric == "dfil" else
                 rounding_allowance(metric, value.to(out), self.enc.x.dtype)[0])

        def far_of(out: Tensor) -> Tensor:  # far beyond the floor
            far = out > PAIR_ESCALATE_AT * fixed
            if halfwidth is not None:  # (or a share of the interval it widens: a rank-one
                # loss read at a small share by one cotangent went past intervals of 3e-6)
                size = out * value.to(out).abs() if metric == "dfil" else out
                far |= size > halfwidth.to(out) / PAIR_ESCALATE_HW
            return far & torch.isfinite(out)

        far = far_of(out)
        if g64.shape[1] < PAIR_ESCALATE and bool(far.any()):
            # rounding far beyond the floor: those samples read it over PAIR_ESCALATE
            # cotangents (per sample: another sample's reading leaves a sample's own alone),
            # never below the first reading (fixed-direction sketches round worse than the
            # cotangents: a lower reading let such intervals miss, helper 122)
            g64m, gm = self._pair_more()
            more, den_more = reading(torch.cat([g64, g64m.to(g64)], dim=1),
                                     torch.cat([g, gm.to(g)], dim=1))
            out = torch.where(far, torch.maximum(more, out), out)
            den = torch.where(far, den_more, den)
        part = None
        if stats is not None:  # each partial column's ratio D'_k / D_k, widened for noise
            s32, s64, n_part = stats
            k = 1 + 2 * math.sqrt(2 / n_part)
            rho = torch.where(partial, s32 / s64.clamp_min(1e-300), torch.ones_like(s32))
            part = (rho * k, rho / k, s64 / n_part)
        if metric == "dfil":
            eps = out
            if part is not None:  # the partial columns' share of the trace
                hi, lo, dh = part  # (at least the column itself: every probe 0 there)
                worst = torch.maximum((hi - 1).abs(), (lo - 1).abs()).clamp_min(1) * dh
                eps = eps + ROUNDING_SAFETY * worst.sum(dim=1) / den
            # the JVP methods' own products, ||J'v||^2 against ||Jv||^2 with the lost columns'
            # trace added as the result adds it (JVPs can see such a column in part: rounding
            # that mixes it with the others), where the VJPs show rounding beyond the floor
            # (over PAIR_ESCALATE input vectors for a sample far beyond it; a float64 JVP
            # costs several float64 VJPs: forward mode)
            if jvp and (bool((eps > eps0).any()) or bool(skip.any())):
                count = pair_count(self.m)
                far_j = far_of(eps)
                n64, n32 = self._jvp_pair(max(count, PAIR_ESCALATE) if bool(far_j.any())
                                          else count)
                found = self._lost() if bool(lost.any() | partial.any()) else None
                add = (torch.zeros_like(n64[:, 0]) if found is None
                       else found[2].sum(dim=1).to(n64))

                def jvp_eps(n64: Tensor, n32: Tensor) -> Tensor:
                    den, n = n64.sum(dim=1), n64.shape[1]
                    rj = ((n32 - n64).sum(dim=1) + n * add) / den
                    sej = ((n32 - n64 + add.unsqueeze(1)) / n64.mean(dim=1, keepdim=True)).std(
                        dim=1) / math.sqrt(n) if n > 1 else 0 * rj
                    rj = torch.where(den > 0, rj, torch.where((n32.sum(dim=1) + add) > 0,
                                                              math.inf, 0.0))
                    tq = _base.t_quantile(n - 1) if n > 1 else Z95
                    return ROUNDING_SAFETY * (rj.abs() + tq * torch.nan_to_num(sej, nan=0.0))

                # (the first vectors of the longer draw are the shorter draw's)
                eps_j = jvp_eps(n64[:, :count], n32[:, :count])
                if n64.shape[1] > count:
                    eps_j = torch.where(far_j.to(eps_j.device), jvp_eps(n64, n32), eps_j)
                if found is not None:  # every column of a sample lost (or 0 in float64 too):
                    # its JVPs carry nothing, the lost part is exact; the comparison above
                    # would read the probes' own spread around that part as rounding (a
                    # whole Jacobian that underflows: no upper end, helper 118)
                    whole = (found[1] | found[0]).all(dim=1) & ~found[3].to(found[1].device)
                    eps_j = torch.where(whole.to(eps_j.device), 0.0, eps_j)
                eps = torch.maximum(eps, eps_j.to(eps))
            out = eps / (1 - eps) * value.to(eps).abs()
            return torch.where(eps < 1, out, torch.where(value == 0, 0.0, math.inf))
        if part is not None:  # each partial column's term at its ratio's ends
            hi, lo, dh = part
            w = dh / (dh + floor * sig**2) if floor > 0 else torch.ones_like(dh)
            t_hi, t_lo = torch.log1p((hi - 1) * w), torch.log1p((lo - 1) * w)
            # (and every probe of the route 0 there: the floor's term, -inf without a floor)
            t_zero = torch.log1p(-w)
            worst = torch.maximum(torch.maximum(t_hi.abs(), t_lo.abs()), t_zero.abs())
            worst = torch.where(partial, worst, 0.0)
            out = out + ROUNDING_SAFETY * worst.sum(dim=1) / (2 * partial.shape[1])
        return torch.where(torch.isfinite(out), out, math.inf)

    def _measured(self, r: MetricResult, s: Tensor, floor: float,
                  jvp: bool = False) -> Tensor | None:
        """:meth:`_rounding_measured` for the result ``r`` (``[B]``, 0 where its value is an
        exact ``-inf``: a column 0 in float64 too, :meth:`_lost_fixed` checked it), or None
        with ``r.info["rounding_unmeasured"]`` where torch.func's float64 VJP cannot run the
        encoder (non-reentrant activation checkpointing)."""
        try:
            meas = self._rounding_measured(r.metric, s, floor, r.value, jvp,
                                           r.ci_halfwidth).to(r.value)
        except EncoderError as err:
            r.info["rounding_unmeasured"] = f"the float64 rounding check cannot run ({err})"
            return None
        return torch.where(torch.isneginf(r.value), torch.zeros_like(meas), meas)

    def _rounding_fixed(self, r: MetricResult, estimator: str, s: Tensor, floor: float,
                        tol: tuple, prior_var: float | None = None,
                        fixed: bool = False) -> MetricResult:
        """``r`` (a randomized FSInfo_diag or dFIL from products in a working dtype below
        float64) with the rounding allowance :meth:`_rounding_measured` where it exceeds the
        fixed one (:func:`rounding_allowance`) in ``ci_halfwidth`` and ``bias_bound``;
        ``info["rounding_measured"]`` holds it per sample. Where the wider interval misses the
        tolerance ``tol = (atol, rtol)``, ``converged`` is False, and ``auto`` takes an exact
        route (the fast one where its own measured allowance meets the tolerance, else the
        float64 oracle) where the oracle fits and the rounding made it miss (not for a
        ``fixed`` probe count, which ``auto`` keeps): for those samples only
        (:meth:`_exact_part`) unless every sample missed. Where no float64 copy can run (or it
        computes another function), the fixed allowance stands and
        ``info["rounding_unmeasured"]`` says why. ``info["rounding_check_products"]``: the
        working-dtype products the checks (:meth:`_pair`, :meth:`_jvp_pair`) ran since the
        last result that reported them (0 once held). A ``"mixed"`` ``r`` (:meth:`_lost_fixed`
        sent some samples to the oracle) is checked for its randomized samples."""
        if (r.estimator not in ("randomized", "mixed") or r.metric not in ("fsinfo_diag", "dfil")
                or self.enc.x.dtype == torch.float64):
            return r
        try:
            na = self._exact_unavailable(attempt=True, confirm=False, prime=True)
        except EncoderError as err:  # (another function in float64: the exact routes raise)
            na = f"the float64 copy cannot serve ({err})"
        if na is not None:
            self._replan = False  # (this result is final: nothing to plan again)
            r.info["rounding_unmeasured"] = na
            return r
        jvp = r.metric == "dfil" and r.info.get("method") != "diag"  # (methods with JVPs)
        meas = self._measured(r, s, floor, jvp)
        if meas is None:
            return r
        held = torch.zeros_like(meas, dtype=torch.bool)
        held[r.info.get("exact_samples", [])] = True  # (their own routes' values: spliced again)
        meas = torch.where(held, torch.zeros_like(meas), meas)
        ran, self._check_reported = self._check_products - self._check_reported, \
            self._check_products
        allow0 = rounding_allowance(r.metric, r.value, self.enc.x.dtype)[0].to(r.value)
        extra = (meas - allow0).clamp_min(0)
        info = {**r.info, "rounding_measured": meas.tolist(),
                "rounding_check_products": ran}
        auto = estimator == "auto" and not fixed
        splice = auto or r.estimator == "mixed"
        if not bool((extra > 0).any()):
            out = dataclasses.replace(r, info=info)
            return (self._exact_part(out, None, s, floor, prior_var, tol, fixed=fixed)
                    if splice else out)
        hw = r.ci_halfwidth + extra
        met = tolerance_met(r.value, hw, *tol)
        out = dataclasses.replace(r, ci_halfwidth=hw, bias_bound=r.bias_bound + extra,
                                  converged=r.converged & met, info=info)
        missed = tolerance_met(r.value, r.ci_halfwidth, *tol) & ~met  # (by the rounding)
        if not bool(missed.any()):
            return (self._exact_part(out, None, s, floor, prior_var, tol, fixed=fixed)
                    if splice else out)
        dt = self.enc.x.dtype
        why = (f"the {dt} products' rounding, measured against float64 (a few products each), "
               f"widened the randomized {r.metric} interval of {int(missed.sum())} sample(s) "
               f"past the tolerance (allowance up to {float(meas.max()):.3g}): a saturated "
               "activation or a cancellation loses digits")
        if auto and self._oracle_fits():
            if self._parts or not bool(missed.all()):  # (the samples it missed for only)
                try:
                    return self._exact_part(out, missed, s, floor, prior_var, tol, why)
                except _PartUnavailable as err:
                    why = (f"{why}; the batch took the exact route as one: those samples "
                           f"alone could not be served ({err})")
            ex = self._exact_result(s, why, r.metric, floor, prior_var, tol)
            ex.info["auto_randomized_passes"] = (int(r.passes)
                                                 + int(r.info.get("auto_randomized_passes", 0)))
            return ex
        out.info["rounding_why"] = why
        if estimator == "auto" and not fixed:
            warn_user(f"{r.metric}: {why}, and {self._no_oracle_why()}; returning the randomized "
                      "estimate with the measured allowance in its interval (converged=False)",
                      RuntimeWarning)
        return out

    def _exact_part(self, out: MetricResult, rows: Tensor | None, s: Tensor, floor: float,
                    prior_var: float | None, tol: tuple, why: str = "",
                    route: str = "auto", fixed: bool = False) -> MetricResult:
        """``auto``'s randomized FSInfo_diag or dFIL ``out`` with the samples ``rows`` (``[B]``
        bool, or None) and those sent before (:attr:`_parts`) taking the exact route's values:
        the fast exact route (its own samples that miss the tolerance there take the float64
        oracle's; ``route="exact"``: the oracle's), each sample's computed at most once (a
        result spliced twice in one request, by :meth:`_lost_fixed` and
        :meth:`_rounding_fixed`, reads it once), on a sub-batch ``x[rows]`` linearised
        with the same backend, seed and sample ids (the encoder's validation checked that
        samples do not interact, so a sub-batch's Jacobians are the batch's). A sample takes
        the exact route where its own measured rounding missed the tolerance, not because a
        batch-mate's did, and a sample flagged in a batch of 32 costs one sample's ``min(m,
        d)`` products, not 32. The sub-batch trusts this batch's check that the float64 copy
        computes the working dtype's function (made at the batch's output scale, as for the
        whole-batch route; a flagged sample alone can sit far below it); where the sub-batch
        cannot be served (another check its values decide), :class:`_PartUnavailable` sends
        the caller to the batch's exact route. Returns ``out`` itself where no sample is sent,
        else the spliced result:
        ``estimator="mixed"``, ``info["exact_samples"]`` (the batch indices that took an
        exact route), ``info["exact_samples_estimator"]`` (``"exact-fast"`` or ``"exact"``,
        each), ``info["exact_samples_auto"]`` (each one's reason and route),
        ``info["exact_fast_oracle_samples"]`` (those the oracle served, batch indices),
        ``info["exact_samples_passes"]`` (their new products per sample, the most of any
        sub-batch sent by this call; 0 where they are held from an earlier one) and
        ``info["auto"]`` (all of them); ``passes`` adds those products.
        ``fixed`` (a fixed probe count, whose estimates stand where they can): the samples
        sent for ``out`` only, not those held from other calls."""
        held = torch.zeros(self.batch, dtype=torch.bool)
        for idx, *_ in self._parts:
            held[idx] = True
        # (this call: a result spliced twice in it, by _lost_fixed and _rounding_fixed, reads
        # each sub-batch's result once; another call, whatever its arguments, reads it again)
        request = self._request
        if rows is not None and bool((rows.cpu() & ~held).any()):
            idx = (rows.cpu() & ~held).nonzero().flatten()
            ids = (idx if self.sample_ids is None else self.sample_ids.cpu()[idx])
            try:
                with warnings.catch_warnings():  # (repeated ids: said for the batch already)
                    warnings.filterwarnings("ignore", "sample_ids repeat", UserWarning)
                    sub = Linearization(self.encoder, self.x[idx.to(self.x.device)],
                                        backend=self.backend, seed=self.seed, sample_ids=ids,
                                        memory_budget=self.memory_budget, dtype=self._dtype_arg,
                                        progress=self.progress)
                # this batch checked the float64 copy's function at its own scale (a sample
                # alone, the one whose float32 lost digits, can sit far below it)
                sub._same_function_checked = self._enc64 is not None
                sub._depth = 1  # (its results are this batch's: checked here, _modes_checked)
                first = sub._exact_result(s[idx.to(s.device)], why, out.metric, floor,
                                          prior_var, tol, route)
            except FSInfoError as err:  # (a check the sub-batch's values decide otherwise)
                raise _PartUnavailable(f"{type(err).__name__}: {err}") from err
            self._parts.append([idx, sub, why, request, first, why, request])
        parts = self._parts
        if fixed:
            want = torch.zeros(self.batch, dtype=torch.bool)
            want[out.info.get("exact_samples", [])] = True
            if rows is not None:
                want |= rows.cpu()
            parts = [part for part in parts if bool(want[part[0]].any())]
        if not parts:
            return out
        value, stderr = out.value.clone(), out.stderr.clone()
        hw, bias = out.ci_halfwidth.clone(), out.bias_bound.clone()
        conv, bound = out.converged.clone(), out.bound.clone()
        meas = out.info.get("rounding_measured")
        meas = None if meas is None else list(meas)
        exact: dict[int, str] = {}
        said: dict[int, str] = {}
        reasons, passes = [], 0
        for part in parts:
            idx, sub, why0, asked, ex, sent, born = part
            i = idx.to(value.device)
            if asked != request:  # (sent by an earlier request: its quantities are held)
                sent = f"the exact quantities computed for an earlier request ({why0})"
                ex = sub._exact_result(s[i], sent, out.metric, floor, prior_var, tol)
                part[3:6] = [request, ex, sent]
            value[i], stderr[i] = ex.value.to(value), ex.stderr.to(stderr)
            hw[i], bias[i] = ex.ci_halfwidth.to(hw), ex.bias_bound.to(bias)
            conv[i], bound[i] = ex.converged.to(conv), ex.bound.to(bound)
            oracle = set(ex.info.get("exact_fast_oracle_samples", ()))
            sub_meas = ex.info.get("rounding_measured")
            for j, k in enumerate(idx.tolist()):
                exact[k] = ("exact" if ex.estimator == "exact" or j in oracle
                            else ex.estimator)
                said[k] = f"{sent}; " + (  # (its own route: the sub-batch's text counts it)
                    "this sample took the fast exact route" if exact[k] == "exact-fast" else
                    "this sample took the float64 oracle (see info['auto'])")
                if meas is not None:
                    meas[k] = None if sub_meas is None else sub_meas[j]
            reasons.append(f"sample(s) {idx.tolist()}: {ex.info.get('auto', sent)}")
            if born == request:  # (new products: a later call reads held ones)
                passes = max(passes, int(ex.passes))
        order = sorted(exact)
        info = {**out.info, "exact_samples": order,
                "exact_samples_estimator": [exact[k] for k in order],
                "exact_samples_auto": [said[k] for k in order],
                "exact_fast_oracle_samples": [k for k in order if exact[k] == "exact"],
                "exact_samples_passes": passes,
                "auto": (f"{len(order)} of {self.batch} sample(s) took an exact route, each for "
                         "its own reason (" + ("the others keep the randomized estimate"
                                               if len(order) < self.batch else
                                               "every sample, each sent on its own") + "): "
                         + "; ".join(reasons))}
        if meas is not None:
            info["rounding_measured"] = meas
        return dataclasses.replace(out, value=value, stderr=stderr, ci_halfwidth=hw,
                                   bias_bound=bias, converged=conv, bound=bound,
                                   estimator="mixed", info=info,
                                   # (a result spliced before counts its exact part once)
                                   passes=int(out.passes) + passes
                                   - int(out.info.get("exact_samples_passes", 0)))

    def _capped_part(self, r: MetricResult, bad: Tensor, s: Tensor, floor: float,
                     prior_var: float | None, tol: tuple, why: str,
                     whole: Callable[[str], MetricResult]) -> MetricResult:
        """``auto``'s FSInfo_diag or dFIL ``r`` with the samples ``bad`` (``[B]`` bool), which
        missed the tolerance within the probe cap, taking the exact route alone
        (:meth:`_exact_part`; the others' converged estimates stand), or, where those samples
        alone cannot be served, the batch's exact route ``whole(why)``."""
        try:
            return self._exact_part(r, bad, s, floor, prior_var, tol, why)
        except _PartUnavailable as err:
            return whole(f"{why}; the batch took the exact route as one: those samples alone "
                         f"could not be served ({err})")

    def _exact_result(self, s: Tensor, why: str, metric: str, floor: float,
                      prior_var: float | None, tol: tuple, route: str = "auto") -> MetricResult:
        """``auto``'s exact-route FSInfo_diag or dFIL of this batch (the whole batch's switch
        in :meth:`_rounding_fixed`, or an :meth:`_exact_part` sub-batch's), ``why`` recorded;
        ``route="exact"``: the float64 oracle's."""
        if metric == "dfil":
            return self._exact_dfil(s, why, route, tol)
        return self._lost_fixed(self._exact_fsinfo(s, "diag", prior_var, floor, why, route, tol),
                                route, s, floor, prior_var)

    def _oracle_fits(self) -> bool:
        """Whether the oracle can run: the encoder runs in float64 and one sample's dense
        float64 Jacobian (and its Gram matrix) fits in memory."""
        need = 8 * (self.m * self.d + min(self.m, self.d) ** 2)
        return (need <= default_memory_budget(self.enc.x.device)
                and self._exact_unavailable(attempt=True) is None)

    def _no_oracle_why(self) -> str:
        return self._exact_unavailable() or (
            f"the exact oracle does not fit in memory (m = {self.m}, d = {self.d})")

    def _auto_exact(self, estimator: str, cost_randomized: int, spectrum: bool,
                    fixed: bool = False) -> str | None:
        """Why ``auto`` (or ``exact``) takes the oracle route, or None for the randomized one;
        ``fixed``: a ``num_probes`` was asked for, which ``auto`` keeps (the exact quantities
        computed before for this batch replaced it)."""
        if estimator in ("exact", "exact-fast"):
            return "requested"
        if estimator != "auto":
            return None
        if not fixed and (self._has_exact(spectrum)
                          or (not spectrum and self._exact_fast is not None)):
            return "the exact Fisher quantities were already computed for this batch"
        n = self._exact_n(spectrum)
        # the fast exact route (no spectrum) chunks its one-hot products to the memory budget;
        # the oracle builds each sample's dense Jacobian
        if n <= cost_randomized and (self._oracle_fits() if spectrum
                                     else self._exact_unavailable(attempt=True) is None):
            return (f"the exact route's {self._exact_n_text(n)} products cost no more than the "
                    f"randomized estimator's first round ({cost_randomized})")
        return None

    def _finish(self, est: Estimate, spectrum: bool, estimator: str, what: str,
                max_probes: int, fixed: bool = False) -> str | None:
        """``auto`` only: why the oracle replaces a randomized estimate that missed its
        tolerance within the probe cap (None: keep the estimate, ``converged=False``). A fixed
        ``num_probes`` (``fixed``) is what the caller asked for: its estimate is kept, with its
        interval and ``converged`` saying whether it met the tolerance."""
        if estimator != "auto" or fixed or bool(est.converged.all()):
            return None
        n_bad, others = _unconverged(est)
        if self._oracle_fits() if spectrum else self._exact_unavailable(attempt=True) is None:
            return (f"the randomized {what} did not reach the tolerance within {max_probes} "
                    f"probes for {n_bad} sample(s) (stopped at the cap, or as soon as that was "
                    f"predicted){others}")
        if self._replan:  # the caller plans the request again (_replanned), without the switch
            return None
        warn_user(
            f"{what}: the tolerance was not met within {max_probes} probes for {n_bad} sample(s),"
            f" and {self._no_oracle_why()}; returning the randomized estimate with its error "
            "bar (converged=False; raise max_probes or loosen the tolerance)",
            RuntimeWarning,
        )
        return None

    # -- FSInfo ------------------------------------------------------------------------------
    @ieee_fp32_method
    @_modes_checked("fsinfo")
    def fsinfo(
        self,
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
        lanczos_order: int | None = None,
    ) -> MetricResult:
        r"""Per-sample FSInfo in nats per input dimension (see :func:`fsinfo_fast.fsinfo`).

        ``max_probes=None`` (the default) caps the probes per sample at ``min(m, d)`` under
        ``estimator="auto"`` (the fast exact route's products; the SLQ log det keeps its own
        smaller cap, ``min(m, d) / (2 order)``), and at :data:`DEFAULT_MAX_PROBES` for an
        explicitly randomized estimator. On the deflated route the cap counts each sample's
        rank pilot, sketch and remainder products (``info["products_per_sample"]``;
        ``probes_per_sample`` counts the remainder probes). A fixed ``num_probes`` is kept under
        ``auto`` too: ``converged`` then says whether its interval met the tolerance."""
        self._check_unchanged()
        self._request += 1
        again = functools.partial(self.fsinfo, sigma, variant=variant, estimator=estimator,
                                  atol=atol, rtol=rtol, num_probes=num_probes,
                                  max_probes=max_probes, prior_var=prior_var, floor=floor,
                                  lanczos_order=lanczos_order)
        _check_choice("estimator", estimator, ESTIMATORS)
        estimator = self._auto_without_exact(estimator)
        _check_tol("atol", atol)  # checked whichever route serves (auto's exact ones too)
        _check_tol("rtol", rtol)
        _check_choice("variant", variant, VARIANTS)
        check_fixed_cap(num_probes, max_probes)
        spectrum = variant == "logdet"
        n = self._exact_n(spectrum)
        max_probes = _cap(max_probes, n, estimator)
        lam = _check_options(variant, prior_var, floor, lanczos_order)
        floor = float(floor)
        _check_fsinfo_route(estimator, variant)
        s = self._sigma(sigma)
        if variant == "diag":
            k0 = initial_probes(num_probes=num_probes, max_probes=max_probes)
        else:
            k0 = num_probes or _SLQ_START
        if variant == "diag":
            cost = expected_passes("diag", d=self.d, m=self.m, num_probes=k0)
        else:
            cost = expected_passes("slq", d=self.d, m=self.m, num_probes=k0, order=lanczos_order,
                                   prior=lam > 0)
            order_est = SLQ_ORDER_ESTIMATE if lanczos_order is None else lanczos_order
            if cost == 0 and estimator == "auto":
                # m < d without a prior: -inf exactly (rank J^T J <= m < d); the SLQ route
                # returns that structural answer with no products, the oracle would build J
                estimator = "randomized"
        if estimator not in ("exact", "exact-fast"):  # checked on every route (the exact one
            _stopping(atol, rtol, num_probes, max_probes, None)  # held took any before)
        why = self._auto_exact(estimator, cost, spectrum, fixed=num_probes is not None)
        if why is not None:
            return self._lost_fixed(
                self._exact_fsinfo(s, variant, prior_var, floor, why, estimator, (atol, rtol)),
                estimator, s, floor, prior_var)
        if self._replanned(estimator):
            return again()
        cap = None
        if estimator == "auto":  # never spend more probes than the oracle's products
            cap = (min(n, MAX_FLOORED_PROBES) if variant == "diag"
                   else max(2, n // (2 * min(order_est, n))))
        # auto's exact route takes over a sample that cannot converge within the cap (the
        # log det's only where the oracle fits): such a sample stops as soon as that is planned
        fallback = estimator == "auto" and (not spectrum or self._oracle_fits())
        if self._replanned(estimator):  # (the log det's oracle: its float64 copy failed)
            return again()
        # (the diagonal's unconverged samples take the exact route alone: the others go on)
        stop = _stopping(atol, rtol, num_probes, max_probes, cap, fallback, batch=spectrum)
        if spectrum and fallback and num_probes is None and len(
                list(stop.for_estimator("slq").schedule())) < 3:
            # only a three-stage result converges: SLQ's products would be spent for nothing
            why = (f"the randomized log det's probe cap under auto ({stop.max_probes} probes: "
                   f"the oracle's {n} products at Krylov order {order_est}) leaves no room for "
                   "the three stages of a converged estimate")
            return self._lost_fixed(
                self._exact_fsinfo(s, variant, prior_var, floor, why, estimator, (atol, rtol)),
                estimator, s, floor, prior_var)
        common = {"seed": self.seed, "sample_ids": self.sample_ids}
        if variant == "diag":
            route, route_why = self._diag_route(estimator, s, floor, stop)
            if route == "deflated":
                est = self._deflated(s, floor, stop).fsinfo_diag
            else:
                rule = dataclasses.replace(stop, min_probes=min(k0, stop.max_probes))
                est, route, route_why = self._plain_diag(estimator, s, floor, rule, stop,
                                                         route_why)
            metric = "fsinfo_diag"
            extra = {"floor": floor, "diag_method": route, "diag_method_why": route_why}
        else:
            order = lanczos_order
            if estimator == "auto" and order is None:  # bound the adaptive order so that
                order = max(4, n // (2 * k0))  # 2 * order * k0 <= n, the oracle's products
            est = slq_logdet(self.products, sigma=s, prior_var=prior_var, order=order,
                             stop=stop, store=self._slq_store(),
                             j_err=None if lam == 0 and self.m < self.d else self._logdet_jerr(),
                             **common)
            metric, extra = "fsinfo_logdet", {"prior_var": prior_var}
        why = self._finish(est, spectrum, estimator, metric, stop.max_probes,
                           fixed=num_probes is not None)
        if why is None and self._replanned(estimator):
            return again()
        bad = None if why is None or spectrum else ~est.converged
        if bad is not None and bool(bad.all()):
            bad = None  # (every sample: the batch's exact route, below)

        def whole(why: str) -> MetricResult:  # the batch's exact route
            r = self._exact_fsinfo(s, variant, prior_var, floor, why, estimator,
                                   (atol, rtol))
            r.info["auto_randomized_passes"] = int(est.passes)  # spent before the switch
            return self._lost_fixed(r, estimator, s, floor, prior_var)

        if why is not None and bad is None:
            return whole(why)
        r = self._rounding_fixed(self._lost_fixed(
            _to_result(est, metric=metric, units="nats/dim", sigma=s, d=self.d, m=self.m,
                       info=self._info(**extra), dtype=self.enc.x.dtype), estimator, s, floor,
            prior_var, (atol, rtol), num_probes is not None), estimator, s, floor,
            (atol, rtol), prior_var, num_probes is not None)
        if bad is not None and r.estimator in ("randomized", "mixed"):
            return self._capped_part(r, bad, s, floor, prior_var, (atol, rtol), why, whole)
        if variant == "logdet" and est.singular is not None and r.estimator != "exact":
            _warn_singular(est.singular, self.m, self.d)
        return r

    def _exact_fsinfo(self, s: Tensor, variant: str, prior_var, floor: float,
                      why: str, estimator: str, tol: tuple = (None, None)) -> MetricResult:
        src, why = self._exact_route(estimator, variant == "logdet", why)
        if isinstance(src, FastExactFisher):
            r, why = self._fast_exact(src, lambda fx: fx.fsinfo(s, variant, floor=floor), s,
                                      floor, estimator, tol, why, self._info(floor=floor))
        else:
            if variant == "diag":
                src = self._oracle_weighted(src, s, floor)
            r = self._oracle_met(src.fsinfo(s, variant, prior_var=prior_var, floor=floor),
                                 estimator, tol)
        r.info["auto"] = why
        return r

    @staticmethod
    def _oracle_met(r: MetricResult, estimator: str, tol: tuple) -> MetricResult:
        """``auto``'s oracle result ``r`` with ``converged`` False where its interval (the
        oracle's rounding) misses the tolerance ``tol`` (4.6-9.2 nats/dim of half-width on
        softmax columns far below the floor read True, helper 99); an explicit ``"exact"``
        asked for no tolerance."""
        if estimator == "auto":
            r.converged.logical_and_(tolerance_met(r.value, r.ci_halfwidth, *tol))
        return r

    def _oracle_weighted(self, ex: reference.ExactFisher, s: Tensor,
                         floor: float) -> reference.ExactFisher:
        """``ex`` for FSInfo_diag at noise ``s`` and ``floor``: where the forward- against
        reverse-mode check's scale-free share exceeds :data:`MODES_SCREEN` or the saturating
        activations move the columns (:meth:`_saturation`), the columns' rounding read at
        this result's weighting (:meth:`_modes_weighted`, :meth:`_saturation_col`; the
        columns far below the floor's level left out: a disagreement there moves no term of
        the log), a reading of ``rho_k e_k`` (``rho_k`` the column's weight in the log) that
        bounds column ``k``'s error by ``t / rho_k`` (``col_err``, at most the scale-free
        reading; :meth:`~fsinfo_fast.reference.ExactFisher.fsinfo` intersects its bracket
        with the scale-free one's: both bound the error)."""
        got = self._modes()
        if isinstance(got, str) or ex.ad_err is None or floor == 0:
            return ex  # (floorless: the scale-free readings are this weighting's)
        sat = self._saturation()
        moved = isinstance(sat, Tensor) and bool((sat != 0).any())
        loud = bool((got[4] > MODES_SCREEN).any())
        if not (loud or moved):
            return ex
        a = floor * s.to(got[4]).reshape(-1).square()
        try:  # (the scale-free reading bounds the error at any weighting)
            col = self._modes_weighted("fsinfo", a)[1] if loud else got[6]
        except torch.OutOfMemoryError:
            raise
        except (EncoderError, RuntimeError, NotImplementedError):
            return ex
        if moved:
            col = torch.maximum(col, self._saturation_col("fsinfo", a))
        # (a reading of rho_k e_k: column k's error is at most t / rho_k, and at most the
        # scale-free reading; taken as every column's error, rho_k multiplied it again: 38
        # half-widths off the truth where a saturated tanh's columns sit 1e-8 below the
        # floor's level)
        # (and |dJ_k| <= ||dJ||_F <= fro_err ||J||_F: the reading of J as a whole bounds the
        # columns far below the floor, whose e_k neither reading bounds: 110 nats/dim of
        # half-width on softmax columns of 1e-135, whose terms are log(floor) to 1e-250)
        t = EXACT_SAFETY * col.to(ex.diag).unsqueeze(1)
        share = ex.diag / (ex.diag + a.to(ex.diag).unsqueeze(1))  # rho_k
        per = torch.where(share > 0, t / share, math.inf)
        if moved:  # (each column at least its own reading, _oracle_measured)
            own = self._own_cols(ex.diag)
            if own is not None:
                per = torch.maximum(per, EXACT_SAFETY * own)
        size = ex.diag.sqrt()
        whole = ex._a_priori(ex.fro_err) * ex.trace.clamp_min(0).sqrt()
        per = torch.minimum(per, torch.where(size > 0, whole.unsqueeze(1) / size, math.inf))
        return dataclasses.replace(ex, col_err=torch.minimum(per, ex.ad_err.unsqueeze(1)))

    def _fast_exact(self, fx: FastExactFisher, make: Callable[[FastExactFisher], MetricResult],
                    s: Tensor, floor: float, estimator: str, tol: tuple, why: str,
                    info: dict[str, Any]) -> tuple[MetricResult, str]:
        """The fast exact route's result ``make(fx)`` with its measured interval
        (:meth:`_fast_measured`); under ``auto``, the samples whose interval missed the
        tolerance (:meth:`_fast_missed`) take the float64 oracle's values, those samples only
        (:meth:`_exact_rows`: a saturated activation or a max-pool near-tie that the working
        dtype's rounding flips in one sample of a batch of 32 no longer sends all 32 through
        the oracle). Returns the result (a fast one with ``info`` added) and the reason to
        record."""
        held = ""
        if self._oracle_part is not None and estimator == "auto":  # (held from a request before)
            held_rows, held_ex = self._oracle_part
            held_ex = self._oracle_weighted(held_ex, s, floor)
            fx = fx.with_exact_rows(held_rows, held_ex)
            held = (f"; sample(s) {fx.info['exact_fast_oracle_samples']} have the float64 "
                    "oracle's values, computed for an earlier request (or sent there by the "
                    "lost-column check)")
        def made(fx: FastExactFisher, ex: reference.ExactFisher | None) -> MetricResult:
            # the oracle's samples read as the oracle reads them (its brackets, its log-sum's
            # rounding, an upper bound where the lower bracket reaches -inf: a held sample
            # saturated to 0 read -inf +- inf here)
            r = self._fast_measured(make(fx), s, floor, fx.exact_rows)
            if fx.exact_rows is None or ex is None:
                return r
            ro, k = make(ex), fx.exact_rows.to(r.value.device)
            bound = torch.as_tensor(r.bound, device=k.device).expand_as(k)
            return dataclasses.replace(
                r, value=torch.where(k, ro.value.to(r.value), r.value),
                ci_halfwidth=torch.where(k, ro.ci_halfwidth.to(r.value), r.ci_halfwidth),
                bias_bound=torch.where(k, ro.bias_bound.to(r.value), r.bias_bound),
                bound=torch.where(k, torch.as_tensor(ro.bound, device=k.device)
                                  .expand_as(k), bound))

        r = made(fx, held_ex if held else None)
        r.info.update(info)
        miss = self._fast_missed(r, estimator, tol)
        if miss is None:
            return r, why + held
        rows, text = miss
        if fx.exact_rows is None and bool(rows.all()):  # (every sample: the oracle's result)
            return (self._oracle_met(make(self._oracle_weighted(self.exact(), s, floor)),
                                     estimator, tol),
                    f"{why}; {text}, so the float64 oracle was used")
        oracle = self._exact_rows(rows)
        if self._exact is not None:  # (the last samples: every one is the oracle's now)
            return self._oracle_met(make(self._oracle_weighted(self._exact, s, floor)),
                                    estimator, tol), (
                f"{why}{held}; {text} for the other {int(rows.sum())} "
                                       "sample(s), so every sample has the float64 oracle's "
                                       "values")
        oracle = self._oracle_weighted(oracle, s, floor)
        fx = fx.with_exact_rows(rows, oracle)
        r = made(fx, oracle)
        r.info.update(info)
        self._fast_missed(r, estimator, tol)  # (its converged: every sample meets it now)
        more = " more" if held else ""
        return r, (f"{why}{held}; {text} for {int(rows.sum())}{more} of {rows.numel()} samples, "
                   "which took the float64 oracle's values (info['exact_fast_oracle_samples'] "
                   f"lists all {len(r.info['exact_fast_oracle_samples'])})")

    def _exact_rows(self, rows: Tensor) -> reference.ExactFisher:
        """The float64 oracle's quantities (no spectrum; the rounding allowance measured,
        :meth:`_oracle_measured`), computed for the samples ``rows`` (``[B]`` bool) only, each
        at most once (the whole batch's oracle where it is already computed); other samples'
        entries are NaN. The metric is per sample (the encoder's validation checked that
        samples do not interact), so a sub-batch's Jacobians are the batch's."""
        if self._exact is not None:
            return self._exact
        rows = rows.to(self.enc.x.device)
        if self._oracle_part is None:
            nan = math.nan
            dev = rows.device
            self._oracle_part = (
                torch.zeros(self.batch, dtype=torch.bool, device=dev),
                reference.ExactFisher(
                    diag=torch.full((self.batch, self.d), nan, dtype=torch.float64, device=dev),
                    trace=torch.full((self.batch,), nan, dtype=torch.float64, device=dev),
                    eigvals=None, zero=None, d=self.d, m=self.m,
                    zero_cols=torch.zeros(self.batch, self.d, dtype=torch.bool, device=dev)))
        held, ex = self._oracle_part
        new = rows & ~held
        if bool(new.any()):
            self._prepare_oracle()
            idx = new.nonzero().flatten()
            with meter(self.progress, "exact Jacobian (float64 oracle)",
                       int(idx.numel()) * min(self.m, self.d)):
                part = reference.exact_fisher(self.encoder, self.x[idx], spectrum=False)
            ex.diag[idx], ex.trace[idx] = part.diag.to(ex.diag), part.trace.to(ex.trace)
            ex.zero_cols[idx] = part.zero_cols.to(ex.zero_cols.device)
            held |= new
            ex = self._oracle_measured(ex)
            if bool(held.all()):  # every sample: the batch's oracle (without the spectrum)
                self._exact, self._oracle_part = ex, None
            else:
                self._oracle_part = (held, ex)
        return ex

    def _oracle_measured(self, ex: reference.ExactFisher) -> reference.ExactFisher:
        """``ex`` with autograd's float64 rounding of ``J`` measured (:attr:`~fsinfo_fast.
        reference.ExactFisher.ad_err`): :data:`~fsinfo_fast.estimators.exact_fast.SAFETY`
        times the relative error per column that the forward- against reverse-mode check
        reads (:meth:`_modes_share`), never below the a-priori
        :data:`~fsinfo_fast.reference.oracle.AD_ULPS` unit roundoffs; the a-priori value where
        the check cannot run (the result records why, ``info["modes_unchecked"]``). Where the
        saturating activations' rounding moves the columns, each column also its own change
        (:meth:`_saturation_cols`) against its norm, as :attr:`~fsinfo_fast.reference.
        ExactFisher.col_err` (``ad_err`` then the largest), and ``J`` as a whole their root
        sum of squares against ``||J||_F``: the readings of :meth:`_saturation_col` are means
        over the columns (one Gaussian input vector weighs them), and a column far off its
        neighbours read low (5-50x on chained saturated sigmoid/tanh, 0.9% of 16,389 fuzzed
        results missing the 80-digit truth, helper 99)."""
        got = self._modes()
        if isinstance(got, str):
            return ex
        zero = torch.zeros_like(got[3][:, 0])
        col = got[6]
        try:
            fro = self._modes_weighted("flat", zero)[1]
        except torch.OutOfMemoryError:
            raise
        except (EncoderError, RuntimeError, NotImplementedError):
            fro = torch.full_like(col, math.inf)  # (no reading of J as a whole: no claim)
        sat = self._saturation()
        if isinstance(sat, str):  # (the reading failed: no claim; _modes_flagged says why)
            inf = torch.full_like(col, math.inf).to(ex.trace)
            return ex.with_ad_err(inf, inf)
        own = None
        if isinstance(sat, Tensor):
            col = torch.maximum(col, self._saturation_col("fsinfo", zero))
            fro = torch.maximum(fro, self._saturation_col("flat", zero))
            moved = (sat != 0).any(dim=1).to(ex.diag.device)  # [B, d]
            if bool(moved.any()):
                # each column's own change against its norm (the reading above is a mean over
                # the columns: one column far off its neighbours read 5-50x low, helper 99)
                cols = self._saturation_cols()
                if isinstance(cols, str):
                    inf = torch.full_like(col, math.inf).to(ex.trace)
                    return ex.with_ad_err(inf, inf)
                # (J as a whole over the columns computed nonzero, as the flat reading weighs
                # them: a column computed as 0 has its own bound, col_floor below; counted
                # here, a J saturated to 0 read inf against a trace of 0 and a log det that
                # its prior holds to 1e-14 lost its claim, helper 106)
                live = torch.where(ex.diag > 0, cols.to(ex.diag), 0.0)
                whole = _rms(live, 1) * math.sqrt(self.d) / ex.trace.sqrt()
                fro = torch.maximum(fro, torch.where(torch.isnan(whole), 0.0, whole).to(fro))
                own = self._own_cols(ex.diag)
            gone = (ex.diag == 0) & moved  # (computed 0, and the rounding moves it)
            if bool(gone.any()):
                top = sat.abs().amax(dim=1).to(ex.diag)
                if own is not None:
                    top = torch.maximum(top, cols.to(ex.diag))
                ex = dataclasses.replace(
                    ex, zero_cols=None if ex.zero_cols is None else ex.zero_cols & ~moved,
                    col_floor=torch.where(gone, (EXACT_SAFETY * top).square(), 0.0))
        ad = EXACT_SAFETY * col.to(ex.trace)
        if own is not None:  # (every column at least its own reading; ad_err their largest)
            each = torch.maximum(ad.unsqueeze(1), EXACT_SAFETY * own)
            ex = dataclasses.replace(ex, col_err=each)
            ad = each.amax(dim=1)
        return ex.with_ad_err(ad, EXACT_SAFETY * fro.to(ex.trace))

    def _saturation(self) -> Tensor | str:
        """``[B, c, d]`` float64: how one unit roundoff in the saturating activations' outputs
        moves the float64 VJPs of :meth:`_modes`' cotangents
        (:func:`~fsinfo_fast.reference.saturation.perturbed_vjp`: the rounding both modes of
        autograd share, which the forward-/reverse-mode check cannot see), computed once per
        batch (a float64 forward and two VJPs, only where such ops run); or why it cannot
        run."""
        if self._sat_cache is None:
            got = self._modes()
            if isinstance(got, str):
                self._sat_cache = got
            else:
                self._sat_cache = self._perturbed(got[0])
        return self._sat_cache

    def _perturbed(self, u: Tensor, what: str = "") -> Tensor | str:
        """:func:`~fsinfo_fast.reference.saturation.perturbed_vjp` of the cotangents ``u``
        (``[B, c, m]``) on the float64 copy, the signs of :data:`SATURATION_STREAM`; or why
        it cannot run (``what`` names the reading)."""
        try:
            enc64 = self._float64_encoder(confirm=False)
            return perturbed_vjp(enc64.fn, enc64.x, u, seed=SATURATION_STREAM)[0]
        except torch.OutOfMemoryError:
            raise
        except (EncoderError, RuntimeError, NotImplementedError) as err:
            return (f"the saturating activations' rounding cannot be read{what} "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]})")

    def _logdet_jerr(self) -> Tensor | None:
        """``[B]`` float64: a bound on ``||dJ||_2`` (``J``'s units) for the randomized log det
        where the computed Jacobian's own error exceeds what its products' rounding model
        holds (:mod:`~fsinfo_fast.estimators.lanczos`: a few unit roundoffs of ``||J||``;
        every float32 ``tanh`` at 8.5 rounds its derivative to few digits, and the interval
        missed the truth by 24 half-widths, a float64 one at 18.5 by 12, an upper bound fell
        0.5-3.5 nats/dim below it, helper 103): :data:`~fsinfo_fast.estimators.exact_fast.
        SAFETY` times ``||dJ||_F`` (at least ``||dJ||_2``) as the cotangents read it, for the
        working dtype's products against float64 ones and float64's own rounding in
        saturating activations (:meth:`_jerr_read`), each where it exceeds
        :data:`JERR_GATE` unit roundoffs of ``||J||_F`` (below, the model holds it). None
        where nothing exceeds it or no float64 copy can run (the model alone, as before)."""
        if self._jerr_cache is None:
            self._jerr_cache = (self._jerr_read(),)
        return self._jerr_cache[0]

    def _jerr_read(self) -> Tensor | None:
        """:meth:`_logdet_jerr`'s reading (once per batch). Each ``||dJ||_F`` is read over
        :data:`SATURATION_COLS` Gaussian cotangents (one cotangent under-read a single
        saturated unit's error more than 10x in about 8% of draws, helper 107): float64's own
        from :meth:`_saturation_cols`, the working dtype's from fresh paired VJPs where the
        rounding check's own pair (:meth:`_pair`) passes a screen 100x below the gate."""
        if self._exact_unavailable(attempt=True, confirm=False) is not None:
            return None

        def norm(cols: Tensor) -> Tensor:  # ||.||_F from per-column root mean squares
            return _rms(cols, 1) * math.sqrt(self.d)

        def fro(v: Tensor) -> Tensor:  # ||.||_F per sample from [B, c, d] cotangents' VJPs
            return norm(_rms(v, 1))

        total = None
        try:
            if self.enc.x.dtype != torch.float64:
                g64, g, *_ = self._pair()
                eps = torch.finfo(self.enc.x.dtype).eps
                if bool((fro(g - g64) > JERR_GATE / 100 * eps * fro(g64)).any()):
                    p, p64, _, u = self._check_products_for(self.m, SATURATION_COLS,
                                                            JERR_STREAM)
                    g64 = p64.vjp(u)
                    g = p.vjp(u.to(p.dtype).to(p.device)).to(g64)
                    err, ref = fro(g - g64), fro(g64)
                    total = torch.where(err > JERR_GATE * eps * ref, EXACT_SAFETY * err, 0.0)
            sat = self._saturation()
            if isinstance(sat, Tensor) and bool((sat != 0).any()):
                cols = self._saturation_cols()
                if isinstance(cols, str):
                    return None  # (no reading: _modes_flagged says why)
                got = self._modes()
                err, ref = norm(cols.to(torch.float64)), fro(got[1].to(torch.float64))
                own = torch.where(err > JERR_GATE * reference.oracle.U64 * ref,
                                  EXACT_SAFETY * err, 0.0)
                total = own if total is None else total + own.to(total)
        except torch.OutOfMemoryError:
            raise
        except (EncoderError, RuntimeError, NotImplementedError):
            return None
        if total is None or not bool((total > 0).any()):
            return None
        return total.to(torch.float64)

    def _saturation_cols(self) -> Tensor | str:
        """``[B, d]`` float64: how one unit roundoff in the saturating activations' outputs
        moves each column of ``J`` (:func:`~fsinfo_fast.reference.saturation.perturbed_vjp`,
        the signs of :meth:`_saturation`), the root mean square of its change over
        :data:`SATURATION_COLS` seeded Gaussian cotangents (stream
        :data:`SATURATION_COLS_STREAM`; ``E (u^T dJ_k)^2 = |dJ_k|^2``), computed once per batch
        for the oracle's per-column allowance (:meth:`_oracle_measured`: a float64 forward and
        ``2 *`` :data:`SATURATION_COLS` VJPs, next to its ``min(m, d)`` products); or why it
        cannot run."""
        if self._sat_cols_cache is None:
            try:
                _, _, _, u = self._check_products_for(self.m, SATURATION_COLS,
                                                      SATURATION_COLS_STREAM)
            except torch.OutOfMemoryError:
                raise
            except (EncoderError, RuntimeError, NotImplementedError) as err:
                diff = (f"the saturating activations' rounding cannot be read per column "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:200]})")
            else:
                diff = self._perturbed(u, " per column")
            self._sat_cols_cache = diff if isinstance(diff, str) else _rms(diff, 1)
        return self._sat_cols_cache

    def _own_cols(self, diag: Tensor) -> Tensor | None:
        """``[B, d]``: :meth:`_saturation_cols`' change of each column against the column's
        norm, ``sqrt(diag)`` (the oracle's or the fast exact route's ``[B, d]``; 0 where the
        norm is 0 or not computed: a NaN row of a partial oracle); None where that reading
        failed."""
        cols = self._saturation_cols()
        if isinstance(cols, str):
            return None
        size = diag.to(torch.float64).sqrt()
        own = torch.where(size > 0, cols.to(size) / size, 0.0)
        return torch.where(torch.isnan(own), 0.0, own)

    def _saturation_col(self, kind: str, a: Tensor) -> Tensor:
        """``[B]``: :meth:`_saturation`'s change read as a relative error per column at a
        weighting (:func:`_column_weights`, :func:`_per_column`); no products."""
        diff = self._saturation()
        _, _, z, R, *_ = self._modes_cache
        w, _, scale = _column_weights(R, kind, a.to(R).reshape(-1, 1))
        v = z * w.unsqueeze(1)
        gap = torch.einsum("bcd,bjd->bcj", diff.to(v), v).abs().flatten(1).amax(dim=1)
        return _per_column(gap, z, scale)

    def _fast_measured(self, r: MetricResult, s: Tensor, floor: float,
                       exact_rows: Tensor | None = None) -> MetricResult:
        """The fast exact route's FSInfo_diag or dFIL ``r`` with its interval at least the
        randomized routes' measured rounding allowance (:meth:`_rounding_measured`, the same
        float64 copy): its own check recomputes a few columns in float64, which can miss
        the ones that round worst (nearly dead columns 174-394x too large in float32 on a
        transformers ConvNeXt cut with sparse inputs: 500-1000 half-widths off the oracle
        floorless); every column is in the measurement's products.
        ``info["rounding_measured"]`` records it. ``exact_rows`` (``[B]`` bool): samples whose
        value is the float64 oracle's (:meth:`_exact_rows`), which keep their interval."""
        if r.metric not in ("fsinfo_diag", "dfil") or self.enc.x.dtype == torch.float64:
            return r
        meas = self._measured(r, s, floor)
        if meas is None:
            return r
        extra = (meas - r.ci_halfwidth).clamp_min(0)
        extra = torch.where(torch.isnan(extra), torch.zeros_like(extra), extra)
        if exact_rows is not None:
            extra = torch.where(exact_rows.to(extra.device), torch.zeros_like(extra), extra)
        return dataclasses.replace(r, ci_halfwidth=r.ci_halfwidth + extra,
                                   bias_bound=r.bias_bound + extra,
                                   info={**r.info, "rounding_measured": meas.tolist()})

    def _fast_missed(self, r: MetricResult, estimator: str,
                     tol: tuple) -> tuple[Tensor, str] | None:
        """``auto`` only: the samples (``[B]`` bool) whose value the float64 oracle replaces in
        the fast exact route's result ``r``, and why (None: keep it). The fast route's interval
        is its measured rounding allowance (:mod:`~fsinfo_fast.estimators.exact_fast`); where
        that misses the tolerance ``tol = (atol, rtol)`` (products that lose most of their
        digits: a saturated activation, an underflow, a flipped max-pool tie) and the oracle
        fits, the oracle serves those samples, as it does for a randomized estimate that missed
        it. ``r.converged`` is set False for the samples that missed it (the route asked for
        explicitly, or no oracle: ``r`` is kept)."""
        met = tolerance_met(r.value, r.ci_halfwidth, *tol)
        r.converged.logical_and_(met)  # (where it is kept: what its interval holds)
        if estimator != "auto" or bool(met.all()) or not self._oracle_fits():
            return None
        worst = float(r.ci_halfwidth[~met].max())
        return ~met, (f"its rounding allowance (measured against float64; a half-width up to "
                      f"{worst:.3g} {r.units} on the samples concerned) missed the tolerance")

    def _slq_store(self) -> SLQProbeStore:
        """The SLQ probes of this batch and their Krylov recursions, shared by every log-det
        request (any sigma, prior, order cap) and dFIL ``method="lanczos"``. Its Krylov bases
        are kept up to the same share of the memory budget as the diagonal probe state's
        snapshots (older blocks are released beyond it, and rebuilt from their probes if a
        later request needs higher orders)."""
        if self._slq is None:
            budget = self.memory_budget or default_memory_budget(self.enc.x.device)
            self._slq = SLQProbeStore(self.products, seed=self.seed, sample_ids=self.sample_ids,
                                      memory_bytes=int(min(budget // _SNAPSHOT_SHARE,
                                                           _SNAPSHOT_MAX)))
        return self._slq

    def _diag_state(self, snapshot_bytes: int | None = None,
                    pinned_rows_only: bool = False) -> DiagProbeState:
        """The Gaussian VJP probes of this batch, shared by every diagonal request (FSInfo_diag
        at any sigma or floor, dFIL with ``method="diag"``, ``sigma*``). ``snapshot_bytes``:
        start a fresh state with that snapshot budget (default: a share of the memory budget)
        and ``pinned_rows_only`` (see :class:`~.estimators.DiagProbeState`)."""
        if self._dstate is None or snapshot_bytes is not None:
            budget = self.memory_budget or default_memory_budget(self.enc.x.device)
            if snapshot_bytes is None:
                snapshot_bytes = int(min(budget // _SNAPSHOT_SHARE, _SNAPSHOT_MAX))
            self._dstate = DiagProbeState.for_products(
                self.products, seed=self.seed, sample_ids=self.sample_ids,
                snapshot_bytes=snapshot_bytes)
            self._dstate.pinned_rows_only = pinned_rows_only
        return self._dstate

    def _diag(self, s: Tensor, floor: float, stop: StoppingRule, stop_on: str = "fsinfo_diag"):
        """The diagonal estimator on this batch's products (memoised per request), under the
        rule ``stop`` for ``stop_on``'s tolerance (:func:`~.estimators.estimate_diag`); each
        call returns its own copy of the memo.

        Every request replays the shared probe state (:meth:`_diag_state`): the round boundaries
        it already holds cost no products (``info["reused_probes"]``), only probes beyond them
        are drawn. The result equals that of a fresh :func:`estimate_diag` call. Where a boundary
        the request needs was dropped to bound memory, the request runs on a fresh state
        (recorded in ``info["probe_state"]``).
        """
        key = (tuple(s.tolist()), floor, stop, stop_on)
        hit = self._diag_cache.get(key)
        if hit is None:
            call = dict(sigma=s, floor=floor, seed=self.seed, sample_ids=self.sample_ids,
                        stop=stop, stop_on=stop_on)
            try:
                hit = estimate_diag(self.products, state=self._diag_state(), **call)
            except SnapshotDroppedError as err:
                self._dstate = None
                hit = estimate_diag(self.products, state=self._diag_state(), **call)
                for est in (hit.fsinfo_diag, hit.dfil):
                    est.info["probe_state"] = f"recomputed on a fresh probe state ({err})"
            self._diag_cache[key] = hit
        return _own_copy(hit)

    def _diag_route(self, estimator: str, s: Tensor, floor: float,
                    stop: StoppingRule) -> tuple[str, str]:
        """``("plain" | "deflated", why)`` for FSInfo_diag. ``auto`` predicts the plain
        estimator's probes from its first round of Gaussian VJPs in the shared probe state (the
        plain estimator's own stage 1, so they are not spent twice): ``K_1 (1.96 se_1 / tol)^2``
        with ``tol`` the tolerance (``atol``, or ``rtol |value|``). Within a factor
        ``_PILOT_BAND`` of :data:`~.estimators.deflated.DEFLATE_ABOVE` that few probes' spread
        cannot decide, and the deflation pilot's prediction (cross-column terms,
        :data:`~.estimators.deflated.PILOT_PROBES` more VJPs) does. Deflates where the batch's
        largest prediction exceeds ``DEFLATE_ABOVE`` (a choice per batch)."""
        if estimator == "deflated":
            return "deflated", "requested"
        if estimator != "auto":
            return "plain", "requested"
        if stop.num_probes is not None:
            return "plain", "a fixed num_probes (deflation chooses its rank for a tolerance)"
        # the plain estimator's first round (its stage 1, served to it from the shared state)
        kp = initial_probes(max_probes=stop.max_probes)
        pilot = self._diag(s, floor, _fixed(kp)).fsinfo_diag
        tols = []
        if stop.atol is not None:
            tols.append(torch.full_like(pilot.value, float(stop.atol)))
        if stop.rtol is not None:
            tols.append(float(stop.rtol) * pilot.value.abs())
        tol = torch.stack(tols).max(dim=0).values.clamp_min(1e-300)
        pred = kp * (Z95 * pilot.stderr / tol) ** 2
        pred = torch.where(torch.isfinite(pilot.value), pred, torch.zeros_like(pred))
        kmax = float(pred.max())
        if DEFLATE_ABOVE / _PILOT_BAND < kmax < DEFLATE_ABOVE * _PILOT_BAND:
            # too close to call from a few probes' spread: the deflation pilot's prediction
            # (PILOT_PROBES more VJPs on the plain estimator's stream, cross-column terms; held
            # for the deflated estimator's rank choice)
            st = self._deflated_state()
            held = st.holds_pilot(PILOT_PROBES)
            k = predict_plain_probes(self.products, sigma=s, floor=floor, atol=stop.atol,
                                     rtol=stop.rtol, seed=self.seed,
                                     sample_ids=self.sample_ids, state=st)
            kmax = float(k.max())
            how = f"the deflation pilot ({PILOT_PROBES} {'held' if held else 'more'} VJPs)"
        else:
            how = f"its first round ({kp} VJPs, reused)"
        if kmax > DEFLATE_ABOVE:
            return "deflated", (f"the plain estimator was predicted to need {kmax:.0f} probes "
                                f"(> {DEFLATE_ABOVE}) from {how}")
        return "plain", (f"the plain estimator was predicted to need {kmax:.0f} probes "
                         f"(<= {DEFLATE_ABOVE}) from {how}")

    def _plain_diag(self, estimator: str, s: Tensor, floor: float, rule: StoppingRule,
                    stop: StoppingRule, why: str) -> tuple[Estimate, str, str]:
        """FSInfo_diag on the plain route (``rule``), and the route and why. Under ``auto`` the
        plain estimator first runs under a cap of ``_REROUTE_AT`` probes, giving up early; a
        batch with a sample that does not converge there takes the deflated route (``stop``)."""
        if not (estimator == "auto" and stop.adaptive and stop.max_probes > _REROUTE_AT):
            return self._diag(s, floor, rule).fsinfo_diag, "plain", why
        trial = dataclasses.replace(rule, max_probes=_REROUTE_AT, stop_unreachable=True,
                                    stop_batch=True)
        est = self._diag(s, floor, trial).fsinfo_diag
        if bool(est.converged.all()):
            return est, "plain", why
        n_bad, others = _unconverged(est)
        why = (f"rerouted: {why}, but it did not converge within {_REROUTE_AT} probes for "
               f"{n_bad} sample(s) ({est.num_probes} probes spent on it){others}")
        return self._deflated(s, floor, stop).fsinfo_diag, "deflated", why

    def _deflated_state(self) -> DeflatedProbeState:
        """The deflated estimator's products on this batch, shared by every deflated request
        (FSInfo_diag at any sigma or floor, dFIL with ``method="deflated"``, ``sigma*``): the
        sketch, the rank pilot's VJPs and the remainder probes with snapshots at round
        boundaries (within the same memory share as :meth:`_diag_state`)."""
        if self._dfstate is None:
            budget = self.memory_budget or default_memory_budget(self.enc.x.device)
            self._dfstate = DeflatedProbeState.for_products(
                self.products, seed=self.seed, sample_ids=self.sample_ids,
                snapshot_bytes=int(min(budget // _SNAPSHOT_SHARE, _SNAPSHOT_MAX)))
        return self._dfstate

    def _deflated(self, s: Tensor, floor: float, stop: StoppingRule,
                  stop_on: str = "fsinfo_diag"):
        """The deflated diagonal estimator (rank ``auto`` for a tolerance, else
        :data:`~.estimators.deflated.START_RANK`), memoised per request (each call returns its
        own copy of the memo).

        Every request replays the shared :meth:`_deflated_state`: the sketch columns, the rank
        pilot's VJPs and the remainder round boundaries it holds at the ranks chosen cost no
        products (``info["sketch_reused_passes"]``, ``"rank_pilot_reused_probes"``,
        ``"reused_probes"``); the result equals that of a fresh
        :func:`~.estimators.estimate_diag_deflated` call on the same sketch. Where a boundary
        was dropped to bound memory, the remainder probes at those ranks are drawn afresh
        (recorded in ``info["probe_state"]``).
        """
        key = ("deflated", tuple(s.tolist()), floor, stop, stop_on)
        hit = self._deflated_cache.get(key)
        if hit is None:
            rank = "auto" if stop.num_probes is None else min(
                START_RANK, max(1, min(self.m, self.d) // 2))
            st = self._deflated_state()
            call = dict(sigma=s, floor=floor, seed=self.seed, sample_ids=self.sample_ids,
                        rank=rank, stop=stop, stop_on=stop_on,
                        fsinfo_rounding=False)  # (rounding_allowance is added to the result)
            try:
                hit = estimate_diag_deflated(self.products, state=st, **call)
            except SnapshotDroppedError as err:
                st.forget_remainders()
                hit = estimate_diag_deflated(self.products, state=st, **call)
                for est in (hit.fsinfo_diag, hit.dfil):
                    est.info["probe_state"] = f"recomputed on fresh remainder probes ({err})"
            self._deflated_cache[key] = hit
        return _own_copy(hit)

    # -- dFIL --------------------------------------------------------------------------------
    @ieee_fp32_method
    @_modes_checked("dfil")
    def dfil(
        self,
        sigma: float | Tensor = 0.1,
        *,
        estimator: str = "auto",
        rtol: float | None = 0.01,
        atol: float | None = None,
        num_probes: int | None = None,
        max_probes: int | None = None,
        method: str = "auto",
    ) -> MetricResult:
        r"""Per-sample dFIL ``tr(J^T J)/(sigma^2 d)`` in 1/dim (see :func:`fsinfo_fast.dfil`).

        ``estimator="auto"`` with a tolerance predicts the products the randomized route will
        spend under the three-stage stopping rule (stages 1 + 2 + 3,
        :func:`~fsinfo_fast.estimators.stopping.planned_probes`) from what this batch already
        holds (:meth:`_dfil_costs`: FSInfo_diag's Gaussian VJPs, its deflated estimate) or,
        if nothing, from the first round of the chosen method, and takes the fast exact route
        at once where that is predicted cheaper than the randomized one (``min(m, d)``
        products), or where the randomized one would stop at its probe cap (reason in
        ``info["auto"]``). A randomized estimate that still misses its tolerance within the
        cap is replaced by the exact route as before (:meth:`_finish`).

        ``method="lanczos"``: Hutchinson over the SLQ probes of this batch
        (:func:`~fsinfo_fast.estimators.lanczos.slq_trace`, Rademacher on the smaller side),
        ``||v||^2 T_{11}`` per probe: free for the probes a log-det request already ran, one
        Krylov step (two products) per new probe, which the next log det then reuses.
        ``method="auto"`` weighs it from those probes' spread where a log det was computed.

        ``method="auto"`` with an ``rtol``: where every method predicted from what is held (or,
        with nothing held, the Rademacher estimator's first round) needs more than
        :data:`_DEFLATED_DFIL_ABOVE` (512) new products, the deflated dFIL
        (Hutch++'s split: a sketch of the dominant directions exactly, the remainder by probes)
        is weighed too where ``min(m, d) >= DEFLATE_ABOVE``, from its own rank choice (the
        rank pilot's 8 VJPs and the sketch,
        reused by its estimate; ``info["auto_prediction_passes"]`` counts them where another
        method is taken). On deep splits of a pretrained network, where a few directions
        dominate ``J^T J``, it needs several times fewer products than plain probes.

        ``max_probes=None`` (the default) caps the probes per sample at ``min(m, d)`` under
        ``estimator="auto"`` (the products of the fast exact route it would fall back to;
        ``method="lanczos"`` keeps its own cap, the SLQ probes held plus ``min(m, d) / 2`` new
        ones at two products each), and at :data:`DEFAULT_MAX_PROBES` for an explicitly
        randomized estimator.
        """
        self._check_unchanged()
        self._request += 1
        again = functools.partial(self.dfil, sigma, estimator=estimator, rtol=rtol, atol=atol,
                                  num_probes=num_probes, max_probes=max_probes, method=method)
        _check_choice("estimator", estimator, ESTIMATORS)
        estimator = self._auto_without_exact(estimator)
        _check_tol("atol", atol)  # checked whichever route serves (auto's exact ones too)
        _check_tol("rtol", rtol)
        _check_choice("method", method, DFIL_METHODS)
        asked = _check_max_probes(max_probes)
        check_fixed_cap(num_probes, asked)
        s = self._sigma(sigma)
        n = self._exact_n()
        if estimator == "deflated":  # the deflated diagonal estimator's trace (Hutch++ split)
            _check_dfil_route(estimator, method)
            method, estimator = "deflated", "randomized"
        tol_run = num_probes is None and (rtol is not None or atol is not None)
        # the probe cap of the single-stream methods under auto (the oracle's products); the
        # SLQ probes held are free, each new one costs two products
        held = self._slq.k if self._slq is not None else 0
        own_l = held + n // 2
        max_probes = _cap(asked, n, estimator)
        max_probes_l = _cap(asked, n, estimator, own=own_l)
        mp = max(_CAP_FLOOR, min(max_probes, n)) if estimator == "auto" else max_probes
        mp_l = (max(_CAP_FLOOR, min(max_probes_l, own_l)) if estimator == "auto"
                else max_probes_l)
        def rule_for(method: str) -> StoppingRule:  # the rule each method's estimate runs under
            cap = None
            if estimator == "auto":
                cap = own_l if method == "lanczos" else n - 3 * (min(n, 10) if method == "hutch++"
                                                                 else 0)
                cap = max(2, cap)
            return _stopping(atol, rtol, num_probes,
                             max_probes_l if method == "lanczos" else max_probes, cap,
                             fallback=estimator == "auto", batch=False)

        costs = self._dfil_costs(s, rtol, atol, mp, mp_l) if tol_run else {}
        if rtol is None:  # diag and deflated stop on rtol only: not auto's choice under atol
            costs = {k: v for k, v in costs.items() if k not in ("diag", "deflated")}
        method_reason = None
        if method == "auto":  # the cheapest of the probes held, else Rademacher JVPs
            if estimator == "auto" and tol_run and not costs:
                costs["hutchinson"] = self._first_round_cost(s, rtol, atol, mp)
            # the deflated dFIL where the others need many products and the exact route is
            # not cheap either (below that its pilot and first sketch block, 40 products, cost
            # a sizable share of what it could save)
            best = min((c["new"] for c in costs.values()), default=0.0)
            if (tol_run and atol is None and "deflated" not in costs
                    and n >= DEFLATE_ABOVE and best > _DEFLATED_DFIL_ABOVE):
                # under the rule its estimate runs with (below), so that the estimate takes the
                # ranks predicted and reuses their pilot and sketch
                costs["deflated"] = self._deflated_dfil_cost(
                    s, dataclasses.replace(rule_for("deflated"), atol=None), best)
            method, method_reason = self._dfil_method(num_probes, costs)
        k0 = initial_probes(num_probes=num_probes, max_probes=max_probes,
                            quantity="fsinfo_diag" if method == "diag" else "trace")
        sketch = min(n, 10) if method == "hutch++" else 0
        if method == "lanczos":
            cost = 2 * max(0, k0 - held)
        else:
            cost = expected_passes("hutch++" if method == "hutch++" else "hutchinson",
                                   d=self.d, m=self.m, num_probes=k0, sketch_size=sketch)
        if estimator not in ("exact", "exact-fast"):  # checked on every route (the exact one
            _stopping(atol, rtol, num_probes, max_probes, None)  # held took any before)
        why = self._auto_exact(estimator, cost, spectrum=False, fixed=num_probes is not None)
        if why is not None:
            return self._exact_dfil(s, why, estimator, (atol, rtol))
        if self._replanned(estimator):
            return again()
        prediction: dict[str, Any] = {}
        if estimator == "auto" and tol_run and method != "hutch++":
            why, prediction = self._dfil_predicted_exact(s, method, costs, rtol, atol,
                                                         mp_l if method == "lanczos" else mp)
            if why is not None and self._exact_unavailable(attempt=True) is None:
                r = self._exact_dfil(s, why, estimator, (atol, rtol))
                r.info["auto_prediction_passes"] = prediction.get("passes", 0)
                if method_reason is not None:
                    r.info["method_reason"] = method_reason
                return r
            if self._replanned(estimator):
                return again()
        stop = rule_for(method)
        common = {"sigma": s, "seed": self.seed, "sample_ids": self.sample_ids}
        start = dataclasses.replace(stop, min_probes=min(k0, stop.max_probes))
        if method == "diag":
            if stop.rtol is None and stop.atol is not None and num_probes is None:
                raise InvalidInputError("method='diag' stops on rtol (or num_probes), not atol")
            # the rule's rtol is dFIL's (atol is not used for dFIL)
            est = self._diag(s, 0.0, dataclasses.replace(start, atol=None), "dfil").dfil
        elif method == "deflated":
            if stop.rtol is None and num_probes is None:
                raise InvalidInputError("method='deflated' stops on rtol (or num_probes)")
            est = self._deflated(s, 0.0, dataclasses.replace(stop, atol=None), "dfil").dfil
        elif method == "lanczos":
            est = slq_trace(self.products, store=self._slq_store(), stop=start, **common)
        elif method == "hutchinson":
            est = hutchinson_trace(self.products, side="input", kind="rademacher", stop=start,
                                   exact_columns=self._dominant(), live_columns=self.enc.live,
                                   **common)
            est = dataclasses.replace(est, passes=est.passes + self._dominant_passes())
        else:
            est = hutchpp_trace(self.products, sketch_size=sketch, stop=start, **common)
        why = self._finish(est, False, estimator, "dfil", stop.max_probes,
                           fixed=num_probes is not None)
        if why is None and self._replanned(estimator):
            return again()
        bad = None if why is None or bool((~est.converged).all()) else ~est.converged

        def whole(why: str) -> MetricResult:  # the batch's exact route
            r = self._exact_dfil(s, why, estimator, (atol, rtol))
            r.info["auto_randomized_passes"] = int(est.passes)  # spent before the switch
            if prediction:
                r.info["auto_prediction"] = prediction["why"]
                r.info["auto_prediction_passes"] = prediction.get("passes", 0)
            return r

        if why is not None and bad is None:
            return whole(why)
        extra: dict[str, Any] = {"method": method}
        if method_reason is not None:
            extra["method_reason"] = method_reason
        if prediction:
            extra["auto_prediction"] = prediction["why"]
            extra["auto_prediction_passes"] = prediction.get("passes", 0)
        elif any("spent" in c for c in costs.values()):  # the method choice's own products
            extra["auto_prediction_passes"] = sum(int(c.get("spent", 0))
                                                  for c in costs.values())
        r = self._rounding_fixed(self._lost_fixed(
            _to_result(est, metric="dfil", units="1/dim", sigma=s, d=self.d, m=self.m,
                       info=self._info(**extra), dtype=self.enc.x.dtype), estimator, s,
            tol=(atol, rtol), fixed=num_probes is not None), estimator, s, 0.0, (atol, rtol),
            fixed=num_probes is not None)
        if bad is not None and r.estimator in ("randomized", "mixed"):
            return self._capped_part(r, bad, s, 0.0, None, (atol, rtol), why, whole)
        return r

    def _plan(self, need: Tensor, min_probes: int, mp: int, relf, *, source: str,
              held: Tensor | None = None, rows: bool = True) -> dict[str, Any]:
        r"""A method's predicted cost from each sample's ``need`` (``[B]``, :meth:`_need_each`)
        under the three-stage rule (:func:`~.estimators.stopping.planned_probes` per sample),
        as :meth:`_dfil_costs` reports it: ``"new"`` the products per sample beyond the
        ``held`` probes each sample already has (``[B]``; none by default), the batch mean
        where the estimator's rounds run on the samples still running
        (:data:`~.estimators.base.ROW_SUBSETS` not ``"never"``: each sample spends its own),
        the worst sample's where every round runs on the whole batch (or ``rows=False``: a
        method whose rounds always do); ``"total"`` and ``"need"`` the worst sample's (the total
        is what the probe cap is checked against)."""
        tot = torch.tensor([planned_probes(float(n), min_probes=min_probes, max_probes=mp,
                                           rtol=relf) for n in need.tolist()],
                           dtype=torch.float64)
        new = tot if held is None else (tot - held.to(tot)).clamp_min(0.0)
        rows = rows and _base.ROW_SUBSETS != "never" and hasattr(self.products, "select")
        c = {"new": float(new.mean() if rows else new.max()), "total": float(tot.max()),
             "need": float(need.max()), "from": source}
        if rows and len(new) > 1:
            c["from"] = f"{source}; each sample's own, batch mean"
        return c

    @staticmethod
    def _need_each(value: Tensor, var: Tensor, rtol, atol) -> Tensor:
        """Probes each sample needs for a 95% half-width at the tolerance by the normal
        interval, ``var (1.96 / tol)^2`` (``value``, ``var``: ``[B]`` dFIL and the per-probe
        variance in dFIL units; ``tol = max(rtol |value|, atol)``; 0 for a non-finite
        value)."""
        tols = []
        if rtol is not None:
            tols.append(rtol * value.abs())
        if atol is not None:
            tols.append(torch.full_like(value, float(atol)))
        tol = torch.stack(tols).max(dim=0).values.clamp_min(1e-300)
        need = var.clamp_min(0) * (Z95 / tol) ** 2
        return torch.where(torch.isfinite(value), need, torch.zeros_like(need)).cpu()

    def _dfil_costs(self, s: Tensor, rtol, atol, mp: int,
                    mp_lanczos: int | None = None) -> dict[str, dict[str, Any]]:
        r"""Predicted new products per sample of each dFIL method whose variance this batch
        already holds (:meth:`_plan`: each sample's own, their mean where the rounds run on the
        samples still running, else the worst sample's), under the three-stage rule
        (:func:`~fsinfo_fast.estimators.stopping.planned_probes`: stages 1 + 2 + 3 on the
        round schedule, about ``n1 + N/4 + N`` for ``N`` the probes the tolerance needs):
        ``{method: {"new": products, "total": probes of its rule, "need": N}}``.

        From the ``K`` Gaussian VJPs held (FSInfo_diag's): the per-probe variance of ``||J^T
        u||^2`` is :math:`2\|J^TJ\|_F^2` (estimated by the sample variance ``v_G``), that of
        input-side Rademacher :math:`2(\|J^TJ\|_F^2 - \sum_k D_k^2)` (``v_G - 2 \sum_k \hat
        D_k^2 K/(K+2)``, the chi-square mean's second moment removed): ``diag`` costs its
        total less the ``K`` held, ``hutchinson`` its total. From FSInfo_diag's deflated
        estimate (a deflated sketch held): the remainder's per-probe variance of its dFIL
        recorded alongside (stage 3's, at its rank); ``deflated`` costs
        :data:`~.estimators.deflated.PILOT_PROBES` pilot VJPs plus the remainder's total (the
        sketch is shared; a larger rank, where it pays, only lowers the remainder's count).
        From the ``K`` SLQ probes held (a log det on this batch, :meth:`_slq_store`): their
        Hutchinson terms ``||v||^2 T_{11}`` give the per-probe variance of the same estimator
        (probes of the SLQ distribution on the smaller side); ``lanczos`` costs two products
        (one Krylov step) per probe of its total beyond the ``K`` held (cap ``mp_lanczos``);
        where those probes are Rademacher on the input side (``m >= d``), the ``hutchinson``
        method's probes have their distribution, and its cost is predicted from the same
        spread when no Gaussian VJPs predict it.
        """
        out: dict[str, dict[str, Any]] = {}
        scale = 1.0 / (s.to(torch.float64) ** 2 * self.d)
        relf = rtol if atol is None else None
        st = self._dstate
        if st is not None and int(st.counts.min()) >= 2:
            # each sample's own probes (a sample that stopped early holds fewer)
            k = int(st.counts.min())
            kr = st.counts.to(torch.float64)
            norms = st.norms()
            held = torch.isfinite(norms)
            mean = torch.where(held, norms, 0.0).sum(dim=1) / kr
            dev2 = torch.where(held, (norms - mean[:, None]) ** 2, 0.0).sum(dim=1)
            tr = mean * scale
            var_g = dev2 / (kr - 1.0) * scale**2
            dhat = st.group_sums.sum(dim=1) / kr[:, None]
            var_r = (var_g - 2.0 * (dhat**2).sum(dim=1) * kr / (kr + 2.0) * scale**2)
            # each sample's own three-stage total, less the VJPs it holds (diag: the same
            # Gaussian probes continue; hutchinson: new Rademacher probes)
            out["diag"] = self._plan(self._need_each(tr, var_g, rtol, atol),
                                     min(START_PROBES, mp), mp, relf, held=kr,
                                     source=f"the {k}+ Gaussian VJPs held")
            out["hutchinson"] = self._plan(
                self._need_each(tr, var_r.clamp_min(0.0), rtol, atol),
                initial_probes(max_probes=mp, quantity="trace"), mp, relf,
                source=f"the {k}+ Gaussian VJPs held")
        held = [(key, est) for key, est in self._deflated_cache.items()]
        if held:
            key, hit = held[-1]
            df = hit.dfil
            k3 = (df.probes_per_sample - df.info["pilot_probes"]).to(torch.float64)
            sig_fs = torch.as_tensor(key[1], dtype=torch.float64, device=df.value.device)
            f = (sig_fs / s.to(torch.float64)) ** 2  # the held dFIL at this sigma
            v = df.value * f
            var = (df.stderr * f) ** 2 * k3.clamp_min(1)
            c = self._plan(self._need_each(v, var, rtol, atol), min(START_PROBES, mp), mp,
                           relf, source=(f"FSInfo_diag's deflated estimate (rank "
                                         f"{max(df.info['rank'])}, {int(k3.min())}+ remainder "
                                         "probes)"))
            out["deflated"] = {**c, "new": PILOT_PROBES + c["new"]}
        sl = self._slq
        if sl is not None and sl.k >= 2:
            k, mpl = sl.k, mp if mp_lanczos is None else mp_lanczos
            terms = sl.trace_terms(0, k) * scale[:, None]  # held: no products
            need_l = self._need_each(terms.mean(dim=1), terms.var(dim=1), rtol, atol)
            # the SLQ store's rounds run on the whole batch: the worst sample's cost
            c = self._plan(need_l, initial_probes(max_probes=mpl, quantity="trace"), mpl, relf,
                           held=torch.full_like(need_l, float(k)), rows=False,
                           source=f"the {k} SLQ probes held (log det; 2 products per new probe)")
            out["lanczos"] = {**c, "new": 2.0 * c["new"], "cap": mpl}
            if "hutchinson" not in out and sl.side == "input" and sl.kind == "rademacher":
                # the very distribution of the hutchinson method: its cost from the same spread
                out["hutchinson"] = self._plan(
                    need_l, initial_probes(max_probes=mp, quantity="trace"), mp, relf,
                    source=(f"the {k} SLQ probes held (Rademacher, input side: the same "
                            "distribution)"))
        return out

    def _dfil_method(self, num_probes, costs: dict[str, dict[str, Any]]) -> tuple[str, str]:
        r"""``auto``'s dFIL method and why: of the methods whose cost this batch can predict
        (:meth:`_dfil_costs`: ``diag`` and ``hutchinson`` from the Gaussian VJPs held,
        ``deflated`` where FSInfo_diag took the deflated route, ``lanczos`` from the SLQ probes
        of a log det; under ``auto`` with nothing held, ``hutchinson`` from its first round;
        ``deflated`` from its own rank choice, :meth:`_deflated_dfil_cost`, where the others
        predict more than :data:`_DEFLATED_DFIL_ABOVE` new products), the one
        predicted to spend the fewest new products under the three-stage rule (the deflated
        on a tie); Rademacher (``hutchinson``) where nothing predicts. With a fixed
        ``num_probes``: ``diag`` (one VJP per probe beyond those held) or ``lanczos`` (two
        products per probe beyond those held), whichever spends fewer (``diag`` on a tie)."""
        st, sl = self._dstate, self._slq
        if num_probes is not None:
            fixed = {}
            held = int(st.counts.min()) if st is not None else 0
            if held >= 2:
                fixed["diag"] = (max(0, num_probes - held),
                                 f"{held} Gaussian VJPs already drawn by FSInfo_diag are reused")
            if sl is not None and sl.k >= 2:
                fixed["lanczos"] = (2 * max(0, num_probes - sl.k),
                                    f"{sl.k} SLQ probes of the log det are reused")
            if fixed:
                best = min(fixed, key=lambda m: fixed[m][0])
                why = fixed[best][1]
                if len(fixed) > 1:
                    why += " (" + " vs ".join(f"{m}: {c} new products"
                                              for m, (c, _) in fixed.items()) + ")"
                return best, why
            return "hutchinson", "no diagonal (Gaussian VJP) probes drawn on this batch yet"
        if not costs:
            return "hutchinson", "no diagonal (Gaussian VJP) probes drawn on this batch yet"
        order = [m for m in ("diag", "hutchinson", "deflated", "lanczos") if m in costs]
        # ties: the deflated dFIL (its remainder has the dominant directions, which make the
        # spread of the few plain probes held an underestimate, taken out), then the first
        best = min((m for m in order if "not_taken" not in costs[m]),
                   key=lambda m: (costs[m]["new"], m != "deflated"))
        stages = {m: "stages 1-3 " for m in order}
        if "deflated" in costs:
            stages["deflated"] = ("pilot + remainder stages 1-3 " if "spent" not in
                                  costs["deflated"] else "pilot, sketch + remainder stages 1-3 ")
        parts = [f"about {costs[m]['new']:.0f} new products ({m}: {stages[m]}"
                 f"{costs[m]['total']:.0f} probes for N = {costs[m]['need']:.0f}, from "
                 f"{costs[m]['from']})" for m in order]
        parts = [p + (f" [not taken: {costs[m]['not_taken']}]" if "not_taken" in costs[m] else "")
                 for m, p in zip(order, parts, strict=True)]
        why = "predicted under the three-stage rule: " + " vs ".join(parts)
        if "deflated" in costs and "spent" not in costs["deflated"]:
            why += "; the deflated sketch of FSInfo_diag is shared"
        return best, why

    def _dfil_predicted_exact(self, s: Tensor, method: str, costs, rtol, atol,
                              mp: int) -> tuple[str | None, dict[str, Any]]:
        """``auto``: why the fast exact route is predicted cheaper than ``method`` under the
        three-stage rule (None: keep the randomized route), and the prediction (``why``,
        ``passes`` spent on it). Where nothing held predicts ``method``'s cost, its first round
        does (``diag``: Gaussian VJPs into the shared state, reused; ``hutchinson``: Rademacher
        JVPs, drawn again by the estimate; ``deflated``: no prediction)."""
        passes = sum(int(c.get("spent", 0)) for c in costs.values())
        c = costs.get(method)
        if c is None and method == "diag":
            k1 = min(START_PROBES, mp)
            self._diag(s, 0.0, _fixed(k1))
            c = self._dfil_costs(s, rtol, atol, mp).get("diag")
            if c is not None:
                c = {**c, "from": f"its first round ({k1} Gaussian VJPs, reused)"}
        elif c is None and method == "hutchinson":
            c = self._first_round_cost(s, rtol, atol, mp)
            passes += c["spent"]
        if c is None:
            return None, {}
        n = self._exact_n()
        check = 0 if self.enc.x.dtype == torch.float64 else min(CHECK_COLUMNS, n)
        what = (f"the randomized dfil ({method}) was predicted to need about {c['new']:.0f} new "
                f"products under the three-stage rule (stages 1-3: {c['total']:.0f} probes for "
                f"the N = {c['need']:.0f} the tolerance needs, from {c['from']})")
        pred = {"why": what, "passes": passes}
        if c["total"] > c.get("cap", mp):
            return (f"{what}, more than its probe cap {c.get('cap', mp)}: it would stop "
                    "unconverged"), pred
        if c["new"] >= n + check:
            return (f"{what}, no fewer than the exact route's {self._exact_n_text(n)} products"
                    + (f" (+ {check} float64 check JVPs)" if check else "")), pred
        return None, pred

    def _first_round_cost(self, s: Tensor, rtol, atol, mp: int) -> dict[str, Any]:
        """The ``hutchinson`` method's cost (as :meth:`_dfil_costs`) predicted from its first
        round of Rademacher JVPs (``"spent"``: those products, drawn again by the estimate)."""
        k1 = initial_probes(max_probes=mp, quantity="trace")
        r1 = hutchinson_trace(self.products, side="input", kind="rademacher", sigma=s,
                              seed=self.seed, sample_ids=self.sample_ids, num_probes=k1,
                              exact_columns=self._dominant())
        spent = int(r1.passes) + self._dominant_passes()
        c = self._plan(self._need_each(r1.value, r1.stderr**2 * k1, rtol, atol), k1, mp,
                       rtol if atol is None else None,
                       source=f"its first round ({k1} Rademacher JVPs, drawn again by the "
                              "estimate)")
        return {**c, "spent": spent}

    def _deflated_dfil_cost(self, s: Tensor, stop: StoppingRule,
                            best: float) -> dict[str, Any]:
        r"""The ``deflated`` method's cost (as :meth:`_dfil_costs`) where no deflated estimate
        is held, from the rank choice its estimate makes (:func:`~.estimators.deflated.
        choose_rank` on the shared :meth:`_deflated_state` under the rule ``stop`` the estimate
        runs with: the estimate then takes the same ranks and reuses the rank pilot and the
        sketch, ``"spent"``) and the remainder's three-stage total for the probes the rank
        pilot predicts there. ``"new"`` counts the remainder only (the pilot and sketch are
        spent either way), ``"total"`` each sample's products against the cap.

        Asked for only where the other methods predict ``best`` > :data:`_DEFLATED_DFIL_ABOVE`
        new products, and bounded: the first sketch block alone first;
        only where the pilot predicts it already saves something (the batch's mean share of
        the plain probes' need at most :data:`_DEFLATED_DFIL_FIRST`; a flat spectrum keeps
        about ``1 - r / min(m, d)``) does the sketch grow on, while the pilot and sketch cost
        at most :data:`_DEFLATED_DFIL_SPEND` of the cheaper of ``best`` and the exact route
        (what a prediction that is not taken costs). The pilot's predictions from 8 probes
        are noisy, so the deflated
        dFIL is taken only where the batch's mean predicted share is at most
        :data:`_DEFLATED_DFIL_SAVES` (``"not_taken"`` says why otherwise)."""
        mp = stop.max_probes
        n = min(self.m, self.d)
        kw = dict(sigma=s, floor=0.0, seed=self.seed, sample_ids=self.sample_ids, stop=stop,
                  stop_on="dfil", state=self._deflated_state())
        first = min(START_RANK, max(1, n // 2))
        ch = choose_rank(self.products, max_rank=first, **kw)
        spent = ch.pilot_new + ch.sketch_new

        def share(c) -> float:  # the batch's mean predicted share of the plain need
            return float((c.predicted / c.predicted_plain.clamp_min(1e-300)).mean())

        if share(ch) <= _DEFLATED_DFIL_FIRST:
            check = 0 if self.enc.x.dtype == torch.float64 else min(CHECK_COLUMNS, n)
            alt = min(best, n + check)  # the cheaper of the other methods and the exact route
            grow = min(int((_DEFLATED_DFIL_SPEND * alt - ch.pilot) // ch.per_col), n // 2)
            r = first  # the largest rank of the rank choice's own schedule within that
            while math.ceil(RANK_GROWTH * r) <= grow:
                r = math.ceil(RANK_GROWTH * r)
            if r > first:
                ch = choose_rank(self.products, max_rank=r, **kw)
                spent += ch.sketch_new
        before = int(ch.before_remainder().max())
        need = float(ch.predicted.max())
        tot = planned_probes(need, min_probes=min(START_PROBES, mp),
                             max_probes=max(1, mp - before), rtol=stop.rtol)
        if bool(ch.gave_up.any()):  # its rank choice saw the cap pass: it cannot converge
            tot = math.inf
        lo, hi = int(ch.ranks.min()), int(ch.ranks.max())
        c = {"new": tot, "total": before + tot, "need": need, "spent": spent,
             "from": (f"its rank pilot and a sketch of rank {lo if lo == hi else f'{lo}-{hi}'} "
                      f"({spent} products, reused by the estimate)")}
        if not share(ch) <= _DEFLATED_DFIL_SAVES:
            c["not_taken"] = (f"the pilot predicts the sketch keeps {share(ch):.0%} of the "
                              f"plain probes' need (batch mean; > {_DEFLATED_DFIL_SAVES:.0%})")
        return c

    def _exact_dfil(self, s: Tensor, why: str, estimator: str,
                    tol: tuple = (None, None)) -> MetricResult:
        src, why = self._exact_route(estimator, False, why)
        if isinstance(src, FastExactFisher):
            r, why = self._fast_exact(src, lambda fx: fx.dfil(s), s, 0.0, estimator, tol, why,
                                      self._info())
        else:
            r = self._oracle_met(src.dfil(s), estimator, tol)
        r.info["auto"] = why
        return self._lost_fixed(r, estimator, s)

    # -- noise calibration -------------------------------------------------------------------
    def _floor_matters(self, r: MetricResult, tau: Tensor, floor: float,
                       kw: dict[str, Any]) -> tuple[str | None, Tensor]:
        r"""Why the floorless ``sigma = 1`` estimate ``r`` cannot give FSInfo_diag's ``sigma*``
        with the paper's ``floor``, or None. The floor adds ``Delta(s) = (1/2d) sum_k log(1 +
        floor s^2 / (J^TJ)_kk) >= 0`` to FSInfo at noise ``s``, so the floorless root is a lower
        bound of the true one and the upper end of its interval holds only where ``Delta`` is
        small there: where an input dimension does not reach the output at all (``(J^TJ)_kk =
        0``: a crop, a skipped pixel; the floorless value is ``-inf`` and its ``sigma*`` was 0,
        interval [0, 0]) or where the floored estimate at the interval's upper end (the held
        probes, :meth:`fsinfo`) exceeds the floorless one there by more than 1% of the
        half-width (a target near the floor's asymptote ``log(floor) / 2 - log(2 pi e) / 2``;
        below it ``sigma*`` is infinite). Also returns ``[B]`` that floored-minus-floorless
        difference (>= 0; zeros without a floor), by which the caller widens the upper end."""
        none = torch.zeros_like(r.value)
        if floor <= 0:
            return None, none
        bad = ~torch.isfinite(r.value)
        if bool(bad.any()):
            return (f"{int(bad.sum())} sample(s) have input dimensions that do not reach the "
                    "output ((J^T J)_kk = 0: the floorless FSInfo is -inf)"), none
        from .encoder import SIGMA_RANGE

        hi = torch.exp(r.value + r.ci_halfwidth - tau).clamp(max=SIGMA_RANGE[1])
        at_hi = self.fsinfo(hi, floor=floor, **kw)
        delta = (at_hi.value - (r.value - torch.log(hi))).clamp_min(0)  # floored - floorless
        # (1% of the half-width, or of the tolerance where the half-width is far below it: the
        # float64 fast route's 4e-15 took a floor's 2e-11 nats/dim for "near the asymptote")
        tol = torch.zeros_like(r.value)
        if kw.get("atol") is not None:
            tol = tol.clamp_min(float(kw["atol"]))
        if kw.get("rtol") is not None:
            tol = torch.maximum(tol, float(kw["rtol"]) * r.value.abs())
        big = delta > 0.01 * torch.maximum(r.ci_halfwidth, tol)
        if not bool(big.any()):
            return None, delta
        why = (f"for {int(big.sum())} sample(s) the floor moves FSInfo at the interval's upper "
               f"end by {float(delta.max()):.3g} nats/dim (half-width "
               f"{float(r.ci_halfwidth.max()):.3g}): the target is near the floor's asymptote")
        return why, delta

    def _floored_sigma(self, tau: Tensor, floor: float,
                       kw: dict[str, Any]) -> tuple[SigmaResult | None, str]:
        r"""FSInfo_diag's ``sigma*`` with the floor, from the randomized estimator: a floored
        estimate (three stages as usual; first at ``sigma = 1``, then at the first solution:
        the probes and stages sized where the answer is) fixes the probes and stages, and
        FSInfo at any ``s`` from exactly those (:func:`~.estimators.diagonal.
        fsinfo_diag_restaged`) is decreasing in ``s``; ``sigma*`` solves ``value(s) = tau``,
        the interval's upper end ``sup {s : value + h >= tau}`` and its lower end ``inf {s :
        value - h <= tau}`` (``h`` the half-width at ``s``, rounding allowance included). Where
        the interval at the true ``sigma*`` covers ``tau`` (95%: Stein's interval holds at each
        fixed ``s``), ``sigma*`` lies between them, whatever ``h`` does elsewhere. ``inf``
        where ``tau`` is at or below the floor's asymptote ``log(floor) / 2 - log(2 pi e) / 2``
        (every estimate lies above it: exact), as the oracle says. Returns ``(None, why)``
        where this route cannot serve (the estimate took another route, or the probe state no
        longer holds its stages). A ``"mixed"`` estimate (some samples took an exact route,
        :meth:`_exact_part`): the equation is solved so for its randomized samples, and each
        sub-batch of the others by the float64 oracle on its own samples
        (:meth:`_parts_sigma`)."""
        first, why = self._floored_at(1.0, tau, floor, kw)
        if first is None:
            return None, why
        out, r = first
        # a target far above FSInfo(1): say so, not the metric's sigma check at the second
        # solve (helper 118); an exact 0 (every probe 0: J = 0) is a result
        _check_sigma_star(out.sigma, r.value, tau, exact_zero=out.sigma == 0)
        # (the probes and stages were chosen at sigma = 1, where the floor can hide the spread:
        # 14 probes there, and at sigma* of e^-2..e^-6 the interval missed the truth by up to 7
        # half-widths with converged True, helper 102; the estimate at the solution sizes them
        # there, and the equation is solved again on its probes)
        fin = torch.isfinite(out.sigma) & (out.sigma > 0)
        ref = torch.where(fin, out.sigma, torch.ones_like(out.sigma))
        # (within a factor e of sigma = 1 the stages sized there serve: solved once)
        if bool(fin.any()) and bool((torch.log(ref).abs() > 1).any()):
            again, why = self._floored_at(ref, tau, floor, kw)
            if again is None:
                return None, f"{why} (at the first solution's sigma*)"
            out2, r2 = again
            kept = {k: out.info[k] for k in ("probe_state",) if k in out.info}
            out = dataclasses.replace(out2, info={
                **kept, **out2.info, "fsinfo_sigma1": r, "fsinfo_at_solution": r2,
                "floor_solve": out2.info["floor_solve"] + (
                    "; solved first on the floored sigma = 1 estimate's probes, then again on "
                    "those of a floored estimate at that solution (its probes and stages sized "
                    "there)")})
            r = r2
        return self._floored_done(out, r, tau, floor, kw), ""

    def _floored_at(self, ref: float | Tensor, tau: Tensor, floor: float, kw: dict[str, Any]
                    ) -> tuple[tuple[SigmaResult, MetricResult] | None, str]:
        """:meth:`_floored_sigma`'s solve on the probes and stages of the floored randomized
        estimate at noise ``ref`` (float or ``[B]``): ``((sigma*, that estimate), "")``, or
        ``(None, why)`` where the estimate took another route or its stages cannot be held."""
        r = self.fsinfo(ref, floor=floor, **kw)
        at = "1" if isinstance(ref, float) else "the first solution"
        if r.estimator not in ("randomized", "mixed") or r.info.get("diag_method") != "plain":
            route = (r.info.get("diag_method") if r.estimator == "randomized" else
                     f"{r.estimator} ({r.info.get('auto')})" if r.info.get("auto")
                     else r.estimator)
            return None, f"the floored sigma = {at} estimate took the {route} route"
        tol = (kw.get("atol"), kw.get("rtol"))
        try:
            return (self._floored_solve(r, tau, floor, tol), r), ""
        except SnapshotDroppedError as err:
            # the shared state dropped a boundary of this estimate's stages (its snapshot
            # budget, or other requests' rounds): this estimate alone on a fresh state that
            # may keep its stages in half the memory budget (its pinned boundaries: stage
            # ends and stops), the same probes and result as a fresh call
            free = default_memory_budget(self.enc.x.device)
            budget = self.memory_budget or free
            st = self._dstate
            stages = 3 * st.batch * st.groups * st.d * 8  # each sample's three boundaries
            # (a memory_budget sizes the probe chunks; a tiny one should not make the snapshots
            # of three stage boundaries impossible where free memory holds them)
            # this estimate's stage boundaries only
            self._diag_state(snapshot_bytes=max(budget // 2, min(stages, free // 2)),
                             pinned_rows_only=True)
            self._diag_cache.clear()
            r = self.fsinfo(ref, floor=floor, **kw)
            try:
                out = self._floored_solve(r, tau, floor, tol)
            except SnapshotDroppedError as err2:
                return None, ("the estimate's stage boundaries do not fit in the memory "
                              f"for probe-state snapshots, also on a fresh state ({err2})")
            out.info["probe_state"] = f"recomputed on a fresh probe state ({err})"
            return (out, r), ""

    def _floored_done(self, out: SigmaResult, r: MetricResult, tau: Tensor, floor: float,
                      kw: dict[str, Any]) -> SigmaResult:
        """The floored ``sigma*`` ``out`` solved on the probes of ``r`` (the floored ``sigma =
        1`` estimate), with, under ``auto`` (no fixed probe count, the oracle fits), its
        samples that missed the tolerance at the solution sent to the float64 oracle alone
        (:meth:`_exact_part`): their probes and stages were chosen at ``sigma = 1``, where
        the floor can keep the spread tiny, and far below it (``sigma*`` of 2e-9) such an
        interval undercovered (3 of 10 seeds missed the oracle's ``sigma*``, each with
        ``converged`` False); then every sample that took an exact route is solved by its
        sub-batch's oracle (:meth:`_parts_sigma`)."""
        miss = ~out.converged
        miss[out.info.get("exact_samples", [])] = False
        if (kw.get("estimator") == "auto" and kw.get("num_probes") is None
                and bool(miss.any()) and self._oracle_fits()):
            why = ("the floored sigma* solved on the probes of the floored sigma = 1 estimate "
                   "missed the tolerance at the solution (its probes were chosen at sigma = 1)")
            try:
                part = self._exact_part(r, miss.cpu(), r.sigma, floor, kw.get("prior_var"),
                                        (kw.get("atol"), kw.get("rtol")), why, "exact")
            except _PartUnavailable:
                part = None  # (the interval stands, converged False)
            if part is not None:
                keys = ("exact_samples", "exact_samples_estimator", "exact_samples_auto",
                        "exact_fast_oracle_samples", "auto")
                out = dataclasses.replace(out, estimator="mixed", info={
                    **out.info, **{k: part.info[k] for k in keys}})
        return self._parts_sigma(out, tau, floor)

    def _parts_sigma(self, out: SigmaResult, tau: Tensor, floor: float,
                     oracle_only: bool = False) -> SigmaResult:
        """The ``sigma*`` ``out`` of a ``"mixed"`` estimate with the samples that took an exact
        route (:attr:`_parts`, ``info["exact_samples"]``) solved with the floor by the float64
        oracle of their sub-batch (held where it served them; one sample's oracle otherwise,
        not the batch's); ``oracle_only``: the sub-batches the oracle served in part only (a
        closed form from their values, of half-width 0, would neglect the floor: its upper
        end is no bound)."""
        if out.estimator != "mixed":
            return out
        took = dict(zip(out.info["exact_samples"], out.info["exact_samples_estimator"],
                        strict=True))
        sigma, lo, hi = out.sigma.clone(), out.ci_low.clone(), out.ci_high.clone()
        conv = out.converged.clone()
        for idx, sub, *_ in self._parts:
            if any(k not in took for k in idx.tolist()) or oracle_only and all(
                    took[k] != "exact" for k in idx.tolist()):
                continue  # (a part sent by a later call than out's, or no oracle's sample)
            i = idx.to(sigma.device)
            sig = sub.fsinfo_sigma(tau[i], estimator="exact", floor=floor)
            sigma[i], lo[i], hi[i] = (sig.sigma.to(sigma), sig.ci_low.to(lo),
                                      sig.ci_high.to(hi))
            conv[i] = sig.converged.to(conv)
        return dataclasses.replace(out, sigma=sigma, ci_low=lo, ci_high=hi, converged=conv)

    def _floored_solve(self, r: MetricResult, tau: Tensor, floor: float,
                       tol: tuple = (None, None)) -> SigmaResult:
        """:meth:`_floored_sigma`'s solve on the probe state that holds ``r``'s stages (raises
        :class:`~.estimators.SnapshotDroppedError` where it does not). ``converged``: ``r``'s,
        and the tolerance ``tol = (atol, rtol)`` met at the solution by the half-width there
        with the measured rounding allowance (which grows as sigma falls). The samples of a
        ``"mixed"`` ``r`` that took an exact route are left to :meth:`_parts_sigma`."""
        st = self._dstate
        ones = torch.ones(self.batch, dtype=torch.bool, device=self.enc.x.device)
        ones[r.info.get("exact_samples", [])] = False  # (the randomized samples)
        dtype = self.enc.x.dtype
        measured = "rounding_measured" in r.info
        lost = any(r.info.get("lost_columns", ()))  # (their float64 terms, as r counts them)

        def value(t: Tensor, rows: Tensor, halfwidth: bool) -> tuple[Tensor, Tensor | None]:
            v, hw = fsinfo_diag_restaged(st, r, torch.exp(t), floor, rows=rows,
                                         halfwidth=halfwidth)
            if lost:
                v = v + self._lost_add("fsinfo_diag", torch.exp(t), floor).to(v)
            return v, hw

        def at(t: Tensor, rows: Tensor, sign: float) -> Tensor:
            v, hw = value(t, rows, bool(sign))
            if not sign:
                return v - tau
            allow = rounding_allowance("fsinfo_diag", v, dtype)[0]
            if measured:  # (the measured one where it is wider, as in r's interval)
                allow = torch.maximum(allow, self._rounding_measured(
                    "fsinfo_diag", torch.exp(t), floor, v, halfwidth=hw).to(allow))
            return v + sign * (hw + allow) - tau

        # every stage boundary read at once (a dropped one raises before the solve starts)
        t_ref = torch.log(r.sigma.to(tau).reshape(-1).expand_as(tau))
        v1, _ = value(t_ref, ones, False)
        if not torch.equal(v1[ones], r.value[ones]):
            raise SnapshotDroppedError("the probe state no longer holds the estimate's probes")
        # start at the floorless closed form's root (the live columns' slope is at most 1)
        t0 = (t_ref + r.value - tau).clamp(-_LOG_SIGMA_MAX / 2, _LOG_SIGMA_MAX / 2)
        # at or below the asymptote no finite noise reaches tau (every estimate lies above
        # it): sigma* and the upper end are inf exactly; the lower end is solved
        above = ones & (tau > 0.5 * math.log(floor) - HALF_LOG_2PIE)
        mid = _crossing(lambda t, w: at(t, w, 0.0), t0, above, last=True, monotone=True)
        hi = _crossing(lambda t, w: at(t, w, 1.0), t0, above, last=True)
        lo = _crossing(lambda t, w: at(t, w, -1.0), t0, ones, last=False)
        mid = torch.where(above, mid, math.inf)
        hi = torch.where(above, hi, math.inf)
        converged = r.converged
        if measured:  # the interval at the solution: the probes' with the rounding there
            fin = torch.isfinite(mid)
            t = torch.where(fin, mid, torch.zeros_like(mid))
            hw_at = (at(t, fin, 1.0) - at(t, fin, 0.0)).to(r.value)
            v_at = (at(t, fin, 0.0) + tau).to(r.value)
            converged = converged & (~fin | tolerance_met(v_at, hw_at, *tol))
        how = ("floored equation solved on the probes and stages of a floored randomized "
               "estimate (value decreasing in sigma; interval ends from value +- half-width)")
        return SigmaResult(sigma=torch.exp(mid), target=tau, metric="fsinfo_diag",
                           estimator=r.estimator, ci_low=torch.exp(lo), ci_high=torch.exp(hi),
                           converged=converged,
                           info={**r.info, "fsinfo_sigma1": r, "floor_solve": how})

    @ieee_fp32_method
    @_modes_checked("fsinfo")
    def fsinfo_sigma(
        self,
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
        lanczos_order: int | None = None,
        _keep_tiny: bool = False,
    ) -> SigmaResult:
        r"""FSInfoGuard's per-sample noise scale: the sigma at which FSInfo equals ``target``.

        :math:`\sigma^* = \exp(\mathrm{FSInfo}_{\sigma=1} - \tau)` from the ``sigma = 1``
        estimate (an error of ``delta`` nats/dim there scales ``sigma*`` by ``exp(delta)``: the
        interval of ``sigma*`` is the FSInfo interval mapped through that). The exact route
        honours the floor and a prior by solving the monotone equation to float64 precision;
        the randomized diagonal route neglects the floor (its effect at ``sigma*`` is below
        ``floor sigma*^2 / (J^TJ)_kk``) where that is checked to be small (:meth:`_floor_matters`:
        not where an input dimension does not reach the output, nor near the floor's
        asymptote; there the floored equation is solved on the floored randomized estimate's
        own probes and stages, :meth:`_floored_sigma`, with ``info["floor_matters"]`` and
        ``info["floor_solve"]``; where that cannot serve, ``auto`` uses the oracle, recorded in
        ``info["auto"]``, and ``"randomized"`` raises), the randomized log-det route with a
        prior is not
        available (``auto`` uses the oracle). ``max_probes``: as in :meth:`fsinfo` (None:
        ``min(m, d)`` under ``auto``, :data:`DEFAULT_MAX_PROBES` for a randomized estimator).
        A ``sigma*`` below :data:`~fsinfo_fast.encoder.SIGMA_RANGE` raises
        :class:`~fsinfo_fast.errors.InvalidInputError` (``_keep_tiny``: returned as computed,
        for the profile, which records such samples rather than stop at the first).
        """
        _check_choice("estimator", estimator, ESTIMATORS)
        estimator = self._auto_without_exact(estimator)
        _check_tol("atol", atol)  # checked whichever route serves (auto's exact ones too)
        _check_tol("rtol", rtol)
        _check_choice("variant", variant, VARIANTS)
        _check_max_probes(max_probes)
        check_fixed_cap(num_probes, max_probes)
        tau = check_target(target, self.batch).to(self.enc.x.device)
        tau_b = tau.expand(self.batch) if tau.ndim == 0 else tau
        _check_options(variant, prior_var, floor, lanczos_order)
        floor = float(floor)
        if variant == "logdet" and prior_var is not None:
            if estimator == "randomized":
                raise InvalidInputError(
                    "the randomized FSInfoGuard sigma for the log-det variant with a prior is "
                    "not supported; use estimator='exact' (or 'auto')")
            estimator = "exact"
        kw = dict(variant=variant, estimator=estimator, atol=atol, rtol=rtol,
                  num_probes=num_probes, max_probes=max_probes, prior_var=prior_var,
                  lanczos_order=lanczos_order)
        floor_why = None  # why auto solves the floored equation with the oracle after all
        if estimator == "exact":
            r = None
        else:
            try:
                r = self.fsinfo(1.0, floor=0.0 if variant == "diag" else floor, **kw)
            except PrecisionError as err:  # (the floorless -inf a route cannot claim)
                if variant != "diag" or floor <= 0:
                    raise
                r, why = None, ("the floorless estimate at sigma = 1 cannot serve ("
                                + " ".join(str(err).split(". Use ")[0].split()) + ")")
            if r is not None:
                if not _keep_tiny:
                    _check_sigma_star(torch.exp(r.value - tau_b), r.value, tau_b)
                # (the float64 Jacobian's own rounding, which the public fsinfo adds, first:
                # the floor's effect is measured at the upper end it gives; sigma* =
                # exp(FSInfo(1) - target) moves by exp of FSInfo's move)
                r = self._float64_allowed(r, 0.0 if variant == "diag" else floor,
                                          (atol, rtol))
                # (an exact r, from auto's oracle, is re-solved with the floor below)
                why, floor_shift = (self._floor_matters(r, tau_b, floor, kw)
                                    if variant == "diag" and r.estimator != "exact"
                                    else (None, torch.zeros_like(r.value)))
            if why is not None:
                solved, cannot = self._floored_sigma(tau_b, floor, kw)
                if solved is not None:
                    solved.info["floor_matters"] = why
                    return self._zero_sigma_checked(solved)
                fits = self._oracle_fits()
                if estimator == "randomized" or not fits:
                    raise InvalidInputError(
                        f"the randomized FSInfoGuard sigma's closed form neglects the floor "
                        f"({floor:g}), which matters here: {why}; the floored equation could "
                        f"not be solved on the randomized estimate: {cannot}. Use "
                        "estimator='exact' (the float64 oracle solves the floored equation)"
                        + ("" if fits else f", which cannot serve here ({self._no_oracle_why()}); "
                           "or floor=0.0"))
                r = None
                floor_why = (f"the randomized sigma* neglects the floor, which matters here: "
                             f"{why}; the floored equation could not be solved on the "
                             f"randomized estimate ({cannot}); the float64 oracle solves it")
        if r is None or r.estimator == "exact":
            ex = self.exact(spectrum=variant == "logdet")
            out = ex.fsinfo_sigma(tau_b, variant, prior_var=prior_var, floor=floor)
            if not _keep_tiny:
                _check_sigma_star(out.sigma, ex.fsinfo(1.0, variant, prior_var=prior_var,
                                                       floor=floor).value, tau_b,
                                  exact_zero=(ex.diag == 0).all(dim=1))
            if r is not None and "auto" in r.info:
                out.info["auto"] = r.info["auto"]
            elif floor_why is not None:
                out.info["auto"] = floor_why
            return out
        hw = torch.where(r.bound, torch.full_like(r.ci_halfwidth, math.inf), r.ci_halfwidth)
        sig = torch.exp(r.value - tau_b)
        out = SigmaResult(sigma=sig, target=tau_b, metric=r.metric, estimator=r.estimator,
                          ci_low=torch.exp(r.value - hw - tau_b),
                          ci_high=torch.exp(r.value + r.ci_halfwidth + _floor_grown(floor_shift)
                                            - tau_b),
                          converged=r.converged, info={**r.info, "fsinfo_sigma1": r})
        return (self._parts_sigma(out, tau_b, floor, oracle_only=True)
                if variant == "diag" else out)

    @ieee_fp32_method
    @_modes_checked("dfil")
    def dfil_sigma(
        self,
        bound: float,
        *,
        estimator: str = "auto",
        rtol: float | None = 0.01,
        num_probes: int | None = None,
        max_probes: int | None = None,
        method: str = "auto",
    ) -> SigmaResult:
        r"""Per-sample noise scale for a target dFIL bound (Maeng et al. 2023's calibration).

        :math:`\sigma_b = \sqrt{b\,\mathrm{tr}(J_b^TJ_b)/d}` puts sample ``b``'s ``1/dFIL`` (the
        per-dimension MSE bound for unbiased attackers, squared input units) at ``bound``;
        ``.dataset("rms")`` is their data-set calibration ``sqrt(b mean_x tr(J^T J)/d)``.
        ``max_probes``: as in :meth:`dfil` (None: ``min(m, d)`` under ``auto``,
        :data:`DEFAULT_MAX_PROBES` for a randomized estimator).
        """
        _check_tol("rtol", rtol)
        _check_max_probes(max_probes)
        check_fixed_cap(num_probes, max_probes)
        # any real scalar (numpy's too), as a Python float: a np.float32 times a tensor
        # computed in float32
        if isinstance(bound, bool) or not (
            isinstance(bound, numbers.Real) and math.isfinite(bound) and bound > 0
        ):
            raise InvalidInputError(
                f"bound must be a positive float (squared input units), got {bound!r}")
        bound = float(bound)
        r = self._float64_allowed(  # (as the public dfil adds it)
            self.dfil(1.0, estimator=estimator, rtol=rtol, num_probes=num_probes,
                      max_probes=max_probes, method=method), 0.0, (None, rtol))
        lo = (r.value - r.ci_halfwidth).clamp_min(0)
        b = torch.full_like(r.value, float(bound))
        return SigmaResult(sigma=(bound * r.value).sqrt(), target=b, metric="dfil",
                           estimator=r.estimator, ci_low=(bound * lo).sqrt(),
                           ci_high=(bound * (r.value + r.ci_halfwidth)).sqrt(),
                           converged=r.converged, info={**r.info, "dfil_sigma1": r})


#: Keywords of :func:`linearize` that FSInfoGuard and the torchmetrics metrics pass through.
LINEARIZE_KEYWORDS = ("backend", "seed", "memory_budget", "dtype", "progress")


def _check_linearize_options(**kw: Any) -> None:
    """Raise for a bad :func:`linearize` option among ``kw`` (``backend``, ``seed``,
    ``memory_budget``, ``dtype``, ``progress``): checked where it is given (a metric's or
    guard's constructor checks them too, before its first batch)."""
    if "progress" in kw and not isinstance(kw["progress"], bool):
        raise InvalidInputTypeError(f"progress must be True or False, got {kw['progress']!r}")
    if "backend" in kw:
        backend = kw["backend"]
        if not isinstance(backend, str):
            raise InvalidInputError(f"backend must be a string, got {type(backend).__name__}")
        from .engine import BACKENDS

        if backend not in ("auto", *BACKENDS):
            raise InvalidInputError(
                f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    dtype = kw.get("dtype")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise InvalidInputTypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if dtype is not None:
        from .encoder import check_working_dtype

        check_working_dtype(dtype)  # (float32 or float64, as working_dtype refuses per batch)
    budget = kw.get("memory_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(
            budget, numbers.Integral) or budget <= 0):
        raise InvalidInputError(
            f"memory_budget must be a positive int (bytes) or None, got {budget!r}")
    if "seed" in kw and not isinstance(kw["seed"], torch.Generator):
        resolve_seed(kw["seed"])  # (an int's check; a generator is drawn from per batch)


def _check_fsinfo_route(estimator: str, variant: str) -> None:
    """Raise for an ``estimator`` that cannot compute ``variant`` (:meth:`Linearization.fsinfo`
    checks it per call, :func:`check_metric_keywords` at a metric's construction)."""
    if estimator == "exact-fast" and variant != "diag":
        raise InvalidInputError(
            "estimator='exact-fast' computes the diagonal and the trace only; the log-det "
            "variant needs the spectrum: use estimator='exact' (the float64 oracle)")
    if variant == "logdet" and estimator == "deflated":
        raise InvalidInputError("estimator='deflated' applies to variant='diag' only")


def _check_dfil_route(estimator: str, method: str) -> None:
    """Raise for a dFIL ``method`` that ``estimator`` contradicts (:meth:`Linearization.dfil`
    per call, :func:`check_metric_keywords` at construction)."""
    if estimator == "deflated" and method not in ("auto", "deflated"):
        # another method asked for was silently replaced by the deflated one
        raise InvalidInputError(
            f"estimator='deflated' computes dFIL with the deflated method; "
            f"method={method!r} contradicts it: pass method='auto' (or 'deflated'), or "
            f"estimator='randomized' with method={method!r}")


def seed_once(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with a ``torch.Generator`` ``seed`` drawn once (:func:`resolve_seed`): the
    torchmetrics metrics and FSInfoGuard linearise every batch with their keywords, and a
    generator drawn per batch gave each batch other probes (a sample's result then depended on
    how the data was batched)."""
    if isinstance(kw.get("seed"), torch.Generator):
        return {**kw, "seed": resolve_seed(kw["seed"])}
    return kw


def check_metric_keywords(kw: dict[str, Any], method: str, who: str,
                          extra: tuple[str, ...] = ()) -> None:
    """Raise :class:`InvalidInputTypeError` (a ``TypeError``) at construction for keywords that
    neither :func:`linearize` nor ``Linearization.<method>`` takes (a typo such as
    ``estimatr=`` was accepted and failed at the first forward or update, deep in a loop), and
    :class:`InvalidInputError` for a bad estimator, variant, method or tolerance."""
    import difflib
    import inspect

    params = inspect.signature(getattr(Linearization, method)).parameters
    allowed = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    allowed |= set(LINEARIZE_KEYWORDS) | set(extra)
    for name, choices in (("estimator", ESTIMATORS), ("variant", VARIANTS),
                          ("method", DFIL_METHODS)):
        if name in kw and name in allowed:
            _check_choice(name, kw[name], choices)
    for name in ("atol", "rtol"):
        if name in kw:
            _check_tol(name, kw[name])
    _check_linearize_options(**{k: kw[k] for k in LINEARIZE_KEYWORDS if k in kw})
    if kw.get("num_probes") is not None and "num_probes" in allowed:
        StoppingRule(num_probes=kw["num_probes"])  # (its own check: an int >= 2)
    if "max_probes" in kw and "max_probes" in allowed:
        _check_max_probes(kw["max_probes"])

    def value(name: str) -> Any:
        return kw[name] if name in kw else params[name].default

    if method in ("fsinfo", "fsinfo_sigma"):
        _check_options(value("variant"), value("prior_var"), value("floor"),
                       value("lanczos_order"))
    # the combinations every call would refuse (fsinfo_sigma picks its own route for some)
    if method == "fsinfo":
        _check_fsinfo_route(value("estimator"), value("variant"))
    elif method == "dfil":
        _check_dfil_route(value("estimator"), value("method"))
    stops = [n for n in ("atol", "rtol", "num_probes") if n in params]
    if stops and all(value(n) is None for n in stops) and value("estimator") not in (
            "exact", "exact-fast"):
        raise InvalidInputError(f"{who}: the randomized estimators need "
                                f"{', '.join(stops)} (all were None)")
    bad = sorted(set(kw) - allowed)
    if bad:
        public = sorted(a for a in allowed if not a.startswith("_"))
        hints = [f"{b!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            b, public, n=1)) else repr(b) for b in bad]
        raise InvalidInputTypeError(
            f"{who} got unexpected keyword(s) {', '.join(hints)}; it takes {', '.join(public)}")


def _floor_grown(delta: Tensor) -> Tensor:
    """The floor's effect ``delta`` on FSInfo_diag, measured at a noise ``s``, at the upper end
    ``s e^D`` it moves ``sigma*``'s interval to: ``Delta(s) = (1/2d) sum_k log(1 + c s^2 /
    D_k)`` and ``log(1 + l a) <= l log(1 + a)`` for ``l >= 1``, so ``D <= delta e^(2 D)``: the
    smallest such ``D`` (``inf`` where there is none, ``delta >= 1 / (2e)``). Measured at ``s``
    itself it fell short by about ``2 delta^2`` (helper 101: the upper end 1.6e-11 below the
    true ``sigma*``)."""
    grown = delta.clone()
    for _ in range(60):
        grown = delta * torch.exp(2 * grown)
    return torch.where(delta < 1 / (2 * math.e), grown, math.inf)


def _check_sigma_star(sig: Tensor, f1: Tensor, tau: Tensor,
                      exact_zero: Tensor | None = None) -> None:
    """Raise where ``sigma*`` falls below :data:`~fsinfo_fast.encoder.SIGMA_RANGE` (a target
    far above FSInfo at ``sigma = 1``: ``exp(FSInfo(1) - target)`` underflowed, and the exact
    solver stopped at its bracket's end) rather than return a value the metrics refuse. An
    exact 0 (FSInfo -inf at every sigma, or ``exact_zero``: a sample whose exact Jacobian is 0,
    at the floor's asymptote below the target at every sigma) is a result, not an
    underflow."""
    from .encoder import SIGMA_RANGE

    tiny = (sig < SIGMA_RANGE[0]) & torch.isfinite(f1)
    if exact_zero is not None:
        tiny &= ~(exact_zero.to(tiny.device) & (sig == 0))
    if bool(tiny.any()):
        i = int(tiny.nonzero()[0])
        raise InvalidInputError(
            f"target {float(tau[i]):g} nats/dim lies {float(tau[i] - f1[i]):.4g} above "
            f"FSInfo at sigma = 1 ({float(f1[i]):.4g}, sample {i}): sigma* = exp(FSInfo(1) - "
            f"target) is below {SIGMA_RANGE[0]:g}, where the metrics' float64 arithmetic "
            "ends; such a target needs no noise in practice (choose one within "
            f"{-math.log(SIGMA_RANGE[0]):.0f} nats/dim of FSInfo(1))")


def linearize(
    encoder: Encoder,
    x: Tensor,
    *,
    backend: str = "auto",
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    memory_budget: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Linearization:
    """Validate ``encoder`` at the batch ``x`` once and return a :class:`Linearization`.

    Args:
        encoder: ``nn.Module`` or callable mapping ``[B, *in]`` to ``[B, *out]`` (eval mode).
        x: the batch ``[B, *in]``.
        backend: how Jacobian products are computed (``"auto"``, ``"torch"``, ``"engine"``,
            ``"cpp"``, ``"triton"``, ``"cuda"``; see :mod:`fsinfo_fast.engine`).
        seed: probe seed (int or ``torch.Generator``); the same seed gives the same probes on
            every backend.
        sample_ids: ``[B]`` global sample ids seeding each sample's probes (default
            ``arange(B)``): a sample's result then does not depend on how samples are batched.
        memory_budget: bytes a chunk of probes may use (default: a share of free memory).
        dtype: the products' dtype, ``torch.float32`` or ``torch.float64``. ``None`` (default)
            keeps the encoder's and the input's, except that a ``float16`` / ``bfloat16``
            encoder or input is linearised in float32 on a copy (half-precision products err
            by more than the intervals count; recorded in ``info["working_dtype"]``, see
            :func:`fsinfo_fast.encoder.working_dtype`).
        progress: show a progress bar (tqdm, on stderr) in each metric call and in
            :meth:`Linearization.exact` that counts the Jacobian products computed; where their
            count is known ahead (the float64 oracle, the fast exact diagonal: ``min(m, d)``
            one-hot products a sample) against that count, otherwise (a randomized estimate's
            adaptive probe count) as a running count and rate.

    Raises:
        InvalidInputError: ``dtype`` is not float32 / float64; the input and encoder errors of
            :func:`fsinfo_fast.encoder.prepare`.
    """
    return Linearization(encoder, x, backend=backend, seed=seed, sample_ids=sample_ids,
                         memory_budget=memory_budget, dtype=dtype, progress=progress)
