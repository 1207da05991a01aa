"""Full IEEE float32 while a metric runs: TF32 off on CUDA, autocast off on every device (and
inference mode off, so a call inside ``torch.inference_mode()`` can take its Jacobian products).

PyTorch runs float32 cuDNN convolutions in TF32 by default (``torch.backends.cudnn.conv.
fp32_precision == "tf32"``), and matmuls too after ``torch.set_float32_matmul_precision("high")``:
a 10-bit mantissa, relative errors near 1e-3. Measured on an H200 (torch 2.11): a ResNet-18 cut
at paper split 7 gave outputs that differ by 1.6e-4 (relative) between a batch and one sample
alone, which the sample-independence check rightly rejects, and ResNet-50 products off the
torch.func ones by 1.0e-3. The metrics are properties of the encoder as a mathematical function
and their intervals allow for float32 rounding, not for TF32's, so :func:`ieee_fp32` turns TF32
off for their computations and restores the user's settings exactly afterwards (the setting is
process-global: another thread's CUDA work during a metric call runs without TF32 too).

Autocast (``torch.autocast``, thread-local) is turned off too: inside a user's
``torch.autocast("cpu" | "cuda", dtype=torch.bfloat16)`` block the encoder's convolutions and
matmuls would run in half precision, whose products err by far more than the intervals count
(see :func:`fsinfo_fast.encoder.working_dtype`), and the captured engine's float32 primal would
no longer match the encoder's output (measured on VGG5 under CPU autocast: the engine refused the
encoder, the torch.func route raised a dtype error).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["ieee_fp32", "ieee_fp32_method", "no_tf32"]

F = TypeVar("F", bound=Callable[..., Any])

# (object, attribute) of every TF32 switch the metric's work can reach, PyTorch >= 2.9 API
_SWITCHES = (
    ("cudnn.conv", "fp32_precision"),
    ("cudnn.rnn", "fp32_precision"),
    ("cuda.matmul", "fp32_precision"),
)


def _resolve(path: str) -> Any:
    obj: Any = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


@contextlib.contextmanager
def ieee_fp32(device: torch.device | str | None) -> Iterator[None]:
    """Autocast off for ``device``'s type, TF32 off (:func:`no_tf32`) when it is CUDA, and
    inference mode off (autograd, which the products need, refuses to record under
    ``torch.inference_mode()``; measured: the engine raised "element 0 of tensors does not
    require grad" there)."""
    kind = None if device is None else torch.device(device).type
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        if kind is not None and torch.amp.is_autocast_available(kind):
            stack.enter_context(torch.autocast(kind, enabled=False))
        stack.enter_context(no_tf32(device))
        yield


@contextlib.contextmanager
def no_tf32(device: torch.device | str | None) -> Iterator[None]:
    """TF32 off (``fp32_precision = "ieee"``) for cuDNN convolutions and RNNs and for cuBLAS
    matmuls inside the block, when ``device`` is a CUDA device; a no-op otherwise.

    Only the ``fp32_precision`` attributes are read and written (reading the legacy
    ``allow_tf32`` flags can raise once the two APIs were mixed), and the values found on entry
    are written back on exit, so the legacy flags read as before afterwards. Nested blocks are
    fine. On a PyTorch without the ``fp32_precision`` API the legacy flags are used instead.
    """
    if not _is_cuda(device):
        yield
        return
    objs = [(_resolve(path), attr) for path, attr in _SWITCHES]
    if not all(hasattr(obj, attr) for obj, attr in objs):  # PyTorch < 2.9
        mm = torch.backends.cuda.matmul
        saved_mm = mm.allow_tf32
        mm.allow_tf32 = False
        try:
            with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                            allow_tf32=False):
                yield
        finally:
            mm.allow_tf32 = saved_mm
        return
    saved = [getattr(obj, attr) for obj, attr in objs]
    try:
        for obj, attr in objs:
            setattr(obj, attr, "ieee")
        yield
    finally:
        for (obj, attr), value in zip(objs, saved, strict=True):
            setattr(obj, attr, value)


def ieee_fp32_method(method: F) -> F:
    """Run a :class:`~fsinfo_fast.Linearization` method under :func:`ieee_fp32` on the device
    of the batch it linearises (``self.x``)."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with ieee_fp32(self.x.device):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
