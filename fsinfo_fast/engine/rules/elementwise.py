r"""Elementwise rules: activations, arithmetic, ``where``, casts and copies.

An elementwise activation ``y = f(x)`` has the diagonal Jacobian ``diag(f'(x))``: the rule stores
``f'(x)`` once per sample (computed by autograd at the primal, so it is exactly the derivative
PyTorch defines, kinks included) and multiplies every tangent and cotangent by it
(``ops.scale_apply``). Where ``f'`` only takes the values 0 and 1 (ReLU, ReLU6 / Hardtanh,
``clamp``, ``threshold``) it is stored as a packed bit mask instead (``ops.gate_pack`` /
``ops.gate_apply``): 1 bit per element instead of 32 or 64.

Arithmetic: ``add``/``sub``/``mul``/``div`` by constants and by tensors, with broadcasting
(the transpose sums over broadcast dimensions); the product of two active tensors keeps both
factors (the product rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Decline, Lin, OpCall, lift, register, unbroadcast

aten = torch.ops.aten


def _apply_scale(call_ops, t: Tensor, s: Tensor) -> Tensor:
    """``t * s`` for a tangent ``t [K, *P]`` and a per-element scale ``s [*P]``."""
    if call_ops.name == "torch":
        return t * s.to(t.dtype)
    k, f = t.shape[0], s.numel()
    out = call_ops.scale_apply(t.reshape(1, k, f).contiguous(), s.reshape(1, f))
    return out.view(t.shape)


class ScaleLin(Lin):
    """``diag(s)``: the derivative values ``s`` of an elementwise op, shape of its input."""

    kind = "scale"

    def __init__(self, s: Tensor, call: OpCall) -> None:
        s = s.detach()
        if call.scale_dtype is not None:
            s = s.to(call.scale_dtype)
        self.s = s.contiguous()
        self.ops = call.ops

    def jvp(self, ts):
        return _apply_scale(self.ops, ts[0], self.s)

    def vjp(self, u):
        return [_apply_scale(self.ops, u, self.s)]


class GateLin(Lin):
    """``diag(mask)`` with a 0/1 mask stored as packed bits (``ops.gate_pack``)."""

    kind = "gate"

    def __init__(self, mask: Tensor, call: OpCall) -> None:
        self.shape = tuple(mask.shape)
        self.f = mask.numel()
        self.packed = call.ops.gate_pack(mask.reshape(1, self.f).contiguous())
        self.ops = call.ops

    def _apply(self, t: Tensor) -> Tensor:
        k = t.shape[0]
        out = self.ops.gate_apply(t.reshape(1, k, self.f).contiguous(), self.packed)
        return out.view(k, *self.shape)

    def jvp(self, ts):
        return self._apply(ts[0])

    def vjp(self, u):
        return [self._apply(u)]


def _derivative(call: OpCall) -> Tensor:
    """``f'(x)`` of an elementwise op in its first argument, by autograd at the primal."""
    x = call.args[0]
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        y = call.op(xr, *call.args[1:], **call.kwargs)
        (s,) = torch.autograd.grad(y, xr, torch.ones_like(y))
    return s


def _elementwise_shape_check(call: OpCall) -> None:
    x = call.args[0]
    if not isinstance(call.out, Tensor) or call.out.shape != x.shape:
        raise Decline(f"{call.op} changes the shape ({tuple(x.shape)} -> "
                      f"{tuple(getattr(call.out, 'shape', ()))})")


#: activations whose derivative takes only the values 0 and 1
GATES = (aten.relu, aten.hardtanh, aten.clamp, aten.threshold)
#: other elementwise functions of one tensor (extra arguments are constants)
SMOOTH = (aten.gelu, aten.silu, aten.hardswish, aten.hardsigmoid, aten.sigmoid, aten.tanh,
          aten.softplus, aten.elu, aten.leaky_relu, aten.mish, aten.exp, aten.exp2, aten.expm1,
          aten.log, aten.log1p, aten.log2, aten.sqrt, aten.rsqrt, aten.reciprocal, aten.sin,
          aten.cos, aten.erf, aten.atan, aten.abs, aten.pow, aten.celu, aten.selu)


@register(*GATES)
def gate_rule(call: OpCall) -> Lin:
    """ReLU, Hardtanh / ReLU6, ``clamp``, ``threshold``: a packed 0/1 mask."""
    call.only_active(0)
    _elementwise_shape_check(call)
    if call.op.overloadpacket is aten.relu:
        return GateLin(call.out > 0, call)
    s = _derivative(call)
    if not bool(((s == 0) | (s == 1)).all()):
        return ScaleLin(s, call)
    return GateLin(s != 0, call)


@register(*SMOOTH)
def scale_rule(call: OpCall) -> Lin:
    """Smooth (or piecewise smooth) elementwise activations: stored ``f'(x)``."""
    if call.op.overloadpacket is aten.pow and call.op is not aten.pow.Tensor_Scalar:
        raise Decline(f"{call.op}: only a constant exponent has a rule")
    call.only_active(0)
    _elementwise_shape_check(call)
    return ScaleLin(_derivative(call), call)


