r"""Test helpers: the one place for tolerances, Jacobians with prescribed spectra, exact values
from an explicit Jacobian, and a verbose comparator.

Used by the test suite and by anyone checking a new backend or estimator:

- :data:`TOL`: every tolerance the tests use, with the reason for its size.
- :func:`spectral_jacobian`: ``J = U diag(s) V^T`` with Haar-random orthogonal ``U``, ``V`` and
  prescribed singular values ``s`` (ill-conditioned, rank-deficient, ``m < d``, ``m > d``).
- :func:`exact_trace`, :func:`exact_fsinfo_diag`, :func:`exact_fsinfo_logdet`,
  :func:`exact_log_quadform`: float64 values computed from ``J`` directly (singular values by
  SVD, accurate to ``eps * s_max`` absolute, so even a condition number of ``1e6`` loses only
  ``1e-10`` relative on the smallest).
- :func:`assert_close_verbose`: like ``torch.testing.assert_close`` but reports how many entries
  differ, where, by how much, and NaN/inf mismatches.
- :func:`unbiasedness_z` and :func:`coverage`: the two statistical checks (tier C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .formulas import DIAG_FLOOR, as_sigma, fsinfo_from_spectrum

__all__ = [
    "TOL",
    "Tolerances",
    "assert_close_verbose",
    "coupled_columns_linear",
    "coverage",
    "exact_fsinfo_diag",
    "exact_fsinfo_logdet",
    "exact_log_quadform",
    "exact_trace",
    "geometric_spectrum",
    "random_orthogonal",
    "spectral_jacobian",
    "unbiasedness_z",
]


@dataclass(frozen=True)
class Tolerances:
    """Every tolerance of the test suite, in one place.

    Attributes:
        exact_rtol, exact_atol: deterministic float64 comparisons of the same computation done
            two ways (same probes): rounding only.
        quadrature_atol: Lanczos quadrature at order ``n`` against the dense ``v^T log(A) v``,
            relative to ``max(1, |value|)`` (float64 rounding amplified by the conditioning).
        float32_rtol: float32 products against float64 ones (same probes).
        z_unbiased: ``|mean - exact|`` must be below this many standard errors of the mean.
        coverage_low, coverage_high: range of the observed coverage of nominal 95% intervals.
        slq_coverage_low, slq_coverage_high: the same for the SLQ log det (tighter, see below).
        seeds: independent repetitions for the statistical checks (binomial standard error
            of an observed 95% coverage: 0.7%; the t-intervals of the trace estimators cover
            0.92-0.95 at ``K = 50`` on top-heavy spectra, so this keeps a margin of 3 SE).
        coverage_z: half-width of :func:`coverage_band` in binomial standard errors of a
            nominal 95% coverage: 2.9 gives ``[0.930, 0.970]`` at 1000 seeds, which rejects a
            Gaussian interval whose standard error is more than 7.5% too small or 10.7% too
            large (``value +- 1.96 c se`` covers 0.930 at ``c = 0.925`` and 0.970 at
            ``c = 1.107``) and fails an exact interval with probability 0.4%.
        same_sample_coverage_high: the top of the observed coverage of a trace's 95% interval
            at a fixed probe count (:class:`~fsinfo_fast.estimators.hutchinson.TraceHalfwidth`
            ``.same_sample``): calibrated to cover the most skewed per-probe law (one dominant
            direction) exactly, it over-covers less skewed ones by design (0.955-0.975 at
            ``K = 5..32`` on Gaussian per-probe values; 0.949-0.959 over 8000 runs on the
            Tier C spectra at ``K = 50``), so the band's top would fail it by chance; above this
            it would be grossly conservative. The lower end stays :func:`coverage_band`'s.
    """

    exact_rtol: float = 1e-10
    exact_atol: float = 1e-12
    quadrature_atol: float = 1e-8
    float32_rtol: float = 1e-4
    z_unbiased: float = 3.0
    coverage_low: float = 0.90
    coverage_high: float = 0.99
    seeds: int = 1000
    #: SLQ log det: coverage of its 95% interval over ``seeds`` runs within 3 binomial standard
    #: errors of 0.95 (``sqrt(0.95 * 0.05 / 1000) = 0.0069``): a normal interval built on a
    #: standard error 8% too small (coverage 0.93) or 11% too large (0.97) fails.
    slq_coverage_low: float = 0.93
    slq_coverage_high: float = 0.97
    coverage_z: float = 2.9
    same_sample_coverage_high: float = 0.985

    def coverage_band(self, seeds: int, nominal: float = 0.95) -> tuple[float, float]:
        """Range of the observed coverage of nominal intervals over ``seeds`` independent runs
        that the seed count justifies: ``nominal +- coverage_z sqrt(nominal (1 - nominal) /
        seeds)`` (``[0.930, 0.970]`` at 1000 seeds, ``[0.924, 0.976]`` at 600).

        Example:
            >>> [round(v, 3) for v in TOL.coverage_band(1000)]
            [0.93, 0.97]
        """
        half = self.coverage_z * math.sqrt(nominal * (1.0 - nominal) / seeds)
        return nominal - half, nominal + half


#: The tolerances the tests use.
TOL = Tolerances()


def random_orthogonal(n: int, *, generator: torch.Generator, dtype=torch.float64) -> Tensor:
    """Haar-random ``n x n`` orthogonal matrix (QR of a Gaussian matrix with the sign fix)."""
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return (Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, 1.0)).to(dtype)


def geometric_spectrum(n: int, cond: float, *, top: float = 1.0) -> Tensor:
    """``n`` singular values from ``top`` down to ``top / cond``, evenly spaced in log."""
    if n == 1:
        return torch.tensor([top], dtype=torch.float64)
    return top * torch.logspace(0.0, -math.log10(cond), n, dtype=torch.float64)


def spectral_jacobian(
    singular_values: Sequence[float] | Tensor,
    m: int,
    d: int,
    *,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""``[batch, m, d]`` Jacobian ``J = U diag(s) V^T`` with prescribed singular values.

    Args:
        singular_values: ``r <= min(m, d)`` values ``s`` (zeros allowed: rank-deficient).
        m, d: output and input dimensions.
        batch: copies of the same ``J`` (used as independent samples: each sample gets its own
            probes, so a batch of ``B`` copies gives ``B`` independent estimates in one call).
        seed: seed of ``U`` and ``V``.
        dtype: result dtype (built in float64).

    Example:
        >>> J = spectral_jacobian([3.0, 1.0], m=4, d=3, batch=2)
        >>> J.shape, torch.linalg.svdvals(J[0])[:2].round(decimals=12).tolist()
        (torch.Size([2, 4, 3]), [3.0, 1.0])
    """
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    r = s.shape[0]
    if r > min(m, d):
        raise ValueError(f"{r} singular values but min(m, d) = {min(m, d)}")
    g = torch.Generator().manual_seed(seed)
    U = random_orthogonal(m, generator=g)[:, :r]
    V = random_orthogonal(d, generator=g)[:, :r]
    J = (U * s) @ V.T
    return J.expand(batch, m, d).contiguous().to(dtype)


