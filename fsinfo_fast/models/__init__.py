"""The paper's model zoo: VGG5, VGG9 and ResNet-18, ready to split.

Every zoo model has

- ``split_points: list[str]``: the module path of each paper layer; index ``k`` is the paper's split
  ``k``, whose encoder is layers ``0..k`` (``fsinfo_fast.split(model, k)``);
- ``layer_names: list[str]``: the paper's name of each layer (``"conv32"``, ``"layer2.1"``, ...);
- ``paper_splits: list[int]``: the split indices the paper reports for the model.

Example:
    >>> from fsinfo_fast.models import get_model
    >>> m = get_model("resnet18")
    >>> [m.split_points[k] for k in m.paper_splits]
    ['relu', 'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from ..errors import InvalidInputError
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from .vgg import VGG, vgg5, vgg9

__all__ = [
    "ZOO", "get_model", "vgg5", "vgg9", "resnet18", "resnet50", "VGG", "ResNet", "BasicBlock",
    "Bottleneck",
]

#: Registry of the zoo constructors by name.
ZOO: dict[str, Callable[..., nn.Module]] = {
    "vgg5": vgg5, "vgg9": vgg9, "resnet18": resnet18, "resnet50": resnet50,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name.

    Args:
        name: one of ``ZOO`` (``"vgg5"``, ``"vgg9"``, ``"resnet18"``); case, ``-`` and ``_`` are
            ignored (``"ResNet-18"`` works).
        **kwargs: passed to the constructor (``num_classes``, ``in_channels``, ``input_size``,
            ``stem`` for ResNet-18, ``hidden`` for VGG9).

    Returns:
        The freshly initialised model (train mode).

    Raises:
        InvalidInputError: (a ``ValueError``) unknown name; the message lists the known names.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ZOO:
        close = difflib.get_close_matches(key, list(ZOO), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise InvalidInputError(
            f"unknown model {name!r}; known models: {', '.join(sorted(ZOO))}.{hint}"
        )
    return ZOO[key](**kwargs)
