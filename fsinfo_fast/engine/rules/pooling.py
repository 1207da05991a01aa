r"""Pooling and resampling: max-pool (incl. adaptive), average pool (incl. adaptive), upsampling.

Max-pool is linear at the primal point: each output picks the argmax of its window. The state is
the argmax indices that the ATen op returns anyway (``max_pool2d_with_indices``); tangents are
gathered (``ops.maxpool_gather``) and cotangents scattered, summing where windows overlap
(``ops.maxpool_scatter``).

Average pooling, adaptive average pooling and bilinear / bicubic upsampling are linear: the
tangents of the ``K`` probes run through the op itself as a ``K``-times larger batch, and the
transpose is PyTorch's own backward kernel of the op (``avg_pool2d_backward``,
``upsample_bilinear2d_backward``, ...). Nearest upsampling decomposes into indexing
(:mod:`.shape`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import Decline, Lin, OpCall, register

aten = torch.ops.aten


class MaxPoolLin(Lin):
    """Gather / scatter with the argmax indices of a max-pool (any spatial dimension)."""

    kind = "maxpool"

    def __init__(self, x: Tensor, out: Tensor, idx: Tensor, nd: int, call: OpCall) -> None:
        self.in_shape, self.out_shape = tuple(x.shape), tuple(out.shape)
        self.planes = math.prod(self.in_shape[: x.ndim - nd])
        self.lin = math.prod(self.in_shape[x.ndim - nd:])
        self.idx = idx.reshape(1, self.planes, -1).contiguous()
        self.ops = call.ops

    def jvp(self, ts):
        t = ts[0]
        k = t.shape[0]
        out = self.ops.maxpool_gather(t.reshape(1, k, self.planes, self.lin).contiguous(),
                                      self.idx)
        return [out.view(k, *self.out_shape), None]

    def vjp(self, u):
        g = u[0]
        k = g.shape[0]
        out = self.ops.maxpool_scatter(g.reshape(1, k, self.planes, -1).contiguous(), self.idx,
                                       self.lin)
        return [out.view(k, *self.in_shape)]


@register(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
          aten.adaptive_max_pool2d, aten.adaptive_max_pool3d)
def max_pool_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    out, idx = call.out[0], call.out[1]
    nd = 3 if "3d" in str(call.op) else 2
    return MaxPoolLin(x, out, idx, nd, call)


class BatchedLinearLin(Lin):
    """A linear op that treats leading dims as a batch: ``fwd``/``bwd`` on ``[K*N, *core]``."""

    def __init__(self, kind: str, in_shape: tuple, out_shape: tuple, core: int,
                 fwd: Callable[[Tensor], Tensor], bwd: Callable[[Tensor], Tensor]) -> None:
        self.kind = kind
        self.in_shape, self.out_shape, self.core = in_shape, out_shape, core
        self.fwd, self.bwd = fwd, bwd

    def jvp(self, ts):
        t = ts[0]
        k = t.shape[0]
        y = self.fwd(t.reshape(-1, *self.in_shape[len(self.in_shape) - self.core:]))
        return y.reshape(k, *self.out_shape)

    def vjp(self, u):
        k = u.shape[0]
        g = self.bwd(u.reshape(-1, *self.out_shape[len(self.out_shape) - self.core:]))
        return [g.reshape(k, *self.in_shape)]


def _zeros(shape: tuple, like: Tensor) -> Tensor:
    """An input-shaped placeholder for backward kernels that only read the shape."""
    return like.new_zeros(()).expand(*shape)


@register(aten.avg_pool2d, aten.avg_pool3d)
def avg_pool_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    rest = list(call.args[1:])
    three = call.op.overloadpacket is aten.avg_pool3d
    core = 4 if three else 3
    if x.ndim not in (core, core + 1):
        raise Decline(f"{call.op} input of shape {tuple(x.shape)}")
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")
    defaults = (None, [], 0, False, True, None)
    params = [rest[i] if i < len(rest) else call.kwargs.get(n, d)
              for i, (n, d) in enumerate(zip(names, defaults, strict=True))]
    fwd_op = aten.avg_pool3d if three else aten.avg_pool2d
    bwd_op = aten.avg_pool3d_backward if three else aten.avg_pool2d_backward
    in_core = tuple(x.shape[x.ndim - core:])

    def fwd(t: Tensor) -> Tensor:
        return fwd_op(t, *params)

    def bwd(g: Tensor) -> Tensor:
        return bwd_op(g, _zeros((g.shape[0], *in_core), g), *params)

    return BatchedLinearLin("avgpool", tuple(x.shape), tuple(call.out.shape), core, fwd, bwd)


@register(aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d)
def adaptive_avg_pool_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x, size = call.args[0], call.args[1]
    three = call.op.overloadpacket is aten._adaptive_avg_pool3d
    core = 4 if three else 3
    fwd_op = aten._adaptive_avg_pool3d if three else aten._adaptive_avg_pool2d
    bwd_op = aten._adaptive_avg_pool3d_backward if three else aten._adaptive_avg_pool2d_backward
    in_core = tuple(x.shape[x.ndim - core:])

    def fwd(t: Tensor) -> Tensor:
        return fwd_op(t, size)

    def bwd(g: Tensor) -> Tensor:
        return bwd_op(g, _zeros((g.shape[0], *in_core), g))

    return BatchedLinearLin("avgpool", tuple(x.shape), tuple(call.out.shape), core, fwd, bwd)


_UPSAMPLE = {
    aten.upsample_bilinear2d: (aten.upsample_bilinear2d_backward, 2),
    aten.upsample_bicubic2d: (aten.upsample_bicubic2d_backward, 2),
    aten.upsample_linear1d: (aten.upsample_linear1d_backward, 1),
    aten.upsample_trilinear3d: (aten.upsample_trilinear3d_backward, 3),
}


@register(*_UPSAMPLE)
def upsample_rule(call: OpCall) -> Lin:
    """Bilinear / bicubic / linear / trilinear interpolation (``F.interpolate``)."""
    call.only_active(0)
    x, out = call.args[0], call.out
    bwd_op, nd = _UPSAMPLE[call.op.overloadpacket]
    align = call.arg(2, "align_corners", False)
    if call.op._overloadname == "vec":
        factors = call.arg(3, "scale_factors", None)
        scales = list(factors) if factors is not None else [None] * nd
    else:
        names = [a.name for a in call.op._schema.arguments[3:3 + nd]]
        scales = [call.arg(3 + i, n, None) for i, n in enumerate(names)]
    out_size = list(out.shape[-nd:])
    core = nd + 1

    def fwd(t: Tensor) -> Tensor:
        return call.op(t, *call.args[1:], **call.kwargs)

    def bwd(g: Tensor) -> Tensor:
        in_size = [g.shape[0], *x.shape[x.ndim - core:]]
        return bwd_op(g, out_size, in_size, align, *scales)

    return BatchedLinearLin("upsample", tuple(x.shape), tuple(out.shape), core, fwd, bwd)
