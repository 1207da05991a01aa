"""torchmetrics integration: :class:`FSInfoMetric` and :class:`DFILMetric`.

They drop into existing evaluation loops (``update`` per batch, ``compute`` at the end, ``reset``)
and synchronise across processes as torchmetrics does (sums and maxima are reduced over ranks).
Each ``update`` builds one :class:`fsinfo_fast.Linearization` of the encoder at the batch
(:func:`fsinfo_fast.linearize`) and reads the metric from it. Without ``sample_ids`` the samples
are numbered in the order they arrive (``0, 1, ...`` since the last ``reset``; under
torch.distributed each rank counts from ``rank * 2**40``), so every sample gets its own probes and
``estimator_stderr`` (which adds the per-sample variances as independent) is honest; giving the
same ids to two batches would reuse the same probes for both.

``compute()`` returns a dict: ``mean`` (over all samples seen), ``stderr`` (of that mean as an
estimate of the data distribution's mean), ``estimator_stderr`` (the part due to the randomized
estimator alone: ``sqrt(sum_i se_i^2) / n``, as :meth:`fsinfo_fast.MetricResult.mean`),
``bias_bound`` (the mean of the per-sample deterministic error allowances, quadrature or plug-in
bias, that the per-sample intervals include; 0 where there are none), ``worst`` (the most leaking
sample's value), ``count``, ``n_unconverged`` (samples whose estimate stopped at the probe cap
before its tolerance) and ``n_bound`` (samples whose value is only an upper bound: then ``mean``
is only an upper bound too), ``ci_halfwidth`` (the 95% half-width of ``mean`` over the samples seen,
from their own intervals as :meth:`fsinfo_fast.MetricResult.mean`: each sample's small-probe
Student-t factor and allowances count) and ``n_neg_inf`` (samples whose value is exactly
``-inf``, a singular log det: ``mean`` is then ``-inf`` and ``stderr`` infinite).

The encoder is referenced, not owned: it is not a submodule of the metric, so ``.to()``,
``.half()`` and ``set_dtype`` move the metric's states only (``set_dtype(torch.half)`` cast the
caller's model in place), a module holding the metric does not save the encoder's weights
twice, and a copy of the metric (``copy.deepcopy``, ``clone()``, and so torchmetrics'
``MetricTracker``) measures the same live encoder (a deep copy of it measured the weights as
they were at ``MetricTracker.increment()``). ``compute()`` returns a dict, which torchmetrics'
wrappers that reduce one tensor do not take (``BootStrapper``, ``MetricTracker.best_metric``:
a ``TypeError`` in torchmetrics); ``MetricTracker.compute_all()`` works, and ``stderr`` and
``ci_halfwidth`` are this metric's own error bars (a bootstrap over samples would add nothing
to ``stderr``). The states keep their
dtypes under ``set_dtype``: the sums float64 (in float16 a dFIL sum of 1e5 rounds by 32 and its
square overflowed; the intervals assume float64 sums), the counters int64. A state dict loaded
into a metric carries on where it stopped: its running sample ids continue from its ``count``
(they restarted at 0, reusing the probes of samples already counted), and a cached
``compute()`` result is dropped. A :class:`torchmetrics.MetricCollection` groups
two of these metrics (``compute_groups``) only where they measure the same thing: a state
``settings`` holds a digest of the class, ``sigma``, variant, floor and prior, which also
refuses a state dict saved from another metric, and a state ``encoder_tag`` the identity of
the encoder object (two metrics of different encoders whose states agreed after a first batch
were grouped, and the second reported the first one's values; the tag is left out of state
dicts). Under torch.distributed the sync refuses ranks whose ``settings`` differ (a per-rank
sigma, e.g. calibrated on each rank's own data, was averaged into a meaningless mean),
leaving each rank's states as they were. ``sigma`` is a real number or a 0-d tensor, checked
as the functions check it; a batch whose value is NaN or ``+inf`` (an infinite derivative) is
refused (:class:`~fsinfo_fast.NonFiniteProbeError`) and not added to the sums.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._extras import require
from .encoder import check_encoder, check_input, check_sigma
from .errors import InvalidInputError, InvalidInputTypeError, NonFiniteProbeError
from .formulas import DIAG_FLOOR

Metric = require("torchmetrics", "FSInfoMetric / DFILMetric").Metric

__all__ = ["FSInfoMetric", "DFILMetric"]


class _LeakageMetric(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, encoder: Callable[[Tensor], Tensor], sigma: float = 0.1, **kwargs) -> None:
        check_encoder(encoder)
        metric_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _METRIC_BASE_KW}
        if "sample_ids" in metric_kwargs:
            raise InvalidInputError("sample_ids belong to each batch: pass them to update(), "
                                    "not to the metric's constructor")
        from .linearization import check_metric_keywords, seed_once

        check_metric_keywords(metric_kwargs, self._method, type(self).__name__)
        sigma = _one_sigma(sigma, type(self).__name__)
        super().__init__(**kwargs)
        self.__dict__["encoder"] = encoder  # referenced, not a submodule (see the module doc)
        self.noise_sigma = sigma
        self.metric_kwargs = seed_once(metric_kwargs)  # (a Generator: drawn once)
        # equal on every rank and in every metric that measures the same thing; the sync
        # refuses ranks that differ (registered first: its reduction runs before any sum's,
        # so a refused sync leaves every state as it was)
        self.add_state("settings", self._settings_digest(), dist_reduce_fx=_SameOnEveryRank(
            type(self).__name__, self._describe()))
        # which encoder (object) this metric measures: two metrics of different encoders never
        # share a torchmetrics compute group (their states may agree on a first batch)
        self.add_state("encoder_tag", _encoder_tag(encoder), dist_reduce_fx="max")
        for name in ("total", "total_sq", "total_var", "total_bias", "total_noise_sq"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in _COUNTERS:
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("worst", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx="max")
        self._next_id = 0  # running sample id (not a state: each rank numbers its own samples)
        self._in_forward = False
        self._forward_result: tuple[Tensor, Any] | None = None

    def reset(self) -> None:
        super().reset()
        if not self._in_forward:  # forward() resets to compute the batch alone: ids go on
            self._next_id = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``metric(x)``: the batch's value, accumulated as :meth:`update` does. torchmetrics
        resets the states to compute the batch alone; the running sample ids go on, so every
        batch gets its own probes (they restarted at 0 with each batch before). A batch the
        metric refuses leaves the accumulated states as they were (torchmetrics' reset had
        erased them: a NaN in one batch lost every batch before it). Where torchmetrics
        updates twice (``full_state_update`` or ``dist_sync_on_step``: the accumulated states,
        then the batch alone), the batch is measured once: the second update reuses the first
        one's result (it measured the batch again on the next ids before, at twice the cost,
        and the batch's value came from other probes than the accumulated one)."""
        saved = {k: getattr(self, k) for k in self._defaults}
        flags = {k: getattr(self, k) for k in _FORWARD_FLAGS if hasattr(self, k)}
        self._in_forward = True
        self._forward_result = None
        try:
            return super().forward(*args, **kwargs)
        except BaseException:
            for k, v in {**saved, **flags}.items():
                setattr(self, k, v)
            raise
        finally:
            self._in_forward = False
            self._forward_result = None

    #: keywords that define what the metric measures (the others change only its accuracy),
    #: with the values they take when not given
    _DEFINING = {"variant": "diag", "floor": DIAG_FLOOR, "prior_var": None}

    def _apply(self, fn: Callable, exclude_state: Any = "") -> Any:
        """torchmetrics' ``_apply`` (``.to()``, ``set_dtype``), except that every state keeps
        its dtype and follows the device only: the sums float64, the int64 counters
        (``set_dtype(torch.half)`` counted 3004 of 3003 samples, summed dFIL values of 7e5 to
        inf and rounded the mean by 40 of its half-widths) and the settings digest. A cached
        ``compute()`` result is dropped (recomputed from the states)."""
        self._computed = None
        this = super()._apply(fn, exclude_state=(*exclude_state, *self._defaults))
        dev = this._device
        for k in self._defaults:
            if k in exclude_state:
                continue
            this._defaults[k] = this._defaults[k].to(dev)
            setattr(this, k, getattr(this, k).to(dev))
        return this

    def __deepcopy__(self, memo: dict) -> Any:
        """A copy that references the same encoder (module doc): the default deep copy
        otherwise, as :func:`copy.deepcopy` makes it."""
        memo[id(self.encoder)] = self.encoder
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))

    def _retag(self) -> None:
        """:attr:`encoder_tag` (and its reset value) from this metric's own encoder: after a
        sync or a merge (which reduce it with the other metrics') and after unpickling (a new
        encoder object)."""
        tag = _encoder_tag(self.encoder).to(self.settings.device)
        self._defaults["encoder_tag"] = tag
        self.encoder_tag = tag.clone()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "encoder_tag" in self._defaults:
            self._retag()

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        super()._sync_dist(*args, **kwargs)
        self._retag()  # (each rank's own encoder; "max" gave one rank's object's id)

    def persistent(self, mode: bool = False) -> None:
        """torchmetrics' ``persistent``, except that :attr:`encoder_tag` stays out of the state
        dict (an object's id means nothing in another process or metric)."""
        super().persistent(mode)
        self._persistent["encoder_tag"] = False

    def _describe(self) -> str:
        """What the values measure, in words (the errors that refuse another setting)."""
        return f"sigma {self.noise_sigma!r}, " + ", ".join(
            f"{k} {self.metric_kwargs.get(k, v)!r}" for k, v in self._DEFINING.items())

    def _defining(self) -> tuple:
        """What the values measure: the class, sigma, and the :attr:`_DEFINING` keywords."""
        return (type(self).__name__, self.noise_sigma,
                *(self.metric_kwargs.get(k, v) for k, v in self._DEFINING.items()))

    def _settings_digest(self) -> Tensor:
        """``[4]`` float64 integers in ``[0, 2**16)`` from a hash of :meth:`_defining`: two
        digests are ``allclose`` (torchmetrics' test for sharing states) only when equal."""
        h = hashlib.sha256(repr(self._defining()).encode()).digest()
        return torch.tensor([int.from_bytes(h[i:i + 2], "big") for i in range(0, 8, 2)],
                            dtype=torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        theirs = state_dict.get(prefix + "settings")
        if theirs is not None and not torch.equal(theirs.cpu().to(torch.float64),
                                                  self._settings_digest()):
            raise InvalidInputError(
                f"this state dict was saved from a metric that measures something else (its "
                f"settings digest differs from this {type(self).__name__}'s: "
                f"{self._describe()}); load it into a metric built with the same sigma, "
                "variant, floor and prior")
        state_dict.pop(prefix + "encoder_tag", None)  # (this metric's own encoder's)
        counted = prefix + "count" in state_dict  # (torchmetrics pops the states it loads)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if counted:  # carry on where it stopped: ids past the samples counted, no stale compute
            self._next_id = int(self.count)
            self._computed = None
            if self._next_id > 0:  # (torchmetrics' "compute called before update" warning)
                self._update_count = max(self._update_count, 1)

    def merge_state(self, incoming_state: Any) -> None:
        """Add another metric's states (or a state dict) to this one's, as torchmetrics does;
        a metric of another class, noise scale or variant is refused (its values measure
        something else), and a cached :meth:`compute` result is dropped (torchmetrics kept
        returning it). Metrics merged this way should have numbered their samples apart
        (``sample_ids``), else their probes coincide."""
        if isinstance(incoming_state, Metric):
            if type(incoming_state) is not type(self):
                raise InvalidInputError(f"cannot merge a {type(incoming_state).__name__} into a "
                                        f"{type(self).__name__}")
            mine = (self.noise_sigma,
                    *(self.metric_kwargs.get(k, v) for k, v in self._DEFINING.items()))
            theirs = (incoming_state.noise_sigma,
                      *(incoming_state.metric_kwargs.get(k, v) for k, v in self._DEFINING.items()))
            if mine != theirs:
                names = ("sigma", *self._DEFINING)
                diff = ", ".join(f"{n} {a!r} vs {b!r}" for n, a, b in zip(names, mine, theirs,
                                                                          strict=True) if a != b)
                raise InvalidInputError(f"cannot merge metrics that measure different things "
                                        f"({diff})")
        elif isinstance(incoming_state, dict) and "settings" in incoming_state and not (
                torch.equal(incoming_state["settings"].cpu().to(torch.float64),
                            self._settings_digest())):
            raise InvalidInputError("cannot merge the states of a metric that measures "
                                    "something else (its settings digest differs)")
        if isinstance(incoming_state, dict) and "encoder_tag" not in incoming_state:
            # (a state dict leaves the tag out; torchmetrics wants every state)
            incoming_state = {**incoming_state, "encoder_tag": self.encoder_tag}
        super().merge_state(incoming_state)
        self._retag()
        self._computed = None
        # running ids past every sample counted (as after load_state_dict): the next update
        # did reuse the ids a merged metric had given its samples
        self._next_id = max(self._next_id, int(self.count))

    def _running_ids(self, batch: int) -> Tensor:
        """``[B]`` ids continuing the ones used since the last reset (offset per rank)."""
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        start = (rank << 40) + self._next_id
        self._next_id += batch
        return torch.arange(start, start + batch, dtype=torch.int64)

    def _linearize(self, x: Tensor, sample_ids: Tensor | None):
        """One :class:`~fsinfo_fast.Linearization` of the encoder at ``x``; returns it and the
        keywords left for the metric method."""
        from .linearization import LINEARIZE_KEYWORDS, linearize

        kw = dict(self.metric_kwargs)
        lin_kw = {k: kw.pop(k) for k in LINEARIZE_KEYWORDS if k in kw}
        ids = self._running_ids(x.shape[0]) if sample_ids is None else sample_ids
        return linearize(self.encoder, x, sample_ids=ids, **lin_kw), kw

    def _evaluate(self, x: Tensor, sample_ids: Tensor | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, x: Tensor, *args: Any, sample_ids: Tensor | None = None) -> None:
        """Add a batch ``x`` (``[B, ...]``); ``sample_ids`` (keyword only; ``[B]`` int64 global
        ids) seed each sample's probes (default: the running count of samples seen).

        Raises:
            InvalidInputTypeError: a second positional argument (a torchmetrics loop's
                ``update(preds, target)``: labels taken as ids would seed samples of every
                batch with the same probes, and the aggregate's interval would count them as
                independent)."""
        if args:
            raise InvalidInputTypeError(
                f"{type(self).__name__}.update takes the batch only (update(x)); got "
                f"{len(args)} more positional argument(s): labels are not needed, and probe "
                "seeds go by keyword (update(x, sample_ids=ids))")
        check_input(x)  # before a running id is spent on it
        held = self._forward_result
        if self._in_forward and held is not None and held[0] is x:
            r = held[1]  # forward's second update of the same batch (see forward)
        else:
            start = self._next_id
            try:
                r = self._evaluate(x, sample_ids)
                self._check_finite(r)
            except BaseException:  # a batch refused (by the encoder too) spends no ids
                self._next_id = start
                raise
            if self._in_forward:
                self._forward_result = (x, r)
        dev = self.total.device
        v = r.value.detach().to(device=dev, dtype=torch.float64)
        neg_inf = v == -math.inf  # exact (a singular log det): counted, kept out of the sums
        fin = torch.where(neg_inf, torch.zeros_like(v), v)  # of squares and spreads
        se = r.stderr.detach().to(device=dev, dtype=torch.float64)
        hw = r.ci_halfwidth.detach().to(device=dev, dtype=torch.float64)
        bias = r.bias_bound.detach().to(device=dev, dtype=torch.float64)
        # every state's new value first, then all of them, out of place: states made under
        # torch.inference_mode (a validation loop's forward) are inference tensors that an
        # in-place add outside it refuses, and one refused add must not leave the sums
        # half-updated (helper 121)
        new = {
            "total": self.total + v.sum(),
            "total_sq": self.total_sq + (fin**2).sum(),
            "total_var": self.total_var + torch.where(neg_inf, torch.zeros_like(se),
                                                      se**2).sum(),
            "total_bias": self.total_bias + torch.where(neg_inf, torch.zeros_like(bias),
                                                        bias).sum(),
            # the noise part of each sample's own half-width (see result.mean_halfwidth)
            "total_noise_sq": self.total_noise_sq + torch.where(
                neg_inf, torch.zeros_like(hw), (hw - bias).clamp_min(0) ** 2).sum(),
            "count": self.count + v.numel(),
            "n_unconverged": self.n_unconverged + (~r.converged).sum().to(dev),
            "n_bound": self.n_bound + r.bound.sum().to(dev),
            "n_neg_inf": self.n_neg_inf + neg_inf.sum(),
            "worst": torch.maximum(self.worst, v.max()),
        }
        for name, value in new.items():
            setattr(self, name, value)

    def _check_finite(self, r: Any) -> None:
        """Raise :class:`~fsinfo_fast.NonFiniteProbeError` where a sample's value is NaN or
        ``+inf`` or its error bars are NaN (``-inf`` is exact: a singular log det; an infinite
        half-width claims no interval): added in, they made the running sums NaN for every
        later batch."""
        bad = torch.isnan(r.value) | (r.value == math.inf)
        for t in (r.stderr, r.ci_halfwidth, r.bias_bound):
            bad = bad | torch.isnan(t.to(bad.device))
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            vals = r.value[bad].tolist()
            raise NonFiniteProbeError(
                f"{type(self).__name__}.update: the {r.metric} of sample(s) {idx[:8]} (batch "
                f"index) is not finite (value {vals[:8]}): a non-finite derivative of the "
                "encoder there (e.g. sqrt or log at 0) or an overflow; the batch is not added "
                "(the running sums would stay NaN for every later batch). Move the input off "
                "that point, or drop the sample")

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        if int(n) == 0:
            raise InvalidInputError(
                f"{type(self).__name__}.compute() before any update(): no samples to average")
        mean = self.total / n
        if int(self.n_neg_inf) > 0:  # -inf exactly; the data distribution's spread is unknown
            stderr = torch.full_like(mean, math.inf)
        else:
            var = (self.total_sq / n - mean**2).clamp_min(0) * n / (n - 1).clamp_min(1)
            stderr = torch.sqrt(var / n) if n > 1 else torch.full_like(mean, math.inf)
        return {
            "mean": mean,
            "stderr": stderr,
            "estimator_stderr": torch.sqrt(self.total_var) / n,
            "bias_bound": self.total_bias / n,
            "ci_halfwidth": torch.sqrt(self.total_noise_sq) / n + self.total_bias / n,
            "worst": self.worst,
            "count": n,
            "n_unconverged": self.n_unconverged,
            "n_bound": self.n_bound,
            "n_neg_inf": self.n_neg_inf,
        }


#: the int64 counter states
_COUNTERS = ("count", "n_unconverged", "n_bound", "n_neg_inf")


def _one_sigma(sigma: Any, who: str) -> float:
    """The metric's noise scale as a float: a real number (Python or numpy) or a 0-d tensor,
    checked as the functional API checks it (:func:`~fsinfo_fast.encoder.check_sigma`:
    positive, finite, within ``SIGMA_RANGE``)."""
    if isinstance(sigma, Tensor) and sigma.ndim != 0:
        raise InvalidInputError(
            f"{who}: sigma must be one number (a float or a 0-d tensor), got a tensor of shape "
            f"{tuple(sigma.shape)}: a per-sample sigma does not fit batches of any size "
            "(use the functional ff.fsinfo / ff.dfil for per-sample noise scales)")
    check_sigma(sigma)
    return float(sigma)


def _encoder_tag(encoder: Any) -> Tensor:
    """``[4]`` float64 integers in ``[0, 2**16)``: the 16-bit pieces of ``id(encoder)``. Two
    live encoders' tags are equal only for the same object, and ``allclose`` (torchmetrics'
    test for sharing states) only when equal."""
    key = id(encoder)
    return torch.tensor([(key >> (16 * i)) & 0xFFFF for i in range(4)], dtype=torch.float64)


class _SameOnEveryRank:
    """``dist_reduce_fx`` of the ``settings`` digest: the gathered rows (``[world, 4]``), which
    must be equal (every rank's metric measures the same thing); raises otherwise. ``max``
    mixed ranks built with another sigma (a per-rank ``FSInfoGuard.calibrate``) into one
    meaningless mean without a word."""

    def __init__(self, who: str, describe: str) -> None:
        self.who, self.describe = who, describe

    def __call__(self, rows: Tensor) -> Tensor:
        rows = rows.reshape(-1, rows.shape[-1])
        other = [i for i in range(1, rows.shape[0]) if not torch.equal(rows[i], rows[0])]
        if other:
            raise InvalidInputError(
                f"{self.who}: the processes' metrics measure different things (their settings "
                f"digests differ: process(es) {other} of the group against process 0); this "
                f"process's metric has {self.describe}. Build the metric with the same sigma, "
                "variant, floor and prior on every rank (e.g. calibrate sigma once and "
                "broadcast it)")
        return rows[0]

#: torchmetrics' bookkeeping that ``forward`` changes around its reset (restored with the
#: states where the batch is refused)
_FORWARD_FLAGS = ("_update_count", "_computed", "compute_on_cpu", "_to_sync", "_should_unsync",
                  "_is_synced", "_enable_grad", "_forward_cache")

_METRIC_BASE_KW = {
    "compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn",
    "distributed_available_fn", "sync_on_compute", "compute_with_cache",
}


class FSInfoMetric(_LeakageMetric):
    """Running FSInfo (nats/dim) over an evaluation loop.

    Args:
        encoder: the bottom part of the model.
        sigma: noise scale on the smashed data.
        backend, seed, memory_budget, dtype: passed to :func:`fsinfo_fast.linearize` (once per
            ``update`` batch).
        variant, estimator, atol, ...: passed to :meth:`fsinfo_fast.Linearization.fsinfo`.

    Example:
        >>> import torch, fsinfo_fast as ff
        >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).eval()
        >>> metric = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
        >>> for _ in range(2):
        ...     metric.update(torch.randn(3, 4))
        >>> int(metric.compute()["count"])
        6
    """

    _method = "fsinfo"

    def _evaluate(self, x, sample_ids):
        lin, kw = self._linearize(x, sample_ids)
        return lin.fsinfo(self.noise_sigma, **kw)


class DFILMetric(_LeakageMetric):
    """Running dFIL (``tr(I)/d``) over an evaluation loop; see :class:`FSInfoMetric`
    (``estimator``, ``rtol``, ``method``, ...: passed to :meth:`fsinfo_fast.Linearization.dfil`).
    """

    higher_is_better = False

    _method = "dfil"

    def _evaluate(self, x, sample_ids):
        lin, kw = self._linearize(x, sample_ids)
        return lin.dfil(self.noise_sigma, **kw)
