r"""Capture an encoder as a core-ATen graph, once per input shape.

The linearised engine needs the encoder as a list of primitive operations it has derivative rules
for. :func:`capture` records one: the encoder runs once on *fake* tensors (shapes and dtypes, no
data) under :func:`torch.fx.experimental.proxy_tensor.make_fx`, with PyTorch's core-ATen
decomposition table, through :func:`torch.func.functional_call` so that parameters and buffers
become graph inputs (the engine feeds the live tensors at every linearisation: the graph never
holds a stale or fake weight). Because it runs the real Python ``forward``, everything Python does
is resolved for this input shape: ``if`` on shapes or on ``self.training``, loops, ``ModelOutput``
objects, forward hooks, and an encoder that stops its model early by raising from a hook (the
exception-based early exit of :func:`fsinfo_fast.split`) records the prefix only. Control flow
that depends on the *values* of the input cannot be recorded: capture then fails with the reason.

Why ``make_fx`` and not ``torch.export``: export tracks the module call stack and fails on an
exception that leaves a submodule's ``forward`` early ("Unexpected key ..."), which is exactly how
a hook-based encoder stops; ``make_fx`` does not track modules and records the same core-ATen ops.

Kept whole because the engine has compact rules for them: scaled dot-product attention and RMS
norm (``F.scaled_dot_product_attention`` and ``F.rms_norm`` are recorded as one opaque op each,
:data:`SDPA_OP` and :data:`RMS_NORM_OP`, whatever kernel they would dispatch to; the ATen
attention variants are kept too), and, removed from the decomposition table, SiLU, Hardswish,
Hardsigmoid, Softplus, Mish, ``roll`` and ``std`` / ``std_mean``. Everything else is core
ATen: ``convolution``, ``addmm``/``mm``/``bmm``, ``native_layer_norm``, ``native_group_norm``,
``_native_batch_norm_legit_no_training``, ``max_pool2d_with_indices``, ``view``, ...

Captures are cached per (encoder, input shape, dtype, device, training flags, forward hooks,
parameter shapes): a second batch of the same shape pays no capture. Python state the key cannot
see (a flag ``forward`` reads) is caught by the engine's per-batch cross-check against
``torch.func``, which then captures again (:func:`recapture`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..encoder import FUNC_ROUTES, forward_hooks_key

__all__ = ["Captured", "CaptureError", "capture", "decomposition_table", "KEEP_WHOLE",
           "OPAQUE_IMPLS", "recapture"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


class CaptureError(RuntimeError):
    """The encoder cannot be captured as an ATen graph (the message says why)."""


#: Op packets kept as single nodes (the engine has compact rules for them).
KEEP_WHOLE = (
    aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten.silu, aten.silu_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_,
    aten.softplus, aten.mish, aten.mish_, aten.roll, aten._fused_rms_norm, aten.rms_norm,
    # std as one node: its decomposition sqrt(var) has the derivative inf * 0 = NaN where the
    # variance is 0 (autograd's std_backward gives 0 there)
    aten.std, aten.std_mean,
)


def decomposition_table() -> dict:
    """PyTorch's core-ATen decompositions minus the ops in :data:`KEEP_WHOLE`."""
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    # detach (and ``.data``) stays a node: its core decomposition is ``alias``, which the
    # engine differentiated through (a stop-gradient silently ignored)
    table.pop(aten.detach.default, None)
    keep = set(KEEP_WHOLE)
    for op in list(table):
        if getattr(op, "overloadpacket", None) in keep:
            del table[op]
    return table


