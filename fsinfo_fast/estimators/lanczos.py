r"""Log-determinant by stochastic Lanczos quadrature (SLQ), for the log-det FSInfo.

Target (``lambda = 1/prior_var``, 0 without a prior):

.. math::

    \log\det\Big(\frac{J^TJ}{\sigma^2} + \lambda I_d\Big)
      = (d - n)\log\lambda + \mathrm{tr}\,\log A ,\qquad
    A = \frac{F^T F}{\sigma^2} + \lambda I_n,

on the smaller side: ``F = J`` (``n = d``, input side) when ``m >= d``, else ``F = J^T``
(``n = m``, output side, ``A = J J^T/sigma^2 + lambda I_m``). With ``m < d`` and ``lambda = 0``
the log det is ``-inf`` exactly; it is returned as such (flagged ``singular``), with no products.

``tr log A`` is estimated by Hutchinson's estimator with Gauss quadrature for each quadratic form
(Ubaru, Chen and Saad 2017, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
SIAM J. Matrix Anal. Appl.): ``k`` Lanczos steps from ``v / ||v||`` give a tridiagonal
``T_k = Y diag(theta) Y^T`` and

.. math:: v^T \log(A)\, v \approx \|v\|^2 \sum_{i=1}^k Y_{1i}^2 \log\theta_i ,

exact once ``k`` reaches the degree of ``v``'s minimal polynomial (at the latest ``k = n``). The
Lanczos vectors are fully re-orthogonalised (classical Gram-Schmidt, twice), all arithmetic is
float64, and the tridiagonal eigenproblems are solved batched with ``eigh``. A breakdown
(``beta ~ 0``: an invariant subspace was found) ends that probe's recursion, and its quadrature
is then exact.

``method="golub_kahan"`` runs Golub-Kahan bidiagonalisation on ``F`` instead (the same Krylov
space and cost, ``T_k = B_k^T B_k``) and takes the nodes from the SVD of the bidiagonal
``B_k``: the singular values of ``J`` are then resolved to relative accuracy ``eps cond(J)``
instead of ``eps cond(J)^2``, which matters for ill-conditioned Jacobians without a prior. It
stores the basis of both sides (``n`` and ``max(m, d)`` long), Lanczos only the ``n``-side one.

Without a prior, a singular ``A`` (rank-deficient ``J`` with ``m >= d``) is detected when a
probe's Krylov space reaches the null space (a Ritz value, or singular value of ``B_k``, below
the oracle's numerical-rank threshold ``max(m, d) eps``), at the latest at ``order = n``; the
value is then ``-inf``. With a truncated order the estimate for a (nearly) singular ``A`` is a
large negative number whose quadrature bias the interval does not cover: give a prior, or use
``order = n``.

Each Lanczos step costs one JVP and one VJP per probe. The interval is the Student-t interval over
iid probes (``K - 1`` dof); it covers Monte-Carlo error only, not the quadrature error of a
truncated order (negligible for a well-conditioned ``A``, zero at ``order = n``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..engine.ops import Ops, TorchOps
from ..errors import InvalidInputError
from ..formulas import HALF_LOG_2PIE
from .base import (
    Estimate,
    Products,
    check_finite,
    detached,
    ops_for,
    prior_precision,
    sample_ids_for,
    sigma_for,
)
from .hutchinson import mean_and_stderr
from .probes import PROBE_KINDS, draw_probes, resolve_seed
from .stopping import StoppingRule, run_rounds

__all__ = [
    "METHODS",
    "lanczos_tridiagonal",
    "golub_kahan_bidiagonal",
    "slq_quadrature",
    "slq_logdet",
]

#: Krylov methods for the quadrature.
METHODS = ("lanczos", "golub_kahan")


def _breakdown_tol(n: int, dtype: torch.dtype) -> float:
    """Relative size below which a new Krylov direction is rounding noise.

    After full reorthogonalisation the residual of an exactly invariant subspace is a modest
    multiple of ``eps * ||A||`` (observed ``~1e-14`` relative in float64 for ``n`` of a few
    tens); stopping at a small but genuine ``beta`` only drops a block coupled by ``beta``.
    """
    return 1000.0 * math.sqrt(n) * torch.finfo(dtype).eps


def _rank_tol(m: int, d: int, dtype: torch.dtype) -> float:
    """Relative threshold for a zero eigenvalue of ``J^T J``: ``max(m, d) * eps``, the oracle's
    numerical-rank rule (:func:`fsinfo_fast.reference.eigvals_from_jacobian`)."""
    return max(m, d) * torch.finfo(dtype).eps


def _reorth(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``w [B, K, n]`` its components on the rows of ``basis [B, K, j, n]`` (CGS2)."""
    if basis.shape[2] == 0:
        return w
    for _ in range(2):
        h = torch.einsum("bkjn,bkn->bkj", basis, w)
        w = w - torch.einsum("bkjn,bkj->bkn", basis, h)
    return w


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor], V: Tensor, order: int, *, tol: float,
    ops: Ops | None = None,
) -> tuple[Tensor, Tensor, int]:
    r"""Lanczos with full reorthogonalisation, batched over ``[B, K]`` start vectors.

    Args:
        matvec: ``[B, K, n] -> [B, K, n]`` float64, the symmetric operator ``A``.
        V: ``[B, K, n]`` float64 start vectors (need not be normalised; zero vectors are not
            allowed).
        order: Lanczos steps ``k`` (``<= n``).
        tol: a step whose new direction has norm ``<= tol * ||T||`` (running estimate) breaks
            down: the Krylov space is invariant and that probe's recursion stops.

    Returns:
        ``(alpha [B, K, k], beta [B, K, k-1], steps)``: the tridiagonal ``T_k`` (diagonal and
        off-diagonal) and the number of ``matvec`` calls. After a breakdown the remaining
        diagonal entries are padded with the probe's norm estimate and the off-diagonal with 0,
        a decoupled block whose eigenvectors carry no weight on ``e_1``.

    ``ops`` (default: the PyTorch reference) runs each step's fused dot product, three-term
    update, reorthogonalisation and norm (:meth:`~fsinfo_fast.engine.ops.Ops.lanczos_step`).
    """
    ops = ops if ops is not None else TorchOps()
    b, kk, n = V.shape
    alpha = torch.zeros(b, kk, order, dtype=torch.float64, device=V.device)
    beta = torch.zeros(b, kk, max(order - 1, 0), dtype=torch.float64, device=V.device)
    basis = torch.zeros(b, kk, order, n, dtype=torch.float64, device=V.device)
    q = V / torch.linalg.vector_norm(V, dim=2, keepdim=True)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(b, kk, 1, dtype=torch.float64, device=V.device)
    active = torch.ones(b, kk, dtype=torch.bool, device=V.device)
    scale = torch.zeros(b, kk, dtype=torch.float64, device=V.device)
    pad = torch.ones(b, kk, dtype=torch.float64, device=V.device)
    steps = 0
    for i in range(order):
        basis[:, :, i] = q
        w = matvec(q)
        steps += 1
        if i == order - 1:
            a = (q * w).sum(dim=2)
        else:
            # alpha, w - alpha q - beta q_prev, CGS2 against the basis, ||w||: one fused step
            a, w, bn = ops.lanczos_step(
                w.reshape(b * kk, n), q.reshape(b * kk, n), q_prev.reshape(b * kk, n),
                b_prev.reshape(b * kk), basis.view(b * kk, order, n)[:, : i + 1],
            )
            a, w, bn = a.view(b, kk), w.view(b, kk, n), bn.view(b, kk)
        scale = torch.maximum(scale, a.abs())
        alpha[:, :, i] = torch.where(active, a, pad)
        if i == order - 1:
            break
        scale = torch.maximum(scale, bn)
        active = active & (bn > tol * scale)
        pad = torch.where(active, pad, scale.clamp_min(torch.finfo(torch.float64).tiny))
        bn = torch.where(active, bn, torch.zeros_like(bn))
        beta[:, :, i] = bn
        q_prev = q
        q = torch.where(active[..., None], w / torch.where(active, bn, 1.0)[..., None], 0.0)
        b_prev = bn[..., None]
        if not bool(active.any()):
            alpha[:, :, i + 1 :] = pad[..., None]
            break
    return alpha, beta, steps


