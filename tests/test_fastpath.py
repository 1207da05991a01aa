"""Tier B: every fast path against the oracle, on the same seeded probes.

The torch.func product engine must give the same products as the oracle's dense Jacobian, and the
estimators run on it must give the same numbers as on the dense Jacobian with the same probes.
The public randomized metrics must agree with the exact ones within their error bars.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fsinfo_fast as ff
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import TorchFuncProducts
from fsinfo_fast.engine.dense import DenseProducts
from fsinfo_fast.estimators import estimate_diag, hutchpp_trace, slq_logdet
from fsinfo_fast.testing import TOL, assert_close_verbose

from .conftest import encoder_zoo
from .helpers import NoForwardAD

ZOO_NAMES = list(encoder_zoo())


def _pair(model, x, dtype):
    """(torch.func products, dense products from the oracle's J) for the same batch."""
    model = copy.deepcopy(model).to(dtype)
    enc = prepare(model, x.to(dtype))
    J = ff.reference.jacobian(model, x)
    return TorchFuncProducts(enc, chunk_size=3), DenseProducts(J.to(dtype)), J


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torchfunc_products_match_dense_jacobian(zoo, name, dtype):
    model, x = zoo[name]
    fast, dense, J = _pair(model, x, dtype)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(x.shape[0], 5, fast.d, generator=g, dtype=dtype)
    U = torch.randn(x.shape[0], 5, fast.m, generator=g, dtype=dtype)
    rtol = TOL.exact_rtol if dtype == torch.float64 else TOL.float32_rtol
    scale_v = float(dense.jvp(V.double() if dtype == torch.float64 else V).abs().max())
    scale_u = float(dense.vjp(U.double() if dtype == torch.float64 else U).abs().max())
    ref_v = torch.einsum("bmd,bkd->bkm", J, V.double())
    ref_u = torch.einsum("bmd,bkm->bkd", J, U.double())
    assert_close_verbose(fast.jvp(V).double(), ref_v, rtol=0, atol=rtol * scale_v)
    assert_close_verbose(fast.vjp(U).double(), ref_u, rtol=0, atol=rtol * scale_u)
    assert fast.jvp_passes == 5 and fast.vjp_passes == 5


def test_jvp_falls_back_to_double_vjp_when_forward_mode_is_missing():
    lin = torch.nn.Linear(4, 5).double()
    enc = lambda z: NoForwardAD.apply(lin(z))  # noqa: E731
    x = torch.randn(2, 4, dtype=torch.float64)
    fast = TorchFuncProducts(prepare(enc, x))
    J = ff.reference.jacobian(lin, x) * (1 - torch.tanh(lin(x)) ** 2).detach()[:, :, None]
    V = torch.randn(2, 3, 4, dtype=torch.float64)
    out = fast.jvp(V)
    assert fast.forward_mode is False
    assert_close_verbose(out, torch.einsum("bmd,bkd->bkm", J, V), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["tanh_mlp_m<d", "cnn_bn_maxpool_m<d", "attention_m=d",
                                  "residual_m=d"])
def test_estimators_on_torchfunc_equal_dense_with_same_probes(zoo, name):
    model, x = zoo[name]
    fast, dense, _ = _pair(model, x, torch.float64)
    kw = {"sigma": 0.1, "seed": 7, "num_probes": 12}
    a, b = estimate_diag(fast, **kw), estimate_diag(dense, **kw)
    assert_close_verbose(a.fsinfo_diag.value, b.fsinfo_diag.value, rtol=1e-10, atol=1e-12)
    assert_close_verbose(a.fsinfo_diag.stderr, b.fsinfo_diag.stderr, rtol=1e-8, atol=1e-12)
    assert_close_verbose(a.dfil.value, b.dfil.value, rtol=1e-10, atol=0)
    a, b = slq_logdet(fast, prior_var=1.0, order=8, **kw), slq_logdet(dense, prior_var=1.0,
                                                                       order=8, **kw)
    assert_close_verbose(a.value, b.value, rtol=1e-9, atol=1e-10)
    a, b = hutchpp_trace(fast, sketch_size=2, **kw), hutchpp_trace(dense, sketch_size=2, **kw)
    assert_close_verbose(a.value, b.value, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_public_randomized_metrics_agree_with_exact(zoo, name):
    model, x = zoo[name]
    exact = ff.fsinfo(model, x, estimator="exact")
    r = ff.fsinfo(model, x, estimator="randomized", num_probes=40, seed=3)
    assert r.estimator == "randomized" and r.num_probes == 40 and r.passes == 40
    assert r.value.shape == r.stderr.shape == (x.shape[0],)
    # a fixed seed makes this deterministic; 4 standard errors leave no room for flakiness
    assert bool(((r.value - exact.value).abs() <= 4 * r.stderr + 1e-6).all()), (r, exact)
    de = ff.dfil(model, x, estimator="exact")
    dr = ff.dfil(model, x, estimator="randomized", num_probes=40, seed=3)
    assert bool(((dr.value - de.value).abs() <= 4 * dr.stderr + 1e-6 * de.value).all())


def test_logdet_randomized_agrees_with_exact(zoo):
    model, x = zoo["tanh_mlp_m>d"]
    for prior in (None, 2.0):
        exact = ff.fsinfo(model, x, variant="logdet", prior_var=prior, estimator="exact")
        r = ff.fsinfo(model, x, variant="logdet", prior_var=prior, estimator="randomized",
                      num_probes=30, lanczos_order=6)  # order = d: exact quadrature
        assert bool(((r.value - exact.value).abs() <= 4 * r.stderr + 1e-9).all())


def test_logdet_m_less_than_d_without_prior_is_minus_inf(zoo):
    model, x = zoo["tanh_mlp_m<d"]
    with pytest.warns(ff.SingularFisherWarning):
        r = ff.fsinfo(model, x, variant="logdet", estimator="auto")
    assert bool(torch.isneginf(r.value).all()) and r.passes == 0 or r.estimator == "exact"


def test_adaptive_stopping_meets_atol_and_records_probes():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh()).eval()
    x = torch.rand(3, 1, 10, 10)
    r = ff.fsinfo(enc, x, estimator="randomized", atol=0.02)
    assert bool((r.ci_halfwidth <= 0.02).all()) and bool(r.converged.all())
    assert r.num_probes >= 10 and r.passes >= r.num_probes
    exact = ff.fsinfo(enc, x, estimator="exact")
    assert bool(((r.value - exact.value).abs() <= 2.5 * r.ci_halfwidth).all())


def test_reproducible_and_batch_independent():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Tanh()).eval()
    x = torch.randn(4, 30)
    kw = {"estimator": "randomized", "num_probes": 16, "seed": 11}
    a = ff.fsinfo(enc, x, **kw)
    b = ff.fsinfo(enc, x, **kw)
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(ff.fsinfo(enc, x, estimator="randomized", num_probes=16, seed=g1).value,
                       ff.fsinfo(enc, x, estimator="randomized", num_probes=16, seed=g2).value)
    # sample 2 alone, with its global id, gets the same probes and the same estimate
    alone = ff.fsinfo(enc, x[2:3], sample_ids=torch.tensor([2]), **kw)
    assert_close_verbose(alone.value, a.value[2:3], rtol=1e-6, atol=1e-9)
    other = ff.fsinfo(enc, x, **{**kw, "seed": 12})
    assert not torch.equal(other.value, a.value)


