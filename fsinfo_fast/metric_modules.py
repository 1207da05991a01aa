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
is only an upper bound too).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._extras import require
from .errors import InvalidInputError
from .formulas import DIAG_FLOOR

Metric = require("torchmetrics", "FSInfoMetric / DFILMetric").Metric

__all__ = ["FSInfoMetric", "DFILMetric"]


class _LeakageMetric(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, encoder: Callable[[Tensor], Tensor], sigma: float = 0.1, **kwargs) -> None:
        metric_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _METRIC_BASE_KW}
        if "sample_ids" in metric_kwargs:
            raise InvalidInputError("sample_ids belong to each batch: pass them to update(), "
                                    "not to the metric's constructor")
        from .linearization import check_metric_keywords

        check_metric_keywords(metric_kwargs, self._method, type(self).__name__)
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (
                math.isfinite(sigma) and sigma > 0):
            raise InvalidInputError(f"sigma must be a positive finite float, got {sigma!r}")
        sigma = float(sigma)
        super().__init__(**kwargs)
        self.encoder = encoder
        self.noise_sigma = sigma
        self.metric_kwargs = metric_kwargs
        for name in ("total", "total_sq", "total_var", "total_bias", "count", "n_unconverged",
                     "n_bound"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("worst", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx="max")
        self._next_id = 0  # running sample id (not a state: each rank numbers its own samples)
        self._in_forward = False

    def reset(self) -> None:
        super().reset()
        if not self._in_forward:  # forward() resets to compute the batch alone: ids go on
            self._next_id = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``metric(x)``: the batch's value, accumulated as :meth:`update` does. torchmetrics
        resets the states to compute the batch alone; the running sample ids go on, so every
        batch gets its own probes (they restarted at 0 with each batch before). A batch the
        metric refuses leaves the accumulated states as they were (torchmetrics' reset had
        erased them: a NaN in one batch lost every batch before it)."""
        saved = {k: getattr(self, k) for k in self._defaults}
        flags = {k: getattr(self, k) for k in _FORWARD_FLAGS if hasattr(self, k)}
        self._in_forward = True
        try:
            return super().forward(*args, **kwargs)
        except BaseException:
            for k, v in {**saved, **flags}.items():
                setattr(self, k, v)
            raise
        finally:
            self._in_forward = False

    #: keywords that define what the metric measures (the others change only its accuracy),
    #: with the values they take when not given
    _DEFINING = {"variant": "diag", "floor": DIAG_FLOOR, "prior_var": None}

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
        super().merge_state(incoming_state)
        self._computed = None

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

    def update(self, x: Tensor, sample_ids: Tensor | None = None) -> None:
        """Add a batch ``x`` (``[B, ...]``); ``sample_ids`` (``[B]`` int64 global ids) seed
        each sample's probes (default: the running count of samples seen)."""
        r = self._evaluate(x, sample_ids)
        v = r.value.detach().to(self.total.device)
        self.total += v.sum()
        self.total_sq += (v**2).sum()
        self.total_var += (r.stderr.detach().to(self.total.device) ** 2).sum()
        self.total_bias += r.bias_bound.detach().to(self.total.device).sum()
        self.count += v.numel()
        self.n_unconverged += (~r.converged).sum().to(self.total.device)
        self.n_bound += r.bound.sum().to(self.total.device)
        self.worst = torch.maximum(self.worst, v.max())

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        mean = self.total / n
        var = (self.total_sq / n - mean**2).clamp_min(0) * n / (n - 1).clamp_min(1)
        return {
            "mean": mean,
            "stderr": torch.sqrt(var / n) if n > 1 else torch.full_like(mean, math.inf),
            "estimator_stderr": torch.sqrt(self.total_var) / n,
            "bias_bound": self.total_bias / n,
            "worst": self.worst,
            "count": n,
            "n_unconverged": self.n_unconverged,
            "n_bound": self.n_bound,
        }


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
