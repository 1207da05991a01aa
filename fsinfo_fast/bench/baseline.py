r"""The plain ``torch.func`` implementation a competent user would write (the randomized baseline).

Deliberately *not* the library's code: no linearised engine, no kernels, no debiasing of the
logarithm, no adaptive stopping. It is what one writes after reading the DESIGN notes once:

- **diagonal / trace** (Bekas-Kokiopoulou-Saad / Hutchinson): draw ``K`` Gaussian cotangents
  ``u ~ N(0, I_m)``, ``g = J^T u`` by ``vmap`` over the pullback of ``torch.func.vjp``;
  ``diag(J^T J) ~= mean_k g_k**2`` and ``tr(J^T J) ~= sum_i mean_k g_ki**2``. FSInfo_diag is then
  the plug-in ``(1/2d) sum_i log(s_i / sigma^2 + 1e-10) - (1/2) log(2 pi e)``, which is biased low
  by about ``1/(2K)`` nats/dim (Jensen); the baseline needs more probes to reach a target because
  of that (the library removes the bias exactly, see DESIGN.md).
- **log det with a prior** (stochastic Lanczos quadrature, Ubaru-Chen-Saad 2017): ``K``
  Rademacher start vectors, ``n`` plain Lanczos steps (no reorthogonalisation) on
  ``A = J^T J / sigma^2 + lambda I`` applied as ``J^T (J v)`` (``jvp`` then the cached
  ``vjp`` pullback), Gauss quadrature ``v^T log(A) v ~= ||v||^2 sum_j tau_j^2 log theta_j``.

All functions take a flat function ``fn: [N, d] -> [N, m]`` and a batch ``x [B, d]`` and return
float64 ``[B]`` values. They are pure tensor code (no Python branching on data), so
``torch.compile`` can compile them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ..formulas import DIAG_FLOOR, HALF_LOG_2PIE

__all__ = ["probe_squares", "fsinfo_diag_plain", "dfil_plain", "fsinfo_logdet_slq_plain"]

Fn = Callable[[Tensor], Tensor]


def probe_squares(fn: Fn, x: Tensor, U: Tensor, chunk_size: int | None = None) -> Tensor:
    """``mean_k (J_b^T u_bk)**2`` for Gaussian cotangents ``U [K, B, m]``: ``[B, d]`` float32.

    Args:
        fn: ``[N, d] -> [N, m]``.
        x: ``[B, d]`` the linearisation point.
        U: ``[K, B, m]`` cotangents.
        chunk_size: probes per vmapped chunk (``None``: all at once).
    """
    _, pullback = vjp(fn, x)
    G = vmap(lambda u: pullback(u)[0], chunk_size=chunk_size)(U)  # [K, B, d]
    return (G * G).mean(dim=0)


def _gaussian(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device)


def fsinfo_diag_plain(
    fn: Fn, x: Tensor, m: int, sigma: float, num_probes: int, seed: int = 0,
    chunk_size: int | None = 64, squares: Callable[..., Tensor] = probe_squares,
) -> Tensor:
    """Plug-in FSInfo_diag from ``K`` Gaussian VJPs (biased low by about ``1/(2K)``).

    Args:
        fn: ``[N, d] -> [N, m]``.
        x: ``[B, d]``.
        m: output dimension.
        sigma: noise scale.
        num_probes: ``K``.
        seed: seed of the probes.
        chunk_size: probes per vmapped chunk.
        squares: the probe kernel (``torch.compile``-d by the compiled baseline).

    Returns:
        ``[B]`` float64 FSInfo_diag in nats/dim.
    """
    U = _gaussian((num_probes, x.shape[0], m), seed, x.device)
    s = squares(fn, x, U, chunk_size).double()
    return 0.5 * torch.log(s / sigma**2 + DIAG_FLOOR).mean(dim=1) - HALF_LOG_2PIE


def dfil_plain(
    fn: Fn, x: Tensor, m: int, sigma: float, num_probes: int, seed: int = 0,
    chunk_size: int | None = 64, squares: Callable[..., Tensor] = probe_squares,
) -> Tensor:
    """Hutchinson dFIL ``tr(J^T J)/(sigma^2 d)`` from ``K`` Gaussian VJPs (unbiased).

    Returns:
        ``[B]`` float64 dFIL (1/dim).
    """
    U = _gaussian((num_probes, x.shape[0], m), seed, x.device)
    s = squares(fn, x, U, chunk_size).double()
    return s.sum(dim=1) / (sigma**2 * x.shape[1])


def lanczos_tridiag(
    fn: Fn, x: Tensor, V0: Tensor, sigma: float, lam: float, steps: int,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain Lanczos on ``A = J^T J / sigma^2 + lam I`` for start vectors ``V0 [K, B, d]``.

    Returns:
        ``(alpha [K, B, steps], beta [K, B, steps - 1])``, the tridiagonal coefficients.
    """
    _, pullback = vjp(fn, x)

    def apply_a(v: Tensor) -> Tensor:  # [B, d] -> [B, d]
        jv = jvp(fn, (x,), (v,))[1]
        return pullback(jv)[0] / sigma**2 + lam * v

    A = vmap(apply_a, chunk_size=chunk_size)
    q_prev = torch.zeros_like(V0)
    q = V0 / V0.norm(dim=-1, keepdim=True)
    beta_prev = torch.zeros(V0.shape[:-1], dtype=V0.dtype, device=V0.device)
    alphas, betas = [], []
    for j in range(steps):
        w = A(q) - beta_prev.unsqueeze(-1) * q_prev
        alpha = (w * q).sum(-1)
        w = w - alpha.unsqueeze(-1) * q
        alphas.append(alpha)
        if j == steps - 1:
            break
        beta = w.norm(dim=-1).clamp_min(1e-30)
        betas.append(beta)
        q_prev, q, beta_prev = q, w / beta.unsqueeze(-1), beta
    return torch.stack(alphas, -1), torch.stack(betas, -1)


def fsinfo_logdet_slq_plain(
    fn: Fn, x: Tensor, sigma: float, prior_var: float, num_probes: int, seed: int = 0,
    steps: int = 30, chunk_size: int | None = None,
) -> Tensor:
    r"""FSInfo with a prior by stochastic Lanczos quadrature.

    :math:`\frac{1}{2d}\log\det(J^TJ/\sigma^2+\lambda I)-\frac12\log 2\pi e`,
    estimated with ``K`` Rademacher probes and ``steps`` Lanczos steps.

    Returns:
        ``[B]`` float64 nats/dim.
    """
    b, d = x.shape
    lam = 1.0 / prior_var
    g = torch.Generator(device=x.device).manual_seed(seed)
    V0 = torch.randint(0, 2, (num_probes, b, d), generator=g, device=x.device).to(x.dtype) * 2 - 1
    steps = min(steps, d)
    alpha, beta = lanczos_tridiag(fn, x, V0, sigma, lam, steps, chunk_size)
    T = torch.diag_embed(alpha.double()) + torch.diag_embed(beta.double(), 1) + torch.diag_embed(
        beta.double(), -1)
    theta, vecs = torch.linalg.eigh(T)  # [K, B, n], [K, B, n, n]
    tau2 = vecs[..., 0, :] ** 2
    quad = d * (tau2 * torch.log(theta.clamp_min(1e-300))).sum(-1)  # [K, B]: v^T log(A) v
    logdet = quad.mean(dim=0)
    return logdet / (2.0 * d) - HALF_LOG_2PIE
