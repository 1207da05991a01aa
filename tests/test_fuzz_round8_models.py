"""Fuzz round 8 (third-party models): a legacy empty tensor in ``torch.cat`` (transformers'
``DynamicCache`` on its first update) and a rule's own failure in the engine, a forward partly
computed in float32 (Hugging Face Mamba) under ``auto`` and the exact routes, and dFIL's
deflated estimator against another explicit method. Each test fails before its fix."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import rules as engine_rules
from fsinfo_fast.engine.products import LinearisedProducts
from fsinfo_fast.errors import BackendUnavailableError, EncoderError, InvalidInputError
from fsinfo_fast.reference import jacobian

aten = torch.ops.aten

# --- 1. torch.cat with a legacy empty tensor; a rule's own failure -----------------------------


class _CatLegacyEmpty(nn.Module):
    """``torch.cat([torch.tensor([]), y], dim=-2)``: torch.cat skips the legacy empty (0,)
    tensor whatever ``dim`` (the engine's cat rule indexed its missing ``dim``: IndexError)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 5)

    def forward(self, x):  # [B, 4, 5]
        empty = torch.tensor([], dtype=x.dtype)
        return torch.cat([empty, torch.tanh(self.lin(x)), x[:, :1]], dim=-2)  # [B, 5, 5]


def test_cat_with_a_legacy_empty_tensor_on_the_engine():
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    enc = _CatLegacyEmpty().eval()
    P = LinearisedProducts(prepare(enc, x, dtype=torch.float32))
    assert "cat" in P.node_kinds.values() and not P.fallbacks
    J = jacobian(enc, x)  # [B, m, d] float64
    g = torch.Generator().manual_seed(7)
    V = torch.randn(2, 3, P.d, generator=g, dtype=torch.float64)
    U = torch.randn(2, 3, P.m, generator=g, dtype=torch.float64)
    torch.testing.assert_close(P.jvp(V.float()).double(), torch.einsum("bmd,bkd->bkm", J, V),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(P.vjp(U.float()).double(), torch.einsum("bmd,bkm->bkd", J, U),
                               rtol=1e-5, atol=1e-5)
    want = ff.fsinfo(enc, x, 0.1, estimator="exact").value
    for backend in ("engine", "torch", "auto"):
        r = ff.fsinfo(enc, x, 0.1, backend=backend, estimator="exact-fast")
        assert r.info["backend"] == ("torch" if backend == "torch" else "engine")
        torch.testing.assert_close(r.value, want, rtol=0, atol=1e-5)


def test_a_rules_own_failure_is_a_capture_error(monkeypatch):
    """A rule that fails (not a Decline) raised its raw exception through every backend, auto
    included; it is now the engine's capture error naming the node: auto runs torch.func and
    records why, an explicit engine backend raises BackendUnavailableError."""
    engine_rules.find_rule(aten.tanh)  # load the rule tables

    def broken(call):
        raise IndexError("tuple index out of range")

    monkeypatch.setitem(engine_rules.RULES, aten.tanh, broken)
    monkeypatch.setitem(engine_rules.RULES, aten.tanh.default, broken)
    enc = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).eval()
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BackendUnavailableError, match=r"rule for node tanh.*IndexError"):
        ff.fsinfo(enc, x, 0.1, backend="engine", estimator="randomized", num_probes=4)
    r = ff.fsinfo(enc, x, 0.1, backend="auto", estimator="randomized", num_probes=4)
    assert r.info["backend"] == "torch"
    assert "IndexError" in r.info["backend_fallback"] and "tanh" in r.info["backend_fallback"]


class _EmbedsEncoder(nn.Module):
    """A transformers model fed ``inputs_embeds``: its last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(inputs_embeds=x).last_hidden_state


def test_gpt2_with_inputs_embeds_on_auto_inside_the_oracles_interval():
    """GPT-2 fed inputs_embeds (use_cache: a DynamicCache that concatenates onto a legacy empty
    tensor) crashed the engine, cpp and auto backends with a raw IndexError."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2Model(cfg).eval()

    enc = _EmbedsEncoder(model).eval()
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    want = ff.fsinfo(enc, x, 0.1, estimator="exact").value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's vmap fallback performance note
        r = ff.fsinfo(enc, x, 0.1)
    assert r.info["backend"] == "engine" and "backend_fallback" not in r.info
    lo, hi = r.ci95()
    assert bool(((lo <= want) & (want <= hi)).all()), (lo, want, hi)


# --- 2. a forward partly computed in float32 --------------------------------------------------


