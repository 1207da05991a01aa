"""Fuzz round 6: the validation cache and a Linearization's state went stale (old weights,
ignored hooks, results aliasing the memo). Each test failed before its fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.encoder import clear_validation_cache
from fsinfo_fast.errors import NotDifferentiableError


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).eval().to(dtype)


def _x(dtype=torch.float32):
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_validation_cache()
    yield
    clear_validation_cache()


def _inside(r, truth, slack=1e-9):
    lo, hi = r.ci95()
    assert bool(((lo - slack <= truth) & (truth <= hi + slack)).all()), (r.value, truth, lo, hi)


# -- the cached cast copy carries the live weights --------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_data_edit_reaches_cached_cast_copy(dtype):
    """``.data.mul_`` bumps no version: the cached float64 (or a bfloat16 model's float32)
    copy gave the old weights' values with a 1e-14 interval."""
    m, x = _mlp(dtype), _x(dtype)
    kw = {"dtype": torch.float64} if dtype == torch.float32 else {}
    ff.linearize(m, x, **kw).fsinfo(0.1)
    m[0].weight.data.mul_(3.0)
    r = ff.linearize(m, x, **kw).fsinfo(0.1)
    truth = ff.reference.fsinfo(m, x, sigma=0.1).value
    _inside(r, truth, slack=1e-5 if dtype == torch.bfloat16 else 1e-9)


def test_data_edit_default_path_interval():
    """The fast exact route's float64 check copy was stale: the right value with an interval
    of (-inf, inf) for FSInfo and +-3000 for dFIL."""
    m, x = _mlp(), _x()
    ff.linearize(m, x).fsinfo(0.1)
    m[0].weight.data.mul_(3.0)
    r = ff.linearize(m, x).fsinfo(0.1)
    d = ff.linearize(m, x).dfil(0.1)
    assert bool(torch.isfinite(r.ci_halfwidth).all()) and float(r.ci_halfwidth.max()) < 1e-3
    assert float((d.ci_halfwidth / d.value).max()) < 1e-3
    _inside(r, ff.reference.fsinfo(m, x, sigma=0.1).value, 1e-7)
    _inside(d, ff.reference.dfil(m, x, sigma=0.1).value, 1e-5)


def test_data_swap_revalidates():
    """``p.data = t`` keeps the parameter and swaps its storage: the key sees it."""
    m, x = _mlp(), _x()
    ff.linearize(m, x, dtype=torch.float64).fsinfo(0.1)
    m[2].weight.data = m[2].weight.data * 2
    r = ff.linearize(m, x, dtype=torch.float64)
    assert not r.enc.cached
    _inside(r.fsinfo(0.1), ff.reference.fsinfo(m, x, sigma=0.1).value)


# -- hooks are part of the function ------------------------------------------------------------
def test_hook_after_validation_counts():
    m, x = _mlp(), _x()
    before = ff.linearize(m, x, dtype=torch.float64).fsinfo(0.1).value
    m.register_forward_hook(lambda mod, inp, out: out * 10.0)
    r = ff.linearize(m, x, dtype=torch.float64).fsinfo(0.1)
    torch.testing.assert_close(r.value, before + math.log(10.0))
    _inside(r, ff.reference.fsinfo(m, x, sigma=0.1).value)


def test_hook_removed_after_validation():
    m, x = _mlp(), _x()
    h = m[0].register_forward_pre_hook(lambda mod, inp: (inp[0] * 2.0,))
    ff.linearize(m, x, dtype=torch.float64).fsinfo(0.1)
    h.remove()
    r = ff.linearize(m, x, dtype=torch.float64).fsinfo(0.1)
    _inside(r, ff.reference.fsinfo(m, x, sigma=0.1).value)


def test_detaching_hook_after_validation_raises():
    m, x = _mlp(), _x()
    ff.linearize(m, x).fsinfo(0.1)
    m.register_forward_hook(lambda mod, inp, out: out.detach())
    with pytest.raises(NotDifferentiableError):
        ff.linearize(m, x).fsinfo(0.1, num_probes=16, estimator="randomized")


def test_shape_changing_hook_after_validation():
    """The cached out_shape (and the engine's cached capture) gave a raw RuntimeError."""
    m, x = _mlp(), _x()
    ff.linearize(m, x).fsinfo(0.1)
    m.register_forward_hook(lambda mod, inp, out: torch.cat([out, out], 1))
    lin = ff.linearize(m, x)
    assert lin.m == 8
    r = lin.fsinfo(0.1, estimator="exact-fast")
    _inside(r, ff.reference.fsinfo(m, x, sigma=0.1).value, 1e-6)


def test_global_hook_after_validation():
    """A global module hook registered after the validation is checked as a fresh one."""
    m, x = _mlp(), _x()
    ff.linearize(m, x).fsinfo(0.1)
    h = nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: out.detach() if isinstance(mod, nn.Sequential) else out)
    try:
        with pytest.raises(NotDifferentiableError):
            ff.linearize(m, x).fsinfo(0.1, num_probes=16, estimator="randomized")
    finally:
        h.remove()


