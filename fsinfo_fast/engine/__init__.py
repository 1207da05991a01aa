"""How Jacobian products are computed (estimators never know).

Every backend returns an object implementing the :class:`~fsinfo_fast.estimators.Products`
protocol for one batch: ``jvp(V)`` maps ``[B, K, d]`` tangents to ``[B, K, m]``, ``vjp(U)`` maps
``[B, K, m]`` cotangents to ``[B, K, d]``.

Backends: ``"torch"`` (torch.func, always available), ``"engine"`` (the linearised engine of
:mod:`.products`: ATen capture :mod:`.capture`, per-op rules :mod:`.rules`, with the
plain-PyTorch ops, always available) and the same engine with the compiled ops (``"triton"``,
``"cpp"``, ``"cuda"``) where built (Triton and CUDA need a CUDA device; Triton runs interpreted
on a CPU under ``TRITON_INTERPRET=1``, slowly, and ``auto`` never picks it there). ``"auto"``
picks the fastest available one and, where the engine cannot serve an encoder, falls back to
``torch`` and records where and why in the products' ``info`` (copied to ``result.info``); a
backend requested explicitly (argument or ``FSINFO_FAST_BACKEND``) that cannot run or cannot
serve the encoder raises :class:`BackendUnavailableError` with the reasons.
"""

from __future__ import annotations

import logging
import os

import torch

from ..encoder import PreparedEncoder, natural_scale
from ..errors import BackendUnavailableError, InvalidInputError
from .torchfunc import TorchFuncProducts, default_memory_budget

__all__ = [
    "BACKENDS",
    "TorchFuncProducts",
    "available_backends",
    "default_memory_budget",
    "engine_report",
    "make_products",
    "resolve_backend",
]

log = logging.getLogger(__name__)

#: All backend names, fastest first (the order ``auto`` tries).
BACKENDS = ("cuda", "triton", "cpp", "engine", "torch")
ENV_VAR = "FSINFO_FAST_BACKEND"
#: Backends whose ops run on a GPU (``auto`` considers them only for CUDA tensors).
GPU_BACKENDS = ("cuda", "triton")


def _cuda_present() -> bool:
    # torch.cuda.is_available() asks the driver (NVML) and does not initialise CUDA
    return torch.cuda.is_available()


