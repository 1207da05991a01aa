r"""Deflated FSInfo_diag and dFIL: the dominant subspace exactly, only the remainder by probes.

Where a few output directions dominate ``J`` (deep splits), its columns are strongly correlated
and the per-column errors of the plain estimator (:func:`~.diagonal.estimate_diag`) do not
average out: with per-column correlations ``rho_kl`` of the probe values, one probe's
FSInfo_diag term has variance about ``sum_kl rho_kl^2 / (2 d^2)``, up to ``1/2`` for a rank-one
``J`` against ``1/(2d)`` for orthogonal columns. Deflation removes the dominant part exactly
(Diag++, Baston and Nakatsukasa 2022; Hutch++, Meyer et al. 2021, for the trace).

**Sketch.** ``Q = orth(J Omega)`` (``m x r``, ``Omega`` a seeded ``d x r`` Gaussian, ``r`` JVPs;
with ``power=1`` one power step ``orth(J J^T Q_0)``, ``r`` more VJPs and JVPs), grown in blocks
by Gram-Schmidt against the columns already there (so every prefix of ``Q`` is itself a sketch),
then ``W = J^T Q`` (``r`` VJPs). With ``P = Q Q^T``:

.. math::

    D_k = (J^T J)_{kk} = \underbrace{\|W^T e_k\|^2}_{E_k\ \text{(exact)}}
        + \underbrace{\|(I - P) J e_k\|^2}_{R_k}.

**Remainder.** Gaussian output probes ``u_j`` projected by ``I - P``: ``g_j = J^T (I - P) u_j``
(one VJP each) has ``g_{jk} ~ N(0, R_k)`` exactly, so ``S_k = sum_j g_{jk}^2 ~ R_k chi2_K``
given ``Q`` (the probes are drawn from their own stream, independent of ``Q``). Each column's
term ``log(a_k) + H_{K/2}(S_k / (2 a_k))``, ``a_k = E_k + floor sigma^2``, is the unique unbiased
estimate of ``log(D_k + floor sigma^2)`` (:mod:`~.logfloor`, with a per-column offset), so the
FSInfo_diag estimate is exactly unbiased given ``Q``, hence unconditionally. Its interval is that
of :func:`~.diagonal.fsinfo_diag_summary` (delete-a-group jackknife with the exact diagonal part)
with the offset ``E``. The trace (dFIL) shares it: ``tr(J^T J) = sum_k E_k + E||g_j||^2``
(Hutch++'s split), the remainder by the mean of ``||g_j||^2`` with its log-scale t-interval.

**Rank** (``rank="auto"``). After the first block the variance of one remainder probe's term is
predicted (delta method) as ``||Rt||_F^2 / (2 d^2)`` with ``Rt = Dw^{-1/2} J^T (I - P) J
Dw^{-1/2}`` and ``Dw = diag(D + floor sigma^2)``, estimated without bias from ``K_p`` pilot
probes (:data:`PILOT_PROBES` plain Gaussian VJPs, stream 0, the plain estimator's first round):
for ``j != l``, ``E[(h_j^T h_l)^2] = ||Rt||_F^2`` with ``h_j = Dw^{-1/2} (g_j - W Q^T u_j)``.
That predicts the probes the tolerance needs at each rank, ``K(r) = (2 / atol)^2 ||Rt||_F^2 /
(2 d^2)``. The sketch grows by half (:data:`RANK_GROWTH`) while the marginal saving it predicts
exceeds a column's cost (2 products, 4 with a power step): with the local decay ``K ~ r^-p``
seen over the last step, while ``p K(r) / r > 2``; per sample (a sample keeps the rank it
stopped at, so its estimate does not depend on the batch). The pilot probes decide only the
rank and are not used in the estimate: ``Q`` stays independent of the remainder probes.

**Stopping.** With a tolerance, the remainder probes follow the shared three-stage rule of
:mod:`~fsinfo_fast.estimators.stopping` (stage 1 sizes stage 2, whose spread sizes stage 3;
the estimate from stage 3's fresh probes alone, with Stein's interval), so neither the value
nor its interval is selected by its own variance estimate; the pilot's prediction ``K(r)`` is
recorded (``info["predicted_probes"]``). The FSInfo_diag interval is the trace's
(:class:`~.hutchinson.TraceHalfwidth`) of the remainder's share ``theta - theta_0``
(``theta_0`` the value with a zero remainder, exactly known; the share is ``>= 0`` and
right-skewed where the exact part dominates, where the plain t-interval undercovered: 0.88-0.90
at ``K = 6`` on the test Jacobians): the log-scale t-interval after a pilot, the
skewness-calibrated multiplier (:func:`_influence_skew`) where the mean and the spread are of
the same probes; the dFIL remainder's interval is the same (:func:`~.hutchinson.
residual_halfwidth`, the skewness of ``||g_j||^2``). With the log-scale interval alone, a
remainder of nearly one direction (a rank-16 sketch of 17 equal directions) covered 0.93-0.94
(FSInfo_diag) and 0.92-0.93 (dFIL) at fixed ``K = 4..12`` (helper 137).

Costs per sample: ``K_p`` (pilot) ``+ (2 + 2 power) r`` (sketch and ``W``) ``+ K`` (remainder)
products; memory ``[B, m, r]`` and ``[B, d, r]`` float64 (``r <= max_rank``).
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass
from typing import Unpack

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..formulas import DIAG_FLOOR, HALF_LOG_2PIE
from .base import (
    Products,
    RowProducts,
    check_finite,
    detached,
    rows_at_one_count,
    sigma_for,
    t_quantile,
)
from .diagonal import (
    DiagEstimate,
    DiagProbeState,
    _check_state,
    _diag_rule,
    _Replay,
    check_floored_cap,
    fsinfo_diag_summary,
    state_fields,
)
from .hutchinson import (
    TraceHalfwidth,
    mean_and_stderr,
    residual_halfwidth,
    sample_skewness,
    with_rounding,
)
from .probes import draw_probes
from .stopping import (
    StopKeywords,
    StoppingRule,
    estimate_from,
    run_rounds,
)

__all__ = [
    "DEFLATION_SKETCH_STREAM",
    "DEFLATION_RESIDUAL_STREAM",
    "PILOT_PROBES",
    "DeflatedProbeState",
    "DeflationSketch",
    "RankChoice",
    "choose_rank",
    "estimate_diag_deflated",
    "DEFLATE_ABOVE",
    "predict_plain_probes",
]

#: Probe stream of the sketch ``Omega`` (input side) ...
DEFLATION_SKETCH_STREAM = 11
#: ... and of the remainder's output-side probes (the pilot uses stream 0, the plain
#: estimator's probes).
DEFLATION_RESIDUAL_STREAM = 12
#: Plain Gaussian VJPs that predict the remainder's variance when the rank is chosen.
PILOT_PROBES = 8
#: ``auto`` takes the deflated estimator where the plain one is predicted to need more probes
#: than this (8 times the products of the first sketch block: below it the sketch rarely pays;
#: on the CRAFT VGG16-BN at 32 px the plain estimator needed 162 probes at pool3, where
#: deflation cost about as much, and 548 and 2775 at pool4 and conv5_2, where it cost 3x and
#: 25x fewer).
DEFLATE_ABOVE = 256
#: The sketch grows by this factor per step with ``rank="auto"``.
RANK_GROWTH = 1.5
#: Range of the local decay exponent ``p`` of ``K(r) ~ r^-p`` used by the rank choice.
_P_MIN, _P_MAX = 0.25, 4.0
#: The first sketch block with ``rank="auto"``.
START_RANK = 16
#: The normal 95% quantile, the first guess of the planning quantile (then the t-quantile).
_PLAN_Q = 1.96


@dataclass
class DeflationSketch:
    r"""An orthonormal sketch of the range of each ``J_b`` and its exact diagonal part.

    Attributes:
        Q: ``[B, m, r]`` float64, orthonormal columns (a Gram-Schmidt order: every prefix of
            ``Q`` is the sketch of that size); sample ``b``'s first ``held[b]`` columns.
        W: ``[B, d, r]`` float64, ``J^T Q``.
        passes: products (JVPs + VJPs) spent per sample (for the sample that spent the most).
        power: power steps per block.
        held: ``[B]`` int64, the columns each sample holds (a sample that stopped growing
            holds fewer than ``r``; its columns beyond are zero and never read).
    """

    Q: Tensor
    W: Tensor
    passes: int = 0
    power: int = 0
    held: Tensor | None = None

    def __post_init__(self) -> None:
        if self.held is None:
            self.held = torch.full((self.Q.shape[0],), self.Q.shape[2], dtype=torch.int64,
                                   device=self.Q.device)
        self._spent = torch.full_like(self.held, self.passes)

    @property
    def rank(self) -> int:
        """The most columns any sample holds."""
        return int(self.Q.shape[2])

    @classmethod
    def empty(cls, products: Products, power: int = 0) -> DeflationSketch:
        b, m, d, dev = products.batch, products.m, products.d, products.device
        return cls(
            torch.zeros(b, m, 0, dtype=torch.float64, device=dev),
            torch.zeros(b, d, 0, dtype=torch.float64, device=dev),
            0,
            power,
        )

    def grow(self, products: Products | RowProducts, count: int, seed: int,
             sample_ids: Tensor, rows: Tensor | None = None) -> None:
        """Add ``count`` columns for the samples ``rows`` (``[B]`` bool, ``None``: all), which
        must hold the same number ``r0`` of columns: ``J Omega`` (sketch columns ``r0 ..
        r0+count-1``, each sample's own), with ``power`` power steps, orthogonalised against
        its ``Q``; then their ``J^T q``. On a sub-batch of those samples where ``products``
        can select one and that pays (:class:`~.base.RowProducts`); a whole-batch round also
        grows the other samples that hold ``r0`` columns."""
        router = products if isinstance(products, RowProducts) else RowProducts(products)
        b, dev = self.Q.shape[0], self.Q.device
        at = rows_at_one_count(self.held, rows, "grow (sketch ranks)")
        if at is None:
            return
        want, r0 = at
        per_col = 2 + 2 * self.power
        idx = router.rows(None if bool(want.all()) else want, per_col * count)
        comp = torch.arange(b, device=dev) if idx is None else idx
        prod = router.products
        om = draw_probes(
            prod.d,
            seed=seed,
            sample_ids=sample_ids[comp],
            start=r0,
            count=count,
            kind="gaussian",
            dtype=prod.dtype,
            device=prod.device,
            stream=DEFLATION_SKETCH_STREAM,
        )
        Y = router.jvp(om).to(torch.float64)  # [n, c, m]
        check_finite(Y, sample_ids, r0, "deflation sketch (J omega)", idx)
        for _ in range(self.power):
            Qy = _orthonormal(Y.transpose(1, 2))  # [n, m, c]
            Z = router.vjp(Qy.transpose(1, 2).to(prod.dtype))
            Y = router.jvp(Z).to(torch.float64)
            check_finite(Y, sample_ids, r0, "deflation power step (J J^T q)", idx)
        self._spent[comp] += per_col * count
        self.passes = int(self._spent.max())
        keep = self.held[comp] == r0  # a row computed past its rank is not added
        Qn = torch.zeros(comp.numel(), self.Q.shape[1], count, dtype=torch.float64, device=dev)
        kept = comp[keep]
        Qn[keep] = _orth_against(self.Q[kept, :, :r0], Y[keep].transpose(1, 2),
                                 _SPAN_ULPS * torch.finfo(prod.dtype).eps)
        Wn = router.vjp(Qn.transpose(1, 2).to(prod.dtype)).to(torch.float64)
        check_finite(Wn, sample_ids, r0, "deflation exact part (J^T q)", idx)
        end = r0 + count
        if end > self.rank:  # room for the new columns (zero: not held)
            pad = end - self.rank
            self.Q = torch.cat([self.Q, self.Q.new_zeros(b, self.Q.shape[1], pad)], dim=2)
            self.W = torch.cat([self.W, self.W.new_zeros(b, self.W.shape[1], pad)], dim=2)
        self.Q[kept, :, r0:end] = Qn[keep]
        self.W[kept, :, r0:end] = Wn[keep].transpose(1, 2)
        self.held[kept] = end

    def grow_to(self, products: Products | RowProducts, rank: int, seed: int,
                sample_ids: Tensor, rows: Tensor | None = None) -> None:
        """Grow every sample of ``rows`` (``None``: all) that holds fewer than ``rank``
        columns to ``rank`` (one :meth:`grow` per rank held)."""
        want = torch.ones_like(self.held, dtype=torch.bool) if rows is None else rows
        short = want & (self.held < rank)
        for h in sorted({int(v) for v in self.held[short].tolist()}):
            self.grow(products, rank - h, seed, sample_ids, short & (self.held == h))

    def exact_part(self, ranks: Tensor) -> Tensor:
        """``[B, d]`` float64 ``E_k = sum_{i < r_b} W[b, k, i]^2`` for per-sample ranks."""
        _, W, mask = self.prefix(ranks)
        return (W.square() * mask[:, None, :]).sum(dim=2)

    def prefix(self, ranks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``Q``, ``W`` and the ``[B, R]`` float64 mask of each sample's columns, cut at ``R =
        max(ranks)``: what every use of the sketch at ``ranks`` reads, so that the result does
        not depend on how far a shared sketch has grown beyond them."""
        if bool((ranks > self.held).any()):
            raise InvalidInputError(
                f"the sketch holds ranks {self.held.tolist()}, fewer than asked for "
                f"({ranks.tolist()}): grow it first")
        r = int(ranks.max()) if ranks.numel() else 0
        idx = torch.arange(r, device=self.Q.device)
        mask = (idx[None, :] < ranks[:, None]).to(torch.float64)  # [B, R]
        return self.Q[:, :, :r], self.W[:, :, :r], mask

    def basis(self, ranks: Tensor) -> Tensor:
        """``[B, m, R]`` ``Q`` with the columns beyond each sample's rank zeroed."""
        Q, _, mask = self.prefix(ranks)
        return Q * mask[:, None, :]

    def copy(self) -> DeflationSketch:
        """An independent copy (growing it leaves this one as it is)."""
        out = DeflationSketch(self.Q.clone(), self.W.clone(), self.passes, self.power,
                              self.held.clone())
        out._spent = self._spent.clone()
        return out


def _orthonormal(Y: Tensor) -> Tensor:
    """``[B, m, c]`` orthonormal basis of the columns (reduced QR, float64)."""
    return torch.linalg.qr(Y, mode="reduced").Q


#: Orthonormality the sketch must keep (``max |Q^T Q - I|``).
_ORTH_TOL = 1e-8
#: A new sketch direction whose part outside the held ones is below this many unit roundoffs
#: of the products' dtype (relative to the block's largest column) is numerically in their span.
_SPAN_ULPS = 1e3


def _orth_error(full: Tensor) -> Tensor:
    """``[B]`` ``max |Q^T Q - I|`` per sample."""
    eye = torch.eye(full.shape[2], dtype=torch.float64, device=full.device)
    return (full.transpose(1, 2) @ full - eye).abs().amax(dim=(1, 2))


def _complete(Q: Tensor, Y: Tensor, tol: float) -> Tensor:
    r"""One sample's ``[m, c]`` orthonormal block orthogonal to ``Q`` ``[m, r]`` when ``(I -
    QQ^T) Y`` is numerically rank-deficient (``J`` has rank below the sketch's: a bottleneck,
    dead ReLUs): the directions of that part above ``tol`` (its SVD), then the coordinate
    vectors ``e_i`` least covered by the basis so far (``argmin ||P e_i||``, deterministic),
    each orthogonalised twice. The split of ``diag(J^T J)`` into the sketch's exact part and the
    remainder holds for any orthonormal ``Q``; directions outside the range of ``J`` only add
    exact parts of zero."""
    m, c = Y.shape
    U, S, _ = torch.linalg.svd(Y, full_matrices=False)
    basis = torch.cat([Q, U[:, S > tol]], dim=1)
    while basis.shape[1] < Q.shape[1] + c:
        i = int(torch.argmin(basis.square().sum(dim=1)))
        v = torch.zeros(m, 1, dtype=Y.dtype, device=Y.device)
        v[i] = 1.0
        for _ in range(2):
            v = v - basis @ (basis.T @ v)
        basis = torch.cat([basis, v / v.norm()], dim=1)
    return basis[:, Q.shape[1]:]


def _orth_against(Q: Tensor, Y: Tensor, rel_tol: float = 0.0) -> Tensor:
    """Orthonormal ``[B, m, c]`` basis of ``(I - Q Q^T) Y`` (block Gram-Schmidt, twice); for a
    sample where that part is numerically rank-deficient (``J``'s rank is below the sketch's),
    its directions above ``rel_tol`` times the block's largest column, completed by
    :func:`_complete`. Batch-independent: each sample's block depends on its own ``Q``, ``Y``."""
    scale = Y.norm(dim=1).amax(dim=1)  # [B]
    for _ in range(2):
        if Q.shape[2]:
            Y = Y - Q @ (Q.transpose(1, 2) @ Y)
    Qn, R = torch.linalg.qr(Y, mode="reduced")
    if Q.shape[2]:
        Qn = _orthonormal(Qn - Q @ (Q.transpose(1, 2) @ Qn))
    # rank-deficient: a small diagonal of the projected block's R, or orthogonality lost
    r_diag = R.diagonal(dim1=1, dim2=2).abs()  # [B, c]
    tol = rel_tol * scale
    errs = _orth_error(torch.cat([Q, Qn], dim=2))
    bad = torch.nonzero((r_diag <= tol[:, None]).any(dim=1) | ~(errs < _ORTH_TOL)).flatten()
    for b in bad.tolist():
        Qn[b] = _complete(Q[b], Y[b], float(tol[b]))
    if bad.numel():
        errs = _orth_error(torch.cat([Q, Qn], dim=2))
    err = float(errs.max()) if errs.numel() else 0.0
    if not err < _ORTH_TOL:
        raise FloatingPointError(
            f"deflation sketch lost orthogonality ({err:.2e}) although every sample's block was "
            "completed; lower max_rank"
        )
    return Qn


class _DeflatedProbeState(DiagProbeState):
    """:class:`DiagProbeState` whose probes are ``(I - Q Q^T) u`` from the remainder stream."""

    basis: Tensor

    def _output_probes(self, start: int, count: int, dtype: torch.dtype,
                       idx: Tensor | None = None) -> Tensor:
        U = draw_probes(
            self.m,
            seed=self.seed,
            sample_ids=self.sample_ids if idx is None else self.sample_ids[idx],
            start=start,
            count=count,
            kind="gaussian",
            dtype=torch.float64,
            device=self.device,
            stream=DEFLATION_RESIDUAL_STREAM,
        )
        Q = self.basis if idx is None else self.basis[idx]
        U = U - (U @ Q) @ Q.transpose(1, 2)
        return U.to(dtype)


def _pilot_f2(
    pilot_g: Tensor, pilot_u: Tensor, sketch: DeflationSketch, ranks: Tensor, weights: Tensor | None
) -> Tensor:
    """``[B]`` unbiased estimate of ``||Dw^{-1/2} R Dw^{-1/2}||_F^2`` (``R`` the remainder
    ``J^T (I - P) J`` at ``ranks``; ``Dw^{-1} = weights``, ``None``: identity) from the pilot
    pairs ``j < l``: ``E[(h_j^T h_l)^2]`` for independent ``h ~ N(0, Dw^{-1/2} R Dw^{-1/2})``."""
    Q, W, mask = sketch.prefix(ranks)  # [B, m, R], [B, d, R], [B, R]
    C = (pilot_u @ Q) * mask[:, None, :]  # [B, K_p, R]
    H = pilot_g - C @ W.transpose(1, 2)  # [B, K_p, d]
    if weights is not None:
        H = H * weights.sqrt()[:, None, :]
    gram = H @ H.transpose(1, 2)  # [B, K_p, K_p]
    kp = gram.shape[1]
    off = torch.triu(torch.ones(kp, kp, dtype=torch.bool, device=gram.device), diagonal=1)
    return gram.square()[:, off].mean(dim=1)


def _probes_for(var1: Tensor, tol: Tensor, groups: int) -> Tensor:
    """``[B]`` probes ``K`` with ``t_{min(K, groups) - 1} sqrt(var1 / K) <= tol``."""
    # no spread (a zero remainder: J = 0, or the sketch took it all): no probes, whatever the
    # tolerance (a zero tolerance made that 0/0); a zero tolerance with spread: unbounded
    none = var1 <= 0
    k = torch.where(none, 0.0, (_PLAN_Q / tol) ** 2 * var1).nan_to_num(posinf=math.inf)
    for _ in range(3):  # the t-quantile at the degrees of freedom of that probe count
        q = torch.tensor(
            [t_quantile(max(1, min(int(math.ceil(min(kk, groups))), groups) - 1), 0.95)
             for kk in k.tolist()],
            dtype=torch.float64, device=k.device,
        )
        k = torch.where(none, 0.0, (q / tol) ** 2 * var1)
    return k


class _Pilot:
    r"""Plain Gaussian VJPs (stream 0, probes ``0 .. K_p - 1``) that predict the remainder
    probes each target needs at a given sketch rank.

    FSInfo_diag: one probe's variance ``||Rt||_F^2 / (2 d^2)`` (``Rt`` weighted by
    ``1 / (D + floor sigma^2)``, the delta method), target ``atol`` (or ``rtol`` times a plug-in
    value). dFIL: Hutchinson's ``2 ||R||_F^2`` against ``(dfil_rtol tr)^2`` on the log scale's
    linear part.
    """

    def __init__(self, U, G, sigma, floor, atol, rtol, dfil_rtol, groups):
        self.U, self.G, self.count, self.groups = U, G, int(U.shape[1]), groups
        self.sig2, self.floor = sigma**2, floor
        self.d = int(G.shape[2])
        D0 = G.square().mean(dim=1)
        self.fs_tol = (
            _plan_tol(D0, self.sig2, floor, atol, rtol)
            if atol is not None or rtol is not None else None
        )
        self.dfil_rtol = dfil_rtol

    def predict(self, sketch: DeflationSketch, ranks: Tensor) -> Tensor:
        """``[B]`` remainder probes predicted at ``ranks`` (the largest over the targets)."""
        Q, W, mask = sketch.prefix(ranks)
        C = (self.U @ Q) * mask[:, None, :]
        rem = (self.G - C @ W.transpose(1, 2)).square()  # [B, K_p, d]
        E = sketch.exact_part(ranks)
        k = torch.zeros(self.G.shape[0], dtype=torch.float64, device=self.G.device)
        if self.fs_tol is not None:
            den = E + rem.mean(dim=1) + self.floor * self.sig2[:, None]
            # a zero column with floor 0 (an input the sample never sees) has an exact term
            # (-inf) and no variance: weight 0 (it was 1/0, a NaN prediction and a ValueError)
            w = torch.where(den > 0, 1.0 / den.clamp_min(1e-300), torch.zeros_like(den))
            f2 = _pilot_f2(self.G, self.U, sketch, ranks, w)
            k = torch.maximum(k, _probes_for(f2 / (2.0 * self.d**2), self.fs_tol, self.groups))
        if self.dfil_rtol is not None:
            tr = (E.sum(dim=1) + rem.sum(dim=2).mean(dim=1)).clamp_min(1e-300)
            f2 = _pilot_f2(self.G, self.U, sketch, ranks, None).clamp_min(0)
            k = torch.maximum(k, _probes_for(2.0 * f2, self.dfil_rtol * tr, 1 << 30))
        return k


def _pilot_vjps(products: Products, seed: int, ids: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The rank pilot's plain Gaussian VJPs (stream 0, probes ``0 .. count - 1``): ``U`` ``[B,
    count, m]`` and ``G = J^T U`` ``[B, count, d]``, float64."""
    U = draw_probes(
        products.m, seed=seed, sample_ids=ids, start=0, count=count, kind="gaussian",
        dtype=torch.float64, device=products.device,
    )
    G = products.vjp(U.to(products.dtype)).to(torch.float64)
    check_finite(G, ids, 0, "deflation pilot (J^T u)")
    return U, G


#: Remainder probe states a :class:`DeflatedProbeState` holds (one per rank vector; the least
#: recently used is dropped first).
KEEP_REMAINDERS = 2


@dataclass
class DeflatedProbeState:
    r"""The products of the deflated estimator on one batch, held for the next request (another
    sigma, floor or tolerance; FSInfoGuard's ``sigma*``), as :class:`~.diagonal.DiagProbeState`
    holds the plain estimator's probes: the sketch (:class:`DeflationSketch`, grown where a
    request needs more columns), the rank pilot's plain VJPs (``U``, ``J^T U``) and, per rank
    vector, the remainder probes (a :class:`~.diagonal.DiagProbeState` of the projected probes
    ``(I - P) u``, with snapshots at round boundaries within ``snapshot_bytes``; the
    :data:`KEEP_REMAINDERS` most recently used rank vectors are kept).

    :func:`estimate_diag_deflated` (``state=``) and :func:`predict_plain_probes` read it: what
    it holds costs no products, only what is new is drawn and added, and each sample's result
    equals that of a fresh call with the same arguments and sketch. Build it with
    :meth:`for_products`.

    Example:
        >>> from fsinfo_fast.engine.dense import DenseProducts
        >>> P = DenseProducts(torch.randn(2, 12, 10, dtype=torch.float64))
        >>> st = DeflatedProbeState.for_products(P, seed=0, snapshot_bytes=1 << 20)
        >>> a = estimate_diag_deflated(P, sigma=0.1, atol=0.05, start_rank=2, state=st)
        >>> b = estimate_diag_deflated(P, sigma=1.0, atol=0.05, start_rank=2, state=st)
        >>> b.fsinfo_diag.passes, b.fsinfo_diag.info["reused_probes"] == a.fsinfo_diag.num_probes
        (0, True)
    """

    batch: int
    d: int
    m: int
    seed: int
    sample_ids: Tensor
    sketch: DeflationSketch
    groups: int = 20
    snapshot_bytes: int = 0

    def __post_init__(self) -> None:
        self._pilot: tuple[Tensor, Tensor] | None = None
        self._rem: dict[tuple[int, ...], _DeflatedProbeState] = {}

    @classmethod
    def for_products(
        cls,
        products: Products,
        *,
        seed: int | torch.Generator = 0,
        sample_ids: Tensor | None = None,
        jackknife_groups: int = 20,
        power: int = 0,
        snapshot_bytes: int = 0,
    ) -> DeflatedProbeState:
        """An empty state (an empty sketch with ``power`` power steps) for the batch of
        ``products`` (checked arguments)."""
        if power not in (0, 1) or isinstance(power, bool):
            raise InvalidInputError(f"power must be 0 or 1, got {power!r}")
        return cls(**state_fields(products, seed, sample_ids, jackknife_groups, snapshot_bytes),
                   sketch=DeflationSketch.empty(products, power))

    def holds_pilot(self, count: int) -> bool:
        """Whether the rank pilot's ``count`` VJPs are held."""
        return self._pilot is not None and self._pilot[0].shape[1] == count

    def pilot(self, products: Products, count: int) -> tuple[Tensor, Tensor, int]:
        """The rank pilot's ``count`` plain VJPs (:func:`_pilot_vjps`) and how many were
        computed now (``0``: held from an earlier request with the same count)."""
        if self._pilot is not None and self.holds_pilot(count):
            return (*self._pilot, 0)
        self._pilot = _pilot_vjps(products, self.seed, self.sample_ids, count)
        return (*self._pilot, count)

    def remainder(self, products: Products, ranks: Tensor) -> _DeflatedProbeState:
        """The remainder probes at the per-sample ``ranks`` (a new, empty state the first
        time), the most recently used."""
        key = tuple(int(r) for r in ranks.tolist())
        st = self._rem.pop(key, None)
        if st is None:
            st = _DeflatedProbeState.for_products(
                products, seed=self.seed, sample_ids=self.sample_ids,
                jackknife_groups=self.groups, snapshot_bytes=self.snapshot_bytes)
            st.basis = self.sketch.basis(ranks)
        self._rem[key] = st
        while len(self._rem) > KEEP_REMAINDERS:
            del self._rem[next(iter(self._rem))]
        return st

    def forget_remainders(self) -> None:
        """Drop every remainder probe held (the next request draws them afresh)."""
        self._rem.clear()

    def held(self) -> dict[tuple[int, ...], int]:
        """``{rank vector: remainder probes held}``."""
        return {key: st.k for key, st in self._rem.items()}


def predict_plain_probes(
    products: Products,
    *,
    sigma: float | Tensor,
    floor: float = DIAG_FLOOR,
    atol: float | None = None,
    rtol: float | None = None,
    dfil_rtol: float | None = None,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    pilot_probes: int = PILOT_PROBES,
    jackknife_groups: int = 20,
    state: DeflatedProbeState | None = None,
) -> Tensor:
    """``[B]`` probes the plain estimator (:func:`~.diagonal.estimate_diag`) is predicted to
    need for the tolerances, from ``pilot_probes`` of its own Gaussian VJPs (stream 0, probes
    ``0 .. pilot_probes - 1``, the same as its first probes); costs ``pilot_probes`` VJPs, none
    where ``state`` (a :class:`DeflatedProbeState` of this batch) holds them (they are the
    deflated estimator's rank pilot, and are held there for it). What ``auto`` compares with
    :data:`DEFLATE_ABOVE`."""
    products = detached(products)
    if atol is None and rtol is None and dfil_rtol is None:
        raise InvalidInputError("give a tolerance (atol, rtol or dfil_rtol) to predict for")
    if state is None:
        state = DeflatedProbeState.for_products(products, seed=seed, sample_ids=sample_ids,
                                                jackknife_groups=jackknife_groups)
    else:
        _check_state(state, products, seed, sample_ids, jackknife_groups, DeflatedProbeState)
    U, G, _ = state.pilot(products, pilot_probes)
    pilot = _Pilot(U, G, sigma_for(products, sigma), float(floor), atol, rtol, dfil_rtol,
                   jackknife_groups)
    zero = torch.zeros(products.batch, dtype=torch.int64, device=products.device)
    return pilot.predict(DeflationSketch.empty(products), zero)


@dataclass
class RankChoice:
    """The deflated estimator's per-sample sketch ranks (:func:`choose_rank`).

    Attributes:
        ranks: ``[B]`` int64 sketch rank per sample.
        predicted: ``[B]`` float64 remainder probes the rank pilot predicts each sample's
            tolerance needs at its rank (zeros for a fixed rank).
        predicted_plain: ``[B]`` float64 the same at rank 0 (plain Gaussian probes, the same
            pilot; zeros for a fixed rank): ``predicted / predicted_plain`` is what the sketch
            is predicted to save.
        gave_up: ``[B]`` bool, samples whose projected cost passed the rule's cap
            (``StoppingRule.stop_unreachable``).
        pilot: the rank pilot's VJPs the choice rests on (0 for a fixed rank).
        pilot_new, sketch_new: products per sample computed by this choice (the rest were
            held by the state).
        per_col: products per sketch column (``2 + 2 power``).
    """

    ranks: Tensor
    predicted: Tensor
    predicted_plain: Tensor
    gave_up: Tensor
    pilot: int
    pilot_new: int
    sketch_new: int
    per_col: int

    def before_remainder(self) -> Tensor:
        """``[B]`` products per sample before the remainder: pilot and sketch columns."""
        return self.pilot + self.per_col * self.ranks


def _setup(products: Products, *, floor, seed, sample_ids, rank, max_rank, start_rank, power,
           pilot_probes, stop, stop_on, dfil_rtol, jackknife_groups, sketch, state,
           rule: dict) -> tuple[Products, StoppingRule, dict, DeflatedProbeState, int]:
    """The checked arguments of :func:`estimate_diag_deflated` and :func:`choose_rank`: the
    detached products, the rule and targets, the state (a new one holding ``sketch``, or the
    caller's, checked) and ``max_rank`` (default ``min(m, d) // 2``)."""
    products = detached(products)
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
        raise InvalidInputError(f"floor must be finite and >= 0, got {floor!r}")
    rule_, targets = _diag_rule(stop, stop_on, dfil_rtol, **rule)
    check_floored_cap(rule_, floor)
    if targets.get("dfil", (None, None))[0] is not None:
        raise InvalidInputError("the deflated estimator's dFIL tolerance is relative (rtol)")
    if power not in (0, 1) or isinstance(power, bool):
        raise InvalidInputError(f"power must be 0 or 1, got {power!r}")
    n = min(products.m, products.d)
    if max_rank is None:
        max_rank = max(1, n // 2)
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or not 0 <= max_rank <= n:
        raise InvalidInputError(
            f"max_rank must be an int in [0, min(m, d) = {n}], got {max_rank!r}"
        )
    if rank == "auto":
        if not targets:
            raise InvalidInputError(
                "rank='auto' chooses the rank for a tolerance: give atol, rtol or dfil_rtol (or "
                "an int rank)"
            )
        for name, v, lo in (("start_rank", start_rank, 1), ("pilot_probes", pilot_probes, 3)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InvalidInputError(f"{name} must be an int >= {lo}, got {v!r}")
    elif isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= max_rank:
        raise InvalidInputError(
            f"rank must be 'auto' or an int in [0, max_rank = {max_rank}], got {rank!r}"
        )
    if state is None:
        state = DeflatedProbeState.for_products(products, seed=seed, sample_ids=sample_ids,
                                                jackknife_groups=jackknife_groups, power=power)
        if sketch is not None:
            state.sketch = sketch
    else:
        _check_state(state, products, seed, sample_ids, jackknife_groups, DeflatedProbeState)
        if sketch is not None and sketch is not state.sketch:
            raise InvalidInputError("give a sketch or a state (which holds its sketch), not both")
    sk = state.sketch
    if sk.power != power or sk.Q.shape[:2] != (products.batch, products.m):
        raise InvalidInputError("sketch must come from these products with the same power")
    return products, rule_, targets, state, max_rank


def _rank_choice(products: Products, state: DeflatedProbeState, rule: StoppingRule,
                 targets: dict, sigma_t: Tensor, floor: float, rank: int | str, max_rank: int,
                 start_rank: int, pilot_probes: int, groups: int) -> RankChoice:
    """The ranks of :func:`estimate_diag_deflated` (checked arguments, :func:`_setup`): with
    ``rank="auto"`` the rank pilot and :func:`_choose_rank` (the sketch may take what the cap
    leaves after the pilot and room for three stages of remainder probes), else the fixed rank
    (its sketch grown where the state holds fewer columns)."""
    sketch = state.sketch
    b, dev = products.batch, products.device
    per_col = 2 + 2 * sketch.power  # products per sketch column
    held = sketch.passes
    pilot = pilot_new = 0
    predicted = torch.zeros(b, dtype=torch.float64, device=dev)
    plain = torch.zeros(b, dtype=torch.float64, device=dev)
    gave_up = torch.zeros(b, dtype=torch.bool, device=dev)
    if rank == "auto":
        U, G, pilot_new = state.pilot(products, pilot_probes)
        fs_atol, fs_rtol = targets.get("fsinfo_diag", (None, None))
        plan = _Pilot(U, G, sigma_t, floor, fs_atol, fs_rtol,
                      targets.get("dfil", (None, None))[1], groups)
        pilot = pilot_probes
        plain = plan.predict(sketch, torch.zeros(b, dtype=torch.int64, device=dev))
        fit = min(max_rank, (rule.max_probes - pilot - 3 * rule.min_probes) // per_col)
        if fit >= 1:
            ranks, predicted, gave_up = _choose_rank(
                products, sketch, plan, state.seed, state.sample_ids, min(start_rank, fit), fit,
                rule.min_probes, budget=rule.max_probes if rule.stop_unreachable else None,
                stop_batch=rule.stop_batch,
            )
        else:
            ranks = torch.zeros(b, dtype=torch.int64, device=dev)
            predicted = plan.predict(sketch, ranks)
        if rule.stop_unreachable:
            # the pilot's own prediction at the chosen rank past the cap: the remainder could
            # only converge where its stage 2 happened to see a low spread, and those are the
            # intervals that undercover (README, "coverage is over seeds"): give up here, on
            # the pilot's probes, which no interval uses
            gave_up |= pilot + per_col * ranks + predicted > rule.max_probes
    else:
        if rule.adaptive and per_col * rank + rule.min_probes > rule.max_probes:
            raise InvalidInputError(
                f"max_probes ({rule.max_probes}) leaves no room for remainder probes after a "
                f"sketch of rank {rank} ({per_col * rank} products)"
            )
        sketch.grow_to(products, rank, state.seed, state.sample_ids)
        ranks = torch.full((b,), rank, dtype=torch.int64, device=dev)
    return RankChoice(ranks, predicted, plain, gave_up, pilot, pilot_new, sketch.passes - held,
                      per_col)


def choose_rank(
    products: Products,
    *,
    sigma: float | Tensor,
    floor: float = DIAG_FLOOR,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    rank: int | str = "auto",
    max_rank: int | None = None,
    start_rank: int = START_RANK,
    power: int = 0,
    pilot_probes: int = PILOT_PROBES,
    stop: StoppingRule | None = None,
    stop_on: str = "fsinfo_diag",
    dfil_rtol: float | None = None,
    jackknife_groups: int = 20,
    state: DeflatedProbeState | None = None,
    **rule: Unpack[StopKeywords],
) -> RankChoice:
    """The ranks :func:`estimate_diag_deflated` with the same arguments takes, without its
    remainder probes: the rank pilot's VJPs and the sketch columns it grows are kept in
    ``state`` (give one to use them: the estimate on that state then costs its remainder
    probes only, and chooses the same ranks). What ``auto`` predicts the deflated route's cost
    from: ``before_remainder()`` products plus the remainder stages for ``predicted``."""
    products, rule_, targets, state, max_rank = _setup(
        products, floor=floor, seed=seed, sample_ids=sample_ids, rank=rank, max_rank=max_rank,
        start_rank=start_rank, power=power, pilot_probes=pilot_probes, stop=stop,
        stop_on=stop_on, dfil_rtol=dfil_rtol, jackknife_groups=jackknife_groups, sketch=None,
        state=state, rule=rule)
    return _rank_choice(products, state, rule_, targets, sigma_for(products, sigma),
                        float(floor), rank, max_rank, start_rank, pilot_probes, jackknife_groups)


def estimate_diag_deflated(
    products: Products,
    *,
    sigma: float | Tensor,
    floor: float = DIAG_FLOOR,
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    rank: int | str = "auto",
    max_rank: int | None = None,
    start_rank: int = START_RANK,
    power: int = 0,
    pilot_probes: int = PILOT_PROBES,
    stop: StoppingRule | None = None,
    stop_on: str = "fsinfo_diag",
    dfil_rtol: float | None = None,
    jackknife_groups: int = 20,
    exact_diagonal: bool = True,
    sketch: DeflationSketch | None = None,
    state: DeflatedProbeState | None = None,
    fsinfo_rounding: bool = True,
    **rule: Unpack[StopKeywords],
) -> DiagEstimate:
    r"""FSInfo_diag and dFIL per sample with the dominant subspace of ``J`` deflated.

    .. math::

        \mathrm{FSInfo}_{diag} = \frac{1}{2d}\sum_k \log\Big(\frac{E_k + R_k}{\sigma^2}
        + \mathrm{floor}\Big) - \frac12\log(2\pi e)

    with ``E_k`` exact from the sketch and ``R_k`` estimated by projected probes (module
    docstring); exactly unbiased, with the interval of
    :func:`~fsinfo_fast.estimators.diagonal.fsinfo_diag_summary`.

    Args:
        products: batched Jacobian products (``jvp`` and ``vjp``).
        sigma: noise scale, float or ``[B]``.
        floor: constant inside the logarithm (``>= 0``).
        seed, sample_ids: probe seed and ``[B]`` global sample ids (as :func:`estimate_diag`).
        rank: sketch size ``r`` (an int ``>= 0``, the same for every sample), or ``"auto"``
            (needs a tolerance): start at ``start_rank`` and grow by half per sample while
            the pilot predicts it pays (module docstring).
        max_rank: cap on the sketch size (default ``min(m, d) // 2``).
        start_rank: first block with ``rank="auto"``.
        power: power steps per sketch block (0 or 1; 1 costs ``2r`` more products and helps
            slowly decaying spectra).
        pilot_probes: plain probes predicting the variance with ``rank="auto"`` (``>= 3``).
        stop, stop_on, dfil_rtol: the remainder probes' :class:`~.stopping.StoppingRule` and
            whose tolerance it is (``"fsinfo_diag"`` or ``"dfil"``; dFIL's is relative), as
            in :func:`~.diagonal.estimate_diag` (unset start and rounds: 4 probes, then +50%
            per round).
        **rule: the keywords of :class:`~.stopping.StopKeywords` (``num_probes``,
            ``atol``, ``rtol``, ``max_probes``, ...): the
            same as ``stop=StoppingRule(...)`` with these fields (not together with ``stop``).
            ``num_probes`` counts the remainder probes (``probes_per_sample``); ``max_probes``
            caps each sample's products: the rank pilot, the sketch (``2 (1 + power) r``
            products) and the remainder probes (``info["products_per_sample"]``; the
            rank chosen leaves room for three stages of remainder probes; a fixed rank must
            leave room for ``min_probes``).
        jackknife_groups, exact_diagonal: see :func:`~.diagonal.fsinfo_diag_summary`.
        sketch: a :class:`DeflationSketch` of these products (same ``seed``, ``sample_ids`` and
            ``power``) from an earlier call, grown further where needed and used as the
            sketch: every prefix of it is the sketch of that size (the columns ``rank ..
            rank+c-1`` come from the same seeded ``Omega`` columns, and every use of it reads
            the prefix up to the largest rank only), and its columns are not paid for again
            (``info["sketch_reused_passes"]`` counts the reused ones).
        state: a :class:`DeflatedProbeState` of this batch (same seed, sample ids, groups and
            power; its sketch is the sketch, not together with another ``sketch``) to reuse:
            the rank pilot's VJPs it holds, its sketch columns and the remainder round
            boundaries it holds at the chosen ranks cost no products; the rest are drawn and
            added to it. Each sample's result equals that of a fresh call with the same
            arguments and sketch. Raises :class:`~.diagonal.SnapshotDroppedError` where a
            boundary it went past was not kept (recompute with a fresh state).
        fsinfo_rounding: count the products' rounding in the FSInfo_diag interval, as the
            dFIL side does (:func:`~.hutchinson.with_rounding`): ``sqrt(n) eps / 2`` nats/dim
            (``n = max(m, d)``, ``eps`` of the products' dtype: every ``D_k`` within ``sqrt(n)
            eps`` relative) in quadrature with the standard error, its share of the interval
            a t-interval. It matters where the sketch holds all of ``J`` (the remainder is
            rounding only): float32, rank-3 ``J``, rank-4 sketch, half-widths of 5e-12 around
            errors of 4e-8 without it (helper 137). ``False`` for a caller that adds its own
            allowance (:class:`~fsinfo_fast.Linearization` adds
            :func:`~fsinfo_fast.linearization.rounding_allowance` to every randomized
            estimate).

    Returns:
        :class:`~.diagonal.DiagEstimate`; ``passes`` counts the products per sample computed
        by this call (pilot, sketch, exact part, remainder); ``info`` has ``rank`` (``[B]``
        list), ``sketch_passes``, ``sketch_reused_passes``, ``rank_pilot_probes`` (and
        ``rank_pilot_reused_probes``, held), ``remainder_probes`` (and ``reused_probes``,
        served from ``state``), ``power``.

    Example:
        >>> from fsinfo_fast.engine.dense import DenseProducts
        >>> J = torch.randn(2, 6, 5, dtype=torch.float64)
        >>> r = estimate_diag_deflated(DenseProducts(J), sigma=0.1, rank=2, num_probes=8)
        >>> r.fsinfo_diag.info["rank"], r.fsinfo_diag.passes
        ([2, 2], 12)
    """
    products, rule, targets, state, max_rank = _setup(
        products, floor=floor, seed=seed, sample_ids=sample_ids, rank=rank, max_rank=max_rank,
        start_rank=start_rank, power=power, pilot_probes=pilot_probes, stop=stop,
        stop_on=stop_on, dfil_rtol=dfil_rtol, jackknife_groups=jackknife_groups, sketch=sketch,
        state=state, rule=rule)
    confidence = rule.confidence
    sigma_t = sigma_for(products, sigma)
    floor = float(floor)
    sketch = state.sketch
    reused = sketch.passes
    spent0 = sketch._spent.clone()
    choice = _rank_choice(products, state, rule, targets, sigma_t, floor, rank, max_rank,
                          start_rank, pilot_probes, jackknife_groups)
    ranks, predicted, gave_up = choice.ranks, choice.predicted, choice.gave_up
    pilot, pilot_new, per_col = choice.pilot, choice.pilot_new, choice.per_col
    b, d, dev = products.batch, products.d, products.device
    E = sketch.exact_part(ranks)  # [B, d]
    run = _Replay(state.remainder(products, ranks), products)
    e_tr = E.sum(dim=1)
    dfil_scale = 1.0 / (sigma_t**2 * d)

    # the value with a zero remainder: the exactly known lower end of the estimate
    known = _known_value(E, sigma_t, floor)
    # FSInfo_diag's rounding standard error: every D_k within sqrt(n) eps relative, nats/dim
    fs_rounding = 0.5 * max(products.m, d) ** 0.5 * torch.finfo(products.dtype).eps

    def summarize(lo: int, rows: Tensor | None = None, names: Container[str] | None = None):
        st, idx = run.stats(lo, rows)

        def sub(t: Tensor) -> Tensor:
            return t if idx is None else t[idx]

        def full(t: Tensor) -> Tensor:  # [rows] -> [B], NaN elsewhere
            if idx is None:
                return t
            f = torch.full((b,), math.nan, dtype=t.dtype, device=t.device)
            f[idx] = t
            return f

        out = {}
        if names is None or "fsinfo_diag" in names:
            fs = fsinfo_diag_summary(st, sub(sigma_t), floor, exact_diagonal=exact_diagonal,
                                     confidence=confidence, offset=sub(E))
            # the remainder's share of the value is >= 0 and right-skewed: the trace's interval
            # (log-scale t after a pilot, skewness-calibrated for a mean and a spread of the
            # same probes), with the skewness of the probe groups' linearised influence
            share = fs.value - sub(known)
            sh = full(torch.where(torch.isfinite(share), share, torch.zeros_like(share)))
            skew, linear = _influence_skew(st, sub(E), sub(sigma_t), floor)
            fs_se, fs_share = fs.stderr, None
            if fsinfo_rounding:  # E's and the remainder's rounding (the dFIL side's allowance)
                fs_se = torch.sqrt(fs.stderr**2 + fs_rounding**2)
                fs_share = full(torch.where(fs_se > 0, fs.stderr / fs_se.clamp_min(1e-300),
                                            torch.ones_like(fs_se)).clamp(0, 1))
            fs_hw = TraceHalfwidth(sh, confidence, 1.0, full(skew), mc_share=fs_share,
                                   linear=full(linear))
            out["fsinfo_diag"] = (full(fs.value), full(fs_se), fs.dof, full(fs.bias_bound),
                                  fs_hw)
        if names is None or "dfil" in names:
            mean, se_mc = mean_and_stderr(st.norms)
            scale = sub(dfil_scale)
            total = sub(e_tr) + mean
            # the exact part's and the remainder's rounding (the interval was ~1e-27 wide with
            # the value 1.4e-12 off where the sketch held all of J: no rounding allowance)
            se = with_rounding(se_mc, total, max(products.m, d), products.dtype)
            tr = full(total * scale)
            dfil_hw = residual_halfwidth(full(mean * scale), full(se_mc * scale),
                                         full(se * scale), confidence,
                                         skew=full(sample_skewness(st.norms)))
            out["dfil"] = (tr, full(se * scale), st.k - 1, torch.zeros_like(tr), dfil_hw)
        return out

    # each sample's cap counts its pilot and sketch products too
    caps = (rule.max_probes - pilot - per_col * ranks).clamp_min(0) if rule.adaptive else None
    # a sample given up at the rank choice stops after its remainder's stage 1, unconverged;
    # under stop_batch it sends the whole batch to the caller's other route, so every sample
    # stops there
    stopped = gave_up.clone()
    if rule.stop_batch and bool(gave_up.any()):
        stopped.fill_(True)
    if caps is not None:
        caps = torch.where(stopped, torch.zeros_like(caps), caps)
    frozen, converged, probes, drawn, stage_probes = run_rounds(
        rule, batch=b, device=dev, process=run.process, summarize=summarize, targets=targets,
        mark=run.mark, caps=caps,
    )
    if bool(stopped.any()):  # the samples that did not give up stopped with the batch
        converged = converged & ~stopped
        for f in frozen.values():
            f.with_batch = stopped & ~gave_up
    passes = pilot_new + sketch.passes - reused + run.computed
    info = {
        "seed": state.seed,
        "confidence": confidence,
        "side": "output",
        "kind": "gaussian",
        "rank": [int(r) for r in ranks.tolist()],
        "rank_choice": "auto (pilot-predicted variance)" if rank == "auto" else "fixed",
        "power": power,
        "rank_pilot_probes": pilot,
        "rank_pilot_reused_probes": pilot - pilot_new,
        "sketch_passes": sketch.passes - reused,
        "sketch_reused_passes": reused,
        "remainder_probes": drawn,
        # what each sample's estimate rests on, computed here or reused: the rank pilot, its
        # sketch columns (and power steps) and its remainder probes
        "products_per_sample": [pilot + per_col * int(r) + int(k)
                                for r, k in zip(ranks.tolist(), probes.tolist(), strict=True)],
        "reused_probes": run.reused(drawn),
        "remainder_computed_per_sample": run.computed_per_sample,
        # the products this call computed for each sample: pilot, sketch columns, remainder
        "computed_per_sample": pilot_new + (sketch._spent - spent0) + run.computed_per_sample,
        "predicted_probes": [round(float(k), 1) for k in predicted.tolist()],
        "stage_probes": [int(k) for k in stage_probes.tolist()],
        "gave_up_at_rank_choice": [bool(g) for g in gave_up.tolist()],
    }
    fs, df = frozen["fsinfo_diag"], frozen["dfil"]
    common = dict(converged=converged, probes=probes, drawn=drawn, pilot=stage_probes,
                  passes=passes)
    fs_est = estimate_from(
        rule, fs, singular=~torch.isfinite(fs.value), **common,
        info={
            "method": "deflated_chi2_debiased_diag",
            "quantity": "fsinfo_diag",
            "floor": floor,
            "floor_debiasing": "exact, per-column offset E_k + floor sigma^2",
            "se_method": "delete-a-group jackknife over remainder probes"
            + (", exact diagonal part" if exact_diagonal else ""),
            "jackknife_groups": jackknife_groups,
            **info,
        },
    )
    df_est = estimate_from(
        rule, df, bias_bound=False, **common,
        info={
            "method": "deflated_hutchinson (hutch++ split)",
            "quantity": "dfil",
            "se_method": "remainder sample std / sqrt(K)",
            "interval": ("log-scale t of the remainder (upper side, symmetric) after a pilot; "
                         "skewness-calibrated multiplier at a fixed count"),
            **info,
        },
    )
    return DiagEstimate(fsinfo_diag=fs_est, dfil=df_est)


def _choose_rank(
    products: Products,
    sketch: DeflationSketch,
    pilot: _Pilot,
    seed: int,
    ids: Tensor,
    start_rank: int,
    max_rank: int,
    min_probes: int,
    budget: float | None = None,
    stop_batch: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grow ``sketch`` by half while the pilot predicts a saving; per-sample ranks, the
    remainder probes predicted at those ranks and which samples gave up (``[B]`` bool).

    ``budget`` (``StoppingRule.stop_unreachable``: the products of the caller's exact route):
    a sample stops growing once even an optimistic projection (the steepest decay ``K ~
    r^-_P_MAX``, no stopping overhead) of the products still to spend, ``per_col (r' - r) +
    K(r) (r / r')^p`` at its best ``r' <= max_rank``, exceeds it; its remainder then runs under
    the same rule (which stops it at its stage 1 or 2 where its own probes plan past the cap).
    ``stop_batch`` (``StoppingRule.stop_batch``): the whole batch stops growing then, and the
    caller stops every sample after the remainder's stage 1 (the batch is replaced anyway)."""
    b, dev = products.batch, products.device
    zero = torch.zeros(b, dtype=torch.int64, device=dev)
    k_prev = pilot.predict(sketch, zero)
    ranks = zero.clone()
    k_at = k_prev.clone()
    growing = torch.ones(b, dtype=torch.bool, device=dev)
    gave_up = torch.zeros(b, dtype=torch.bool, device=dev)
    per_col = 2 + 2 * sketch.power
    router = RowProducts(products)
    r_prev, r = 0, start_rank
    while bool(growing.any()) and r <= max_rank:
        # the samples still growing (a shared sketch may hold their columns already)
        sketch.grow_to(router, r, seed, ids, growing)
        full = torch.full((b,), r, dtype=torch.int64, device=dev)
        # the others' predictions are not used: each at its own rank, which its sketch holds
        k_now = pilot.predict(sketch, torch.where(growing, full, ranks))
        ranks = torch.where(growing, full, ranks)
        k_at = torch.where(growing, k_now, k_at)
        # local power law K ~ r^-p from the last step (p = 1 after the first block): growing
        # pays while the marginal saving -dK/dr = p K / r exceeds a column's products
        if r_prev > 0:
            ratio = k_prev.clamp_min(1e-300) / k_now.clamp_min(1e-300)
            p = (torch.log(ratio) / math.log(r / r_prev)).clamp(_P_MIN, _P_MAX)
        else:
            p = torch.ones_like(k_now)
        r_next = min(math.ceil(RANK_GROWTH * r), max_rank)
        growing = growing & (p * k_now / r > per_col) & (k_now > min_probes) & (r_next > r)
        if budget is not None:
            hopeless = growing & (_future_cost(k_now, r, max_rank, per_col) > budget)
            gave_up |= hopeless
            growing &= ~hopeless
            if stop_batch and bool(hopeless.any()):
                break
        k_prev, r_prev, r = k_now, r, r_next
        if r == r_prev:
            break
    return ranks, k_at, gave_up


def _future_cost(k: Tensor, r: int, max_rank: int, per_col: int) -> Tensor:
    """``[B]`` the least products still to spend at rank ``r`` with ``K(r) = k`` predicted
    remainder probes, if ``K`` fell as fast as ``r^-_P_MAX`` beyond ``r``: ``min_{r <= r' <=
    max_rank} per_col (r' - r) + k (r / r')^p`` (at ``r' = (p k r^p / per_col)^(1 / (p + 1))``
    clamped to the range)."""
    p = _P_MAX
    best = (p * k.clamp_min(0) * r**p / per_col) ** (1.0 / (p + 1.0))
    rr = best.clamp(min=float(r), max=float(max(r, max_rank)))
    return per_col * (rr - r) + k * (r / rr) ** p


def _influence_skew(st, E: Tensor, sigma: Tensor, floor: float) -> Tensor:
    r"""``[B]`` sample skewness of the remainder probe groups' linearised influence on the
    FSInfo_diag estimate, ``l_g = sum_k w_k s_{gk}`` (``s_{gk}`` group ``g``'s mean of
    ``g_{jk}^2``, ``w_k = 1 / (E_k + floor sigma^2 + S_k / K)`` the derivative of ``log(a_k +
    R_k)`` at the estimate): the :class:`~.hutchinson.TraceHalfwidth` ``skew`` of the
    remainder's share. Where the remainder is one direction ``q`` (``g_{jk} = w_k' q^T u_j``)
    every ``l_g`` is a multiple of a chi-square mean, the per-probe law the same-sample
    multiplier is calibrated for; where the remainder is small against ``E`` the share is
    nearly linear in ``S``, so it has that skew (the log-scale t-interval alone covered
    0.93-0.94 at fixed ``K = 4..12`` with a rank-16 sketch of 17 equal directions, helper
    137).

    Also ``[B]`` how linear the share is in ``S`` (:class:`~.hutchinson.TraceHalfwidth`'s
    ``linear``): the influence-weighted mean of ``a_k / (a_k + R_k)`` (``a_k = E_k + floor
    sigma^2``, ``R_k`` estimated), 1 where the remainder is small against ``a`` and 0 where a
    column's term is a logarithm of its remainder (no sketch), whose left skew the jackknife
    interval covers (the multiplier calibrated for a mean made it 1.00 at ``K = 4`` there)."""
    K = float(st.k)
    used = st.group_n > 0
    gs = st.group_sums[:, used, :] / st.group_n[used][None, :, None]  # [B, G', d] group means
    a0 = E + floor * (sigma**2)[:, None]
    r = st.sums() / K
    a = a0 + r
    w = torch.where(a > 0, 1.0 / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
    infl = torch.einsum("bgd,bd->bg", gs, w)
    wr = w * r  # each column's share of the influence
    tot = wr.sum(dim=1)
    lin = torch.where(tot > 0, (wr * a0 * w).sum(dim=1) / torch.where(tot > 0, tot, 1.0),
                      torch.ones_like(tot))
    return sample_skewness(infl), lin.clamp(0, 1)


def _known_value(E: Tensor, sigma: Tensor, floor: float) -> Tensor:
    """``[B]`` FSInfo_diag with a zero remainder: ``mean_k log(E_k / sigma^2 + floor) / 2 -
    log(2 pi e) / 2`` (``-inf`` where a column has ``E_k = 0`` and ``floor = 0``)."""
    with torch.no_grad():
        t = torch.log(E / (sigma**2)[:, None] + floor)
    return t.mean(dim=1) / 2 - HALF_LOG_2PIE


def _plan_tol(D: Tensor, sig2: Tensor, floor: float, atol: float | None, rtol: float | None):
    """``[B]`` target half-width for planning: ``atol``, or ``rtol`` times a plug-in value."""
    if atol is not None:
        return torch.full_like(sig2, float(atol))
    val = 0.5 * torch.log(D / sig2[:, None] + floor).clamp_min(-700).mean(dim=1) - HALF_LOG_2PIE
    return (float(rtol) * val.abs()).clamp_min(1e-6)
