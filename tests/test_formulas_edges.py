"""fsinfo_from_spectrum / sigma_for_target edge inputs (helper 137, f3_formulas.py)."""

import math

import pytest
import torch

from fsinfo_fast.errors import FSInfoError, InvalidInputError
from fsinfo_fast.formulas import fsinfo_from_spectrum, sigma_for_target


def T(*v):
    return torch.tensor([v], dtype=torch.float64)


def test_sigma_zero_is_defined_never_nan():
    # a zero entry is log(c) at every sigma: -inf for c = 0 (was NaN), and with c > 0 the other
    # entry's +inf wins (was NaN)
    assert fsinfo_from_spectrum(T(1.0, 0.0), 2, 0.0).item() == -math.inf
    assert fsinfo_from_spectrum(T(1.0, 0.0), 2, 0.0, 1e-10).item() == math.inf
    assert fsinfo_from_spectrum(T(0.0, 0.0), 2, 0.0, 1e-10).item() == pytest.approx(
        0.5 * math.log(1e-10) - 0.5 * math.log(2 * math.pi * math.e), rel=1e-15)


@pytest.mark.parametrize("s", [1e155, 1e-160, 1e300, 1e-300])
def test_extreme_sigma_is_finite_where_the_value_is(s):
    # c = 0: F(sigma) + log(sigma) = F(1) exactly (was -inf at 1e155, +inf at 1e-160)
    ref = fsinfo_from_spectrum(T(4.0, 1.0), 2, 1.0).item()
    v = fsinfo_from_spectrum(T(4.0, 1.0), 2, s).item()
    assert math.isfinite(v)
    assert v + math.log(s) == pytest.approx(ref, abs=1e-12 * abs(math.log(s)))


@pytest.mark.parametrize("c", [-1e-10, math.nan, math.inf, "1", True])
def test_bad_constant_raises(c):
    with pytest.raises(FSInfoError, match="c "):
        fsinfo_from_spectrum(T(4.0, 1e-12), 2, 1.0, c)
    with pytest.raises(FSInfoError, match="c "):
        sigma_for_target(T(4.0, 1.0), 2, -1.0, c)


def test_bad_d_raises():
    with pytest.raises(InvalidInputError, match="d must be"):
        fsinfo_from_spectrum(torch.zeros(1, 0, dtype=torch.float64), 0, 1.0)
    with pytest.raises(InvalidInputError, match="entries but d"):
        fsinfo_from_spectrum(T(1.0, 2.0), 1, 1.0)


def test_target_plus_inf_needs_no_finite_sigma_but_zero():
    assert sigma_for_target(T(4.0, 1.0), 2, math.inf).item() == 0.0
    assert sigma_for_target(T(4.0, 1.0), 2, math.inf, 1e-10).item() == 0.0  # was 2.3e-211
    # an ordinary target still solves (the search now runs in log sigma)
    s = sigma_for_target(T(4.0, 1.0), 2, -1.0, 1e-10)
    assert fsinfo_from_spectrum(T(4.0, 1.0), 2, s, 1e-10).item() == pytest.approx(-1.0, abs=1e-12)
