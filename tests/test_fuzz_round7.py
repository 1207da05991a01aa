"""Fuzz round 7: defects found by fuzzing and review, each test failing before its fix."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import fsinfo_fast as ff

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11+")
def test_unbatched_sample_error_says_how_the_encoder_was_called():
    """One image [3, H, W] given to an image model: the model's own shape error (a ViT's
    'not enough values to unpack (expected 4, got 3)', a conv's expected-4D message) came with
    nothing saying that the metrics read x's first dimension as the batch. The encoder's error
    keeps its type and now carries a note with the shape it was called on and the fix."""

    class Patches(torch.nn.Module):  # what a ViT's patch embedding does first
        def forward(self, x):
            b, c, h, w = x.shape
            return x.reshape(b, c * h * w)[:, :8]

    with pytest.raises(ValueError, match="not enough values") as info:
        ff.fsinfo(Patches(), torch.rand(3, 16, 16), sigma=0.1)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "a batch of 3 sample(s) of shape (16, 16)" in notes
    assert "x.unsqueeze(0)" in notes
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(RuntimeError) as info:
        ff.fsinfo(conv, torch.rand(3, 16), sigma=0.1)
    assert "x.unsqueeze(0)" in "\n".join(getattr(info.value, "__notes__", []))


# -- torchmetrics FSInfoMetric / DFILMetric ------------------------------------------------------

torchmetrics = pytest.importorskip("torchmetrics")


def test_metric_collection_does_not_group_metrics_that_measure_different_things():
    """Two FSInfoMetrics with different floors in one MetricCollection (compute_groups on, the
    default): torchmetrics merged them after a first batch whose values agreed to 5e-6, and
    both reported one floor's mean (-2.570 where -6.024 was right). A settings digest state
    keeps them apart; the same settings still share states."""
    enc = torch.nn.ReLU()
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(4, 6, generator=gen) + 0.5, -torch.rand(4, 6, generator=gen) - 0.5
    mc = torchmetrics.MetricCollection({
        "a": ff.FSInfoMetric(enc, sigma=0.1, estimator="exact"),
        "b": ff.FSInfoMetric(enc, sigma=0.1, estimator="exact", floor=1e-4),
        "c": ff.FSInfoMetric(enc, sigma=0.1, estimator="exact", floor=1e-4)})
    mc.update(x1)
    mc.update(x2)
    out = mc.compute()
    x = torch.cat([x1, x2])
    for name, floor in (("a", 1e-10), ("b", 1e-4), ("c", 1e-4)):
        want = ff.fsinfo(enc, x, sigma=0.1, estimator="exact", floor=floor).value.mean()
        assert abs(float(out[f"{name}_mean"]) - float(want)) < 1e-9, name
    assert sorted(map(sorted, mc.compute_groups.values())) == [["a"], ["b", "c"]]


def test_metric_state_dict_from_another_setting_is_refused():
    """A state dict saved from a sigma=0.1 metric loaded into a sigma=1 one was accepted
    (merge_state refused the same pairing) and reported its mean as the other's."""
    enc = torch.nn.Tanh()
    a = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    a.persistent(True)
    a.update(torch.randn(3, 4))
    b = ff.FSInfoMetric(enc, sigma=1.0, estimator="exact")
    b.persistent(True)
    with pytest.raises(ff.InvalidInputError, match="measures something else"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ff.InvalidInputError, match="measures something else"):
        b.merge_state({k: getattr(a, k) for k in a._defaults})
    c = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    c.persistent(True)
    c.load_state_dict(a.state_dict())
    assert float(c.compute()["mean"]) == float(a.compute()["mean"])


