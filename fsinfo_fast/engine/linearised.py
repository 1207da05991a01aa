r"""The linearised engine: trace the encoder once, run the primal once, reuse the linearisation.

For a batch of ``B`` samples the encoder is traced with :mod:`torch.fx` (the trace is cached per
module), the primal is run once node by node, and every node keeps only what its Jacobian
needs, in compact form:

====================================  ===================================================
node                                  derivative state (per sample, shared by all probes)
====================================  ===================================================
ReLU                                  a packed bit mask (``ops.gate_pack``)
LeakyReLU, GELU, SiLU, Tanh, Sigmoid, the derivative values ``f'(x)`` (``ops.scale_apply``)
Hardswish, ELU, Softplus, ...
MaxPool1d/2d                          argmax indices (``ops.maxpool_gather/scatter``)
BatchNorm (eval)                      nothing: ``weight / sqrt(running_var + eps)``
LayerNorm, GroupNorm                  normalised activations ``x_hat`` and ``1/std``
Conv1d/2d, Linear                     nothing: the weights (applied without bias)
AvgPool, AdaptiveAvgPool, reshapes,   nothing (linear; the transpose is the cached
cat, getitem, dropout (eval), ...     ``torch.func`` pullback of the op)
residual add/sub, mul by a constant   the constant
anything else                         its primal inputs; ``torch.func`` JVP/VJP of that
                                      node alone, vmapped over the probes
====================================  ===================================================

``jvp(V)`` pushes the ``K`` tangents of each sample forward through the stored linearisation as
one tangent batch of ``B*K`` (convolutions and GEMMs run once on the whole batch), ``vjp(U)``
pushes cotangents backward through the transposes (``conv_transpose`` for convolutions,
``W^T`` for linear layers, a scatter for max-pool, the self-adjoint projection of the
normalisation layers), as often as the estimators ask, without recomputing the primal.

The elementwise and max-pool parts go through an ``ops`` object
(:class:`~fsinfo_fast.engine.ops.TorchOps`, or the Triton / C++ / CUDA implementations of the
same contract), so the same engine runs with every kernel backend.

Encoders that :func:`torch.fx.symbolic_trace` cannot trace (data-dependent control flow, ...),
or whose traced primal does not reproduce the encoder's output, fall back whole to
:class:`~fsinfo_fast.engine.torchfunc.TorchFuncProducts` (logged at debug level); see
:func:`linearised_products`.
"""

from __future__ import annotations

import logging
import math
import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..encoder import PreparedEncoder
from ..errors import InvalidInputError
from .ops import Ops, TorchOps
from .torchfunc import TorchFuncProducts, default_memory_budget

__all__ = ["LinearisedProducts", "TraceError", "linearised_products", "trace_encoder"]

log = logging.getLogger(__name__)


class TraceError(RuntimeError):
    """The encoder cannot be linearised by the engine (the reason says why)."""


# -- tracing (cached per module) -----------------------------------------------------------------
_TRACE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trace_key(module: Any) -> tuple:
    if not isinstance(module, nn.Module):
        return ()
    return (tuple(m.training for m in module.modules()),
            tuple(id(p) for p in module.parameters()), tuple(id(b) for b in module.buffers()))


def trace_encoder(module: Callable) -> fx.Graph:
    """The :mod:`torch.fx` graph of ``module`` (cached per module object; re-traced when its
    training flags or parameter identities change).

    Raises:
        TraceError: symbolic tracing failed.
    """
    key = _trace_key(module)
    try:
        hit = _TRACE_CACHE.get(module)
    except TypeError:  # not weak-referenceable / hashable
        hit = None
    if hit is not None and hit[0] == key:
        if isinstance(hit[1], TraceError):
            raise hit[1]
        return hit[1]
    try:
        graph = fx.symbolic_trace(module).graph
        result: fx.Graph | TraceError = graph
    except Exception as err:  # noqa: BLE001  (fx raises many kinds of errors)
        result = TraceError(f"torch.fx cannot trace the encoder: {type(err).__name__}: {err}")
    try:
        _TRACE_CACHE[module] = (key, result)
    except TypeError:
        pass
    if isinstance(result, TraceError):
        raise result
    return result


# -- helpers -------------------------------------------------------------------------------------
class _Ref:
    """Placeholder for leaf ``j`` of the value of active node ``node`` inside a node's args."""

    __slots__ = ("node", "j")

    def __init__(self, node: fx.Node, j: int) -> None:
        self.node, self.j = node, j


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


