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

**The floor** (the paper's ``1e-10`` inside ``log(D_k / sigma^2 + floor)``) is debiased
exactly too: ``log(D_k + a)`` with ``a = floor sigma^2`` has the unique unbiased estimator
``log a + H_{K/2}(K s_k / (2a))`` (:mod:`fsinfo_fast.estimators.logfloor`), which equals the
floor-free term plus a correction ``E_{K/2}(x) ~ (K/2 - 1)/x`` that vanishes far above the floor
(it is skipped where it is below ``1e-17``; no cost there). A zero column (``s_k = 0``, which
has probability 0 for a non-zero column) contributes ``log(floor)`` exactly (``-inf`` for
``floor = 0``). The plug-in ``log(s_k/sigma^2 + floor) - E[log(chi2_K/K)]`` used before was
biased by up to ``-E[log(chi2_K/K)] / 2`` nats/dim (0.025 at ``K = 20``) on encoders whose
columns sit near the floor, while its interval did not know it. The only remaining bias is the
numerical error of ``H`` (:data:`~fsinfo_fast.estimators.logfloor.H_ABS_ERR`), reported as
``bias_bound`` and included in the half-width.

**Standard error**: delete-a-group jackknife over probes. Probe ``j`` goes to group
``j mod G_max`` (``G_max = jackknife_groups``); for ``K <= G_max`` this is the delete-one
jackknife. Each leave-group-out estimate is itself exactly debiased (for ``K - n_g`` probes),
and the variance is the delete-a-group jackknife for unequal group sizes (Busing, Meijer and
van der Leeden 1999). The jackknife variance of a sum of per-column terms is the sum of the
per-column jackknife variances (its *diagonal part*) plus cross-column terms. The diagonal part
is known exactly wherever the floor is negligible: ``Var(log s_k) = psi'(K/2)`` (the trigamma
function), while the jackknife over-estimates it at small ``K`` (by 50% at ``K = 2``: the
Efron-Stein bias). And because every pair of terms is non-negatively correlated (the Laguerre
expansion of the bivariate chi-square has non-negative coefficients ``rho^{2n}``, and each term
is a function with a completely monotone derivative), that exact sum is a lower bound on the
variance. :func:`fsinfo_diag_summary` combines the two: the jackknife t-interval with its
diagonal part replaced by the exact one, but never narrower than the normal interval of the
exactly known part (measured coverage there).

**Structure.** :class:`DiagProbeState` holds the accumulated statistics of the probes drawn so
far for one batch (it is extended through ``products`` and keeps snapshots at round boundaries);
:func:`fsinfo_diag_summary` and :func:`trace_summary` are pure functions of one
:class:`DiagStats`; :func:`estimate_diag` drives them with :func:`~.stopping.run_rounds`.
Memory: ``G_max`` running group sums of ``g^2`` per sample, ``[B, G_max, d]`` float64,
independent of ``K``, plus ``[B, K]`` probe norms.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, Unpack

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..formulas import DIAG_FLOOR, HALF_LOG_2PIE
from .base import (
    Estimate,
    Products,
    RowProducts,
    check_finite,
    detached,
    ops_for,
    rows_at_one_count,
    sample_ids_for,
    sigma_for,
    undetached,
)
from .hutchinson import (
    TraceHalfwidth,
    log_t_halfwidth,
    mean_and_stderr,
    sample_skewness,
)
from .logfloor import H_ABS_ERR, floor_correction
from .probes import draw_probes, resolve_seed
from .stopping import (
    StopKeywords,
    StoppingRule,
    _check_tol,
    estimate_from,
    resolve_rule,
    run_rounds,
)

__all__ = [
    "DiagEstimate",
    "DiagProbeState",
    "DiagStats",
    "DiagSummary",
    "SnapshotDroppedError",
    "estimate_diag",
    "fsinfo_diag_restaged",
    "fsinfo_diag_summary",
    "log_chi2_mean_offset",
    "trace_summary",
]

#: Elements of float64 ``g^2`` materialised at once (256 MiB).
_SLICE_ELEMS = 1 << 25
#: Columns on which the jackknife's diagonal part is evaluated (a regular subsample beyond).
_DIAG_COLUMNS = 8192
#: Columns with ``x = K s / (2 floor sigma^2)`` at least this large count as far from the floor
#: (their term's variance is ``psi'(K/2)`` to within ``~K/x``).
_X_FAR = 1e8


class SnapshotDroppedError(LookupError):
    """The statistics at a requested probe count are no longer held by the state (dropped to
    bound memory, or never a round boundary): recompute them with a fresh state."""


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


@dataclass(frozen=True)
class DiagStats:
    """Sufficient statistics of the first ``k`` Gaussian output-side probes of a batch.

    Attributes:
        k: number of probes ``K``.
        group_sums: ``[B, G, d]`` float64, ``sum_{j in group g, j < K} g_j^2`` (probe ``j`` in
            group ``j mod G``).
        group_n: ``[G]`` float64, probes per group.
        norms: ``[B, K]`` float64, ``||g_j||^2`` per probe.
    """

    k: int
    group_sums: Tensor
    group_n: Tensor
    norms: Tensor

    @property
    def batch(self) -> int:
        return int(self.group_sums.shape[0])

    @property
    def d(self) -> int:
        return int(self.group_sums.shape[2])

    def sums(self) -> Tensor:
        """``[B, d]`` ``K s = sum_j g_j^2``."""
        return self.group_sums.sum(dim=1)


@dataclass(frozen=True)
class DiagSummary:
    """One quantity's estimate from a :class:`DiagStats` (``[B]`` float64 each).

    Attributes:
        value, stderr: the estimate and its standard error.
        dof: degrees of freedom of the Student-t interval.
        bias_bound: deterministic error allowance added to the half-width.
        log_scale: a trace (:meth:`halfwidth` is then the same-sample half-width of
            :class:`~fsinfo_fast.estimators.hutchinson.TraceHalfwidth`).
        skew: ``[B]`` sample skewness of the per-probe values of a trace (``None``: unknown).
    """

    value: Tensor
    stderr: Tensor
    dof: int
    bias_bound: Tensor
    log_scale: bool = False
    skew: Tensor | None = None

    def halfwidth(self, confidence: float = 0.95) -> Tensor:
        """``t_{(1+c)/2, dof} stderr + bias_bound`` (0 where the value is exact); for a trace
        (``log_scale``) the same-sample half-width of
        :class:`~fsinfo_fast.estimators.hutchinson.TraceHalfwidth`."""
        from .base import t_quantile

        if self.log_scale:  # the value and spread are of the same probes
            hw = TraceHalfwidth(self.value, confidence, 1.0, self.skew).same_sample(
                self.stderr, self.dof)
            return hw + self.bias_bound
        hw = t_quantile(self.dof, confidence) * self.stderr
        hw = torch.where(self.stderr == 0, torch.zeros_like(hw), hw)
        return hw + self.bias_bound


