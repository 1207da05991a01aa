"""Real image data that ships inside installed packages: nothing is downloaded.

- :func:`digits`: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upsampled to
  ``size x size``, with a fixed 80/20 train/test split.
- :func:`natural_images`: ``size x size`` RGB crops of the real photographs bundled with
  scikit-image and scikit-learn (astronaut, chelsea the cat, coffee, rocket, Hubble deep field,
  immunohistochemistry, retina, china, flower), labelled by source photograph.
- :func:`load_dataset`: the two by name (``DATASETS``).

Value range: every image is float32 in ``[0, 1]`` (pixel intensity / maximum), with **no** mean/std
normalisation, so noise scales ``sigma``, reconstruction MSEs and FSInfo's ``log(sigma)`` term are
all in pixel units of a [0, 1] image (CIFAR-style ``ToTensor()`` scaling). Layout ``[N, C, H, W]``.
Everything is deterministic: the same arguments give bit-identical tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._extras import require
from .errors import InvalidInputError, InvalidInputTypeError, check_int

__all__ = ["digits", "natural_images", "load_dataset", "DATASETS", "NATURAL_SOURCES"]

#: Fraction of the digits that form the training split.
TRAIN_FRACTION = 0.8
#: Seed of the fixed permutation behind the digits train/test split.
SPLIT_SEED = 0

#: Photographs available offline, in label order: ``(package, name)``.
NATURAL_SOURCES: tuple[tuple[str, str], ...] = (
    ("skimage", "astronaut"),
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "rocket"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "retina"),
    ("sklearn", "china"),
    ("sklearn", "flower"),
)


def _check_size(size: int) -> int:
    return check_int(size, "size", 1, " (pixels)")


def _check_channels(channels: int) -> int:
    if check_int(channels, "channels") not in (1, 3):
        raise InvalidInputError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    require("sklearn", "the bundled digits data set")
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def digits(
    size: int = 32,
    channels: int = 3,
    split: str = "all",
    max_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits as ``size x size`` images.

    The 8x8 images (intensities 0..16) are divided by 16 and upsampled with bilinear interpolation
    (``align_corners=False``) to ``size x size``; gray is repeated over ``channels``. The split is a
    fixed random permutation (seed 0) of the 1,797 images: the first 80% (1,437) are ``"train"``,
    the rest (360) ``"test"``; the order within each split is that permutation (classes mixed).

    Args:
        size: output side in pixels.
        channels: 1 (gray) or 3 (gray repeated, for RGB models).
        split: ``"all"`` (1,797 images, the dataset's own order), ``"train"`` or ``"test"``.
        max_samples: keep only the first this many images of the split.

    Returns:
        ``(x, y)``: ``x`` float32 ``[N, channels, size, size]`` in ``[0, 1]``; ``y`` int64 ``[N]``
        digit labels 0..9.

    Example:
        >>> x, y = digits(size=16, split="test", max_samples=4)
        >>> tuple(x.shape), x.dtype, y.dtype
        ((4, 3, 16, 16), torch.float32, torch.int64)
    """
    size, channels = _check_size(size), _check_channels(channels)
    images, labels = _digits_raw()
    n = len(labels)
    if split == "all":
        idx = np.arange(n)
    elif split in ("train", "test"):
        perm = np.random.default_rng(SPLIT_SEED).permutation(n)
        n_train = int(TRAIN_FRACTION * n)
        idx = perm[:n_train] if split == "train" else perm[n_train:]
    else:
        raise InvalidInputError(f"split must be 'all', 'train' or 'test', got {split!r}")
    if max_samples is not None:
        idx = idx[: check_int(max_samples, "max_samples", 1)]
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # [N, 1, 8, 8]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, channels, -1, -1).contiguous()
    return x, torch.from_numpy(labels[idx].copy())


