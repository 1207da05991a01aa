"""The paper model zoo: layer lists, split points, shapes at several input sizes, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsinfo_fast.errors import InvalidInputError
from fsinfo_fast.models import ZOO, get_model, resnet18, vgg5, vgg9
from fsinfo_fast.models.resnet import RESNET18_SPLIT_POINTS, BasicBlock


def _forward(model: nn.Module, size: int, channels: int = 3, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.rand(batch, channels, size, size))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_vgg5_shapes(size):
    m = vgg5(num_classes=7, input_size=size)
    assert _forward(m, size).shape == (2, 7)
    # dense128 takes 64 * (size/4)^2 inputs
    assert m.classifier[0][0].in_features == 64 * (size // 4) ** 2


@pytest.mark.parametrize("size", [16, 32, 64])
def test_vgg9_shapes(size):
    m = vgg9(num_classes=5, in_channels=1, input_size=size, hidden=32)
    assert _forward(m, size, channels=1).shape == (2, 5)
    assert m.classifier[0][0].in_features == 256 * (size // 16) ** 2


def test_vgg9_default_is_the_papers_width():
    m = vgg9()
    assert [m.classifier[i][0].out_features for i in (0, 1)] == [4096, 4096]
    assert m.classifier[0][0].in_features == 1024  # 256 x 2 x 2 at 32x32
    n_weight_layers = sum(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules())
    assert n_weight_layers == 10  # 7 conv + 3 dense, the authors' "VGG9"
    assert _forward(m, 32, batch=1).shape == (1, 10)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_resnet18_cifar_shapes(size):
    m = resnet18(num_classes=3)
    assert _forward(m, size).shape == (2, 3)
    assert isinstance(m.maxpool, nn.Identity)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)


def test_resnet18_imagenet_stem_224():
    m = resnet18(num_classes=1000, stem="imagenet")
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    assert isinstance(m.maxpool, nn.MaxPool2d)
    assert _forward(m, 224, batch=1).shape == (1, 1000)


def test_vgg5_layer_list_is_the_papers():
    m = vgg5()
    assert m.layer_names == ["conv32", "maxpool", "conv64", "maxpool", "conv64", "dense128",
                             "dense10"]
    assert m.split_points == [f"features.{i}" for i in range(5)] + ["classifier.0",
                                                                   "classifier.1"]
    conv = m.features[0]
    assert isinstance(conv[0], nn.Conv2d) and conv[0].kernel_size == (3, 3)
    assert conv[0].padding == (1, 1) and conv[0].out_channels == 32
    assert isinstance(conv[1], nn.BatchNorm2d) and isinstance(conv[2], nn.Tanh)
    assert isinstance(m.features[1], nn.MaxPool2d)
    assert m.features[2][0].out_channels == 64 and m.features[4][0].out_channels == 64
    assert isinstance(m.classifier[0][0], nn.Linear) and isinstance(m.classifier[0][1], nn.Tanh)
    assert m.classifier[0][0].out_features == 128
    assert isinstance(m.classifier[1], nn.Linear) and m.classifier[1].out_features == 10


def test_vgg9_layer_list():
    m = vgg9()
    assert m.layer_names == ["conv64", "maxpool", "conv64", "conv128", "maxpool", "conv128",
                             "conv256", "maxpool", "conv256", "maxpool", "conv256", "dense4096",
                             "dense4096", "dense10"]
    assert len(m.split_points) == 14


def test_resnet18_layer_list_and_naming():
    m = resnet18()
    assert m.split_points == RESNET18_SPLIT_POINTS
    assert m.layer_names[3] == "pool"
    assert m.paper_splits == [2, 5, 7, 9, 11]
    assert [m.split_points[k] for k in m.paper_splits] == [
        "relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    for stage in range(1, 5):
        for i in range(2):
            assert isinstance(m.get_submodule(f"layer{stage}.{i}"), BasicBlock)
    keys = set(m.state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
              "layer2.0.downsample.0.weight", "layer4.1.bn2.weight", "fc.weight", "fc.bias"]:
        assert k in keys
    assert isinstance(m.avgpool, nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_split_points_are_module_paths(name):
    kw = {"hidden": 16} if name == "vgg9" else {}
    m = get_model(name, **kw)
    paths = dict(m.named_modules())
    assert all(p in paths for p in m.split_points)
    assert len(m.layer_names) == len(m.split_points)
    assert m.paper_splits and all(0 <= k < len(m.split_points) for k in m.paper_splits)
    assert m.paper_splits == sorted(set(m.paper_splits))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_deterministic_init(name):
    kw = {"hidden": 16} if name == "vgg9" else {}
    torch.manual_seed(3)
    a = get_model(name, **kw).state_dict()
    torch.manual_seed(3)
    b = get_model(name, **kw).state_dict()
    torch.manual_seed(4)
    c = get_model(name, **kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_get_model_names():
    assert isinstance(get_model("ResNet-18"), type(resnet18()))
    with pytest.raises(InvalidInputError) as e:
        get_model("vgg11")
    msg = str(e.value)
    assert "vgg11" in msg and "vgg5" in msg and "vgg9" in msg and "resnet18" in msg
    assert isinstance(e.value, ValueError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="stem"):
        resnet18(stem="tiny")
    with pytest.raises(ValueError, match="too small"):
        vgg9(input_size=8)