def test_metric_set_dtype_leaves_the_encoder_and_the_counts_alone():
    """metric.set_dtype(torch.half) cast the caller's encoder (a submodule) to float16 in place
    (weights off by 1.2e-4 after casting back) and the float counters lost counts (3004 of
    3003 samples). The encoder is referenced, not owned; the counters are int64."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()).eval()
    w = enc[0].weight.detach().clone()
    m = ff.FSInfoMetric(enc, sigma=0.1, estimator="exact")
    m.set_dtype(torch.half)
    assert enc[0].weight.dtype == torch.float32 and torch.equal(enc[0].weight, w)
    assert list(m.parameters()) == [] and "encoder" not in dict(m.named_children())
    for _ in range(3):
        m.update(torch.randn(1001, 4))
    assert int(m.compute()["count"]) == 3003 and m.count.dtype == torch.int64


def test_metric_reports_the_mean_interval_of_the_functional_api():
    """compute() gave a standard error but no 95% half-width: mean +- 1.96 estimator_stderr +
    bias covered the exact mean in 0.880 of 200 seeds at num_probes=3 (each sample's own
    interval uses a Student-t factor). compute()['ci_halfwidth'] is now the functional
    MetricResult.mean()'s half-width on the same probes."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh()).eval()
    x = torch.randn(7, 6)
    ids = torch.arange(7)
    m = ff.FSInfoMetric(enc, sigma=0.1, estimator="randomized", num_probes=3, seed=3)
    m.update(x[:3], sample_ids=ids[:3])
    m.update(x[3:], sample_ids=ids[3:])
    out = m.compute()
    want = ff.fsinfo(enc, x, sigma=0.1, estimator="randomized", num_probes=3, seed=3,
                     sample_ids=ids).mean()
    # the batches' float32 products round differently from the whole batch's (~1e-8)
    assert abs(float(out["mean"]) - want.value) < 1e-7
    assert abs(float(out["ci_halfwidth"]) - want.ci_halfwidth) < 1e-6 * want.ci_halfwidth
    assert float(out["ci_halfwidth"]) > 1.96 * float(out["estimator_stderr"])


def test_metric_compute_before_update_and_singular_samples():
    """compute() before any update returned NaN/inf with a generic warning; a log-det sample
    at -inf (singular) made stderr NaN (inf - inf). Now a clear error, and stderr infinite
    with the -inf samples counted."""
    m = ff.FSInfoMetric(torch.nn.Tanh(), sigma=0.1, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="before any update"):
        m.compute()
    relu = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.ReLU())
    torch.nn.init.eye_(relu[0].weight)
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    m = ff.FSInfoMetric(relu, sigma=0.1, estimator="exact", variant="logdet")
    with pytest.warns(ff.SingularFisherWarning):
        m.update(x)
    out = m.compute()
    assert float(out["mean"]) == -math.inf and float(out["stderr"]) == math.inf
    assert int(out["n_neg_inf"]) == 1 and int(out["count"]) == 3


# -- backends (differential fuzz) ----------------------------------------------------------------


def _products_vs_oracle(enc, x, backend):
    from fsinfo_fast.reference import jacobian

    J = jacobian(enc, x)
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(x.shape[0], 3, J.shape[1], generator=gen, dtype=torch.float64)
    V = torch.randn(x.shape[0], 3, J.shape[2], generator=gen, dtype=torch.float64)
    P = ff.linearize(enc, x, backend=backend).products
    uj, jv = P.vjp(U.to(x.dtype)).double(), P.jvp(V.to(x.dtype)).double()
    want_uj = torch.einsum("bmd,bkm->bkd", J, U)
    want_jv = torch.einsum("bmd,bkd->bkm", J, V)
    return (float((uj - want_uj).norm() / want_uj.norm()),
            float((jv - want_jv).norm() / want_jv.norm()), P)