def _opaque(name: str, fn: Callable, schema: str, n_tensors: int,
            out_shape: Callable[..., list[int]]) -> Any:
    """``fn`` as an opaque torch op ``fsinfo_fast_capture::name`` (one graph node): its fake
    kernel gives a *contiguous* tensor of ``out_shape(*args)`` (the real op's exact output
    shape; ``fn`` returns a contiguous tensor too, so that ``make_fx`` records the views that
    follow for the layout the replay produces), autograd goes through ``torch.func.vjp`` of
    ``fn`` (used only where the engine's rule declines and the node runs through torch.func)."""
    op = torch.library.custom_op(f"fsinfo_fast_capture::{name}", fn, mutates_args=(),
                                 schema=schema)

    @op.register_fake
    def _fake(*args):
        first = args[0]
        return first.new_empty(out_shape(*args))

    def setup(ctx, inputs, output):
        ctx.inputs = inputs

    def backward(ctx, grad):
        inputs = list(ctx.inputs)
        pos = [i for i in range(n_tensors) if isinstance(inputs[i], Tensor)
               and inputs[i].is_floating_point()]

        def f(*ts):
            vals = list(inputs)
            for i, t in zip(pos, ts, strict=True):
                vals[i] = t
            return fn(*vals)

        _, pull = torch.func.vjp(f, *(inputs[i] for i in pos))
        grads = dict(zip(pos, pull(grad), strict=True))
        return tuple(grads.get(i) for i in range(len(inputs)))

    op.register_autograd(backward, setup_context=setup)
    return op


def _rms_norm(input: Tensor, normalized_shape: list[int], weight: Tensor | None,
              eps: float | None) -> Tensor:
    return F.rms_norm(input, normalized_shape, weight, eps).contiguous()


def _rms_norm_shape(input: Tensor, *_: Any) -> list[int]:
    return list(input.shape)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float,
          is_causal: bool, scale: float | None, enable_gqa: bool) -> Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                          scale=scale, enable_gqa=enable_gqa).contiguous()


def _sdpa_math(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
               dropout_p: float, is_causal: bool, scale: float | None,
               enable_gqa: bool) -> Tensor:
    """:func:`_sdpa` through the composite math kernel (matmuls and a softmax: forward-mode
    and double-backward derivatives exist, which the fused CPU/CUDA kernels lack)."""
    return aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p,
                                                   is_causal, scale=scale,
                                                   enable_gqa=enable_gqa)[0]


def _sdpa_shape(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                dropout_p: float, is_causal: bool, scale: float | None,
                enable_gqa: bool) -> list[int]:
    """The output shape of ``F.scaled_dot_product_attention``: the batch dimensions of query,
    key and value broadcast (with ``enable_gqa``, the heads are the query's), the query's
    length ``L`` and the value's head dimension ``Ev``."""
    batch = [tuple(t.shape[:-2]) for t in (query, key, value)]
    if enable_gqa and query.dim() >= 3:
        batch = [b[:-1] for b in batch]
        heads: tuple = (query.shape[-3],)
    else:
        heads = ()
    return [*torch.broadcast_shapes(*batch), *heads, query.shape[-2], value.shape[-1]]


#: ``F.rms_norm`` as one op (its composite decomposes on a CPU before any table sees it)
RMS_NORM_OP = _opaque("rms_norm", _rms_norm,
                      "(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) "
                      "-> Tensor", 3, _rms_norm_shape)
#: ``F.scaled_dot_product_attention`` as one op, whatever kernel it would pick
SDPA_OP = _opaque("sdpa", _sdpa,
                  "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
                  "bool is_causal, float? scale, bool enable_gqa) -> Tensor", 4, _sdpa_shape)

#: the plain PyTorch function each opaque op wraps (the per-node ``torch.func`` fallback runs
#: it where the engine's rule declines: the custom op's own autograd cannot run under
#: ``torch.func`` transforms)
OPAQUE_IMPLS: dict[Any, Callable] = {RMS_NORM_OP._opoverload: _rms_norm,
                                     SDPA_OP._opoverload: _sdpa_math}


def _route_rms_norm(input, normalized_shape, weight=None, eps=None):
    return RMS_NORM_OP(input, list(normalized_shape), weight, eps)


def _route_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    return SDPA_OP(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale,
                   bool(enable_gqa))


