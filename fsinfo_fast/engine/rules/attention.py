r"""Softmax, log-softmax and scaled dot-product attention.

Softmax ``y = softmax(x)`` along a dim has the symmetric Jacobian ``diag(y) - y y^T``:
``J t = y (t - <y, t>)``, the same formula for the transpose; the state is ``y`` (the output).
Log-softmax: ``J t = t - <p, t>``, ``J^T u = u - p sum(u)`` with ``p = exp(y)``.

Scaled dot-product attention ``O = P V``, ``P = softmax(S)``, ``S = scale Q K^T + mask`` (every
ATen variant: the composite op and the CPU flash, CUDA flash, memory-efficient and cuDNN
kernels), as one node. The state is the primal ``Q, K, V`` (inputs that were computed anyway) and
the softmax statistics ``lse = logsumexp(S)`` (one number per query): ``P = exp(S - lse)`` is
rebuilt once per product call and shared by all ``K`` probes, so nothing quadratic in the
sequence length is stored between calls. With the tangents ``dQ, dK, dV``:

.. math::
    dS = \text{scale}\,(dQ\,K^T + Q\,dK^T),\quad dP = P \odot (dS - \text{rowsum}(P \odot dS)),
    \quad dO = dP\,V + P\,dV

and for the cotangent ``\bar O``: ``\bar V = P^T \bar O``, ``\bar P = \bar O V^T``,
``\bar S = P \odot (\bar P - \text{rowsum}(P \odot \bar P))``, ``\bar Q = \text{scale}\,\bar S K``,
``\bar K = \text{scale}\,\bar S^T Q``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..capture import SDPA_OP
from . import Decline, Lin, OpCall, register
from .linalg import left_mul, right_mul

aten = torch.ops.aten


def softmax_project(t: Tensor, y: Tensor, dim: int) -> Tensor:
    """``y * (t - sum(y * t, dim))`` for tangents ``t [K, *P]`` and the softmax output
    ``y [*P]`` (``dim`` in tangent coordinates), with PyTorch's fused softmax-backward kernel."""
    return aten._softmax_backward_data(t, y.expand(t.shape), dim, y.dtype)


class SoftmaxLin(Lin):
    kind = "softmax"

    def __init__(self, y: Tensor, dim: int) -> None:
        self.y = y
        self.dim = dim % y.ndim + 1  # in tangent coordinates

    def _apply(self, t: Tensor) -> Tensor:
        return softmax_project(t, self.y, self.dim)

    def jvp(self, ts):
        return self._apply(ts[0])

    def vjp(self, u):
        return [self._apply(u)]


@register(aten._softmax)
def softmax_rule(call: OpCall) -> Lin:
    call.only_active(0)
    if call.out.dtype != call.args[0].dtype:
        raise Decline("softmax with a dtype change")
    return SoftmaxLin(call.out, call.args[1])


class LogSoftmaxLin(Lin):
    kind = "softmax"

    def __init__(self, y: Tensor, dim: int) -> None:
        self.p = torch.exp(y)
        self.dim = dim % y.ndim + 1

    def jvp(self, ts):
        t = ts[0]
        return t - (self.p * t).sum(self.dim, keepdim=True)

    def vjp(self, u):
        return [u - self.p * u.sum(self.dim, keepdim=True)]


@register(aten._log_softmax)
def log_softmax_rule(call: OpCall) -> Lin:
    call.only_active(0)
    if call.out.dtype != call.args[0].dtype:
        raise Decline("log-softmax with a dtype change")
    return LogSoftmaxLin(call.out, call.args[1])


def _bind(call: OpCall) -> dict:
    """The call's arguments by schema name (defaults filled in)."""
    out = {}
    for i, a in enumerate(call.op._schema.arguments):
        if i < len(call.args) and not a.kwarg_only:
            out[a.name] = call.args[i]
        elif a.name in call.kwargs:
            out[a.name] = call.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