def golub_kahan_bidiagonal(
    fwd: Callable[[Tensor], Tensor],
    bwd: Callable[[Tensor], Tensor],
    V: Tensor,
    order: int,
    *,
    tol: float,
) -> tuple[Tensor, Tensor, Tensor, int]:
    r"""Golub-Kahan bidiagonalisation of ``F`` from the right start vectors ``V``.

    ``F V_k = U_k B_k`` with ``B_k`` upper bidiagonal (diagonal ``alpha``, super-diagonal
    ``beta``), so ``V_k^T F^T F V_k = B_k^T B_k`` is the Lanczos tridiagonal of ``F^T F``. Both
    bases are fully reorthogonalised.

    Args:
        fwd: ``[B, K, n] -> [B, K, p]`` float64, ``F``.
        bwd: ``[B, K, p] -> [B, K, n]`` float64, ``F^T``.
        V: ``[B, K, n]`` float64 start vectors.
        order: steps ``k``.
        tol: relative breakdown threshold.

    Returns:
        ``(alpha [B, K, k], beta [B, K, k-1], null [B, K] bool, steps)``. ``null`` marks probes
        whose recursion ended with ``alpha = 0``: the Krylov space holds a null vector of ``F``
        (a zero singular value). ``steps`` counts ``fwd`` calls (each followed by at most one
        ``bwd``). Padding after a breakdown as in :func:`lanczos_tridiagonal`.
    """
    b, kk, n = V.shape
    dev = V.device
    alpha = torch.zeros(b, kk, order, dtype=torch.float64, device=dev)
    beta = torch.zeros(b, kk, max(order - 1, 0), dtype=torch.float64, device=dev)
    vbasis = torch.zeros(b, kk, order, n, dtype=torch.float64, device=dev)
    ubasis: Tensor | None = None
    v = V / torch.linalg.vector_norm(V, dim=2, keepdim=True)
    u_prev: Tensor | None = None
    b_prev = torch.zeros(b, kk, 1, dtype=torch.float64, device=dev)
    active = torch.ones(b, kk, dtype=torch.bool, device=dev)
    null = torch.zeros(b, kk, dtype=torch.bool, device=dev)
    scale = torch.zeros(b, kk, dtype=torch.float64, device=dev)
    pad = torch.ones(b, kk, dtype=torch.float64, device=dev)
    steps = 0
    for i in range(order):
        vbasis[:, :, i] = v
        p = fwd(v)
        steps += 1
        if ubasis is None:
            ubasis = torch.zeros(b, kk, order, p.shape[2], dtype=torch.float64, device=dev)
        if u_prev is not None:
            p = p - b_prev * u_prev
        p = _reorth(p, ubasis[:, :, :i])
        a = torch.linalg.vector_norm(p, dim=2)
        scale = torch.maximum(scale, a)
        zero_a = active & (a <= tol * scale)
        null |= zero_a
        stop = zero_a.clone()
        alpha[:, :, i] = torch.where(active, torch.where(zero_a, 0.0, a), pad)
        active = active & ~zero_a
        pad = torch.where(active, pad, scale.clamp_min(torch.finfo(torch.float64).tiny))
        u = torch.where(active[..., None], p / torch.where(active, a, 1.0)[..., None], 0.0)
        ubasis[:, :, i] = u
        if i == order - 1 or not bool(active.any()):
            alpha[:, :, i + 1 :] = pad[..., None]
            break
        r = bwd(u) - a[..., None] * v
        r = _reorth(r, vbasis[:, :, : i + 1])
        bn = torch.linalg.vector_norm(r, dim=2)
        scale = torch.maximum(scale, bn)
        brk = active & (bn <= tol * scale)
        stop |= brk
        active = active & ~brk
        pad = torch.where(active, pad, scale.clamp_min(torch.finfo(torch.float64).tiny))
        bn = torch.where(active, bn, torch.zeros_like(bn))
        beta[:, :, i] = bn
        v = torch.where(active[..., None], r / torch.where(active, bn, 1.0)[..., None], 0.0)
        u_prev, b_prev = u, bn[..., None]
        if not bool(active.any()):
            alpha[:, :, i + 1 :] = pad[..., None]
            break
    return alpha, beta, null, steps


