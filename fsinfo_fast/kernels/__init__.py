"""Triton kernels of the compiled engine (the ``"triton"`` implementation of the op contract).

:class:`TritonOps` implements :mod:`fsinfo_fast.engine.ops` (same signatures, shapes, dtypes and
results as :class:`~fsinfo_fast.engine.ops.TorchOps`) with fused Triton kernels:

=================== ==========================================================================
op                  kernel
=================== ==========================================================================
``gate_pack``       one kernel: 8 gate bytes -> 1 bit-packed byte
``gate_apply``      one kernel: bit-unpack once per tile, multiply a ``[BLOCK_K, BLOCK_F]``
                    tile of tangents (the gate is read once per ``BLOCK_K`` tangents)
``scale_apply``     one kernel: load the (float16 / bfloat16 / ...) scale once per tile, upcast
                    in registers, multiply ``BLOCK_K`` tangents
``maxpool_gather``  one kernel: load the argmax indices once per tile, gather ``BLOCK_K``
                    tangents
``maxpool_scatter`` zero-fill + one kernel of atomic adds (windows may overlap); float32 and
                    float64 only (other dtypes go to TorchOps); the summation order of >= 3
                    overlapping contributions is not fixed on a GPU (last-ulp differences)
``sq_accumulate``   one kernel: one read of ``G``; each program owns one (sample, group, d-block),
                    so the in-place float64 group sums need no atomics and add probes in the
                    same order as TorchOps; per-block partial squared norms are then summed by
                    a tiny torch reduction ``[B, K, n_blocks] -> [B, K]``. No autotune.
``lanczos_step``    one kernel per iteration, one program per row: dot, three-term update,
                    two classical Gram-Schmidt passes against the basis, norm (float64), with
                    block barriers between the passes (4 sweeps over the row); other
                    floating inputs are computed in float64 and cast back
``tridiag_eigh``    delegates to TorchOps (``torch.linalg.eigh`` on the small ``k x k``
                    tridiagonal matrices); no Triton kernel
``draw_probes``     one kernel hashes every entry (the ``B * count`` per-probe keys come from
                    the torch code of :mod:`fsinfo_fast.estimators.probes`): the same numbers
                    as ``draw_probes`` (Rademacher bit-identical, Gaussian to a few ulps);
                    float16 / bfloat16 results are drawn in float64 and cast by torch (one
                    rounding, as ``draw_probes`` does)
=================== ==========================================================================

Importing this package imports neither triton nor CUDA: the kernels live in submodules that are
imported on the first call. Kernels take CUDA tensors on a GPU, or CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before the first call).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["TritonOps", "availability", "interpreting"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def availability(name: str = "triton") -> tuple[bool, str]:
    """``(available, reason)`` of the Triton ops; initialises CUDA only to look for a GPU.

    Available iff triton imports and either a CUDA device is present or ``TRITON_INTERPRET=1`` is
    set (then the kernels run on CPU tensors in Triton's interpreter, slowly).
    """
    try:
        import triton  # noqa: F401  (imported here only, never at package import)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "?")
    if interpreting():
        return True, f"triton {version} in its CPU interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"triton {version} on CUDA ({torch.cuda.device_count()} device(s))"
    return False, (
        f"triton {version} imports, but no CUDA GPU is available (torch.cuda.is_available() is "
        "False) and TRITON_INTERPRET=1 is not set for its CPU interpreter"
    )


_SUBMODULES = {
    "elementwise": "fsinfo_fast.kernels.elementwise",
    "maxpool": "fsinfo_fast.kernels.maxpool",
    "reductions": "fsinfo_fast.kernels.reductions",
    "lanczos": "fsinfo_fast.kernels.lanczos",
    "probes": "fsinfo_fast.kernels.probes",
}


def _mod(name: str) -> Any:
    return importlib.import_module(_SUBMODULES[name])


class TritonOps:
    """The op contract of :mod:`fsinfo_fast.engine.ops` in fused Triton kernels.

    Stateless; every method imports its kernel module on first use. See the module docstring for
    what each op fuses.
    """

    name = "triton"

    @staticmethod
    def gate_pack(mask: Tensor) -> Tensor:
        return _mod("elementwise").gate_pack(mask)

    @staticmethod
    def gate_unpack(packed: Tensor, f: int) -> Tensor:
        from ..engine.ops import TorchOps

        return TorchOps.gate_unpack(packed, f)

    @staticmethod
    def gate_apply(V: Tensor, packed: Tensor) -> Tensor:
        return _mod("elementwise").gate_apply(V, packed)

    @staticmethod
    def scale_apply(V: Tensor, s: Tensor) -> Tensor:
        return _mod("elementwise").scale_apply(V, s)

    @staticmethod
    def maxpool_gather(V: Tensor, idx: Tensor) -> Tensor:
        return _mod("maxpool").maxpool_gather(V, idx)

    @staticmethod
    def maxpool_scatter(U: Tensor, idx: Tensor, lin: int) -> Tensor:
        return _mod("maxpool").maxpool_scatter(U, idx, lin)

    @staticmethod
    def sq_accumulate(G: Tensor, group_sums: Tensor, j0: int) -> Tensor:
        return _mod("reductions").sq_accumulate(G, group_sums, j0)

    @staticmethod
    def lanczos_step(
        w: Tensor, q: Tensor, q_prev: Tensor, b_prev: Tensor, basis: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _mod("lanczos").lanczos_step(w, q, q_prev, b_prev, basis)

    @staticmethod
    def tridiag_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        # Delegated: k x k tridiagonal problems (k ~ 30) are tiny; torch.linalg.eigh is exact
        # and batched, and a Triton QL iteration would gain nothing measurable.
        from ..engine.ops import TorchOps

        return TorchOps.tridiag_eigh(alpha, beta)

    @staticmethod
    def draw_probes(
        n: int,
        *,
        seed: int | torch.Generator,
        sample_ids: Tensor,
        start: int = 0,
        count: int,
        kind: str = "gaussian",
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        stream: int = 0,
    ) -> Tensor:
        """:func:`fsinfo_fast.estimators.probes.draw_probes` with the entries hashed in one Triton
        kernel: same signature; Rademacher bit-identical, Gaussian within a few ulps."""
        return _mod("probes").draw_probes(
            n,
            seed=seed,
            sample_ids=sample_ids,
            start=start,
            count=count,
            kind=kind,
            dtype=dtype,
            device=device,
            stream=stream,
        )
