r"""The white-box optimisation attack (the dFIL paper's attack): search for an input whose
encoding matches the observation.

Given ``z = f(x) + e``, ``e ~ N(0, sigma^2 I)``, and white-box access to ``f``, minimise per
sample

.. math::

    L(x') = \frac{1}{m}\,\|f(x') - z\|^2 + \lambda\,\mathrm{TV}(x'),\qquad
    \mathrm{TV}(x') = \operatorname{mean}|x'_{:,i+1,j} - x'_{:,i,j}|
                    + \operatorname{mean}|x'_{:,i,j+1} - x'_{:,i,j}|

(anisotropic total variation, only for image inputs ``[C, H, W]``) with Adam from a random start
``x'_0 ~ U[0, 1]`` and a cosine learning-rate decay. Pixels stay in ``[0, 1]``: either projected
after every step (``param="clamp"``, the default) or parametrised as ``x' = sigmoid(w)``
(``param="sigmoid"``). The samples of a batch are optimised together but independently (the
objective is a sum over samples and the encoder must treat samples independently, e.g. BatchNorm
in eval mode).

With the prior and the box constraint the attack is a *biased* estimator: it is not bound by
the Cramer-Rao bound ``1/dFIL`` (see :mod:`fsinfo_fast.bounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidInputError, InvalidInputTypeError
from .base import (
    AttackResult,
    _check_x,
    check_count,
    check_encoder_dtype,
    check_finite,
    check_in_range,
    check_positive_finite,
    check_sigma_scalar,
    encode,
    observe,
    result,
)

__all__ = ["optimization_attack", "total_variation"]

Encoder = Callable[[Tensor], Tensor]
_PARAMS = ("clamp", "sigmoid")


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation per sample ``[B]`` of images ``[B, C, H, W]`` (mean absolute
    difference of vertical plus horizontal neighbours); zeros for non-image inputs."""
    if x.ndim != 4:
        return x.new_zeros(x.shape[0])
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def optimization_attack(
    encoder: Encoder,
    sigma: float,
    x: Tensor,
    *,
    z: Tensor | None = None,
    steps: int = 200,
    lr: float = 0.05,
    tv_weight: float = 0.01,
    param: str = "clamp",
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> AttackResult:
    r"""Reconstruct each sample of ``x`` from a noisy encoding by gradient descent on the input.

    Args:
        encoder: ``f`` (eval mode, differentiable; it is not changed).
        sigma: noise scale of the observation ``z = f(x) + N(0, sigma^2 I)`` (``>= 0``).
        x: the private inputs ``[N, ...]`` (used to draw ``z`` and to score the reconstructions).
        z: the observations ``[N, *feature_shape]``; default: drawn with ``seed``.
        steps: Adam steps.
        lr: Adam learning rate at the start of the cosine schedule (in input units, or in logits
            for ``param="sigmoid"``).
        tv_weight: ``lambda``, weight of the total-variation prior (0 disables it).
        param: ``"clamp"`` (projected Adam) or ``"sigmoid"`` (``x' = lo + (hi - lo) sigmoid(w)``).
        bounds: ``(lo, hi)`` range of the inputs; the reconstructions stay in it and the random
            start is uniform on it. ``x`` must lie in it (up to ``1e-6 (hi - lo)``): data outside
            (e.g. ImageNet-normalised inputs with the default ``(0, 1)``) is refused, as the
            error of a reconstruction confined to the box against it would be meaningless;
            pass the data's range.
        batch_size: samples optimised together.
        seed: seeds the observation noise and the random start.
        progress: called with a short status text every 10 steps.

    Returns:
        :class:`~fsinfo_fast.attacks.AttackResult` with ``attack="optimization"``;
        ``info["objective"]`` is the final data-fit term ``||f(x') - z||^2 / m`` per sample.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> enc = torch.nn.Linear(4, 6).eval()
        >>> x = 0.2 + 0.6 * torch.rand(3, 4)
        >>> r = optimization_attack(enc, 0.0, x, steps=1000, tv_weight=0.0)
        >>> bool(r.mse.max() < 1e-4)
        True
    """
    sigma = check_sigma_scalar(sigma)
    x = _check_x(x)
    if param not in _PARAMS:
        raise InvalidInputError(f"param must be one of {_PARAMS}, got {param!r}")
    steps, batch_size = check_count(steps, "steps"), check_count(batch_size, "batch_size")
    lr = check_positive_finite(lr, "lr")
    tv_weight = check_positive_finite(tv_weight, "tv_weight", allow_zero=True)
    lo, hi = (float(b) for b in bounds)
    if not hi > lo:
        raise InvalidInputError(f"bounds must be (lo, hi) with hi > lo, got {bounds!r}")
    check_finite(x, "x")
    check_in_range(x, lo, hi, "x", "bounds",
                   f"pass bounds=(lo, hi) covering the data, e.g. bounds=({float(x.min()):.4g}, "
                   f"{float(x.max()):.4g}), or rescale x into ({lo:g}, {hi:g})")
    check_encoder_dtype(encoder, x)
    gen = torch.Generator().manual_seed(int(seed))
    if z is None:
        z = observe(encode(encoder, x), sigma, gen)
    else:
        if not isinstance(z, Tensor):
            raise InvalidInputTypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.shape[0] != x.shape[0]:
            raise InvalidInputError(f"z has {z.shape[0]} samples, x has {x.shape[0]}")
        feat = tuple(encode(encoder, x[:1]).shape[1:])
        if tuple(z.shape[1:]) != feat:
            raise InvalidInputError(
                f"z must have the encoder's feature shape [N, *{feat}], got {tuple(z.shape)} "
                "(a shape that only broadcasts against f(x) is refused)")
        check_finite(z, "z")
    z = z.detach()
    start_gen = torch.Generator().manual_seed(int(seed) + 7919)
    outs, objective = [], []
    for i0 in range(0, x.shape[0], batch_size):
        xb, zb = x[i0 : i0 + batch_size], z[i0 : i0 + batch_size]
        u = torch.rand(xb.shape, generator=start_gen, dtype=xb.dtype).to(xb.device)
        x_hat, obj = _optimise(encoder, zb, u, lo, hi, steps, lr, tv_weight, param, progress,
                               i0, x.shape[0])
        outs.append(x_hat)
        objective.append(obj)
    x_hat = torch.cat(outs)
    info: dict[str, Any] = {"steps": int(steps), "lr": float(lr), "tv_weight": float(tv_weight),
                            "param": param, "seed": int(seed),
                            "objective": torch.cat(objective)}
    return result("optimization", x_hat, x, sigma, **info)


def _optimise(encoder: Encoder, z: Tensor, u: Tensor, lo: float, hi: float, steps: int,
              lr: float, tv_weight: float, param: str,
              progress: Callable[[str], None] | None, i0: int, n: int) -> tuple[Tensor, Tensor]:
    eps = 1e-4
    if param == "sigmoid":
        p = u.clamp(eps, 1 - eps)
        w = torch.log(p / (1 - p)).requires_grad_()
    else:
        w = (lo + (hi - lo) * u).requires_grad_()

    def image(w: Tensor) -> Tensor:
        return lo + (hi - lo) * torch.sigmoid(w) if param == "sigmoid" else w

    opt = torch.optim.Adam([w], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    m = z[0].numel()
    for step in range(int(steps)):
        xi = image(w)
        fit = (encoder(xi) - z).pow(2).flatten(1).sum(1) / m
        loss = fit + tv_weight * total_variation(xi) if tv_weight > 0 else fit
        # gradient for the input only: the encoder's parameters get no .grad
        (w.grad,) = torch.autograd.grad(loss.sum(), [w])
        opt.step()
        sched.step()
        if param == "clamp":
            with torch.no_grad():
                w.clamp_(lo, hi)
        if progress is not None and (step + 1) % 10 == 0:
            progress(f"samples {i0}-{min(n, i0 + len(z)) - 1}: step {step + 1}/{steps}, "
                     f"fit {float(fit.detach().mean()):.3g}")
    with torch.no_grad():
        xi = image(w)
        fit = (encoder(xi) - z).pow(2).flatten(1).sum(1) / m
    return xi.detach(), fit.detach().to(torch.float64).cpu()
