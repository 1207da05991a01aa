r"""Linear layers: convolution (any dimension, stride, padding, dilation, groups, transposed) and
the matrix products ``mm`` / ``addmm`` / ``bmm`` that ``linear`` and ``matmul`` decompose into.

A convolution with a constant weight is linear in its input: the ``K`` tangents of the ``B``
samples go through it as **one** convolution over ``K * B`` images (bias dropped), and the
transpose is the transposed convolution with the same weight (``output_padding`` chosen so the
shapes match), or the plain convolution for a transposed one. A BatchNorm in eval mode that only
reads the convolution's output is folded into its weight (:meth:`ConvLin.folded`).

Matrix products: ``t @ W`` runs the ``K`` probes as extra rows of one GEMM; for ``bmm`` the
probes are moved next to the rows so the batched product runs once, without ``K`` copies of
the constant operand. With both operands active (attention scores in models that write attention
by hand) the product rule keeps both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Decline, Lin, OpCall, lift, register, unbroadcast

aten = torch.ops.aten


def _tup(v, n: int) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [int(v)]
    return v * n if len(v) == 1 else v


class ConvLin(Lin):
    """``t -> conv(t, W)`` (no bias) for tangents ``[K, N, C, *S]``; its transpose."""

    kind = "conv"

    def __init__(self, call: OpCall) -> None:
        x, w = call.args[0], call.args[1]
        (self.stride, self.padding, self.dilation, self.transposed, self.output_padding,
         self.groups) = call.args[3:9]
        nd = w.ndim - 2
        self.nd = nd
        self.weight = w
        self.in_shape, self.out_shape = tuple(x.shape), tuple(call.out.shape)
        if x.ndim != nd + 2:
            raise Decline(f"convolution input of shape {tuple(x.shape)} without a batch dim")
        if self.transposed:
            self.adj_padding = [0] * nd
        else:
            k = w.shape[2:]
            s, p, d = _tup(self.stride, nd), _tup(self.padding, nd), _tup(self.dilation, nd)
            si, so = self.in_shape[2:], self.out_shape[2:]
            self.adj_padding = [si[i] - ((so[i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1)
                                for i in range(nd)]

    def _conv(self, t: Tensor, transposed: bool, output_padding) -> Tensor:
        return aten.convolution(t, self.weight, None, self.stride, self.padding, self.dilation,
                                transposed, output_padding, self.groups)

    def jvp(self, ts):
        t = ts[0]
        k = t.shape[0]
        y = self._conv(t.reshape(k * self.in_shape[0], *self.in_shape[1:]), self.transposed,
                       self.output_padding)
        return y.view(k, *self.out_shape)

    def vjp(self, u):
        k = u.shape[0]
        x = self._conv(u.reshape(k * self.out_shape[0], *self.out_shape[1:]),
                       not self.transposed, self.adj_padding)
        return [x.view(k, *self.in_shape)]

    def folded(self, channel_scale: Tensor) -> ConvLin | None:
        """This convolution followed by a per-output-channel scale, as one convolution
        (``None`` for a transposed convolution)."""
        if self.transposed:
            return None
        out = ConvLin.__new__(ConvLin)
        out.__dict__.update(self.__dict__)
        out.weight = self.weight * channel_scale.reshape(-1, *([1] * (self.weight.ndim - 1)))
        out.kind = "conv+batchnorm"
        return out


@register(aten.convolution)
def convolution_rule(call: OpCall) -> Lin:
    """Convolution with a constant weight (the bias is constant too)."""
    call.only_active(0)
    return ConvLin(call)


def left_mul(t: Tensor, b: Tensor) -> Tensor:
    """``t @ b`` for a tangent ``t [K, *bt, N, E]`` and a primal ``b [*bt, E, O]``, as one
    (batched) GEMM with the probes as extra rows (``b`` is never copied ``K`` times)."""
    if b.ndim == 2:
        return torch.matmul(t, b)
    k, n, e = t.shape[0], t.shape[-2], t.shape[-1]
    bt = tuple(b.shape[:-2])
    nb = math.prod(bt)
    tt = t.movedim(0, -3).reshape(nb, k * n, e)  # one copy at most
    y = torch.bmm(tt, b.reshape(nb, e, b.shape[-1]))
    return y.view(nb, k, n, -1).transpose(0, 1).reshape(k, *bt, n, -1)


def right_mul(a: Tensor, t: Tensor) -> Tensor:
    """``a @ t`` for a primal ``a [*bt, N, E]`` and a tangent ``t [K, *bt, E, O]``, as one
    (batched) GEMM with the probes as extra columns."""
    if a.ndim == 2:
        return torch.matmul(t.transpose(-1, -2), a.t()).transpose(-1, -2)
    k, e, o = t.shape[0], t.shape[-2], t.shape[-1]
    bt = tuple(a.shape[:-2])
    nb, n = math.prod(bt), a.shape[-2]
    tt = t.movedim(0, -2).reshape(nb, e, k * o)  # one copy at most
    y = torch.bmm(a.reshape(nb, n, e), tt)
    return y.view(nb, n, k, o).permute(2, 0, 1, 3).reshape(k, *bt, n, o)


class MatmulLin(Lin):
    """``beta * bias + alpha * a @ b`` (``mm``, ``addmm``, ``bmm``); any operand may be active."""

    kind = "matmul"

    def __init__(self, a: Tensor, b: Tensor, act_a: bool, act_b: bool, alpha=1, bias=None,
                 beta=1, act_bias: bool = False, out_shape: tuple = ()) -> None:
        self.a = a if act_b else None  # store an operand only where the other is active
        self.b = b if act_a else None
        self.act_a, self.act_b, self.act_bias = act_a, act_b, act_bias
        self.alpha, self.beta = alpha, beta
        self.bias_shape = tuple(bias.shape) if isinstance(bias, Tensor) else None
        self.out_shape = out_shape
        if act_a and act_b:
            self.kind = "product"

    def jvp(self, ts):
        ta, tb = ts[-2], ts[-1]
        out = None
        if self.act_a and ta is not None:
            out = left_mul(ta, self.b)
        if self.act_b and tb is not None:
            y = right_mul(self.a, tb)
            out = y if out is None else out + y
        if out is not None and self.alpha != 1:
            out = out * self.alpha
        if self.act_bias and ts[0] is not None:
            tbias = lift(ts[0], len(self.out_shape)) * self.beta
            out = tbias.expand(tbias.shape[0], *self.out_shape) if out is None else out + tbias
        return out

    def vjp(self, u):
        g = u * self.alpha if self.alpha != 1 else u
        ua = left_mul(g, self.b.transpose(-1, -2)) if self.act_a else None
        ub = right_mul(self.a.transpose(-1, -2), g) if self.act_b else None
        if self.bias_shape is None:
            return [ua, ub]
        ubias = unbroadcast(u * self.beta, self.bias_shape) if self.act_bias else None
        return [ubias, ua, ub]


@register(aten.mm, aten.bmm)
def mm_rule(call: OpCall) -> Lin:
    a, b = call.args[0], call.args[1]
    return MatmulLin(a, b, call.is_active(0), call.is_active(1),
                     out_shape=tuple(call.out.shape))


@register(aten.addmm)
def addmm_rule(call: OpCall) -> Lin:
    bias, a, b = call.args[:3]
    beta, alpha = call.kwargs.get("beta", 1), call.kwargs.get("alpha", 1)
    return MatmulLin(a, b, call.is_active(1), call.is_active(2), alpha, bias, beta,
                     call.is_active(0), tuple(call.out.shape))
