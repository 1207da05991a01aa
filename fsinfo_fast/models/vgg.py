"""The paper's VGG models (VGG5, VGG9): Conv3x3 + BatchNorm + Tanh blocks, max-pools, dense layers.

Layout. Every *paper layer* is one child of ``features`` (convolution blocks and max-pools) or of
``classifier`` (dense layers); a convolution block is itself an ``nn.Sequential`` of
``Conv2d(3x3, padding 1), BatchNorm2d, Tanh`` and a hidden dense layer is ``Linear, Tanh``. The
forward pass is ``classifier(flatten(features(x)))``, so paper split ``k`` (the output after layer
``k``; layers ``0..k`` form the encoder) is the module path ``model.split_points[k]``.

Input size. The first dense layer's width depends on the spatial size after the max-pools, so the
constructors take ``input_size`` (the side of the square input the model will see, in pixels;
default 32, the CIFAR size) and size that layer for it. Other input sizes fail in the first dense
layer; the convolutional part (``features``) accepts any size.

Initialisation (as in the authors' code): convolutions Kaiming-normal (fan-out), BatchNorm weight
1 and bias 0, dense layers N(0, 0.01^2) with zero bias. Deterministic given ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError

__all__ = ["VGG", "vgg5", "vgg9", "VGG5_CFG", "VGG9_CFG"]

#: VGG5 paper layers: ("C", out_channels) conv block, ("M",) 2x2 max-pool, ("D", width) dense.
#: 0 conv32, 1 maxpool, 2 conv64, 3 maxpool, 4 conv64, 5 dense128, 6 dense<num_classes>.
VGG5_CFG: tuple[tuple, ...] = (("C", 32), ("M",), ("C", 64), ("M",), ("C", 64), ("D", 128))

#: VGG9 paper layers, as in the authors' split-inference code (seven conv + three dense weight
#: layers; the name is theirs):
#: 0 conv64, 1 maxpool, 2 conv64, 3 conv128, 4 maxpool, 5 conv128, 6 conv256, 7 maxpool,
#: 8 conv256, 9 maxpool, 10 conv256, 11 dense4096, 12 dense4096, 13 dense<num_classes>.
VGG9_CFG: tuple[tuple, ...] = (
    ("C", 64), ("M",), ("C", 64), ("C", 128), ("M",), ("C", 128), ("C", 256), ("M",),
    ("C", 256), ("M",), ("C", 256), ("D", 4096), ("D", 4096),
)


class VGG(nn.Module):
    """A VGG-style CNN built from a paper layer list.

    Args:
        cfg: paper layers before the output layer: ``("C", c)`` a Conv3x3(pad 1) + BatchNorm +
            Tanh block with ``c`` output channels, ``("M",)`` a 2x2 max-pool (stride 2, floor),
            ``("D", w)`` a Linear + Tanh dense layer of width ``w``. All ``"C"``/``"M"`` entries
            must come before the ``"D"`` entries. A final ``Linear(.., num_classes)`` is appended.
        num_classes: number of output logits.
        in_channels: input channels (3 for RGB, 1 for grayscale).
        input_size: side in pixels of the square inputs the model is built for; it sizes the first
            dense layer.

    Attributes:
        features: ``nn.Sequential`` of the convolutional paper layers (one child per layer).
        classifier: ``nn.Sequential`` of the dense paper layers (one child per layer).
        split_points: module path of every paper layer, index = paper split index.
        layer_names: human-readable name of every paper layer (``"conv32"``, ``"maxpool"``, ...).
        paper_splits: the split indices the paper reports (set by :func:`vgg5` / :func:`vgg9`).

    Shapes:
        input ``[B, in_channels, input_size, input_size]``, output ``[B, num_classes]`` logits.
    """

    def __init__(
        self,
        cfg: Sequence[tuple],
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1 or int(in_channels) < 1:
            raise InvalidInputError(f"num_classes and in_channels must be >= 1, got {num_classes}, "
                             f"{in_channels}")
        features: list[nn.Module] = []
        dense: list[nn.Module] = []
        names: list[str] = []
        channels, side = int(in_channels), int(input_size)
        flat: int | None = None
        for entry in cfg:
            kind = entry[0]
            if kind == "C":
                if dense:
                    raise InvalidInputError(
                        "convolution layers must come before dense layers in cfg")
                out = int(entry[1])
                features.append(nn.Sequential(
                    nn.Conv2d(channels, out, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out),
                    nn.Tanh(),
                ))
                names.append(f"conv{out}")
                channels = out
            elif kind == "M":
                if dense:
                    raise InvalidInputError("max-pool layers must come before dense layers in cfg")
                features.append(nn.MaxPool2d(kernel_size=2, stride=2))
                names.append("maxpool")
                side //= 2
            elif kind == "D":
                if flat is None:
                    flat = channels * side * side
                    if flat < 1:
                        raise InvalidInputError(
                            f"input_size={input_size} is too small for this VGG: the feature map "
                            "vanishes before the dense layers"
                        )
                width = int(entry[1])
                dense.append(nn.Sequential(nn.Linear(flat, width), nn.Tanh()))
                names.append(f"dense{width}")
                flat = width
            else:
                raise InvalidInputError(
                    f"unknown VGG layer kind {kind!r} (expected 'C', 'M' or 'D')")
        if flat is None:
            flat = channels * side * side
            if flat < 1:
                raise InvalidInputError(f"input_size={input_size} is too small for this VGG")
        dense.append(nn.Linear(flat, int(num_classes)))
        names.append(f"dense{int(num_classes)}")

        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(*dense)
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.split_points: list[str] = [f"features.{i}" for i in range(len(features))] + [
            f"classifier.{i}" for i in range(len(dense))
        ]
        self.layer_names: list[str] = names
        self.paper_splits: list[int] = []
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, input_size, input_size]``."""
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg5(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> VGG:
    """The paper's VGG5.

    Paper layers (split index: module path): 0 conv32 ``features.0``, 1 maxpool ``features.1``,
    2 conv64 ``features.2``, 3 maxpool ``features.3``, 4 conv64 ``features.4``, 5 dense128
    ``classifier.0``, 6 dense<num_classes> ``classifier.1``. Each conv is Conv3x3(pad 1) +
    BatchNorm + Tanh, dense128 is Linear + Tanh (after a flatten), the last layer gives logits.

    ``paper_splits = [0, 1, 2, 3, 4, 5]``: every layer output except the logits (the exact list of
    VGG5 splits behind the paper's figures was not available; split 2 is its noise-sweep split).

    Args:
        num_classes: number of logits.
        in_channels: input channels.
        input_size: side of the square input in pixels (sizes dense128: ``64 * (input_size//4)^2``
            inputs; 32 gives 4096).

    Returns:
        The model (train mode, as any freshly built module).

    Example:
        >>> m = vgg5().eval()
        >>> m(torch.zeros(2, 3, 32, 32)).shape, m.split_points[2]
        (torch.Size([2, 10]), 'features.2')
    """
    model = VGG(VGG5_CFG, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    model.paper_splits = [0, 1, 2, 3, 4, 5]
    return model


def vgg9(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, hidden: int = 4096
) -> VGG:
    """The paper's VGG9, in the layout of the authors' split-inference code.

    It has seven conv and three dense weight layers (ten in all, despite the name, which is the
    authors'); nine of them come before the output layer.

    Paper layers (split index: module path): 0 conv64 ``features.0``, 1 maxpool, 2 conv64,
    3 conv128, 4 maxpool, 5 conv128, 6 conv256, 7 maxpool, 8 conv256, 9 maxpool, 10 conv256
    ``features.10``, 11 dense<hidden> ``classifier.0``, 12 dense<hidden> ``classifier.1``,
    13 dense<num_classes> ``classifier.2``. Conv blocks are Conv3x3(pad 1) + BatchNorm + Tanh,
    hidden dense layers Linear + Tanh. Four 2x2 max-pools: ``input_size`` must be >= 16.

    ``paper_splits = [1, 4, 7, 9, 10, 11, 12]``: the authors' candidate cut points for VGG9 (after
    each max-pool, the last conv, and the hidden dense layers), without the logits.

    Args:
        num_classes: number of logits.
        in_channels: input channels.
        input_size: side of the square input in pixels (the first dense layer takes
            ``256 * (input_size//16)^2`` inputs; 32 gives 1024).
        hidden: width of the two hidden dense layers (4096 in the paper's model).

    Returns:
        The model.
    """
    cfg = tuple(("D", hidden) if e[0] == "D" else e for e in VGG9_CFG)
    model = VGG(cfg, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    model.paper_splits = [1, 4, 7, 9, 10, 11, 12]
    return model
