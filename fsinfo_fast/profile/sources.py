"""Where a profile's model, weights, data and split points come from.

- Models: a zoo name (:data:`fsinfo_fast.models.ZOO`) or ``package.module:function`` (called
  with no arguments, it must return an ``nn.Module``; e.g.
  ``fsinfo_fast.models.third_party:vit_small32``, a ``transformers`` ViT with random weights).
  The model is called as ``model(x)`` with ``x [B, C, H, W]`` (``transformers`` vision models take
  ``pixel_values`` as their first positional argument); a model that needs another call can be
  wrapped by the function. A model's ``split_points`` attribute (module paths) gives the
  default ``--splits`` and the meaning of integer split indices.
- Weights: ``--checkpoint`` is read with ``torch.load(weights_only=True)`` only (no arbitrary
  pickles); a zoo model without a checkpoint is trained briefly on bundled data
  (:func:`fsinfo_fast.train.demo_model`).
- Data: the bundled sets (``digits``, ``natural``), a folder of images (PIL; all the same size;
  8-bit images / 255, 16-bit ones / 65535: :func:`load_image_folder`),
  or ``torchvision:NAME:ROOT[:train|test]`` (a torchvision data set already on disk; only when
  torchvision is installed).
- Split points: ``paper`` (the model's ``paper_splits``), ``all``, or a comma-separated list of
  paper indices, ranges ``a-b``, module paths and torch.fx node names. Module paths work on any
  model: one torch.fx cannot trace (a ``transformers`` model, Python control flow, tuple or
  ``ModelOutput`` returns) is cut with forward hooks (:func:`fsinfo_fast.split`, route
  ``"hooks"``; the smashed data is the module's output, its first tensor for a tuple or
  ``ModelOutput``).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FSInfoError, SplitError
from .errors import CheckpointError, DataError, ModelSpecError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SplitSpec",
    "Dataset",
    "is_zoo_model",
    "build_model",
    "load_checkpoint",
    "load_data",
    "load_image_folder",
    "resolve_splits",
    "state_fingerprint",
    "structure_fingerprint",
    "tensor_fingerprint",
]

#: File name endings read as images in a data folder (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
#: ``path/to/file.py:function``
_FILE_SPEC = re.compile(r"^(?P<path>.+\.py):(?P<func>[A-Za-z_]\w*)$")


def _one_line(text: object, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# models


def is_zoo_model(spec: str) -> bool:
    """Whether ``spec`` names a zoo model (case, ``-`` and ``_`` ignored)."""
    from ..models import ZOO

    return zoo_key(spec) in ZOO


def zoo_key(spec: str) -> str:
    """A zoo model's name as the zoo spells it: case, ``-``, ``_`` and surrounding blanks
    ignored (``VGG_5``, ``vgg-5``, ``ResNet-18``). The one normaliser of model names: profile's
    ``--model`` and validate's ``--models`` and ``--sweep-model`` all go through it."""
    return spec.strip().lower().replace("-", "").replace("_", "")


def _import_from_cwd_too(modname: str):
    """``importlib.import_module``, and where the module is not found, again with the current
    directory on ``sys.path`` (``python -m fsinfo_fast`` has it there; the ``fsinfo-fast``
    script does not, so a model file beside the user was found by one and not the other)."""
    import os
    import sys

    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        top = modname.split(".")[0]
        if err.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(modname)
        except ModuleNotFoundError:
            sys.path.remove(cwd)
            raise err from None