def test_lstm_products_on_every_backend():
    """nn.LSTM(batch_first=True) on the CPU: every backend's VJP (auto and default
    ff.fsinfo included) raised torch's 'Expected a proper Tensor but got None ... workspace':
    the pullback was built under no_grad, where the mkldnn LSTM kernel keeps no workspace for
    its backward. Pullbacks are built in grad mode now; the products equal the oracle's."""

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 3, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    torch.manual_seed(0)
    enc, x = Enc().eval(), torch.randn(2, 5, 4)
    for backend in ("torch", "engine", "auto"):
        e_vjp, e_jvp, _ = _products_vs_oracle(enc, x, backend)
        assert e_vjp < 1e-5 and e_jvp < 1e-5, (backend, e_vjp, e_jvp)
    r = ff.fsinfo(enc, x, sigma=0.1)
    torch.testing.assert_close(r.value, ff.fsinfo(enc, x, sigma=0.1, estimator="exact").value,
                               rtol=0, atol=1e-5)


def test_complex_intermediate_is_not_a_constant_in_the_engine():
    """A feature computed through torch.fft (a complex intermediate): the engine skipped the
    node as if it had no derivative (the two spectral features' Jacobian rows came back 0,
    relative error 2.4e-3, under the cross-check's tolerance), and auto served it unflagged.
    The engine now refuses it naming the node; auto falls back to torch, recorded, with the
    oracle's products."""
    from fsinfo_fast.errors import BackendUnavailableError

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 512)

        def forward(self, x):
            spec = torch.fft.rfft(x, dim=-1).abs()
            feats = torch.stack([spec[:, :8].mean(-1), spec[:, 8:].mean(-1)], -1) * 0.01
            return torch.cat([self.lin(x), feats], -1)

    torch.manual_seed(0)
    enc, x = Enc().eval(), torch.randn(2, 64)
    with pytest.raises(BackendUnavailableError, match="complex-valued"):
        _ = ff.linearize(enc, x, backend="engine").products
    e_vjp, e_jvp, P = _products_vs_oracle(enc, x, "auto")
    assert e_vjp < 1e-5 and e_jvp < 1e-5
    assert "complex-valued" in P.info["backend_fallback"]


def test_engine_cross_check_falls_back_to_autograd(monkeypatch):
    """Where torch.func's VJP could not run at the cross-check, the engine was served
    unchecked; autograd's reverse mode is now the reference there, and where neither runs the
    skipped check is recorded."""
    import fsinfo_fast.engine as eng
    from fsinfo_fast.encoder import clear_validation_cache
    from fsinfo_fast.engine.torchfunc import TorchFuncProducts

    def broken(self, U):
        raise RuntimeError("torch.func cannot run this")

    def fresh():  # a new module: its own capture, checked as a first batch
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh()).eval()

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    calls = []
    real = eng._autograd_vjp
    monkeypatch.setattr(TorchFuncProducts, "vjp", broken)
    monkeypatch.setattr(eng, "_autograd_vjp", lambda enc, u: calls.append(1) or real(enc, u))
    clear_validation_cache()
    P = ff.linearize(fresh(), x, backend="engine").products
    assert calls and "cross_check" not in P.info

    def wrong(enc, u):  # a reference the engine disagrees with: refused, not served
        return 2 * real(enc, u)

    monkeypatch.setattr(eng, "_autograd_vjp", wrong)
    with pytest.raises(ff.errors.BackendUnavailableError, match="disagree"):
        _ = ff.linearize(fresh(), x, backend="engine").products
    monkeypatch.setattr(eng, "_autograd_vjp", lambda enc, u: broken(None, u))
    P = ff.linearize(fresh(), x, backend="engine").products
    assert P.info["cross_check"].startswith("skipped")


def test_callable_whose_dtype_check_raises_value_error_stays_randomized():
    """A plain callable around nn.LSTM: in float64 its input check raises ValueError ('RNN
    input dtype ... does not match weight dtype'), not the RuntimeError other ops raise, so
    the default estimator's float64 try crashed instead of staying randomized (with a
    note about batch shapes that did not apply)."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 3, batch_first=True).eval()
    r = ff.dfil(lambda t: lstm(t)[0], torch.randn(2, 5, 4), sigma=0.1)
    assert torch.isfinite(r.value).all()
    assert "cannot" in r.info["exact_unavailable"] and "RNN input dtype" in \
        r.info["exact_unavailable"]
