r"""The learned inverse network (the FSInfo paper's attack): a decoder trained to map the smashed
data back to the input.

The attacker holds a training split of data from the same distribution and query access to the
encoder. It encodes the training split once, then trains a decoder ``g`` with the MSE loss
``||g(f(x) + e) - x||^2`` on fresh noise ``e ~ N(0, sigma^2 I)`` every epoch (Adam, cosine
learning-rate decay), and reconstructs each held-out sample from one noisy observation
``z = f(x) + e``. With a prior learned from data, the decoder is a *biased* estimator: it is not
bound by the Cramer-Rao bound ``1/dFIL``.

Decoder (:func:`make_decoder`), sized to the feature shape:

- image features ``[C, h, w]`` and image inputs ``[c, H, W]``: a 3x3 convolution to ``width``
  channels, ``log2(H/h)`` transposed convolutions (kernel 4, stride 2) that double the resolution
  (a bilinear resize finishes sizes that are not powers of two), two 3x3 convolutions and a
  sigmoid for data in ``[0, 1]``; ReLU between layers;
- flat features ``[m]`` and image inputs: a linear layer to a ``width x H/4 x W/4`` grid, then the
  same up-sampling path;
- flat inputs ``[d]``: a linear map plus a one-hidden-layer MLP (so a linear inverse is learned
  exactly), no output squashing unless ``out_range`` is given.

Features are standardised (per channel for images, per feature for flat outputs) with statistics
of the noisy training features, fixed before training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

__all__ = ["inverse_network_attack", "make_decoder"]

Encoder = Callable[[Tensor], Tensor]


class _Standardize(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, z: Tensor) -> Tensor:
        return (z - self.mean) / self.std


class _LinearPlusMLP(nn.Module):
    def __init__(self, m: int, d: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(m, d)
        self.mlp = nn.Sequential(nn.Linear(m, hidden), nn.ReLU(), nn.Linear(hidden, d))
        nn.init.zeros_(self.mlp[2].weight)  # start as the linear map; the MLP learns the rest
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z) + self.mlp(z)


class _Unflatten(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.shape)


class _Resize(nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, z: Tensor) -> Tensor:
        if tuple(z.shape[-2:]) == self.size:
            return z
        return F.interpolate(z, size=self.size, mode="bilinear", align_corners=False)


def make_decoder(
    feature_shape: tuple[int, ...],
    input_shape: tuple[int, ...],
    width: int = 32,
    out_range: tuple[float, float] | None = (0.0, 1.0),
) -> nn.Module:
    """A decoder mapping smashed data ``[B, *feature_shape]`` to inputs ``[B, *input_shape]``.

    Args:
        feature_shape: per-sample shape of the encoder's output (``(C, h, w)`` or ``(m,)``).
        input_shape: per-sample shape of the input (``(c, H, W)`` or ``(d,)``).
        width: channels of the convolutional path (hidden units: ``8 * width`` for flat inputs).
        out_range: ``(lo, hi)`` squashes the output into that range with a sigmoid; ``None``
            leaves it linear.

    Returns:
        An ``nn.Module`` (without the feature standardisation, which the attack adds).
    """
    layers: list[nn.Module] = []
    image_in = len(input_shape) == 3
    if not image_in:
        d = math.prod(input_shape)
        layers += [nn.Flatten(), _LinearPlusMLP(math.prod(feature_shape), d, 8 * width),
                   _Unflatten(tuple(input_shape))]
    else:
        c, h_in, w_in = input_shape
        if len(feature_shape) == 3 and feature_shape[1] <= h_in and feature_shape[2] <= w_in:
            ch, h, w = feature_shape
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.ReLU()]
        else:  # flat (or odd-shaped) features: project to a coarse grid
            h, w = max(1, h_in // 4), max(1, w_in // 4)
            layers += [nn.Flatten(), nn.Linear(math.prod(feature_shape), width * h * w), nn.ReLU(),
                       _Unflatten((width, h, w))]
        ups = max(0, round(math.log2(max(1.0, min(h_in / h, w_in / w)))))
        for _ in range(ups):
            layers += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU()]
        layers += [_Resize((h_in, w_in)), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(width, c, 3, padding=1)]
    if out_range is not None:
        lo, hi = out_range
        layers += [nn.Sigmoid()]
        if (lo, hi) != (0.0, 1.0):
            layers += [_Affine(lo, hi - lo)]
    return nn.Sequential(*layers)


class _Affine(nn.Module):
    def __init__(self, shift: float, scale: float) -> None:
        super().__init__()
        self.shift, self.scale = shift, scale

    def forward(self, z: Tensor) -> Tensor:
        return self.shift + self.scale * z


def _feature_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    dims = (0, 2, 3) if z.ndim == 4 else (0,)
    mean = z.mean(dims, keepdim=True)[0]
    if math.prod(z.shape[d] for d in dims) < 2:
        # one value per feature (one sample, flat features): the unbiased std would be NaN,
        # which clamp_min keeps; scale by 1 instead
        return mean, torch.ones_like(mean)
    std = z.std(dims, keepdim=True)[0].clamp_min(1e-6)
    return mean, std


def _check_features(features: Any, encoder: Encoder, x_train: Tensor, x_test: Tensor) -> None:
    """``features=`` must be two tensors, one row per sample of ``x_train`` / ``x_test``, with
    the encoder's feature shape (one sample is encoded to compare)."""
    if not isinstance(features, (tuple, list)) or len(features) != 2 or not all(
            isinstance(f, Tensor) for f in features):
        raise InvalidInputTypeError(
            "features must be a pair of tensors (encoder(x_train), encoder(x_test)), got "
            f"{type(features).__name__}"
            + (f" of {len(features)}" if isinstance(features, (tuple, list)) else ""))
    f_train, f_test = features
    if f_train.shape[0] != x_train.shape[0] or f_test.shape[0] != x_test.shape[0]:
        raise InvalidInputError("features must hold one row per sample of x_train and x_test")
    check_encoder_dtype(encoder, x_test, "x_test")
    expect = tuple(encode(encoder, x_test[:1]).shape[1:])
    for name, f in (("features[0] (x_train's)", f_train), ("features[1] (x_test's)", f_test)):
        if tuple(f.shape[1:]) != expect:
            raise InvalidInputError(
                f"{name} have the per-sample shape {tuple(f.shape[1:])} but the encoder's "
                f"features are {expect}")