class AttentionLin(Lin):
    """Scaled dot-product attention from ``Q, K, V``, the mask and ``lse`` (see module doc)."""

    kind = "attention"

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                 active: tuple[bool, bool, bool], n_out: int) -> None:
        self.q, self.k, self.v, self.mask, self.scale = q, k, v, mask, scale
        self.active = active
        self.n_out = n_out
        self.lse = torch.logsumexp(self._scores(), dim=-1, keepdim=True)

    def _scores(self) -> Tensor:
        s = torch.matmul(self.q, self.k.transpose(-1, -2)) * self.scale
        if self.mask is not None:
            s = s + self.mask
        return s

    def _probs(self) -> Tensor:
        return torch.exp(self._scores() - self.lse)

    def _wrap(self, o):
        return o if self.n_out == 1 else [o] + [None] * (self.n_out - 1)

    def jvp(self, ts):
        tq, tk, tv = ts[:3]
        P = self._probs()
        out = None
        dS = None
        if tq is not None and self.active[0]:
            dS = left_mul(tq, self.k.transpose(-1, -2))
        if tk is not None and self.active[1]:
            x = right_mul(self.q, tk.transpose(-1, -2))
            dS = x if dS is None else dS + x
        if dS is not None:
            dP = softmax_project(dS * self.scale, P, dS.ndim - 1)
            out = left_mul(dP, self.v)
        if tv is not None and self.active[2]:
            x = right_mul(P, tv)
            out = x if out is None else out + x
        return self._wrap(out)

    def vjp(self, u):
        g = u if self.n_out == 1 else u[0]
        P = self._probs()
        uq = uk = uv = None
        if self.active[2]:
            uv = right_mul(P.transpose(-1, -2), g)
        if self.active[0] or self.active[1]:
            dP = left_mul(g, self.v.transpose(-1, -2))
            dS = softmax_project(dP, P, dP.ndim - 1) * self.scale
            if self.active[0]:
                uq = left_mul(dS, self.k)
            if self.active[1]:
                uk = left_mul(dS.transpose(-1, -2), self.q)
        return [uq, uk, uv]


#: the attention ops (all variants: one rule)
SDPA_OPS = (SDPA_OP._opoverload, aten.scaled_dot_product_attention,
            aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_efficient_attention,
            aten._scaled_dot_product_cudnn_attention)


@register(*SDPA_OPS)
def attention_rule(call: OpCall) -> Lin:
    """Scaled dot-product attention with a constant mask, no dropout."""
    call.only_active(0, 1, 2)
    a = _bind(call)
    q, k, v = a["query"], a["key"], a["value"]
    mask = a.get("attn_mask", a.get("attn_bias"))
    if a.get("dropout_p", 0.0):
        raise Decline("attention dropout > 0 (training mode): call encoder.eval()")
    if a.get("enable_gqa"):
        raise Decline("grouped-query attention (enable_gqa=True)")
    # batch dims broadcast between Q, K, V: expand the constant ones, decline active ones
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError as err:
        raise Decline(f"attention batch shapes do not broadcast: {err}") from err
    qkv = []
    for i, t in enumerate((q, k, v)):
        if tuple(t.shape[:-2]) != tuple(batch):
            if call.is_active(i):
                raise Decline("an active attention input is broadcast over batch dims")
            t = t.expand(*batch, *t.shape[-2:]).contiguous()
        qkv.append(t)
    q, k, v = qkv
    scale = a.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    lq, lk = q.shape[-2], k.shape[-2]
    bias = None
    if a.get("is_causal"):
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(lq, lk, dtype=q.dtype, device=q.device).masked_fill(
            ~causal, float("-inf"))
    if isinstance(mask, Tensor):
        m = mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~m, float("-inf"))
        else:
            m = m.to(q.dtype)
        bias = m if bias is None else bias + m
    n_out = len(call.out) if isinstance(call.out, (tuple, list)) else 1
    return AttentionLin(q, k, v, bias, float(scale),
                        (call.is_active(0), call.is_active(1), call.is_active(2)), n_out)
