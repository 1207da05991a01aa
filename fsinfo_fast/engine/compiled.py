"""The C++ and CUDA implementations of the fused-op contract (:mod:`fsinfo_fast.engine.ops`).

The ops live in the optional extension ``fsinfo_fast._C`` (sources in ``csrc/``), registered as
torch library ops ``torch.ops.fsinfo_fast.*``: CPU kernels always, CUDA kernels when the
extension was built with CUDA. The extension is loaded lazily, on the first
:func:`availability` call or ops object, never at package import, and loading it never
initialises CUDA. Fake (meta) kernels are registered here on load, so the ops work under
``torch.compile`` and ``torch.library.opcheck``.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

import torch
from torch import Tensor

from ..errors import BackendUnavailableError, InvalidInputError

__all__ = ["OP_NAMES", "CppOps", "CudaOps", "availability", "build_info", "load_extension"]

#: The ops registered in the ``fsinfo_fast`` torch library namespace.
OP_NAMES = (
    "gate_pack",
    "gate_apply",
    "scale_apply",
    "maxpool_gather",
    "maxpool_scatter",
    "sq_accumulate",
    "lanczos_step",
    "tridiag_eigh",
    "probe_uniforms",
    "probe_signs",
)

_EXT_NAME = "fsinfo_fast._C"
_lock = threading.Lock()
_ext: ModuleType | None = None
_ext_error: str | None = None


def load_extension() -> ModuleType | None:
    """Import ``fsinfo_fast._C`` once (registering the fake kernels); ``None`` if it cannot be."""
    global _ext, _ext_error
    with _lock:
        if _ext is not None or _ext_error is not None:
            return _ext
        try:
            mod = importlib.import_module(_EXT_NAME)
        except ModuleNotFoundError as exc:
            if exc.name == _EXT_NAME:
                _ext_error = (
                    "the C++ extension fsinfo_fast._C is not built (install with a C++ compiler: "
                    "`pip install --no-build-isolation -e .` without FSINFO_FAST_NO_EXT=1; "
                    "see csrc/README.md)"
                )
            else:
                _ext_error = f"fsinfo_fast._C failed to import: {exc}"
            return None
        except (ImportError, OSError) as exc:  # ABI / symbol mismatch with this torch
            _ext_error = f"fsinfo_fast._C failed to import (rebuild it for this torch): {exc}"
            return None
        _register_fakes()
        _ext = mod
        return _ext


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fsinfo_fast::{op}", key))
    except Exception:  # pragma: no cover - private API drift
        return False


def build_info() -> dict[str, object]:
    """What is built: ``{"built": bool, "cuda_built": bool, "error": str | None}``."""
    ext = load_extension()
    return {
        "built": ext is not None,
        "cuda_built": bool(ext is not None and getattr(ext, "WITH_CUDA", 0)),
        "error": _ext_error,
    }


def availability(name: str) -> tuple[bool, str]:
    """``(available, reason)`` of the ``"cpp"`` or ``"cuda"`` ops (never initialises CUDA)."""
    if name not in ("cpp", "cuda"):
        raise InvalidInputError(f"compiled ops are 'cpp' or 'cuda', got {name!r}")
    ext = load_extension()
    if ext is None:
        return False, str(_ext_error)
    if name == "cpp":
        if not _has_kernel("gate_apply", "CPU"):
            return False, "fsinfo_fast._C is loaded but registered no CPU kernels"
        return True, "C++ CPU ops (fsinfo_fast._C)"
    if not getattr(ext, "WITH_CUDA", 0) or not _has_kernel("gate_apply", "CUDA"):
        return False, (
            "fsinfo_fast._C was built without CUDA (rebuild on a CUDA machine with "
            "`FSINFO_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`)"
        )
    if not torch.cuda.is_available():
        return False, "fsinfo_fast._C has CUDA kernels but no CUDA GPU is available"
    return True, "CUDA ops (fsinfo_fast._C)"


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, for torch.compile / FakeTensor / opcheck
# --------------------------------------------------------------------------------------------

_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    reg = torch.library.register_fake

    @reg("fsinfo_fast::gate_pack")
    def _gate_pack(mask: Tensor) -> Tensor:
        torch._check(mask.dim() == 2, lambda: "gate_pack expects mask [B, F]")
        return mask.new_empty((mask.shape[0], (mask.shape[1] + 7) // 8), dtype=torch.uint8)

    @reg("fsinfo_fast::gate_apply")
    def _gate_apply(V: Tensor, packed: Tensor) -> Tensor:
        torch._check(V.dim() == 3, lambda: "gate_apply expects V [B, K, F]")
        return torch.empty_like(V, memory_format=torch.contiguous_format)

    @reg("fsinfo_fast::scale_apply")
    def _scale_apply(V: Tensor, s: Tensor) -> Tensor:
        torch._check(V.dim() == 3, lambda: "scale_apply expects V [B, K, F]")
        return torch.empty_like(V, memory_format=torch.contiguous_format)

    @reg("fsinfo_fast::maxpool_gather")
    def _maxpool_gather(V: Tensor, idx: Tensor) -> Tensor:
        torch._check(V.dim() == 4 and idx.dim() == 3, lambda: "maxpool_gather shapes")
        b, k, c, _ = V.shape
        return V.new_empty((b, k, c, idx.shape[2]))

    @reg("fsinfo_fast::maxpool_scatter")
    def _maxpool_scatter(U: Tensor, idx: Tensor, lin: int) -> Tensor:
        torch._check(U.dim() == 4 and idx.dim() == 3, lambda: "maxpool_scatter shapes")
        b, k, c, _ = U.shape
        return U.new_empty((b, k, c, lin))

    @reg("fsinfo_fast::sq_accumulate")
    def _sq_accumulate(G: Tensor, group_sums: Tensor, j0: int) -> Tensor:
        torch._check(G.dim() == 3, lambda: "sq_accumulate expects G [B, K, d]")
        return G.new_empty((G.shape[0], G.shape[1]), dtype=torch.float64)

    @reg("fsinfo_fast::lanczos_step")
    def _lanczos_step(
        w: Tensor, q: Tensor, q_prev: Tensor, b_prev: Tensor, basis: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        torch._check(w.dim() == 2, lambda: "lanczos_step expects w [N, n]")
        n = w.shape[0]
        return w.new_empty((n,)), w.new_empty(w.shape), w.new_empty((n,))

    @reg("fsinfo_fast::tridiag_eigh")
    def _tridiag_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        torch._check(alpha.dim() >= 1, lambda: "tridiag_eigh expects alpha [..., k]")
        return alpha.new_empty(alpha.shape), alpha.new_empty(alpha.shape)

    # CPU only: the integer part of fsinfo_fast.estimators.probes.draw_probes
    @reg("fsinfo_fast::probe_uniforms")
    def _probe_uniforms(keys: Tensor, pairs: int) -> Tensor:
        torch._check(keys.dim() == 1, lambda: "probe_uniforms expects keys [R]")
        return keys.new_empty((2, keys.shape[0], pairs), dtype=torch.float64)

    @reg("fsinfo_fast::probe_signs")
    def _probe_signs(keys: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        torch._check(keys.dim() == 1, lambda: "probe_signs expects keys [R]")
        return keys.new_empty((keys.shape[0], n), dtype=dtype)

    _register_autograd()
    _fakes_registered = True


def _register_autograd() -> None:
    """Backward formulas of the linear ops (each is the other's adjoint, or itself)."""
    ops = torch.ops.fsinfo_fast
    reg = torch.library.register_autograd

    def _save_second(ctx, inputs, output):
        ctx.second = inputs[1]

    def _gate_bwd(ctx, grad):
        return ops.gate_apply(grad, ctx.second), None

    def _scale_setup(ctx, inputs, output):
        V, s = inputs
        ctx.save_for_backward(V, s)
        ctx.s_dtype = s.dtype

    def _scale_bwd(ctx, grad):
        V, s = ctx.saved_tensors
        gV = ops.scale_apply(grad, s) if ctx.needs_input_grad[0] else None
        gs = (grad * V).sum(dim=1).to(ctx.s_dtype) if ctx.needs_input_grad[1] else None
        return gV, gs

    def _gather_setup(ctx, inputs, output):
        ctx.idx = inputs[1]
        ctx.lin = inputs[0].shape[-1]

    def _gather_bwd(ctx, grad):
        return ops.maxpool_scatter(grad, ctx.idx, ctx.lin), None

    def _scatter_bwd(ctx, grad):
        return ops.maxpool_gather(grad, ctx.second), None, None

    reg("fsinfo_fast::gate_apply", _gate_bwd, setup_context=_save_second)
    reg("fsinfo_fast::scale_apply", _scale_bwd, setup_context=_scale_setup)
    reg("fsinfo_fast::maxpool_gather", _gather_bwd, setup_context=_gather_setup)
    reg("fsinfo_fast::maxpool_scatter", _scatter_bwd, setup_context=_save_second)


# --------------------------------------------------------------------------------------------
# Ops objects (the ops.py contract)
# --------------------------------------------------------------------------------------------


class CppOps:
    """The fused ops through ``torch.ops.fsinfo_fast`` (C++ kernels on CPU tensors)."""

    name = "cpp"
    device_type = "cpu"

    def __init__(self) -> None:
        ok, why = availability(self.name)
        if not ok:
            raise BackendUnavailableError(f"{self.name} ops are not available: {why}")
        self._ops = torch.ops.fsinfo_fast

    def gate_pack(self, mask: Tensor) -> Tensor:
        return self._ops.gate_pack(mask)

    def gate_unpack(self, packed: Tensor, f: int) -> Tensor:
        from .ops import TorchOps

        return TorchOps.gate_unpack(packed, f)

    def gate_apply(self, V: Tensor, packed: Tensor) -> Tensor:
        return self._ops.gate_apply(V, packed)

    def scale_apply(self, V: Tensor, s: Tensor) -> Tensor:
        return self._ops.scale_apply(V, s)

    def maxpool_gather(self, V: Tensor, idx: Tensor) -> Tensor:
        return self._ops.maxpool_gather(V, idx)

    def maxpool_scatter(self, U: Tensor, idx: Tensor, lin: int) -> Tensor:
        return self._ops.maxpool_scatter(U, idx, int(lin))

    def sq_accumulate(self, G: Tensor, group_sums: Tensor, j0: int) -> Tensor:
        return self._ops.sq_accumulate(G, group_sums, int(j0))

    def lanczos_step(
        self, w: Tensor, q: Tensor, q_prev: Tensor, b_prev: Tensor, basis: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, w_new, beta = self._ops.lanczos_step(w, q, q_prev, b_prev, basis)
        return a, w_new, beta

    def tridiag_eigh(self, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        theta, tau = self._ops.tridiag_eigh(alpha, beta)
        return theta, tau


class CudaOps(CppOps):
    """The same ops on CUDA tensors (the dispatcher picks the CUDA kernels by device)."""

    name = "cuda"
    device_type = "cuda"