def _import_file(path: str):
    """The module of a Python file (``--model path/to/file.py:function``), imported under a
    name of its own."""
    import importlib.util
    import os

    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ModuleNotFoundError(f"no file {path!r} (from {os.getcwd()})")
    name = "_fsinfo_model_" + re.sub(r"\W", "_", full)
    spec = importlib.util.spec_from_file_location(name, full)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_model(spec: str, **zoo_kwargs) -> nn.Module:
    """The model named by ``spec`` (fresh weights), in eval mode.

    Args:
        spec: zoo name, or ``package.module:function`` (or ``path/to/file.py:function``)
            returning an ``nn.Module``.
        **zoo_kwargs: constructor arguments for zoo models (``num_classes``, ``input_size``, ...).

    Raises:
        ModelSpecError: unknown name, import failure, or a function that fails or returns no
            module (one-line message).
    """
    from ..models import ZOO, get_model

    if is_zoo_model(spec):
        try:
            return get_model(spec, **zoo_kwargs).eval()
        except ValueError as err:  # e.g. an input size too small for the architecture
            raise ModelSpecError(f"--model {spec}: {_one_line(err)}") from None
    file = _FILE_SPEC.match(spec)
    if not (file or _SPEC.match(spec)):
        raise ModelSpecError(
            f"unknown model {spec!r}: give a zoo model ({', '.join(sorted(ZOO))}), "
            "'package.module:function' or 'path/to/file.py:function' returning an nn.Module"
        )
    modname, func = (file["path"], file["func"]) if file else spec.split(":")
    try:
        mod = _import_file(modname) if file else _import_from_cwd_too(modname)
    except Exception as err:  # ImportError, or whatever the module raises on import
        raise ModelSpecError(
            f"cannot import {modname!r} for --model {spec}: {_one_line(err)}"
        ) from None
    fn = getattr(mod, func, None)
    if fn is None:
        raise ModelSpecError(f"--model {spec}: module {modname!r} has no function {func!r}")
    if not callable(fn):
        raise ModelSpecError(
            f"--model {spec}: {func!r} in {modname} is not a function but the "
            f"{type(fn).__name__} {fn!r:.60} (--model names a function that takes no arguments "
            "and returns the nn.Module)")
    try:
        model = fn()
    except FSInfoError:
        raise
    except Exception as err:
        raise ModelSpecError(
            f"--model {spec}: {func}() failed: {type(err).__name__}: {_one_line(err)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"--model {spec}: {func}() returned {type(model).__name__}, not an nn.Module"
        )
    return model.eval()


def _unwrap_state(obj: object, path: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"checkpoint {path} holds {type(obj).__name__}, not a state dict (a mapping of "
            "parameter names to tensors); save model.state_dict() with torch.save"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is not a plain state dict: entry {bad[0]!r} is "
            f"{type(obj[bad[0]]).__name__}, not a tensor"
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file safely: ``torch.load(weights_only=True)`` on CPU, nothing else.

    Accepts a state dict, or a dict holding one under ``state_dict`` / ``model_state_dict`` /
    ``model``; strips a DataParallel ``module.`` prefix.

    Raises:
        CheckpointError: missing or unreadable file, a pickle that is not plain weights (refused,
            never executed), or content that is not a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a file")
    with open(p, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip, or a legacy pickle
        raise CheckpointError(f"cannot read checkpoint {p}: not a weights file written by "
                              f"torch.save (it starts with {head!r})")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = _one_line(str(err).split("\n", 1)[0], 160)
        raise CheckpointError(
            f"refusing checkpoint {p}: it is not a plain weights file and loading it would run "
            f"arbitrary code (torch.load(weights_only=True) rejected it: {first}); save "
            "model.state_dict() with torch.save instead"
        ) from None
    except Exception as err:  # not a torch file at all, truncated zip, ...
        raise CheckpointError(
            f"cannot read checkpoint {p}: not a weights file written by torch.save "
            f"({type(err).__name__}: {_one_line(err, 160)})"
        ) from None
    return _unwrap_state(obj, str(p))


def apply_checkpoint(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line summary of any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], Tensor) and isinstance(own[k], Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[0]}, "
                         "checkpoint vs model)")
        raise CheckpointError(
            f"checkpoint {path} does not match the model {type(model).__name__}: "
            + "; ".join(parts)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {_one_line(err, 200)}"
        ) from None


def infer_num_classes(state: Mapping[str, Tensor], default: int = 10) -> int:
    """Output width of a classifier state dict: rows of its last 2-d ``*.weight``."""
    last = None
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim == 2:
            last = v
    return int(last.shape[0]) if last is not None else default


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes), hex."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        _hash_value(h, k, v)
    return h.hexdigest()


#: transformers config entries that name where or with what a model was made, not its function
_CONFIG_PROVENANCE = ("_name_or_path", "transformers_version", "_commit_hash")


