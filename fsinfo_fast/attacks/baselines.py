r"""Baseline leakage metrics of the paper's comparison: distance correlation and a k-NN (Kraskov)
mutual-information estimate between the inputs ``x`` and the smashed data ``z``.

Both are *set-level* statistics of ``n`` paired samples (not per sample like FSInfo and dFIL).

**Distance correlation** (Szekely, Rizzo and Bakirov 2007), exact and ``O(n^2)`` (its default
jackknife interval: ``O(n^3)``): with the
double-centred Euclidean distance matrices ``A`` of ``x`` and ``B`` of ``z``,

.. math::

    \mathrm{dCov}^2 = \frac{1}{n^2}\sum_{ij} A_{ij}B_{ij},\qquad
    \mathrm{dCor} = \frac{\mathrm{dCov}(x,z)}{\sqrt{\mathrm{dCov}(x,x)\,\mathrm{dCov}(z,z)}}
    \in [0, 1]

(the V-statistic, what ``dcor.distance_correlation`` returns; 1 for ``z = a x + b`` with a
scalar ``a`` or an orthogonal map, 0 in population only for independent ``x, z``; its
finite-sample value is positive even then, of order ``n^{-1/2}`` and larger in high
dimension). The standard error is the leave-one-out jackknife.

**KSG mutual information** (Kraskov, Stoegbauer and Grassberger 2004, estimator 1), in nats:

.. math::

    \hat I(x; z) = \psi(k) + \psi(n) - \langle \psi(n_x + 1) + \psi(n_z + 1) \rangle

where ``eps_i`` is the distance from sample ``i`` to its ``k``-th nearest neighbour in the joint
space under the max-norm ``max(||x_i - x_j|| / s_x, ||z_i - z_j|| / s_z)`` (Euclidean norms
within each space), and ``n_x(i)``, ``n_z(i)`` count the other samples strictly closer than
``eps_i`` in each marginal space. Neighbours come from scikit-learn's ``NearestNeighbors`` on
precomputed SciPy distance matrices. The standard error is that of the mean of the per-sample
terms.

*Common scale.* The max-norm compares a distance in ``x`` with one in ``z``, so the two spaces
must be on a common scale first: unscaled, ``z = 10 x`` made every joint neighbourhood a ``z``
neighbourhood and gave ``I(x; 10 x) = 0`` where ``I(x; x)`` reached the ceiling. Each space is
divided by its typical ``k``-nearest-neighbour distance ``s`` (the median over samples of the
distance to the ``k``-th nearest sample at a positive distance; 1 for a space whose samples all
coincide). The KSG estimate is invariant to any invertible map of each space in population, and
this choice keeps the finite-sample estimate invariant to a scale factor and a rotation (any
isometry) of either space. The neighbour radius is what the estimator compares, so matching the
typical ``k``-NN radius balances the two spaces where they matter; a global RMS would not in high
dimension, where the ratio of the ``k``-NN distance to the spread differs between spaces of
different intrinsic dimension. Per-coordinate standardisation (scikit-learn's scalar
``mutual_info_regression``) would break the rotation invariance.

*Ties* (repeated samples, quantised data). Distances within a relative ``1e-6`` of ``eps_i``
count as equal to it (so a rescaled copy's rounding does not decide a count). Ties in the joint
distance are broken by neighbour rank: the ``k - 1`` joint neighbours ranked before the ``k``-th
count as strictly closer in both marginals, so ``n_x, n_z >= k - 1``. Where ``eps_i = 0`` (at
least ``k`` exact copies of sample ``i`` in the joint space) the term is that of Gao, Kannan, Oh
and Viswanath (2017, the mixed discrete-continuous KSG): ``psi(k_i) + psi(n) - psi(n_x + 1) -
psi(n_z + 1)`` with ``k_i`` the number of joint copies and ``n_x, n_z`` the copies in each space.
Every term is finite and at most ``psi(n) - psi(k)``.

Honest limits at these dimensions (``d = 3072`` pixels, ``m`` up to ``65536`` features, ``n`` of
a few hundred samples): the estimator's consistency is asymptotic in ``n`` at fixed dimension.
Here it is strongly biased (towards 0 for dependent variables of high intrinsic dimension)
and it can never exceed about ``psi(n) - psi(k)`` (``log(n/k)``) nats, however much
information ``z`` carries; for a deterministic or nearly noiseless ``f`` the true value is
infinite or huge. Read it as a rank statistic of how well ``z``'s neighbourhoods preserve
``x``'s, not as nats of leakage. ``dims=p`` first projects each side onto its top ``p``
principal components (fitted on the same samples); by the data-processing inequality the
projections' information is at most the full vectors', so this trades a lower target for a
less biased estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["SetStatistic", "distance_correlation", "ksg_mutual_information"]


@dataclass(frozen=True)
class SetStatistic:
    """A set-level statistic with its standard error.

    Attributes:
        value: the estimate.
        stderr: its standard error (see each function for how it is estimated).
        n: samples used.
        info: method details.
    """

    value: float
    stderr: float
    n: int
    info: dict


def _flat(a: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().to(torch.float64).cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 1 or a.shape[0] < 2:
        raise InvalidInputError(f"{name} must hold at least 2 samples [n, ...], got {a.shape}")
    a = a.reshape(a.shape[0], -1)
    if not np.isfinite(a).all():
        raise InvalidInputError(f"{name} has non-finite values")
    return a


def _pair(x, z) -> tuple[np.ndarray, np.ndarray]:
    xa, za = _flat(x, "x"), _flat(z, "z")
    if xa.shape[0] != za.shape[0]:
        raise InvalidInputError(f"x has {xa.shape[0]} samples but z has {za.shape[0]}")
    return xa, za


def _distances(a: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, a, metric="euclidean")


def _centre(dist: np.ndarray) -> np.ndarray:
    return dist - dist.mean(0, keepdims=True) - dist.mean(1, keepdims=True) + dist.mean()


def _dcor_from(da: np.ndarray, db: np.ndarray) -> float:
    a, b = _centre(da), _centre(db)
    vxy, vxx, vyy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    if vxx <= 0 or vyy <= 0:
        return 0.0
    return float(math.sqrt(max(vxy, 0.0) / math.sqrt(vxx * vyy)))


def distance_correlation(x: Tensor | np.ndarray, z: Tensor | np.ndarray,
                         jackknife: bool = True) -> SetStatistic:
    """Distance correlation of paired samples ``x [n, ...]`` and ``z [n, ...]`` (V-statistic).

    Args:
        x, z: paired samples (flattened per sample; Euclidean distances).
        jackknife: compute the leave-one-out jackknife standard error (``O(n^3)``).

    Returns:
        :class:`SetStatistic` in ``[0, 1]``.

    Example:
        >>> import torch
        >>> x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
        >>> round(distance_correlation(x, 2 * x + 1).value, 12)
        1.0
    """
    xa, za = _pair(x, z)
    da, db = _distances(xa), _distances(za)
    value = _dcor_from(da, db)
    n = xa.shape[0]
    se = float("nan")
    if jackknife and n > 2:
        keep = np.ones(n, dtype=bool)
        loo = np.empty(n)
        for i in range(n):
            keep[i] = False
            loo[i] = _dcor_from(da[np.ix_(keep, keep)], db[np.ix_(keep, keep)])
            keep[i] = True
        se = float(math.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
    return SetStatistic(value=value, stderr=se, n=n, info={"statistic": "V", "metric": "euclidean"})


_TIE_RTOL = 1e-6


def _knn_scale(dist: np.ndarray, k: int) -> float:
    """Median over samples of the distance to the ``k``-th nearest sample at a positive distance
    (fewer than ``k`` such samples: the farthest one); 1 where all samples coincide."""
    d = np.where(dist > 0, dist, np.inf)
    kk = min(k, d.shape[1]) - 1
    kth = np.partition(d, kk, axis=1)[:, kk]
    far = np.where(np.isfinite(d), d, -np.inf).max(1)
    kth = np.where(np.isfinite(kth), kth, far)
    kth = kth[np.isfinite(kth) & (kth > 0)]
    return float(np.median(kth)) if kth.size else 1.0


def _project(a: np.ndarray, dims: int | None) -> np.ndarray:
    if dims is None or dims >= min(a.shape):
        return a
    from .._extras import require

    require("sklearn", "the PCA of the k-NN mutual information", extra="validate")
    from sklearn.decomposition import PCA

    return PCA(n_components=dims, svd_solver="full").fit_transform(a)


def ksg_mutual_information(x: Tensor | np.ndarray, z: Tensor | np.ndarray, k: int = 3,
                           dims: int | None = None) -> SetStatistic:
    """KSG estimator 1 of the mutual information ``I(x; z)`` in nats (see the module docstring).

    Args:
        x, z: paired samples ``[n, ...]`` (flattened per sample).
        k: neighbours (``1 <= k < n``; 3 is the usual choice).
        dims: project each side onto its top ``dims`` principal components first (``None``:
            use the full vectors).

    Returns:
        :class:`SetStatistic` (may be slightly negative for independent data; it is not clipped).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2000, 1, generator=g)
        >>> z = 0.8 * x + 0.6 * torch.randn(2000, 1, generator=g)   # rho = 0.8
        >>> abs(ksg_mutual_information(x, z).value - 0.5108) < 0.1   # -0.5 log(1 - rho^2)
        True
    """
    from .._extras import require

    require("sklearn", "the k-NN mutual information", extra="validate")
    from scipy.special import digamma
    from sklearn.neighbors import NearestNeighbors

    xa, za = _pair(x, z)
    n = xa.shape[0]
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) \
            or not 1 <= k < n:
        raise InvalidInputError(f"k must be an int with 1 <= k < n = {n}, got {k!r}")
    k = int(k)
    if dims is not None:
        if isinstance(dims, (bool, np.bool_)) or not isinstance(dims, (int, np.integer)) \
                or dims < 1:
            raise InvalidInputError(f"dims must be a positive int or None, got {dims!r}")
        dims = int(dims)
    xa, za = _project(xa, dims), _project(za, dims)
    dx, dz = _distances(xa), _distances(za)
    sx, sz = _knn_scale(dx, k), _knn_scale(dz, k)
    dx, dz = dx / sx, dz / sz
    joint = np.maximum(dx, dz)
    nn = NearestNeighbors(n_neighbors=k, metric="precomputed").fit(joint)
    eps, order = nn.kneighbors(return_distance=True)  # self excluded, ascending
    eps = eps[:, -1]
    below = eps * (1.0 - _TIE_RTOL)  # distances within the tolerance of eps tie with it
    rows = np.arange(n)[:, None]
    first = order[:, : k - 1]  # the k - 1 joint neighbours ranked before the k-th
    nx = (dx < below[:, None]).sum(1) - 1 + (dx[rows, first] >= below[:, None]).sum(1)
    nz = (dz < below[:, None]).sum(1) - 1 + (dz[rows, first] >= below[:, None]).sum(1)
    ki = np.full(n, k)
    zero = eps == 0
    if zero.any():  # >= k exact joint copies: the mixed (Gao et al. 2017) term
        ki[zero] = (joint[zero] == 0).sum(1) - 1
        nx[zero] = (dx[zero] == 0).sum(1) - 1
        nz[zero] = (dz[zero] == 0).sum(1) - 1
    terms = digamma(ki) + digamma(n) - digamma(nx + 1) - digamma(nz + 1)
    value = float(terms.mean())
    se = float(terms.std(ddof=1) / math.sqrt(n))
    return SetStatistic(value=value, stderr=se, n=n,
                        info={"k": k, "dims": dims, "ceiling": float(digamma(n) - digamma(k)),
                              "metric": "max(euclidean_x / s_x, euclidean_z / s_z)",
                              "scale_x": sx, "scale_z": sz, "ties": int(zero.sum())})
