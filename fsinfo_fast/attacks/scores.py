"""Reconstruction scores: per-sample MSE, PSNR and SSIM (PSNR and SSIM from torchmetrics).

Every score compares a reconstruction ``x_hat`` with the private input ``x`` sample by sample, in
the data's own units (pixels in ``[0, 1]`` for the bundled data, so ``data_range = 1``):

- ``mse``: ``||x_hat - x||^2 / d``, the per-dimension squared error that the metrics' bounds
  (``1/dFIL``, ``exp(-2 FSInfo)/(2 pi e)``) speak about;
- ``psnr``: ``10 log10(data_range^2 / mse)`` in dB (torchmetrics
  ``peak_signal_noise_ratio``);
- ``ssim``: the structural similarity of Wang et al. (2004) with an 11x11 Gaussian window
  (sigma 1.5) on images of at least 11x11 pixels, averaged over channels (torchmetrics
  ``structural_similarity_index_measure``, its reflect padding at the borders). On smaller
  images the window shrinks to the largest odd size ``k`` that fits (``k <= min(H, W)``) with
  the Gaussian scaled with it, sigma ``1.5 k / 11`` (:func:`ssim_window`: torchmetrics sizes
  a Gaussian window by sigma alone, ``2 int(3.5 sigma + 0.5) + 1``, and ignores its
  ``kernel_size``, so the window is set through sigma). ``nan`` for inputs that are not images
  ``[N, C, H, W]`` and for images under 3 pixels on a side (no window fits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["ReconstructionScores", "reconstruction_scores", "per_sample_mse", "ssim_window"]

#: SSIM's window side and Gaussian sigma on images of at least that size (Wang et al. 2004)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def ssim_window(height: int, width: int) -> tuple[int, float] | None:
    """SSIM's ``(window side k, Gaussian sigma)`` for ``height x width`` images: ``(11, 1.5)``
    where an 11x11 window fits, else the largest odd ``k <= min(height, width)`` with sigma
    ``1.5 k / 11`` (the same Gaussian, scaled; torchmetrics' window for sigma ``s`` is
    ``2 int(3.5 s + 0.5) + 1`` wide, exactly ``k`` for these sigmas); ``None`` under 3 pixels.

    Example:
        >>> ssim_window(32, 32), ssim_window(8, 8), ssim_window(5, 9), ssim_window(2, 8)
        ((11, 1.5), (7, 0.9545454545454546), (5, 0.6818181818181818), None)
    """
    k = min(SSIM_WINDOW, int(height), int(width))
    k -= 1 - k % 2  # largest odd window that fits
    if k < 3:
        return None
    return k, SSIM_SIGMA * k / SSIM_WINDOW


@dataclass(frozen=True)
class ReconstructionScores:
    """Per-sample scores, each float64 ``[N]``.

    Attributes:
        mse: mean squared error per input dimension (lower = better reconstruction).
        psnr: peak signal-to-noise ratio in dB (higher = better).
        ssim: structural similarity in ``[-1, 1]`` (higher = better; ``nan`` for non-images).
    """

    mse: Tensor
    psnr: Tensor
    ssim: Tensor


def per_sample_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """``||x_hat_i - x_i||^2 / d`` per sample, float64 ``[N]``."""
    if x_hat.shape != x.shape:
        raise InvalidInputError(
            f"reconstruction shape {tuple(x_hat.shape)} differs from the input's {tuple(x.shape)}"
        )
    if x.ndim < 2:
        raise InvalidInputError(
            f"need a batch [N, ...] of samples with ndim >= 2, got shape {tuple(x.shape)} (a "
            "single flat sample is x[None])")
    diff = x_hat.detach().to(torch.float64) - x.detach().to(torch.float64)
    return diff.pow(2).flatten(1).mean(1)


def reconstruction_scores(
    x_hat: Tensor, x: Tensor, data_range: float = 1.0
) -> ReconstructionScores:
    """MSE, PSNR and SSIM of each reconstruction ``x_hat[i]`` of ``x[i]``.

    Args:
        x_hat: reconstructions ``[N, ...]``.
        x: the true inputs, same shape.
        data_range: ``max - min`` of the data (1 for images in ``[0, 1]``).

    Returns:
        :class:`ReconstructionScores` of ``[N]`` float64 tensors (on the CPU).

    Example:
        >>> import torch
        >>> x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> s = reconstruction_scores(x.clone(), x)
        >>> s.mse.tolist(), [round(v, 6) for v in s.ssim.tolist()]
        ([0.0, 0.0], [1.0, 1.0])
    """
    from .._extras import require

    require("torchmetrics", "PSNR and SSIM of reconstructions", extra="validate")
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    mse = per_sample_mse(x_hat, x)
    a = x_hat.detach().to(torch.float64).cpu()
    b = x.detach().to(torch.float64).cpu()
    dims = tuple(range(1, a.ndim))
    psnr = peak_signal_noise_ratio(a, b, data_range=data_range, reduction="none", dim=dims)
    window = ssim_window(*a.shape[-2:]) if a.ndim == 4 else None
    if window is not None:
        k, sigma = window
        # the Gaussian window's size follows from sigma alone (kernel_size is ignored with it)
        ssim = structural_similarity_index_measure(
            a, b, data_range=data_range, sigma=sigma, kernel_size=k, reduction="none"
        )
    else:
        ssim = torch.full((a.shape[0],), float("nan"), dtype=torch.float64)
    return ReconstructionScores(mse=mse.cpu(), psnr=psnr.to(torch.float64),
                                ssim=ssim.to(torch.float64))
