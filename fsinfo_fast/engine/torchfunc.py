"""Batched Jacobian products with ``torch.func`` (always available; the fallback backend).

For a batch of ``B`` samples and ``K`` probes per sample, the ``K`` probes are vmapped over the
whole batch, so the linear layers see one tangent batch of ``B*K`` (one large GEMM/convolution),
while the primal is computed once (unbatched under vmap). The VJP closure (``torch.func.vjp``) is
built once per batch and reused by every later call, so estimators that need many rounds of
cotangents (adaptive stopping, Lanczos) never recompute the forward pass for them.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

from .._progress import tick
from .._sysinfo import available_memory_bytes
from ..encoder import PreparedEncoder, func_error, func_errors, quiet_vmap_loop
from ..errors import InvalidInputError

__all__ = ["TorchFuncProducts", "default_memory_budget"]

log = logging.getLogger(__name__)

#: Fraction of free memory the probes may use by default.
DEFAULT_MEMORY_FRACTION = 0.25


def default_memory_budget(device: torch.device) -> int:
    """Bytes the probe chunks may use: a fraction of the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_memory_bytes()  # /proc/meminfo; psutil only off Linux
    return int(DEFAULT_MEMORY_FRACTION * free)


def retry_in_grad_mode(owner, run, *pullbacks: str):
    """``run()``; where a pullback ``owner`` built under no_grad fails because a kernel kept no
    backward state there (the CPU LSTM's mkldnn_rnn_layer drops its workspace: 'Expected a
    proper Tensor but got None'), ``owner._grad_mode`` is set, its ``pullbacks`` attributes are
    dropped (built again in grad mode, as autograd builds them) and ``run`` is retried once.
    Not grad mode from the start: there a tensor computed from the parameters requires grad,
    which some kernels refuse (the CPU flash attention's float mask in transformers' Swin)."""
    try:
        return run()
    except RuntimeError as err:
        if owner._grad_mode or "expected a proper tensor but got none" not in str(err).lower():
            raise
        owner._grad_mode = True
        for name in pullbacks:
            setattr(owner, name, None)
        return run()


def _no_batching_rule(msg: str) -> bool:
    """Whether a vmap failure is an op without a batching rule (a loop over the probes gives
    the same values), not a random draw or data-dependent control flow (which it would not)."""
    low = msg.lower()
    return "vmap: we do not yet support" in low or "batching rule not implemented" in low