# -- arithmetic ----------------------------------------------------------------------------------
class SumLin(Lin):
    """``c0 a + c1 b`` for tensors ``a``, ``b`` broadcast to the output (either may be
    inactive)."""

    kind = "add"

    def __init__(self, coefs: list[float], shapes: list[tuple], active: list[bool],
                 out_shape: tuple) -> None:
        self.coefs, self.shapes, self.active = coefs, shapes, active
        self.out_shape = out_shape
        self.n = len(out_shape)

    def jvp(self, ts):
        out = None
        for t, c, on in zip(ts, self.coefs, self.active, strict=False):
            if not on or t is None:
                continue
            t = lift(t, self.n)
            t = t if c == 1 else t * c
            out = t if out is None else out + t
        if out is not None and tuple(out.shape[1:]) != self.out_shape:
            out = out.expand(out.shape[0], *self.out_shape)
        return out

    def vjp(self, u):
        return [unbroadcast(u if c == 1 else u * c, s) if on else None
                for c, s, on in zip(self.coefs, self.shapes, self.active, strict=False)]


def _shape(v) -> tuple:
    return tuple(v.shape) if isinstance(v, Tensor) else ()


@register(aten.add, aten.sub, aten.rsub)
def add_rule(call: OpCall) -> Lin:
    """``a + alpha b``, ``a - alpha b``, ``b - alpha a`` (``rsub``); scalars are constants."""
    call.only_active(0, 1)
    alpha = call.kwargs.get("alpha", call.args[2] if len(call.args) > 2 else 1)
    sign = {aten.add: (1, alpha), aten.sub: (1, -alpha), aten.rsub: (-alpha, 1)}[
        call.op.overloadpacket]
    a, b = call.args[0], call.args[1]
    return SumLin(list(sign), [_shape(a), _shape(b)],
                  [call.is_active(0), call.is_active(1) and isinstance(b, Tensor)],
                  tuple(call.out.shape))


class ConstMulLin(Lin):
    """``a * c`` for a constant ``c`` (number or tensor, broadcasting)."""

    kind = "mul"

    def __init__(self, c, a_shape: tuple, out_ndim: int) -> None:
        self.c, self.a_shape, self.n = c, a_shape, out_ndim

    def jvp(self, ts):
        return lift(ts[0], self.n) * self.c

    def vjp(self, u):
        return [unbroadcast(u * self.c, self.a_shape)]


class ProductLin(Lin):
    """``a * b`` with both factors active: ``t_a b + a t_b`` (stores both factors)."""

    kind = "product"

    def __init__(self, a: Tensor, b: Tensor, out_shape: tuple) -> None:
        self.a, self.b, self.out_shape = a, b, out_shape
        self.n = len(out_shape)

    def jvp(self, ts):
        ta, tb = ts[0], ts[1]
        out = None
        if ta is not None:
            out = lift(ta, self.n) * self.b
        if tb is not None:
            x = lift(tb, self.n) * self.a
            out = x if out is None else out + x
        if out is not None and tuple(out.shape[1:]) != self.out_shape:
            out = out.expand(out.shape[0], *self.out_shape)
        return out

    def vjp(self, u):
        return [unbroadcast(u * self.b, self.a.shape), unbroadcast(u * self.a, self.b.shape)]


class SwappedLin(Lin):
    """A two-argument rule whose active argument is the second one (``c * b``)."""

    def __init__(self, inner: Lin) -> None:
        self.inner, self.kind = inner, inner.kind

    def jvp(self, ts):
        return self.inner.jvp([ts[1]])

    def vjp(self, u):
        return [None, self.inner.vjp(u)[0]]


@register(aten.mul)
def mul_rule(call: OpCall) -> Lin:
    """``a * b``: by a constant (number or inactive tensor), or the product rule."""
    call.only_active(0, 1)
    a, b = call.args[0], call.args[1]
    n = call.out.ndim
    act_a, act_b = call.is_active(0), call.is_active(1) and isinstance(b, Tensor)
    if act_a and act_b:
        return ProductLin(a, b, tuple(call.out.shape))
    if act_a:
        return ConstMulLin(b, _shape(a), n)
    return SwappedLin(ConstMulLin(a, _shape(b), n))


class DivByActiveLin(Lin):
    """``a / b`` with ``b`` active: ``t_a / b - (a / b^2) t_b``."""

    kind = "div"

    def __init__(self, a, b: Tensor, out: Tensor, a_active: bool) -> None:
        self.b, self.q, self.a_active = b, out / b, a_active  # q = a / b^2
        self.a_shape = _shape(a)
        self.out_shape = tuple(out.shape)
        self.n = out.ndim

    def jvp(self, ts):
        out = -lift(ts[1], self.n) * self.q
        if self.a_active and ts[0] is not None:
            out = out + lift(ts[0], self.n) / self.b
        if tuple(out.shape[1:]) != self.out_shape:
            out = out.expand(out.shape[0], *self.out_shape)
        return out

    def vjp(self, u):
        ub = unbroadcast(-u * self.q, tuple(self.b.shape))
        ua = unbroadcast(u / self.b, self.a_shape) if self.a_active else None
        return [ua, ub]


