"""Fuzz round 7, engine backend: opaque capture ops (attention, RMS norm) with the real op's
output shape and layout, replay failures as capture errors, declined opaque nodes served by
the per-node fallback, and the reasons the engine gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import make_products
from fsinfo_fast.engine.capture import CaptureError, capture
from fsinfo_fast.engine.products import LinearisedProducts
from fsinfo_fast.errors import BackendUnavailableError
from fsinfo_fast.reference import jacobian

T, E = 5, 8


def _check(model: nn.Module, x: torch.Tensor, tol: float = 1e-5, k: int = 3
           ) -> LinearisedProducts:
    """The engine's float32 products against the float64 Jacobian on seeded probes."""
    P = LinearisedProducts(prepare(model, x, dtype=torch.float32))
    J = jacobian(model, x)
    g = torch.Generator().manual_seed(7)
    V = torch.randn(P.batch, k, P.d, generator=g, dtype=torch.float64)
    U = torch.randn(P.batch, k, P.m, generator=g, dtype=torch.float64)
    jv = P.jvp(V.float()).double()
    vj = P.vjp(U.float()).double()
    want_jv = torch.einsum("bmd,bkd->bkm", J, V)
    want_vj = torch.einsum("bmd,bkm->bkd", J, U)
    assert float((jv - want_jv).norm() / want_jv.norm()) <= tol
    assert float((vj - want_vj).norm() / want_vj.norm()) <= tol
    return P


class ConstMem(nn.Module):
    """Input-dependent query, learned key/value memory [1, H, S, D] broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.randn(1, 2, 4, 4))
        self.v = nn.Parameter(torch.randn(1, 2, 4, 4))
        self.q = nn.Linear(E, E)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x).view(b, T, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, self.k, self.v).transpose(1, 2).reshape(b, T, E)


class RMSTransposed(nn.Module):
    def forward(self, x):  # RMS-normalise over T
        y = F.rms_norm(x.transpose(1, 2), (T,))
        return y.transpose(1, 2).reshape(x.shape[0], -1)


class SDPAvdim(nn.Module):
    """Value head dimension 3, query/key head dimension 4."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, 8), nn.Linear(E, 8), nn.Linear(E, 6)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x).view(b, T, 2, 4).transpose(1, 2)
        k = self.k(x).view(b, T, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, T, 2, 3).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, T, 6)


def test_sdpa_with_constant_key_value_broadcast_over_the_batch():
    """Was a raw 'view size is not compatible' RuntimeError on engine, cpp, auto and default
    ff.fsinfo (the fake kernel copied the query's strides)."""
    torch.manual_seed(0)
    enc, x = ConstMem().eval(), torch.randn(2, T, E)
    P = _check(enc, x)
    assert "attention" in P.node_kinds.values()
    r = ff.fsinfo(enc, x, sigma=0.1)
    assert r.info["backend"] in ("engine", "cpp")
    ref = ff.fsinfo(enc, x, sigma=0.1, backend="torch")
    assert torch.allclose(r.value, ref.value, rtol=1e-4, atol=1e-4)


def test_rms_norm_over_a_transposed_view():
    torch.manual_seed(0)
    _check(RMSTransposed(), torch.randn(2, T, E))


def test_sdpa_with_value_head_dim_unlike_the_query():
    """The capture failed ("shape '[2, 5, 6]' is invalid for input of size 80")."""
    torch.manual_seed(0)
    P = _check(SDPAvdim().eval(), torch.randn(2, T, E))
    assert "attention" in P.node_kinds.values()
    assert P.fallbacks == []