def structure_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what a module computes beyond its state dict, hex: every submodule's name,
    class and ``extra_repr`` (an activation, a LayerNorm's eps, a convolution's stride), the
    buffers the state dict leaves out (non-persistent: a rotary embedding's frequencies) and a
    transformers ``config`` (its provenance entries aside). A resume compares it: the same
    weights in another architecture (ReLU for Tanh) gave other numbers, which a resume mixed
    into the run (helper 126). Code inside a ``forward`` is not seen."""
    h = hashlib.sha256()
    for name, mod in model.named_modules():
        cls = type(mod)
        extra = re.sub(r" at 0x[0-9a-fA-F]+", "", mod.extra_repr())
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{extra}|".encode())
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers():
        if name not in persistent:
            _hash_value(h, f"buffer:{name}", buf)
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        try:
            entries = {k: v for k, v in to_dict().items() if k not in _CONFIG_PROVENANCE}
        except Exception:  # (a config that cannot list itself: its repr)
            entries = {"repr": repr(config)}
        _hash_value(h, "config", entries)
    return h.hexdigest()


def _hash_value(h: Any, key: str, v: Any) -> None:
    """Add ``v`` under ``key`` to the hash ``h``: a tensor's dtype, shape and bytes; a module's
    extra state (any picklable object) walked through its mappings and sequences to them."""
    if isinstance(v, Tensor):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(v, Mapping):
        h.update(f"{key}|mapping|{len(v)}|".encode())
        for k2 in sorted(v, key=repr):
            _hash_value(h, f"{key}.{k2!r}", v[k2])
    elif isinstance(v, (set, frozenset)):  # (in an order that does not depend on the
        # process's string hash seed, helper 130)
        h.update(f"{key}|{type(v).__name__}|{len(v)}|".encode())
        for i, item in enumerate(sorted(v, key=repr)):
            _hash_value(h, f"{key}{{{i}}}", item)
    elif isinstance(v, (list, tuple)):
        h.update(f"{key}|{type(v).__name__}|{len(v)}|".encode())
        for i, item in enumerate(v):
            _hash_value(h, f"{key}[{i}]", item)
    else:  # (an object's address in its repr is not its state)
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v))
        h.update(f"{key}|{type(v).__name__}|{text}|".encode())


def tensor_fingerprint(*tensors: Tensor) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes, hex."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class Dataset:
    """Profile inputs.

    Attributes:
        x: float32 ``[N, C, H, W]`` in ``[0, 1]``.
        y: int64 ``[N]`` labels (``-1`` where unknown).
        name: what ``--data`` said.
        description: how the samples were chosen.
    """

    x: Tensor
    y: Tensor
    name: str
    description: str


#: Pillow modes of one band holding 16-bit samples (read as ``uint16``, divided by 65535).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _image_array(im, path: Path, channels: int) -> np.ndarray:
    """One opened image as float32 ``[H, W, channels]`` in ``[0, 1]`` (intensity / the mode's
    maximum: 255 for 8-bit modes, 65535 for 16-bit ones).

    8-bit modes go through Pillow's ``convert("RGB")`` (gray repeated, a palette expanded, an
    alpha band dropped). Single-band wide modes are scaled by numpy, never clipped: ``I;16*``
    by 65535; ``I`` (32-bit integers; Pillow's mode for some 16-bit files) by 65535 when every
    value is in 0..65535, else refused; ``F`` (32-bit float) taken as it is when every value is
    finite and in [0, 1], else refused. ``channels=1`` takes gray images, and colour images only
    when their three bands are equal (a colour image is refused, not converted to gray).
    """
    mode = im.mode
    if mode in _MODES_16BIT or mode in ("I", "F"):
        raw = np.asarray(im)
        if mode in _MODES_16BIT:
            arr = raw.astype(np.float32) / 65535.0
        elif mode == "I":
            lo, hi = int(raw.min()), int(raw.max())
            if lo < 0 or hi > 65535:
                raise DataError(
                    f"image {path} is 32-bit integer (Pillow mode I) with values {lo}..{hi}: "
                    "outside 0..65535, so its range is unknown; save it as 8- or 16-bit"
                )
            arr = raw.astype(np.float32) / 65535.0
        else:
            raw = raw.astype(np.float32)
            if not np.isfinite(raw).all() or raw.min() < 0.0 or raw.max() > 1.0:
                raise DataError(
                    f"image {path} is floating point (Pillow mode F) with values outside [0, 1] "
                    f"({float(np.nanmin(raw)):.4g}..{float(np.nanmax(raw)):.4g}) or non-finite; "
                    "scale it to [0, 1] or save it as 8- or 16-bit"
                )
            arr = raw
        arr = arr[..., None]
        return arr if channels == 1 else np.repeat(arr, 3, axis=2)
    if channels == 1 and mode in ("L", "1", "LA", "La"):
        return np.asarray(im.convert("L"), dtype=np.float32)[..., None] / 255.0
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if channels == 1:
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise DataError(
                f"image {path} is in colour (mode {mode}) but --channels 1 takes grayscale "
                "images; convert the folder to gray first or use --channels 3"
            )
        rgb = rgb[..., :1]
    return rgb.astype(np.float32) / 255.0


def load_image_folder(folder: str | Path,
                      channels: int = 3) -> tuple[Tensor, Tensor, list[str]]:
    """Every image in ``folder`` (sorted by path), as float32 ``[N, channels, H, W]`` in ``[0, 1]``.

    Images directly in the folder get label ``-1``; with class sub-folders (``folder/cat/1.png``,
    the torchvision ``ImageFolder`` layout) the label is the sub-folder's index in sorted order.
    A folder holding both images and class sub-folders with images is refused (ambiguous).

    Values are intensity / the format's maximum: 8-bit images / 255, 16-bit images (Pillow
    modes ``I;16*``, and ``I`` with values in 0..65535) / 65535; float images (mode ``F``) must
    already be in [0, 1]. ``channels=3`` (default) repeats gray over RGB; ``channels=1`` takes
    grayscale images (colour images are refused, not converted).

    Raises:
        DataError: no images, an unreadable image, images of different sizes (naming the file),
            images both at the root and in class sub-folders, a colour image with
            ``channels=1``, or a 32-bit / float image whose range is unknown.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--data {folder}: not a bundled data set name and not a folder")

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    files = images_in(root)
    labels: list[int] = [-1] * len(files)
    classes = [c for c in sorted(p for p in root.iterdir() if p.is_dir()) if images_in(c)]
    if files and classes:
        raise DataError(
            f"data folder {root} holds {len(files)} image(s) at its root (e.g. {files[0].name}) "
            f"and class sub-folders with images ({', '.join(c.name for c in classes[:3])}"
            f"{', ...' if len(classes) > 3 else ''}); keep only one layout"
        )
    if not files:
        for ci, c in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
            sub = images_in(c)
            files += sub
            labels += [ci] * len(sub)
    if not files:
        raise DataError(
            f"data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ... "
            "directly or in class sub-folders)"
        )
    from PIL import Image, UnidentifiedImageError

    arrays = []
    first: tuple[int, int] | None = None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                arr = _image_array(im, f, channels)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(
                f"cannot read image {f}: {_one_line(err, 160) or type(err).__name__}"
            ) from None
        size = (arr.shape[1], arr.shape[0])
        if first is None:
            first = size
        elif size != first:
            raise DataError(
                f"images in {root} differ in size: {f.name} is {size[0]}x{size[1]} but "
                f"{files[0].name} is {first[0]}x{first[1]}; resize them to one size first"
            )
        arrays.append(arr)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    return x.contiguous(), torch.tensor(labels, dtype=torch.int64), [str(f) for f in files]


