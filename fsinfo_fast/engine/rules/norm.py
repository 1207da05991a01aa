r"""Normalisation layers: batch norm (eval), layer norm, group norm, RMS norm.

BatchNorm in eval mode is a per-channel affine map: its Jacobian is the constant channel scale
``weight / sqrt(running_var + eps)`` (no state per sample; folded into a preceding convolution
by the engine).

LayerNorm / GroupNorm normalise each group ``g`` of ``n`` elements: with
``x_hat = (x - mean) * rstd``, ``rstd = 1 / sqrt(var + eps)``,

.. math::  J t = w \odot P t,\qquad
    P t = \mathrm{rstd}\,\big(t - \overline{t} - \hat x\,\overline{t \hat x}\big)

(bars: means over the group), a symmetric projection ``P`` times the affine weight, so
``J^T u = P (w \odot u)``. ``P`` applied to a cotangent is exactly what PyTorch's fused backward
kernel of the layer computes (``native_layer_norm_backward`` / ``native_group_norm_backward``
with the weight left out), so both products run through it, on the ``K * B`` rows at once; the
state is the layer's input and its ``mean`` / ``rstd`` (one activation and two numbers per group,
per sample). RMS norm is the same projection without the centring (``x_hat = x * rstd``,
``P t = rstd (t - x_hat mean(t x_hat))``), evaluated directly (no CPU kernel for its backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..capture import RMS_NORM_OP
from . import Decline, Lin, OpCall, register

aten = torch.ops.aten


class ChannelScaleLin(Lin):
    """``t * scale[c]`` along dim 1 of the primal (BatchNorm in eval mode)."""

    kind = "batchnorm"

    def __init__(self, scale: Tensor, ndim: int, n_out: int) -> None:
        self.channel_scale = scale
        self.scale = scale.reshape(-1, *([1] * (ndim - 2)))
        self.n_out = n_out

    def jvp(self, ts):
        return [ts[0] * self.scale] + [None] * (self.n_out - 1)

    def vjp(self, u):
        return [u[0] * self.scale]


def _batch_stats_reason(x: Tensor, running: bool) -> str:
    """Why a ``batch_norm`` that normalises with the statistics of its input declines: the
    module calling it decides what the user can do."""
    shape = list(x.shape)
    if not running and x.ndim >= 2 and x.shape[0] == 1:
        return (f"batch_norm with input statistics over a {shape} view: InstanceNorm (per "
                "sample and channel, legal in eval mode) or a BatchNorm without running "
                "statistics on one sample; the engine has no rule for it")
    if not running:
        return (f"batch_norm with batch statistics over {shape} and no running statistics "
                "(a BatchNorm with track_running_stats=False normalises with batch statistics "
                "even in eval mode; InstanceNorm calls batch_norm on a [1, B*C, ...] view)")
    return ("BatchNorm (or InstanceNorm with track_running_stats) in training mode uses batch "
            "statistics: call .eval()")


@register(aten._native_batch_norm_legit_no_training, aten.native_batch_norm,
          aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit)
def batch_norm_rule(call: OpCall) -> Lin:
    """BatchNorm with running statistics (eval mode)."""
    call.only_active(0)
    x, w = call.args[0], call.args[1]
    if call.op.overloadpacket is aten._native_batch_norm_legit_no_training:
        running_var, eps = call.args[4], call.args[6]
    else:
        no_stats = call.op._overloadname == "no_stats"  # (x, w, b, training, momentum, eps)
        training = call.args[3] if no_stats else call.args[5]
        running_var = None if no_stats else call.args[4]
        if training:
            raise Decline(_batch_stats_reason(x, running_var is not None))
        eps = call.args[7]
    if running_var is None or x.ndim < 2:
        raise Decline("BatchNorm without running statistics")
    scale = torch.rsqrt(running_var + eps)
    if w is not None:
        scale = scale * w
    return ChannelScaleLin(scale.to(x.dtype), x.ndim, len(call.out))


class NormLin(Lin):
    """``w * rstd * (t - [mean(t)] - x_hat mean(t x_hat))`` over groups of the primal (the
    projection evaluated directly: RMS norm)."""

    kind = "norm"

    def __init__(self, xhat: Tensor, rstd: Tensor, weight: Tensor | None, center: bool,
                 shape: tuple, n_out: int) -> None:
        self.gshape = tuple(xhat.shape)  # [*groups, n]
        self.xhat = xhat
        self.rstd = rstd  # [*groups, 1]
        self.w = weight  # broadcasts against [*shape] (right-aligned), or None
        self.center = center
        self.shape = shape
        self.n_out = n_out

    def _project(self, t: Tensor) -> Tensor:
        k = t.shape[0]
        g = t.reshape(k, *self.gshape)
        xh = self.xhat
        inner = (g * xh).mean(-1, keepdim=True)
        if self.center:
            g = g - g.mean(-1, keepdim=True)
        g = (g - xh * inner) * self.rstd
        return g.view(k, *self.shape)

    single = False  # a one-output op (its tangent is a tensor, not a list)

    def jvp(self, ts):
        out = self._project(ts[0])
        if self.w is not None:
            out = out * self.w
        return out if self.single else [out] + [None] * (self.n_out - 1)

    def vjp(self, u):
        u = u if self.single else u[0]
        g = u if self.w is None else u * self.w
        return [self._project(g)]


def _repeat(v: Tensor, k: int) -> Tensor:
    """``v`` repeated ``k`` times along a new leading dim, flattened into its first dim."""
    # contiguous: for a one-sample batch the reshape is a stride-0 view, which the fused
    # backward kernels read as if it were dense (past the end of the buffer)
    return v.expand(k, *v.shape).reshape(k * v.shape[0], *v.shape[1:]).contiguous()


class LayerNormLin(Lin):
    """LayerNorm through its fused backward kernel (``P`` on ``K * rows`` rows)."""

    kind = "norm"

    def __init__(self, x: Tensor, shape: list[int], mean: Tensor, rstd: Tensor,
                 weight: Tensor | None) -> None:
        n = len(shape)
        rows = math.prod(x.shape[: x.ndim - n])
        self.shape, self.normalized = tuple(x.shape), list(shape)
        self.x = x.reshape(rows, *shape)
        self.mean, self.rstd = mean.reshape(rows, 1), rstd.reshape(rows, 1)
        self.w = weight

    def _project(self, g: Tensor) -> Tensor:
        k = g.shape[0]
        out = aten.native_layer_norm_backward(
            g.reshape(k * self.x.shape[0], *self.x.shape[1:]), _repeat(self.x, k),
            self.normalized, _repeat(self.mean, k), _repeat(self.rstd, k), None, None,
            [True, False, False])[0]
        return out.view(k, *self.shape)

    def jvp(self, ts):
        out = self._project(ts[0])
        return [out if self.w is None else out * self.w, None, None]

    def vjp(self, u):
        g = u[0] if self.w is None else u[0] * self.w
        return [self._project(g)]


@register(aten.native_layer_norm)
def layer_norm_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x, normalized_shape, w = call.args[0], call.args[1], call.args[2]
    _, mean, rstd = call.out
    return LayerNormLin(x, list(normalized_shape), mean, rstd, w)


class GroupNormLin(Lin):
    """GroupNorm through its fused backward kernel (``P`` on ``K * N`` samples)."""

    kind = "norm"

    def __init__(self, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
                 n: int, c: int, hw: int, groups: int) -> None:
        self.x, self.mean, self.rstd = x, mean, rstd
        self.n, self.c, self.hw, self.groups = n, c, hw, groups
        self.w = None if weight is None else weight.reshape(c, *([1] * (x.ndim - 2)))

    def _project(self, g: Tensor) -> Tensor:
        k = g.shape[0]
        out = aten.native_group_norm_backward(
            g.reshape(k * self.n, *self.x.shape[1:]), _repeat(self.x, k),
            _repeat(self.mean, k), _repeat(self.rstd, k), None, k * self.n, self.c, self.hw,
            self.groups, [True, False, False])[0]
        return out.view(k, *self.x.shape)

    def jvp(self, ts):
        out = self._project(ts[0])
        return [out if self.w is None else out * self.w, None, None]

    def vjp(self, u):
        g = u[0] if self.w is None else u[0] * self.w
        return [self._project(g)]


@register(aten.native_group_norm)
def group_norm_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x, w = call.args[0], call.args[1]
    n, c, hw, groups = call.args[3:7]
    _, mean, rstd = call.out
    return GroupNormLin(x, mean, rstd, w, n, c, hw, groups)


@register(aten._fused_rms_norm, RMS_NORM_OP._opoverload)
def rms_norm_rule(call: OpCall) -> Lin:
    """RMS norm (``F.rms_norm`` / ``nn.RMSNorm``, captured as one op; ``_fused_rms_norm``)."""
    call.only_active(0)
    x, normalized_shape, w = call.args[0], call.args[1], call.args[2]
    eps = call.arg(3, "eps", None)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    n = math.prod(normalized_shape)
    lead = tuple(x.shape[: x.ndim - len(normalized_shape)])
    g = x.reshape(*lead, n)
    rstd = torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    n_out = len(call.out) if isinstance(call.out, (tuple, list)) else 1
    lin = NormLin(g * rstd, rstd, w, False, tuple(x.shape), max(n_out, 1))
    if n_out == 1:
        lin.single = True
    return lin


class MomentLin(Lin):
    """``var`` / ``std`` (and ``var_mean`` / ``std_mean``) over some dims: ``J t = sum(g t)``
    with the stored ``g`` of the primal's shape (``var``: ``2 (x - mean) / (n - c)``; ``std``:
    ``(x - mean) / ((n - c) std)``, 0 where ``std`` is 0, as autograd's ``std_backward``; the
    decomposition ``sqrt(var)`` gave ``inf * 0 = NaN`` on a constant row), ``J^T u = g u``;
    the mean output's tangent is ``mean(t)``."""

    kind = "norm"

    def __init__(self, g: Tensor, dims: list[int], keepdim: bool, out_shape: tuple,
                 with_mean: bool) -> None:
        self.g, self.dims, self.keepdim = g, dims, keepdim  # dims in tangent coordinates
        self.out_shape, self.with_mean = out_shape, with_mean
        self.count = math.prod(g.shape[d - 1] for d in dims)

    def _reduce(self, t: Tensor) -> Tensor:
        return t.sum(self.dims, keepdim=True).reshape(t.shape[0], *self.out_shape)

    def _back(self, u: Tensor) -> Tensor:
        kshape = [1 if i + 1 in self.dims else s for i, s in enumerate(self.g.shape)]
        return u.reshape(u.shape[0], *kshape)

    def jvp(self, ts):
        t = ts[0]
        out = self._reduce(self.g * t)
        if not self.with_mean:
            return out
        return [out, self._reduce(t) / self.count]

    def vjp(self, u):
        if not self.with_mean:
            return [self._back(u) * self.g]
        um, umean = u
        g = None if um is None else self._back(um) * self.g
        if umean is not None:
            m = (self._back(umean) / self.count).expand(umean.shape[0], *self.g.shape)
            g = m if g is None else g + m
        return [g]


