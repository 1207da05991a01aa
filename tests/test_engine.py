"""Tier B for the linearised engine: layers and the engine's machinery against the float64 oracle.

Each encoder is linearised once; ``jvp``/``vjp`` on seeded probes must equal ``J V`` / ``J^T U``
with ``J`` from :func:`fsinfo_fast.reference.jacobian` (float64 to 1e-10, float32 to ~1e-4
relative), and the engine must really use its compact rule for the layer (checked through
``node_kinds``), not the per-node ``torch.func`` fallback. One test per op rule lives in
``tests/test_rules.py``; third-party models in ``tests/test_third_party.py``. Here: capture
caching, fallback reporting, no silent backend fallback, chunking and out-of-memory handling.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import available_backends, make_products, resolve_backend
from fsinfo_fast.engine.capture import CaptureError, capture
from fsinfo_fast.engine.ops import TorchOps
from fsinfo_fast.engine.products import LinearisedProducts
from fsinfo_fast.engine.torchfunc import TorchFuncProducts
from fsinfo_fast.errors import BackendUnavailableError
from fsinfo_fast.reference import jacobian


def _bn(c: int, dims: int = 2) -> nn.Module:
    bn = nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
    g = torch.Generator().manual_seed(c)
    bn.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
    bn.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return bn


class Lambda(nn.Module):
    def __init__(self, f) -> None:
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


class CatFlatten(nn.Module):
    """cat, sub, mul by constants, view with x.size(0), permute, dropout (eval), F.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("c", torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        h = torch.cat([self.a(x), F.relu(self.b(x))], dim=1) * 0.5
        h = self.drop(h) - x.mean(dim=1, keepdim=True) / 3.0
        h = h.permute(0, 2, 3, 1) * self.c
        return h.reshape(h.size(0), -1)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = _bn(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = _bn(3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Product(nn.Module):
    """torch.sin and h * sigmoid(h): a product of two active tensors (the product rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.sin(self.lin(x))
        return h * torch.sigmoid(h)


class NoRule(nn.Module):
    """cumsum and cummax have no engine rule: they run through per-node torch.func."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.cumsum(self.lin(x), dim=-1)
        return torch.cummax(h, dim=-1).values * 2.0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if x.abs().max() < 1e9:  # data-dependent control flow: cannot be captured
            return torch.tanh(self.lin(x))
        return self.lin(x)


ACTIVATIONS = {
    "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1), "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU("tanh"), "silu": nn.SiLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
    "hardswish": nn.Hardswish(), "elu": nn.ELU(), "softplus": nn.Softplus(),
}


def layer_cases() -> dict[str, tuple[nn.Module, torch.Tensor, set[str]]]:
    """name -> (encoder, input, node kinds that must appear)."""
    g = torch.manual_seed(0)
    cases: dict[str, tuple[nn.Module, torch.Tensor, set[str]]] = {}
    for name, act in ACTIVATIONS.items():
        kind = "gate" if name == "relu" else "scale"
        cases[f"act_{name}"] = (nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 4)),
                                torch.randn(2, 5, generator=g) * 2, {"matmul", kind})
    cases["conv_groups_stride_dilation"] = (
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), nn.ReLU()),
        torch.randn(2, 4, 7, 8, generator=g), {"conv", "gate"})
    cases["conv_stride3_outpad"] = (nn.Conv2d(2, 3, 2, stride=3), torch.randn(2, 2, 8, 7),
                                    {"conv"})
    cases["conv_same_conv1d"] = (
        nn.Sequential(nn.Conv1d(3, 4, 3, padding="same"), nn.GELU(),
                      nn.Conv1d(4, 2, 3, stride=2, padding=1)),
        torch.randn(2, 3, 9, generator=g), {"conv", "scale"})
    cases["batchnorm_eval"] = (
        nn.Sequential(_bn(2), nn.Conv2d(2, 3, 3), _bn(3), nn.Tanh(), nn.Flatten(),
                      nn.Linear(12, 5), _bn(5, dims=1)),
        torch.randn(2, 2, 4, 4, generator=g), {"batchnorm", "conv+batchnorm", "scale"})
    ln = nn.LayerNorm(6)
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.uniform_(-0.5, 0.5)
    cases["layernorm"] = (nn.Sequential(nn.Linear(4, 6), ln, nn.LayerNorm((3, 6))),
                          torch.randn(2, 3, 4, generator=g), {"norm"})
    gn = nn.GroupNorm(2, 4)
    gn.weight.data.uniform_(0.5, 1.5)
    cases["groupnorm"] = (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), gn, nn.SiLU()),
                          torch.randn(2, 2, 4, 4, generator=g), {"norm"})
    cases["maxpool_overlapping"] = (
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(3, 2, padding=1),
                      nn.Conv1d(3, 3, 1) if False else nn.Identity(), nn.Flatten(1),
                      Lambda(lambda h: h.unsqueeze(1)), nn.MaxPool1d(2)),
        torch.randn(2, 2, 7, 7, generator=g), {"maxpool"})
    cases["avgpool_adaptive"] = (
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(3, 2, padding=1),
                      nn.Tanh(), nn.AdaptiveAvgPool2d((2, 3))),
        torch.randn(2, 2, 7, 9, generator=g), {"avgpool", "scale"})
    cases["residual_inplace_relu"] = (Residual(), torch.randn(2, 3, 4, 4, generator=g),
                                      {"add", "gate", "conv+batchnorm"})
    cases["cat_mul_sub_view_permute"] = (CatFlatten(), torch.randn(2, 2, 3, 4, generator=g),
                                         {"mul", "add", "gate", "cat", "view", "reduce"})
    cases["product_rule"] = (Product(), torch.randn(2, 6, generator=g), {"product", "scale"})
    cases["fallback_node"] = (NoRule(), torch.randn(2, 6, generator=g), {"torch.func"})
    return cases


