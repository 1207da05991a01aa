"""The Student-t quantile and tails without scipy (``fsinfo_fast.estimators.student_t``): closed
forms where they exist, scipy where it is installed (the dev extra), and the error paths."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from fsinfo_fast.errors import InvalidInputError
from fsinfo_fast.estimators import t_quantile as public_t_quantile
from fsinfo_fast.estimators.student_t import t_quantile, t_two_sided_mass, t_two_sided_tail

CONFIDENCES = (0.01, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1 - 1e-6, 1 - 1e-10)


@pytest.mark.parametrize("c", CONFIDENCES)
def test_closed_forms_for_one_and_two_degrees_of_freedom(c):
    alpha = 1.0 - c
    # nu = 1 (Cauchy): t = tan(pi c / 2) = cot(pi alpha / 2); nu = 2: t = sqrt(2) c /
    # sqrt(alpha (2 - alpha))
    assert t_quantile(1, c) == pytest.approx(1 / math.tan(math.pi * alpha / 2), rel=1e-12)
    assert t_quantile(2, c) == pytest.approx(math.sqrt(2) * c / math.sqrt(alpha * (2 - alpha)),
                                             rel=1e-12)


def test_textbook_values_and_the_normal_limit():
    # two-sided 95%: 12.706, 4.303, 3.182, 2.776, 2.571 ... 2.228 (10), 2.042 (30), 1.984 (100)
    table = {1: 12.7062047361747, 2: 4.30265272974946, 3: 3.18244630528371,
             4: 2.77644510519779, 5: 2.57058183563631, 10: 2.22813885198627,
             30: 2.04227245630124, 100: 1.98397151852355}
    for nu, want in table.items():
        assert t_quantile(nu) == pytest.approx(want, rel=1e-12), nu
    # large nu: t = z + z (z^2 + 1) / (4 nu) + O(nu^-2) (Cornish-Fisher's first term)
    z = 1.959963984540054
    assert t_quantile(10**9) - z == pytest.approx(z * (z * z + 1) / 4e9, rel=1e-6)
    assert t_quantile(0) == math.inf and t_quantile(-3) == math.inf
    assert public_t_quantile(7) == t_quantile(7)  # the estimators' entry point uses it


@pytest.mark.parametrize("nu", [*range(1, 41), 57, 99, 100, 101, 255, 999, 1000, 4096, 9999,
                                10_000, 10_001, 123_456, 10**7])
def test_matches_scipy(nu):
    for c in CONFIDENCES:
        want = stats.t.isf((1 - c) / 2, nu)
        assert t_quantile(nu, c) == pytest.approx(want, rel=1e-11), (nu, c)


def test_mass_and_tail_match_scipy_and_each_other():
    for nu in (1, 2, 3, 4, 5, 10, 31, 100, 1000):
        for t in (0.0, 0.1, 1.0, 2.0, 5.0, 30.0, 1e3):
            tail = t_two_sided_tail(t, nu)
            assert tail == pytest.approx(2 * stats.t.sf(t, nu), rel=1e-11, abs=1e-300), (nu, t)
            assert t_two_sided_mass(t, nu) == pytest.approx(1 - tail, abs=1e-14)
    # the quantile inverts the mass
    for nu in (3, 8, 64):
        for c in (0.5, 0.95, 0.999):
            assert t_two_sided_mass(t_quantile(nu, c), nu) == pytest.approx(c, abs=1e-14)
    assert t_two_sided_tail(math.inf, 5) == 0.0 and t_two_sided_mass(-2.0, 5) == \
        t_two_sided_mass(2.0, 5)


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="integer"):
        t_quantile(2.5)
    with pytest.raises(InvalidInputError, match="confidence"):
        t_quantile(5, 1.0)
    with pytest.raises(InvalidInputError, match=">= 1"):
        t_two_sided_mass(1.0, 0)