def test_auto_picks_exact_when_cheaper_and_randomized_otherwise():
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).eval()
    r = ff.fsinfo(small, torch.randn(2, 6))
    # min(m, d) = 4 products < 20 probes: the fast exact route, not the float64 oracle
    assert r.estimator == "exact-fast" and "fast exact route" in r.info["auto"]
    big = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh()).eval()
    r = ff.fsinfo(big, torch.rand(2, 1, 24, 24))
    assert r.estimator == "randomized" and r.passes < 576
    d = ff.dfil(big, torch.rand(2, 1, 24, 24))
    assert d.estimator == "randomized" and bool((d.ci_halfwidth <= 0.01 * d.value).all())


def test_randomized_needs_a_stopping_rule_and_valid_backend():
    enc = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Tanh()).eval()
    x = torch.randn(2, 30)
    with pytest.raises(ff.InvalidInputError, match="atol, rtol or num_probes"):
        ff.fsinfo(enc, x, estimator="randomized", atol=None)
    with pytest.raises(ff.BackendUnavailableError, match="cuda"):
        ff.fsinfo(enc, x, estimator="randomized", backend="cuda")
    with pytest.raises(ff.InvalidInputError, match="method"):
        ff.dfil(enc, x, estimator="randomized", method="exact")


def test_nonfinite_probe_contribution_raises_with_index():
    class Spiky(torch.nn.Module):
        def forward(self, z):
            return torch.sqrt(z.abs())  # derivative inf * 0 = NaN at z = 0

    x = torch.randn(2, 20)
    x[1, 3] = 0.0
    with pytest.raises(ff.NonFiniteProbeError, match="sample 1"):
        ff.fsinfo(Spiky(), x, estimator="randomized", num_probes=12)


