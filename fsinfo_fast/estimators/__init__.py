r"""Randomized estimators of FSInfo and dFIL, written against batched Jacobian products.

Estimators see only a :class:`Products` object (``jvp``: ``[B, K, d] -> [B, K, m]``, ``vjp``:
``[B, K, m] -> [B, K, d]``) and never know how the products are computed. All return float64
per-sample :class:`Estimate` objects with a standard error and a t-interval, and draw their
probes with :func:`draw_probes`, so results are reproducible from ``(seed, sample id)`` and do
not depend on how samples are batched.

- :func:`estimate_diag`: FSInfo_diag (exactly chi2-debiased log-sum of ``diag(J^T J)``, the
  paper's floor included) and dFIL from the same ``K`` VJPs; built on :class:`DiagProbeState`
  (the probes' statistics, reusable across requests) and the pure summaries
  :func:`fsinfo_diag_summary` and :func:`trace_summary`.
- :func:`estimate_diag_deflated`: the same two quantities with the dominant output subspace of
  ``J`` taken exactly (a sketch) and only the remainder by projected probes, for correlated
  columns (deep splits); :class:`DeflatedProbeState` holds its sketch, rank pilot and remainder
  probes across requests; :func:`predict_plain_probes` is what ``auto`` compares.
- :func:`hutchinson_trace`: ``tr(J^T J)`` / dFIL (Hutchinson 1989).
- :func:`hutchpp_trace`: Hutch++ (Meyer et al. 2021).
- :func:`slq_logdet`: log-det FSInfo by stochastic Lanczos quadrature (Ubaru et al. 2017):
  adaptive order, Gauss/Gauss-Radau bracket and rounding allowance in the interval, flagged upper
  bounds at the working precision; Lanczos or Golub-Kahan. :class:`LanczosProbeState` and
  :func:`slq_probe_terms` serve several sigmas/priors (and the Hutchinson trace) from one run.
- :class:`StoppingRule`: the one options object (``stop=``) of every estimator: a fixed probe
  count, or ``atol``/``rtol`` met by a three-stage rule whose estimate comes from probes drawn
  after their count was fixed (honest coverage and no bias at the stop);
  :func:`initial_probes`: the first round.
- :func:`expected_passes`: the cost model.

Once some samples of a batch have stopped, the plain and deflated diagonal estimators and
Hutchinson's run the next rounds on the samples still running only, on a sub-batch of the
products where the measured cost says it pays (:class:`~.base.RowProducts`,
``base.ROW_SUBSETS``); each sample's probes, and so its result, stay the same.
"""

from .base import Estimate, Products, t_quantile
from .cost import expected_passes
from .deflated import DeflatedProbeState, estimate_diag_deflated, predict_plain_probes
from .diagonal import (
    DiagEstimate,
    DiagProbeState,
    DiagStats,
    DiagSummary,
    SnapshotDroppedError,
    estimate_diag,
    fsinfo_diag_summary,
    log_chi2_mean_offset,
    trace_summary,
)
from .hutchinson import hutchinson_trace
from .lanczos import (
    LanczosProbeState,
    SLQProbeStore,
    SLQProbeTerms,
    golub_kahan_bidiagonal,
    lanczos_tridiagonal,
    slq_logdet,
    slq_probe_terms,
    slq_quadrature,
    slq_trace,
)
from .meyer2020hutchpp import hutchpp_trace
from .probes import PROBE_KINDS, draw_probes, resolve_seed
from .stopping import StopKeywords, StoppingRule, initial_probes

__all__ = [
    "PROBE_KINDS",
    "DeflatedProbeState",
    "DiagEstimate",
    "DiagProbeState",
    "DiagStats",
    "DiagSummary",
    "SnapshotDroppedError",
    "Estimate",
    "LanczosProbeState",
    "Products",
    "SLQProbeStore",
    "SLQProbeTerms",
    "StopKeywords",
    "StoppingRule",
    "draw_probes",
    "estimate_diag",
    "estimate_diag_deflated",
    "expected_passes",
    "fsinfo_diag_summary",
    "golub_kahan_bidiagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "initial_probes",
    "predict_plain_probes",
    "lanczos_tridiagonal",
    "log_chi2_mean_offset",
    "resolve_seed",
    "slq_logdet",
    "slq_probe_terms",
    "slq_quadrature",
    "slq_trace",
    "t_quantile",
    "trace_summary",
]