CASES = layer_cases()


def _products(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, **kw) -> LinearisedProducts:
    enc = prepare(model.eval() if isinstance(model, nn.Module) else model, x, dtype=dtype)
    return LinearisedProducts(enc, **kw)


def _check_against_oracle(model, x, dtype, tol, kinds=None, k=3, **kw):
    P = _products(model, x, dtype, **kw)
    if kinds is not None:
        got = set(P.node_kinds.values())
        assert kinds <= got, f"expected node kinds {kinds}, got {P.node_kinds}"
        if "torch.func" not in kinds:
            assert "torch.func" not in got, P.node_kinds
    J = jacobian(model, x)  # [B, m, d] float64
    g = torch.Generator().manual_seed(7)
    V = torch.randn(P.batch, k, P.d, generator=g, dtype=torch.float64)
    U = torch.randn(P.batch, k, P.m, generator=g, dtype=torch.float64)
    jv = P.jvp(V).double()
    vj = P.vjp(U).double()
    want_jv = torch.einsum("bmd,bkd->bkm", J, V)
    want_vj = torch.einsum("bmd,bkm->bkd", J, U)
    scale_jv = float(want_jv.abs().max()) + 1e-30
    scale_vj = float(want_vj.abs().max()) + 1e-30
    assert float((jv - want_jv).abs().max()) <= tol * scale_jv
    assert float((vj - want_vj).abs().max()) <= tol * scale_vj
    return P


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_float64_matches_oracle(name):
    model, x, kinds = CASES[name]
    _check_against_oracle(model, x, torch.float64, 1e-10, kinds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_float32_matches_oracle(name):
    model, x, kinds = CASES[name]
    _check_against_oracle(model, x, torch.float32, 1e-4, kinds)


@pytest.mark.parametrize("name", ["cnn_bn_maxpool_m<d", "cnn_bn_maxpool_m>d", "residual_m=d",
                                  "tanh_mlp_m<d", "tanh_mlp_m>d", "linear_m>d", "attention_m=d"])
def test_zoo_matches_oracle(zoo, name):
    model, x = zoo[name]
    kinds = {"attention", "norm"} if name.startswith("attention") else None
    _check_against_oracle(model, x, torch.float64, 1e-10, kinds)


def test_chunking_gives_the_same_products():
    model, x, _ = CASES["maxpool_overlapping"]
    enc = prepare(model, x, dtype=torch.float64)
    whole, chunked = LinearisedProducts(enc), LinearisedProducts(enc, chunk_size=2)
    V = torch.randn(2, 5, enc.d, dtype=torch.float64)
    U = torch.randn(2, 5, enc.m, dtype=torch.float64)
    torch.testing.assert_close(chunked.jvp(V), whole.jvp(V), rtol=0, atol=1e-13)
    torch.testing.assert_close(chunked.vjp(U), whole.vjp(U), rtol=0, atol=1e-13)
    assert chunked.jvp_passes == 5 and chunked.vjp_passes == 5


def test_primal_runs_once():
    model, x, _ = CASES["residual_inplace_relu"]
    calls = {"root": 0, "conv": 0}
    h1 = model.register_forward_hook(lambda *a: calls.__setitem__("root", calls["root"] + 1))
    h2 = model.conv1.register_forward_hook(
        lambda *a: calls.__setitem__("conv", calls["conv"] + 1))
    try:
        P = _products(model, x, torch.float32)
        after_init = dict(calls)
        for _ in range(3):
            P.jvp(torch.randn(2, 4, P.d))
            P.vjp(torch.randn(2, 4, P.m))
    finally:
        h1.remove()
        h2.remove()
    assert after_init["conv"] >= 1  # the hook does see the primal
    assert calls == after_init, "jvp/vjp recomputed the primal"


def test_explicit_engine_raises_when_it_cannot_capture():
    """No silent fallback: backend="engine" raises with the reason and the capture error as
    its cause; ``auto`` falls back to torch.func and records why in result.info."""
    model, x = Untraceable().eval(), torch.randn(2, 4)
    enc = prepare(model, x)
    with pytest.raises(CaptureError, match="make_fx could not capture"):
        LinearisedProducts(enc)
    for name in ("engine", "cpp"):
        if not available_backends()[name][0]:
            continue
        with pytest.raises(BackendUnavailableError, match=f"'{name}' was requested but cannot "
                           "serve this encoder: make_fx could not capture") as info:
            make_products(enc, name)
        assert isinstance(info.value.__cause__, CaptureError)
        with pytest.raises(BackendUnavailableError, match="cannot serve"):
            ff.fsinfo(model, x, estimator="randomized", num_probes=4, backend=name)
    r = ff.fsinfo(model, x, estimator="randomized", num_probes=4, backend="auto")
    assert r.info["backend"] == "torch"
    assert r.info["backend_fallback"].startswith("engine -> torch: make_fx could not capture")


def test_environment_backend_counts_as_explicit(monkeypatch):
    model, x = Untraceable().eval(), torch.randn(2, 4)
    monkeypatch.setenv("FSINFO_FAST_BACKEND", "engine")
    with pytest.raises(BackendUnavailableError, match="cannot serve"):
        make_products(prepare(model, x), "auto")


def test_per_node_fallback_is_exact_and_reported():
    model, x, _ = CASES["fallback_node"]
    P = _check_against_oracle(model, x, torch.float64, 1e-10, {"torch.func", "matmul"})
    ops = sorted(f["op"] for f in P.fallbacks)
    assert ops == ["aten.cummax.default", "aten.cumsum.default"], P.fallbacks
    assert all(f["reason"] == f"no rule for {f['op']}" for f in P.fallbacks)
    assert P.info["engine_fallback_nodes"] == P.fallbacks
    assert P.fallback_share == 1.0
    # explicit engine: runs, and the metric's info lists the nodes
    r = ff.dfil(model, x, estimator="randomized", num_probes=4, backend="engine")
    assert r.info["backend"] == "engine"
    assert [f["op"] for f in r.info["engine_fallback_nodes"]] == [f["op"] for f in P.fallbacks]


def test_capture_is_cached_per_shape_and_invalidated():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Tanh()).eval()
    x = torch.randn(2, 3)
    c1 = capture(model, x)
    assert capture(model, x.clone()) is c1  # same shape, dtype, device: cached
    assert capture(model, torch.randn(4, 3)) is not c1  # another batch size
    assert capture(model, x.double()) is not c1
    model.train()  # another training flag: captured again, and refused (dropout draws)
    with pytest.raises(CaptureError, match=r"a random draw in forward \(aten.bernoulli"):
        capture(model, x)
    model.eval()
    assert capture(model, x) is c1
    model[0].weight = nn.Parameter(torch.randn(5, 3))  # another parameter shape
    model[0].bias = nn.Parameter(torch.randn(5))
    assert capture(model, x) is not c1