@functools.cache
def _load_photo(package: str, name: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 photograph from an installed package (cached per process)."""
    if package == "skimage":
        require("skimage", "the bundled natural images")
        import skimage.data

        img = getattr(skimage.data, name)()
    elif package == "sklearn":
        require("sklearn", "the bundled natural images")
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:  # pragma: no cover - guarded by NATURAL_SOURCES
        raise InvalidInputError(f"unknown image package {package!r}")
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    img.setflags(write=False)
    return img


def natural_images(
    size: int = 32,
    n: int = 256,
    seed: int = 0,
    sources: Sequence[str] | str | None = None,
    channels: int = 3,
) -> tuple[Tensor, Tensor]:
    """CIFAR-style ``size x size`` RGB crops of real photographs bundled with installed packages.

    Sample ``i`` comes from source photograph ``i % len(sources)`` (so the classes are balanced):
    a square crop whose side is drawn uniformly between ``max(size, s/8)`` and ``s/2`` pixels
    (``s``: the photograph's shorter side), at a uniformly drawn position, resized to ``size`` with
    antialiased bilinear interpolation. Deterministic given ``seed`` (numpy ``default_rng``).

    Args:
        size: output side in pixels.
        n: number of crops.
        seed: seed of the crop positions and sizes.
        sources: names of the photographs to use (default: all of ``NATURAL_SOURCES``:
            astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina,
            china, flower), or one name. Labels index into this list.
        channels: 3; 1 is refused (colour photographs: a gray conversion would be a choice of
            weights, and ``fsinfo-fast profile --channels 1`` refuses them too), so
            ``load_dataset(name, channels=...)`` takes the same keyword for both data sets.

    Returns:
        ``(x, y)``: ``x`` float32 ``[n, 3, size, size]`` in ``[0, 1]``; ``y`` int64 ``[n]``, the
        index of each crop's source photograph.

    Example:
        >>> x, y = natural_images(size=16, n=9)
        >>> tuple(x.shape), y.tolist()
        ((9, 3, 16, 16), [0, 1, 2, 3, 4, 5, 6, 7, 8])
    """
    size, n = _check_size(size), check_int(n, "n", 1)
    seed = check_int(seed, "seed", 0)  # numpy's default_rng refuses a negative seed
    if _check_channels(channels) != 3:
        raise InvalidInputError(
            "natural_images: channels=1 is not available: the photographs are colour (a gray "
            "conversion would pick channel weights for you); use digits(channels=1) for gray "
            "images, or convert x yourself (e.g. x.mean(1, keepdim=True))")
    known = {name: pkg for pkg, name in NATURAL_SOURCES}
    if isinstance(sources, str):  # one name, not its letters
        sources = [sources]
    names = [name for _, name in NATURAL_SOURCES] if sources is None else list(sources)
    if not names:
        raise InvalidInputError("sources must name at least one photograph")
    repeated = sorted({name for name in names if isinstance(name, str) and names.count(name) > 1})
    if repeated:  # (one photograph would be two classes)
        raise InvalidInputError(
            f"sources names {', '.join(map(repr, repeated))} more than once: the labels index "
            "the sources, so one photograph would be two classes; name each photograph once")
    for name in names:
        if name not in known:
            raise InvalidInputError(
                f"unknown photograph {name!r}; available offline: {', '.join(known)}"
            )
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size, dtype=torch.float32)
    labels = torch.arange(n, dtype=torch.int64) % len(names)
    for i in range(n):
        img = _load_photo(known[names[int(labels[i])]], names[int(labels[i])])
        h, w = img.shape[:2]
        short = min(h, w)
        lo = min(max(size, short // 8), short // 2)
        side = int(rng.integers(lo, max(lo, short // 2) + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[top : top + side, left : left + side]))
        crop = crop.permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0
        if side != size:
            crop = F.interpolate(
                crop, size=(size, size), mode="bilinear", align_corners=False,
                antialias=side > size,
            )
        out[i] = crop[0].clamp_(0.0, 1.0)
    return out, labels


#: Dataset loaders by name; each returns ``(x, y)`` with ``x`` in ``[0, 1]``.
DATASETS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "digits": digits,
    "natural": natural_images,
}


def load_dataset(name: str, size: int = 32, **kwargs) -> tuple[Tensor, Tensor]:
    """Load a bundled data set by name.

    Args:
        name: ``"digits"`` (:func:`digits`) or ``"natural"`` (:func:`natural_images`).
        size: image side in pixels.
        **kwargs: passed on (``channels``; ``split``, ``max_samples`` for digits; ``n``,
            ``seed``, ``sources`` for natural).

    Returns:
        ``(x, y)``: float32 images ``[N, C, size, size]`` in ``[0, 1]`` and int64 labels ``[N]``.

    Raises:
        InvalidInputError: (a ``ValueError``) unknown name; the message lists the known ones.
        InvalidInputTypeError: (a ``TypeError``) a keyword the named loader does not take
            (the other loader's: ``split`` or ``max_samples`` for natural, ``n`` or ``seed``
            for digits); the message lists the keywords it takes.
    """
    import inspect

    if name not in DATASETS:
        raise InvalidInputError(
            f"unknown data set {name!r}; bundled data sets (no download): "
            f"{', '.join(sorted(DATASETS))}"
        )
    loader = DATASETS[name]
    takes = [p for p in inspect.signature(loader).parameters if p != "size"]
    bad = [k for k in kwargs if k not in takes]
    if bad:
        hints = [f"{k!r} (the number of images is {_SAME[k]!r} here)" if _SAME.get(k) in takes
                 else repr(k) for k in bad]
        raise InvalidInputTypeError(
            f"load_dataset({name!r}) got keyword(s) its loader {loader.__name__}() does not "
            f"take: {', '.join(hints)}; it takes size, {', '.join(takes)}")
    return loader(size=size, **kwargs)


#: a keyword of one loader and the other's for the same thing (load_dataset's hint)
_SAME = {"max_samples": "n", "n": "max_samples"}