@register(aten.var, aten.std, aten.var_mean, aten.std_mean)
def moment_rule(call: OpCall) -> Lin:
    """Variance and standard deviation (``aten.std`` is kept whole by the capture)."""
    call.only_active(0)
    x = call.args[0]
    named: dict = {}
    for i, a in enumerate(call.op._schema.arguments):
        named[a.name] = a.default_value if a.has_default_value() else None
        if i < len(call.args):
            named[a.name] = call.args[i]
    named.update(call.kwargs)
    if not x.is_floating_point() or x.is_complex():
        raise Decline(f"{call.op} of a {x.dtype} tensor")
    dims = named.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.ndim))
    elif not isinstance(dims, (list, tuple)):
        dims = [dims]
    dims = sorted({d % max(x.ndim, 1) + 1 for d in dims}) if x.ndim else []
    correction = named.get("correction")
    if correction is None:
        correction = 1 if named.get("unbiased", True) else 0
    n = math.prod(x.shape[d - 1] for d in dims)
    if n - correction <= 0:
        raise Decline(f"{call.op} over {n} element(s) with correction {correction}")
    keepdim = bool(named.get("keepdim", False))
    pack = call.op.overloadpacket
    with_mean = pack in (aten.var_mean, aten.std_mean)
    out = call.out[0] if with_mean else call.out
    centred = x - x.mean([d - 1 for d in dims], keepdim=True) if dims else x - x
    if pack in (aten.std, aten.std_mean):
        sd = out.reshape([1 if i + 1 in dims else s for i, s in enumerate(x.shape)])
        g = torch.where(sd == 0, torch.zeros((), dtype=x.dtype, device=x.device),
                        centred / ((n - correction) * sd))
    else:
        g = centred * (2.0 / (n - correction))
    return MomentLin(g, dims, keepdim, tuple(out.shape), with_mean)
