"""torchmetrics integration: :class:`FSInfoMetric` and :class:`DFILMetric`.

They drop into existing evaluation loops (``update`` per batch, ``compute`` at the end, ``reset``)
and synchronise across processes as torchmetrics does (sums and maxima are reduced over ranks).
``compute()`` returns a dict: ``mean`` (over all samples seen), ``stderr`` (of that mean as an
estimate of the data distribution's mean), ``estimator_stderr`` (the part due to the randomized
estimator alone), ``worst`` (the most leaking sample's value) and ``count``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._extras import require

Metric = require("torchmetrics", "FSInfoMetric / DFILMetric").Metric

__all__ = ["FSInfoMetric", "DFILMetric"]


class _LeakageMetric(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, encoder: Callable[[Tensor], Tensor], sigma: float = 0.1, **kwargs) -> None:
        metric_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _METRIC_BASE_KW}
        super().__init__(**kwargs)
        self.encoder = encoder
        self.noise_sigma = sigma
        self.metric_kwargs = metric_kwargs
        for name in ("total", "total_sq", "total_var", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("worst", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx="max")

    def _evaluate(self, x: Tensor, sample_ids: Tensor | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, x: Tensor, sample_ids: Tensor | None = None) -> None:
        """Add a batch ``x`` (``[B, ...]``); ``sample_ids`` seed each sample's probes."""
        r = self._evaluate(x, sample_ids)
        v = r.value.detach().to(self.total.device)
        self.total += v.sum()
        self.total_sq += (v**2).sum()
        self.total_var += (r.stderr.detach().to(self.total.device) ** 2).sum()
        self.count += v.numel()
        self.worst = torch.maximum(self.worst, v.max())

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        mean = self.total / n
        var = (self.total_sq / n - mean**2).clamp_min(0) * n / (n - 1).clamp_min(1)
        return {
            "mean": mean,
            "stderr": torch.sqrt(var / n) if n > 1 else torch.tensor(math.inf),
            "estimator_stderr": torch.sqrt(self.total_var) / n,
            "worst": self.worst,
            "count": n,
        }


_METRIC_BASE_KW = {
    "compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn",
    "distributed_available_fn", "sync_on_compute", "compute_with_cache",
}


class FSInfoMetric(_LeakageMetric):
    """Running FSInfo (nats/dim) over an evaluation loop.

    Args:
        encoder: the bottom part of the model.
        sigma: noise scale on the smashed data.
        variant, estimator, atol, seed, ...: passed to :func:`fsinfo_fast.fsinfo`.

    Example:
        >>> import torch, fsinfo_fast as ff
        >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).eval()
        >>> metric = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
        >>> for _ in range(2):
        ...     metric.update(torch.randn(3, 4))
        >>> int(metric.compute()["count"])
        6
    """

    def _evaluate(self, x, sample_ids):
        from .metrics import fsinfo

        kw = dict(self.metric_kwargs)
        if sample_ids is not None:
            kw["sample_ids"] = sample_ids
        return fsinfo(self.encoder, x, self.noise_sigma, **kw)


class DFILMetric(_LeakageMetric):
    """Running dFIL (``tr(I)/d``) over an evaluation loop; see :class:`FSInfoMetric`."""

    higher_is_better = False

    def _evaluate(self, x, sample_ids):
        from .metrics import dfil

        kw = dict(self.metric_kwargs)
        if sample_ids is not None:
            kw["sample_ids"] = sample_ids
        return dfil(self.encoder, x, self.noise_sigma, **kw)