# -- one Linearization describes one encoder at one batch ---------------------------------------
def test_linearization_refuses_changed_weights():
    """After an in-place update the memoised results described the old weights and exact()
    the new ones (results depended on the call order)."""
    m, x = _mlp(), _x()
    lin = ff.linearize(m, x)
    lin.fsinfo(0.1, estimator="exact")
    with torch.no_grad():
        m[0].weight.mul_(3.0)
    for call in (lambda: lin.fsinfo(0.1, estimator="exact"),
                 lambda: lin.fsinfo(0.1, variant="logdet", prior_var=1.0, estimator="exact"),
                 lambda: lin.dfil(0.1), lambda: lin.exact(), lambda: lin.exact_fast(),
                 lambda: lin.fsinfo_sigma(-1.0), lambda: lin.dfil_sigma(1.0)):
        with pytest.raises(ff.errors.EncoderError, match="linearize"):
            call()
    r = ff.linearize(m, x).fsinfo(0.1, variant="logdet", prior_var=1.0, estimator="exact")
    torch.testing.assert_close(r.value, ff.reference.fsinfo(
        m, x, sigma=0.1, variant="logdet", prior_var=1.0).value)


@pytest.mark.parametrize("change", ["hook", "mode", "swap"])
def test_linearization_refuses_other_changes(change):
    m, x = _mlp(), _x()
    lin = ff.linearize(m, x)
    lin.fsinfo(0.1, estimator="randomized", num_probes=8)
    if change == "hook":
        m.register_forward_hook(lambda mod, inp, out: out * 2)
    elif change == "mode":
        m.train()
    else:
        m[2].bias = nn.Parameter(m[2].bias.detach() + 1)
    with pytest.raises(ff.errors.EncoderError, match="linearize"):
        lin.fsinfo(0.1, estimator="randomized", num_probes=8)


def test_linearization_snapshots_x():
    """The batch was held by reference: after x.mul_(3) the randomized results described the
    old x and the exact route the new one."""
    m, x = _mlp(), _x()
    x_old = x.clone()
    lin = ff.linearize(m, x)
    a = lin.fsinfo(0.1, estimator="randomized", num_probes=32).value
    x.mul_(3.0)
    torch.testing.assert_close(lin.fsinfo(0.1, estimator="randomized", num_probes=32).value, a)
    old = ff.reference.fsinfo(m, x_old, sigma=0.1).value
    torch.testing.assert_close(lin.fsinfo(0.1, estimator="exact").value, old)
    torch.testing.assert_close(lin.fsinfo(0.1, estimator="exact-fast").value, old)


def test_linearization_unchanged_encoder_still_answers():
    """A forward of the encoder (no state change) between calls is not a change."""
    m, x = _mlp(), _x()
    lin = ff.linearize(m, x)
    a = lin.fsinfo(0.1, estimator="randomized", num_probes=8).value
    with torch.no_grad():
        m(x)
    ff.linearize(m, x * 2, dtype=torch.float64).fsinfo(0.1)
    torch.testing.assert_close(lin.fsinfo(0.1, estimator="randomized", num_probes=8).value, a)


# -- a returned result is the caller's own -------------------------------------------------------
def _conv():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(3 * 5 * 5, 7)).eval()
    return m, torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(2))


_CALLS = {
    "fsinfo randomized": lambda lin: lin.fsinfo(0.1, estimator="randomized"),
    "fsinfo deflated": lambda lin: lin.fsinfo(0.1, estimator="deflated"),
    "fsinfo auto": lambda lin: lin.fsinfo(0.1),
    "fsinfo exact": lambda lin: lin.fsinfo(0.1, estimator="exact"),
    "fsinfo exact-fast": lambda lin: lin.fsinfo(0.1, estimator="exact-fast"),
    "logdet randomized": lambda lin: lin.fsinfo(0.1, variant="logdet", prior_var=1.0,
                                                estimator="randomized", atol=0.05),
    "dfil randomized": lambda lin: lin.dfil(0.1, estimator="randomized"),
    "dfil diag": lambda lin: lin.dfil(0.1, estimator="randomized", method="diag"),
    "dfil deflated": lambda lin: lin.dfil(0.1, estimator="deflated"),
    "dfil exact": lambda lin: lin.dfil(0.1, estimator="exact"),
}


def _tensor_fields(r):
    return {k: v for k, v in vars(r).items() if isinstance(v, torch.Tensor)
            and v.is_floating_point() and 0 not in v.stride()}  # (an expanded sigma)


@pytest.mark.parametrize("name", list(_CALLS))
def test_results_do_not_alias_the_memo(name):
    """``r.value /= math.log(2)`` on a randomized result changed the next identical call's
    answer (the same storage); dFIL's stderr the same."""
    m, x = _conv()
    lin = ff.linearize(m, x)
    r = _CALLS[name](lin)
    want = {k: v.clone() for k, v in _tensor_fields(r).items()}
    for v in _tensor_fields(r).values():
        v.div_(math.log(2)).add_(1.0)
    again = _tensor_fields(_CALLS[name](lin))
    assert set(again) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(again[k], v, equal_nan=True, msg=f"{name}: {k}")