def _load_torchvision(spec: str, channels: int = 3) -> tuple[Tensor, Tensor, str]:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[1] or not parts[2]:
        raise DataError(
            f"--data {spec}: expected torchvision:NAME:ROOT[:train|test], e.g. "
            "torchvision:CIFAR10:/data/cifar"
        )
    name, root = parts[1], parts[2]
    split = parts[3] if len(parts) == 4 else "test"
    if split not in ("train", "test"):
        raise DataError(f"--data {spec}: split must be 'train' or 'test', got {split!r}")
    try:
        import torchvision.datasets as tvd
    except Exception as err:
        raise DataError(
            f"--data {spec} needs torchvision, which is not installed or does not import here "
            f"({type(err).__name__}); use a bundled data set or a folder of images"
        ) from None
    cls = getattr(tvd, name, None)
    if cls is None:
        raise DataError(f"--data {spec}: torchvision.datasets has no {name!r}")
    try:
        ds = cls(root, train=(split == "train"), download=False)
    except TypeError:
        try:
            ds = cls(root, split=split, download=False)
        except Exception as err:
            raise DataError(f"--data {spec}: {_one_line(err, 200)}") from None
    except Exception as err:  # not on disk (download=False), corrupt, ...
        raise DataError(f"--data {spec}: {_one_line(err, 200)}") from None
    xs, ys = [], []
    for i in range(len(ds)):
        img, label = ds[i]
        if hasattr(img, "convert"):  # a PIL image: scaled by its mode like a folder's images
            arr = _image_array(img, Path(f"{spec}[{i}]"), channels)
        elif channels == 1:
            raise DataError(f"--data {spec}: --channels 1 needs PIL images, sample {i} is "
                            f"{type(img).__name__}")
        else:
            arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
        xs.append(arr)
        ys.append(int(label))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).to(torch.float32)
    return x.contiguous(), torch.tensor(ys, dtype=torch.int64), f"torchvision {name} ({split})"