@register(aten.div.Tensor, aten.div.Scalar)
def div_rule(call: OpCall) -> Lin:
    """``a / b``: by a constant, or with an active denominator."""
    call.only_active(0, 1)
    a, b = call.args[0], call.args[1]
    if call.is_active(1) and isinstance(b, Tensor):
        return DivByActiveLin(a, b, call.out, call.is_active(0))
    c = 1.0 / b if not isinstance(b, Tensor) else torch.reciprocal(b)
    return ConstMulLin(c, _shape(a), call.out.ndim)


class NegLin(Lin):
    kind = "neg"

    def jvp(self, ts):
        return -ts[0]

    def vjp(self, u):
        return [-u]


@register(aten.neg)
def neg_rule(call: OpCall) -> Lin:
    return NegLin()


class WhereLin(Lin):
    """``where(cond, a, b)`` with a constant condition: a mask on each branch."""

    kind = "where"

    def __init__(self, cond: Tensor, shapes: list[tuple], active: list[bool],
                 out_shape: tuple) -> None:
        self.cond, self.shapes, self.active, self.out_shape = cond, shapes, active, out_shape
        self.n = len(out_shape)

    def jvp(self, ts):
        k = next(t.shape[0] for t, on in zip(ts[1:], self.active, strict=False)
                 if on and t is not None)
        a, b = (lift(t, self.n) if on and t is not None else None
                for t, on in zip(ts[1:], self.active, strict=False))
        zero = (a if a is not None else b).new_zeros(())
        out = torch.where(self.cond, a if a is not None else zero, b if b is not None else zero)
        return out.expand(k, *self.out_shape)

    def vjp(self, u):
        zero = u.new_zeros(())
        ua = unbroadcast(torch.where(self.cond, u, zero), self.shapes[0]) if self.active[0] \
            else None
        ub = unbroadcast(torch.where(self.cond, zero, u), self.shapes[1]) if self.active[1] \
            else None
        return [None, ua, ub]


@register(aten.where.self)
def where_rule(call: OpCall) -> Lin:
    call.only_active(1, 2)
    cond, a, b = call.args[:3]
    return WhereLin(cond, [_shape(a), _shape(b)], [call.is_active(1), call.is_active(2)],
                    tuple(call.out.shape))


class IdentityLin(Lin):
    kind = "identity"

    def jvp(self, ts):
        return ts[0]

    def vjp(self, u):
        return [u]


@register(aten.clone, aten.alias, aten.lift_fresh_copy, aten.contiguous)
def identity_rule(call: OpCall) -> Lin:
    call.only_active(0)
    return IdentityLin()


class CastLin(Lin):
    """A dtype / device copy: tangents follow the output's dtype, cotangents the input's."""

    kind = "cast"

    def __init__(self, x: Tensor, out: Tensor) -> None:
        self.in_dtype, self.in_device = x.dtype, x.device
        self.out_dtype, self.out_device = out.dtype, out.device

    def jvp(self, ts):
        return ts[0].to(dtype=self.out_dtype, device=self.out_device)

    def vjp(self, u):
        return [u.to(dtype=self.in_dtype, device=self.in_device)]


@register(aten._to_copy, aten.to)
def cast_rule(call: OpCall) -> Lin:
    call.only_active(0)
    x = call.args[0]
    if not (isinstance(call.out, Tensor) and call.out.is_floating_point()
            and call.out.shape == x.shape):
        raise Decline(f"{call.op} to a non-floating dtype or another shape")
    if call.out.dtype == x.dtype and call.out.device == x.device:
        return IdentityLin()
    return CastLin(x, call.out)


@register(aten.dropout, aten.native_dropout)
def dropout_rule(call: OpCall) -> Lin:
    """Dropout in eval mode (``train=False`` or ``p=0``) is the identity."""
    call.only_active(0)
    p, train = call.arg(1, "p", 0.5), call.arg(2, "train", None)
    if train and p:
        raise Decline("dropout in training mode is random: call encoder.eval()")
    if call.op.overloadpacket is aten.native_dropout:
        return _FirstOutput(IdentityLin())
    return IdentityLin()


class _FirstOutput(Lin):
    """Wrap a one-output rule for an op returning ``(value, extras...)``."""

    def __init__(self, inner: Lin) -> None:
        self.inner, self.kind = inner, inner.kind

    def jvp(self, ts):
        return [self.inner.jvp(ts), None]

    def vjp(self, u):
        return self.inner.vjp(u[0])