def _resolve_side(products: Products, side: str) -> str:
    if side == "auto":
        return "output" if products.m < products.d else "input"
    if side not in ("input", "output"):
        raise InvalidInputError(f"side must be 'auto', 'input' or 'output', got {side!r}")
    return side


def _check_order(order: object) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise InvalidInputError(f"order (Lanczos steps) must be an int >= 1, got {order!r}")
    return order


def slq_quadrature(
    products: Products,
    V: Tensor,
    *,
    sigma: float | Tensor,
    prior_var: float | None = None,
    order: int = 30,
    side: str = "auto",
    method: str = "lanczos",
    sample_ids: Tensor | None = None,
    probe_start: int = 0,
) -> tuple[Tensor, Tensor, int]:
    r"""Per-probe Gauss quadrature ``v^T log(A) v`` for given probes.

    Args:
        products: batched Jacobian products.
        V: ``[B, K, n]`` probes on the chosen side (``n = d`` input, ``n = m`` output); any
            non-zero vectors.
        sigma: noise scale (float or ``[B]``).
        prior_var: prior variance (``lambda = 1/prior_var``; None for 0).
        order: Krylov steps, capped at ``n`` (exact for any probe at ``n``).
        side: ``"auto"`` (smaller side), ``"input"`` or ``"output"``.
        method: ``"lanczos"`` or ``"golub_kahan"``.
        sample_ids, probe_start: global sample ids and index of ``V[:, 0]``, for error messages.

    Returns:
        ``(q [B, K], singular [B, K], passes)``: the quadrature values (``-inf`` where
        ``lambda = 0`` and the probe found ``A`` singular), the singular flags, and the Jacobian
        products used per sample.
    """
    products = detached(products)
    side = _resolve_side(products, side)
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {METHODS}, got {method!r}")
    order = _check_order(order)
    lam = prior_precision(prior_var)
    sig = sigma_for(products, sigma)
    n = products.d if side == "input" else products.m
    if V.ndim != 3 or V.shape[0] != products.batch or V.shape[2] != n:
        raise InvalidInputError(
            f"V must have shape [B, K, n] = [{products.batch}, K, {n}] ({side} side), got "
            f"{tuple(V.shape)}"
        )
    k = min(order, n)
    V = V.to(torch.float64)
    vnorm2 = (V**2).sum(dim=2)
    if not bool((vnorm2 > 0).all()):
        raise InvalidInputError("probes must be non-zero vectors")
    tol = _breakdown_tol(n, products.dtype)
    rank_tol = _rank_tol(products.m, products.d, products.dtype)
    dt = products.dtype
    ids = sample_ids_for(products, sample_ids)
    s2 = (sig**2)[:, None, None]
    what = f"SLQ ({method}, {side} side) Krylov product"
    passes = 0

    def fwd(X: Tensor) -> Tensor:
        nonlocal passes
        out = products.jvp(X.to(dt)) if side == "input" else products.vjp(X.to(dt))
        passes += X.shape[1]
        check_finite(out, ids, probe_start, what)
        return out.to(torch.float64)

    def bwd(Y: Tensor) -> Tensor:
        nonlocal passes
        out = products.vjp(Y.to(dt)) if side == "input" else products.jvp(Y.to(dt))
        passes += Y.shape[1]
        check_finite(out, ids, probe_start, what)
        return out.to(torch.float64)

    if method == "lanczos":
        ops = ops_for(products)
        alpha, beta, _ = lanczos_tridiagonal(
            lambda X: bwd(fwd(X)) / s2 + lam * X, V, k, tol=tol, ops=ops
        )
        bb, kk = alpha.shape[:2]
        theta, w = ops.tridiag_eigh(alpha.reshape(bb * kk, k), beta.reshape(bb * kk, k - 1))
        theta, w = theta.view(bb, kk, k), w.view(bb, kk, k)
        nodes = theta.clamp_min(0.0)
        # numerically zero eigenvalues of A (matter only with lambda = 0)
        zero = (theta <= theta.abs().amax(dim=2, keepdim=True) * rank_tol).any(dim=2)
    else:
        alpha, beta, null, _ = golub_kahan_bidiagonal(fwd, bwd, V, k, tol=tol)
        Bk = torch.diag_embed(alpha) + torch.diag_embed(beta, 1)
        _, sv, Vh = torch.linalg.svd(Bk)
        w = Vh[..., :, 0] ** 2
        nodes = sv**2 / s2 + lam
        zero = null | (sv**2 <= sv.amax(dim=2, keepdim=True) ** 2 * rank_tol).any(dim=2)
    f = torch.log(torch.where(nodes > 0, nodes, torch.ones_like(nodes)))
    q = vnorm2 * (w * f).sum(dim=2)
    singular = zero if lam == 0.0 else torch.zeros_like(zero)
    q = torch.where(singular, torch.full_like(q, -math.inf), q)
    return q, singular, passes


