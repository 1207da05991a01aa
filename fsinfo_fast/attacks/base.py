"""What every attack returns, and the observation model they share.

The attacker of split inference sees the smashed data ``z = f(x) + e``, ``e ~ N(0, sigma^2 I)``
(the channel whose Fisher information the metrics measure). :func:`observe` draws ``z`` from a
seeded generator, so an attack's result depends only on its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidInputError, InvalidInputTypeError
from .scores import reconstruction_scores

__all__ = ["AttackResult", "observe", "encode", "check_sigma_scalar", "check_in_range"]

Encoder = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AttackResult:
    """Reconstructions of a batch and their scores.

    Attributes:
        attack: ``"inverse_network"`` or ``"optimization"``.
        x_hat: reconstructions ``[N, ...]`` (float32, CPU), the input's shape.
        mse: ``[N]`` float64 per-dimension squared error ``||x_hat - x||^2 / d``.
        psnr: ``[N]`` float64 PSNR in dB (``data_range = 1``).
        ssim: ``[N]`` float64 SSIM (``nan`` for inputs that are not images).
        sigma: the noise scale of the observations attacked.
        info: settings and diagnostics (training loss, final objective, seed, ...).
    """

    attack: str
    x_hat: Tensor
    mse: Tensor
    psnr: Tensor
    ssim: Tensor
    sigma: float
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Mean and standard error over samples of each score (JSON-ready floats).

        ``out["n"]`` is the batch size; each score's ``n`` is the number of samples its
        ``mean`` and ``stderr`` are over: the finite ones. A perfect reconstruction has PSNR
        ``+inf``, which no finite mean can hold: ``psnr["perfect"]`` counts those samples, and
        ``psnr["mean"]`` is the mean over the other ``psnr["n"]`` (``None`` when all are
        perfect), so a batch with perfect samples reads "``perfect`` exact, the rest at
        ``mean`` dB", never a mean that silently leaves them out. ``psnr["median"]`` is the
        lower median over all samples (``None`` where over half are perfect: it is ``+inf``).
        ``ssim`` is ``nan`` for inputs that are not images, so its ``n`` is 0 there.
        """
        out: dict[str, Any] = {"n": int(self.mse.shape[0])}
        for key in ("mse", "psnr", "ssim"):
            v_all = getattr(self, key).detach().double().cpu()
            v = v_all[torch.isfinite(v_all)]
            n = int(v.numel())
            mean = float(v.mean()) if n else None
            se = float(v.std() / math.sqrt(n)) if n > 1 else None
            out[key] = {"mean": mean, "stderr": se, "n": n}
            if key == "psnr":
                ok = v_all[~torch.isnan(v_all)]
                out[key]["perfect"] = int(torch.isposinf(ok).sum())
                med = float(ok.sort().values[(ok.numel() - 1) // 2]) if ok.numel() else None
                out[key]["median"] = med if med is not None and math.isfinite(med) else None
        return out


def check_sigma_scalar(sigma: Any) -> float:
    """A finite ``sigma >= 0`` as a float (attacks use one noise scale for the whole batch).

    Any real scalar is accepted: a Python ``int`` / ``float``, a NumPy real scalar
    (``np.float32(0.1)``) or a one-element real torch tensor; bools, complex numbers, strings
    and tensors of several elements are refused.
    """
    import numbers

    import numpy as np

    if isinstance(sigma, Tensor):
        if sigma.numel() != 1 or sigma.dtype == torch.bool or sigma.is_complex():
            raise InvalidInputTypeError(
                f"sigma must be a real scalar, got a {sigma.dtype} tensor of shape "
                f"{tuple(sigma.shape)}")
        sigma = sigma.item()
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, numbers.Real):
        raise InvalidInputTypeError(f"sigma must be a number, got {type(sigma).__name__}")
    s = float(sigma)
    if not math.isfinite(s) or s < 0:
        raise InvalidInputError(f"sigma must be finite and >= 0, got {sigma!r}")
    return s


def check_in_range(t: Tensor, lo: float, hi: float, name: str, option: str, fix: str) -> None:
    """Refuse data outside ``[lo, hi]`` (up to ``1e-6 (hi - lo)`` of rounding) where an attack
    confines its reconstructions to that range: their error against such data would measure
    the range, not the attack.

    Raises:
        InvalidInputError: naming the data's range, ``option`` and ``fix``.
    """
    tol = 1e-6 * (hi - lo)
    t_min, t_max = float(t.detach().min()), float(t.detach().max())
    if t_min < lo - tol or t_max > hi + tol:
        raise InvalidInputError(
            f"{name} has values in [{t_min:.4g}, {t_max:.4g}], outside {option}=({lo:g}, {hi:g}) "
            f"that the reconstructions are confined to, so their MSE against {name} would be "
            f"meaningless; {fix}")


def _check_x(x: Any, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise InvalidInputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidInputTypeError(f"{name} must be floating point, got {x.dtype}")
    if x.ndim < 2 or x.shape[0] < 1:
        raise InvalidInputError(
            f"{name} must be a batch [N, ...] with N >= 1, got {tuple(x.shape)}")
    return x


def check_count(v: Any, name: str) -> int:
    """An integer ``>= 1`` (Python or NumPy integer; not a bool, a float or a string)."""
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def check_positive_finite(v: Any, name: str, allow_zero: bool = False) -> float:
    """A finite number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    try:
        if isinstance(v, (bool, str, bytes)):
            raise TypeError
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
        raise InvalidInputError(
            f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return f


def check_finite(t: Tensor, name: str) -> Tensor:
    """Refuse NaN / inf in an attack's input (they would train or optimise to NaN silently)."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InvalidInputError(f"{name} has {bad} non-finite value(s) (NaN or inf)")
    return t


def check_encoder_dtype(encoder: Any, x: Tensor, name: str = "x") -> None:
    """A clear error where ``x``'s floating dtype differs from the encoder's parameters'
    (torch's own message is a bare ``mat1 and mat2 must have the same dtype``)."""
    if not isinstance(encoder, torch.nn.Module):
        return
    for p in encoder.parameters():
        if p.is_floating_point():
            if p.dtype != x.dtype:
                raise InvalidInputTypeError(
                    f"{name} is {x.dtype} but the encoder's parameters are {p.dtype}: cast one "
                    f"to the other (e.g. {name}.to({p.dtype}))")
            return


@torch.no_grad()
def encode(encoder: Encoder, x: Tensor, batch_size: int = 256) -> Tensor:
    """``encoder(x)`` in batches, without gradients (on ``x``'s device).

    Raises:
        InvalidInputTypeError: the encoder returned something other than a tensor (a tuple,
            a model output object): the attacks need the features as one tensor.
    """
    outs = []
    for i in range(0, x.shape[0], batch_size):
        f = encoder(x[i : i + batch_size])
        if not isinstance(f, Tensor):
            raise InvalidInputTypeError(
                f"the encoder returned a {type(f).__name__}, not a tensor: the attacks need the "
                "features as one tensor [N, ...]; wrap the encoder to return it (e.g. "
                "lambda x: encoder(x)[0] for a tuple)")
        outs.append(f)
    return torch.cat(outs)


def observe(features: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """``features + sigma * N(0, I)``, the noise drawn on the CPU from ``generator``."""
    if sigma == 0:
        return features.clone()
    e = torch.randn(features.shape, generator=generator, dtype=features.dtype)
    return features + sigma * e.to(features.device)


def result(attack: str, x_hat: Tensor, x: Tensor, sigma: float, **info: Any) -> AttackResult:
    s = reconstruction_scores(x_hat, x)
    return AttackResult(attack=attack, x_hat=x_hat.detach().float().cpu(), mse=s.mse,
                        psnr=s.psnr, ssim=s.ssim, sigma=sigma, info=info)