def state_fields(products: Products, seed: int | torch.Generator, sample_ids: Tensor | None,
                 jackknife_groups: int, snapshot_bytes: int) -> dict[str, Any]:
    """The checked fields every probe state of a batch starts from (``batch``, ``d``, ``m``,
    ``seed``, ``sample_ids``, ``groups``, ``snapshot_bytes``): :meth:`DiagProbeState.for_products`
    and the deflated route's state build from the same arguments the same way."""
    for name, v, lo in (("jackknife_groups", jackknife_groups, 2),
                        ("snapshot_bytes", snapshot_bytes, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InvalidInputError(f"{name} must be an int >= {lo}, got {v!r}")
    return {"batch": products.batch, "d": products.d, "m": products.m,
            "seed": resolve_seed(seed), "sample_ids": sample_ids_for(products, sample_ids),
            "groups": jackknife_groups, "snapshot_bytes": snapshot_bytes}


def _group_counts(k: int, groups: int, device: torch.device) -> Tensor:
    """``[G]`` float64: how many of the probes ``0 .. k-1`` fall in each group (``j mod G``)."""
    return torch.full((groups,), float(k // groups), dtype=torch.float64, device=device) + (
        torch.arange(groups, device=device) < k % groups).to(torch.float64)


@dataclass
class DiagProbeState:
    r"""Accumulated statistics of the Gaussian output-side VJP probes drawn so far for a batch.

    Probe ``j`` of sample ``b`` is ``draw_probes(m, seed, sample_ids[b], j)`` (Gaussian), so
    the statistics at ``K`` probes do not depend on how the probes were split into rounds or
    which batch the sample is in. :meth:`extend` draws the next probes and runs their VJPs,
    for every sample or for some (the samples still running: each sample holds its own count,
    :attr:`counts`); :meth:`stats` gives the statistics at a count some samples hold now or
    held at an earlier round boundary kept as a snapshot (within ``snapshot_bytes``; older
    snapshots are dropped first, and asking for a dropped one raises
    :class:`SnapshotDroppedError`).

    Build it with :meth:`for_products`.

    Attributes:
        batch, d, m: sizes.
        seed: the integer probe seed.
        sample_ids: ``[B]`` int64 global sample ids.
        groups: jackknife groups ``G``.
        snapshot_bytes: memory allowed for snapshots (``0``: keep none).
        pinned_rows_only: keep in a snapshot only the samples pinned there (:meth:`pin`: their
            stage ends or stops there), not every sample passing it: the memory one estimate's
            re-evaluation needs (three boundaries per sample), where other requests replaying
            the state would find fewer boundaries held.
        k: probes accumulated by the samples furthest along.
        dropped: round boundaries whose snapshots were dropped.

    Example:
        >>> from fsinfo_fast.engine.dense import DenseProducts
        >>> P = DenseProducts(torch.randn(2, 5, 3, dtype=torch.float64))
        >>> st = DiagProbeState.for_products(P, seed=0, snapshot_bytes=1 << 20)
        >>> st.extend(P, 4); st.extend(P, 4)
        >>> st.k, st.available(), tuple(st.stats(4).norms.shape)
        (8, [4, 8], (2, 4))
        >>> st.extend(P, 100, rows=torch.tensor([False, True])); st.counts.tolist()
        [8, 108]
    """

    batch: int
    d: int
    m: int
    seed: int
    sample_ids: Tensor
    groups: int = 20
    snapshot_bytes: int = 0
    pinned_rows_only: bool = False
    k: int = 0
    dropped: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        dev = self.sample_ids.device
        self.group_sums = torch.zeros(self.batch, self.groups, self.d, dtype=torch.float64,
                                      device=dev)
        #: ``[B]`` int64, the probes each sample holds
        self.counts = torch.zeros(self.batch, dtype=torch.int64, device=dev)
        self._norms = torch.zeros(self.batch, 0, dtype=torch.float64, device=dev)
        #: round boundary -> (``[B]`` bool: the samples kept, ``[n, G, d]`` their group sums
        #: in row order): only the samples that passed the boundary are kept, so the samples
        #: of a batch stopping at different counts do not each cost a whole batch's sums
        self._snaps: dict[int, tuple[Tensor, Tensor]] = {}
        #: stage boundaries (:meth:`pin`): their snapshots are dropped after the others
        #: (boundary -> ``[B]`` bool: the samples whose stage ends or stops there)
        self.pinned: dict[int, Tensor] = {}

    @classmethod
    def for_products(
        cls,
        products: Products,
        *,
        seed: int | torch.Generator = 0,
        sample_ids: Tensor | None = None,
        jackknife_groups: int = 20,
        snapshot_bytes: int = 0,
    ) -> DiagProbeState:
        """An empty state for the batch of ``products`` (checked arguments)."""
        return cls(**state_fields(products, seed, sample_ids, jackknife_groups, snapshot_bytes))

    @property
    def device(self) -> torch.device:
        return self.sample_ids.device

    @property
    def group_n(self) -> Tensor:
        """``[G]`` float64 probes per group at :attr:`k`."""
        return _group_counts(self.k, self.groups, self.device)

    def available(self) -> list[int]:
        """Probe counts whose statistics :meth:`stats` can give for some samples (kept
        snapshots and the counts held now)."""
        now = {int(c) for c in self.counts.unique().tolist() if c > 0}
        return sorted(set(self._snaps) | now)

    def _snapshot(self, start: int, at: Tensor) -> None:
        """Keep the sums of the samples ``at`` (``[B]`` bool), which hold ``start`` probes and
        are about to pass it (within the budget; the others stay live at ``start``)."""
        if start == 0 or self.snapshot_bytes <= 0:
            if start > 0 and start not in self.dropped:
                self.dropped.append(start)
            return
        if self.pinned_rows_only:  # only the samples whose stage ends or stops here
            at = at & self.pinned.get(start, torch.zeros_like(at))
        held = self._snaps.get(start)
        if held is not None:  # others passed this boundary before: add these samples
            at = at & ~held[0]
        new = int(at.sum())
        if new == 0:
            return
        row = self.groups * self.d * 8

        def used() -> int:
            return sum(v[1].shape[0] for v in self._snaps.values()) * row

        while self._snaps and used() + new * row > self.snapshot_bytes:
            loose = set(self._snaps) - set(self.pinned)
            if not loose and start not in self.pinned:  # keep the stage boundaries held
                self.dropped.append(start)
                return
            oldest = min(loose or self._snaps)
            del self._snaps[oldest]
            self.dropped.append(oldest)
            if oldest == start:
                held = None
        if new * row > self.snapshot_bytes:
            self.dropped.append(start)
            return
        if held is None:
            self._snaps[start] = (at.clone(), self.group_sums[at])
            return
        mask = held[0] | at
        sums = self.group_sums.new_empty((int(mask.sum()), self.groups, self.d))
        # rows in batch order: the old rows' places among the new mask, then the new rows'
        sums[held[0][mask]] = held[1]
        sums[at[mask]] = self.group_sums[at]
        self._snaps[start] = (mask, sums)

    def pin(self, k: int, rows: Tensor | None = None) -> None:
        """Mark ``k`` as a stage boundary of the samples ``rows`` (``[B]`` bool, ``None``:
        all): its snapshot keeps only the samples pinned there, and where the snapshot budget
        runs out the snapshots of other round boundaries are dropped first (a later
        re-evaluation of the estimate at another sigma or floor,
        :func:`fsinfo_diag_restaged`, reads each sample's stage boundaries)."""
        k = int(k)
        want = (torch.ones(self.batch, dtype=torch.bool, device=self.device) if rows is None
                else rows.to(torch.bool))
        held = self.pinned.get(k)
        self.pinned[k] = want.clone() if held is None else held | want

    def extend(self, products: Products | RowProducts, count: int,
               rows: Tensor | None = None) -> None:
        """Draw probes ``s .. s+count-1`` for the samples ``rows`` (``[B]`` bool, ``None``:
        all), which must all hold ``s`` probes, run their VJPs and accumulate (``count >= 1``).

        The statistics at ``s`` are kept as a snapshot first (within the budget). With
        ``rows``, the VJPs run on a sub-batch of those samples where ``products`` can select
        one and that pays (:class:`~.base.RowProducts`); the whole batch's VJPs also extend
        the other samples that hold ``s`` probes.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"count must be an int >= 1, got {count!r}")
        router = products if isinstance(products, RowProducts) else RowProducts(products)
        prod = router.products
        if prod.batch != self.batch or prod.d != self.d or prod.m != self.m:
            raise InvalidInputError(
                f"products (B={prod.batch}, m={prod.m}, d={prod.d}) do not match "
                f"the state (B={self.batch}, m={self.m}, d={self.d})"
            )
        at = rows_at_one_count(self.counts, rows, "extend")
        if at is None:
            return
        want, start = at
        idx = router.rows(None if bool(want.all()) else want, count)
        passing = self.counts == start
        if idx is not None:
            passing &= torch.zeros_like(passing).index_fill_(0, idx, True)
        self._snapshot(start, passing)
        U = self._output_probes(start, count, prod.dtype, idx)
        G = router.vjp(U)
        check_finite(G, self.sample_ids, start, "FSInfo_diag (J^T u)", idx)
        comp = torch.arange(self.batch, device=self.device) if idx is None else idx
        keep = self.counts[comp] == start  # a row computed past its count is not added
        if not bool(keep.all()):
            G, comp = G[keep], comp[keep]
        whole = comp.numel() == self.batch
        sums = self.group_sums if whole else self.group_sums[comp]
        ops = ops_for(prod)
        b, d = comp.numel(), self.d
        # float64 squares in slices of probes, so the float64 copy stays bounded
        step = max(1, _SLICE_ELEMS // max(1, b * d))
        norms = []
        for c0 in range(0, count, step):
            # fused: group sums of g^2 (float64, in place) and the squared norms, one read of G
            norms.append(ops.sq_accumulate(G[:, c0 : c0 + step], sums, start + c0))
        if not whole:
            self.group_sums[comp] = sums
        end = start + count
        if self._norms.shape[1] < end:  # room for the new probes (NaN: not drawn)
            grow = max(end, 2 * self._norms.shape[1]) - self._norms.shape[1]
            self._norms = torch.cat([self._norms, self._norms.new_full(
                (self.batch, grow), math.nan)], dim=1)
        self._norms[comp, start:end] = torch.cat(norms, dim=1) if len(norms) > 1 else norms[0]
        self.counts[comp] = end
        self.k = max(self.k, end)

    def _output_probes(self, start: int, count: int, dtype: torch.dtype,
                       idx: Tensor | None = None) -> Tensor:
        """``[n, count, m]`` output-side probes ``start .. start+count-1`` of the samples
        ``idx`` (``None``: all; Gaussian, stream 0; a subclass may transform them, e.g. project
        out a deflated subspace)."""
        return draw_probes(
            self.m,
            seed=self.seed,
            sample_ids=self.sample_ids if idx is None else self.sample_ids[idx],
            start=start,
            count=count,
            kind="gaussian",
            dtype=dtype,
            device=self.device,
        )

    def norms(self) -> Tensor:
        """``[B, k]`` float64 ``||g_j||^2`` of every probe so far (NaN beyond a sample's
        count)."""
        return self._norms[:, : self.k]

    def stats(self, k: int | None = None, rows: Tensor | None = None) -> DiagStats:
        """The statistics at ``k`` probes (default: :attr:`k`) of the samples ``rows``
        (``[B]`` bool, ``None``: all; the other rows of the result are not meaningful).

        A sample holding ``k`` probes now gives its live accumulators (valid until the next
        :meth:`extend`); one that went past ``k`` gives the kept snapshot.

        Raises:
            SnapshotDroppedError: a sample asked for neither holds ``k`` probes nor passed
                ``k`` as a round boundary whose snapshot is kept.
        """
        k = self.k if k is None else k
        want = torch.ones(self.batch, dtype=torch.bool, device=self.device) if rows is None \
            else rows
        live = self.counts == k
        norms = self._norms[:, :k]
        if k > 0 and bool(live[want].all()):
            return DiagStats(k, self.group_sums, _group_counts(k, self.groups, self.device),
                             norms)
        snap = self._snaps.get(k)
        if k > 0 and snap is not None and bool((snap[0] | live)[want].all()):
            kept, rows_sums = snap
            if bool(kept.all()) and not bool((live & want).any()):
                sums = rows_sums  # the whole batch passed k together
            else:  # the live rows, and the kept ones from the snapshot
                sums = self.group_sums.clone()
                sums[kept & ~live] = rows_sums[(~live)[kept]]
            return DiagStats(k, sums, _group_counts(k, self.groups, self.device), norms)
        behind = bool((self.counts[want] < k).any())
        why = ("some of the samples asked for hold fewer probes" if behind else
               "was dropped to bound memory" if k in self.dropped else
               "is not a round boundary")
        raise SnapshotDroppedError(
            f"the statistics at {k} probes are not held ({why}; held: {self.available()}); "
            "recompute them with a fresh DiagProbeState"
        )


def _stats_since(lo: int, hi: DiagStats, base_sums: Tensor) -> DiagStats:
    """The statistics of the probes ``lo .. hi.k - 1`` alone, for the rows whose
    ``base_sums`` (``[B, G, d]``) are the group sums at ``lo`` (the other rows are not
    meaningful)."""
    g, dev = hi.group_n.shape[0], hi.group_n.device
    n = _group_counts(hi.k, g, dev) - _group_counts(lo, g, dev)
    return DiagStats(hi.k - lo, hi.group_sums - base_sums, n, hi.norms[:, lo : hi.k])


def stage_stats(
    st: DiagStats, lo: int, base_sums: Tensor | None, rows: Tensor | None
) -> tuple[DiagStats, Tensor | None]:
    """The statistics a stage summary of :func:`~.stopping.run_rounds` needs: those of the
    probes ``lo ..`` (``base_sums`` the group sums at ``lo``, kept by ``mark``), restricted to
    ``rows`` when only some rows' stage starts at ``lo`` (summarised alone, so that no other row
    enters their floor-term evaluation or far-column masks). Returns ``(stats, idx)`` with
    ``idx`` the row indices kept (``None``: all)."""
    if lo > 0:
        st = _stats_since(lo, st, base_sums)
    if rows is None or bool(rows.all()):
        return st, None
    idx = rows.nonzero().squeeze(1)
    return DiagStats(st.k, st.group_sums[idx], st.group_n, st.norms[idx]), idx


def _check_state(
    state: object,
    products: Products,
    seed: int | torch.Generator,
    sample_ids: Tensor | None,
    groups: int,
    cls: type = DiagProbeState,
) -> None:
    """Raise unless ``state`` is a ``cls`` of this batch with this seed, sample ids and
    jackknife groups (``cls``: :class:`DiagProbeState`, or a holder with the same attributes,
    :class:`~.deflated.DeflatedProbeState`)."""
    ids = sample_ids_for(products, sample_ids)
    same = (
        isinstance(state, cls)
        and state.batch == products.batch
        and state.d == products.d
        and state.m == products.m
        and state.groups == groups
        and resolve_seed(seed) == state.seed
        and torch.equal(state.sample_ids.cpu(), ids.cpu())
    )
    if not same:
        raise InvalidInputError(
            f"state must be a {cls.__name__} of this batch with the same seed, sample_ids and "
            "jackknife_groups as the call"
        )
    bind_products(state, products)


def bind_products(state: object, products: Products) -> None:
    """Tie a probe state to the products it first served and refuse any other: a state of
    another batch of the same shape gave that batch's statistics silently (its probes are
    the same, its VJPs are not)."""
    owner = undetached(detached(products))
    ref = getattr(state, "_owner", None)
    if ref is None:
        object.__setattr__(state, "_owner", weakref.ref(owner))
    elif ref() is not owner:
        raise InvalidInputError(
            f"this {type(state).__name__} holds the probes of other products (another batch or "
            "encoder with the same shapes): build a new state for these products")


class _Replay:
    """Runs the rounds of :func:`~.stopping.run_rounds` over a :class:`DiagProbeState` that may
    already hold probes: :meth:`process` draws a round for the samples still running that
    have not gone past it (the probes a sample holds cost no products; a round runs on a
    sub-batch of those samples where that pays, :class:`~.base.RowProducts`); :meth:`stats`
    and :meth:`mark` read the statistics at the current round boundary (a kept snapshot where a
    sample is further along). Shared by the plain and the deflated diagonal estimators, so that
    a request on a state built by another (another sigma, floor or tolerance) equals a fresh
    call.

    Raises :class:`SnapshotDroppedError` where a sample holds a probe count between two round
    boundaries of this schedule, or a boundary's snapshot was dropped.
    """

    def __init__(self, state: DiagProbeState, products: Products) -> None:
        self.state = state
        self.rows = RowProducts(products)
        self.k_entry = state.counts.clone()
        self.boundary = 0
        self.base: dict[str, Tensor] = {}

    def process(self, start: int, count: int, active: Tensor | None = None) -> None:
        k, state = start + count, self.state
        c = state.counts
        short = c < k if active is None else active & (c < k)
        if bool(short.any()):
            if bool((short & (c != start)).any()):
                held = sorted({int(v) for v in c[short & (c != start)].tolist()})
                raise SnapshotDroppedError(
                    f"the state holds {held} probes for some samples, not the round boundary "
                    f"{start} of this schedule (next: {k}): replay it with the schedule that "
                    "built it, or use a fresh state"
                )
            state.extend(self.rows, count, None if bool(short.all()) else short)
        self.boundary = k

    def current(self, rows: Tensor | None = None) -> DiagStats:
        """The statistics at the current round boundary (of ``rows``, ``None``: all)."""
        return self.state.stats(self.boundary, rows)

    def mark(self, rows: Tensor) -> None:
        # the running sums where these samples' previous stage ended: their next stage's
        # statistics are the sums since then
        gs = self.current(rows).group_sums
        self.state.pin(self.boundary, rows)
        if not self.base:
            self.base["sums"] = torch.zeros_like(gs)
        self.base["sums"][rows] = gs[rows]

    def stats(self, lo: int, rows: Tensor | None) -> tuple[DiagStats, Tensor | None]:
        """:func:`stage_stats` of the probes ``lo ..`` at the current boundary (a stage ends
        there for some samples, or they stop: pinned, as the stage's start was)."""
        self.state.pin(self.boundary, rows)
        return stage_stats(self.current(rows), lo, self.base.get("sums"), rows)

    @property
    def computed(self) -> int:
        """Probes drawn (one product each) by this run for the sample that drew the most."""
        return int((self.state.counts - self.k_entry).clamp_min(0).max()) \
            if self.state.batch else 0

    @property
    def computed_per_sample(self) -> Tensor:
        """``[B]`` int64: the products this run computed for each sample (a whole-batch round
        also computes the samples that had stopped, or went past it before)."""
        return self.rows.computed

    def reused(self, drawn: int) -> int:
        """How many of the ``drawn`` probes of this run the state already held (for the
        sample that held the most)."""
        return min(drawn, int(self.k_entry.max())) if self.state.batch else 0


def _diag_rule(
    stop: StoppingRule | None,
    stop_on: str,
    dfil_rtol: float | None,
    **keywords: Any,
) -> tuple[StoppingRule, dict[str, tuple[float | None, float | None]]]:
    """The rule (the diagonal estimator's defaults filled in) and the ``{quantity: (atol,
    rtol)}`` targets of a diagonal estimator: the rule's tolerance is that of ``stop_on``
    (``"fsinfo_diag"`` or ``"dfil"``), ``dfil_rtol`` adds dFIL's; ``dfil_rtol`` alone (no
    ``stop``, none of ``num_probes``/``atol``/``rtol``) stops on dFIL only. ``keywords``: the
    rule's fields one by one (the convenience form, not together with ``stop``)."""
    _check_tol("dfil_rtol", dfil_rtol)
    if stop_on not in ("fsinfo_diag", "dfil"):
        raise InvalidInputError(f"stop_on must be 'fsinfo_diag' or 'dfil', got {stop_on!r}")
    if (stop is None and all(keywords.get(k) is None for k in ("num_probes", "atol", "rtol"))
            and dfil_rtol is not None):  # the convenience form of stopping on dFIL alone
        stop_on, keywords["rtol"], dfil_rtol = "dfil", dfil_rtol, None
    rule = resolve_rule(stop, "diag", **keywords)
    targets: dict[str, tuple[float | None, float | None]] = {}
    if rule.targets != (None, None):
        targets[stop_on] = rule.targets
    if dfil_rtol is not None:
        a, r = targets.get("dfil", (None, None))
        targets["dfil"] = (a, dfil_rtol if r is None else min(r, dfil_rtol))
    return rule, targets


@functools.lru_cache(maxsize=4096)
def _trigamma(x: float) -> float:
    # (cached: a floored sigma* solve summarises the same few probe counts hundreds of times)
    from scipy.special import polygamma

    return float(polygamma(1, x))


def _column_terms(
    S: Tensor,
    k: Tensor,
    log_sigma: Tensor,
    sigma2: Tensor,
    floor: float,
    offset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-column unbiased ``log(D_k / sigma^2 + floor)`` from sums ``S`` of ``k`` probes, and
    the mask of the non-zero columns far from the floor (``floor = 0``, or ``x >= _X_FAR``;
    ``None``: every column).

    ``S``: ``[B, ..., d]``; ``k``: ``[B, ...]`` probe counts (few distinct values); sigma
    tensors ``[B]``. Fast paths: no masks where every column is non-zero, no table where every
    column is far above the floor (the correction is then one or two terms of a series). With
    a floor, each sample is evaluated on its own: the fast path (and the series' length) is
    chosen from the sample's smallest ``x``, so that no other sample of the batch changes its
    terms in the last bits.

    ``offset``: ``[B, d]`` exactly known part ``E_k >= 0`` of each column (deflation): the
    terms are then unbiased for ``log((E_k + R_k) / sigma^2 + floor)`` where ``S`` are sums of
    ``k`` squared probes of the remainder ``R_k`` (:func:`_offset_terms`).
    """
    if offset is not None:
        return _offset_terms(S, k, log_sigma, sigma2, floor, offset)
    if floor > 0 and S.shape[0] > 1:
        per = [_column_terms(S[b : b + 1], k[b : b + 1], log_sigma[b : b + 1],
                             sigma2[b : b + 1], floor) for b in range(S.shape[0])]
        terms = torch.cat([t for t, _ in per])
        if all(f is None for _, f in per):
            return terms, None
        far = torch.cat([S[b : b + 1] > 0 if f is None else f for b, (_, f) in enumerate(per)])
        return terms, far
    shape = (-1,) + (1,) * (S.ndim - 1)
    kk = k.unsqueeze(-1)
    pos = S > 0
    all_pos = bool(pos.all())
    s = S / kk
    if not all_pos:
        s.masked_fill_(~pos, 1.0)
    t = torch.log(s)
    t -= log_chi2_mean_offset(kk) + 2.0 * log_sigma.reshape(shape)
    far: Tensor | None = None if all_pos else pos
    if floor > 0:
        inv_a = 1.0 / (floor * sigma2.reshape(shape))  # x = (k/2) s / (floor sigma^2)
        # (one sample, the usual case with a floor: its count without torch.unique)
        values = k.reshape(-1).tolist() if k.numel() == 1 else torch.unique(k).tolist()
        if len(values) == 1:  # one probe count (s is not needed after x: x in its memory)
            alpha = values[0] / 2.0
            xs = s.mul_(alpha * inv_a)
            x_min = float(xs.min())
            if x_min < _X_FAR:  # some column near the floor: mark the far ones
                far = pos & (xs >= _X_FAR)
            t += floor_correction(xs, alpha, x_min, overwrite=True)
        else:
            x_lo_all = math.inf
            for kv in values:
                alpha = kv / 2.0
                rows = k == kv
                xs = s[rows] * (alpha * inv_a.squeeze(-1).expand_as(k)[rows].unsqueeze(-1))
                x_min = float(xs.min())
                t[rows] += floor_correction(xs, alpha, x_min, overwrite=True)
                x_lo_all = min(x_lo_all, x_min)
            if x_lo_all < _X_FAR:  # some column near the floor: mark the far ones
                far = pos & (s * ((kk / 2.0) * inv_a) >= _X_FAR)
        zero_term = math.log(floor)
    else:
        zero_term = -math.inf
    if not all_pos:
        t.masked_fill_(~pos, zero_term)
    return t, far


def _offset_terms(
    S: Tensor, k: Tensor, log_sigma: Tensor, sigma2: Tensor, floor: float, offset: Tensor
) -> tuple[Tensor, Tensor]:
    r""":func:`_column_terms` with a per-column known offset: with ``a_k = E_k + floor sigma^2``
    and ``s_k = S_k / K ~ R_k chi2_K / K``, the term ``log a_k + H_{K/2}(K s_k / (2 a_k)) -
    2 log sigma`` is the unique unbiased estimate of ``log((E_k + R_k)/sigma^2 + floor)``
    (:mod:`~fsinfo_fast.estimators.logfloor` with ``a`` per column); written as the
    floor-free term plus :func:`~fsinfo_fast.estimators.logfloor.floor_correction`. A column
    with ``S_k = 0`` contributes ``log(a_k) - 2 log sigma`` (``-inf`` where ``a_k = 0``).
    Returns the terms and the mask of the columns with ``S_k > 0`` and ``x >= _X_FAR``.
    """
    shape = (-1,) + (1,) * (S.ndim - 1)
    oshape = (S.shape[0],) + (1,) * (S.ndim - 2) + (S.shape[-1],)
    a = offset.to(torch.float64).reshape(oshape) + floor * sigma2.reshape(shape)
    a = a.expand_as(S)
    has_a = a > 0
    kk = k.unsqueeze(-1)
    pos = S > 0
    s = torch.where(pos, S / kk, torch.ones_like(S))
    t = torch.log(s)
    t -= log_chi2_mean_offset(kk) + 2.0 * log_sigma.reshape(shape)
    a_safe = torch.where(has_a, a, torch.ones_like(a))
    x = torch.where(has_a & pos, s * (kk / 2.0) / a_safe, torch.full_like(s, math.inf))
    for kv in torch.unique(k).tolist():
        rows = (k == kv).unsqueeze(-1).expand_as(S)
        xs = x[rows]
        if xs.numel():
            t[rows] += floor_correction(xs, kv / 2.0, float(xs.min()))
    zero = torch.where(
        has_a, torch.log(a_safe) - 2.0 * log_sigma.reshape(shape), torch.full_like(a, -math.inf)
    )
    t = torch.where(pos, t, zero)
    return t, pos & (x >= _X_FAR)


def _jackknife_parts(theta: Tensor, theta_minus: Tensor, ng: Tensor, K: float) -> Tensor:
    """Delete-a-group jackknife variance for unequal groups (Busing et al. 1999).

    ``theta``: ``[B, ...]``; ``theta_minus``: ``[B, G, ...]`` leave-group-out estimates;
    ``ng``: ``[G]`` group sizes. Returns the variance with ``theta``'s shape. With equal groups
    it is ``(G - 1)/G sum_g (theta_(-g) - mean)^2`` (computed so).
    """
    n_g = ng.shape[0]
    if bool((ng == ng[0]).all()):
        dev = theta_minus - theta_minus.mean(dim=1, keepdim=True)
        return dev.square_().sum(dim=1) * ((n_g - 1) / n_g)
    h = (K / ng).reshape((1, -1) + (1,) * (theta.ndim - 1))
    w = (1 - ng / K).reshape(h.shape)
    theta_j = n_g * theta - (w * theta_minus).sum(dim=1)
    pseudo = h * theta.unsqueeze(1) - (h - 1) * theta_minus
    return ((pseudo - theta_j.unsqueeze(1)) ** 2 / (h - 1)).sum(dim=1) / n_g


def fsinfo_diag_summary(
    stats: DiagStats,
    sigma: Tensor | float,
    floor: float = DIAG_FLOOR,
    *,
    exact_diagonal: bool = True,
    confidence: float = 0.95,
    offset: Tensor | None = None,
    skew_allowance: bool = True,
) -> DiagSummary:
    r"""FSInfo_diag (nats/dim) from the statistics of ``K >= 2`` probes: value, standard error,
    degrees of freedom and bias bound.

    With ``offset`` (``[B, d]`` float64, the exactly known part ``E_k`` of each diagonal entry
    ``D_k = E_k + R_k``, as in deflation, :mod:`~fsinfo_fast.estimators.deflated`) the probes
    are those of the remainder ``R`` and each column's term is the unbiased
    ``log(a_k) + H_{K/2}(K s_k / (2 a_k))`` with ``a_k = E_k + floor sigma^2`` (exactly
    unbiased given ``E``); everything below applies unchanged, the exactly known variance
    part counting only the columns whose remainder dominates their offset (``x >= 1e8``).

    Value: the exactly unbiased per-column terms (module docstring) averaged, halved, minus
    ``(1/2) log(2 pi e)``.

    Interval (``exact_diagonal=True``, the default): with ``V_J`` the delete-a-group jackknife
    variance, ``V_J^{diag}`` its diagonal part over the columns far from the floor and
    ``V_0 = n_far psi'(K/2) / (4 d^2)`` the exact value of that part (also a lower bound on the
    variance: all pairs of terms are non-negatively correlated), the half-width is

    .. math::

        h = \max\big(t_{K-1}\sqrt{V_J - V_J^{diag} + V_0},\ z\sqrt{V_0}\big)

    (``z`` the normal quantile; for ``K = 2`` the plain ``V_J`` is used in the first term),
    plus, where some columns are near the floor (``floor > 0``, no ``offset``), the skew
    allowance of their part of the estimate (:func:`_floor_skew`: the longer side of a log-scale
    t-interval on that part, which is ``>= 0`` and right-skewed; without it the interval covered
    0.90-0.94 at fixed ``K = 4..32`` on correlated columns at the floor; it is not evaluated
    where every column is far above the floor, so there nothing changes). In the maximum, the
    first term is the jackknife t-interval without the jackknife's small-``K`` upward bias on
    the diagonal (50% at ``K = 2``); the second is the exact interval for the part of the
    variance that is known, which keeps the interval from collapsing when the jackknife estimate
    is small by chance (what makes sequential stopping undercover). ``stderr`` is reported as
    ``h / t_{K-1}``, so ``ci_halfwidth = t_{dof} stderr + bias_bound`` holds. Measured coverage:
    fixed ``K = 3..8``, 0.93-0.97 on banded and low-rank synthetic Jacobians (2000 seeds each)
    whose known share ``V_0 / V`` ranges from 0.004 (rank one) to 0.7 (independent columns);
    VGG5 split 2 at 32 px (1000 seeds) 0.966, 0.969, 0.957, 0.951 at ``K = 3, 4, 6, 8`` (plain
    jackknife 0.967, 0.961, 0.950, 0.952, with 7% wider intervals at ``K = 4``), and under
    adaptive stopping from ``K = 4`` with +50% rounds 0.943-0.966 for ``atol`` 0.005-0.03 (plain
    jackknife 0.913-0.958). At ``K = 2`` the second term makes it conservative (0.99 there; the
    default start is 4). ``exact_diagonal=False``: the plain jackknife t-interval.

    ``dof``: groups used minus one. ``bias_bound``: ``H_ABS_ERR / 2`` where a floor correction
    was evaluated (the numerical error of the unbiased floor term), else 0.

    Args:
        stats: :class:`DiagStats` at ``K`` probes.
        sigma: noise scale, float or ``[B]`` (positive).
        floor: constant inside the logarithm (``>= 0``).
        exact_diagonal: use the exact diagonal part (above) instead of the plain jackknife.
        confidence: two-sided confidence level the interval is built for.
        offset: ``[B, d]`` exactly known non-negative part of each diagonal entry (``None``:
            none). No skew allowance is added then: the deflated estimator, the caller with an
            offset, takes the log-scale interval of the whole remainder's share instead.
        skew_allowance: add the near-floor skew allowance (without ``offset``; ``False``:
            the interval as it was before it, for comparisons).

    Returns:
        :class:`DiagSummary`; ``value`` is ``-inf`` with ``stderr`` 0 where a column is zero and
        ``floor = 0``.
    """
    b, d = stats.batch, stats.d
    dev = stats.group_sums.device
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=dev)
    sig = sig.expand(b) if sig.ndim == 0 else sig.reshape(b)
    log_sigma, sigma2 = torch.log(sig), sig**2
    K = float(stats.k)
    if stats.k < 2:
        raise InvalidInputError(f"a standard error needs K >= 2 probes, got {stats.k}")
    S = stats.sums()  # [B, d]
    kt = torch.full((b,), K, dtype=torch.float64, device=dev)
    if offset is not None:
        offset = torch.as_tensor(offset, dtype=torch.float64, device=dev)
        if offset.shape != (b, d) or not bool((offset >= 0).all()):
            raise InvalidInputError(
                f"offset must be a non-negative [B, d] = [{b}, {d}] tensor, got shape "
                f"{tuple(offset.shape)}"
            )
    terms, far = _column_terms(S, kt, log_sigma, sigma2, floor, offset)
    theta = terms.mean(dim=1) / 2
    used = stats.group_n > 0
    every = bool(used.all())
    ng = stats.group_n if every else stats.group_n[used]  # [G]
    dof = int(ng.shape[0]) - 1
    S_minus = S[:, None, :] - (stats.group_sums if every else stats.group_sums[:, used, :])
    # exact cancellation cannot make a non-zero column's leave-out sum vanish (probability
    # 0); guard the rounding case so a non-zero column never turns into a zero column
    low = S_minus <= 0
    if bool(low.any()):
        low &= S[:, None, :] > 0
        S_minus = torch.where(low, S[:, None, :] * torch.finfo(torch.float64).eps, S_minus)
    t_minus, _ = _column_terms(
        S_minus, (K - ng).expand(b, -1), log_sigma, sigma2, floor, offset
    )
    theta_minus = t_minus.mean(dim=2) / 2  # [B, G]
    var = _jackknife_parts(theta, theta_minus, ng, K)
    finite = torch.isfinite(theta)
    se = var.clamp_min(0).sqrt()
    if exact_diagonal:
        n_far = far.sum(dim=1) if far is not None else torch.full_like(theta, d)
        known = n_far.to(torch.float64) * _trigamma(K / 2.0) / (4.0 * d * d)
        if stats.k > 2:
            # the diagonal part is a sum over columns of nearly independent terms: on a regular
            # subsample of _DIAG_COLUMNS columns it is known to about 1%, at a fraction of the
            # cost (scaled by the count of far columns)
            step = max(1, d // _DIAG_COLUMNS)
            tc, tm = terms[..., ::step], t_minus[..., ::step]
            if not bool(finite.all()):  # -inf terms of zero columns (floor = 0): no variance
                tc = torch.where(torch.isfinite(tc), tc, torch.zeros_like(tc))
                tm = torch.where(torch.isfinite(tm), tm, torch.zeros_like(tm))
            per_col = _jackknife_parts(tc, tm, ng, K)  # [B, d / step]
            if far is not None:
                fsub = far[..., ::step]
                per_col = torch.where(fsub, per_col, torch.zeros_like(per_col))
                n_sub = fsub.sum(dim=1).to(torch.float64)
            else:
                n_sub = torch.full_like(theta, per_col.shape[1])
            scale = torch.where(n_sub > 0, n_far.to(torch.float64) / n_sub.clamp_min(1), 0.0)
            jk_far = per_col.sum(dim=1) * scale / (4.0 * d * d)
            se = (var - jk_far + known).clamp_min(0).sqrt()
        ratio = _normal_over_t(dof, confidence)
        se = torch.maximum(se, ratio * known.sqrt())
        if skew_allowance and floor > 0 and offset is None and far is not None:
            se = se + _floor_skew(terms, t_minus, ~far, ng, K, math.log(floor), dof,
                                  confidence)
    se = torch.where(finite, se, torch.zeros_like(theta))
    bias = torch.zeros_like(theta)
    if (floor > 0 or offset is not None) and far is not None:
        near = (S > 0) & ~far
        bias = torch.where(near.any(dim=1) & finite, torch.full_like(theta, H_ABS_ERR / 2), bias)
    return DiagSummary(theta - HALF_LOG_2PIE, se, dof, bias)


def _floor_skew(terms: Tensor, t_minus: Tensor, near: Tensor, ng: Tensor, K: float,
                log_floor: float, dof: int, confidence: float) -> Tensor:
    r"""Standard-error allowance for the right skew of the columns near the floor.

    Near the floor a column's term ``log(floor) + H(x)`` is nearly linear in its probe mean, so
    their part of the estimate, ``E = (1/2d) sum_near (term_k - log floor) >= 0`` (exactly
    unbiased for ``(1/2d) sum_near log(1 + D_k / (floor sigma^2))``), is a mean over probes of
    positive, right-skewed values; when those columns are strongly correlated (a few output
    directions carry them) it has few effective degrees of freedom and the symmetric t-interval
    undercovers (0.90 at ``K = 4``, 0.94 at ``K = 32``), as for a Hutchinson trace. The
    allowance is that of :func:`~.hutchinson.log_t_halfwidth` on ``E`` with its own jackknife
    standard error ``s_E``: ``(E (exp(t s_E / E) - 1) - t s_E) / t`` (0 where ``E = 0``; small,
    ``~ t s_E^2 / (2E)``, unless ``s_E`` is a sizeable fraction of ``E``).
    """
    from .base import t_quantile

    d = terms.shape[-1]
    w = near.to(terms.dtype)  # the sums below are matrix products: no [B, G, d] temporary
    n_near = w.sum(dim=1)
    e = (torch.einsum("bd,bd->b", terms, w) - log_floor * n_near) / (2 * d)
    e_minus = (torch.einsum("bgd,bd->bg", t_minus, w)
               - log_floor * n_near.unsqueeze(1)) / (2 * d)
    se_e = _jackknife_parts(e, e_minus, ng, K).clamp_min(0).sqrt()
    q = t_quantile(dof, confidence)
    # the log-scale half-width's excess over the symmetric one (0 where E <= 0 or s_E = 0)
    extra = log_t_halfwidth(e, se_e, dof, confidence) - q * se_e
    return extra.clamp_min(0) / q


@functools.lru_cache(maxsize=4096)
def _normal_over_t(dof: int, confidence: float) -> float:
    """``z_{(1+c)/2} / t_{(1+c)/2, dof}`` (cached, as :func:`_trigamma`)."""
    from scipy.stats import norm

    from .base import t_quantile

    return float(norm.ppf(0.5 * (1.0 + confidence))) / t_quantile(dof, confidence)


def trace_summary(stats: DiagStats) -> DiagSummary:
    r"""Hutchinson ``tr(J^T J)`` from the same Gaussian output-side probes: the mean of
    ``||g_j||^2``, its standard error ``std / sqrt(K)`` and ``K - 1`` dof (``K >= 2``); the
    interval is the log-scale t-interval (``log_scale=True``,
    :func:`~fsinfo_fast.estimators.hutchinson.log_t_halfwidth`).

    Scale by ``1 / (sigma^2 d)`` for dFIL (the half-width scales with it).
    """
    if stats.k < 2:
        raise InvalidInputError(f"a standard error needs K >= 2 probes, got {stats.k}")
    mean, se = mean_and_stderr(stats.norms)
    return DiagSummary(mean, se, stats.k - 1, torch.zeros_like(mean), log_scale=True,
                       skew=sample_skewness(stats.norms))


#: the most probes per sample the floored FSInfo_diag takes (:mod:`.logfloor` tabulates its
#: unbiased floor term for chi-square shapes ``K / 2 <= 5000``)
MAX_FLOORED_PROBES = 10_000


def check_floored_cap(rule: StoppingRule, floor: float) -> None:
    """Raise where ``rule`` lets a floored FSInfo_diag take more than
    :data:`MAX_FLOORED_PROBES` probes per sample."""
    if floor <= 0:
        return
    for name in ("num_probes", "max_probes"):
        v = getattr(rule, name)
        if v is not None and v > MAX_FLOORED_PROBES:
            raise InvalidInputError(
                f"{name} = {v}: FSInfo_diag's unbiased floor term is tabulated up to "
                f"{MAX_FLOORED_PROBES} probes per sample (chi-square shape K/2 <= 5000); give "
                "at most that many, or floor=0")


def estimate_diag(
    products: Products,
    *,
    sigma: float | Tensor,
    floor: float = DIAG_FLOOR,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    stop: StoppingRule | None = None,
    stop_on: str = "fsinfo_diag",
    dfil_rtol: float | None = None,
    jackknife_groups: int = 20,
    exact_diagonal: bool = True,
    state: DiagProbeState | None = None,
    **rule: Unpack[StopKeywords],
) -> DiagEstimate:
    r"""FSInfo_diag and dFIL per sample from ``K`` VJPs with Gaussian probes.

    .. math::

        \mathrm{FSInfo}_{diag} = \frac{1}{2d}\sum_k \log\Big(\frac{(J^TJ)_{kk}}{\sigma^2}
        + \mathrm{floor}\Big) - \frac12\log(2\pi e), \qquad
        \mathrm{dFIL} = \frac{\mathrm{tr}(J^TJ)}{\sigma^2 d}

    A driver over :class:`DiagProbeState` (the probes), :func:`fsinfo_diag_summary` and
    :func:`trace_summary` (the estimates at each round boundary) and
    :func:`~fsinfo_fast.estimators.stopping.run_rounds` (which sample stops where).

    Args:
        products: batched Jacobian products (only ``vjp`` is used).
        sigma: noise scale, float or ``[B]``.
        floor: constant inside the logarithm (the paper's ``1e-10``; ``>= 0``). Exactly
            debiased for every ``floor``; ``-inf`` for a zero column with ``floor = 0``.
        seed: probe seed (or a ``torch.Generator``).
        sample_ids: ``[B]`` global sample ids (default ``arange(B)``).
        stop: the :class:`~fsinfo_fast.estimators.StoppingRule`; its ``atol``/``rtol`` are
            the targets of the quantity ``stop_on`` (unset start and rounds: 4 probes, then
            +50% per round, :func:`~fsinfo_fast.estimators.stopping.initial_probes`).
        stop_on: ``"fsinfo_diag"`` (the rule's tolerance is FSInfo_diag's: ``atol`` in nats
            per input dimension) or ``"dfil"`` (dFIL's).
        dfil_rtol: also require dFIL's half-width ``<= dfil_rtol * dFIL``.
        **rule: the keywords of :class:`~.stopping.StopKeywords` (``num_probes``,
            ``atol``, ``rtol``, ``max_probes``, ...): the
            same as ``stop=StoppingRule(...)`` with these fields (not together with ``stop``);
            ``dfil_rtol`` alone (no ``atol``/``rtol``/``num_probes``) stops on dFIL only.
        jackknife_groups: at most this many jackknife groups (``>= 2``); bounds memory to
            ``[B, groups, d]`` float64.
        exact_diagonal: see :func:`fsinfo_diag_summary`.
        state: a :class:`DiagProbeState` of this batch (same seed, sample ids and groups) to
            reuse: round boundaries it already holds (as snapshots, or its current count) are
            served without products, the rest are drawn and added to it. Each sample's result
            equals that of a fresh call with the same arguments. Raises
            :class:`SnapshotDroppedError` when a boundary it passed was not kept (recompute
            with a fresh state).

    Returns:
        :class:`DiagEstimate` (``fsinfo_diag``, ``dfil``), float64 ``[B]`` tensors; ``passes``
        is the number of VJPs per sample computed by this call (``info["reused_probes"]``
        were served from ``state``). ``fsinfo_diag.singular`` marks ``-inf`` values (a
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
    rule, targets = _diag_rule(stop, stop_on, dfil_rtol, **rule)
    check_floored_cap(rule, floor)
    confidence = rule.confidence
    if state is None:
        state = DiagProbeState.for_products(
            products, seed=seed, sample_ids=sample_ids, jackknife_groups=jackknife_groups
        )
    else:
        _check_state(state, products, seed, sample_ids, jackknife_groups)
    run = _Replay(state, products)
    sigma_t = sigma_for(products, sigma)
    floor = float(floor)
    dfil_scale = 1.0 / (sigma_t**2 * products.d)

    def summarize(lo: int, rows: Tensor | None = None, names: Container[str] | None = None):
        st, idx = run.stats(lo, rows)

        def full(t: Tensor) -> Tensor:  # [rows] -> [B], NaN elsewhere
            if idx is None:
                return t
            f = torch.full((products.batch,), math.nan, dtype=t.dtype, device=t.device)
            f[idx] = t
            return f

        out = {}
        if names is None or "fsinfo_diag" in names:
            sig = sigma_t if idx is None else sigma_t[idx]
            fs = fsinfo_diag_summary(st, sig, floor, exact_diagonal=exact_diagonal,
                                     confidence=confidence)
            out["fsinfo_diag"] = (full(fs.value), full(fs.stderr), fs.dof, full(fs.bias_bound))
        if names is None or "dfil" in names:
            tr = trace_summary(st)
            scale = dfil_scale if idx is None else dfil_scale[idx]
            dv, dse = full(tr.value * scale), full(tr.stderr * scale)

            dfil_hw = TraceHalfwidth(dv, confidence, 1.0, full(tr.skew))  # Gaussian probes
            out["dfil"] = (dv, dse, tr.dof, torch.zeros_like(dv), dfil_hw)
        return out

    frozen, converged, probes, drawn, pilot = run_rounds(
        rule,
        batch=products.batch,
        device=products.device,
        process=run.process,
        summarize=summarize,
        targets=targets,
        mark=run.mark,
    )
    computed = run.computed
    info = {
        "seed": state.seed,
        "side": "output",
        "kind": "gaussian",
        "reused_probes": run.reused(drawn),
        "stop_on": sorted(targets),
        "computed_per_sample": run.computed_per_sample,
    }
    common = dict(converged=converged, probes=probes, drawn=drawn, pilot=pilot, passes=computed)
    fs = frozen["fsinfo_diag"]
    fs_est = estimate_from(
        rule, fs, singular=~torch.isfinite(fs.value), **common,
        info={
            "method": "chi2_debiased_diag",
            "quantity": "fsinfo_diag",
            "floor": floor,
            "floor_debiasing": "exact (unique unbiased function of the chi-square mean)",
            "se_method": "delete-a-group jackknife"
            + (", exact diagonal part" if exact_diagonal else ""),
            "jackknife_groups": jackknife_groups,
            **info,
        },
    )
    df_est = estimate_from(
        rule, frozen["dfil"], bias_bound=False, **common,
        info={
            "method": "hutchinson",
            "quantity": "dfil",
            "se_method": "sample std / sqrt(K)",
            "interval": "log-scale t (upper side, symmetric)",
            **info,
        },
    )
    return DiagEstimate(fsinfo_diag=fs_est, dfil=df_est)


def fsinfo_diag_restaged(
    state: DiagProbeState,
    est: Estimate,
    sigma: Tensor,
    floor: float,
    *,
    rows: Tensor | None = None,
    halfwidth: bool = True,
    exact_diagonal: bool = True,
    confidence: float = 0.95,
) -> tuple[Tensor, Tensor | None]:
    r"""FSInfo_diag at another ``sigma`` and ``floor`` from exactly the probes and stages of
    ``est``, an :func:`estimate_diag` result on ``state`` (adaptive, or a fixed count):
    ``(value, ci_halfwidth)``, ``[B]`` float64 each (``sigma``: float or ``[B]``; ``rows``:
    ``[B]`` bool, the samples to evaluate, ``None``: all; NaN elsewhere; ``halfwidth=False``:
    the value alone, ``None`` for the half-width).

    A sample reported from stage 3 gets stage 3's value at ``(sigma, floor)`` and Stein's
    interval from stage 2's spread at ``(sigma, floor)`` scaled to stage 3's size (plus stage
    3's allowance), as :func:`~.stopping.run_rounds` builds it; a sample reported from one
    stage (stage 1 or 2, or a fixed count), that stage's own interval. Stein's argument holds
    for every ``(sigma, floor)`` at once: the stage sizes are functions of the earlier stages'
    probes only, and stage 3's probes are fresh given its size, so at each fixed ``(sigma,
    floor)`` the interval covers as the one at ``est``'s own. What ``est``'s tolerance said
    about the half-width at its own ``sigma`` and ``floor`` need not hold at these.

    Used to solve FSInfoGuard's floored equation (:meth:`~fsinfo_fast.Linearization.
    fsinfo_sigma`): the value is decreasing in ``sigma`` for fixed probes (each column's term
    is ``log(floor) + H(x)`` with ``H`` increasing and ``x`` proportional to ``sigma^-2``).

    Raises:
        SnapshotDroppedError: a stage boundary's statistics are no longer held by ``state``.
    """
    from .base import t_quantile
    from .stopping import recheck_ratio

    n1 = est.info.get("stage1_probes", 0)  # absent for a fixed count: its own interval
    if est.probes_per_sample is None or "pilot_probes" not in est.info:
        raise InvalidInputError("fsinfo_diag_restaged needs an estimate_diag result")
    b = state.batch
    want = torch.ones(b, dtype=torch.bool, device=state.device) if rows is None else rows
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=state.device).reshape(-1)
    sig = sig.expand(b) if sig.numel() == 1 else sig
    if sig.shape != (b,) or want.shape != (b,) or want.dtype != torch.bool:
        raise InvalidInputError(f"sigma must be a float or [B] = [{b}], rows a [B] bool mask")
    los, his = est.info["pilot_probes"], est.probes_per_sample
    value = torch.full((b,), math.nan, dtype=torch.float64, device=state.device)
    hw = value.clone()
    def stage(a: int, z: int, group: Tensor) -> tuple[DiagStats, Tensor | None]:
        base = state.stats(a, group).group_sums if a > 0 else None
        return stage_stats(state.stats(z, group), a, base, group)

    def summary(a: int, z: int, group: Tensor) -> tuple[DiagSummary, Tensor]:
        st, idx = stage(a, z, group)
        out = fsinfo_diag_summary(st, sig if idx is None else sig[idx], floor,
                                  exact_diagonal=exact_diagonal, confidence=confidence)
        return out, (group.nonzero().squeeze(1) if idx is None else idx)

    # the samples sharing a stage are summarised together, as run_rounds did
    pilot_se = torch.zeros_like(value)
    pilot_t = torch.zeros_like(value)
    rechecked = est.info.get("rechecked")
    rechecked = (torch.zeros_like(want) if rechecked is None
                 else torch.as_tensor(rechecked, device=state.device).to(torch.bool))
    for lo in sorted(set(los[want].tolist())) if halfwidth else ():
        group = want & (los == lo)
        if lo > n1:  # Stein: stage 2's spread (probes n1 .. lo - 1), then scaled
            pilot, idx = summary(n1, lo, group)
            pilot_se[idx] = pilot.stderr
            pilot_t[idx] = t_quantile(pilot.dof, confidence)
    for lo, hi in sorted({(int(a), int(z)) for a, z in zip(los[want].tolist(),
                                                            his[want].tolist(), strict=True)}):
        last, idx = summary(lo, hi, want & (los == lo) & (his == hi))
        value[idx] = last.value
        if not halfwidth:
            continue
        if lo > n1:  # stage 2's standard error scaled to stage 3's size
            se = pilot_se[idx] * math.sqrt((lo - n1) / (hi - lo))
            h = torch.where(se == 0, torch.zeros_like(se), pilot_t[idx] * se) + last.bias_bound
            # run_rounds' re-check at these (sigma, floor): where stage 3's per-probe spread
            # grew past stage 2's (or the estimate's own re-check widened it), the wider of
            # Stein's interval and stage 3's own (helper 102: at a floored sigma* far below
            # the estimate's sigma, Stein's alone was 23x narrower than the estimator's own
            # interval at that sigma, and the solve missed the truth by up to 7 half-widths)
            n2, n3 = lo - n1, hi - lo
            crit = recheck_ratio(n3, n2)
            s3, s2 = last.stderr.square() * n3, pilot_se[idx].square() * n2
            grew = ((s3 > crit * s2) & (s3 > 0)) | rechecked[idx]
            h = torch.where(grew & torch.isfinite(last.value),
                            torch.maximum(h, last.halfwidth(confidence)), h)
        else:
            h = last.halfwidth(confidence)
        hw[idx] = torch.where(torch.isfinite(last.value), h, torch.zeros_like(h))
    return value, (hw if halfwidth else None)