def _pad_circular(x: Tensor, pad: list[int]) -> Tensor:
    """``F.pad(x, pad, mode="circular")`` as gathers: negative pads crop, then output index j of
    a padded dimension reads index (j - left) mod size, as torch's own (whose kernel copies
    slices into an empty tensor, in place on views: nothing the engine can follow)."""
    for i in range(len(pad) // 2):
        dim = x.dim() - 1 - i
        left, right = int(pad[2 * i]), int(pad[2 * i + 1])
        x = x.narrow(dim, max(-left, 0), x.shape[dim] - max(-left, 0) - max(-right, 0))
        left, right, size = max(left, 0), max(right, 0), x.shape[dim]
        if left or right:
            idx = torch.remainder(torch.arange(size + left + right, device=x.device) - left,
                                  size)
            x = torch.index_select(x, dim, idx)
    return x


def _route_pad(input, pad, mode="constant", value=None):
    if mode == "circular":
        return _pad_circular(input, list(pad))
    return F.pad(input, pad, mode=mode, value=value)


#: Python functions recorded as one op (or, for circular padding, cdist and PReLU, as
#: primitives: :data:`~fsinfo_fast.encoder.FUNC_ROUTES`) during capture
_ROUTES = {F.rms_norm: _route_rms_norm, torch.rms_norm: _route_rms_norm,
           F.scaled_dot_product_attention: _route_sdpa, F.pad: _route_pad,
           torch._C._nn.pad: _route_pad, **FUNC_ROUTES}


class _Route(TorchFunctionMode):
    """During capture, RMS norm and scaled dot-product attention become one node each
    (:data:`RMS_NORM_OP`, :data:`SDPA_OP`), which the engine's rules linearise compactly, and
    circular padding becomes gathers (:func:`_pad_circular`), ``torch.cdist`` a norm of
    differences and ``F.prelu`` a ``where`` (one derivative at its kink in both modes)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = _ROUTES.get(func)
        if route is not None:
            return route(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@dataclass
class Captured:
    """A captured encoder.

    Attributes:
        gm: the :class:`torch.fx.GraphModule` (its ``get_attr`` nodes hold constants the encoder
            closed over, real tensors).
        graph: ``gm.graph``: placeholders, core-ATen ``call_function`` nodes, one output.
        inputs: per placeholder, in order: ``None`` for the encoder's input ``x``, else the name
            of the parameter or buffer it receives (``module.get_parameter``/``get_buffer``).
        in_shape: the full input shape ``[B, *in]`` it was captured for.
    """

    gm: fx.GraphModule
    inputs: list[str | None]
    in_shape: tuple[int, ...]
    graph: fx.Graph = field(init=False)
    #: outcomes of the engine's cross-check against torch.func at the first batch, per
    #: (backend, dtypes): a refusal stays for this shape; after a pass every later batch is
    #: checked again (one seeded probe per sample), since the values can decide it (a clamp on
    #: ``y.data`` that bites only in some batches, a NaN derivative at zero variance)
    checked: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.graph = self.gm.graph

    def ops(self) -> list[str]:
        """The ``call_function`` targets, in order (for reports and tests)."""
        return [str(n.target) for n in self.graph.nodes if n.op == "call_function"]


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _key(encoder: Callable, x: Tensor) -> tuple:
    key: tuple = (tuple(x.shape), x.dtype, x.device.type, x.device.index)
    if isinstance(encoder, nn.Module):
        mods = list(encoder.modules())
        key += (tuple(m.training for m in mods), forward_hooks_key(mods),
                tuple((n, tuple(t.shape), t.dtype) for n, t in _named_tensors(encoder).items()))
    return key


def capture(encoder: Callable[[Tensor], Tensor], x: Tensor) -> Captured:
    """The core-ATen graph of ``encoder`` on inputs shaped like ``x`` (cached).

    Args:
        encoder: ``nn.Module`` or callable mapping ``[B, *in]`` to one tensor ``[B, *out]``.
        x: an example input ``[B, *in]`` (only its shape, dtype and device are used).

    Returns:
        :class:`Captured`.

    Raises:
        CaptureError: the encoder's ``forward`` cannot be recorded (data-dependent control
            flow, an op without a fake-tensor kernel, a non-tensor output, ...); the message
            quotes the underlying error, which is chained as the cause.
    """
    key = _key(encoder, x)
    try:
        per_encoder = _CACHE.setdefault(encoder, {})
    except TypeError:  # not weak-referenceable
        per_encoder = {}
    hit = per_encoder.get(key)
    if isinstance(hit, CaptureError):
        raise hit
    if hit is not None:
        return hit
    try:
        result: Captured | CaptureError = _capture(encoder, x)
    except CaptureError as err:
        result = err
    per_encoder[key] = result
    if isinstance(result, CaptureError):
        raise result
    return result


def recapture(encoder: Callable[[Tensor], Tensor], x: Tensor) -> bool:
    """Capture ``encoder`` again at ``x``'s shape and replace the cached graph where the new
    one differs (``True``). The cache key cannot see the Python state ``forward`` reads (a flag
    that adds a ``.detach()``): the engine's per-batch cross-check against ``torch.func`` calls
    this when a cached graph disagrees on a later batch. ``False``: the same graph (the
    disagreement is the values'), nothing cached, or the capture now fails."""
    try:
        per_encoder = _CACHE.get(encoder)
    except TypeError:
        return False
    key = _key(encoder, x)
    old = None if per_encoder is None else per_encoder.get(key)
    if not isinstance(old, Captured):
        return False
    try:
        new = _capture(encoder, x)
    except CaptureError:
        return False
    if new.gm.code == old.gm.code:
        return False
    log.debug("recaptured %s: its graph changed since the cached capture",
              type(encoder).__name__)
    per_encoder[key] = new
    return True


def _refuse_random_draws(graph: fx.Graph) -> None:
    """A random op in the captured graph (``torch.rand`` with or without a generator, dropout
    in training mode, ``bernoulli``, ``randperm``, ...) draws new numbers at every replay: the
    graph could not reproduce the encoder's forward (the cached capture even holds a
    ``Generator`` object, advanced by each replay), so the engine is refused up front.
    Attention (ATen variants and :data:`SDPA_OP`) counts only with ``dropout_p > 0``."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            continue
        named = {a.name: a.default_value if a.has_default_value() else None
                 for a in schema.arguments}
        named.update({a.name: v for a, v in zip(schema.arguments, node.args, strict=False)})
        named.update(node.kwargs)
        if "dropout_p" in named:  # attention: random only with dropout
            if not named["dropout_p"]:
                continue
        elif torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
            continue
        elif "train" in named and (named["train"] is False or named.get("p") == 0):
            continue  # native_dropout with train=False or p=0: the identity
        raise CaptureError(f"a random draw in forward ({node.target}): each replay of the "
                           "captured graph would draw new numbers; backend='torch' runs "
                           "forward itself")


def _capture(encoder: Callable, x: Tensor) -> Captured:
    from torch.fx.experimental.proxy_tensor import make_fx

    if isinstance(encoder, nn.Module):
        tensors = _named_tensors(encoder)
        names = list(tensors)

        def run(inp: Tensor, params: dict[str, Tensor]) -> Tensor:
            with _Route():
                return torch.func.functional_call(encoder, params, (inp,))

        example: tuple = (x, tensors)
    else:
        names = []

        def run(inp: Tensor) -> Tensor:  # type: ignore[misc]
            with _Route():
                return encoder(inp)

        example = (x,)

    def checked(*args: Any) -> Tensor:
        out = run(*args)
        if not isinstance(out, Tensor):
            raise CaptureError(f"the encoder returned {type(out).__name__}, not one tensor")
        return out

    try:
        with torch.no_grad():
            gm = make_fx(torch.func.functionalize(checked, remove="mutations"),
                         decomposition_table=decomposition_table(),
                         tracing_mode="fake", _allow_non_fake_inputs=True)(*example)
    except CaptureError:
        raise
    except Exception as err:  # noqa: BLE001  (tracing raises many kinds of errors)
        msg = f"{type(err).__name__}: {err}"
        if len(msg) > 600:
            msg = msg[:600] + " ..."
        raise CaptureError(f"make_fx could not capture the encoder at the ATen level ({msg})"
                           ) from err
    gm.graph.eliminate_dead_code()
    _refuse_random_draws(gm.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves, _ = tree_flatten(example)
    if len(placeholders) != len(leaves):
        raise CaptureError(f"captured {len(placeholders)} graph inputs for {len(leaves)} "
                           "input tensors")
    log.debug("captured %s: %d nodes", type(encoder).__name__, len(gm.graph.nodes))
    return Captured(gm=gm, inputs=[None, *names], in_shape=tuple(x.shape))
