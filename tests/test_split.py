"""split(): cutting zoo and custom models by paper index, module path and fx node name."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.fx as fx
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.errors import InvalidInputTypeError, SplitError
from fsinfo_fast.models import resnet18, vgg5, vgg9
from fsinfo_fast.split import split


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


@pytest.mark.parametrize("at", ["body", "body.0", "relu"])
def test_untraceable_model(at):
    with pytest.raises(SplitError) as e:
        split(Untraceable(), at)
    msg = str(e.value)
    assert "cannot be traced by torch.fx" in msg
    assert "nn.Sequential" in msg and "by hand" in msg
    assert "split(model.body" in msg  # points at the Sequential that can be cut directly
    assert e.value.__cause__ is not None
    # the suggested way works
    enc = split(Untraceable().body, 0)
    assert isinstance(enc[0], nn.Linear)


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


def test_module_inside_leaf():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(SplitError) as e:
        split(Attn(), "mha.out_proj")
    assert "inside 'mha'" in str(e.value)


def test_bad_points(res):
    with pytest.raises(SplitError, match="whole model"):
        split(res, "")
    with pytest.raises(SplitError, match="input of"):
        split(res, "x")
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
