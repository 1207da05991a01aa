"""Models users bring: Hugging Face ``transformers`` vision models built offline from configs.

Most people who profile a model bring a ``transformers``, timm or torchvision-style definition,
not the paper's zoo. ``transformers`` builds its models from a config object with random weights
and no download, so these builders are the practical stand-in for "a model a user brings": Python
control flow in ``forward``, ``ModelOutput`` returns, attention, LayerNorm, GELU, window shifts.
None of them can be traced by ``torch.fx.symbolic_trace``.

Each builder returns the raw ``transformers`` model in eval mode (input ``pixel_values``
``[B, 3, size, size]``, output a ``ModelOutput``); cut it with
``fsinfo_fast.split(model, at="module.path")``. :data:`SPLITS` lists module paths to cut at.

Zero-argument builders for ``fsinfo-fast profile / guard --model package.module:function``:
``vit_small32``, ``deit_small32``, ``dinov2_small32``, ``swin_small32``, ``convnext_small32``,
``resnet_small32``, ``mobilenetv2_small32``, ``segformer_small32`` and ``regnet_small32`` (the small
configs at 32 px, seed 0), and ``convnext_classifier_small32`` / ``vit_classifier_small32`` (the
same with a 10-class head, output ``.logits``: ``fsinfo-fast guard`` measures their accuracy) carry
``split_points`` (:data:`SPLITS`), so integer split indices and the commands' default ``--splits``
work on them::

    fsinfo-fast profile --model fsinfo_fast.models.third_party:convnext_small32 \
        --data natural --size 32 --splits encoder.stages.0,encoder.stages.1

``transformers`` is an optional dependency (``pip install transformers``); a builder raises
:class:`ImportError` with that line when it is missing.

Example:
    >>> from fsinfo_fast.models.third_party import build, SPLITS
    >>> model = build("convnext", size=32)   # doctest: +SKIP
    >>> SPLITS["convnext"][0]
    'encoder.stages.0'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import InvalidInputError

__all__ = [
    "ARCHITECTURES",
    "FULL_SIZE",
    "SPLITS",
    "build",
    "builder",
    "convnext_classifier_small32",
    "convnext_small32",
    "deit_small32",
    "dinov2_small32",
    "mobilenetv2_small32",
    "regnet_small32",
    "require_transformers",
    "resnet_small32",
    "segformer_small32",
    "splits_of",
    "swin_small32",
    "vit_classifier_small32",
    "vit_small32",
]


def require_transformers() -> Any:
    """The ``transformers`` module, or :class:`ImportError` with the install line."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs Hugging Face transformers, which is not installed: "
            "pip install transformers"
        ) from err