def test_products_read_the_live_weights():
    """The captured graph takes parameters as inputs: a weight changed in place after the
    capture is seen by the next linearisation (no stale copy in the graph)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    model.double()
    LinearisedProducts(prepare(model, x))
    with torch.no_grad():
        model[0].weight.mul_(-2.0)
    _check_against_oracle(model, x, torch.float64, 1e-10, {"matmul", "scale"})


class _Stop(Exception):
    pass


class HookCut(nn.Module):
    """The bottom of ``model`` up to ``path``, stopped early by raising from a forward hook."""

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        self.model, self.path = model, path

    def forward(self, x):
        box = {}

        def hook(mod, inp, out):
            box["out"] = out
            raise _Stop

        h = self.model.get_submodule(self.path).register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            h.remove()
        return box["out"]


def test_hook_based_early_exit_captures_the_prefix_only():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5),
                          nn.Softmax(-1)).eval()
    enc = HookCut(model, "1")
    x = torch.randn(2, 2, 6, 6)
    ops = capture(enc, x).ops()
    assert ops == ["aten.convolution.default", "aten.relu.default"], ops
    _check_against_oracle(enc, x, torch.float64, 1e-10, {"conv", "gate"})


def test_out_of_memory_halves_the_chunk_then_names_the_sizes(monkeypatch):
    model, x, _ = CASES["act_tanh"]
    P = _products(model, x, torch.float64, chunk_size=8)
    V = torch.randn(2, 8, P.d, dtype=torch.float64)
    whole = P.jvp(V)
    real = P._jvp
    # after halving 8 -> 4 -> 2 the products come from chunks of two probes: the same calls
    # made directly give the same bits; the whole-chunk answer agrees to float64 rounding
    # (BLAS may block a batch of 8 differently from a batch of 2).
    want = torch.cat([real(V[:, i:i + 2]) for i in range(0, 8, 2)], dim=1)
    torch.testing.assert_close(want, whole, rtol=1e-13, atol=1e-15)

    def limited(T):
        if T.shape[1] > 2:
            raise torch.OutOfMemoryError("fake: too many probes")
        return real(T)

    monkeypatch.setattr(P, "_jvp", limited)
    torch.testing.assert_close(P.jvp(V), want, rtol=0, atol=0)
    assert P.chunk_size == 2

    def never(T):
        raise torch.OutOfMemoryError("fake: nothing fits")

    monkeypatch.setattr(P, "_jvp", never)
    with pytest.raises(torch.OutOfMemoryError, match=r"one probe of 2 sample\(s\) does not fit"
                       r".*d = 5, m = 4") as info:
        P.jvp(V)
    assert "nothing fits" in str(info.value.__cause__)


def test_torch_backend_does_not_retry_out_of_memory_with_double_backward(monkeypatch):
    model, x, _ = CASES["act_tanh"]
    P = TorchFuncProducts(prepare(model, x), chunk_size=4)
    calls = []

    def oom(*a, **k):
        calls.append(1)
        raise torch.OutOfMemoryError("fake")

    monkeypatch.setattr("fsinfo_fast.engine.torchfunc._jvp", oom)
    with pytest.raises(torch.OutOfMemoryError, match="one probe"):
        P.jvp(torch.randn(2, 4, 5))
    assert P._jvp_route == 0 and P.chunk_size == 1  # halved 4 -> 2 -> 1, never route 2


def test_products_expose_ops_and_protocol_attributes():
    model, x, _ = CASES["act_tanh"]
    P = make_products(prepare(model, x), "engine")
    assert isinstance(P, LinearisedProducts) and P.backend == "engine"
    assert isinstance(P.ops, TorchOps)
    assert (P.batch, P.d, P.m, P.dtype) == (2, 5, 4, torch.float32)
    with pytest.raises(ff.errors.InvalidInputError):
        P.jvp(torch.randn(2, 3, 4))


@pytest.mark.parametrize("variant", ["diag", "logdet"])
def test_public_metric_engine_equals_torch(variant):
    model, x, _ = CASES["residual_inplace_relu"]
    model.eval()
    kw = {"estimator": "randomized", "num_probes": 6, "seed": 3}
    if variant == "logdet":
        kw.update(prior_var=1.0, lanczos_order=8)
    a = ff.fsinfo(model, x, 0.1, variant=variant, backend="engine", **kw)
    b = ff.fsinfo(model, x, 0.1, variant=variant, backend="torch", **kw)
    assert a.info["backend"] == "engine" and b.info["backend"] == "torch"
    torch.testing.assert_close(a.value, b.value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-3, atol=1e-6)


def test_public_dfil_engine_equals_torch():
    model, x, _ = CASES["maxpool_overlapping"]
    kw = {"estimator": "randomized", "num_probes": 8, "seed": 1}
    a = ff.dfil(model, x, 0.1, backend="engine", **kw)
    b = ff.dfil(model, x, 0.1, backend="torch", **kw)
    torch.testing.assert_close(a.value, b.value, rtol=1e-4, atol=0)


def test_explicit_unavailable_backend_raises_with_reason():
    x = torch.randn(2, 5)
    with pytest.raises(BackendUnavailableError, match="'cuda' was requested but cannot run: .+"):
        resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="cannot run"):
        ff.fsinfo(nn.Linear(5, 3), x, estimator="randomized", num_probes=2, backend="cuda")
    avail = available_backends()
    assert avail["engine"][0] and avail["torch"][0]
    assert all(isinstance(why, str) and why for _, why in avail.values())


def test_auto_never_picks_a_gpu_backend_for_cpu_data(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FSINFO_FAST_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) in ("cpp", "engine")


def test_auto_uses_torch_where_most_nodes_would_fall_back(monkeypatch):
    monkeypatch.delenv("FSINFO_FAST_BACKEND", raising=False)
    model, x, _ = CASES["fallback_node"]
    P = make_products(prepare(model, x), "auto")
    assert P.backend == "torch"
    assert "2 of the encoder's nodes with per-sample state (100%)" in P.info["backend_fallback"]
    assert len(P.info["engine_fallback_nodes"]) == 2
    r = ff.dfil(model, x, estimator="randomized", num_probes=4)
    assert r.info["backend"] == "torch" and "cumsum" in r.info["backend_fallback"]
    model, x, _ = CASES["act_gelu"]
    P = make_products(prepare(model, x), "auto")
    assert P.backend in ("cpp", "engine") and P.info["engine_fallback_nodes"] == []


def test_import_does_not_initialise_cuda():
    code = ("import torch, fsinfo_fast, fsinfo_fast.engine as e; e.available_backends(); "
            "e.resolve_backend('auto', torch.device('cpu')); "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_reduced_precision_scales_are_opt_in():
    model, x, _ = CASES["act_tanh"]
    exact = _check_against_oracle(model, x, torch.float32, 1e-5)
    assert all(s.lin.s.dtype == torch.float32 for s in exact._steps if hasattr(s.lin, "s"))
    # bfloat16 storage of tanh' costs ~3 significant digits: visible, bounded
    _check_against_oracle(model, x, torch.float32, 2e-2, scale_dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        _check_against_oracle(model, x, torch.float32, 1e-6, scale_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_metrics_through_every_op_implementation(backend):
    """The estimators' fused reductions and Lanczos steps, and the engine's gate / max-pool ops,
    run on ``backend``'s ops (Triton interpreted on the CPU) and give the same numbers as the
    torch.func backend on the same probes."""
    from fsinfo_fast.engine import available_backends

    ok, why = available_backends()[backend]
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2),
        torch.nn.Flatten(), torch.nn.Linear(27, 40), torch.nn.Tanh(),
    ).double().eval()
    x = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.engine import make_products

    prods = make_products(prepare(enc, x), backend)
    assert prods.ops.name == backend and prods.fallback_share == 0
    kw = dict(sigma=0.3, estimator="randomized", num_probes=6, seed=3)
    for fn, extra in ((ff.fsinfo, {}), (ff.fsinfo, {"variant": "logdet", "prior_var": 2.0,
                                                     "lanczos_order": 8}), (ff.dfil, {})):
        want = fn(enc, x, backend="torch", **kw, **extra)
        got = fn(enc, x, backend=backend, **kw, **extra)
        assert torch.allclose(got.value, want.value, rtol=1e-9, atol=1e-9), (fn, extra)
        assert torch.allclose(got.stderr, want.stderr, rtol=1e-7, atol=1e-9)


def _write_models(path) -> None:
    path.joinpath("engine_cli_models.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "class NoRule(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(6, 5)\n\n"
        "    def forward(self, x):\n"
        "        return torch.cumsum(torch.tanh(self.lin(x)), dim=-1)\n\n"
        "class Untraceable(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2 if x.sum() > 0 else x\n\n"
        "def no_rule():\n"
        "    return NoRule()\n\n"
        "def untraceable():\n"
        "    return Untraceable()\n"
    )


def test_info_model_lists_fallback_nodes_and_why(tmp_path, monkeypatch, capsys):
    from fsinfo_fast.cli import main

    _write_models(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FSINFO_FAST_BACKEND", raising=False)
    assert main(["info", "--model", "resnet18", "--split", "7"]) == 0
    out = capsys.readouterr().out
    assert "engine on resnet18 cut at 7, input (3, 32, 32):" in out
    assert "conv+batchnorm 10, gate 9, add 4" in out
    assert "every node has an engine rule" in out and "backend auto picks: engine" in out
    assert main(["info", "--model", "engine_cli_models:no_rule", "--input-shape", "6"]) == 0
    out = capsys.readouterr().out
    assert ("torch.func: node cumsum (aten.cumsum.default): no rule for aten.cumsum.default"
            in out)
    assert "backend auto picks: engine" in out  # 1 of 2 stateful nodes: at the 50% threshold
    assert main(["info", "--model", "engine_cli_models:untraceable", "--input-shape", "4",
                 "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)["engine_model_report"]
    assert not rep["captured"] and "make_fx could not capture" in rep["reason"]
    assert rep["auto"] == "torch" and rep["auto_reason"].startswith("engine -> torch: make_fx")


def test_plain_function_encoder_with_closed_over_tensors():
    """A callable (not a module): tensors it closes over become graph constants (real)."""
    W = torch.randn(5, 4, dtype=torch.float64)

    def encoder(x):
        return torch.tanh(x @ W) * 2.0

    x = torch.randn(3, 5, dtype=torch.float64)
    P = _check_against_oracle(encoder, x, torch.float64, 1e-10, {"matmul", "scale", "mul"})
    assert P.fallbacks == []