def _availability(name: str) -> tuple[bool, str]:
    if name == "torch":
        return True, "torch.func (always available)"
    if name == "engine":
        return True, "linearised engine with plain-PyTorch ops (always available)"
    from .ops import ops_availability

    ok, why = ops_availability(name)
    if not ok:
        return False, why
    if name in GPU_BACKENDS and not _cuda_present():
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return True, f"{why} (TRITON_INTERPRET=1: interpreted on the CPU, slow)"
        return False, f"{why}, but no CUDA device is present"
    return True, f"linearised engine with {name} ops: {why}"


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend (never initialises CUDA)."""
    return {name: _availability(name) for name in BACKENDS}


#: ``auto``'s order on a CPU. The engine with PyTorch's own elementwise ops is first: in
#: ``benchmarks/results/backends_cpu.json`` (2 threads, K = 64) it was 1.5x faster than the C++ ops
#: on VGG5 split 2 products and equal within 5% on ResNet-18 split 7, where the C++ ops won the
#: SLQ proxy by 9%; ``cpp`` stays available by name.
CPU_AUTO_ORDER = ("engine", "cpp", "torch")


def _auto_candidates(device: torch.device | None) -> list[str]:
    """Backends ``auto`` may pick on ``device``, fastest first.

    CUDA tensors: :data:`BACKENDS` order (``cuda``, ``triton``, ``cpp``, ``engine``, ``torch``).
    Otherwise :data:`CPU_AUTO_ORDER` (GPU backends never: Triton under ``TRITON_INTERPRET=1``
    is interpreted, slowly). :func:`make_products` may still prefer ``torch`` for an encoder the
    engine would run partly through per-node ``torch.func`` (see there).
    """
    on_gpu = device is not None and torch.device(device).type == "cuda"
    return list(BACKENDS) if on_gpu else list(CPU_AUTO_ORDER)


def resolve_backend(backend: str | None = "auto", device: torch.device | None = None) -> str:
    """Name of the backend to use for a request.

    ``"auto"`` (or ``None``) takes ``$FSINFO_FAST_BACKEND`` if set, else the fastest available
    on ``device`` (GPU backends only for CUDA tensors).

    Raises:
        InvalidInputError: an unknown name.
        BackendUnavailableError: an explicitly requested backend cannot run (with the reason).
    """
    source = ""  # (where the request came from, for the errors: the variable names itself)
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend == "auto":
            for name in _auto_candidates(device):
                ok, why = _availability(name)
                if ok:
                    return name
                log.debug("backend %s skipped: %s", name, why)
        source = (f" by the environment variable {ENV_VAR} (backend='auto' takes it; unset "
                  "it, or set it to an available backend)")
    if backend not in BACKENDS:
        name = f"{ENV_VAR}" if source else "backend"
        raise InvalidInputError(
            f"{name} must be 'auto' or one of {BACKENDS}, got {backend!r}"
            + (f" (backend='auto' takes ${ENV_VAR}; unset it or fix its value)" if source
               else "")
        )
    ok, why = _availability(backend)
    if ok and backend in GPU_BACKENDS and device is not None and torch.device(
            device).type != "cuda" and not (backend == "triton" and os.environ.get(
                "TRITON_INTERPRET") == "1"):
        ok, why = False, f"the data is on {torch.device(device).type}, not on a CUDA device"
    if not ok:
        others = ", ".join(n for n in BACKENDS if _availability(n)[0])
        raise BackendUnavailableError(
            f"backend {backend!r} was requested{source} but cannot run: {why}. Available: "
            f"{others}"
        )
    return backend


#: ``auto`` uses ``torch`` instead of the engine when more than this share of the encoder's nodes
#: with per-sample state (activations, norms, attention, products, ...) would run through
#: per-node ``torch.func``. Each such node costs about what ``torch.func`` costs for it plus the
#: engine's bookkeeping; the threshold is a judgement, not a measurement (no encoder of the test
#: matrix has a fallback node), and the decision is recorded in ``result.info`` either way.
AUTO_MAX_FALLBACK_SHARE = 0.5


#: relative tolerance of :func:`_cross_check` (products in the working dtype; looser where
#: the engine stores activation derivatives in a narrower ``scale_dtype``)
CROSS_CHECK_RTOL = 1e-3
CROSS_CHECK_RTOL_SCALED = 5e-2


def _cross_check(prods, enc: PreparedEncoder, kw: dict) -> None:
    """One seeded VJP and one seeded JVP of the engine per sample against ``torch.func``'s at
    this batch: the capture cannot see everything autograd honours (``y.data`` records no op at
    all: the engine differentiated through a stop-gradient), and a node's rule may fail only
    when it runs (an in-place ``copy_`` into a slice). Raises :class:`~.capture.CaptureError`
    with the reason where they disagree or the engine's product fails; where ``torch.func``
    itself cannot run the encoder, autograd's reverse mode is the reference (where neither
    runs, the engine serves with ``info["cross_check"]`` saying the check was skipped).

    The first batch's outcome is kept per captured graph (``Captured.checked``): a refusal
    stays for this shape. After a pass the comparison runs again on every later batch, because
    the values can decide it (a clamp on ``y.data`` that does nothing in the first batch and
    bites in this one; a zero-variance image, a fully masked attention row where the engine's
    derivative is NaN and autograd's is defined); such a refusal is this batch's only (the
    error's ``spot`` is True) and is not kept."""
    from .capture import CaptureError

    key = (getattr(prods, "backend", None), str(enc.x.dtype), str(kw.get("scale_dtype")))
    done = prods.captured.checked
    if done.get(key) is not None:
        raise done[key]
    first = key not in done
    counts = prods.jvp_passes, prods.vjp_passes
    try:
        _compare_with_torch_func(prods, enc, kw, reuse=not first)
        failure = None
    except CaptureError as err:
        failure = err
    prods.jvp_passes, prods.vjp_passes = counts  # the check's products are not the run's
    if failure is None and not first and getattr(enc, "adjoint", None) is not None:
        # the engine's JVP agreed with autograd's VJP through the adjoint identity: the check
        # the cached prepare deferred (forward against reverse mode) is answered for this route
        prods.adjoint_confirmed = True
    if first:
        done[key] = failure
    elif failure is not None:
        spot = CaptureError(f"{failure} (the first batch of this shape agreed: the difference "
                            "depends on this batch's values or on Python state the capture "
                            "cannot see)")
        spot.spot = True
        raise spot from failure
    if failure is not None:
        raise failure


def _engine_product(product, t: torch.Tensor, what: str) -> torch.Tensor:
    """``product(t)``, a failure raised as :class:`~.capture.CaptureError`."""
    from .capture import CaptureError

    try:
        return product(t)
    except Exception as err:
        raise CaptureError(f"the engine's {what} product failed: {type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]}") from err


def _autograd_vjp(enc: PreparedEncoder, u: torch.Tensor) -> torch.Tensor:
    """``J^T u`` (``u``: ``[B, 1, m]``) by plain autograd, one backward pass."""
    with torch.enable_grad():
        x = enc.x.detach().requires_grad_(True)
        y = enc.fn(x)
        (g,) = torch.autograd.grad(y, x, u[:, 0].to(y.dtype))
    return g.unsqueeze(1)


def _compare_with_torch_func(prods, enc: PreparedEncoder, kw: dict, reuse: bool = False
                             ) -> None:
    """``reuse``: where ``enc`` carries the seeded VJP of its re-validation (a cached batch of
    :func:`~fsinfo_fast.encoder.prepare`, ``enc.adjoint``), compare with that instead of running
    torch.func's (the same reverse-mode product of the same function; it halves the per-batch
    check's cost)."""
    from ..estimators.probes import draw_probes
    from .capture import CaptureError

    adjoint = getattr(enc, "adjoint", None) if reuse else None
    if adjoint is not None:
        u, ref = adjoint[0].unsqueeze(1), adjoint[1].unsqueeze(1)
    else:
        u = draw_probes(enc.m, seed=0x5EED_C4EC, sample_ids=torch.arange(enc.batch), count=1,
                        kind="gaussian", dtype=enc.x.dtype, device=enc.x.device)
        try:
            ref = TorchFuncProducts(enc, memory_budget=kw.get("memory_budget")).vjp(u)
        except Exception:  # noqa: BLE001  torch.func cannot run it (buffer writes, old-style
            # Functions, ...): autograd's reverse mode is the reference (it was skipped, and
            # the engine served unchecked)
            try:
                ref = _autograd_vjp(enc, u)
            except Exception as err:  # noqa: BLE001
                prods.cross_check_note = (
                    f"skipped: neither torch.func nor autograd could differentiate the encoder "
                    f"here ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
                return
    got = _engine_product(prods.vjp, u, "vector-Jacobian")
    ref64, got64 = ref.to(torch.float64).flatten(1), got.to(torch.float64).flatten(1)
    rtol = CROSS_CHECK_RTOL if kw.get("scale_dtype") is None else CROSS_CHECK_RTOL_SCALED
    rtol = max(rtol, 50 * torch.finfo(enc.x.dtype).eps)  # half-precision products round more
    # the engine's JVP too (its rules' forward mode), through the adjoint identity
    # u^T (J v) = (J^T u)^T v against torch.func's VJP
    v = draw_probes(enc.d, seed=0x5EED_C4EC, sample_ids=torch.arange(enc.batch), count=1,
                    kind="gaussian", dtype=enc.x.dtype, device=enc.x.device)
    jv = _engine_product(prods.jvp, v, "Jacobian-vector")
    uj = u.to(torch.float64).flatten(1) * jv.to(torch.float64).flatten(1)
    rv = ref64 * v.to(torch.float64).flatten(1)
    # plus the size of a derivative that is not rounding noise (a sample whose Jacobian
    # vanishes, a similarity score on a blank image, has products of pure noise)
    nat = natural_scale(enc.x, enc.y)
    un, vn = u.to(torch.float64).flatten(1).norm(dim=1), v.to(torch.float64).flatten(1).norm(dim=1)
    checks = (((got64 - ref64).norm(dim=1), ref64.norm(dim=1) + nat * un),
              ((uj.sum(dim=1) - rv.sum(dim=1)).abs(),
               uj.abs().sum(dim=1) + rv.abs().sum(dim=1) + nat * un * vn))
    for err, scale in checks:
        bad = ~(err <= rtol * scale + 1e-30)  # NaN counts as a disagreement
        if bool(bad.any()):
            rel = float((err / scale.clamp_min(1e-300)).max())
            raise CaptureError(
                f"the engine's Jacobian products disagree with torch.func's / autograd's "
                f"reverse mode at this batch (relative difference {rel:.2g} on a seeded "
                "probe): the recorded graph is not "
                "what autograd differentiates (a stop-gradient the capture cannot see, such as "
                "y.data, or an op without a faithful rule)")


def _engine(enc: PreparedEncoder, name: str, auto: bool, **kw) -> object:
    """The linearised engine with ``name``'s ops; under ``auto`` a recorded fallback to
    ``torch.func``, otherwise :class:`BackendUnavailableError` when it cannot serve ``enc``."""
    from .capture import CaptureError, recapture
    from .ops import get_ops
    from .products import LinearisedProducts

    ops = get_ops("torch" if name == "engine" else name)
    try:
        prods = LinearisedProducts(enc, ops=ops, backend=name, **kw)
        try:
            _cross_check(prods, enc, kw)
        except CaptureError as err:
            # a later batch disagrees with a graph the first batch passed: where the encoder's
            # Python state changed the graph (a flag adding a .detach()), capture it again and
            # check the new graph; the same graph: the values decide, this batch is refused
            if not getattr(err, "spot", False) or not recapture(
                    prods.root, enc.x.reshape(enc.batch, *enc.in_shape)):
                raise
            prods = LinearisedProducts(enc, ops=ops, backend=name, **kw)
            _cross_check(prods, enc, kw)
    except CaptureError as err:
        if not auto:
            raise BackendUnavailableError(
                f"backend {name!r} was requested but cannot serve this encoder: {err}. "
                "backend='torch' runs it through torch.func; backend='auto' does so and records "
                "why in result.info"
            ) from err
        log.debug("auto: %s cannot serve the encoder (%s); using torch", name, err)
        kw.pop("scale_dtype", None)
        fallback = TorchFuncProducts(enc, **kw)
        fallback.info = {"backend_fallback": f"{name} -> torch: {err}"}
        return fallback
    if auto and prods.fallback_share > AUTO_MAX_FALLBACK_SHARE:
        nodes = ", ".join(f"{f['node']} ({f['op']})" for f in prods.fallbacks[:8])
        why = (f"{name} -> torch: {len(prods.fallbacks)} of the encoder's nodes with per-sample "
               f"state ({100 * prods.fallback_share:.0f}%) have no engine rule and would run "
               f"through per-node torch.func: {nodes}")
        log.debug("auto: %s", why)
        kw.pop("scale_dtype", None)
        fallback = TorchFuncProducts(enc, **kw)
        fallback.info = {"backend_fallback": why,
                         "engine_fallback_nodes": [dict(f) for f in prods.fallbacks]}
        return fallback
    return prods


def make_products(enc: PreparedEncoder, backend: str | None = "auto", **kw) -> object:
    """Build the products object of ``backend`` for a prepared batch.

    Every compiled backend is the linearised engine
    (:class:`~fsinfo_fast.engine.products.LinearisedProducts`) with that backend's ops. An
    explicitly requested backend (argument or ``$FSINFO_FAST_BACKEND``) that cannot serve the
    encoder raises :class:`BackendUnavailableError` with the reason (the capture error chained);
    nodes without an engine rule run through ``torch.func`` one by one and are listed in the
    products' ``info``. Under ``auto``, an encoder the engine cannot capture, or most of whose
    stateful nodes would fall back, runs through ``torch.func`` and the reason is recorded in
    the products' ``info`` (``"backend_fallback"``), which the metrics copy to ``result.info``.

    Returns:
        An object with ``batch, d, m, dtype, device``, ``jvp([B, K, d]) -> [B, K, m]``,
        ``vjp([B, K, m]) -> [B, K, d]``, ``backend`` (the name that ran), ``info`` (a dict)
        and ``select(idx)`` (the products of a sub-batch, for the rounds of the samples still
        running, :class:`~fsinfo_fast.estimators.base.RowProducts`).
    """
    auto = backend is None or backend == "auto"
    name = resolve_backend(backend, enc.x.device)
    # a cached batch's deferred forward-/reverse-mode check (PreparedEncoder.confirm) runs
    # unless the engine's per-batch cross-check answered it; before an engine refusal, so the
    # encoder's own error comes first
    confirm = getattr(enc, "confirm", lambda: None)
    if name == "torch":
        confirm()
        return TorchFuncProducts(enc, **kw)
    try:
        prods = _engine(enc, name, auto and not os.environ.get(ENV_VAR), **kw)
    except BackendUnavailableError:
        confirm()
        raise
    if not getattr(prods, "adjoint_confirmed", False):
        confirm()
    return prods


def engine_report(encoder, x) -> dict:
    """How the linearised engine serves ``encoder`` at inputs shaped like ``x``.

    Returns:
        ``{"captured": bool, "reason": str | None, "nodes": int, "kinds": {kind: count},
        "fallbacks": [{"node", "op", "reason"}, ...], "fallback_share": float,
        "auto": backend name auto picks, "auto_reason": why auto falls back (or None),
        "dtype": the products' dtype, "dtype_note": why it is not the given one (or None),
        "compiled": the note where a torch.compile'd module's original is reported (or None)}``.
        ``captured`` is False (with the reason) where the engine cannot capture the encoder:
        an explicit ``backend="engine"`` then raises, ``auto`` runs torch.func.
    """
    from collections import Counter

    from ..encoder import COMPILED_NOTE, prepare, uncompiled, working_dtype
    from .capture import CaptureError
    from .products import LinearisedProducts

    eager = uncompiled(encoder)  # as the metrics linearise it (a torch.compile'd module's own)
    work, note = working_dtype(eager, x)
    enc = prepare(eager, x, dtype=work)
    out: dict = {"captured": False, "reason": None, "nodes": 0, "kinds": {}, "fallbacks": [],
                 "fallback_share": 0.0, "dtype": str(enc.x.dtype), "dtype_note": note,
                 "compiled": COMPILED_NOTE if eager is not encoder else None}
    try:
        P = LinearisedProducts(enc)
    except CaptureError as err:
        out["reason"] = str(err)
    else:
        out.update(captured=True, nodes=len(P.node_kinds),
                   kinds=dict(Counter(P.node_kinds.values()).most_common()),
                   fallbacks=[dict(f) for f in P.fallbacks], fallback_share=P.fallback_share)
    auto = make_products(enc, "auto")
    out["auto"] = auto.backend
    out["auto_reason"] = getattr(auto, "info", {}).get("backend_fallback")
    return out