def _small(size: int) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """``name -> (model class, config class, config kwargs)``: small random-weight configs."""
    return {
        "vit": ("ViTModel", "ViTConfig", dict(
            image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64)),
        "deit": ("DeiTModel", "DeiTConfig", dict(
            image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64)),
        "dinov2": ("Dinov2Model", "Dinov2Config", dict(
            image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, mlp_ratio=2)),
        "swin": ("SwinModel", "SwinConfig", dict(
            image_size=size, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
            window_size=4)),
        "convnext": ("ConvNextModel", "ConvNextConfig", dict(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
        "resnet": ("ResNetModel", "ResNetConfig", dict(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")),
        "mobilenetv2": ("MobileNetV2Model", "MobileNetV2Config", dict(
            image_size=size, depth_multiplier=0.35)),
        "segformer": ("SegformerModel", "SegformerConfig", dict(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])),
        "regnet": ("RegNetModel", "RegNetConfig", dict(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)),
        # convolutions and BatchNorm turned into tokens, attention with BatchNorm'd projections
        "levit": ("LevitModel", "LevitConfig", dict(
            image_size=size, patch_size=16, hidden_sizes=[16, 24, 32],
            num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8])),
    }


#: Full-size configs (the library defaults of these classes): ViT-B/16 and ConvNeXt-T at 224 px.
FULL_SIZE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vit_b16": ("ViTModel", "ViTConfig", {}),
    "convnext_tiny": ("ConvNextModel", "ConvNextConfig", {}),
}

#: Every architecture :func:`build` knows.
ARCHITECTURES = tuple(_small(32)) + tuple(FULL_SIZE)

#: Module paths to cut each architecture at (shallow first).
SPLITS: dict[str, tuple[str, ...]] = {
    "vit": ("layers.0", "layers.1"),
    "deit": ("layers.0", "layers.1"),
    "dinov2": ("encoder.layer.0", "encoder.layer.1"),
    "swin": ("encoder.layers.0", "encoder.layers.1"),
    "convnext": ("encoder.stages.0", "encoder.stages.1"),
    "resnet": ("encoder.stages.0", "encoder.stages.1"),
    "mobilenetv2": ("layer.1", "layer.3"),
    "segformer": ("stages.0", "stages.1"),
    "regnet": ("encoder.stages.0", "encoder.stages.1"),
    "levit": ("patch_embeddings", "encoder.stages.0"),
    "vit_b16": ("layers.3", "layers.7"),
    "convnext_tiny": ("encoder.stages.1", "encoder.stages.2"),
}


def build(name: str, *, size: int = 32, seed: int = 0, num_labels: int | None = None,
          **overrides: Any) -> nn.Module:
    """A ``transformers`` vision model with random (seeded) weights, in eval mode.

    Args:
        name: one of :data:`ARCHITECTURES` (small configs, or ``"vit_b16"`` /
            ``"convnext_tiny"`` at their library-default size, 224 px).
        size: input resolution the small configs are built for (ViT-like models need it).
        seed: seed of the random weights.
        num_labels: ``None``: the bare model (output ``last_hidden_state`` etc.); an ``int``:
            its ``...ForImageClassification`` version with that many classes (output
            ``.logits [B, num_labels]``; the bare model is its submodule
            ``model.base_model_prefix``, so split paths gain that prefix: :func:`splits_of`).
        **overrides: config fields to change.

    Raises:
        ValueError: unknown ``name``.
        ImportError: ``transformers`` is not installed (with the install line).
    """
    import torch

    table = {**_small(size), **FULL_SIZE}
    if name not in table:
        raise InvalidInputError(f"unknown architecture {name!r}; choose one of {ARCHITECTURES}")
    tf = require_transformers()
    model_cls, cfg_cls, kwargs = table[name]
    if num_labels is not None:
        model_cls = model_cls.removesuffix("Model") + "ForImageClassification"
        overrides = {**overrides, "num_labels": int(num_labels)}
    config = getattr(tf, cfg_cls)(**{**kwargs, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(tf, model_cls)(config)
    return model.eval()


def builder(name: str, **kw: Any) -> Callable[[], nn.Module]:
    """A zero-argument builder for ``fsinfo-fast profile --model``-style loading."""
    return lambda: build(name, **kw)


def splits_of(model: nn.Module, name: str) -> tuple[str, ...]:
    """:data:`SPLITS` of ``name`` as module paths of ``model``: prefixed with the bare model's
    attribute (``"convnext."``, ...) for a ``...ForImageClassification`` model."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return tuple(f"{prefix}.{p}" for p in SPLITS[name])
    return SPLITS[name]


def _small32(name: str, num_labels: int | None = None) -> nn.Module:
    """``build(name, size=32)`` with ``split_points`` (:func:`splits_of`) attached."""
    model = build(name, size=32, num_labels=num_labels)
    model.split_points = list(splits_of(model, name))
    return model


def convnext_classifier_small32() -> nn.Module:
    """:func:`convnext_small32` with a 10-class head (``ConvNextForImageClassification``,
    output ``.logits``; split points ``convnext.encoder.stages.0`` and ``.1``)."""
    return _small32("convnext", num_labels=10)


def vit_classifier_small32() -> nn.Module:
    """:func:`vit_small32` with a 10-class head (``ViTForImageClassification``, output
    ``.logits``; split points ``vit.layers.0`` and ``vit.layers.1``)."""
    return _small32("vit", num_labels=10)


def vit_small32() -> nn.Module:
    """Small random-weight ViT (patch 8, width 32, 2 blocks) for 3x32x32, with split points."""
    return _small32("vit")


def deit_small32() -> nn.Module:
    """Small random-weight DeiT (patch 8, width 32, 2 blocks) for 3x32x32, with split points."""
    return _small32("deit")


def dinov2_small32() -> nn.Module:
    """Small random-weight DINOv2 (patch 8, width 32, 2 blocks) for 3x32x32, with split points."""
    return _small32("dinov2")


def swin_small32() -> nn.Module:
    """Small random-weight Swin (patch 2, width 16, depths 2-2) for 3x32x32, with split points."""
    return _small32("swin")


def convnext_small32() -> nn.Module:
    """Small random-weight ConvNeXt (widths 16-32) for 3x32x32, with split points."""
    return _small32("convnext")


def resnet_small32() -> nn.Module:
    """Small random-weight ``transformers`` ResNet (basic blocks, widths 16-32), with split
    points."""
    return _small32("resnet")


def mobilenetv2_small32() -> nn.Module:
    """Small random-weight MobileNetV2 (depth multiplier 0.35) for 3x32x32, with split points."""
    return _small32("mobilenetv2")


def segformer_small32() -> nn.Module:
    """Small random-weight Segformer encoder (2 stages) for 3x32x32, with split points."""
    return _small32("segformer")


def regnet_small32() -> nn.Module:
    """Small random-weight RegNet (widths 16-32) for 3x32x32, with split points."""
    return _small32("regnet")