def test_a_failure_replaying_the_graph_is_a_capture_error_naming_the_node():
    """An op of the captured graph that fails on the real batch was a raw traceback on every
    engine backend and under auto: now a CaptureError naming the node (auto falls back to
    torch with the reason, an explicit engine raises BackendUnavailableError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval()
    x = torch.randn(2, 4)
    cap = capture(model, x)
    node = next(n for n in cap.graph.nodes if n.op == "call_function"
                and "tanh" in str(n.target))

    def broken(*args, **kwargs):
        raise RuntimeError("view size is not compatible with input tensor's size and stride")

    node.target = broken
    enc = prepare(model, x)
    with pytest.raises(CaptureError, match=f"replaying the captured graph failed at node "
                       f"{node.name} .*view size is not compatible"):
        LinearisedProducts(enc)
    with pytest.raises(BackendUnavailableError, match=f"'engine' was requested but cannot serve "
                       f"this encoder: replaying the captured graph failed at node {node.name}"):
        make_products(enc, "engine")
    r = ff.fsinfo(model, x, sigma=0.1)
    assert r.info["backend"] == "torch"
    assert f"replaying the captured graph failed at node {node.name}" in \
        r.info["backend_fallback"]


class GQA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, 8), nn.Linear(E, 4), nn.Linear(E, 4)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x).view(b, T, 4, 2).transpose(1, 2)
        k = self.k(x).view(b, T, 2, 2).transpose(1, 2)
        v = self.v(x).view(b, T, 2, 2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, T, E)


class InputMask(nn.Module):
    """An additive attention mask computed from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(E, E)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x).view(b, T, 2, 4).transpose(1, 2)
        mask = torch.tanh(x @ x.transpose(1, 2)).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, T, E)


class RMSInputWeight(nn.Module):
    def forward(self, x):
        return torch.stack([F.rms_norm(xi, (E,), weight=xi[0].sigmoid()) for xi in x.unbind(0)])


@pytest.mark.parametrize("model, op, reason", [
    (GQA, "sdpa", "grouped-query"),
    (InputMask, "sdpa", "argument 3"),
    (RMSInputWeight, "rms_norm", "argument 2"),
])
def test_declined_opaque_nodes_run_the_plain_function(model, op, reason):
    """Where the attention or RMS-norm rule declines, the node's per-node torch.func fallback
    ran the capture's custom op, whose autograd cannot run under torch.func: explicit engine
    was refused with an unrelated 'setup_context' message. It now runs the function the op
    wraps, and is exact."""
    torch.manual_seed(0)
    enc, x = model().eval(), torch.randn(2, T, E)
    P = _check(enc, x)
    assert P.fallbacks and all(f"fsinfo_fast_capture.{op}" in f["op"] for f in P.fallbacks)
    assert all(reason in f["reason"] for f in P.fallbacks)
    r = ff.fsinfo(enc, x, sigma=0.1, backend="engine")
    ref = ff.fsinfo(enc, x, sigma=0.1, backend="torch")
    assert torch.allclose(r.value, ref.value, rtol=1e-4, atol=1e-4)


def test_instance_norm_fallback_reason_names_instance_norm_not_eval():
    """nn.InstanceNorm2d in eval mode: the fallback reason said 'BatchNorm in training mode
    uses batch statistics: call .eval()' (InstanceNorm calls batch_norm with training=True
    on a [1, B*C, ...] view); the products were and are exact."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    P = _check(enc, x)
    assert [f["op"] for f in P.fallbacks] == ["aten.native_batch_norm.default"]
    why = P.fallbacks[0]["reason"]
    assert "InstanceNorm" in why and "[1, 8, 4, 4]" in why
    assert "call .eval()" not in why


class SeededMask(nn.Module):
    """A fixed mask drawn from a freshly seeded generator in forward (deterministic)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(E, E)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x).view(b, T, 2, 4).transpose(1, 2)
        m = torch.rand(T, T, generator=torch.Generator().manual_seed(3)) > 0.3
        m[:, 0] = True
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=m)
        return out.transpose(1, 2).reshape(b, T, E)