def check_fits(spec: str, size: int, channels: int, n: int | None = None) -> None:
    """Raise :class:`DataError` where ``n`` images of the bundled set ``spec`` at ``--size``
    (default: as many as :func:`load_data` builds) would take more than half the available
    memory (``--size 5000`` was killed for memory after 3 minutes, with no message;
    ``--size 100000`` raised a raw allocator error)."""
    from .._sysinfo import available_memory_bytes
    from ..data import TRAIN_FRACTION, _digits_raw

    if n is None:
        total = len(_digits_raw()[1])
        n = total - int(TRAIN_FRACTION * total) if spec == "digits" else 256
    need = n * channels * size * size * 4  # float32
    avail = available_memory_bytes()
    if need > avail // 2:
        raise DataError(
            f"--data {spec} at --size {size}: {n} images of {channels}x{size}x{size} float32 "
            f"take {need / 2**30:.1f} GiB, more than half the {avail / 2**30:.1f} GiB of memory "
            "available; choose a smaller --size")


def load_data(spec: str, size: int, seed: int, max_samples: int | None,
              channels: int = 3, size_given: bool = False) -> Dataset:
    """The profile's inputs for ``--data spec`` (bundled names use their held-out test split).

    Args:
        spec: ``digits``, ``natural``, a folder path or ``torchvision:NAME:ROOT[:split]``.
        size: side in pixels for the bundled sets (folders keep their images' size).
        seed: seed of the natural-image crops.
        max_samples: keep the first this many samples (``None``: all).
        channels: 3 (gray repeated over RGB) or 1 (``digits``, or gray images only: a colour
            image and ``natural`` are refused).
        size_given: ``size`` was set explicitly (``--size``): data that keep their own size (a
            folder, ``torchvision:``) are refused where it differs (it was ignored silently).

    Raises:
        DataError: unknown data, unreadable images, or colour data with ``channels=1``.
    """
    from ..data import DATASETS, digits, natural_images

    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if channels == 1 and spec == "natural":
        raise DataError("--data natural is colour photographs; --channels 1 takes digits or a "
                        "folder of grayscale images")
    if spec in ("digits", "natural"):
        check_fits(spec, size, channels, None if spec == "digits" else max_samples or 256)
    if spec == "digits":
        x, y = digits(size=size, channels=channels, split="test")
        desc = f"digits test split ({len(x)} images, {size}x{size})"
    elif spec == "natural":
        # The demo model trains on natural_images(n=900, seed) minus a held-out 20%; for a
        # checkpoint, fresh crops: a different seed stream than the demo's training crops.
        n = max_samples if max_samples else 256
        x, y = natural_images(size=size, n=n, seed=seed + 1_000_003)
        desc = f"natural image crops ({len(x)}, {size}x{size}, seed {seed})"
    elif spec.startswith("torchvision:"):
        x, y, desc = _load_torchvision(spec, channels)
    elif spec in DATASETS:  # a bundled set without special handling above
        x, y = DATASETS[spec](size=size)
        if x.shape[1] != channels:
            raise DataError(f"--data {spec} has {x.shape[1]} channels, not {channels}")
        desc = spec
    else:
        p = Path(spec)
        if not p.exists():
            raise DataError(
                f"unknown data {spec!r}: not a bundled data set ({', '.join(sorted(DATASETS))}), "
                "not an existing folder of images and not torchvision:NAME:ROOT"
            )
        x, y, _files = load_image_folder(p, channels)
        desc = f"image folder {p} ({len(x)} images, {x.shape[-1]}x{x.shape[-2]})"
    own = spec not in DATASETS
    if size_given and own and tuple(x.shape[-2:]) != (size, size):
        raise DataError(
            f"--size {size} applies to the bundled data sets ({', '.join(sorted(DATASETS))}); "
            f"--data {spec} keeps its images' own size ({x.shape[-1]}x{x.shape[-2]}): resize "
            "the images beforehand, or leave --size out")
    if max_samples and max_samples < len(x):
        desc = f"the first {max_samples} of {desc}"  # the count used, not only the source's
        x, y = x[:max_samples], y[:max_samples]
    return Dataset(x=x.contiguous(), y=y, name=spec, description=desc)


