r"""The fast exact route: ``diag(J^T J)`` and ``tr(J^T J)`` from ``min(m, d)`` one-hot products.

The float64 oracle (:mod:`fsinfo_fast.reference`) builds each sample's dense Jacobian in float64
through ``torch.func``, one sample at a time. When ``min(m, d)`` products are affordable the same
exact quantities come much faster from the batch's own product backend (the linearised engine,
in the encoder's working dtype, usually float32), batched over one-hot probes for all samples at
once and chunked to a memory budget:

- ``d <= m`` (columns): the JVP of ``e_k`` is column ``k`` of ``J``, so
  ``(J^T J)_kk = ||J e_k||^2`` exactly; ``d`` JVPs give the whole diagonal.
- ``m < d`` (rows): the VJP of ``e_i`` is row ``i`` of ``J``, and
  ``(J^T J)_kk = sum_i J_ik^2``; ``m`` VJPs give the whole diagonal.

The squares are accumulated in float64; ``tr(J^T J)`` is the sum of the diagonal.

**Input dimensions that do not reach the output** (a crop, a strided convolution that skips
pixels, an input ReLU that is off) are zero columns of ``J``. The encoder's validation already
computed ``J^T u`` for a seeded Gaussian ``u``, which is zero there
(:attr:`~fsinfo_fast.encoder.PreparedEncoder.live`); where the batch's union of the other
columns is smaller than ``min(m, d)``, only those are computed, after one JVP of a Rademacher
vector on the zero-marked dimensions came back exactly 0 for every sample (a zero column
contributes exact zeros; a nonzero one shows, and the route then computes every column). The
diagonal is 0 there exactly, as the oracle's is.

**Rounding allowance.** The products are computed in the working dtype, so each diagonal entry
carries a relative rounding error (of the products themselves, and of a linearisation point
computed in that dtype: a ReLU mask or a max-pool argmax can differ from the float64 one). A
zero half-width would claim exactness, so the route *measures* that error: the diagonal entries
of ``n_check`` seeded columns (:data:`CHECK_COLUMNS`) are recomputed by float64 ``torch.func``
JVPs (the oracle's own computation, on a float64 copy of the encoder) and compared. With
``r_b = max_{k in S} |D̂_bk / D_bk - 1|`` the allowance is

.. math:: \varepsilon_b = \max(\mathrm{SAFETY}\cdot r_b,\ \mathrm{FLOOR\_ULPS}\cdot u)

(``u`` the unit roundoff of the working dtype), taken as a relative bound on every diagonal
entry and on the trace. Because ``|log(D̂/s^2 + c) - log(D/s^2 + c)| <= |log(D̂/D)|`` for
``c >= 0``, the FSInfo_diag error of a sample is at most ``-log(1 - eps_b) / 2`` nats/dim and the
dFIL error at most ``eps_b * dFIL``; these go into ``bias_bound`` and ``ci_halfwidth``
(``stderr = 0``: there is no probe noise). The allowance is a measurement scaled by a safety
factor, not a proof: a large error confined to columns outside the checked set (a flipped mask
that moves few columns) could exceed it; the tests compare it with the oracle on the zoo.

Example:
    >>> import torch
    >>> from fsinfo_fast.encoder import prepare
    >>> from fsinfo_fast.engine import make_products
    >>> enc = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).eval()
    >>> x = torch.randn(2, 6)
    >>> p = make_products(prepare(enc, x), "torch")
    >>> check = make_products(prepare(enc, x, dtype=torch.float64), "torch")
    >>> fx = exact_fast_fisher(p, check_products=check, seed=0)
    >>> fx.diag.shape, fx.side, bool((fx.rel_err < 1e-3).all())
    (torch.Size([2, 6]), 'rows', True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .._progress import part
from ..errors import InvalidInputError, NonFiniteProbeError
from ..formulas import (
    DIAG_FLOOR,
    SUBNORMAL,
    as_sigma,
    fsinfo_from_spectrum,
    logsum_rounding,
    sum_rel_bound,
)
from ..result import MetricResult
from .base import CPU_BLOCK_BYTES, square_sum64

__all__ = ["CHECK_COLUMNS", "FLOOR_ULPS", "SAFETY", "FastExactFisher", "exact_fast_fisher",
           "column_norms", "exact_products", "fsinfo_bias", "live_columns", "rounding_floor"]

#: Columns whose diagonal entries are recomputed in float64 to measure the rounding error.
CHECK_COLUMNS = 16
#: Factor between the largest measured relative error and the allowance claimed for all entries.
SAFETY = 10.0
#: The allowance is never below this many unit roundoffs of the working dtype.
FLOOR_ULPS = 64.0
#: Name of the route in ``MetricResult.estimator``.
NAME = "exact-fast"


def rounding_floor(dtype: torch.dtype) -> float:
    """``FLOOR_ULPS * u``: the smallest relative rounding allowance claimed for products in
    ``dtype`` (``u`` its unit roundoff)."""
    return FLOOR_ULPS * torch.finfo(dtype).eps / 2


def fsinfo_bias(eps: Tensor) -> Tensor:
    """``-log(1 - eps) / 2`` (``inf`` for ``eps >= 1``): the FSInfo_diag error bound."""
    out = torch.full_like(eps, math.inf)
    ok = eps < 1
    out[ok] = -0.5 * torch.log1p(-eps[ok])
    return out


@dataclass(frozen=True)
class FastExactFisher:
    r"""``diag(J^T J)`` and ``tr(J^T J)`` of every sample (``sigma = 1``) from one-hot products.

    Attributes:
        diag: ``[B, d]`` float64 diagonal (working-dtype products, float64 accumulation).
        trace: ``[B]`` float64 trace (the sum of ``diag``).
        rel_err: ``[B]`` float64 relative error allowance ``eps_b`` of every diagonal entry and
            of the trace (see the module docstring).
        measured: ``[B]`` float64 largest measured relative error on the checked columns.
        checked: ``[n_check]`` int64 indices of the checked columns.
        d, m: input and output dimensions.
        side: ``"columns"`` (``d`` JVPs) or ``"rows"`` (``m`` VJPs).
        passes: products per sample in the working dtype (``min(m, d)``, or the live columns
            and their zero check, see the module docstring), plus ``n_check`` float64 JVPs for
            the check (``check_passes``).
        info: backend, dtype, chunking.
    """

    diag: Tensor
    trace: Tensor
    rel_err: Tensor
    measured: Tensor
    checked: Tensor
    d: int
    m: int
    side: str
    passes: int
    check_passes: int
    info: dict[str, Any] = field(default_factory=dict)
    #: ``[B]`` bool: samples whose ``diag`` and ``trace`` are the float64 oracle's
    #: (:meth:`with_exact_rows`; ``rel_err`` the oracle's there), or None
    exact_rows: Tensor | None = None
    #: ``[B]`` the trace's relative allowance where it is not ``rel_err`` (the oracle's rows,
    #: :meth:`with_exact_rows`), or None
    trace_rel_err: Tensor | None = None
    #: ``[B, d]`` bool: columns whose products are not 0 but whose squares all underflowed
    #: (each such entry below ``m`` subnormals, not 0: no floorless ``-inf`` is claimed), or
    #: None
    underflow: Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.trace.shape[0])

    def with_exact_rows(self, rows: Tensor, oracle: Any) -> FastExactFisher:
        """This with the samples ``rows`` (``[B]`` bool) taking the float64 oracle's ``diag``
        and ``trace`` (a :class:`~fsinfo_fast.reference.ExactFisher`, read on ``rows`` only)
        and its a-priori relative bounds (its diagonal's as ``rel_err``, its trace's as
        ``trace_rel_err``), the other samples keeping theirs. (The linearization reads those
        samples' results from the oracle itself, its per-column brackets and measured
        rounding, so these bounds only label them.)
        ``info["exact_fast_oracle_samples"]`` lists them;
        ``info["exact_fast_oracle_passes"]``: the float64 products each of them cost
        (``min(m, d)``, beside ``passes``)."""
        r = rows.to(self.trace.device)
        keep = self.exact_rows if self.exact_rows is not None else torch.zeros_like(r)
        r = r | keep.to(r.device)
        info = {**self.info, "exact_fast_oracle_samples": r.nonzero().flatten().tolist(),
                "exact_fast_oracle_passes": min(self.m, self.d)}
        e_diag, e_trace = (e.to(self.rel_err) for e in oracle.rel_err())
        trace_rel = self.trace_rel_err if self.trace_rel_err is not None else self.rel_err
        return replace(
            self, diag=torch.where(r[:, None], oracle.diag.to(self.diag), self.diag),
            trace=torch.where(r, oracle.trace.to(self.trace), self.trace),
            rel_err=torch.where(r, e_diag, self.rel_err),
            trace_rel_err=torch.where(r, e_trace, trace_rel), exact_rows=r, info=info,
            underflow=None if self.underflow is None else self.underflow & ~r[:, None])

    def _info(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {**self.info, "exact_fast_rel_err": self.rel_err.tolist(),
                "exact_fast_measured": self.measured.tolist(), "exact_fast_side": self.side,
                "exact_fast_check_passes": self.check_passes, **extra}

    def fsinfo(self, sigma: float | Tensor = 0.1, variant: str = "diag", *,
               floor: float = DIAG_FLOOR) -> MetricResult:
        r"""FSInfo_diag in nats/dim with the rounding allowance as its interval.

        .. math:: \frac{1}{2d}\sum_k \log\Big(\frac{(J^TJ)_{kk}}{\sigma^2} + \mathrm{floor}\Big)
                  - \frac12\log(2\pi e), \quad |\mathrm{error}| \le -\tfrac12\log(1-\varepsilon_b)

        Args:
            sigma: noise scale, a float or ``[B]``.
            variant: ``"diag"`` only (the log-det variant needs the spectrum: the oracle).
            floor: the paper's constant inside the logarithm.

        Raises:
            InvalidInputError: ``variant`` is not ``"diag"``.
        """
        if variant != "diag":
            raise InvalidInputError(
                "the fast exact route ('exact-fast') computes the diagonal and the trace only; "
                f"variant={variant!r} needs the spectrum: use estimator='exact' (the oracle)")
        s = as_sigma(sigma, self.batch, self.diag.device)
        value = fsinfo_from_spectrum(self.diag, self.d, s, floor)
        # (and the log-sum's own rounding: an oracle sample's diagonal allowance can be below
        # one ulp of the value, helper 99)
        bias = fsinfo_bias(self.rel_err) + logsum_rounding(self.diag, self.d, s, floor)
        if self.underflow is not None:  # (up to (m + 1) subnormals each, not 0)
            n = self.underflow.sum(dim=1).to(bias)
            up = (torch.log1p((self.m + 1) * SUBNORMAL / (s.square() * floor)) if floor > 0
                  else torch.full_like(bias, math.inf))
            bias = bias + torch.where(n > 0, n * up / (2 * self.d), 0.0)
        return MetricResult(
            value=value, stderr=torch.zeros_like(value), metric="fsinfo_diag", units="nats/dim",
            estimator=NAME, sigma=s, d=self.d, m=self.m, passes=self.passes + self.check_passes,
            ci_halfwidth=bias.clone(), bias_bound=bias, info=self._info({"floor": floor}))

    def dfil(self, sigma: float | Tensor = 0.1) -> MetricResult:
        r"""dFIL ``tr(J^T J) / (sigma^2 d)`` with ``eps_b * dFIL`` as its interval."""
        s = as_sigma(sigma, self.batch, self.trace.device)
        value = self.trace / (s**2 * self.d)
        e = self.trace_rel_err if self.trace_rel_err is not None else self.rel_err
        # |got - true| <= e true, so true <= got / (1 - e): no upper end for e >= 1 (a checked
        # column the working dtype rounded to 0), at a value of 0 too (inf * 0 was NaN)
        bias = torch.where(e < 1, e * value / (1 - e).clamp_min(1e-300), math.inf)
        if self.underflow is not None:
            bias = bias + (self.underflow.sum(dim=1).to(bias) * (self.m + 1) * SUBNORMAL
                           / (s.square() * self.d))
        return MetricResult(
            value=value, stderr=torch.zeros_like(value), metric="dfil", units="1/dim",
            estimator=NAME, sigma=s, d=self.d, m=self.m, passes=self.passes + self.check_passes,
            ci_halfwidth=bias.clone(), bias_bound=bias, info=self._info({}))


def live_columns(live: Tensor | None, d: int, m: int) -> Tensor | None:
    """The sorted union over the batch of the ``live`` input dimensions (``[B, d]`` bool, see
    :func:`exact_fast_fisher`) where computing only those columns (and the one check JVP) is
    cheaper than ``min(m, d)`` products; None elsewhere (``live`` None included)."""
    if live is None:
        return None
    cols = live.any(dim=0).nonzero().flatten().cpu()
    return cols if int(cols.numel()) + 1 < min(m, d) else None


def exact_products(live: Tensor | None, d: int, m: int) -> int:
    """Products per sample of the fast exact route (:func:`exact_fast_fisher`): ``min(m, d)``,
    or the live columns and their check JVP where :func:`live_columns` takes them (an
    estimate: the check may send the route back to every column)."""
    cols = live_columns(live, d, m)
    return min(m, d) if cols is None else int(cols.numel()) + 1


#: On the CPU, the bytes of a chunk's one-hot probes and their products at most (one probe
#: where a single one's are more): :data:`~fsinfo_fast.estimators.base.CPU_BLOCK_BYTES`.
CPU_CHUNK_BYTES = CPU_BLOCK_BYTES


def _chunk_size(n: int, batch: int, d: int, m: int, itemsize: int, budget: int,
                device: torch.device | None = None) -> int:
    """One-hot probes per chunk: inputs, outputs and their float64 squares within ``budget``;
    on the CPU the probes and products within :data:`CPU_CHUNK_BYTES` too, whatever the
    budget (an explicit ``memory_budget`` included; at least one probe).

    **Why the CPU cap**: a chunk's tensors are fresh allocations there, and above the
    allocator's mmap threshold (glibc: 32 MiB at most) each is new pages faulted in and
    zeroed, chunk after chunk. One-hot products do little arithmetic per byte: at VGG5
    ``features.0`` (32 samples, ``m = 65536``) chunks of 463 probes (a quarter of free
    memory) spent 34 s of system time beside 15 s of user time, 28.5 s wall, against 7.0 s
    wall at one probe per chunk (2 cores)."""
    per_probe = batch * (itemsize * (d + m) + 8 * max(d, m))
    cs = budget // max(1, per_probe)
    if device is not None and torch.device(device).type == "cpu":
        cs = min(cs, CPU_CHUNK_BYTES // max(1, batch * itemsize * (d + m)))
    return int(max(1, min(n, cs)))


def column_norms(products: Any, idx: Tensor, dtype: torch.dtype,
                 budget: int | None = None) -> Tensor:
    """``||J_b e_k||^2`` (float64, ``[B, n]``) for the input dimensions ``idx``: ``[n]``, the
    same ones for every sample, or ``[B, n]``, each sample's own (``-1``: none, norm 0); one
    one-hot JVP each, in one call, or in chunks within ``budget`` bytes."""
    b, d, m, dev = products.batch, products.d, products.m, idx.device
    n = idx.shape[-1]
    cs = n if budget is None else _chunk_size(max(1, n), b, d, m,
                                              torch.finfo(dtype).bits // 8, budget, dev)
    out = torch.zeros(b, n, dtype=torch.float64, device=dev)
    for start in range(0, n, max(1, cs)):
        part = idx[..., start:start + cs]
        k = part.shape[-1]
        e = torch.zeros(b, k, d, dtype=dtype, device=dev)
        if part.ndim == 1:
            e[:, torch.arange(k, device=dev), part] = 1
        else:
            bi, ji = (part >= 0).nonzero(as_tuple=True)
            e[bi, ji, part[bi, ji]] = 1
        out[:, start:start + k] = square_sum64(products.jvp(e))
    return out


def _one_hot(batch: int, start: int, size: int, n: int, dtype: torch.dtype,
             device: torch.device) -> Tensor:
    e = torch.zeros(batch, size, n, dtype=dtype, device=device)
    idx = torch.arange(size, device=device)
    e[:, idx, start + idx] = 1
    return e


@torch.no_grad()
def exact_fast_fisher(
    products: Any,
    *,
    check_products: Any | None,
    seed: int = 0,
    memory_budget: int | None = None,
    n_check: int = CHECK_COLUMNS,
    live: Tensor | None = None,
    known: tuple[Tensor, Tensor] | None = None,
) -> FastExactFisher:
    r"""Exact ``diag(J^T J)`` and trace from ``min(m, d)`` one-hot products of ``products``.

    Args:
        products: the batch's product backend (``jvp``: ``[B, K, d] -> [B, K, m]``, ``vjp``:
            ``[B, K, m] -> [B, K, d]``, with ``batch, d, m, dtype, device``), in its working
            dtype.
        check_products: the same batch's products in float64 (an independent path, e.g.
            :class:`~fsinfo_fast.engine.TorchFuncProducts` on a float64 copy of the encoder),
            used to measure the rounding error on ``n_check`` seeded columns; ``None`` only
            when ``products`` already works in float64 (the allowance is then the floor).
        seed: chooses the checked columns.
        memory_budget: bytes a chunk of one-hot probes and their outputs may use (default:
            :func:`fsinfo_fast.engine.default_memory_budget`).
        n_check: columns checked (capped at ``d``).
        live: ``[B, d]`` bool, the input dimensions that may reach the output
            (:attr:`~fsinfo_fast.encoder.PreparedEncoder.live`), or None. Where the union
            ``U`` of the batch's is small (:func:`live_columns`), only its columns are computed
            (``|U|`` JVPs) and the diagonal is 0 on the others, after one JVP of a Rademacher
            vector on those others came back exactly 0 for every sample (a zero column gives
            exact zeros; a nonzero one would show), in the working dtype and, with
            ``check_products``, in float64 (an underflow gives exact zeros in float32 too).
            Where it did not, the whole route runs (``info["exact_fast_live"]`` says so).
        known: ``(mask [B, d] bool, values [B, d] float64)``: diagonal entries computed
            exactly elsewhere (the columns a working dtype below float64 rounds to 0,
            :meth:`~fsinfo_fast.Linearization._lost`); they replace the products' before the
            trace and the check, and ``info["exact_fast_lost_columns"]`` counts them per
            sample.

    Returns:
        :class:`FastExactFisher`.

    Raises:
        InvalidInputError: no float64 check products for a lower-precision backend, or the
            check products do not match the batch.
        NonFiniteProbeError: (a ``FloatingPointError``) a product is not finite.
    """
    from ..engine import default_memory_budget

    b, d, m = products.batch, products.d, products.m
    dtype, dev = products.dtype, products.device
    if check_products is None and dtype != torch.float64:
        raise InvalidInputError(
            f"the fast exact route works in {dtype}; it needs float64 check products to "
            "measure its rounding error")
    if check_products is not None and (check_products.batch, check_products.d,
                                       check_products.m) != (b, d, m):
        raise InvalidInputError("check_products do not match the batch (B, d, m)")
    budget = memory_budget if memory_budget is not None else default_memory_budget(dev)
    side = "columns" if d <= m else "rows"
    n = min(m, d)
    cols = live_columns(live, d, m)
    live_note, extra, dead_checks = None, 0, 0
    if cols is not None:
        dead = torch.ones(d, dtype=torch.bool, device=dev)
        dead[cols.to(dev)] = False
        gen = torch.Generator().manual_seed((int(seed) + 0x11FE) & 0x7FFFFFFFFFFFFFFF)
        z = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(dtype=dtype, device=dev)
        probe = (z * dead)[None, None].expand(b, 1, d).contiguous()
        out = products.jvp(probe)
        extra = 1
        dead_ok, lost_note = bool((out == 0).all()), ""
        if dead_ok and check_products is not None:
            # ... and in float64 (the check products): a working dtype that underflows (J near
            # 1e-48 in float32) gives exact zeros there too, and the route returned dFIL 0 with
            # a zero half-width (helper 114); the columns known exactly elsewhere left out
            if known is not None:
                probe = probe * ~known[0].to(dev)[:, None, :]
            dead_ok = bool((check_products.jvp(probe) == 0).all())
            dead_checks = 1
            lost_note = "" if dead_ok else (
                " in float64, where the working dtype rounds it to 0: an underflow")
        if dead_ok:
            side, n = "columns", int(cols.numel())
            k_lost = 0 if known is None else int(known[0].sum(dim=1).max())
            lost_part = "" if not k_lost else (
                f", except up to {k_lost} a sample that the working dtype rounds to 0 and "
                "float64 does not, computed in float64 (exact_fast_lost_columns)")
            live_note = (f"{d - n} of {d} input dimensions do not reach the output (the "
                         "validation's VJP is 0 there and a Rademacher JVP on them is exactly "
                         f"0{lost_part}): {n} one-hot JVPs on the others (+1 for that check)")
        else:
            cols = None
            live_note = ("the input dimensions where the validation's VJP was 0 do reach the "
                         f"output (a JVP on them is not 0{lost_note}): every column computed")
    itemsize = torch.finfo(dtype).bits // 8
    cs = _chunk_size(n, b, d, m, itemsize, budget, dev)
    # the columns the rounding check reads again in float64, after the sweep
    k = 0 if check_products is None else min(n_check, d if cols is None else n)
    with part("exact diagonal (one-hot products)", b * (n + k)):
        diag = torch.zeros(b, d, dtype=torch.float64, device=dev)
        nonzero = torch.zeros(b, d, dtype=torch.bool, device=dev)  # (products not all 0)
        for start in range(0, n, cs):
            size = min(cs, n - start)
            if side == "columns" and cols is not None:
                idx = cols[start:start + size].to(dev)
                sq = column_norms(products, idx, dtype)  # [B, c]
                diag[:, idx] = sq
            elif side == "columns":
                out = products.jvp(_one_hot(b, start, size, d, dtype, dev))  # [B, c, m]
                sq = square_sum64(out)  # [B, c]
                diag[:, start:start + size] = sq
                nonzero[:, start:start + size] = (out != 0).any(dim=-1)
            else:
                out = products.vjp(_one_hot(b, start, size, m, dtype, dev))  # [B, c, d]
                nonzero |= (out != 0).any(dim=1)
                sq = out.to(torch.float64).square_()  # (d < m: the small side)
                diag += sq.sum(dim=1)
            if not bool(torch.isfinite(sq).all()):
                raise NonFiniteProbeError(
                    f"the fast exact route got non-finite products ({side} {start}.."
                    f"{start + size}): a non-finite derivative of the encoder at this input "
                    "(e.g. sqrt or log at 0) or an overflow; the metrics are not defined there")
        if known is not None:
            mask = known[0].to(dev)
            diag = torch.where(mask, known[1].to(diag), diag)
        trace = diag.sum(dim=1)
        floor = rounding_floor(dtype)
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        if cols is None:
            checked = torch.randperm(d, generator=gen)[:min(n_check, d)].sort().values
        else:  # the others' zeros are exact
            checked = cols.cpu()[torch.randperm(n, generator=gen)[:min(n_check, n)]].sort().values
        measured = torch.zeros(b, dtype=torch.float64, device=dev)
        check_passes = 0
        if check_products is not None and k > 0:
            e = torch.zeros(b, k, d, dtype=torch.float64, device=dev)
            e[:, torch.arange(k), checked.to(dev)] = 1
            ref = square_sum64(check_products.jvp(e))  # [B, k]
            check_passes = k
            got = diag[:, checked.to(dev)]
            both0 = (ref == 0) & (got == 0)
            rel = torch.where(both0, torch.zeros_like(ref), (got - ref).abs() / ref)
            rel = torch.nan_to_num(rel, nan=math.inf, posinf=math.inf)
            measured = rel.amax(dim=1)
    # (+ the float64 sums: m squares an entry, d entries the trace)
    rel_err = (SAFETY * measured).clamp_min(floor) + sum_rel_bound(m + d + 1)
    info = {"backend": getattr(products, "backend", None), "exact_fast_dtype": str(dtype),
            "exact_fast_chunk": cs}
    info.update(getattr(products, "info", None) or {})
    if live_note is not None:
        info["exact_fast_live"] = live_note
    lost = (measured >= 1).nonzero().flatten().tolist()
    if lost:  # (their allowance has no upper end; say why)
        info["exact_fast_unbounded"] = (
            f"sample(s) {lost}: a checked column in {dtype} is off from float64's by 100% or "
            "more (0 where float64's is not: products that underflow, or a saturated "
            "activation's derivative rounding to 0; or rounding that doubles it): no upper "
            "end; estimator='exact' (the float64 oracle) or 'auto' serves them")
    if known is not None:
        info["exact_fast_lost_columns"] = known[0].sum(dim=1).tolist()
    # columns whose squares all underflowed to 0 (entries below 1e-162): not dead ones
    under = nonzero & (diag == 0)
    if known is not None:
        under &= ~known[0].to(dev)
    return FastExactFisher(diag=diag, trace=trace, rel_err=rel_err, measured=measured,
                           underflow=under if bool(under.any()) else None,
                           checked=checked, d=d, m=m, side=side, passes=n + extra,
                           check_passes=check_passes + dead_checks, info=info)