def inverse_network_attack(
    encoder: Encoder,
    sigma: float,
    x_train: Tensor,
    x_test: Tensor,
    *,
    epochs: int = 20,
    width: int = 32,
    batch_size: int = 64,
    lr: float = 3e-3,
    out_range: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    features: tuple[Tensor, Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AttackResult:
    r"""Train a decoder on noisy encodings of ``x_train``; reconstruct ``x_test`` from one noisy
    observation each.

    Args:
        encoder: ``f``, maps ``[B, *input_shape]`` to ``[B, *feature_shape]`` (eval mode; it is not
            changed).
        sigma: noise scale of the observations (``>= 0``), in the encoder's output units.
        x_train: the attacker's training data ``[N_train, *input_shape]``.
        x_test: the private inputs to reconstruct ``[N, *input_shape]`` (the scores compare with
            them; the attacker sees only their noisy encodings).
        epochs: passes over ``x_train`` (fresh noise each pass).
        width: decoder width (:func:`make_decoder`).
        batch_size: mini-batch size.
        lr: Adam learning rate at the start of the cosine schedule.
        out_range: range of the data, for the decoder's output squashing (``None``: linear).
            ``x_train`` and ``x_test`` must lie in it (up to ``1e-6 (hi - lo)``): data outside
            it (e.g. ImageNet-normalised inputs with the default ``(0, 1)``) is refused, as a
            decoder squashed into the range could not fit it; pass the data's range or
            ``out_range=None``.
        seed: seeds the decoder's initialisation, the shuffling and every noise draw (the
            global RNG state is not touched).
        features: ``(encoder(x_train), encoder(x_test))`` when already computed (noise-free;
            saves the encoding passes): two tensors with one row per sample and the encoder's
            feature shape (checked on one sample).
        progress: called with a short status text after each epoch.

    Returns:
        :class:`~fsinfo_fast.attacks.AttackResult` with ``attack="inverse_network"``;
        ``info["train_loss"]`` is the last epoch's mean training MSE and ``info["decoder"]`` the
        trained decoder (standardisation included).

    Example:
        >>> import torch
        >>> enc = torch.nn.Linear(4, 4).eval()
        >>> x = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
        >>> r = inverse_network_attack(enc, 0.0, x[:48], x[48:], epochs=2, out_range=None)
        >>> r.attack, tuple(r.x_hat.shape), tuple(r.mse.shape)
        ('inverse_network', (16, 4), (16,))
    """
    sigma = check_sigma_scalar(sigma)
    x_train, x_test = _check_x(x_train, "x_train"), _check_x(x_test, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InvalidInputError(
            f"x_train samples {tuple(x_train.shape[1:])} and x_test samples "
            f"{tuple(x_test.shape[1:])} differ in shape"
        )
    epochs, batch_size = check_count(epochs, "epochs"), check_count(batch_size, "batch_size")
    width, lr = check_count(width, "width"), check_positive_finite(lr, "lr")
    check_finite(x_train, "x_train")
    check_finite(x_test, "x_test")
    if out_range is not None:
        lo, hi = (float(v) for v in out_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise InvalidInputError(
                f"out_range must be (lo, hi) with finite lo < hi, or None; got {out_range!r}")
        fix = ("pass out_range=(lo, hi) covering the data, or out_range=None for a linear "
               "output")
        check_in_range(x_train, lo, hi, "x_train", "out_range", fix)
        check_in_range(x_test, lo, hi, "x_test", "out_range", fix)
        out_range = (lo, hi)
    gen = torch.Generator().manual_seed(int(seed))
    device = x_train.device
    if features is None:
        check_encoder_dtype(encoder, x_train, "x_train")
        features = (encode(encoder, x_train), encode(encoder, x_test))
    else:
        _check_features(features, encoder, x_train, x_test)
    f_train, f_test = (f.detach() for f in features)
    check_finite(f_train, "the encoder's features of x_train")
    check_finite(f_test, "the encoder's features of x_test")
    # the decoder trains in float64 where the features are float64, else in float32
    work = torch.float64 if f_train.dtype == torch.float64 else torch.float32
    f_train, f_test = f_train.to(work), f_test.to(work)
    z_test = observe(f_test, sigma, torch.Generator().manual_seed(int(seed) + 1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        body = make_decoder(tuple(f_train.shape[1:]), tuple(x_train.shape[1:]), width, out_range)
    mean, std = _feature_stats(observe(f_train, sigma, gen))
    decoder = nn.Sequential(_Standardize(mean, std), body).to(device=device, dtype=work)
    y_train = x_train.to(work)  # the targets in the decoder's dtype

    n = x_train.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    decoder.train()
    loss_epoch = float("nan")
    for epoch in range(int(epochs)):
        z_train = observe(f_train, sigma, gen)
        order = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.mse_loss(decoder(z_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        loss_epoch = total / n
        if progress is not None:
            progress(f"decoder epoch {epoch + 1}/{epochs}, loss {loss_epoch:.4f}")
    decoder.eval()
    with torch.no_grad():
        x_hat = torch.cat([decoder(z_test[i : i + 256]) for i in range(0, len(z_test), 256)])
    info: dict[str, Any] = {"epochs": int(epochs), "width": int(width), "lr": float(lr),
                            "batch_size": int(batch_size), "seed": int(seed),
                            "train_samples": int(n), "train_loss": loss_epoch,
                            "decoder": decoder}
    return result("inverse_network", x_hat, x_test, sigma, **info)