class TorchFuncProducts:
    """``jvp``/``vjp`` of a prepared encoder over ``K`` probes per sample, with ``torch.func``.

    Args:
        enc: the prepared encoder (its batch ``x`` is the linearisation point).
        memory_budget: bytes one chunk of probes may use (default: a quarter of free memory).
        chunk_size: probes per vmapped chunk (overrides the budget).

    Attributes:
        jvp_passes, vjp_passes: products computed so far, per sample.
        forward_mode: False once forward-mode AD was found unsupported (then ``jvp`` goes through
            the transpose of the VJP, i.e. double backward).
    """

    backend = "torch"

    def __init__(
        self, enc: PreparedEncoder, *, memory_budget: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.enc = enc
        self.x = enc.x
        self.batch, self.d, self.m = enc.batch, enc.d, enc.m
        self.dtype, self.device = enc.x.dtype, enc.x.device
        if chunk_size is not None and chunk_size < 1:
            raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}")
        self._options = {"memory_budget": memory_budget, "chunk_size": chunk_size}
        budget = memory_budget if memory_budget is not None else default_memory_budget(self.device)
        per_probe = self.batch * 3 * enc.saved_bytes
        self.chunk_size = chunk_size or max(1, int(budget // max(per_probe, 1)))
        self.jvp_passes = 0
        self.vjp_passes = 0
        self.forward_mode = True
        self._jvp_route = 0
        self._pullback = None
        self._primal: Tensor | None = None  # the output the pullback's forward computed
        self._pullback2 = None  # the double-backward route's (see _double_pullback)
        self._loop_probes = False  # an op has no vmap batching rule: one probe at a time
        self._grad_mode = False  # pullbacks in grad mode (retry_in_grad_mode)
        #: what the metrics record in ``result.info`` (e.g. why ``auto`` fell back to torch)
        self.info: dict = {}

    def select(self, idx: Tensor) -> TorchFuncProducts:
        """The products of the samples ``idx`` (``[n]`` int64) of this batch, with the same
        options (its pullback is built on first use)."""
        sub = TorchFuncProducts(self.enc.select(idx), **self._options)
        sub.forward_mode, sub._jvp_route = self.forward_mode, self._jvp_route
        sub._loop_probes, sub.info = self._loop_probes, dict(self.info)
        sub._grad_mode = self._grad_mode
        return sub

    # -- products -----------------------------------------------------------------------------
    def _vmap_probes(self, f, T: Tensor, loop_ok: bool = False) -> Tensor:
        """Apply ``f: [B, n] -> [B, n']`` to every probe of ``T: [B, K, n]`` in chunks.

        Out of memory, the chunk is halved and the call retried (never a more memory-hungry
        route); if one probe does not fit, the error names the sizes. ``loop_ok``: where an op
        has no vmap batching rule, ``f`` runs one probe at a time instead (the same values,
        slower; recorded in ``info["vmap_fallback"]`` and kept for later calls)."""
        k = T.shape[1]
        while True:
            cs = min(self.chunk_size, k)
            try:
                if loop_ok and self._loop_probes:
                    return torch.stack([f(T[:, j]) for j in range(k)], dim=1)
                with quiet_vmap_loop():
                    return vmap(f, in_dims=1, out_dims=1, chunk_size=cs)(T)
            except torch.OutOfMemoryError as err:
                if cs == 1:
                    raise torch.OutOfMemoryError(
                        f"torch.func products: one probe of {self.batch} sample(s) does not fit "
                        f"in memory (d = {self.d}, m = {self.m}, {self.dtype}); use a smaller "
                        "batch") from err
                self.chunk_size = max(1, cs // 2)
                log.debug("out of memory at %d probes per chunk; retrying with %d", cs,
                          self.chunk_size)
            except RuntimeError as err:
                msg = str(err)
                if not loop_ok or self._loop_probes or not _no_batching_rule(msg):
                    raise
                self._loop_probes = True
                self.info["vmap_fallback"] = (
                    f"an op has no vmap batching rule ({msg.splitlines()[0][:120]}): the "
                    "torch.func products run one probe at a time (a Python loop; the same "
                    "values, slower)")
                log.info("torch.func products: %s", self.info["vmap_fallback"])

    def _check(self, T: Tensor, n: int, name: str) -> Tensor:
        if T.ndim != 3 or T.shape[0] != self.batch or T.shape[2] != n:
            raise InvalidInputError(
                f"{name} expects [B={self.batch}, K, {n}], got {tuple(T.shape)}"
            )
        return T.to(self.dtype)

    @torch.no_grad()
    def vjp(self, U: Tensor) -> Tensor:
        """``J_b^T u`` for every sample ``b`` and probe: ``[B, K, m] -> [B, K, d]``."""
        U = self._check(U, self.m, "vjp")
        with func_errors():
            def run() -> Tensor:
                self._build_pullback()
                pull = self._pullback
                return self._vmap_probes(lambda u: pull(u)[0], U, loop_ok=True)

            out = retry_in_grad_mode(self, run, "_pullback", "_pullback2")
        self.vjp_passes += U.shape[1]
        tick(U.shape[0] * U.shape[1])
        return out

    def _build_pullback(self) -> None:
        if self._pullback is None:
            with torch.set_grad_enabled(self._grad_mode):
                self._primal, self._pullback = _vjp(self.enc.fn, self.x)

    @torch.no_grad()
    def primal(self) -> Tensor:
        """``[B, m]``: the encoder's output at the batch, from the forward that builds the
        VJPs' pullback (built here and kept for :meth:`vjp`: a caller that needs both the
        output and VJPs runs one forward)."""
        with func_errors():
            self._build_pullback()
        return self._primal

    @torch.no_grad()
    def jvp(self, V: Tensor) -> Tensor:
        """``J_b v`` for every sample ``b`` and probe: ``[B, K, d] -> [B, K, m]``.

        Forward-mode AD first; where an op lacks a forward-mode (or batching) rule, attention is
        retried with PyTorch's composite "math" kernel, and failing that ``jvp`` goes through the
        transpose of the VJP (double backward). The route taken is logged at debug level and
        kept for later calls.
        """
        V = self._check(V, self.d, "jvp")
        routes = [r for r in self._JVP_ROUTES if r >= self._jvp_route]
        first_error: BaseException | None = None
        for i, route in enumerate(routes):
            try:
                with self._attention_kernel(route):
                    if route < 2:
                        out = self._vmap_probes(
                            lambda v: _jvp(self.enc.fn, (self.x,), (v,))[1], V)
                    else:
                        def run() -> Tensor:
                            pb2 = self._double_pullback()
                            return self._vmap_probes(lambda v: pb2(v)[0], V, loop_ok=True)

                        out = retry_in_grad_mode(self, run, "_pullback", "_pullback2")
            except torch.OutOfMemoryError:
                raise  # chunked smaller already; double backward would need more memory
            except (RuntimeError, NotImplementedError) as err:
                first_error = first_error or err
                if i == len(routes) - 1:  # say what in the encoder failed (the first route's
                    mapped = func_error(first_error) or func_error(err)  # error, else this)
                    raise (mapped or first_error) from err
                log.debug("jvp route %s failed (%s); trying %s", self._JVP_ROUTES[route],
                          err, self._JVP_ROUTES[routes[i + 1]])
                continue
            self._jvp_route = route
            self.forward_mode = route < 2
            self.jvp_passes += V.shape[1]
            tick(V.shape[0] * V.shape[1])
            return out
        raise AssertionError("unreachable")  # pragma: no cover

    #: jvp routes in the order tried.
    _JVP_ROUTES = {0: "forward-mode", 1: "forward-mode, math attention",
                   2: "double backward, math attention"}

    @staticmethod
    def _attention_kernel(route: int):
        if route == 0:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def _double_pullback(self):
        """``v -> (J v,)``: the VJP of the linear map ``u -> J^T u`` (double backward), built
        once per batch outside vmap, so that only backward ops run under it: an op without a
        batching rule for its forward (``nn.RReLU``'s ``rrelu_with_noise``) does not stop the
        JVPs where its VJPs run."""
        if self._pullback2 is None:
            def pull(u: Tensor) -> Tensor:
                _, pb = _vjp(self.enc.fn, self.x)
                return pb(u)[0]

            u0 = torch.zeros(self.batch, self.m, dtype=self.dtype, device=self.device)
            with torch.set_grad_enabled(self._grad_mode):
                _, self._pullback2 = _vjp(pull, u0)
        return self._pullback2