def test_random_draw_in_forward_refuses_the_engine_up_front():
    """The capture baked the Generator into the cached graph and each replay advanced it: the
    first linearize worked, every later one of that shape was refused with 'the captured
    primal differs ... by 0.9' and no hint. Now refused from the start, with the op named;
    auto falls back to torch (recorded) and matches it."""
    torch.manual_seed(0)
    enc, x = SeededMask().eval(), torch.randn(2, T, E)
    why = r"a random draw in forward \(aten.rand.generator\): each replay of the captured " \
          r"graph would draw new numbers; backend='torch' runs forward itself"
    for _ in range(2):
        with pytest.raises(BackendUnavailableError, match="'engine' was requested but cannot "
                           "serve this encoder: " + why):
            _ = ff.linearize(enc, x, backend="engine").products
    r = ff.fsinfo(enc, x, sigma=0.1)
    assert r.info["backend"] == "torch"
    assert "aten.rand.generator" in r.info["backend_fallback"]
    ref = ff.fsinfo(enc, x, sigma=0.1, backend="torch")
    assert torch.allclose(r.value, ref.value)


class Moments(nn.Module):
    """std / var / std_mean / var_mean over several dims, some rows of zero variance."""

    def __init__(self, f) -> None:
        super().__init__()
        self.lin, self.f = nn.Linear(4, 4), f

    def forward(self, x):  # x [B, 3, 4]
        h = self.lin(x)
        return torch.cat([h.reshape(x.shape[0], -1), self.f(x).reshape(x.shape[0], -1)], 1)


MOMENTS = {
    "std_keepdim": lambda x: x.std(-1, keepdim=True),
    "std_dims": lambda x: x.std((1, 2)),
    "std_correction0": lambda x: x.std(1, correction=0),
    "var_correction2": lambda x: torch.var(x, -1, correction=2),
    "var_default": lambda x: x.var(-1),
    "std_mean_both": lambda x: torch.cat(torch.std_mean(x, -1, keepdim=True), -1),
    "var_mean_both": lambda x: torch.cat(torch.var_mean(x, 1), -1),
    "sqrt_of_std_plus_one": lambda x: (x.std(-1) + 1).sqrt(),
}


@pytest.mark.parametrize("name", sorted(MOMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_std_and_var_match_autograd_at_zero_variance(name, dtype):
    """std over a zero-variance row was refused ('relative difference nan ... stop-gradient'):
    its decomposition sqrt(var) gives sqrt'(0) * 0 = NaN where autograd gives 0. std is now
    kept whole and var/std (and their _mean forms) have a rule, exact against the Jacobian."""
    torch.manual_seed(0)
    enc = Moments(MOMENTS[name]).eval()
    x = torch.randn(3, 3, 4)
    x[1, 0] = 0.5  # a constant row (zero variance over the last dim)
    x[2] = -1.0  # a constant sample (zero variance over every dim)
    P = LinearisedProducts(prepare(enc, x.to(dtype), dtype=dtype))
    assert P.fallbacks == []
    assert "norm" in P.node_kinds.values()  # the moment rule, not sqrt's
    J = jacobian(enc, x)
    assert torch.isfinite(J).all()
    g = torch.Generator().manual_seed(7)
    V = torch.randn(P.batch, 3, P.d, generator=g, dtype=torch.float64)
    U = torch.randn(P.batch, 3, P.m, generator=g, dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    jv, vj = P.jvp(V.to(dtype)).double(), P.vjp(U.to(dtype)).double()
    want_jv = torch.einsum("bmd,bkd->bkm", J, V)
    want_vj = torch.einsum("bmd,bkm->bkd", J, U)
    assert float((jv - want_jv).norm() / want_jv.norm()) <= tol
    assert float((vj - want_vj).norm() / want_vj.norm()) <= tol
    r = ff.fsinfo(enc, x, sigma=0.1, backend="engine")
    ref = ff.fsinfo(enc, x, sigma=0.1, backend="torch")
    assert torch.allclose(r.value, ref.value, rtol=1e-4, atol=1e-4)