def slq_logdet(
    products: Products,
    *,
    sigma: float | Tensor,
    prior_var: float | None = None,
    order: int = 30,
    method: str = "lanczos",
    side: str = "auto",
    kind: str = "rademacher",
    seed: int | torch.Generator = 0,
    sample_ids: Tensor | None = None,
    num_probes: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    min_probes: int = 10,
    max_probes: int = 1000,
    round_size: int = 10,
    confidence: float = 0.95,
    probe_chunk: int | None = None,
) -> Estimate:
    r"""Log-det FSInfo per sample by stochastic Lanczos quadrature.

    .. math::

        \mathrm{FSInfo}(x) = \frac{1}{2d}\log\det\Big(\frac{J^TJ}{\sigma^2} + \lambda I_d\Big)
        - \frac12\log(2\pi e)

    Args:
        products: batched Jacobian products.
        sigma: noise scale, float or ``[B]``.
        prior_var: prior variance per input dimension (``lambda = 1/prior_var``); None for the
            definition without a prior (then ``-inf`` whenever ``J^T J`` is singular, always
            when ``m < d``).
        order: Lanczos steps per probe (capped at ``n = min(m, d)``; exact at ``n``).
        method: ``"lanczos"`` (default; stores one ``n``-side basis) or ``"golub_kahan"``
            (better for ill-conditioned ``J`` without a prior; stores both sides' bases).
        side: ``"auto"`` (the smaller side), ``"input"`` or ``"output"``.
        kind: ``"rademacher"`` (default, lower variance) or ``"gaussian"`` probes.
        seed, sample_ids: probe seed and ``[B]`` global ids.
        num_probes, atol, rtol, min_probes, max_probes, round_size, confidence: see
            :class:`~fsinfo_fast.estimators.StoppingRule` (``atol`` in nats per dimension).
        probe_chunk: run the Lanczos recursion for at most this many probes at once (default:
            a whole round). Bounds the float64 Krylov basis, ``[B, chunk, order, n]``, at the
            price of smaller product batches; the result does not depend on it.

    Returns:
        :class:`~fsinfo_fast.estimators.Estimate` on the FSInfo scale (nats per input dimension),
        ``singular`` marking ``-inf`` values (``stderr`` 0 there); ``passes = 2 k K``.

    Example:
        >>> from fsinfo_fast.engine.dense import DenseProducts
        >>> J = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))[None]
        >>> est = slq_logdet(DenseProducts(J), sigma=1.0, order=3, num_probes=4)
        >>> round(float(est.value[0]), 12) == round(-0.5 * math.log(2 * math.pi * math.e), 12)
        True
    """
    products = detached(products)
    side = _resolve_side(products, side)
    if kind not in PROBE_KINDS:
        raise InvalidInputError(f"kind must be one of {PROBE_KINDS}, got {kind!r}")
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {METHODS}, got {method!r}")
    order = _check_order(order)
    if probe_chunk is not None and (
        isinstance(probe_chunk, bool) or not isinstance(probe_chunk, int) or probe_chunk < 1
    ):
        raise InvalidInputError(f"probe_chunk must be an int >= 1 or None, got {probe_chunk!r}")
    rule = StoppingRule(
        num_probes=num_probes,
        atol=atol,
        rtol=rtol,
        min_probes=min_probes,
        max_probes=max_probes,
        round_size=round_size,
        confidence=confidence,
    )
    lam = prior_precision(prior_var)
    sig = sigma_for(products, sigma)
    seed = resolve_seed(seed)
    ids = sample_ids_for(products, sample_ids)
    b, d, m, dev = products.batch, products.d, products.m, products.device
    n = d if side == "input" else m
    k = min(order, n)
    info = {
        "method": f"slq_{method}",
        "quantity": "fsinfo_logdet",
        "order": k,
        "side": side,
        "kind": kind,
        "seed": seed,
        "prior_var": prior_var,
        "confidence": confidence,
        "se_method": "sample std over probes / sqrt(K)",
    }
    if lam == 0.0 and n < d:
        # rank(J^T J) <= m < d: log det = -inf exactly, no products needed
        inf = torch.full((b,), -math.inf, dtype=torch.float64, device=dev)
        zeros = torch.zeros(b, dtype=torch.float64, device=dev)
        return Estimate(
            value=inf,
            stderr=zeros,
            ci_halfwidth=zeros.clone(),
            num_probes=0,
            passes=0,
            converged=torch.ones(b, dtype=torch.bool, device=dev),
            probes_per_sample=torch.zeros(b, dtype=torch.int64, device=dev),
            singular=torch.ones(b, dtype=torch.bool, device=dev),
            info={**info, "reason": f"m = {m} < d = {d} and no prior: J^T J is singular"},
        )
    extra = (d - n) * math.log(lam) if n < d else 0.0
    chunks: list[Tensor] = []
    singular = torch.zeros(b, dtype=torch.bool, device=dev)
    passes = 0

    def process(start: int, count: int) -> None:
        nonlocal singular, passes
        V = draw_probes(
            n,
            seed=seed,
            sample_ids=ids,
            start=start,
            count=count,
            kind=kind,
            dtype=torch.float64,
            device=dev,
        )
        step = probe_chunk or count
        qs, sings = [], []
        for c0 in range(0, count, step):
            q, sing, p = slq_quadrature(
                products,
                V[:, c0 : c0 + step],
                sigma=sig,
                prior_var=prior_var,
                order=k,
                side=side,
                method=method,
                sample_ids=ids,
                probe_start=start + c0,
            )
            passes += p
            qs.append(q)
            sings.append(sing)
        q, sing = torch.cat(qs, dim=1), torch.cat(sings, dim=1)
        singular = singular | sing.any(dim=1)
        chunks.append(torch.where(sing, torch.zeros_like(q), q))

    def summarize():
        mean, se = mean_and_stderr(torch.cat(chunks, dim=1))
        value = (mean + extra) / (2 * d) - HALF_LOG_2PIE
        value = torch.where(singular, torch.full_like(value, -math.inf), value)
        se = torch.where(singular, torch.zeros_like(se), se / (2 * d))
        return {"value": (value, se, sum(c.shape[1] for c in chunks) - 1)}

    frozen, converged, probes, drawn = run_rounds(
        rule,
        batch=b,
        device=dev,
        process=process,
        summarize=summarize,
        targets={"value": rule.targets},
    )
    f = frozen["value"]
    return Estimate(
        value=f.value,
        stderr=f.stderr,
        ci_halfwidth=f.ci_halfwidth,
        num_probes=drawn,
        passes=passes,
        converged=converged,
        probes_per_sample=probes,
        singular=~torch.isfinite(f.value),
        info={**info, "dof": f.dof},
    )