# ------------------------------------------------------------------------------------------------
# split points


@dataclass
class SplitSpec:
    """One split point of the profiled model.

    Attributes:
        name: module path or fx node name (the record key).
        index: paper split index (``None`` when not one of ``model.split_points``).
        layer: human-readable layer name (``"conv64"``, ...), or ``name``.
        encoder: the bottom part of the model up to the split.
        route: how :func:`fsinfo_fast.split` cut it (``"fx"``, ``"sequential"`` or ``"hooks"``).
        route_reason: why the hooks route was taken (``None`` otherwise).
    """

    name: str
    index: int | None
    layer: str
    encoder: nn.Module
    route: str = "fx"
    route_reason: str | None = None

    @property
    def label(self) -> str:
        return f"{self.index}" if self.index is not None else self.name


def _default_split_items(model: nn.Module) -> list[int | str]:
    paper = list(getattr(model, "paper_splits", []) or [])
    if paper:
        return paper
    points = getattr(model, "split_points", None)
    if points:
        return list(range(len(points)))
    if isinstance(model, nn.Sequential):
        return list(range(max(1, len(model) - 1)))
    raise SplitError(
        f"{type(model).__name__} has no split_points or paper_splits, so there is no default "
        "list of split points; pass --splits with module paths (see model.named_modules()) or "
        "torch.fx node names"
    )


def parse_split_items(spec: str | None, model: nn.Module) -> list[int | str]:
    """The split points named by ``--splits`` (before checking they exist)."""
    if spec is None or spec.strip() in ("", "paper", "default"):
        return _default_split_items(model)
    if spec.strip() == "all":
        points = getattr(model, "split_points", None)
        if points:
            return list(range(len(points)))
        if isinstance(model, nn.Sequential):
            return list(range(len(model)))
        raise SplitError(
            f"--splits all needs a model with split_points or an nn.Sequential; "
            f"{type(model).__name__} has neither, list module paths instead"
        )
    items: list[int | str] = []
    for raw in spec.split(","):
        tok = raw.strip()
        if not tok:
            continue
        m = re.fullmatch(r"(-?\d+)-(\d+)", tok)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise SplitError(f"--splits: empty range {tok!r}")
            items.extend(range(a, b + 1))
        elif re.fullmatch(r"-?\d+", tok):
            items.append(int(tok))
        else:
            items.append(tok)
    if not items:
        raise SplitError("--splits names no split point")
    return items


def resolve_splits(model: nn.Module, spec: str | list[int | str] | None, *,
                   input_name: str | None = None) -> list[SplitSpec]:
    """Split the model at every point named by ``spec`` (duplicates dropped, order kept).

    Args:
        model: the full model.
        spec: a ``--splits`` string (see :func:`parse_split_items`), or a list of split points
            taken as they are (``int``: paper index; ``str``: module path or fx node name, never
            parsed as a number).
        input_name: :func:`fsinfo_fast.split`'s ``input_name`` (the keyword the model takes
            the input as), or None.

    Raises:
        SplitError: an unknown or unusable split point (one line, from :func:`fsinfo_fast.split`).
    """
    from ..split import split

    out: list[SplitSpec] = []
    seen: set[str] = set()
    names = list(getattr(model, "layer_names", []) or [])
    items = list(spec) if isinstance(spec, (list, tuple)) else parse_split_items(spec, model)
    for item in items:
        try:
            enc = split(model, item, **({} if input_name is None else {"input_name": input_name}))
        except SplitError as err:
            raise SplitError(_one_line(err, 400)) from None
        name = str(getattr(enc, "split_name", item))
        if name in seen:
            continue
        seen.add(name)
        index = getattr(enc, "split_index", item if isinstance(item, int) else None)
        layer = names[index] if index is not None and index < len(names) else name
        out.append(SplitSpec(name=name, index=index, layer=layer, encoder=enc.eval(),
                             route=str(getattr(enc, "split_route", "fx")),
                             route_reason=getattr(enc, "split_route_reason", None)))
    return out


def describe_model_source(spec: str, checkpoint: str | None) -> str:
    if checkpoint:
        return f"{spec} with weights from {checkpoint}"
    if is_zoo_model(spec):
        return f"{spec} trained briefly on bundled data (demo_model)"
    return f"{spec}"


def state_to_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() if isinstance(v, Tensor) else v
                for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()
