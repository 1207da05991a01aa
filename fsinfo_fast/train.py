"""Brief, deterministic training of zoo models on the bundled data (for demos, tests, examples).

:func:`train_briefly` trains any classifier with Adam and cross-entropy; :func:`demo_model` builds
a zoo model, trains it on a bundled data set and reports its test accuracy. FSInfo depends on the
weights (it drops after the first epoch and rises with over-fitting, see PAPER.md), so a briefly
trained model gives more meaningful leakage numbers than a freshly initialised one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._version import __version__
from .errors import InvalidInputError, InvalidInputTypeError

__all__ = ["train_briefly", "demo_model", "accuracy", "default_cache_dir"]

log = logging.getLogger(__name__)


def train_briefly(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Train a classifier in place with Adam and cross-entropy, deterministically.

    The mini-batch order comes from a ``torch.Generator`` seeded with ``seed``; the model's own
    random draws (Dropout) come from the global RNG, seeded with ``seed`` inside
    ``torch.random.fork_rng`` (CPU and the model's CUDA device), so the caller's global RNG state
    is neither used nor changed and the same model, data and arguments give bit-identical weights
    on the same machine and thread count.

    Args:
        model: maps ``x[i:j]`` to logits ``[j - i, num_classes]`` (a tensor, or an output with a
            ``logits`` tensor attribute, as Hugging Face classifiers return); trained on its own
            device.
        x: inputs ``[N, ...]`` (float).
        y: integer class labels ``[N]`` in ``0..num_classes - 1``.
        epochs: passes over the data (an integer >= 0).
        lr: Adam learning rate (finite, > 0).
        batch_size: mini-batch size (an integer >= 1; the last batch of an epoch may be
            smaller). A model with batch norm cannot train on one sample: there a last batch of
            one sample joins the one before it (``batch_size + 1`` samples), and ``N == 1`` or
            ``batch_size == 1`` is refused before any update.
        seed: seed of the shuffling and of the model's random draws (an integer).
        progress: show a tqdm progress bar (one step per epoch, with the mean loss).
        weight_decay: Adam weight decay (finite, >= 0).

    Returns:
        ``model`` itself, in eval mode.

    Raises:
        InvalidInputError: mismatched lengths, empty data, bad hyper-parameters, a model or data
            on the meta device, a batch-norm model with ``N == 1`` or ``batch_size == 1``, or
            labels outside ``0..num_classes - 1`` (checked at the first mini-batch, whose logits
            give ``num_classes``), a seed outside ``[-2**63, 2**64 - 1]``, ``lr`` or
            ``weight_decay`` beyond the parameters' dtype, non-finite ``x``, or a loss that
            becomes non-finite (raised before that step).
        InvalidInputTypeError: ``x`` of another dtype than the model's parameters, ``x`` not
            floating point, ``y`` not integer, ``epochs``,
            ``batch_size`` or ``seed`` not integers, ``lr`` / ``weight_decay`` not real numbers,
            or the model's output neither logits nor an output with ``logits``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InvalidInputTypeError("x must be a floating-point tensor [N, ...]")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.ndim != 1:
        raise InvalidInputTypeError("y must be a 1-D integer tensor of class labels [N]")
    if len(x) != len(y) or len(x) == 0:
        raise InvalidInputError(f"x and y need the same, non-zero length; got {len(x)}, {len(y)}")
    epochs = _integer(epochs, "epochs")
    batch_size = _integer(batch_size, "batch_size")
    seed = _seed(seed)
    lr = _real(lr, "lr")
    weight_decay = _real(weight_decay, "weight_decay")
    if epochs < 0 or batch_size < 1 or not lr > 0 or not weight_decay >= 0:
        raise InvalidInputError(
            "train_briefly needs epochs >= 0, batch_size >= 1, a finite lr > 0 and a finite "
            f"weight_decay >= 0; got epochs={epochs}, batch_size={batch_size}, lr={lr}, "
            f"weight_decay={weight_decay}"
        )
    _check_not_meta(model, x, y, "train_briefly")
    if int(y.min()) < 0:
        raise InvalidInputError(f"y holds a negative class label ({int(y.min())})")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise InvalidInputError("model has no parameters to train") from None
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if floats and x.dtype not in floats:
        raise InvalidInputTypeError(
            f"train_briefly: x is {x.dtype} but the model's parameters are {floats[0]}; convert "
            f"one to the other (x.to({floats[0]}) or model.to({x.dtype}))")
    for dt in set(floats):  # Adam keeps lr and weight_decay in the parameters' dtype
        big = torch.finfo(dt).max
        if lr > big or weight_decay > big:
            raise InvalidInputError(
                f"train_briefly: lr={lr} and weight_decay={weight_decay} must be at most the "
                f"largest {dt} ({big:.4g}), the parameters' dtype")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError(
            f"train_briefly: x holds {int((~torch.isfinite(x)).sum())} non-finite value(s) "
            "(NaN or inf); training on them makes every weight NaN")
    if _has_batch_norm(model) and (len(x) == 1 or batch_size == 1):
        # torch refuses batch statistics of one value per channel; refused before any update
        raise InvalidInputError(
            f"train_briefly: the model has batch norm, which cannot train on mini-batches of one "
            f"sample (N = {len(x)}, batch_size = {batch_size}); give at least 2 samples and "
            "batch_size >= 2")

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        _train(model, x, y, device, epochs, lr, batch_size, seed, progress, weight_decay)
    return model


def _check_not_meta(model: nn.Module, x: Tensor, y: Tensor, who: str) -> None:
    """Refuse a model or data on the meta device (shapes only, no values) up front: torch
    raised its own errors from inside the loop (``int(y.min())``, ``.to(device)``, the
    loss)."""
    on_meta = [name for name, t in (("x", x), ("y", y)) if t.device.type == "meta"]
    if any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        on_meta.insert(0, "the model")
    if on_meta:
        raise InvalidInputError(
            f"{who}: {' and '.join(on_meta)} {'is' if len(on_meta) == 1 else 'are'} on the "
            "meta device (shapes only, no values): "
            "give real data, and a model with real weights on a real device (a meta model: "
            "model.to_empty(device=...) then load_state_dict(...), or build it there)")


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _integer(value: object, name: str) -> int:
    """``value`` as an ``int``; raises where it is not an integer (a bool, ``1.5``, ``8.0``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputTypeError(
            f"train_briefly: {name} must be an integer, got {value!r} ({type(value).__name__})"
        )
    return int(value)


#: The seeds a ``torch.Generator`` accepts.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _seed(value: object, who: str = "train_briefly") -> int:
    """``value`` as an ``int`` seed within what ``torch.Generator.manual_seed`` accepts."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputTypeError(
            f"{who}: seed must be an integer, got {value!r} ({type(value).__name__})")
    if not _SEED_MIN <= int(value) <= _SEED_MAX:
        raise InvalidInputError(
            f"{who}: seed must be in [-2**63, 2**64 - 1] (a torch.Generator seed), got {value!r}")
    return int(value)


def _real(value: object, name: str) -> float:
    """``value`` as a finite ``float``; raises where it is not a real number or not finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputTypeError(
            f"train_briefly: {name} must be a real number, got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(float(value)):
        raise InvalidInputError(f"train_briefly: {name} must be finite, got {value!r}")
    return float(value)


def _logits(out: Any, who: str) -> Tensor:
    """The logits ``[B, num_classes]`` in a model's output: the output itself if it is a tensor,
    else its ``logits`` attribute (a Hugging Face classifier's ``ModelOutput``)."""
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        raise InvalidInputTypeError(
            f"{who}: the model returned {type(out).__name__}, neither a logits tensor "
            "[B, num_classes] nor an output with a `logits` tensor attribute"
        )
    if logits.ndim != 2:
        raise InvalidInputError(
            f"{who}: the model's logits must be [B, num_classes], got shape {tuple(logits.shape)}"
        )
    return logits


def _train(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, epochs: int, lr: float,
           batch_size: int, seed: int, progress: bool, weight_decay: float) -> None:
    """:func:`train_briefly`'s loop, arguments checked (run inside its ``fork_rng``)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    y = y.long()
    n = len(x)
    top = int(y.max())
    checked = False
    bar = None
    if progress:
        from ._progress import progress_bar

        bar = progress_bar("the training progress bar (progress=True)", total=epochs,
                           desc="train", unit="epoch")
    # mini-batch boundaries; batch norm cannot train on one sample: a last batch of one joins
    # the one before it (train_briefly refused N == 1 and batch_size == 1 for such models)
    ends = list(range(batch_size, n, batch_size)) + [n]
    if len(ends) > 1 and n - ends[-2] == 1 and _has_batch_norm(model):
        del ends[-2]
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total, seen = 0.0, 0
            for start, end in zip([0, *ends[:-1]], ends, strict=True):
                idx = order[start:end]
                xb, yb = x[idx].to(device), y[idx].to(device)
                logits = _logits(model(xb), "train_briefly")
                if not checked:
                    if top >= logits.shape[1]:
                        raise InvalidInputError(
                            f"train_briefly: y holds class label {top}, but the model gives "
                            f"{logits.shape[1]} logits (labels must be in 0..{logits.shape[1] - 1})"
                        )
                    checked = True
                loss = F.cross_entropy(logits, yb)
                lv = loss.detach()
                if not bool(torch.isfinite(lv)):  # before the step that would spread it
                    raise InvalidInputError(
                        f"train_briefly: the loss became {float(lv)} (epoch {epoch + 1}, "
                        f"samples {start}..{end - 1} of the shuffled order): training "
                        f"diverged (lr={lr} too large?) or the model gives non-finite "
                        "logits; the weights are those before this step")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            if bar is not None:
                bar.set_postfix(loss=f"{total / seen:.4f}")
                bar.update(1)
            log.debug("epoch loss %.4f", total / seen)
    finally:
        if bar is not None:
            bar.close()
        model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of ``x`` ``[N, ...]`` whose arg-max logit equals ``y`` ``[N]`` (current mode).

    The model returns logits ``[B, num_classes]``: a tensor, or an output with a ``logits``
    tensor attribute (a Hugging Face classifier's ``ModelOutput``)."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InvalidInputTypeError("accuracy: x and y must be tensors ([N, ...] and [N])")
    if len(x) != len(y) or len(x) == 0:
        # the accuracy of no samples is undefined (it returned 0.0)
        raise InvalidInputError(
            f"accuracy: x and y need the same, non-zero length; got {len(x)}, {len(y)}")
    _check_not_meta(model, x, y, "accuracy")
    # the model's device (a model without parameters or buffers runs where x is)
    device = next(iter([*model.parameters(), *model.buffers()]), x).device
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = _logits(model(x[start : start + batch_size].to(device)), "accuracy")
        correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
    return correct / len(x)


def default_cache_dir() -> Path:
    """The weights cache folder.

    ``$FSINFO_FAST_CACHE``, else ``$XDG_CACHE_HOME/fsinfo_fast``, else ``~/.cache/fsinfo_fast``.
    """
    env = os.environ.get("FSINFO_FAST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fsinfo_fast"


#: Threads the demo model trains with, whatever the caller's setting: the weights depend on the
#: thread count (the order of floating-point reductions), and the cache key does not hold it.
DEMO_THREADS = 1


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the caller's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _demo_data(data: str, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .data import DATASETS, digits, natural_images

    if data == "digits":
        x_tr, y_tr = digits(size=size, split="train")
        x_te, y_te = digits(size=size, split="test")
    elif data == "natural":
        x, y = natural_images(size=size, n=900, seed=seed)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))
        cut = int(0.8 * len(x))
        x_tr, y_tr, x_te, y_te = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    else:
        raise InvalidInputError(
            f"unknown data set {data!r}; bundled data sets: {', '.join(sorted(DATASETS))}"
        )
    return x_tr, y_tr, x_te, y_te


def demo_model(
    name: str = "vgg5",
    data: str = "digits",
    size: int = 32,
    seed: int = 0,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 64,
    cache: bool | str | os.PathLike = False,
    progress: bool = False,
) -> tuple[nn.Module, Tensor, Tensor, float]:
    """A zoo model briefly trained on a bundled data set, with its held-out test data.

    The model is initialised under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``
    (the caller's global RNG state is untouched) and trained with :func:`train_briefly` on
    :data:`DEMO_THREADS` (1) CPU thread whatever ``torch.get_num_threads()`` says (restored
    after), so the weights, and the demo's numbers, do not depend on the caller's thread count.
    VGG5 on digits at 32x32 (2 epochs) takes about 12 s on that one thread and reaches about 99%
    test accuracy.

    Args:
        name: zoo model (``"vgg5"``, ``"vgg9"``, ``"resnet18"``).
        data: ``"digits"`` (10 classes, fixed 80/20 split) or ``"natural"`` (900 crops of the 9
            bundled photographs, label = photograph, 80/20 split by ``seed``).
        size: image side in pixels (RGB inputs ``[B, 3, size, size]`` in ``[0, 1]``).
        seed: seed of the initialisation, shuffling and (for ``"natural"``) the crops.
        epochs: training epochs.
        lr: Adam learning rate.
        batch_size: mini-batch size.
        cache: ``False`` (default) trains every time; ``True`` caches the trained weights in
            :func:`default_cache_dir`, a path caches them there. The cache key covers every argument
            above plus the package and torch versions; files are written atomically and a file
            that fails to load is ignored (the model is retrained).
        progress: show a progress bar while training.

    Returns:
        ``(model, x_test, y_test, test_accuracy)``: the model in eval mode (on CPU), test inputs
        float32 ``[N, 3, size, size]``, labels int64 ``[N]`` and the accuracy in ``[0, 1]``.
    """
    from .models import get_model

    seed = _seed(seed, "demo_model")
    if cache is not None and not isinstance(cache, (bool, str, os.PathLike)):
        raise InvalidInputTypeError(
            f"demo_model: cache must be True, False, None or a folder path, got {cache!r} "
            f"({type(cache).__name__})")
    x_tr, y_tr, x_te, y_te = _demo_data(data, size, seed)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = get_model(name, num_classes=num_classes, in_channels=3, input_size=size)

    path = None
    if cache is not False and cache is not None:
        folder = default_cache_dir() if cache is True else Path(cache)
        key = repr((name, data, size, seed, epochs, lr, batch_size, __version__,
                    torch.__version__.split("+")[0], f"threads={DEMO_THREADS}"))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = folder / f"demo-{name}-{data}-{size}-s{seed}-{digest}.pt"
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
                model.eval()
                with fixed_threads(DEMO_THREADS):
                    return model, x_te, y_te, accuracy(model, x_te, y_te)
            except Exception as err:  # corrupt or incompatible file: retrain and overwrite
                log.warning("ignoring unreadable cached weights %s (%s)", path, err)

    with fixed_threads(DEMO_THREADS):
        train_briefly(model, x_tr, y_tr, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      progress=progress)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
        except OSError as err:
            log.warning("could not cache trained weights at %s (%s)", path, err)
    with fixed_threads(DEMO_THREADS):
        return model, x_te, y_te, accuracy(model, x_te, y_te)
