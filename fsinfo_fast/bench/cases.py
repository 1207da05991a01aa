"""Benchmark cases: the encoder, the input batch and the exact value every provider is scored on.

Encoders are the paper zoo (:mod:`fsinfo_fast.models`) cut with :func:`fsinfo_fast.split` at a
paper split index, freshly initialised from a fixed seed and put in eval mode. Inputs are real
photograph crops (:func:`fsinfo_fast.data.natural_images`, in ``[0, 1]``). The exact values come
from the float64 oracle :mod:`fsinfo_fast.reference`, computed once per encoder and batch and
cached (in memory, and on disk when a cache directory is given).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import reference
from .._version import __version__
from ..formulas import DIAG_FLOOR, fsinfo_from_spectrum
from .config import CaseSpec, EncoderSpec

__all__ = [
    "Case",
    "ExactValues",
    "register_encoder",
    "build_encoder",
    "build_input",
    "make_case",
    "exact_values",
    "exact_metric",
    "clear_cache",
]

log = logging.getLogger(__name__)

EncoderBuilder = Callable[[EncoderSpec], nn.Module]
_ENCODERS: dict[str, EncoderBuilder] = {}


def register_encoder(name: str, builder: EncoderBuilder) -> None:
    """Make ``EncoderSpec(model=name)`` build ``builder(spec)`` (an ``nn.Module`` encoder).

    The builder is called after ``torch.manual_seed(config.seed)``; it should return the encoder
    on the CPU, in float32 (the runner moves it and calls ``eval()``)."""
    _ENCODERS[name] = builder


class TinyCNN(nn.Module):
    """A small conv + BatchNorm + Tanh + max-pool encoder (tests and smoke runs)."""

    def __init__(self, channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh(),
            nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


register_encoder("tiny-cnn", lambda spec: TinyCNN(spec.channels))


def build_encoder(spec: EncoderSpec, seed: int = 0) -> nn.Module:
    """The encoder of ``spec``: a zoo model cut at ``spec.split`` (eval mode, float32, CPU).

    Args:
        spec: model name, split index, input size and channels (and ResNet stem).
        seed: seed of the weights.

    Returns:
        The encoder module, mapping ``[B, channels, size, size]`` to the smashed data.
    """
    torch.manual_seed(seed)
    if spec.model in _ENCODERS:
        enc = _ENCODERS[spec.model](spec)
    else:
        from ..models import get_model
        from ..split import split

        kw: dict = {"in_channels": spec.channels, "input_size": spec.size}
        if spec.stem is not None:
            kw["stem"] = spec.stem
        model = get_model(spec.model, **kw)
        enc = split(model.eval(), spec.split)
    return enc.float().eval()


def build_input(spec: EncoderSpec, batch: int, seed: int = 0) -> Tensor:
    """``[batch, channels, size, size]`` float32 input in ``[0, 1]``: crops of real photographs
    (uniform noise when they cannot be loaded or ``channels != 3``)."""
    if spec.channels == 3:
        try:
            from ..data import natural_images

            return natural_images(size=spec.size, n=batch, seed=seed)[0]
        except Exception as err:  # noqa: BLE001 - any failure falls back to noise
            log.debug("natural images unavailable (%s); using uniform noise", err)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, spec.channels, spec.size, spec.size, generator=g)


@dataclass
class ExactValues:
    """Exact float64 quantities of one encoder and batch (from :mod:`fsinfo_fast.reference`).

    Attributes:
        diag: ``[B, d]`` ``diag(J^T J)``.
        trace: ``[B]`` ``tr(J^T J)``.
        eigvals: ``[B, min(m, d)]`` eigenvalues of ``J^T J`` on the smaller side, or ``None``
            when not computed (only the log-det task needs them).
        seconds: wall time the oracle took.
    """

    diag: Tensor
    trace: Tensor
    eigvals: Tensor | None
    seconds: float


@dataclass
class Case:
    """A case ready to measure: everything a provider needs, built outside any timing.

    Attributes:
        spec: the case's description.
        encoder: the encoder (eval, float32, on ``device``).
        x: the batch ``[B, *in_shape]`` on ``device``.
        d, m: flattened input and output sizes.
        exact: the exact per-sample metric (float64 ``[B]``, on the CPU) or ``None`` when the
            oracle was not run (too large).
        exact_seconds: wall time of the oracle (0 when cached).
        extra: anything else (e.g. the sweep axis).
    """

    spec: CaseSpec
    encoder: nn.Module
    x: Tensor
    d: int
    m: int
    exact: Tensor | None = None
    exact_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def sigma(self) -> float:
        return float(self.spec.sigma)

    @property
    def target(self) -> float:
        return float(self.spec.target)

    @property
    def relative(self) -> bool:
        """Whether errors are relative (dFIL) rather than absolute nats/dim (FSInfo)."""
        return self.task == "dfil"

    def flat_fn(self) -> Callable[[Tensor], Tensor]:
        """``[N, d] -> [N, m]`` view of the encoder (what plain torch.func code differentiates)."""
        in_shape = tuple(self.x.shape[1:])
        enc = self.encoder

        def fn(flat: Tensor) -> Tensor:
            return enc(flat.reshape(flat.shape[0], *in_shape)).reshape(flat.shape[0], -1)

        return fn

    def error(self, value: Tensor) -> Tensor:
        """Per-sample error of ``value`` ``[B]``: absolute (nats/dim) or relative (dFIL)."""
        if self.exact is None:
            raise RuntimeError("no exact value for this case")
        v = value.detach().to("cpu", torch.float64)
        err = (v - self.exact).abs()
        if self.relative:
            err = err / self.exact.abs().clamp_min(1e-300)
        return torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)


# -- exact values --------------------------------------------------------------------------------
_CACHE: dict[str, ExactValues] = {}


def clear_cache() -> None:
    """Forget the in-memory cache of exact values."""
    _CACHE.clear()


def _weights_digest(encoder: nn.Module, x: Tensor) -> str:
    h = hashlib.sha256()
    for t in [*encoder.state_dict().values(), x]:
        if isinstance(t, Tensor):
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes()[:1 << 20])
            h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


def exact_values(
    encoder: nn.Module, x: Tensor, *, need_eigvals: bool, key: str | None = None,
    cache_dir: str | Path | None = None,
) -> ExactValues:
    """Exact ``diag``, ``trace`` (and eigenvalues) of ``J^T J`` for each sample, float64.

    The Jacobian of one sample at a time comes from :func:`fsinfo_fast.reference.jacobian`
    (float64, exact); the eigenvalues from :func:`fsinfo_fast.reference.eigvals_from_jacobian`.
    Results are cached under ``key`` (plus a digest of the weights and input).

    Args:
        encoder: the encoder.
        x: the batch.
        need_eigvals: also compute the eigenvalues (an ``n^3`` eigendecomposition per sample).
        key: cache key prefix (``None``: no caching).
        cache_dir: directory of an on-disk cache (``None``: memory only).
    """
    import time

    full_key = None
    if key is not None:
        full_key = f"{key}-{_weights_digest(encoder, x)}-v{__version__}"
        hit = _CACHE.get(full_key)
        if hit is not None and (hit.eigvals is not None or not need_eigvals):
            return ExactValues(hit.diag, hit.trace, hit.eigvals, 0.0)
        if cache_dir is not None:
            path = Path(cache_dir) / (hashlib.sha256(full_key.encode()).hexdigest()[:24] + ".pt")
            if path.exists():
                try:
                    data = torch.load(path, weights_only=True)
                    ev = ExactValues(data["diag"], data["trace"], data.get("eigvals"), 0.0)
                except Exception as err:  # noqa: BLE001 - an interrupted save, another file
                    warnings.warn(f"ignoring the unreadable oracle cache entry {path} "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                                  "recomputing it", RuntimeWarning, stacklevel=2)
                    ev = None
                if ev is not None and (ev.eigvals is not None or not need_eigvals):
                    _CACHE[full_key] = ev
                    return ev
    t0 = time.perf_counter()
    diags, traces, eigs = [], [], []
    for i in range(x.shape[0]):
        J = reference.jacobian(encoder, x[i : i + 1])  # [1, m, d] float64
        diags.append((J**2).sum(dim=1).cpu())
        traces.append((J**2).sum(dim=(1, 2)).cpu())
        if need_eigvals:
            eigs.append(reference.eigvals_from_jacobian(J)[0].cpu())
        del J
    ev = ExactValues(
        diag=torch.cat(diags), trace=torch.cat(traces),
        eigvals=torch.cat(eigs) if need_eigvals else None, seconds=time.perf_counter() - t0,
    )
    if full_key is not None:
        _CACHE[full_key] = ev
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            path = Path(cache_dir) / (hashlib.sha256(full_key.encode()).hexdigest()[:24] + ".pt")
            # atomically: an interrupted save leaves a temporary file, never a truncated entry
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                torch.save({"diag": ev.diag, "trace": ev.trace, "eigvals": ev.eigvals}, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return ev


def exact_metric(task: str, ev: ExactValues, d: int, sigma: float,
                 prior_var: float | None) -> Tensor:
    """The exact per-sample metric ``[B]`` (float64) of ``task`` from the cached quantities,
    with the same formulas as :mod:`fsinfo_fast.reference` (:func:`fsinfo_from_spectrum`)."""
    if task == "fsinfo_diag":
        return fsinfo_from_spectrum(ev.diag, d, sigma, DIAG_FLOOR)
    if task == "dfil":
        return ev.trace / (sigma**2 * d)
    if task == "fsinfo_logdet":
        if ev.eigvals is None:
            raise RuntimeError("eigenvalues were not computed")
        return fsinfo_from_spectrum(ev.eigvals, d, sigma, 1.0 / float(prior_var))
    raise ValueError(f"unknown task {task!r}")


def make_case(
    spec: CaseSpec, *, device: torch.device, seed: int = 0, with_exact: bool = True,
    cache_dir: str | Path | None = None, encoder: nn.Module | None = None,
) -> Case:
    """Build the encoder and input of ``spec`` on ``device`` and (optionally) the exact value."""
    enc = encoder if encoder is not None else build_encoder(spec.encoder, seed)
    enc = enc.to(device).eval()
    x = build_input(spec.encoder, spec.batch, seed).to(device)
    with torch.no_grad():
        m = int(enc(x[:1]).numel())
    d = int(x[0].numel())
    case = Case(spec=spec, encoder=enc, x=x, d=d, m=m)
    if with_exact:
        key = f"{spec.encoder.label}-B{spec.batch}-seed{seed}-{device}"
        ev = exact_values(enc, x, need_eigvals=spec.task == "fsinfo_logdet", key=key,
                          cache_dir=cache_dir)
        case.exact = exact_metric(spec.task, ev, d, spec.sigma, spec.prior_var)
        case.exact_seconds = ev.seconds
    return case
