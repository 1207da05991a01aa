"""Shared helpers of the Triton kernel modules (imports triton; import lazily).

Triton 3.6 compatibility: in its interpreter (``TRITON_INTERPRET=1``) with numpy >= 2.4 a loop
``range(n)`` whose bound is a runtime kernel argument fails ("only 0-dimensional arrays can be
converted to Python scalars"); so every in-kernel loop bound here is a ``tl.constexpr``.
No kernel uses ``@triton.autotune`` (it fails in the interpreter and would re-run the
accumulating kernels).
"""

from __future__ import annotations

import triton  # noqa: F401

from ..errors import InvalidInputError
from . import interpreting


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def check_device(*tensors) -> None:
    """Kernels take CUDA tensors, or CPU tensors under the interpreter."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise InvalidInputError(
            f"triton ops need all tensors on one device, got {sorted(map(str, devices))}"
        )
    dev = next(iter(devices))
    if dev.type != "cuda" and not interpreting():
        raise InvalidInputError(
            f"triton ops need CUDA tensors (got {dev.type}); CPU tensors run only in the "
            "Triton interpreter (TRITON_INTERPRET=1)"
        )


def block_k(k: int) -> int:
    """Tangents per program of the broadcast kernels (the per-sample state is read once per
    BLOCK_K tangents)."""
    return min(next_pow2(k), 16 if interpreting() else 8)


def block_f(f: int, bk: int) -> int:
    """Features per program: large under the interpreter (~1 ms per program instance)."""
    cap = 4096 if interpreting() else max(128, 4096 // bk)
    return min(next_pow2(f), cap)
