"""split(): cutting zoo and custom models by paper index, module path and fx node name."""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.fx as fx
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.errors import InvalidInputError, InvalidInputTypeError, SplitError
from fsinfo_fast.models import resnet18, vgg5, vgg9
from fsinfo_fast.split import HookEncoder, first_tensor, insert, split

from .helpers import NoForwardAD


def _manual_prefix(model: nn.Module, k: int, x: torch.Tensor) -> torch.Tensor:
    """Run the model's paper layers 0..k by hand (flatten before the first dense layer)."""
    h = x
    for path in model.split_points[: k + 1]:
        mod = model.get_submodule(path)
        first = next(iter(mod.modules())) if not isinstance(mod, nn.Sequential) else mod[0]
        if h.ndim == 4 and isinstance(first, nn.Linear):
            h = torch.flatten(h, 1)
        h = mod(h)
    return h


@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    return {
        "vgg5": vgg5(input_size=16).eval(),
        "vgg9": vgg9(input_size=16, hidden=32).eval(),
        "resnet18": resnet18().eval(),
    }


@pytest.mark.parametrize("name", ["vgg5", "vgg9", "resnet18"])
def test_split_by_index_equals_forward_prefix(small_models, name):
    model = small_models[name]
    x = torch.rand(2, 3, 16, 16)
    for k in range(len(model.split_points)):
        enc = split(model, k)
        assert enc.split_index == k and enc.split_name == model.split_points[k]
        with torch.no_grad():
            torch.testing.assert_close(enc(x), _manual_prefix(model, k, x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the last split is the whole model
        torch.testing.assert_close(split(model, -1)(x), model(x), rtol=1e-6, atol=1e-6)


def test_resnet18_split7_by_hand(small_models):
    m = small_models["resnet18"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
        out = split(m, 7)(x)
    assert out.shape == (2, 128, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_resnet18_paper_split_shapes(small_models):
    m = small_models["resnet18"]
    x = torch.rand(1, 3, 32, 32)
    shapes = [tuple(split(m, k)(x).shape) for k in m.paper_splits]
    assert shapes == [(1, 64, 32, 32), (1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8),
                      (1, 512, 4, 4)]


def test_vgg5_split2_is_conv_pool_conv(small_models):
    m = small_models["vgg5"]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = m.features[2](m.features[1](m.features[0](x)))
        torch.testing.assert_close(split(m, 2)(x), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(split(m, "features.2")(x), ref, rtol=1e-6, atol=1e-6)
    assert split(m, "features.2").split_index == 2


class Residual(nn.Module):
    """A non-zoo model: conv, residual add around a Sequential, functional relu, dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.act = nn.Tanh()
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = h + self.block(h)
        h = torch.relu(h)
        h = self.act(h)  # second call of the same module
        return self.head(h.flatten(1))


@pytest.fixture
def res():
    torch.manual_seed(0)
    return Residual().eval()


def test_custom_model_by_module_path(res):
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        h0 = torch.tanh(res.inp(x))
        torch.testing.assert_close(split(res, "block")(x), res.block(h0))
        torch.testing.assert_close(split(res, "block.0")(x), res.block[0](h0))
        # a module called twice is cut at its LAST call
        after = torch.tanh(torch.relu(h0 + res.block(h0)))
        torch.testing.assert_close(split(res, "act")(x), after)
        torch.testing.assert_close(split(res, "head")(x), res(x))
    enc = split(res, "block")
    assert enc.split_name == "block" and enc.split_index is None
    assert isinstance(enc, fx.GraphModule)
    assert not hasattr(enc, "head")  # dead code and unused modules are dropped


def test_custom_model_by_node_name(res):
    x = torch.rand(3, 3, 8, 8)
    names = [n.name for n in fx.symbolic_trace(res).graph.nodes]
    assert {"add", "relu", "act", "act_1"} <= set(names)
    with torch.no_grad():
        h0 = torch.tanh(res.inp(x))
        s = h0 + res.block(h0)
        torch.testing.assert_close(split(res, "add")(x), s)
        torch.testing.assert_close(split(res, "relu")(x), torch.relu(s))
        torch.testing.assert_close(split(res, "act")(x), torch.tanh(torch.relu(s)))  # module path
        torch.testing.assert_close(split(res, "act_1")(x), torch.tanh(torch.relu(s)))
        torch.testing.assert_close(split(res, "output")(x), res(x))
    assert split(res, "add").split_name == "add"


def test_node_name_on_zoo_model_gets_index(small_models):
    m = small_models["resnet18"]
    x = torch.rand(1, 3, 16, 16)
    enc = split(m, "layer1_0_relu_1")  # the output of block layer1.0, traced through
    assert enc.split_index is None
    with torch.no_grad():
        torch.testing.assert_close(enc(x), split(m, 4)(x), rtol=1e-6, atol=1e-6)
    assert split(m, "fc").split_index == 13


def test_parameters_shared_not_copied(res):
    enc = split(res, "add")
    model_params = {id(p) for p in res.parameters()}
    assert len(list(enc.parameters())) > 0
    assert all(id(p) in model_params for p in enc.parameters())
    assert enc.get_submodule("inp").weight is res.inp.weight
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        before = enc(x).clone()
        res.inp.bias.add_(1.0)  # changing the model changes the encoder
        assert not torch.allclose(enc(x), before)
    assert set(enc.state_dict()) <= set(res.state_dict())


def test_zoo_parameters_shared(small_models):
    m = small_models["vgg5"]
    enc = split(m, 4)
    assert enc.get_submodule("features.0.0").weight is m.features[0][0].weight
    assert enc.get_submodule("features.4.1").running_mean is m.features[4][1].running_mean


def test_mode_preserved():
    torch.manual_seed(0)
    m = vgg5(input_size=16)
    m.eval()
    enc = split(m, 3)
    assert not enc.training and not any(x.training for x in enc.modules())
    m.train()
    m.features[0][1].eval()  # a frozen BatchNorm keeps its own flag
    enc = split(m, 3)
    assert enc.training and enc.get_submodule("features.2.1").training
    assert not enc.get_submodule("features.0.1").training
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
    assert not split(seq, 0).training


def test_plain_sequential_by_index_and_name():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.rand(5, 4)
    enc = split(seq, 1)
    assert isinstance(enc, nn.Sequential) and len(enc) == 2
    assert enc[0] is seq[0] and enc.split_name == "1" and enc.split_index == 1
    torch.testing.assert_close(enc(x), torch.relu(seq[0](x)))
    torch.testing.assert_close(split(seq, "1")(x), enc(x))
    torch.testing.assert_close(split(seq, -1)(x), seq(x))
    named = nn.Sequential(OrderedDict(conv=nn.Linear(4, 6), act=nn.ReLU(), out=nn.Linear(6, 3)))
    e = split(named, "act")
    assert list(e._modules) == ["conv", "act"] and e.split_index == 1


def test_encoder_retraceable_and_differentiable(res):
    enc = split(res, "relu")
    x = torch.rand(2, 3, 8, 8)
    gm = fx.symbolic_trace(enc)
    torch.testing.assert_close(gm(x), enc(x))
    _, tangent = torch.func.jvp(enc, (x,), (torch.ones_like(x),))
    assert tangent.shape == (2, 4, 8, 8) and torch.isfinite(tangent).all()


def test_package_level_split_is_callable_every_time(res):
    x = torch.rand(1, 3, 8, 8)
    a = ff.split(res, "add")(x)
    b = ff.split(res, "add")(x)  # a lazily imported submodule must not shadow the function
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- error paths


def test_unknown_name_lists_close_matches_and_split_points(small_models):
    with pytest.raises(SplitError) as e:
        split(small_models["resnet18"], "layer5")
    msg = str(e.value)
    assert "unknown split point 'layer5'" in msg
    assert "Did you mean" in msg and "'layer4'" in msg
    assert "7=layer2.1" in msg  # the split points, with their indices


def test_unknown_name_without_split_points_lists_modules(res):
    with pytest.raises(SplitError) as e:
        split(res, "blok")
    msg = str(e.value)
    assert "'block'" in msg and "Top-level modules: inp, block, act, head" in msg


def test_int_without_split_points(res):
    with pytest.raises(SplitError, match="no `split_points`") as e:
        split(res, 2)
    assert "module path" in str(e.value) and "inp, block" in str(e.value)


@pytest.mark.parametrize("at", [14, -15, 100])
def test_index_out_of_range(small_models, at):
    with pytest.raises(SplitError) as e:
        split(small_models["resnet18"], at)
    msg = str(e.value)
    assert f"split index {at} is out of range" in msg and "0..13" in msg and "13=fc" in msg


def test_sequential_index_out_of_range():
    with pytest.raises(SplitError, match=r"out of range .*0\.\.1"):
        split(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 2)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.head(self.body(x))


def test_untraceable_model_by_module_path_uses_hooks():
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.rand(4, 3)
    x[0] = -1.0  # sample 0 takes the other branch of the data-dependent `if`
    for at, ref_fn in [("body", lambda h: model.body(h)), ("body.0", lambda h: model.body[0](h))]:
        enc = split(model, at)
        assert enc.split_route == "hooks" and "cannot trace Untraceable" in enc.split_route_reason
        for xb in (x[:1], x[1:2]):  # the sign flip depends on the values: resolved every call
            h = -xb if xb.sum() > 0 else xb
            with torch.no_grad():
                torch.testing.assert_close(enc(xb), ref_fn(h), rtol=0, atol=0)


def test_untraceable_model_node_name():
    with pytest.raises(SplitError) as e:
        split(Untraceable(), "relu")
    msg = str(e.value)
    assert "cannot be traced by torch.fx" in msg and "torch.fx node 'relu'" in msg
    assert "Module paths work on any model" in msg and "body, head" in msg
    assert e.value.__cause__ is not None


def test_module_never_called():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.spare = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(SplitError, match="'spare' .* never called"):
        split(Unused(), "spare")
    enc = split(Unused(), "spare", route="hooks")  # the hooks route finds out when it runs
    with pytest.raises(SplitError, match="'spare' .* was never called in the forward of Unused"):
        enc(torch.zeros(1, 2))


def test_module_inside_leaf():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(SplitError) as e:
        split(Attn(), "mha.out_proj", route="fx")
    assert "inside 'mha'" in str(e.value)
    enc = split(Attn(), "mha.out_proj")  # auto: hooks; MHA uses out_proj's weights only
    assert enc.split_route == "hooks" and "inside 'mha'" in enc.split_route_reason
    with pytest.raises(SplitError, match="never called.*inside 'mha'"):
        enc(torch.zeros(1, 2, 4))


def test_module_inside_leaf_that_calls_it():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 8), layer).eval()  # fx keeps the encoder layer whole
    x = torch.rand(2, 5, 4)
    enc = split(model, "1.linear1")
    assert enc.split_route == "hooks"
    seen = []
    h = layer.linear1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
        h.remove()
        torch.testing.assert_close(enc(x), seen[-1], rtol=0, atol=0)


def test_bad_points(res):
    with pytest.raises(SplitError, match="whole model"):
        split(res, "")
    with pytest.raises(SplitError, match="input of"):
        split(res, "x")
    with pytest.raises(SplitError, match="not a module path .*route='hooks'"):
        split(res, "add", route="hooks")
    with pytest.raises(SplitError, match="not a module path .*select= given"):
        split(res, "add", select=lambda o: o)
    with pytest.raises(SplitError, match="route='fx' cannot honour select="):
        split(res, "block", select=lambda o: o, route="fx")
    with pytest.raises(InvalidInputError, match="route must be one of"):
        split(res, "block", route="fx.symbolic")
    with pytest.raises(InvalidInputTypeError, match="occurrence must be an int"):
        split(res, "block", occurrence=1.0)
    with pytest.raises(InvalidInputTypeError, match="occurrence must be an int"):
        split(res, "block", occurrence=True)
    with pytest.raises(InvalidInputTypeError, match="select must be a callable"):
        split(res, "block", select=0)
    with pytest.raises(InvalidInputTypeError, match="input_name must be"):
        split(res, "block", input_name="pixel values")
    with pytest.raises(InvalidInputTypeError, match="insert\\(\\) needs an nn.Module layer"):
        insert(res, "block", lambda t: t)
    with pytest.raises(InvalidInputTypeError):
        split(res, 1.5)
    with pytest.raises(InvalidInputTypeError):
        split(res, True)
    with pytest.raises(InvalidInputTypeError):
        split(lambda x: x, 0)
    assert issubclass(SplitError, ValueError)


def test_bad_split_points_attribute(res):
    res.split_points = "inp"
    with pytest.raises(SplitError, match="list of module paths"):
        split(res, 0)


# ----------------------------------------------------------------------------- the hooks route


class _CallLog:
    """Which modules complete a forward call (a global forward hook), in order."""

    def __init__(self) -> None:
        self.done: list[nn.Module] = []

    def __enter__(self) -> _CallLog:
        self._h = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: self.done.append(m))
        return self

    def __exit__(self, *exc) -> None:
        self._h.remove()


def _after_cut(model: nn.Module, path: str, x, occurrence: int = -1) -> set[int]:
    """ids of the modules that complete a call after the cut call of ``path`` in a full forward
    (its ancestors excluded: they are running when the cut happens)."""
    target = model.get_submodule(path)
    with _CallLog() as log, torch.no_grad():
        model(x)
    calls = [i for i, m in enumerate(log.done) if m is target]
    cut = calls[occurrence]
    ancestors = {id(m) for n, m in model.named_modules() if path.startswith(n + ".") or n == ""}
    return {id(m) for m in log.done[cut + 1 :]} - ancestors


def test_hooks_equal_fx_on_zoo_models(small_models):
    x = torch.rand(1, 3, 16, 16)
    for name in ("vgg5", "resnet18"):
        model = small_models[name]
        ks = range(len(model.split_points)) if name == "vgg5" else (2, 7, 13)
        for k in ks:
            a, b = split(model, k), split(model, k, route="hooks")
            assert a.split_route == "fx" and b.split_route == "hooks"
            assert (b.split_name, b.split_index) == (a.split_name, a.split_index)
            with torch.no_grad():
                za = a(x)
                assert torch.equal(b(x), za) and torch.equal(b(x), za), (name, k)  # 1st, 2nd call


def test_repeated_module_which_call_is_the_cut(res):
    """`act` runs twice: the default is the last call (as on the fx route), occurrence=0 the
    first; on the hooks route the last call is only known at the end of the forward, which runs
    whole at every call (occurrence >= 0 stops at the cut)."""
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        h0 = torch.tanh(res.inp(x))
        first, last = h0, torch.tanh(torch.relu(h0 + res.block(h0)))
        for route in ("fx", "hooks"):
            torch.testing.assert_close(split(res, "act", route=route)(x), last, rtol=0, atol=0)
            torch.testing.assert_close(split(res, "act", occurrence=-1, route=route)(x), last,
                                       rtol=0, atol=0)
            torch.testing.assert_close(split(res, "act", occurrence=1, route=route)(x), last,
                                       rtol=0, atol=0)
            for occ in (0, -2):
                torch.testing.assert_close(split(res, "act", occurrence=occ, route=route)(x),
                                           first, rtol=0, atol=0)
            with pytest.raises(SplitError, match="occurrence=2 names no call.*0..1"):
                split(res, "act", occurrence=2, route=route)(x)
            with pytest.raises(SplitError, match="occurrence=-3 names no call"):
                split(res, "act", occurrence=-3, route=route)(x)
    first_enc = split(res, "act", occurrence=0, route="hooks")
    last_enc = split(res, "act", route="hooks")
    calls = {"head": 0, "block": 0}  # (registered after split: fx tracing runs hooks too)
    for n in calls:
        getattr(res, n).register_forward_hook(
            lambda m, i, o, n=n: calls.__setitem__(n, calls[n] + 1))
    with torch.no_grad():
        for _ in range(2):
            first_enc(x)
        assert calls == {"head": 0, "block": 0}  # stops at the first call of act, always
        last_enc(x)
        assert calls == {"head": 1, "block": 1}  # the whole forward finds the last call
        last_enc(x)
        last_enc(torch.rand(5, 3, 8, 8))
        assert calls == {"head": 3, "block": 3}  # at every call (the count may depend on x)


def test_call_count_that_depends_on_the_values():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = nn.Tanh()

        def forward(self, x):
            for _ in range(1 if x.sum() < 0 else 3):
                x = self.step(x)
            return x

    enc = split(Loop(), "step")
    assert enc.split_route == "hooks"
    x = torch.ones(1, 2)
    torch.testing.assert_close(enc(x), torch.tanh(torch.tanh(torch.tanh(x))))
    # the number of calls depends on the values: the last call is found at every call
    torch.testing.assert_close(enc(-x), torch.tanh(-x))
    torch.testing.assert_close(enc(x), torch.tanh(torch.tanh(torch.tanh(x))))
    noisy = insert(Loop(), "step", nn.Identity())  # insert counts on the first input
    torch.testing.assert_close(noisy(x), torch.tanh(torch.tanh(torch.tanh(x))))
    with pytest.raises(SplitError, match="called 1 time.*3 or more.*depends on the input's values"):
        noisy(-x)
    torch.testing.assert_close(split(Loop(), "step", occurrence=0)(-x), torch.tanh(-x))


def test_later_layers_not_computed_on_an_untraceable_model():
    torch.manual_seed(0)
    model = Untraceable().eval()
    enc = split(model, "body.0", occurrence=0)  # (the last call, occurrence=-1, runs it all)
    x = torch.rand(2, 3)
    after = _after_cut(model, "body.0", x)
    assert {id(model.body[1]), id(model.head)} <= after
    with torch.no_grad():
        enc(x)
        with _CallLog() as log:
            enc(x)
    assert [m for m in log.done if id(m) in after] == []
    assert log.done == [model.body[0], enc]  # only the cut module completes, then the encoder


def test_select_and_first_tensor():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            return {"aux": None, "out": (h, 2 * h)}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()
            self.head = nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.pair(x)["out"][1])

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(2, 3)
    h = net.pair.lin(x)
    with torch.no_grad():
        # both routes: the first tensor, depth first (the fx route returned the output as it
        # was, a dict here, which no metric takes; a GRU's (output, h) likewise)
        torch.testing.assert_close(split(net, "pair", route="hooks")(x), h)
        fx_enc = split(net, "pair")
        assert fx_enc.split_route == "fx"
        torch.testing.assert_close(fx_enc(x), h)
    hooks_r = ff.fsinfo(split(net, "pair", route="hooks"), x, sigma=0.1, estimator="exact")
    torch.testing.assert_close(ff.fsinfo(fx_enc, x, sigma=0.1, estimator="exact").value,
                               hooks_r.value)
    with torch.no_grad():
        enc = split(net, "pair", select=lambda out: out["out"][1])
        assert enc.split_route == "hooks" and enc.split_route_reason == "select= given"
        torch.testing.assert_close(enc(x), 2 * h)
        # insert replaces the first tensor and keeps the structure and the rest: the model
        # uses out[1], so zeroing out[0] changes nothing, zeroing through `pair.lin` does
        hooked = insert(net, "pair", _Scale(0.0), route="hooks")
        torch.testing.assert_close(hooked(x), net(x), rtol=0, atol=0)
        zeroed = insert(net, "pair.lin", _Scale(0.0), route="hooks")
        torch.testing.assert_close(zeroed(x), net.head.bias.expand(2, 1))
    with pytest.raises(SplitError, match="select= returned int"):
        split(net, "pair", select=lambda out: 3)(x)
    with pytest.raises(SplitError, match="holds no tensor"):
        first_tensor({"a": None, "b": (1, "z")})
    assert first_tensor((None, [torch.ones(1)], torch.zeros(1))).item() == 1.0


class _Scale(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, t):
        return self.c * t


def _second(out):
    return out[1]


def test_input_name_keyword_only_model():
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, *, pixel_values):
            return self.b(torch.relu(self.a(pixel_values)))

    torch.manual_seed(0)
    m = Kw().eval()
    x = torch.rand(2, 3)
    enc = split(m, "a", input_name="pixel_values")
    assert enc.split_route_reason == "input_name= given"
    torch.testing.assert_close(enc(x), m.a(x))
    with pytest.raises(ff.EncoderError, match="input_name='pixel_values'"):
        split(m, "a", route="hooks")(x)  # called positionally: a hint, not the raw TypeError


def test_hook_encoder_state_mode_copies_and_dtype(res):
    enc = split(res, "block", route="hooks")
    assert isinstance(enc, HookEncoder) and enc.model is res
    model_params = {id(p) for p in res.parameters()}
    assert {id(p) for p in enc.parameters()} == model_params
    assert set(enc.state_dict()) == {"model." + k for k in res.state_dict()}
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        before = enc(x).clone()
        res.inp.bias.add_(1.0)  # the encoder shares the model's parameters
        assert not torch.allclose(enc(x), before)
    # mode: the model's at creation; eval()/train() reach the (shared) model
    res.train()
    res.block[1].eval()  # a frozen submodule keeps its own flag
    enc = split(res, "block", route="hooks")
    assert enc.training and res.training and not res.block[1].training
    enc.eval()
    assert not any(m.training for m in res.modules())
    # deep copy, float64 (what the reference oracle does), pickling
    ref = enc(x)
    enc64 = copy.deepcopy(enc).to(torch.float64)
    assert enc64.model is not res and res.inp.weight.dtype == torch.float32
    out64 = enc64(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, rtol=1e-5, atol=1e-6)
    back = pickle.loads(pickle.dumps(enc))
    assert back.model is not res
    torch.testing.assert_close(back(x), ref, rtol=0, atol=0)
    # a module-level select function pickles (a lambda would not: pickle's own limit)
    pickled = pickle.loads(pickle.dumps(split(res, "act", select=_identity, route="hooks")))
    torch.testing.assert_close(pickled(x), split(res, "act", route="fx")(x), rtol=0, atol=0)


def _identity(out):
    return out


def test_hooks_under_torch_func_transforms(res):
    """vmap/jvp/vjp/jacrev of a hook encoder equal those of the fx encoder; the exception that
    ends the forward pass leaves no functorch level behind, also when an error escapes."""
    from torch._C._functorch import maybe_current_level

    hook_enc = split(res, "act", occurrence=0, route="hooks")
    fx_enc = split(res, "act", occurrence=0, route="fx")
    x = torch.rand(2, 3, 8, 8)
    V = torch.randn(4, 2, 3, 8, 8)
    for _ in range(3):  # repeated calls: same results, no level left behind
        t_h = torch.func.vmap(lambda v: torch.func.jvp(hook_enc, (x,), (v,))[1])(V)
        t_f = torch.func.vmap(lambda v: torch.func.jvp(fx_enc, (x,), (v,))[1])(V)
        torch.testing.assert_close(t_h, t_f, rtol=0, atol=0)
        assert maybe_current_level() is None
    y, pull = torch.func.vjp(hook_enc, x)
    u = torch.randn_like(y)
    torch.testing.assert_close(pull(u)[0], torch.func.vjp(fx_enc, x)[1](u)[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.func.jacrev(hook_enc)(x[:1]), torch.func.jacrev(fx_enc)(x[:1]),
                               rtol=0, atol=0)
    per_sample = torch.func.vmap(lambda xi: hook_enc(xi[None])[0])(x)
    torch.testing.assert_close(per_sample, fx_enc(x), rtol=0, atol=0)
    bad = split(res, "act", occurrence=5, route="hooks")
    for _ in range(2):
        with pytest.raises(SplitError, match="occurrence=5"):
            torch.func.vmap(lambda v: torch.func.jvp(bad, (x,), (v,))[1])(V)
        assert maybe_current_level() is None
    torch.testing.assert_close(torch.func.vmap(hook_enc)(x[:, None])[:, 0], fx_enc(x))


def test_insert_hooks_on_untraceable_model():
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.rand(3, 3)
    x[0] = -1.0
    for xb in (x[:1], x[1:]):
        noisy = insert(model, "body.0", _Scale(-2.0))
        assert noisy.split_route == "hooks"
        h = -xb if xb.sum() > 0 else xb
        with torch.no_grad():
            ref = model.head(model.body[1](-2.0 * model.body[0](h)))
            torch.testing.assert_close(noisy(xb), ref)
            torch.testing.assert_close(insert(model, "body.0", nn.Identity())(xb), model(xb))


def test_insert_at_a_repeated_module(res):
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        for occ in (0, -1, None):
            a = insert(res, "act", _Scale(0.5), occurrence=occ, route="fx")(x)
            b = insert(res, "act", _Scale(0.5), occurrence=occ, route="hooks")
            torch.testing.assert_close(b(x), a, rtol=0, atol=0)
            torch.testing.assert_close(b(x), a, rtol=0, atol=0)  # cached count


# ------------------------------------------------------------------- third-party models (HF)


@pytest.fixture(scope="module")
def hf_models():
    pytest.importorskip("transformers")
    from fsinfo_fast.models.third_party import build

    names = ["vit", "deit", "dinov2", "swin", "convnext", "resnet", "mobilenetv2", "segformer",
             "regnet"]
    return {n: build(n, size=32) for n in names}


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2", "swin", "convnext", "resnet",
                                  "mobilenetv2", "segformer", "regnet"])
def test_third_party_split_equals_hook_capture(hf_models, name):
    from fsinfo_fast.models.third_party import SPLITS

    model = hf_models[name]
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    for path in SPLITS[name]:
        enc = ff.split(model, path)
        assert enc.split_route == "hooks" and f"cannot trace {type(model).__name__}" in (
            enc.split_route_reason)
        assert (enc.split_name, enc.split_index) == (path, None)
        captured: list = []
        h = model.get_submodule(path).register_forward_hook(
            lambda m, i, o, c=captured: c.append(o))
        with torch.no_grad():
            model(x)
        h.remove()
        out = captured[-1]
        ref = out if isinstance(out, torch.Tensor) else out[0]  # Swin stages return tuples
        after = _after_cut(model, path, x)
        assert after or path != SPLITS[name][0]  # the shallow cut has layers after it
        assert len(captured) == 1  # so occurrence=0 is the last call too, and stops there
        first = ff.split(model, path, occurrence=0)
        with torch.no_grad():
            assert torch.equal(enc(x), ref)  # the last call: the whole forward runs
            with _CallLog() as log:
                z = first(x)
        assert torch.equal(z, ref) and z.shape[0] == 2
        assert not [m for m in log.done if id(m) in after]  # stopped at the cut
        assert log.done[-1] is first and log.done[-2] is model.get_submodule(path)
        assert not model.training and not enc.training


def test_third_party_jvp_vjp_jacrev_equal_a_hand_written_prefix(hf_models):
    """ConvNeXt stage 1 by module path vs the same layers called by hand (an independent
    encoder), under torch.func, and the float64 oracle of both."""
    from torch._C._functorch import maybe_current_level

    model = hf_models["convnext"]

    class Prefix(nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            st = self.m.encoder.stages
            return st[1](st[0](self.m.embeddings(x)))

    enc, hand = ff.split(model, "encoder.stages.1"), Prefix(model).eval()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16)  # ConvNeXt takes any size: m = 128, d = 768
    V = torch.randn(3, 2, 3, 16, 16)
    for _ in range(2):
        t = torch.func.vmap(lambda v: torch.func.jvp(enc, (x,), (v,))[1])(V)
        t_ref = torch.func.vmap(lambda v: torch.func.jvp(hand, (x,), (v,))[1])(V)
        torch.testing.assert_close(t, t_ref, rtol=0, atol=0)
        assert maybe_current_level() is None
    y, pull = torch.func.vjp(enc, x)
    u = torch.randn_like(y)
    torch.testing.assert_close(pull(u)[0], torch.func.vjp(hand, x)[1](u)[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.func.jacrev(enc)(x[:1]), torch.func.jacrev(hand)(x[:1]),
                               rtol=0, atol=0)
    d = ff.reference.fisher_diag(enc, x[:1])  # deep copy of the encoder in float64
    assert d.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(d, ff.reference.fisher_diag(hand, x[:1]), rtol=1e-12, atol=0)


def test_third_party_vit_vjp_and_swin_select(hf_models):
    vit, swin = hf_models["vit"], hf_models["swin"]
    x = torch.rand(1, 3, 32, 32)
    enc = ff.split(vit, "layers.1")
    with torch.no_grad():
        ref = vit.layers[1](vit.layers[0](vit.embeddings(x), None), None)
        torch.testing.assert_close(enc(x), ref, rtol=0, atol=0)
    u = torch.randn(1, 17, 32)
    y, pull = torch.func.vjp(enc, x)
    hand = lambda t: vit.layers[1](vit.layers[0](vit.embeddings(t), None), None)  # noqa: E731
    torch.testing.assert_close(pull(u)[0], torch.func.vjp(hand, x)[1](u)[0], rtol=0, atol=0)
    # Swin stages return (hidden, hidden before downsampling, sizes): pick the second
    sel = ff.split(swin, "encoder.layers.0", select=_second)
    captured = []
    h = swin.encoder.layers[0].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        swin(x)
        h.remove()
        torch.testing.assert_close(sel(x), captured[0][1], rtol=0, atol=0)
    assert sel(x).shape == (1, 32, 8, 8)


def test_third_party_backends_agree(hf_models):
    """Every backend available here gets the same products through the hook encoder (same seed,
    same probes) and the exact value equals the float64 oracle."""
    from fsinfo_fast.engine import available_backends

    enc = ff.split(hf_models["resnet"], "encoder.stages.0")
    x = torch.rand(1, 3, 16, 16)
    ref = ff.reference.fsinfo(enc, x, sigma=0.1).value
    exact = ff.fsinfo(enc, x, sigma=0.1, estimator="exact").value
    torch.testing.assert_close(exact, ref, rtol=1e-10, atol=0)
    vals = {}
    for b in ("torch", "engine", "cpp"):
        if not available_backends()[b][0]:
            continue
        r = ff.fsinfo(enc, x, sigma=0.1, estimator="randomized", num_probes=8, seed=3, backend=b)
        assert r.value.shape == (1,) and bool(torch.isfinite(r.value).all())
        vals[b] = r.value
    assert "torch" in vals
    for v in vals.values():
        torch.testing.assert_close(v, vals["torch"], rtol=1e-6, atol=0)


def test_third_party_insert(hf_models):
    from fsinfo_fast.models.third_party import SPLITS

    x = torch.rand(2, 3, 32, 32)
    for name in ("convnext", "swin"):
        model = hf_models[name]
        path = SPLITS[name][0]
        noisy = insert(model, path, _Scale(0.0))
        assert noisy.split_route == "hooks"

        def zero_first(m, i, o):
            if isinstance(o, torch.Tensor):
                return 0.0 * o
            return (0.0 * o[0], *o[1:])

        h = model.get_submodule(path).register_forward_hook(zero_first)
        with torch.no_grad():
            ref = model(x).last_hidden_state
        h.remove()
        with torch.no_grad():
            out = noisy(x)
            assert type(out) is type(model(x))
            torch.testing.assert_close(out.last_hidden_state, ref, rtol=0, atol=0)
            torch.testing.assert_close(insert(model, path, nn.Identity())(x).last_hidden_state,
                                       model(x).last_hidden_state, rtol=0, atol=0)


def test_zero_arg_builders_carry_split_points():
    pytest.importorskip("transformers")
    from fsinfo_fast.models import third_party as tp

    model = tp.convnext_small32()
    assert model.split_points == list(tp.SPLITS["convnext"])
    enc = ff.split(model, 1)
    assert (enc.split_name, enc.split_index, enc.split_route) == ("encoder.stages.1", 1, "hooks")
    assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 32, 4, 4)
    for name in ("vit", "deit", "dinov2", "swin", "resnet", "mobilenetv2", "segformer", "regnet"):
        assert callable(getattr(tp, f"{name}_small32"))


def test_profile_cli_on_a_transformers_model(tmp_path):
    """`fsinfo-fast profile --model fsinfo_fast.models.third_party:convnext_small32` with module
    paths: the numbers equal the public API on the same split encoders."""
    pytest.importorskip("transformers")
    import json

    from fsinfo_fast.cli import main
    from fsinfo_fast.models.third_party import convnext_small32
    from fsinfo_fast.profile.sources import load_data

    out = tmp_path / "run"
    args = ["profile", "--model", "fsinfo_fast.models.third_party:convnext_small32",
            "--data", "natural", "--size", "16", "--max-samples", "1",
            "--splits", "encoder.stages.0,encoder.stages.1", "--estimator", "exact",
            "--out", str(out), "--no-plot", "--quiet"]
    assert main(args) == 0
    prof = json.loads((out / "profile.json").read_text())
    recs = {r["split"]: r for r in prof["samples"]}
    assert set(recs) == {"encoder.stages.0", "encoder.stages.1"}
    assert [recs[s]["split_index"] for s in ("encoder.stages.0", "encoder.stages.1")] == [0, 1]
    model = convnext_small32()
    x = load_data("natural", 16, 0, 1).x
    for path, rec in recs.items():
        enc = ff.split(model, path)
        fs = ff.reference.fsinfo(enc, x, sigma=0.1).value
        dfil = ff.reference.dfil(enc, x, sigma=0.1).value
        assert rec["fsinfo_diag"] == pytest.approx(float(fs[0]), rel=1e-10, abs=1e-10)
        assert rec["dfil"] == pytest.approx(float(dfil[0]), rel=1e-10)


def test_guard_cli_on_a_transformers_classifier(tmp_path):
    """`fsinfo-fast guard` on a `transformers` classifier (output `.logits`) at a module path:
    sigma* equals the oracle's, the clean accuracy is the model's own."""
    pytest.importorskip("transformers")
    import json

    from PIL import Image

    from fsinfo_fast.cli import main
    from fsinfo_fast.models.third_party import convnext_classifier_small32
    from fsinfo_fast.profile.guard_cmd import class_scores
    from fsinfo_fast.profile.sources import load_data, resolve_splits

    # labelled data of the model's own classes (class sub-folders 0 and 1): the bundled sets'
    # labels are not a user model's classes, so guard does not measure accuracy on them
    folder = tmp_path / "images"
    nat = load_data("natural", 16, 0, 4).x
    for i in range(4):
        (folder / str(i % 2)).mkdir(parents=True, exist_ok=True)
        img = (nat[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(img).save(folder / str(i % 2) / f"{i}.png")
    out = tmp_path / "guard.json"
    args = ["guard", "--model", "fsinfo_fast.models.third_party:convnext_classifier_small32",
            "--data", str(folder), "--size", "16", "--max-samples", "4", "--calibration", "2",
            "--splits", "convnext.encoder.stages.1", "--estimator", "exact",
            "--noise-draws", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    model = convnext_classifier_small32()
    data = load_data(str(folder), 16, 0, 4)
    assert sorted(data.y.tolist()) == [0, 0, 1, 1]
    (spec,) = resolve_splits(model, "convnext.encoder.stages.1")
    assert (spec.index, spec.route) == (1, "hooks") and "cannot trace" in spec.route_reason
    (row,) = rep["splits"]
    assert (row["split"], row["index"]) == ("convnext.encoder.stages.1", 1)
    sig = ff.reference.fsinfo_sigma(spec.encoder, data.x, target=-1.0).sigma
    torch.testing.assert_close(torch.tensor(row["sigma_star_all"], dtype=torch.float64), sig,
                               rtol=1e-8, atol=0)
    assert rep["accuracy_note"] is None
    with torch.no_grad():
        logits = class_scores(model(data.x[2:]))
    assert logits.shape == (2, 10)
    assert rep["accuracy_clean"] == float((logits.argmax(1) == data.y[2:]).double().mean())
    assert 0.0 <= row["accuracy_calibrated"] <= 1.0


def test_shared_profile_work_skips_a_model_without_forward_ad():
    """The profile's nested-split sharing pushes JVPs through the model: a model without
    forward-mode AD is computed per split, with the reason recorded."""
    from fsinfo_fast.profile.shared import NestedStack

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(NoForwardAD.apply(self.a(x)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(1, 4)
    encs = {n: split(net, n) for n in ("a", "b")}
    stack = NestedStack(net, ["a", "b"], x, encs)
    assert stack.names == []
    assert all("forward-mode AD fails" in stack.rejected[n] for n in ("a", "b"))
    ok = NestedStack(net, ["a"], x, {"a": encs["a"]})  # the cut is before the custom op
    assert ok.names == ["a"] and ok.rejected == {}


class _ModeNet(nn.Module):
    """Functional dropout keyed on ``self.training``: torch.fx bakes the branch at trace time."""

    def __init__(self, mode_dependent=True):
        super().__init__()
        self.mode_dependent = mode_dependent
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.tanh(self.c1(x))
        if self.mode_dependent:
            y = torch.nn.functional.dropout(y, p=0.5, training=self.training)
        return self.c2(y)


def test_fx_encoder_refuses_a_mode_changed_after_the_split(tmp_path):
    """Split in train mode (a fresh model), then model.eval(): the fx encoder kept running the
    train-mode branch (random dropout; SampleInteractionError or a silently wrong value). It
    now raises; a model whose forward does not depend on the mode keeps working."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    net = _ModeNet()
    enc = ff.split(net, "c2")
    assert enc.split_route == "fx"
    net.eval()
    with pytest.raises(ff.EncoderError, match="mode changed after ff.split"):
        enc(x)
    with pytest.raises(ff.EncoderError, match="mode changed after ff.split"):
        ff.fsinfo(enc, x, sigma=0.1)
    again = ff.split(net, "c2")  # split after eval(): the eval branch
    torch.testing.assert_close(again(x), net.c2(torch.tanh(net.c1(x))))
    path = tmp_path / "enc.pt"
    torch.save(again, path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded(x), again(x))
    # the check survives torch.save / load (the load re-traces the graph; a function call
    # there ran once and dropped out) and deepcopy, and watches the copy's own modules
    assert set(loaded.state_dict()) == set(again.state_dict())
    for dup in (loaded, copy.deepcopy(again)):
        dup.train()
        with pytest.raises(ff.EncoderError, match="mode changed after ff.split"):
            dup(x)
        dup.eval()
        assert torch.equal(dup(x), again(x))
    assert again.training is False and torch.equal(again(x), loaded(x))

    plain = _ModeNet(mode_dependent=False)
    enc = ff.split(plain, "c2")
    plain.eval()
    torch.testing.assert_close(enc(x), plain.c2(torch.tanh(plain.c1(x))))
    assert "mode_check" not in enc.code


class _HeadModeNet(nn.Module):
    """The mode matters only after the cut (in the head)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.head(torch.tanh(self.c1(x)))
        return y * 2 if self.training else y


def test_fx_mode_check_follows_copies_and_only_the_encoders_part():
    """The check sits in the encoder's graph, so a deepcopy keeps it (a forward pre-hook was
    lost); a model whose mode matters only after the cut gets none (it refused such encoders)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    net = _ModeNet().eval()
    enc = copy.deepcopy(ff.split(net, "c2"))
    enc.train()
    with pytest.raises(ff.EncoderError, match="mode changed after ff.split"):
        enc(x)
    head = _HeadModeNet().eval()
    enc = ff.split(head, "c1")
    head.train()
    torch.testing.assert_close(enc(x), head.c1(x))


def test_hooks_counting_run_failure_says_why_and_how():
    """The hooks route's default (the module's last call) runs the whole forward on the first
    call of an input shape; a head that needs another resolution failed there with a raw
    RuntimeError. It now says why the whole forward ran and that occurrence=0 stops early."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).flatten(1))

    m = Net().eval()
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ff.EncoderError, match="occurrence=0"):
        ff.split(m, "conv", route="hooks")(x)
    assert ff.split(m, "conv", route="hooks", occurrence=0)(x).shape == (2, 4, 16, 16)