def coupled_columns_linear(k: int, rest: float, d: int = 300, *, seed: int = 0) -> torch.nn.Linear:
    """``Linear(d, d, bias=False)`` (float32, eval) whose first ``k`` columns are one unit
    vector (drawn from ``seed``) and whose others are a diagonal of ``rest``: a Rademacher
    probe sees the ``k`` coupled columns through ``2^(k-1)`` sign patterns only (3 columns: 4
    atoms, one of probability 1/4) and the diagonal exactly. Its exact ``tr(J^T J)`` is
    ``(weight.double() ** 2).sum()``.

    Example:
        >>> enc = coupled_columns_linear(3, 0.1, d=6)
        >>> w = enc.weight.detach()
        >>> bool((w[:, 0] == w[:, 2]).all()), float(w[4, 4])
        (True, 0.10000000149011612)
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    J = torch.zeros(d, d, dtype=torch.float64)
    J[:, :k] = (a / a.norm())[:, None]
    J[torch.arange(k, d), torch.arange(k, d)] = rest
    enc = torch.nn.Linear(d, d, bias=False).eval()
    with torch.no_grad():
        enc.weight.copy_(J.float())
    return enc


def exact_trace(J: Tensor, sigma: float | Tensor | None = None) -> Tensor:
    """``[B]`` ``tr(J^T J)``, or dFIL ``tr(J^T J)/(sigma^2 d)`` when ``sigma`` is given."""
    J = J.to(torch.float64)
    t = (J**2).sum(dim=(1, 2))
    if sigma is None:
        return t
    return t / (as_sigma(sigma, J.shape[0]) ** 2 * J.shape[2])


def exact_fsinfo_diag(J: Tensor, sigma: float | Tensor, floor: float = DIAG_FLOOR) -> Tensor:
    """``[B]`` exact FSInfo_diag (nats/dim) from ``J``'s squared column norms, with the
    library's default ``floor`` (``1e-10``, the paper's: the default of ``ff.fsinfo``; it was
    0 here, so a user's check against ``ff.fsinfo`` failed by ~1e-9, or read ``-inf`` at a
    zero column)."""
    J = J.to(torch.float64)
    return fsinfo_from_spectrum((J**2).sum(dim=1), J.shape[2], sigma, floor)


def _gram_eigvals(s: Tensor, m: int, d: int) -> Tensor:
    """``s^2`` with numerically zero values (``<= max * max(m, d) * eps``, the oracle's rule)
    set to 0."""
    mu = s**2
    tol = mu.amax(dim=-1, keepdim=True) * max(m, d) * torch.finfo(torch.float64).eps
    return torch.where(mu <= tol, torch.zeros_like(mu), mu)


def exact_fsinfo_logdet(J: Tensor, sigma: float | Tensor, prior_var: float | None = None) -> Tensor:
    """``[B]`` exact log-det FSInfo (nats/dim) from ``J``'s singular values (SVD)."""
    J = J.to(torch.float64)
    _, m, d = J.shape
    lam = 0.0 if prior_var is None else 1.0 / prior_var
    return fsinfo_from_spectrum(_gram_eigvals(torch.linalg.svdvals(J), m, d), d, sigma, lam)


def exact_log_quadform(
    J: Tensor,
    V: Tensor,
    sigma: float | Tensor,
    prior_var: float | None = None,
    side: str = "input",
) -> Tensor:
    r"""``[B, K]`` exact ``v^T log(A) v`` for ``A = F^T F / sigma^2 + lambda I`` (``F = J`` on
    the input side, ``J^T`` on the output side), from the full SVD of ``J``."""
    J = J.to(torch.float64)
    b, m, d = J.shape
    lam = 0.0 if prior_var is None else 1.0 / prior_var
    P, s, Rh = torch.linalg.svd(J, full_matrices=True)
    basis = Rh if side == "input" else P.transpose(1, 2)  # rows: eigenvectors of A
    n = basis.shape[1]
    mu = torch.zeros(b, n, dtype=torch.float64)
    mu[:, : s.shape[1]] = _gram_eigvals(s, m, d)
    sig2 = as_sigma(sigma, b) ** 2
    logs = torch.log(mu / sig2[:, None] + lam)
    coef = torch.einsum("bin,bkn->bki", basis, V.to(torch.float64)) ** 2
    return (coef * logs[:, None, :]).sum(dim=2)


def unbiasedness_z(estimates: Tensor, exact: Tensor | float) -> float:
    """``(mean - exact) / (std / sqrt(N))`` over ``N`` independent estimates."""
    est = estimates.detach().to(torch.float64)
    n = est.shape[0]
    exact = torch.as_tensor(exact, dtype=torch.float64).detach()
    return float((est.mean() - exact) / (est.std(correction=1) / math.sqrt(n)))


def coverage(value: Tensor, halfwidth: Tensor, exact: Tensor | float) -> float:
    """Fraction of intervals ``value +- halfwidth`` that contain ``exact``."""
    exact = torch.as_tensor(exact, dtype=torch.float64).detach()
    return float(((value.detach() - exact).abs() <= halfwidth).to(torch.float64).mean())


def assert_close_verbose(
    actual: Tensor,
    expected: Tensor,
    *,
    rtol: float = TOL.exact_rtol,
    atol: float = TOL.exact_atol,
    name: str = "value",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol |expected|`` elementwise, verbosely.

    Infinities must match exactly (same sign, same place); NaN never matches. On failure the
    message says how many entries differ, the worst ones (index, both values, error), and any
    NaN/inf mismatch.

    Example:
        >>> assert_close_verbose(torch.tensor([1.0, math.inf]), torch.tensor([1.0, math.inf]))
    """
    a = torch.as_tensor(actual).to(torch.float64).cpu()
    e = torch.as_tensor(expected).to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & ~(a == e)
    both_finite = torch.isfinite(a) & torch.isfinite(e)
    err = torch.where(both_finite, (a - e).abs(), torch.zeros_like(a))
    bad_num = both_finite & (err > atol + rtol * e.abs())
    bad = bad_num | nan_a | nan_e | inf_mismatch
    if not bool(bad.any()):
        return
    lines = [
        f"{name}: {int(bad.sum())} of {a.numel()} entries differ (rtol={rtol:g}, atol={atol:g})"
    ]
    if bool((nan_a | nan_e).any()):
        lines.append(
            f"  NaN in actual at {nan_a.nonzero().tolist()[:5]}, "
            f"in expected at {nan_e.nonzero().tolist()[:5]}"
        )
    if bool(inf_mismatch.any()):
        idx = inf_mismatch.nonzero().tolist()[:5]
        lines.append(
            f"  inf mismatch at {idx}: actual {[a[tuple(i)].item() for i in idx]}, "
            f"expected {[e[tuple(i)].item() for i in idx]}"
        )
    if bool(bad_num.any()):
        rel = err / e.abs().clamp_min(1e-300)
        order = torch.argsort(
            torch.where(bad_num, err, torch.zeros_like(err)).flatten(), descending=True
        )[:5]
        for flat in order.tolist():
            i = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), a.shape))
            if not bool(bad_num[i]):
                continue
            lines.append(
                f"  at {list(i)}: actual {a[i].item():.17g}, expected "
                f"{e[i].item():.17g}, abs err {err[i].item():.3g}, "
                f"rel err {rel[i].item():.3g}"
            )
        lines.append(f"  max abs err {err.max().item():.3g}")
    raise AssertionError("\n".join(lines))
