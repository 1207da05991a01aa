r"""The interface every estimator is written against, and the result it returns.

Estimators only see a :class:`Products` object: batched Jacobian-vector products for one batch
of ``B`` samples, ``J_b`` being the ``m x d`` Jacobian of sample ``b``. How the products are
computed (a dense matrix in tests, ``torch.func``, the linearised engine, kernels) is the
engine's business. Products may run in float32; estimators accumulate in float64.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..encoder import check_prior_var, check_sigma
from ..engine.ops import Ops, TorchOps
from ..errors import InvalidInputError, InvalidInputTypeError, NonFiniteProbeError
from ..formulas import as_sigma

__all__ = ["Estimate", "Products", "RowProducts", "square_sum64", "t_quantile"]


@runtime_checkable
class Products(Protocol):
    """Batched Jacobian products for one batch of ``B`` samples.

    Attributes:
        batch: ``B``, the number of samples.
        d: input dimension (columns of each ``J_b``).
        m: output dimension (rows of each ``J_b``).
        dtype: floating dtype the products expect and return.
        device: device of the tensors.
    """

    batch: int
    d: int
    m: int
    dtype: torch.dtype
    device: torch.device

    def jvp(self, V: Tensor) -> Tensor:
        """``[B, K, d] -> [B, K, m]``: ``out[b, k] = J_b V[b, k]``."""
        ...

    def vjp(self, U: Tensor) -> Tensor:
        """``[B, K, m] -> [B, K, d]``: ``out[b, k] = J_b^T U[b, k]``."""
        ...

    # Optional: ``select(idx) -> Products``, the products of the sub-batch ``idx`` (``[n]``
    # int64 row indices), row ``i`` of its outputs being row ``idx[i]`` of this batch's.
    # Estimators then run the rounds after some samples have stopped on the samples still
    # running only (:class:`RowProducts`).


@dataclass(frozen=True)
class Estimate:
    """Per-sample randomized estimate with its error bar (all tensors float64, shape ``[B]``).

    Attributes:
        value: the estimate, in the quantity's units (nats/dim for FSInfo, 1/dim for dFIL, the
            raw trace when no ``sigma`` was given).
        stderr: estimated standard error of ``value`` (0 where the value is known exactly, e.g.
            ``-inf`` for a singular Fisher matrix).
        ci_halfwidth: half-width of the two-sided interval at the requested confidence (95% by
            default), ``t_quantile(dof) * stderr + bias_bound`` (trace estimators: the longer
            side of the log-scale t-interval, ``value (exp(t stderr / value) - 1)``, see
            :func:`~fsinfo_fast.estimators.hutchinson.log_t_halfwidth`).
        num_probes: the largest number of probes any sample's estimate uses.
        passes: Jacobian products (JVPs + VJPs) computed per sample (for the sample that
            computed the most: once some samples have stopped, the rounds may run on the others
            alone, :class:`RowProducts`; ``info["computed_per_sample"]`` where an estimator
            records each sample's own).
        converged: ``[B]`` bool: the interval met ``atol``/``rtol`` (always True without a
            tolerance; False where ``max_probes`` stopped the sample first).
        probes_per_sample: ``[B]`` int64, the probes drawn for each sample (adaptive stopping:
            all three stages, of which ``info["pilot_probes"]`` only chose the count and are
            not in the value; every decision about a sample uses only its own probes, so its
            estimate does not depend on the other samples of the batch).
        singular: ``[B]`` bool where the value is ``-inf`` because a matrix is singular
            (or a column of ``J`` is zero with ``floor = 0``); ``None`` if not applicable.
        bound: ``[B]`` bool where the value is only a one-sided upper bound (flagged, e.g. a
            log det whose spectrum reaches the working precision); ``None``: nowhere.
        bias_bound: ``[B]`` float64 deterministic error allowance (quadrature, plug-in bias,
            rounding) included in ``ci_halfwidth``; ``None``: zero.
        info: method details (method, side, order, dof, seed, ...).
    """

    value: Tensor
    stderr: Tensor
    ci_halfwidth: Tensor
    num_probes: int
    passes: int
    converged: Tensor
    probes_per_sample: Tensor | None = None
    singular: Tensor | None = None
    bound: Tensor | None = None
    bias_bound: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def ci(self) -> tuple[Tensor, Tensor]:
        """Per-sample interval ``(value - ci_halfwidth, value + ci_halfwidth)``."""
        return self.value - self.ci_halfwidth, self.value + self.ci_halfwidth

    def scaled(self, factor: Tensor | float, shift: Tensor | float = 0.0) -> Estimate:
        """The estimate of ``factor * quantity + shift`` (``factor > 0``, per sample or scalar)."""
        f = torch.as_tensor(factor, dtype=torch.float64, device=self.value.device)
        return Estimate(
            value=self.value * f + shift,
            stderr=self.stderr * f,
            ci_halfwidth=self.ci_halfwidth * f,
            num_probes=self.num_probes,
            passes=self.passes,
            converged=self.converged,
            probes_per_sample=self.probes_per_sample,
            singular=self.singular,
            bound=self.bound,
            bias_bound=None if self.bias_bound is None else self.bias_bound * f,
            info=dict(self.info),
        )


#: On the CPU, the bytes of the temporaries a blocked loop allocates at a time (float64
#: squares here, one-hot chunks in :mod:`~fsinfo_fast.estimators.exact_fast`): below glibc's
#: largest mmap threshold (32 MiB), so each block reuses the same heap memory instead of
#: fresh pages faulted in and zeroed, which took more system time than the arithmetic (a
#: 32-sample fast exact route at VGG5 ``features.0``: 34 s of system time beside 15 s of user
#: time).
CPU_BLOCK_BYTES = 8 << 20
#: The same elsewhere (a caching allocator; fewer, larger kernels).
SQUARES_BLOCK_BYTES = 256 << 20


def _row_blocks(rows: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` blocks of ``step`` rows covering ``rows``, each of at least
    ``torch.get_num_threads()`` rows (a short tail joins the block before it) unless it is
    the whole: torch sums a block of fewer rows than threads by splitting the rows across
    threads, whose bits depend on the thread count (a whole tensor with that many rows was
    summed one row per thread)."""
    step = max(step, torch.get_num_threads(), 1)
    out = [(i, min(i + step, rows)) for i in range(0, rows, step)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < torch.get_num_threads():
        out[-2:] = [(out[-2][0], rows)]
    return out


def square_sum64(t: Tensor) -> Tensor:
    """``(t.double() ** 2).sum(-1)``: float64 squares summed over the last dimension,
    converted and squared in row blocks of a few MiB (:data:`CPU_BLOCK_BYTES`).

    **Why**: a whole ``[B, K, m]`` float64 copy of a product chunk runs to gigabytes (one-hot
    JVPs of a first convolution at 32 px: ``m = 65536``), each allocated as fresh pages; blocks
    below the allocator's mmap threshold are reused, 4x faster for the conversion on 2 CPU
    cores. On the CPU each row is summed whole by one thread either way: the same bits as the
    whole tensor's sum where the last dimension is contiguous (tests compare them, at 1 and 2
    threads); elsewhere (a strided last dimension, another device) the same sums up to
    float64 rounding."""
    if t.ndim == 0:
        return t.to(torch.float64).square()
    n = t.shape[-1]
    if t.numel() == 0:
        return torch.zeros(t.shape[:-1], dtype=torch.float64, device=t.device)
    rows = t.reshape(-1, n)
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=t.device)
    block = CPU_BLOCK_BYTES if t.device.type == "cpu" else SQUARES_BLOCK_BYTES
    for i, j in _row_blocks(rows.shape[0], block // max(1, 8 * n)):
        b = rows[i:j]
        b64 = b.to(torch.float64)
        out[i:j] = (b64.square() if b64 is b else b64.square_()).sum(dim=1)
    return out.reshape(t.shape[:-1])


def t_quantile(dof: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t quantile ``t_{(1+confidence)/2, dof}`` (``inf`` for ``dof < 1``)."""
    if dof < 1:
        return math.inf
    from .student_t import t_quantile as _t_quantile  # exact series, no scipy

    return _t_quantile(dof, confidence)


def check_products(products: object) -> None:
    """Raise unless ``products`` looks like a :class:`Products` object."""
    missing = [
        a for a in ("batch", "d", "m", "dtype", "device", "jvp", "vjp") if not hasattr(products, a)
    ]
    if missing:
        raise InvalidInputTypeError(
            f"products must implement the Products protocol (batch, d, m, dtype, device, jvp, "
            f"vjp); {type(products).__name__} lacks {missing}"
        )


class _Detached:
    """View of a :class:`Products` whose outputs are detached from any autograd graph.

    Products built on autograd with parameters that require grad return tensors that carry a
    graph; estimators treat products as data, so the graph is dropped right away instead of
    being kept alive across Lanczos steps and rounds.
    """

    def __init__(self, inner: Products) -> None:
        self.inner = inner
        self.batch, self.d, self.m = inner.batch, inner.d, inner.m
        self.dtype, self.device = inner.dtype, inner.device
        self.ops = getattr(inner, "ops", None)

    def jvp(self, V: Tensor) -> Tensor:
        return self.inner.jvp(V).detach()

    def vjp(self, U: Tensor) -> Tensor:
        return self.inner.vjp(U).detach()


def detached(products: Products) -> Products:
    """``products`` with outputs detached (checked against the protocol first)."""
    check_products(products)
    return products if isinstance(products, _Detached) else _Detached(products)


def sample_ids_for(products: Products, sample_ids: Tensor | None) -> Tensor:
    """Global sample ids ``[B]`` int64 (default ``arange(B)``), checked."""
    b = products.batch
    if sample_ids is None:
        return torch.arange(b, dtype=torch.int64, device=products.device)
    try:
        ids = torch.as_tensor(sample_ids, device=products.device)
    except (OverflowError, RuntimeError, TypeError, ValueError) as err:
        raise InvalidInputError(
            f"sample_ids must be integers in int64's range (a tensor or list of shape [B] = "
            f"[{b}]), got {sample_ids!r:.80} ({err})") from err
    if ids.dtype not in (torch.int64, torch.int32) or ids.shape != (b,):
        raise InvalidInputError(
            f"sample_ids must be an integer tensor of shape [B] = [{b}], got dtype {ids.dtype} "
            f"and shape {tuple(ids.shape)}"
        )
    return ids.to(torch.int64)


def sigma_for(products: Products, sigma: float | Tensor) -> Tensor:
    """``[B]`` float64 noise scale, checked positive and finite (the checks of
    :func:`fsinfo_fast.encoder.check_sigma`)."""
    check_sigma(sigma, products.batch)
    return as_sigma(sigma, products.batch, products.device)


def prior_precision(prior_var: float | None) -> float:
    """``lambda = 1 / prior_var`` (0 for ``None``), checked
    (:func:`fsinfo_fast.encoder.check_prior_var`)."""
    return check_prior_var(prior_var)


def check_finite(out: Tensor, sample_ids: Tensor, start: int, what: str,
                 rows: Tensor | None = None) -> None:
    """Raise :class:`NonFiniteProbeError` if any probe's output ``out[b, k, ...]`` is not finite.

    The message names the first offending sample (global id and batch index) and probe index
    (``start + k``). Non-finite contributions are never averaged in. ``rows``: the batch
    indices of ``out``'s rows when they are a sub-batch (``sample_ids`` the whole batch's).
    """
    bad = ~torch.isfinite(out)
    if bad.ndim > 2:
        bad = bad.flatten(2).any(dim=2)
    if bool(bad.any()):
        b, k = (int(i) for i in bad.nonzero()[0])
        if rows is not None:
            b = int(rows[b])
        n_bad = int(bad.sum())
        raise NonFiniteProbeError(
            f"{what}: probe {start + k} of sample {int(sample_ids[b])} (batch index {b}) gave a "
            f"non-finite value ({n_bad} probe(s) of this round affected). It is not averaged in: "
            "check the encoder for overflow (e.g. run it in float64) or for non-differentiable "
            "points at this input"
        )


def ops_for(products: object) -> Ops:
    """The fused-op implementation that goes with ``products`` (``products.ops``, else the
    PyTorch reference), so probe reductions and Lanczos steps run on the same backend."""
    ops = getattr(products, "ops", None)
    return ops if ops is not None else TorchOps()


#: How the estimators' rounds run once some samples of the batch have stopped:
#: ``"auto"``: on a sub-batch of the samples still running (``products.select``) where the
#: round's row-products it saves exceed :data:`SUBSET_BUILD_ROWS` (what building it is taken to
#: cost); ``"always"``: on the sub-batch whenever the products can select one; ``"never"``: the
#: whole batch (every sample gets the round's probes). A sample's probes are drawn from its own
#: id, so which rows run together changes no probe; a row's products are the whole batch's up
#: to the rounding of batched float32 kernels (bit for bit on many encoders; on some a
#: convolution's kernel choice changes with the batch, e.g. 5e-10 relative on a tiny CNN's
#: FSInfo_diag), so a result may differ from whole-batch rounds at that level. The choice is
#: a function of the probe counts only (no timings), so a run is reproducible.
ROW_SUBSETS = "auto"

#: ``auto`` builds a new sub-batch where it saves more than this many row-products (one
#: product of one sample) in the round at hand: about what re-linearising a few samples costs
#: (the CRAFT VGG16-BN at 32 px on 2 CPU cores: 0.17 s against 2 ms per row-product).
SUBSET_BUILD_ROWS = 64

#: Sub-batches kept per products object (the most recently used; the others are dropped before
#: a new one is built, so that the memory held is at most the whole batch's linearisation and
#: this many smaller ones).
KEEP_SUBSETS = 1

_SUBSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def undetached(products: object) -> object:
    """The products a :func:`detached` view wraps (``products`` itself if it is none)."""
    while isinstance(products, _Detached):
        products = products.inner
    return products


def _subsets_of(root: object) -> dict[tuple[int, ...], object]:
    """The sub-batches built for ``root`` (``{row indices: products}``, most recently used
    last; a fresh dict, not kept, where ``root`` is not weak-referenceable)."""
    try:
        held = _SUBSETS.get(root)
        if held is None:
            held = _SUBSETS[root] = {}
        return held
    except TypeError:
        return {}


def rows_at_one_count(counts: Tensor, rows: Tensor | None, what: str
                      ) -> tuple[Tensor, int] | None:
    """``(want, start)``: the ``[B]`` bool mask of ``rows`` (``None``: all) and the one count
    ``counts[rows]`` they all hold (``None`` when no row is asked for); an
    :class:`InvalidInputError` naming ``what`` where they hold different counts."""
    want = torch.ones_like(counts, dtype=torch.bool) if rows is None else rows.to(
        device=counts.device, dtype=torch.bool)
    held = counts[want]
    if held.numel() == 0:
        return None
    start = int(held[0])
    if bool((held != start).any()):
        raise InvalidInputError(
            f"{what}: the samples asked for hold different counts "
            f"({sorted(set(held.tolist()))}); extend each count on its own")
    return want, start


class RowProducts:
    """The products of one batch for the samples still running (:data:`ROW_SUBSETS`).

    :meth:`rows` picks, for a round of ``count`` probes of the ``active`` samples, which
    products run it: the whole batch, a sub-batch built earlier that holds the active samples,
    or a new sub-batch of exactly them (``products.select``), whichever costs the fewest
    row-products (a new one :data:`SUBSET_BUILD_ROWS` more; ties: a held one, then the whole
    batch); then :meth:`jvp` / :meth:`vjp` run the round's ``[n, K, .]`` probes of those rows
    (``n`` the rows chosen). The root products' ``jvp_passes`` / ``vjp_passes`` count a
    sub-batch's call as one of the whole batch's (products per sample, as before);
    :attr:`computed` counts each sample's own.
    """

    def __init__(self, products: Products) -> None:
        self.products = detached(products)
        self.root = undetached(products)
        self.batch = products.batch
        self.subsets = _subsets_of(self.root)
        self.current: Products = self.products
        self.idx: Tensor | None = None
        self.computed = torch.zeros(self.batch, dtype=torch.int64, device=products.device)

    def rows(self, active: Tensor | None, count: int) -> Tensor | None:
        """Choose the products of a round of ``count`` probes for the ``active`` samples
        (``[B]`` bool; ``None``: all); returns the row indices they compute (``None``: all)."""
        self.current, self.idx = self.products, None
        if ROW_SUBSETS not in ("auto", "always", "never"):
            raise InvalidInputError(
                f"ROW_SUBSETS must be 'auto', 'always' or 'never', got {ROW_SUBSETS!r}")
        if active is None or ROW_SUBSETS == "never" or not hasattr(self.root, "select"):
            return None
        n = int(active.sum())
        if n == self.batch or n == 0:
            return None
        key = tuple(active.nonzero().squeeze(1).tolist())
        if ROW_SUBSETS == "always":
            pick: tuple[int, ...] | None = key
        else:
            want = set(key)
            options = [(self.batch * count, 1, None), (n * count + SUBSET_BUILD_ROWS, 3, key)]
            options += [(len(k) * count, 0 if k == key else 2, k) for k in self.subsets
                        if want.issubset(k)]
            _, _, pick = min(options)
        if pick is None:
            return None
        sub = self.subsets.pop(pick, None)
        if sub is None:
            while self.subsets and len(self.subsets) >= KEEP_SUBSETS:  # free memory first
                del self.subsets[next(iter(self.subsets))]
            sub = self.root.select(torch.tensor(pick, dtype=torch.int64,
                                                device=self.products.device))
        self.subsets[pick] = sub
        self.current = detached(sub)
        self.idx = torch.tensor(pick, dtype=torch.int64, device=self.products.device)
        return self.idx

    def _run(self, name: str, T: Tensor) -> Tensor:
        k = T.shape[1]
        out = getattr(self.current, name)(T)
        if self.idx is None:
            self.computed += k
        else:
            self.computed[self.idx] += k
            counter = f"{name}_passes"
            if hasattr(self.root, counter):  # products per sample, as a whole-batch call
                setattr(self.root, counter, getattr(self.root, counter) + k)
        return out

    def jvp(self, V: Tensor) -> Tensor:
        """``[n, K, d] -> [n, K, m]`` on the rows :meth:`rows` chose."""
        return self._run("jvp", V)

    def vjp(self, U: Tensor) -> Tensor:
        """``[n, K, m] -> [n, K, d]`` on the rows :meth:`rows` chose."""
        return self._run("vjp", U)