def _unbroadcast(u: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum ``u [B, K, *s_out]`` down to ``[B, K, *s]`` where ``shape = (B, *s)`` broadcast."""
    target = (shape[0], u.shape[1], *shape[1:])
    dims = [i for i in range(2, u.ndim) if target[i] == 1 and u.shape[i] != 1]
    return u.sum(dim=dims, keepdim=True) if dims else u


def _add_into(store: dict, key: Any, value: Tensor) -> None:
    if key in store:
        store[key] = store[key] + value
    else:
        store[key] = value


# Elementwise activations whose derivative is stored as a scale (module types and functions).
_SCALE_MODULES = (nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.ELU,
                  nn.Softplus, nn.Hardsigmoid, nn.Mish, nn.CELU, nn.SELU, nn.Hardtanh,
                  nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_SCALE_FUNCTIONS = {torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.gelu, F.silu, F.leaky_relu,
                    F.elu, F.softplus, F.hardswish, F.hardsigmoid, F.mish, F.celu, F.selu,
                    F.hardtanh, F.relu6, F.softsign, F.logsigmoid, torch.nn.functional.tanhshrink}
_SCALE_METHODS = {"tanh", "sigmoid"}
_RELU_FUNCTIONS = {torch.relu, F.relu}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.sub, torch.sub}
_MUL_FUNCTIONS = {operator.mul, torch.mul, operator.truediv, torch.div}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout)
# Ops linear in their floating tensor arguments (jointly; other arguments kept): tangent = the op
# applied to the tangents (vmapped over the probes), transpose = the cached pullback.
_LINEAR_MODULES = (nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.ZeroPad2d)
_LINEAR_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose,
                     torch.squeeze, torch.unsqueeze, torch.cat, torch.concat, torch.stack,
                     operator.getitem, torch.mean, torch.sum, operator.neg, torch.neg,
                     F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.movedim,
                     torch.chunk, torch.split}
_LINEAR_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous",
                   "squeeze", "unsqueeze", "mean", "sum", "expand", "expand_as", "view_as",
                   "reshape_as", "chunk", "split", "movedim", "neg", "__getitem__", "t",
                   "unflatten", "clone"}


# -- node kinds ----------------------------------------------------------------------------------
class _Lin:
    """A node of the linearisation. ``srcs``: the (node, leaf) pairs of its tangent inputs."""

    srcs: list[tuple[fx.Node, int]]
    kind = "?"

    def jvp(self, ts: list[Tensor | None]) -> list[Tensor | None]:
        raise NotImplementedError

    def vjp(self, us: list[Tensor | None]) -> list[Tensor | None]:
        raise NotImplementedError


class _Identity(_Lin):
    kind = "identity"

    def __init__(self, src):
        self.srcs = [src]

    def jvp(self, ts):
        return [ts[0]]

    def vjp(self, us):
        return [us[0]]


class _Conv(_Lin):
    kind = "conv"

    def __init__(self, src, mod: nn.Module, in_shape, out_shape, weight: Tensor | None = None):
        self.srcs = [src]
        self.mod = mod
        self.weight = mod.weight if weight is None else weight
        self.nd = mod.nd if isinstance(mod, _ConvParams) else (
            1 if isinstance(mod, nn.Conv1d) else 2)
        self.in_shape, self.out_shape = tuple(in_shape[1:]), tuple(out_shape[1:])
        pad = mod.padding
        if isinstance(pad, str):
            if pad == "valid":
                pad = (0,) * self.nd
            else:  # "same" with symmetric padding only (checked by _conv_supported)
                pad = tuple(d * (k - 1) // 2
                            for d, k in zip(mod.dilation, mod.kernel_size, strict=True))
        self.padding = tuple(pad)
        k, s, d = mod.kernel_size, mod.stride, mod.dilation
        spatial_in, spatial_out = self.in_shape[1:], self.out_shape[1:]
        self.output_padding = tuple(
            spatial_in[i] - ((spatial_out[i] - 1) * s[i] - 2 * self.padding[i]
                             + d[i] * (k[i] - 1) + 1) for i in range(self.nd))
        self._fwd = F.conv1d if self.nd == 1 else F.conv2d
        self._bwd = F.conv_transpose1d if self.nd == 1 else F.conv_transpose2d

    def jvp(self, ts):
        t = ts[0]
        b, k = t.shape[:2]
        m = self.mod
        y = self._fwd(t.reshape(b * k, *self.in_shape), self.weight, None, m.stride, self.padding,
                      m.dilation, m.groups)
        return [y.view(b, k, *self.out_shape)]

    def vjp(self, us):
        u = us[0]
        b, k = u.shape[:2]
        m = self.mod
        x = self._bwd(u.reshape(b * k, *self.out_shape), self.weight, None, m.stride, self.padding,
                      self.output_padding, m.groups, m.dilation)
        return [x.view(b, k, *self.in_shape)]


class _ConvParams:
    """The attributes of a convolution given in function form (``F.conv1d/2d``)."""

    padding_mode = "zeros"

    def __init__(self, nd, weight, stride, padding, dilation, groups):
        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd

        self.nd, self.weight, self.groups = nd, weight, int(groups)
        self.stride, self.dilation = tup(stride), tup(dilation)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.kernel_size = tuple(weight.shape[2:])


def _conv_params(fn, args, kwargs, active, node) -> _ConvParams | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    vals = dict(zip(names, (None, None, None, 1, 0, 1, 1), strict=False))
    vals.update(zip(names, args, strict=False))
    vals.update(kwargs)
    w = vals["weight"]
    if any(isinstance(a, fx.Node) and a in active for a in node.all_input_nodes
           if a is not node.args[0]) or not isinstance(w, Tensor):
        return None
    return _ConvParams(1 if fn is F.conv1d else 2, w, vals["stride"], vals["padding"],
                       vals["dilation"], vals["groups"])


def _conv_supported(mod: Any, x: Tensor) -> bool:
    if isinstance(mod, _ConvParams):
        nd = mod.nd
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        nd = 1 if isinstance(mod, nn.Conv1d) else 2
    else:
        return False
    if mod.padding_mode != "zeros" or x.ndim != nd + 2:
        return False
    if mod.padding == "same":
        return all(d * (k - 1) % 2 == 0
                   for d, k in zip(mod.dilation, mod.kernel_size, strict=True))
    return True


class _Linear(_Lin):
    kind = "linear"

    def __init__(self, src, weight: Tensor):
        self.srcs = [src]
        self.weight = weight

    def jvp(self, ts):
        return [F.linear(ts[0], self.weight)]

    def vjp(self, us):
        return [torch.matmul(us[0], self.weight)]


class _Gate(_Lin):
    kind = "gate"

    def __init__(self, src, mask: Tensor, ops: Ops):
        self.srcs = [src]
        self.shape = tuple(mask.shape[1:])
        self.f = mask[0].numel()
        self.packed = ops.gate_pack(mask.reshape(mask.shape[0], -1).contiguous())
        self.ops = ops

    def _apply(self, t):
        b, k = t.shape[:2]
        out = self.ops.gate_apply(t.reshape(b, k, self.f).contiguous(), self.packed)
        return out.view(b, k, *self.shape)

    def jvp(self, ts):
        return [self._apply(ts[0])]

    def vjp(self, us):
        return [self._apply(us[0])]


class _Scale(_Lin):
    kind = "scale"

    def __init__(self, src, s: Tensor, ops: Ops, dtype: torch.dtype | None):
        self.srcs = [src]
        self.shape = tuple(s.shape[1:])
        self.f = s[0].numel()
        s = s.reshape(s.shape[0], -1)
        self.s = (s if dtype is None else s.to(dtype)).contiguous()
        self.ops = ops

    def _apply(self, t):
        b, k = t.shape[:2]
        out = self.ops.scale_apply(t.reshape(b, k, self.f).contiguous(), self.s)
        return out.view(b, k, *self.shape)

    def jvp(self, ts):
        return [self._apply(ts[0])]

    def vjp(self, us):
        return [self._apply(us[0])]


def _fold_scale(conv: _Conv, scale: Tensor) -> _Conv:
    """``conv`` followed by a per-output-channel scale, as one convolution."""
    out = _Conv.__new__(_Conv)
    out.__dict__.update(conv.__dict__)
    out.weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.ndim - 1)))
    out.kind = "conv+batchnorm"
    return out


class _ChannelScale(_Lin):
    """Per-channel affine (BatchNorm in eval mode): ``t * weight / sqrt(var + eps)``."""

    kind = "batchnorm"

    def __init__(self, src, scale: Tensor, ndim: int):
        self.srcs = [src]
        self.channel_scale = scale
        self.scale = scale.reshape(1, 1, -1, *([1] * (ndim - 2)))  # [1, 1, C, 1...]

    def jvp(self, ts):
        return [ts[0] * self.scale]

    def vjp(self, us):
        return [us[0] * self.scale]


class _Normalise(_Lin):
    r"""LayerNorm / GroupNorm: ``J = diag(w) P`` with the symmetric projection
    ``P v = rstd (v - mean(v) - x_hat mean(v x_hat))`` over each normalisation group."""

    kind = "norm"

    def __init__(self, src, xhat: Tensor, rstd: Tensor, weight: Tensor | None,
                 group_shape: tuple[int, ...], shape: tuple[int, ...], wshape: tuple[int, ...]):
        self.srcs = [src]
        b = xhat.shape[0]
        self.group_shape = group_shape  # per sample, e.g. (G, M) or (*lead, N)
        self.shape = shape  # per sample value shape
        self.xhat = xhat.reshape(b, 1, *group_shape)
        self.rstd = rstd.reshape(b, 1, *group_shape[:-1], 1)
        self.w = None if weight is None else weight.reshape(1, 1, *wshape)

    def _project(self, t):
        b, k = t.shape[:2]
        g = t.reshape(b, k, *self.group_shape)
        g = g - g.mean(-1, keepdim=True) - self.xhat * (g * self.xhat).mean(-1, keepdim=True)
        return (g * self.rstd).view(b, k, *self.shape)

    def jvp(self, ts):
        out = self._project(ts[0])
        return [out if self.w is None else out * self.w]

    def vjp(self, us):
        u = us[0] if self.w is None else us[0] * self.w
        return [self._project(u)]


class _MaxPool(_Lin):
    kind = "maxpool"

    def __init__(self, src, idx: Tensor, in_shape, ops: Ops):
        self.srcs = [src]
        self.in_shape = tuple(in_shape[1:])
        self.out_shape = tuple(idx.shape[1:])
        c = idx.shape[1]
        self.lin = math.prod(self.in_shape[1:])
        self.idx = idx.reshape(idx.shape[0], c, -1).contiguous()
        self.c = c
        self.ops = ops

    def jvp(self, ts):
        t = ts[0]
        b, k = t.shape[:2]
        out = self.ops.maxpool_gather(t.reshape(b, k, self.c, self.lin).contiguous(), self.idx)
        return [out.view(b, k, *self.out_shape)]

    def vjp(self, us):
        u = us[0]
        b, k = u.shape[:2]
        out = self.ops.maxpool_scatter(u.reshape(b, k, self.c, -1).contiguous(), self.idx,
                                       self.lin)
        return [out.view(b, k, *self.in_shape)]


class _Add(_Lin):
    """``a +/- b`` (broadcasting); inactive operands add nothing to the tangent."""

    kind = "add"

    def __init__(self, srcs, signs, shapes, out_shape):
        self.srcs, self.signs, self.shapes = srcs, signs, shapes
        self.out_shape = tuple(out_shape[1:])

    def jvp(self, ts):
        out = None
        for t, s in zip(ts, self.signs, strict=False):
            if t is None:
                continue
            t = t if s > 0 else -t
            out = t if out is None else out + t
        if out is not None and tuple(out.shape[2:]) != self.out_shape:
            out = out.expand(*out.shape[:2], *self.out_shape)
        return [out]

    def vjp(self, us):
        u = us[0]
        return [_unbroadcast(u if s > 0 else -u, shape)
                for s, shape in zip(self.signs, self.shapes, strict=False)]


class _MulConst(_Lin):
    """``a * c`` or ``a / c`` with a constant ``c`` (number or inactive tensor)."""

    kind = "mul"

    def __init__(self, src, c: Any, in_shape, out_ndim: int):
        self.srcs = [src]
        if isinstance(c, Tensor) and c.ndim == out_ndim:
            c = c.unsqueeze(1)
        self.c = c
        self.in_shape = tuple(in_shape)

    def jvp(self, ts):
        return [ts[0] * self.c]

    def vjp(self, us):
        return [_unbroadcast(us[0] * self.c, self.in_shape)]


class _Func(_Lin):
    """A node through ``torch.func``: ``linear=True`` applies the op itself to the tangents (it
    is linear in its active arguments, with inactive floating tensors set to zero); otherwise
    ``torch.func.jvp`` at the stored primal inputs. The transpose is the cached pullback."""

    kind = "torch.func"

    def __init__(self, call: Callable, leaves: list, spec, active_pos: list[int],
                 srcs, primals: list[Tensor], out_value: Any, linear: bool,
                 inplace: bool = False):
        self.call, self.leaves, self.spec = call, leaves, spec
        self.inplace = inplace
        self.pos, self.srcs, self.primals = active_pos, srcs, primals
        self.linear = linear
        if linear:
            self.kind = "linear(vmap)"
            # inactive floating tensors contribute zero to the tangent
            self.lin_leaves = [torch.zeros_like(v) if (_is_float_tensor(v) and i not in
                                                        set(active_pos)) else v
                               for i, v in enumerate(leaves)]
        out_leaves, self.out_spec = tree_flatten(out_value)
        self.out_float = [i for i, v in enumerate(out_leaves) if _is_float_tensor(v)]
        self.out_shapes = [out_leaves[i].shape for i in self.out_float]
        self.n_out = len(out_leaves)
        self._pullback = None

    def _g(self, *vals, base=None):
        leaves = list(self.leaves if base is None else base)
        for p, v in zip(self.pos, vals, strict=False):
            leaves[p] = v.clone() if self.inplace else v
        args, kwargs = tree_unflatten(leaves, self.spec)
        out = self.call(*args, **kwargs)
        out_leaves, _ = tree_flatten(out)
        return tuple(out_leaves[i] for i in self.out_float)

    def _expand(self, outs) -> list:
        full: list = [None] * self.n_out
        for i, o in zip(self.out_float, outs, strict=False):
            full[i] = o
        return full

    def jvp(self, ts):
        ts = [torch.zeros(p.shape[0], 1, *p.shape[1:], dtype=p.dtype, device=p.device)
              .expand(p.shape[0], self._k(ts), *p.shape[1:]) if t is None else t
              for t, p in zip(ts, self.primals, strict=False)]
        if self.linear:
            f = lambda *t: self._g(*t, base=self.lin_leaves)  # noqa: E731
            return self._expand(vmap(f, in_dims=1, out_dims=1)(*ts))
        first: BaseException | None = None
        for route in range(self._route, 3):
            try:
                with TorchFuncProducts._attention_kernel(min(route, 1)):
                    if route < 2:
                        f = lambda *t: _jvp(self._g, tuple(self.primals), tuple(t))[1]  # noqa: E731
                    else:
                        f = self._jvp_by_double_vjp
                    outs = vmap(f, in_dims=1, out_dims=1)(*ts)
            except (RuntimeError, NotImplementedError) as err:
                first = first or err
                if route == 2:
                    raise first from err
                continue
            self._route = route
            return self._expand(outs)
        raise AssertionError("unreachable")  # pragma: no cover

    _route = 0

    def _jvp_by_double_vjp(self, *t):
        # u -> J^T u is linear; its VJP with cotangent t is J t
        def pull(*u):
            _, pb = _vjp(self._g, *self.primals)
            return pb(tuple(u))

        zeros = tuple(torch.zeros(s, dtype=self.primals[0].dtype, device=self.primals[0].device)
                      for s in self.out_shapes)
        _, pb2 = _vjp(pull, *zeros)
        return pb2(tuple(t))

    @staticmethod
    def _k(ts) -> int:
        return next(t.shape[1] for t in ts if t is not None)

    def vjp(self, us):
        if self._pullback is None:
            _, self._pullback = _vjp(self._g, *self.primals)
        k = self._k(us)
        cots = []
        for i, shape in zip(self.out_float, self.out_shapes, strict=False):
            u = us[i]
            if u is None:
                u = torch.zeros(shape[0], 1, *shape[1:], dtype=self.primals[0].dtype,
                                device=self.primals[0].device).expand(shape[0], k, *shape[1:])
            cots.append(u)
        pb = self._pullback
        outs = vmap(lambda *c: pb(tuple(c)), in_dims=1, out_dims=1)(*cots)
        return list(outs)


# -- the products object -------------------------------------------------------------------------
def _call_of(node: fx.Node, root: Any) -> Callable:
    if node.op == "call_module":
        return root.get_submodule(node.target)
    if node.op == "call_function":
        return node.target
    name = node.target
    return lambda self_, *a, **k: getattr(self_, name)(*a, **k)


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _inplace(node: fx.Node, fn: Any) -> bool:
    if node.kwargs.get("inplace", False) is True or getattr(fn, "inplace", False) is True:
        return True
    if node.op == "call_function" and fn in (F.relu, F.relu6, F.leaky_relu, F.elu, F.hardtanh,
                                             F.celu, F.selu, F.hardswish, F.silu, F.mish,
                                             F.hardsigmoid, F.dropout, F.threshold):
        sig_inplace = node.args[-1] if len(node.args) > 1 and isinstance(node.args[-1], bool) \
            else False
        return bool(sig_inplace)
    return False


class LinearisedProducts:
    """``jvp``/``vjp`` of a prepared encoder through its stored linearisation.

    Args:
        enc: the prepared encoder; ``enc.module`` is traced (the batch ``enc.x`` is the
            linearisation point).
        ops: the fused-op implementation (default :class:`~fsinfo_fast.engine.ops.TorchOps`).
        memory_budget: bytes one chunk of probes may use (default: a quarter of free memory).
        chunk_size: probes per chunk (overrides the budget).
        scale_dtype: storage dtype of activation derivatives (``None``: the working dtype).
        backend: the name reported in results (``"engine"``, ``"cpp"``, ...).

    Attributes:
        jvp_passes, vjp_passes: products computed so far, per sample.
        ops: the op implementation used (estimators may use its fused reductions too).
        node_kinds: ``{node name: kind}`` of the linearisation (``"torch.func"`` marks nodes
            that fall back to per-node ``torch.func``).

    Raises:
        TraceError: the encoder cannot be traced or its traced primal does not reproduce the
            encoder's output (use :func:`linearised_products` for the automatic fallback).
    """

    forward_mode = True

    def __init__(
        self, enc: PreparedEncoder, *, ops: Ops | None = None, memory_budget: int | None = None,
        chunk_size: int | None = None, scale_dtype: torch.dtype | None = None,
        backend: str = "engine",
    ) -> None:
        self.enc = enc
        self.x = enc.x
        self.batch, self.d, self.m = enc.batch, enc.d, enc.m
        self.dtype, self.device = enc.x.dtype, enc.x.device
        self.ops = ops if ops is not None else TorchOps()
        self.backend = backend
        self.scale_dtype = scale_dtype
        if chunk_size is not None and chunk_size < 1:
            raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}")
        module = getattr(enc, "module", None)
        if module is None:
            raise TraceError("the prepared encoder carries no module to trace")
        self.root = module
        graph = trace_encoder(module)
        with torch.no_grad():
            self._linearise(graph)
        budget = memory_budget if memory_budget is not None else default_memory_budget(
            self.device)
        # live tangents: about two activations per probe (plus transients), like a forward pass
        per_probe = self.batch * 3 * max(enc.saved_bytes, 1)
        self.chunk_size = chunk_size or max(1, int(budget // per_probe))
        self.jvp_passes = 0
        self.vjp_passes = 0

    # -- linearisation --------------------------------------------------------------------------
    def _linearise(self, graph: fx.Graph) -> None:
        root = self.root
        b = self.batch
        env: dict[fx.Node, Any] = {}
        active: set[fx.Node] = set()
        self._order: list[tuple[fx.Node, _Lin]] = []
        self._input: fx.Node | None = None
        self._output: fx.Node | None = None
        x = self.x.reshape(b, *self.enc.in_shape)
        for node in graph.nodes:
            if node.op == "placeholder":
                if self._input is not None:
                    if node.args:  # default-valued extra argument
                        env[node] = node.args[0]
                        continue
                    raise TraceError("the encoder's forward takes more than one input")
                self._input = node
                env[node] = x
                active.add(node)
                continue
            if node.op == "get_attr":
                env[node] = _fetch_attr(root, node.target)
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or out not in active:
                    raise TraceError("the traced output is not a single tensor depending on x")
                self._output = out
                y = env[out]
                if not isinstance(y, Tensor) or y.shape[0] != b:
                    raise TraceError("the traced output is not a batch tensor")
                tol = 1e-4 if y.dtype != torch.float64 else 1e-9
                ref = self.enc.y
                err = float((y.reshape(b, -1) - ref).abs().max())
                if not err <= tol * (float(ref.abs().max()) + 1e-30) + tol:
                    raise TraceError(f"the traced primal differs from the encoder's output by "
                                     f"{err:.3g}")
                continue
            fn = _call_of(node, root)
            if node.op == "call_method" and str(node.target).endswith("_") and not str(
                    node.target).startswith("__"):
                raise TraceError(f"in-place method {node.target!r} is not supported")
            is_active = any(isinstance(a, fx.Node) and a in active
                            for a in node.all_input_nodes)
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if not is_active:
                env[node] = fn(*args, **kwargs)
                continue
            lin, value = self._native(node, fn, args, kwargs, env, active)
            if lin is None:
                lin, value = self._generic(node, fn, args, kwargs, env, active)
            env[node] = value
            if lin is not None:
                active.add(node)
                self._order.append((node, lin))
        if self._output is None:
            raise TraceError("the traced graph has no output")
        self._fold_batchnorm()
        # last use of every active node's tangent (to free it early in jvp)
        pos = {n: i for i, (n, _) in enumerate(self._order)}
        self._last_use: dict[int, list[fx.Node]] = {}
        last: dict[fx.Node, int] = {}
        for i, (_, lin) in enumerate(self._order):
            for src, _j in lin.srcs:
                last[src] = i
        for src, i in last.items():
            if src is not self._output:
                self._last_use.setdefault(i, []).append(src)
        self._pos = pos
        self.node_kinds = {n.name: lin.kind for n, lin in self._order}

    def _fold_batchnorm(self) -> None:
        """Fold an eval BatchNorm into the convolution feeding only it (one pass less)."""
        lins = dict(self._order)
        drop: set[fx.Node] = set()
        for i, (node, lin) in enumerate(self._order):
            if not isinstance(lin, _ChannelScale):
                continue
            src = lin.srcs[0][0]
            conv = lins.get(src)
            if isinstance(conv, _Conv) and len(src.users) == 1 and src is not self._output:
                folded = _fold_scale(conv, lin.channel_scale)
                self._order[i] = (node, folded)
                drop.add(src)
                folded.srcs = list(conv.srcs)
        self._order = [(n, lin) for n, lin in self._order if n not in drop]

    def _src(self, a: Any, active: set) -> tuple[fx.Node, int] | None:
        return (a, 0) if isinstance(a, fx.Node) and a in active else None

    def _native(self, node, fn, args, kwargs, env, active):
        """A compact linearisation for a supported node, or ``(None, None)``."""
        b = self.batch
        a0 = node.args[0] if node.args else None
        src = self._src(a0, active)
        x0 = args[0] if args else None
        single = (src is not None and isinstance(x0, Tensor) and x0.is_floating_point()
                  and x0.ndim >= 1 and x0.shape[0] == b
                  and all(not (isinstance(n, fx.Node) and n in active)
                          for n in node.all_input_nodes if n is not a0))
        if node.op == "call_module":
            mod = fn
            if not single or kwargs or len(args) != 1:
                return None, None
            if isinstance(mod, _IDENTITY_MODULES) and not mod.training:
                return _Identity(src), mod(x0)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and _conv_supported(mod, x0):
                y = mod(x0)
                return _Conv(src, mod, x0.shape, y.shape), y
            if isinstance(mod, nn.Linear):
                return _Linear(src, mod.weight), mod(x0)
            if isinstance(mod, nn.ReLU):
                return _Gate(src, x0 > 0, self.ops), torch.relu(x0)
            if isinstance(mod, _SCALE_MODULES):
                return self._scale(src, lambda t: mod(t), x0, inplace=getattr(
                    mod, "inplace", False))
            if (isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training
                    and mod.running_var is not None and x0.ndim >= 2):
                scale = torch.rsqrt(mod.running_var + mod.eps)
                if mod.weight is not None:
                    scale = scale * mod.weight
                return _ChannelScale(src, scale.to(x0.dtype), x0.ndim), mod(x0)
            if isinstance(mod, nn.LayerNorm):
                n = len(mod.normalized_shape)
                s = tuple(x0.shape[1:])
                if x0.ndim - 1 < n:
                    return None, None
                lead = s[: len(s) - n]
                gshape = (*lead, math.prod(s[len(s) - n:]))
                return self._norm(src, mod, x0, gshape, s, tuple(mod.normalized_shape)
                                  if mod.weight is not None else ())
            if isinstance(mod, nn.GroupNorm) and x0.ndim >= 2:
                s = tuple(x0.shape[1:])
                g = mod.num_groups
                gshape = (g, x0[0].numel() // g)
                wshape = (s[0], *([1] * (len(s) - 1)))
                return self._norm(src, mod, x0, gshape, s, wshape)
            if (isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) and not mod.return_indices
                    and x0.ndim == (3 if isinstance(mod, nn.MaxPool1d) else 4)):
                pool = F.max_pool1d if isinstance(mod, nn.MaxPool1d) else F.max_pool2d
                y, idx = pool(x0, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                              ceil_mode=mod.ceil_mode, return_indices=True)
                return _MaxPool(src, idx, x0.shape, self.ops), y
            return None, None
        if node.op == "call_function" or node.op == "call_method":
            name = fn if node.op == "call_function" else node.target
            if name in _RELU_FUNCTIONS or name == "relu":
                extra = [a for a in node.args[1:] if not isinstance(a, bool)]
                if single and not extra and set(node.kwargs) <= {"inplace"}:
                    return _Gate(src, x0 > 0, self.ops), torch.relu(x0)
                return None, None
            if name in (F.conv1d, F.conv2d) and single:
                conv = _conv_params(name, args, kwargs, active, node)
                if conv is not None and _conv_supported(conv, x0):
                    y = fn(*args, **kwargs)
                    return _Conv(src, conv, x0.shape, y.shape), y
                return None, None
            if name is F.linear and single and len(node.args) >= 2:
                w = args[1]
                if (isinstance(w, Tensor) and w.ndim == 2 and not self._src(node.args[1], active)
                        and not (len(node.args) > 2 and self._src(node.args[2], active))
                        and not (node.kwargs.get("bias") is not None
                                 and self._src(node.kwargs["bias"], active))):
                    return _Linear(src, w), fn(*args, **kwargs)
                return None, None
            if name in _SCALE_FUNCTIONS or name in _SCALE_METHODS:
                if not single:
                    return None, None
                rest, kw = args[1:], dict(kwargs)
                inplace = bool(kw.pop("inplace", False)) or (
                    bool(rest) and isinstance(rest[-1], bool) and rest[-1])
                call = fn if node.op == "call_function" else (
                    lambda t, nm=name: getattr(t, nm)())
                if inplace and rest and isinstance(rest[-1], bool):
                    rest = rest[:-1]
                return self._scale(src, lambda t: call(t, *rest, **kw), x0, inplace=False)
            if (name in _ADD_FUNCTIONS or name in ("add", "sub")) and len(node.args) == 2 \
                    and not node.kwargs:
                out = fn(*args)
                if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != b:
                    return None, None
                srcs, signs, shapes = [], [], []
                neg = name in (operator.sub, torch.sub, "sub")
                for i, (a, v) in enumerate(zip(node.args, args, strict=False)):
                    s = self._src(a, active)
                    if s is None:
                        continue
                    if not (isinstance(v, Tensor) and v.ndim == out.ndim and v.shape[0] == b):
                        return None, None
                    srcs.append(s)
                    signs.append(-1 if (neg and i == 1) else 1)
                    shapes.append(tuple(v.shape))
                if len(srcs) == 1 and shapes[0] == tuple(out.shape) and signs[0] > 0:
                    return _Identity(srcs[0]), out
                return _Add(srcs, signs, shapes, out.shape), out
            if (name in _MUL_FUNCTIONS or name in ("mul", "div")) and len(node.args) == 2 \
                    and not node.kwargs:
                div = name in (operator.truediv, torch.div, "div")
                s0, s1 = self._src(node.args[0], active), self._src(node.args[1], active)
                if (s0 is None) == (s1 is None) or (div and s1 is not None):
                    return None, None
                s, a, c = (s0, args[0], args[1]) if s0 is not None else (s1, args[1], args[0])
                out = fn(*args)
                if not (isinstance(a, Tensor) and isinstance(out, Tensor) and out.ndim >= 1
                        and a.ndim == out.ndim and out.shape[0] == b and a.shape[0] == b):
                    return None, None
                if isinstance(c, Tensor):
                    if c.ndim > out.ndim or (c.ndim == out.ndim and c.shape[0] not in (1, b)):
                        return None, None
                    if c.is_complex():
                        return None, None
                elif not isinstance(c, (int, float)) or isinstance(c, bool):
                    return None, None
                if div:
                    c = 1.0 / c
                return _MulConst(s, c, a.shape, out.ndim), out
        return None, None

    def _scale(self, src, f: Callable[[Tensor], Tensor], x0: Tensor, inplace: bool):
        with torch.enable_grad():
            xi = x0.detach().requires_grad_(True)
            y = f(xi.clone() if inplace else xi)
            (s,) = torch.autograd.grad(y, xi, torch.ones_like(y))
        return _Scale(src, s.detach(), self.ops, self.scale_dtype), y.detach()

    def _norm(self, src, mod, x0: Tensor, gshape, shape, wshape):
        b = x0.shape[0]
        g = x0.reshape(b, *gshape)
        mu = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + mod.eps)
        xhat = (g - mu) * rstd
        w = mod.weight if getattr(mod, "weight", None) is not None else None
        return _Normalise(src, xhat, rstd, w, gshape, shape, wshape), mod(x0)

    def _generic(self, node, fn, args, kwargs, env, active):
        """Per-node ``torch.func`` (or the op itself when it is linear)."""
        refs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._refs(n, env, active))
        ref_leaves, spec = tree_flatten(refs)
        leaves = [tree_flatten(env[r.node])[0][r.j] if isinstance(r, _Ref) else r
                  for r in ref_leaves]
        pos = [i for i, r in enumerate(ref_leaves) if isinstance(r, _Ref)]
        srcs = [(ref_leaves[i].node, ref_leaves[i].j) for i in pos]
        inplace = _inplace(node, fn)
        if inplace:  # keep the stored primal inputs intact
            leaves = [v.clone() if isinstance(v, Tensor) else v for v in leaves]
            args, kwargs = tree_unflatten(leaves, spec)
            leaves = [tree_flatten(env[r.node])[0][r.j] if isinstance(r, _Ref) else r
                      for r in ref_leaves]
        out = fn(*args, **kwargs)
        out_leaves, _ = tree_flatten(out)
        if not pos or not any(_is_float_tensor(v) for v in out_leaves):
            return None, out
        primals = [leaves[i] for i in pos]
        linear = self._is_linear(node, fn)
        return _Func(fn, leaves, spec, pos, srcs, primals, out, linear, inplace), out

    @staticmethod
    def _refs(n: fx.Node, env, active):
        v = env[n]
        if n not in active:
            return v
        leaves, vspec = tree_flatten(v)
        return tree_unflatten([_Ref(n, j) if _is_float_tensor(t) else t
                               for j, t in enumerate(leaves)], vspec)

    @staticmethod
    def _is_linear(node: fx.Node, fn) -> bool:
        if node.op == "call_module":
            return isinstance(fn, _LINEAR_MODULES) or (
                isinstance(fn, _IDENTITY_MODULES) and not fn.training)
        if node.op == "call_function":
            if fn is F.dropout:
                return node.kwargs.get("training", True) is False
            if fn in (operator.mul, operator.truediv):
                return False
            return fn in _LINEAR_FUNCTIONS
        return node.target in _LINEAR_METHODS

    @property
    def fallback_share(self) -> float:
        """Share of the nonlinear nodes that run through per-node ``torch.func`` (0 to 1)."""
        kinds = list(self.node_kinds.values())
        nonlinear = [k for k in kinds if k in ("gate", "scale", "maxpool", "norm", "torch.func")]
        return kinds.count("torch.func") / len(nonlinear) if nonlinear else 0.0

    # -- products -------------------------------------------------------------------------------
    def _check(self, T: Tensor, n: int, name: str) -> Tensor:
        if T.ndim != 3 or T.shape[0] != self.batch or T.shape[2] != n:
            raise InvalidInputError(
                f"{name} expects [B={self.batch}, K, {n}], got {tuple(T.shape)}"
            )
        return T.to(self.dtype)

    def _chunks(self, T: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        k = T.shape[1]
        if k <= self.chunk_size:
            return f(T)
        return torch.cat([f(T[:, i:i + self.chunk_size]) for i in range(0, k, self.chunk_size)],
                         dim=1)

    @torch.no_grad()
    def jvp(self, V: Tensor) -> Tensor:
        """``J_b v`` for every sample ``b`` and probe: ``[B, K, d] -> [B, K, m]``."""
        V = self._check(V, self.d, "jvp")
        out = self._chunks(V, self._jvp)
        self.jvp_passes += V.shape[1]
        return out

    @torch.no_grad()
    def vjp(self, U: Tensor) -> Tensor:
        """``J_b^T u`` for every sample ``b`` and probe: ``[B, K, m] -> [B, K, d]``."""
        U = self._check(U, self.m, "vjp")
        out = self._chunks(U, self._vjp)
        self.vjp_passes += U.shape[1]
        return out

    def _jvp(self, V: Tensor) -> Tensor:
        b, k = V.shape[:2]
        tan: dict[fx.Node, list] = {self._input: [V.reshape(b, k, *self.enc.in_shape)]}
        for i, (node, lin) in enumerate(self._order):
            ts = [tan[s][j] if s in tan else None for s, j in lin.srcs]
            tan[node] = lin.jvp(ts)
            for dead in self._last_use.get(i, ()):
                tan.pop(dead, None)
        out = tan[self._output][0]
        if out is None:
            return V.new_zeros(b, k, self.m)
        return out.reshape(b, k, self.m)

    def _vjp(self, U: Tensor) -> Tensor:
        b, k = U.shape[:2]
        out_val_shape = self.enc.out_shape
        cot: dict[tuple[fx.Node, int], Tensor] = {(self._output, 0): U.reshape(
            b, k, *out_val_shape)}
        for node, lin in reversed(self._order):
            n_out = getattr(lin, "n_out", 1)
            us = [cot.pop((node, j), None) for j in range(n_out)]
            if all(u is None for u in us):
                continue
            gs = lin.vjp(us)
            for (s, j), g in zip(lin.srcs, gs, strict=False):
                if g is not None:
                    _add_into(cot, (s, j), g)
        g = cot.get((self._input, 0))
        if g is None:
            return U.new_zeros(b, k, self.d)
        return g.reshape(b, k, self.d)


def linearised_products(enc: PreparedEncoder, *, ops: Ops | None = None,
                        backend: str = "engine", **kw) -> LinearisedProducts | TorchFuncProducts:
    """:class:`LinearisedProducts`, or :class:`TorchFuncProducts` for an encoder the engine
    cannot linearise (logged at debug level)."""
    try:
        return LinearisedProducts(enc, ops=ops, backend=backend, **kw)
    except TraceError as err:
        log.debug("engine: falling back to torch.func for the whole encoder: %s", err)
        kw.pop("scale_dtype", None)
        return TorchFuncProducts(enc, **kw)
