"""ResNet-18 (CIFAR variant by default) with torchvision-style module names.

Module paths: ``conv1, bn1, relu, maxpool, layer1..layer4`` (two :class:`BasicBlock` each, paths
``layer1.0``, ``layer1.1``, ...), ``avgpool`` (``AdaptiveAvgPool2d(1)``), ``fc``. The forward pass
is ``fc(flatten(avgpool(layer4(layer3(layer2(layer1(maxpool(relu(bn1(conv1(x))))))))))``, so
torchvision ResNet-18 weights load with ``load_state_dict`` (for ``stem="imagenet"``).

Paper layer list (split index: module path): 0 conv1, 1 bn1, 2 relu, 3 pool (``maxpool``),
4 layer1.0, 5 layer1.1, 6 layer2.0, 7 layer2.1, 8 layer3.0, 9 layer3.1, 10 layer4.0, 11 layer4.1,
12 avgpool, 13 fc; the paper reports splits 2, 5, 7, 9, 11.

ReLUs are not in-place (so intermediate outputs stay valid for Jacobian products). Initialisation
as torchvision: Kaiming-normal (fan-out) convolutions, BatchNorm weight 1 and bias 0, default
``nn.Linear`` init for ``fc``. Deterministic given ``torch.manual_seed``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "RESNET18_SPLIT_POINTS"]

#: Module paths of ResNet-18's paper layers, index = paper split index.
RESNET18_SPLIT_POINTS: list[str] = [
    "conv1", "bn1", "relu", "maxpool",
    "layer1.0", "layer1.1", "layer2.0", "layer2.1",
    "layer3.0", "layer3.1", "layer4.0", "layer4.1",
    "avgpool", "fc",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection (torchvision naming).

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where ``shortcut`` is the identity or
    ``downsample`` (1x1 conv with stride + BatchNorm) when the shape changes.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of ``conv1`` (and of ``downsample``).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """``[B, inplanes, H, W] -> [B, planes, ceil(H/stride), ceil(W/stride)]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 conv + BatchNorm layers with a residual connection (torchvision naming,
    stride on the 3x3 conv as in torchvision's ResNet v1.5); output channels ``4 * planes``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with :class:`BasicBlock` stages (ResNet-18 for ``layers=(2, 2, 2, 2)``) or
    :class:`Bottleneck` stages (``block=Bottleneck``; ResNet-50 for ``layers=(3, 4, 6, 3)``).

    Args:
        layers: number of blocks in each of the four stages.
        num_classes: number of logits.
        in_channels: input channels.
        stem: ``"cifar"`` (``conv1`` 3x3 stride 1, ``maxpool`` = ``nn.Identity``) or
            ``"imagenet"`` (``conv1`` 7x7 stride 2 pad 3, ``maxpool`` = ``MaxPool2d(3, 2, 1)``).

    Attributes:
        split_points: module paths of the paper layers, index = paper split index.
        layer_names: the paper's names of those layers (``"pool"`` for ``maxpool``).
        paper_splits: the split indices the paper reports.

    Shapes:
        input ``[B, in_channels, H, W]`` of any size the strides allow (``H, W >= 1``; the CIFAR
        stem downsamples by 8, the ImageNet stem by 32, ``avgpool`` is adaptive); output
        ``[B, num_classes]``.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        block: type[nn.Module] = BasicBlock,
    ) -> None:
        super().__init__()
        self.block = block
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise InvalidInputError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem = stem
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.inplanes = 64
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_classes = int(num_classes)

        blocks = [f"layer{s}.{i}" for s in range(1, 5) for i in range(layers[s - 1])]
        self.split_points: list[str] = ["conv1", "bn1", "relu", "maxpool", *blocks, "avgpool", "fc"]
        self.layer_names: list[str] = ["conv1", "bn1", "relu", "pool", *blocks, "avgpool", "fc"]
        self.paper_splits: list[int] = []

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [self.block(self.inplanes, planes, stride)]
        self.inplanes = planes * self.block.expansion
        layers += [self.block(self.inplanes, planes, 1) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, H, W]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    stem: str = "cifar",
    input_size: int | None = None,
) -> ResNet:
    """The paper's ResNet-18 (CIFAR variant unless ``stem="imagenet"``).

    Paper layers (split index: module path): 0 conv1, 1 bn1, 2 relu, 3 maxpool (the paper's
    "pool"; ``nn.Identity`` for the CIFAR stem), 4 layer1.0, 5 layer1.1, 6 layer2.0, 7 layer2.1,
    8 layer3.0, 9 layer3.1, 10 layer4.0, 11 layer4.1, 12 avgpool, 13 fc.
    ``paper_splits = [2, 5, 7, 9, 11]`` (the splits of the paper's ResNet-18 / CIFAR-10 results).

    Args:
        num_classes: number of logits.
        in_channels: input channels.
        stem: ``"cifar"`` (3x3 stride-1 conv1, no max-pool) or ``"imagenet"`` (7x7 stride-2 conv1,
            3x3 stride-2 max-pool, torchvision's layout).
        input_size: ignored (the pooling is adaptive, any input size works); accepted so every
            zoo constructor takes the same keywords.

    Returns:
        The model.

    Example:
        >>> m = resnet18().eval()
        >>> m(torch.zeros(1, 3, 32, 32)).shape, [m.split_points[k] for k in m.paper_splits]
        (torch.Size([1, 10]), ['relu', 'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1'])
    """
    del input_size
    model = ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, stem=stem)
    model.paper_splits = [2, 5, 7, 9, 11]
    return model


def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    input_size: int | None = None,
) -> ResNet:
    """ResNet-50 (torchvision layout and module names; the ImageNet stem unless
    ``stem="cifar"``), for full-resolution measurements.

    Split points (index: module path): 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4-6 layer1.0-2,
    7-10 layer2.0-3, 11-16 layer3.0-5, 17-19 layer4.0-2, 20 avgpool, 21 fc. "After the second
    stage" is ``layer2.3`` (index 10: ``[B, 512, 28, 28]`` at 224x224). ``paper_splits`` (the
    paper does not report ResNet-50) lists the stage outputs 6, 10, 16, 19.

    Example:
        >>> m = resnet50(num_classes=10).eval()
        >>> m(torch.zeros(1, 3, 64, 64)).shape, m.split_points[10]
        (torch.Size([1, 10]), 'layer2.3')
    """
    del input_size
    model = ResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, stem=stem,
                   block=Bottleneck)
    model.paper_splits = [6, 10, 16, 19]
    return model
