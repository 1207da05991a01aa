"""The set-level baselines' error bars: the bias-corrected distance correlation, the O(n^2)
jackknife of both distance correlations, and the KSG estimate's delete-a-group jackknife."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fsinfo_fast.attacks import (
    distance_correlation,
    ksg_mutual_information,
    u_distance_correlation_sqr,
)
from fsinfo_fast.errors import InvalidInputError


def _u_direct(x: np.ndarray, z: np.ndarray) -> float:
    """Bias-corrected dCor^2 straight from Szekely and Rizzo (2014), with explicit loops."""
    n = len(x)

    def ucentre(d: np.ndarray) -> np.ndarray:
        u = np.zeros_like(d)
        for i in range(n):
            for j in range(n):
                if i != j:
                    u[i, j] = (d[i, j] - d[i].sum() / (n - 2) - d[:, j].sum() / (n - 2)
                               + d.sum() / ((n - 1) * (n - 2)))
        return u

    a, b = ucentre(cdist(x, x)), ucentre(cdist(z, z))

    def ip(p: np.ndarray, q: np.ndarray) -> float:
        return sum(p[i, j] * q[i, j] for i in range(n) for j in range(n) if i != j) / (
            n * (n - 3))

    return ip(a, b) / math.sqrt(ip(a, a) * ip(b, b))


def _v_direct(x: np.ndarray, z: np.ndarray) -> float:
    def c(d: np.ndarray) -> np.ndarray:
        return d - d.mean(0) - d.mean(1)[:, None] + d.mean()

    a, b = c(cdist(x, x)), c(cdist(z, z))
    return math.sqrt(max((a * b).mean(), 0.0) / math.sqrt((a * a).mean() * (b * b).mean()))


def _jackknife(f, x: np.ndarray, z: np.ndarray) -> float:
    n = len(x)
    loo = np.array([f(np.delete(x, i, 0), np.delete(z, i, 0)) for i in range(n)])
    return math.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())


def test_u_statistic_matches_the_formula_and_its_jackknife_the_direct_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 4))
    z = np.tanh(x[:, :3]) + 0.5 * rng.normal(size=(25, 3))
    r = u_distance_correlation_sqr(x, z)
    assert r.value == pytest.approx(_u_direct(x, z), abs=1e-12)
    assert r.stderr == pytest.approx(_jackknife(_u_direct, x, z), rel=1e-9)
    v = distance_correlation(x, z)
    assert v.stderr == pytest.approx(_jackknife(_v_direct, x, z), rel=1e-9)
    # dCor^2 of an exact linear relation is 1 for both
    assert u_distance_correlation_sqr(x, 3 * x - 1).value == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n,d,m", [(40, 768, 60), (60, 20, 1024)])
def test_fast_jackknife_equals_the_leave_one_out_loop(n, d, m):
    from fsinfo_fast.attacks.baselines import _dcor_from, _dcor_u_from, _loo_dcor

    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    z = np.tanh(x[:, :20] @ rng.normal(size=(20, m))) + rng.normal(size=(n, m))
    da, db = cdist(x, x), cdist(z, z)
    keep = np.ones(n, dtype=bool)
    for u, f in ((False, _dcor_from), (True, _dcor_u_from)):
        slow = np.empty(n)
        for i in range(n):
            keep[i] = False
            slow[i] = f(da[np.ix_(keep, keep)], db[np.ix_(keep, keep)])
            keep[i] = True
        assert np.abs(_loo_dcor(da, db, u) - slow).max() < 1e-10


def test_u_statistic_is_near_zero_for_independent_high_dimensional_data():
    # The V-statistic reads ~0.98 here (population value 0); the U-statistic is ~0 and its
    # jackknife interval covers 0.
    rng = np.random.default_rng(3)
    x, z = rng.normal(size=(180, 768)), rng.normal(size=(180, 4096))
    v = distance_correlation(x, z)
    u = u_distance_correlation_sqr(x, z)
    assert v.value > 0.9
    assert abs(u.value) < 0.01
    assert abs(u.value) < 1.96 * u.stderr + 1e-3


def test_u_statistic_needs_four_samples():
    with pytest.raises(InvalidInputError, match="n >= 4"):
        u_distance_correlation_sqr(np.ones((3, 2)), np.ones((3, 2)))
    r = u_distance_correlation_sqr(np.arange(4.0)[:, None], np.arange(4.0)[:, None] ** 2)
    assert math.isfinite(r.value) and math.isnan(r.stderr)  # the jackknife needs n >= 5


def test_ksg_stderr_matches_the_spread_over_replicate_data_sets():
    # Before: the s.e. of the mean of the per-sample terms, which share neighbours (and the
    # PCA): 0.7x (full vectors) and 0.4x (PCA) the SD over replicate data sets.
    rng = np.random.default_rng(1)
    n, d, m, reps = 120, 5, 10, 100
    w = rng.normal(size=(d, m)) / math.sqrt(d)
    for dims in (None, 3):
        values, ses = [], []
        for _ in range(reps):
            x = rng.uniform(size=(n, d))
            z = np.tanh(3 * (x - 0.5) @ w) + 0.3 * rng.normal(size=(n, m))
            r = ksg_mutual_information(x, z, dims=dims)
            values.append(r.value)
            ses.append(r.stderr)
        ratio = float(np.mean(ses) / np.std(values, ddof=1))
        assert 0.8 <= ratio <= 1.5, (dims, ratio)


def test_ksg_jackknife_options_and_recorded_dims():
    rng = np.random.default_rng(2)
    x, z = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    assert math.isnan(ksg_mutual_information(x, z, groups=None).stderr)
    r = ksg_mutual_information(x, z, dims=4)
    # z (3 dims) is not projected: the dims used are recorded, not the ones asked for
    assert r.info["dims_x"] == 4 and r.info["dims_z"] == 3
    assert r.info["dims"] is None and r.info["dims_requested"] == 4
    for bad in (1, 2.0, True):
        with pytest.raises(InvalidInputError, match="groups"):
            ksg_mutual_information(x, z, groups=bad)
