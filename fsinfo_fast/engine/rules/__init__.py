r"""The engine's per-op derivative rules, registered by ATen op (one small rule per op family).

A *rule* turns one recorded op call, evaluated at the primal point, into a :class:`Lin`: the
op's Jacobian at that point, applied to tangents (``jvp``) and to cotangents (``vjp``), holding
only the compact state it needs (a bit mask for ReLU, argmax indices for max-pool, softmax
statistics for attention, nothing for a convolution but its weight). Rules are registered the way
functorch keys its batching rules, by op (overload packet, or one overload)::

    @register(aten.tanh)
    def tanh_rule(call: OpCall) -> Lin:
        return ScaleLin(1 - call.out ** 2, call)

**Tangent layout.** The tangent (or cotangent) of a value of primal shape ``P`` is a tensor
``[K, *P]``: the ``K`` probes first, then the primal's own shape, batch dimension included. A
rule never needs to know which dimension is the batch: per-sample state of primal shape
broadcasts over the leading ``K``, a convolution or GEMM sees ``K * B`` rows at once, and
models that fold the batch into other dimensions (Swin's window partition) need nothing special.

**The contract of a rule.** ``rule(call) -> Lin`` where ``call`` (:class:`OpCall`) holds the op,
its primal arguments and output and which tensor arguments are *active* (depend on the encoder's
input). ``Lin.jvp(ts)`` gets ``ts`` aligned with ``call.args`` (the tangent of each active tensor
argument, ``None`` for inactive ones, a list for a list argument such as ``cat``'s) and returns
the tangent of the output (for a multi-output op a list, ``None`` for outputs without one).
``Lin.vjp(u)`` gets the output's cotangent in the same structure (``None`` parts are zero) and
returns cotangents aligned with ``call.args``. A rule that cannot handle a particular call
raises :class:`Decline` with the reason: the engine then runs that node through ``torch.func``
and reports it. Adding an op is adding one rule here and one test in ``tests/test_rules.py``.

Families: :mod:`.elementwise` (activations, arithmetic, casts), :mod:`.linalg` (convolution,
``mm``/``addmm``/``bmm``), :mod:`.norm` (batch / layer / group / RMS norm, variance, standard
deviation), :mod:`.attention` (softmax, log-softmax, scaled dot-product attention),
:mod:`.pooling` (max / average / adaptive pooling, upsampling), :mod:`.shape` (views, slicing,
indexing, ``cat``/``split``, ``pad``, ``roll``, reductions), :mod:`.fallback` (per-node
``torch.func`` for everything else).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ops import Ops

__all__ = [
    "CONSTANT_OPS",
    "RULES",
    "Decline",
    "Lin",
    "OpCall",
    "find_rule",
    "lift",
    "register",
    "unbroadcast",
]

aten = torch.ops.aten

#: op (``OpOverloadPacket`` or ``OpOverload``) -> rule
RULES: dict[Any, Callable[[OpCall], Lin]] = {}

#: Ops whose output does not depend differentiably on their inputs' values (it depends on their
#: shapes only, or is piecewise constant with derivative 0 as PyTorch defines it): their outputs
#: carry no tangent.
CONSTANT_OPS = (aten.full_like, aten.zeros_like, aten.ones_like, aten.empty_like,
                aten.rand_like, aten.randn_like, aten.new_zeros, aten.new_ones, aten.new_full,
                aten.new_empty, aten.sign, aten.floor, aten.ceil, aten.round, aten.trunc,
                aten.detach, aten.sym_size, aten.sym_numel, aten.sym_stride)


class Decline(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """Raised by a rule that cannot linearise this call; the message is the reported reason."""


@dataclass
class OpCall:
    """One recorded op call at the primal point.

    Attributes:
        op: the ATen op (``OpOverload``).
        args: positional primal arguments, as recorded (tensors, numbers, lists, ``None``).
        kwargs: keyword primal arguments.
        out: the primal output (a tensor, or a tuple for multi-output ops).
        active: per positional argument, whether its tangent can be nonzero (``bool``; a tuple
            of ``bool`` for a list argument).
        ops: the fused-op implementation (:class:`~fsinfo_fast.engine.ops.Ops`).
        scale_dtype: storage dtype for activation derivatives (``None``: the working dtype).
        kw_active: names of keyword arguments that carry a tangent (rules decline them unless
            they handle them).
    """

    op: Any
    args: tuple
    kwargs: dict
    out: Any
    active: tuple
    ops: Ops
    scale_dtype: torch.dtype | None = None
    kw_active: frozenset = field(default_factory=frozenset)

    def is_active(self, i: int) -> bool:
        """Whether positional argument ``i`` carries a tangent (any element, for a list)."""
        if i >= len(self.active):
            return False
        a = self.active[i]
        return any(a) if isinstance(a, tuple) else bool(a)

    def only_active(self, *positions: int) -> None:
        """Decline unless every active argument is among ``positions`` (keywords: never)."""
        if self.kw_active:
            raise Decline(f"keyword argument(s) {sorted(self.kw_active)} of {self.op} depend "
                          "on the input")
        for i in range(len(self.active)):
            if i not in positions and self.is_active(i):
                raise Decline(f"argument {i} of {self.op} depends on the input")

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i``, else keyword ``name``, else ``default``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)


class Lin:
    """The linearisation of one op at the primal point (see the module docstring)."""

    #: short name of the rule family, reported in ``node_kinds``
    kind = "?"

    def jvp(self, ts: list) -> Any:
        raise NotImplementedError

    def vjp(self, u: Any) -> list:
        raise NotImplementedError


def register(*ops: Any) -> Callable:
    """Decorator: register ``rule`` for each op (an overload packet or one overload)."""

    def deco(rule: Callable[[OpCall], Lin]) -> Callable[[OpCall], Lin]:
        for op in ops:
            RULES[op] = rule
        return rule

    return deco


_LOADED = False


def find_rule(op: Any) -> Callable[[OpCall], Lin] | None:
    """The rule registered for ``op`` (exact overload first, then its packet), or ``None``."""
    global _LOADED
    if not _LOADED:
        for mod in ("elementwise", "linalg", "norm", "attention", "pooling", "shape"):
            importlib.import_module(f"{__name__}.{mod}")
        _LOADED = True
    rule = RULES.get(op)
    if rule is None:
        rule = RULES.get(getattr(op, "overloadpacket", None))
    return rule


# -- helpers shared by the rules -----------------------------------------------------------------
def lift(t: Tensor, ndim: int) -> Tensor:
    """View a tangent ``[K, *P]`` as ``[K, 1, ..., 1, *P]`` with ``ndim`` primal dims, so that
    it broadcasts against primal tensors of ``ndim`` dimensions the way ``P`` does."""
    extra = ndim - (t.ndim - 1)
    if extra <= 0:
        return t
    return t.reshape(t.shape[0], *([1] * extra), *t.shape[1:])


def unbroadcast(u: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Sum a cotangent ``[K, *P_out]`` down to ``[K, *shape]`` (the adjoint of broadcasting a
    primal of ``shape`` to ``P_out``)."""
    shape = tuple(shape)
    lead = (u.ndim - 1) - len(shape)
    if lead > 0:
        u = u.sum(dim=tuple(range(1, 1 + lead)))
    dims = tuple(i + 1 for i, s in enumerate(shape) if s == 1 and u.shape[i + 1] != 1)
    if dims:
        u = u.sum(dim=dims, keepdim=True)
    return u


def zeros_like_tangent(k: int, primal: Tensor) -> Tensor:
    """A zero tangent ``[K, *primal.shape]`` (an expanded scalar: no memory)."""
    return primal.new_zeros(()).expand(k, *primal.shape)