class _Float32Inside(nn.Module):
    """Part of forward cast to float32 (as HF Mamba's ``A_log.float()``): its float64 copy's
    forward and reverse modes round differently at 1e-8, beyond the float64 check's 1e-9."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        h = self.lin(x)
        return torch.tanh(h.float() @ self.w.float()).to(x.dtype) + h


def test_float32_inside_forward_has_a_float64_oracle():
    """The float64 copy of a forward partly cast to float32 (HF Mamba's ``A_log.float()``): its
    modes disagreed in float64 beyond float64 rounding, and the exact routes were refused
    (round 8), then named from the float32 tensors on x's path (round 14). The copy's casts of
    float64 tensors now keep float64, so its oracle is the float64 one of the same computation
    (the module without the casts), and the default calls answer within their intervals."""
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    enc = _Float32Inside().eval()

    class NoCast(_Float32Inside):
        def forward(self, x):
            h = self.lin(x)
            return torch.tanh(h @ self.w.to(h.dtype)) + h

    ref = NoCast().eval()
    ref.load_state_dict(enc.state_dict())
    s64 = torch.tensor(0.1, dtype=torch.float64)
    want = ff.linearize(ref.double(), x.double()).exact()
    lin = ff.linearize(enc, x, seed=0)
    for name in ("fsinfo", "dfil"):
        r = getattr(lin, name)(0.1)
        assert "exact_unavailable" not in r.info
        got = getattr(lin.exact(), name)(s64).value
        torch.testing.assert_close(got, getattr(want, name)(s64).value, rtol=1e-12, atol=1e-12)
        assert bool(((r.value - got).abs() <= r.ci_halfwidth).all()), name
    # a dropped term is still refused as one (no_grad, whatever its dtype)

    class NoGrad(nn.Module):
        def forward(self, x):
            with torch.no_grad():
                s = x.sum(-1, keepdim=True)
            return torch.tanh(x) * s

    with pytest.raises(EncoderError, match="no_grad"):
        ff.linearize(NoGrad(), x.double())


def test_mamba_default_call_is_measured():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(hidden_size=8, num_hidden_layers=1, state_size=2, expand=2,
                                   intermediate_size=16)
    model = transformers.MambaModel(cfg).eval()

    enc = _EmbedsEncoder(model).eval()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    r = ff.fsinfo(enc, x, 0.1, rtol=None, atol=0.05)
    assert torch.isfinite(r.value).all() and "exact_unavailable" not in r.info
    # its scan's float32 casts keep float64 in the float64 copy: an oracle (round 14)
    want = ff.fsinfo(enc, x, 0.1, estimator="exact").value
    assert bool(((r.value - want).abs() <= r.ci_halfwidth).all())


# --- 4. dFIL: estimator='deflated' against another method --------------------------------------


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "diag", "lanczos"])
def test_dfil_deflated_with_another_method_is_refused(method):
    enc = nn.Sequential(nn.Linear(8, 6), nn.Tanh()).eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError, match=re.escape(f"method='{method}' contradicts")):
        ff.dfil(enc, x, 0.1, estimator="deflated", method=method)
    with pytest.raises(InvalidInputError, match="contradicts"):
        ff.linearize(enc, x).dfil_sigma(1.0, estimator="deflated", method=method)
    for ok in ("auto", "deflated"):
        r = ff.dfil(enc, x, 0.1, estimator="deflated", method=ok)
        assert r.info["method"] == "deflated"


def test_profile_plans_no_exact_route_where_the_float64_copy_fails():
    """``profile`` (auto) planned the float64 oracle for a small input (d <= 256) on a split
    whose float64 copy fails (a block run in float32 with weights outside the parameters) and
    aborted; it now plans the randomized routes there and records why."""
    from fsinfo_fast.profile import ProfileConfig
    from fsinfo_fast.profile.runner import make_plan
    from fsinfo_fast.profile.sources import resolve_splits

    class Float32Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.3

        def forward(self, h):
            return torch.tanh(torch.nn.functional.conv2d(h.float(), self.w).to(h.dtype))

    model = torch.nn.Sequential()
    model.add_module("c1", torch.nn.Conv2d(3, 4, 3))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("tail", Float32Block())
    model.eval()
    example = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    splits = resolve_splits(model, ["act", "tail"])
    plan = make_plan(ProfileConfig(), model, splits, example)
    assert not plan.exact and set(plan.exact_unavailable) == {"tail"}
    assert "float64" in plan.exact_unavailable["tail"]
    assert plan.small_exact == ["act"] or "tail" not in plan.small_exact
    assert plan.describe()["exact_unavailable"] == plan.exact_unavailable
    r = ff.fsinfo(splits[1].encoder, example, sigma=0.1)
    assert "exact_unavailable" in r.info or r.estimator == "randomized"