@pytest.mark.parametrize("variant", ["diag", "logdet"])
def test_randomized_fsinfo_sigma_hits_target_measured_by_oracle(zoo, variant):
    model, x = zoo["tanh_mlp_m>d"]
    # the Lanczos order for the log det, the floor for the diagonal (each variant's own option)
    own = {"lanczos_order": 6} if variant == "logdet" else {}
    s = ff.fsinfo_sigma(model, x, target=-1.0, variant=variant, estimator="randomized",
                        num_probes=200, **own).sigma
    r = ff.fsinfo(model, x, sigma=s, variant=variant, estimator="exact")
    # an error delta in FSInfo_{sigma=1} moves FSInfo(sigma*) by delta: within the estimate's SE
    if variant == "diag":
        own = {"floor": 0.0}
    est = ff.fsinfo(model, x, sigma=1.0, variant=variant, estimator="randomized",
                    num_probes=200, **own)
    assert bool(((r.value + 1.0).abs() <= 4 * est.stderr + 1e-6).all())
    with pytest.raises(ff.InvalidInputError, match="prior"):
        ff.fsinfo_sigma(model, x, variant="logdet", prior_var=1.0, estimator="randomized")


def test_nominal_sigma_identity_holds_for_randomized_with_fixed_probes():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh()).eval()
    x = torch.rand(2, 1, 8, 8)
    vals = [ff.fsinfo(enc, x, sigma=s, estimator="randomized", num_probes=16, floor=0.0).value
            + math.log(s) for s in (0.1, 1.0, 10.0)]
    for v in vals[1:]:
        assert_close_verbose(v, vals[0], rtol=0, atol=1e-12)


def test_auto_keeps_unconverged_estimate_when_oracle_does_not_fit(monkeypatch):
    import fsinfo_fast.linearization as linearization

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh()).eval()
    x = torch.rand(1, 1, 16, 16)
    monkeypatch.setattr(linearization, "default_memory_budget", lambda device: 1000)
    kw = {"variant": "logdet", "prior_var": 1.0, "atol": 1e-6, "max_probes": 4,
          "lanczos_order": 4}
    with pytest.warns(RuntimeWarning, match="does not fit in memory"):
        r = ff.fsinfo(enc, x, **kw)  # the log det needs the oracle's spectrum
    assert r.estimator == "randomized" and not bool(r.converged.all())
    # the diagonal's exact route chunks its one-hot products: it needs no dense Jacobian
    r = ff.fsinfo(enc, x, atol=1e-6, max_probes=20)
    assert r.estimator == "exact-fast" and "did not reach the tolerance" in r.info["auto"]
    # its float32 rounding allowance misses 1e-6 too, and the oracle does not fit: kept, and
    # not called converged
    assert not bool(r.converged.any()) and bool((r.ci_halfwidth > 1e-6).all())
    monkeypatch.undo()
    r = ff.fsinfo(enc, x, **kw)  # the oracle fits: auto takes it (at once: a cap of 4 probes
    # leaves SLQ no room for its three stages, so no estimate there could converge)
    assert r.estimator == "exact" and "leaves no room for the three stages" in r.info["auto"]
