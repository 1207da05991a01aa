r"""Structural linear ops: views, permutations, broadcasting, slicing, indexing, concatenation,
padding, ``roll``, ``flip``, ``repeat`` and the linear reductions ``sum`` / ``mean``.

Each is linear in its tensor input and holds no state: the tangent ``[K, *P]`` goes through the
same op with every primal dimension shifted by one (the probes stay in front), and the transpose
is the op's adjoint: a view back, the inverse permutation, a sum over broadcast dimensions, a
scatter into zeros (``slice_scatter``, ``select_scatter``, ``index_put`` with accumulation,
``index_add``), a split for a concatenation, a crop for a pad, the opposite roll.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Decline, Lin, OpCall, lift, register, unbroadcast

aten = torch.ops.aten


def _dim(d: int, ndim: int) -> int:
    """A primal dim (possibly negative) as a tangent dim."""
    return d % max(ndim, 1) + 1


class ReshapeLin(Lin):
    kind = "view"

    def __init__(self, in_shape: tuple, out_shape: tuple) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape

    def jvp(self, ts):
        t = ts[0]
        return t.reshape(t.shape[0], *self.out_shape)

    def vjp(self, u):
        return [u.reshape(u.shape[0], *self.in_shape)]


@register(aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze,
          aten.flatten, aten.unflatten, aten.alias, aten.view_as)
def reshape_rule(call: OpCall) -> Lin:
    call.only_active(0)
    return ReshapeLin(tuple(call.args[0].shape), tuple(call.out.shape))


class PermuteLin(Lin):
    kind = "view"

    def __init__(self, perm: list[int]) -> None:
        self.perm = [0] + [p + 1 for p in perm]
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        self.inv = [0] + [p + 1 for p in inv]

    def jvp(self, ts):
        return ts[0].permute(self.perm)

    def vjp(self, u):
        return [u.permute(self.inv)]


@register(aten.permute, aten.transpose, aten.t)
def permute_rule(call: OpCall) -> Lin:
    call.only_active(0)
    n = call.args[0].ndim
    if call.op.overloadpacket is aten.permute:
        perm = [d % n for d in call.args[1]]
    else:
        d0, d1 = (0, 1) if call.op.overloadpacket is aten.t else (call.args[1], call.args[2])
        perm = list(range(n))
        if n >= 2:
            perm[d0 % n], perm[d1 % n] = perm[d1 % n], perm[d0 % n]
    return PermuteLin(perm)


class ExpandLin(Lin):
    kind = "view"

    def __init__(self, in_shape: tuple, out_shape: tuple) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape

    def jvp(self, ts):
        t = lift(ts[0], len(self.out_shape))
        return t.expand(t.shape[0], *self.out_shape)

    def vjp(self, u):
        return [unbroadcast(u, self.in_shape)]


@register(aten.expand)
def expand_rule(call: OpCall) -> Lin:
    call.only_active(0)
    return ExpandLin(tuple(call.args[0].shape), tuple(call.out.shape))


class SliceLin(Lin):
    kind = "slice"

    def __init__(self, in_shape: tuple, dim: int, start, end, step: int) -> None:
        self.in_shape = in_shape
        self.dim, self.start, self.end, self.step = dim, start, end, step

    def jvp(self, ts):
        return aten.slice(ts[0], self.dim, self.start, self.end, self.step)

    def vjp(self, u):
        z = u.new_zeros(u.shape[0], *self.in_shape)
        return [aten.slice_scatter(z, u, self.dim, self.start, self.end, self.step)]


@register(aten.slice)
def slice_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    dim = call.arg(1, "dim", 0)
    start, end, step = call.arg(2, "start", None), call.arg(3, "end", None), call.arg(
        4, "step", 1)
    return SliceLin(tuple(x.shape), _dim(dim, x.ndim), start, end, step)


class SelectLin(Lin):
    kind = "slice"

    def __init__(self, in_shape: tuple, dim: int, index: int) -> None:
        self.in_shape, self.dim, self.index = in_shape, dim, index

    def jvp(self, ts):
        return ts[0].select(self.dim, self.index)

    def vjp(self, u):
        z = u.new_zeros(u.shape[0], *self.in_shape)
        return [aten.select_scatter(z, u, self.dim, self.index)]


@register(aten.select)
def select_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    return SelectLin(tuple(x.shape), _dim(call.args[1], x.ndim), call.args[2])


class IndexLin(Lin):
    """``x[indices]`` (advanced indexing with constant index tensors)."""

    kind = "index"

    def __init__(self, in_shape: tuple, out_shape: tuple, indices: list) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape
        self.indices = [None, *indices]
        pos = [i for i, v in enumerate(indices) if v is not None]
        # advanced indices separated by a slice move their result dims to the front
        self.front = bool(pos) and pos[-1] - pos[0] + 1 != len(pos)
        self.adv_ndim = len(out_shape) - (len(in_shape) - len(pos)) if self.front else 0

    def jvp(self, ts):
        y = aten.index(ts[0], self.indices)
        return y.movedim(self.adv_ndim, 0) if self.front else y

    def vjp(self, u):
        z = u.new_zeros(u.shape[0], *self.in_shape)
        vals = u.movedim(0, self.adv_ndim) if self.front else u
        return [aten.index_put(z, self.indices, vals, True)]


@register(aten.index.Tensor)
def index_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x, indices = call.args[0], list(call.args[1])
    if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices):
        raise Decline("boolean-mask indexing")
    return IndexLin(tuple(x.shape), tuple(call.out.shape), indices)


class IndexSelectLin(Lin):
    kind = "index"

    def __init__(self, in_shape: tuple, dim: int, index: Tensor) -> None:
        self.in_shape, self.dim, self.index = in_shape, dim, index

    def jvp(self, ts):
        return ts[0].index_select(self.dim, self.index)

    def vjp(self, u):
        z = u.new_zeros(u.shape[0], *self.in_shape)
        return [z.index_add(self.dim, self.index, u)]


@register(aten.index_select)
def index_select_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    return IndexSelectLin(tuple(x.shape), _dim(call.args[1], x.ndim), call.args[2])


def _legacy_empty(shape: tuple) -> bool:
    """A legacy empty tensor (shape ``(0,)``, e.g. ``torch.tensor([])``): ``torch.cat`` skips it
    whatever ``dim`` and the other tensors' rank (transformers' ``DynamicCache`` starts its keys
    as one and concatenates on ``dim=-2``), so the rule must skip it too: it has no size along a
    ``dim`` it does not have."""
    return len(shape) == 1 and shape[0] == 0


class CatLin(Lin):
    kind = "cat"

    def __init__(self, shapes: list[tuple], active: tuple, dim: int, primals: list) -> None:
        self.shapes, self.active, self.dim = shapes, active, dim
        self.keep = [i for i, s in enumerate(shapes) if not _legacy_empty(s)]
        self.sizes = [shapes[i][dim - 1] for i in self.keep]
        self.primals = primals  # for zero tangents' dtype / device

    def jvp(self, ts):
        parts = ts[0]
        k = next(t.shape[0] for t in parts if t is not None)
        full = []
        for i in self.keep:
            t = parts[i]
            if t is None:
                t = self.primals[i].new_zeros(()).expand(k, *self.shapes[i])
            full.append(t)
        return torch.cat(full, self.dim)

    def vjp(self, u):
        pieces = torch.split(u, self.sizes, self.dim)
        out: list = [None] * len(self.shapes)
        for i, p in zip(self.keep, pieces, strict=True):
            out[i] = p if self.active[i] else None
        return [out]


@register(aten.cat)
def cat_rule(call: OpCall) -> Lin:
    call.only_active(0)
    tensors = list(call.args[0])
    dim = call.arg(1, "dim", 0)
    ndim = call.out.ndim
    return CatLin([tuple(t.shape) for t in tensors], call.active[0], _dim(dim, ndim), tensors)


class SplitLin(Lin):
    kind = "split"

    def __init__(self, in_shape: tuple, sizes: list[int], dim: int, squeeze: bool) -> None:
        self.in_shape, self.sizes, self.dim, self.squeeze = in_shape, sizes, dim, squeeze

    def jvp(self, ts):
        t = ts[0]
        if self.squeeze:
            return list(t.unbind(self.dim))
        return list(torch.split(t, self.sizes, self.dim))

    def vjp(self, u):
        ref = next(g for g in u if g is not None)
        parts = []
        for g, s in zip(u, self.sizes, strict=True):
            if g is None:
                shape = list(self.in_shape)
                shape[self.dim - 1] = s
                if self.squeeze:
                    del shape[self.dim - 1]
                g = ref.new_zeros(()).expand(ref.shape[0], *shape)
            parts.append(g.unsqueeze(self.dim) if self.squeeze else g)
        return [torch.cat(parts, self.dim)]


@register(aten.split_with_sizes, aten.split, aten.unbind)
def split_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    dim = _dim(call.arg(2 if call.op.overloadpacket is not aten.unbind else 1, "dim", 0),
               x.ndim)
    sizes = [int(o.shape[dim - 1]) if call.op.overloadpacket is not aten.unbind else 1
             for o in call.out]
    return SplitLin(tuple(x.shape), sizes, dim, call.op.overloadpacket is aten.unbind)


class PadLin(Lin):
    kind = "pad"

    def __init__(self, pad: list[int]) -> None:
        self.pad = list(pad)

    def jvp(self, ts):
        return aten.constant_pad_nd(ts[0], self.pad, 0.0)

    def vjp(self, u):
        return [aten.constant_pad_nd(u, [-p for p in self.pad], 0.0)]


@register(aten.constant_pad_nd)
def pad_rule(call: OpCall) -> Lin:
    call.only_active(0)
    if len(call.args[1]) // 2 > call.args[0].ndim:
        raise Decline("padding more dimensions than the input has")
    return PadLin(call.args[1])


class RollLin(Lin):
    kind = "roll"

    def __init__(self, shifts: list[int], dims: list[int], shape: tuple) -> None:
        self.shifts, self.dims, self.shape = shifts, dims, shape

    def _roll(self, t: Tensor, sign: int) -> Tensor:
        shifts = [sign * s for s in self.shifts]
        if not self.dims:  # roll of the flattened tensor
            return t.reshape(t.shape[0], -1).roll(shifts, 1).reshape(t.shape)
        return t.roll(shifts, self.dims)

    def jvp(self, ts):
        return self._roll(ts[0], 1)

    def vjp(self, u):
        return [self._roll(u, -1)]


@register(aten.roll)
def roll_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    shifts = list(call.args[1]) if isinstance(call.args[1], (list, tuple)) else [call.args[1]]
    dims = call.arg(2, "dims", [])
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return RollLin(shifts, [_dim(d, x.ndim) for d in dims], tuple(x.shape))


class FlipLin(Lin):
    kind = "view"

    def __init__(self, dims: list[int]) -> None:
        self.dims = dims

    def jvp(self, ts):
        return ts[0].flip(self.dims)

    def vjp(self, u):
        return [u.flip(self.dims)]


@register(aten.flip)
def flip_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    return FlipLin([_dim(d, x.ndim) for d in call.args[1]])


class RepeatLin(Lin):
    kind = "repeat"

    def __init__(self, in_shape: tuple, repeats: list[int]) -> None:
        self.repeats = list(repeats)
        self.in_shape = in_shape
        self.padded = (1,) * (len(repeats) - len(in_shape)) + tuple(in_shape)

    def jvp(self, ts):
        t = ts[0]
        t = t.reshape(t.shape[0], *self.padded)
        return t.repeat(1, *self.repeats)

    def vjp(self, u):
        k = u.shape[0]
        inter = [k]
        for r, s in zip(self.repeats, self.padded, strict=True):
            inter += [r, s]
        g = u.reshape(inter).sum(dim=tuple(range(1, 2 * len(self.repeats), 2)))
        return [g.reshape(k, *self.in_shape)]


@register(aten.repeat)
def repeat_rule(call: OpCall) -> Lin:
    call.only_active(0)
    return RepeatLin(tuple(call.args[0].shape), call.args[1])


class ReduceLin(Lin):
    """``sum`` / ``mean`` over some dims."""

    kind = "reduce"

    def __init__(self, in_shape: tuple, dims: list[int], keepdim: bool, mean: bool,
                 out_dtype: torch.dtype, in_dtype: torch.dtype) -> None:
        self.in_shape, self.dims, self.keepdim = in_shape, sorted(dims), keepdim
        self.count = math.prod(in_shape[d - 1] for d in self.dims) if mean else 1
        self.mean, self.out_dtype, self.in_dtype = mean, out_dtype, in_dtype

    def jvp(self, ts):
        t = ts[0]
        if not self.dims:
            return t.to(self.out_dtype)
        y = t.sum(self.dims, keepdim=self.keepdim)
        return (y / self.count if self.mean else y).to(self.out_dtype)

    def vjp(self, u):
        g = u
        if not self.keepdim:
            for d in self.dims:
                g = g.unsqueeze(d)
        g = g.expand(u.shape[0], *self.in_shape).to(self.in_dtype)
        return [g / self.count if self.mean else g]


@register(aten.sum, aten.mean)
def reduce_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    dims = call.arg(1, "dim", None)
    if call.op._overloadname == "default" or dims is None or (
            isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.ndim))
        keepdim = False if call.op._overloadname == "default" else call.arg(2, "keepdim", False)
    else:
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        keepdim = call.arg(2, "keepdim", False)
    if not call.out.is_floating_point():
        raise Decline("integer reduction")
    return ReduceLin(tuple(x.shape), sorted({_dim(d, x.ndim) for d in dims}), keepdim,
                     call.op.overloadpacket is aten.mean, call.out.dtype, x.dtype)
