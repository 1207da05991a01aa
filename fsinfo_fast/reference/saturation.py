r"""Autograd's float64 rounding that forward and reverse mode share: saturating activations.

``tanh``, ``sigmoid``, ``softmax`` and ``log_softmax`` compute their derivative from their own
rounded output (``1 - y^2``, ``y (1 - y)``, ``p (g - <p, g>)``). Near the output's limit the
derivative keeps few of its digits (``1 - tanh(z)^2`` carries a relative error of about
``u e^{2|z|} / 4``: 1e-12 at ``|z| = 5``; ``tanh(19.1)`` rounds to 1 and the derivative to 0),
and both modes of autograd read the same rounded output, so comparing them (the float64
forward-/reverse-mode check) does not see it. :func:`perturbed_vjp` recomputes a VJP with each
such op's derivative read from its output moved by one ulp (signs hashed from each element
and the seed; a softmax probability by ``1 + |log p|`` ulps, which its logit gap's rounding
carries; the forward values are unchanged): the change is what that rounding does to
``J^T u``, each op weighted as it enters the columns. A column computed as exactly 0 that
changes is not a structural zero (a saturated ``tanh``, not a crop).

The ops are caught where Python calls them (``torch.tanh``, ``nn.Tanh``, ``torch.sigmoid``,
``torch.special.expit``, ``F.softmax``, ``F.softmin``, ``Tensor.softmax``,
``torch.special.log_softmax``, ..., and the in-place ``tanh_``/``sigmoid_``, which a first
version missed: 3e7 half-widths off at ``|z|`` 12-19, an exact ``-inf`` claimed past 19).

``F.gelu`` (``nn.GELU``, the activation of most transformers) fuses a cancellation: its
derivative ``(1 + erf(x / sqrt 2)) / 2 + x phi(x)`` (``1 + tanh(.)`` for
``approximate="tanh"``) loses the first term below ``x`` of about -5 and all of it below -8,
identically in both modes (helper 98: the floorless FSInfo_diag 0.0116 nats/dim off the truth
at -9..-12, 1.4e11 half-widths). Under the reading it is computed without the cancellation
(``x erfc(-x / sqrt 2) / 2``; ``x sigmoid(2 v)`` for the tanh form, its sigmoid a caught op),
so the change of the VJP is the fused op's own error there.

Not caught: the softmax inside ``F.scaled_dot_product_attention`` or
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``; where it saturates, its two
modes cancel differently and the forward-/reverse-mode check flags it: no miss in 96 fuzzed
attention layers, helper 98), other fused ops, and a softmax that casts (``dtype=`` other than
its input's).

Example:
    >>> import torch
    >>> f = lambda x: torch.tanh(x + 18.0)  # 1 - tanh^2 ~ 9e-16: one digit in float64
    >>> x = torch.zeros(1, 3, dtype=torch.float64)
    >>> u = torch.ones(1, 1, 3, dtype=torch.float64)
    >>> diff, ops = perturbed_vjp(f, x, u, seed=0)
    >>> ops, bool(diff.abs().max() > 1e-17)
    (1, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["perturbed_vjp"]

EPS64 = torch.finfo(torch.float64).eps

_OPS = {
    torch.tanh: "tanh", torch.Tensor.tanh: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.special.expit: "sigmoid",
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch.special.softmax: "softmax", F.softmin: "softmin",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    torch.Tensor.log_softmax: "log_softmax", torch.special.log_softmax: "log_softmax",
}


_STACKLEVEL = (F.softmax, F.softmin, F.log_softmax)

#: An odd 63-bit constant (Fibonacci hashing) mixing an element's bits into its sign.
_MIX = 0x1E3779B97F4A7C15

_INPLACE = {torch.Tensor.tanh_: "tanh", torch.tanh_: "tanh",
            torch.Tensor.sigmoid_: "sigmoid", torch.sigmoid_: "sigmoid"}

#: ``sqrt(2 / pi)`` and the cubic's coefficient of ``F.gelu(approximate="tanh")`` (ATen's).
_GELU_BETA, _GELU_KAPPA = math.sqrt(2.0 / math.pi), 0.044715


def _gelu(x: Tensor, approximate: str) -> Tensor:
    """``F.gelu`` without the cancellation of its lower tail (``1 + erf``, ``1 + tanh``):
    ``x Phi(x) = x erfc(-x / sqrt 2) / 2``, and ``x (1 + tanh v) / 2 = x sigmoid(2 v)``."""
    if approximate == "tanh":
        return x * torch.sigmoid(2 * _GELU_BETA * (x + _GELU_KAPPA * x * x * x))
    return x * (0.5 * torch.special.erfc(-x * math.sqrt(0.5)))


class _Perturbed(torch.autograd.Function):
    """The op's value, and a backward that reads its derivative from ``y (1 + u r)``."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, dim: int | None, r: Tensor) -> Tensor:
        if kind == "tanh":
            y = torch.tanh(x)
        elif kind == "sigmoid":
            y = torch.sigmoid(x)
        elif kind == "softmax":
            y = torch.softmax(x, dim)
        elif kind == "softmin":
            y = torch.softmax(-x, dim)
        else:
            y = torch.log_softmax(x, dim)
        ctx.save_for_backward(y, r)
        ctx.kind, ctx.dim = kind, dim
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        y, r = ctx.saved_tensors
        kind, dim = ctx.kind, ctx.dim
        # one ulp of the output, up or down (y (1 + u) rounds back to y: a first version
        # moved only the elements drawn -1, helper 96)
        yp = torch.where(r > 0, torch.nextafter(y, torch.full_like(y, math.inf)),
                         torch.nextafter(y, torch.full_like(y, -math.inf)))
        if kind == "tanh":
            grad = g * (1 - yp * yp)
        elif kind == "sigmoid":
            grad = g * yp * (1 - yp)
        elif kind in ("softmax", "softmin"):
            # (a probability far below the largest carries about |log p| u of its logit gap)
            p = yp * (1 + r * EPS64 * torch.log(y).abs().nan_to_num(posinf=0.0))
            grad = p * (g - (p * g).sum(dim, keepdim=True))
            if kind == "softmin":
                grad = -grad
        else:  # (log_softmax: the log-probability's ulp carries its |y| u into p)
            p = torch.exp(yp)
            grad = g - p * g.sum(dim, keepdim=True)
        return grad, None, None, None


class _Saturating(TorchFunctionMode):
    """Routes the saturating ops through :class:`_Perturbed` (a seeded generator draws each
    op's signs); ``count`` says how many it caught."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.salt = int(seed) * 0x5851F42D4C957F2D % (1 << 62)
        self.count = 0

    def _signs(self, x: Tensor) -> Tensor:
        """Each element's sign from its own bits and the seed (a hash, no random draw): the
        same input element gets the same sign whatever its batch and its place there (a
        sample's reading does not move with its batch-mates)."""
        self.count += 1
        v = x.detach().to(torch.float64).contiguous().view(torch.int64)
        h = (v ^ (v >> 31) ^ self.salt) * _MIX
        return (((h >> 33) & 1) * 2 - 1).to(x.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        if func is F.gelu:
            approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            if approximate not in ("none", "tanh") or len(args) > 2:
                return func(*args, **kwargs)
            self.count += 1
            with self:  # (re-entered: the tanh form's sigmoid is read as well)
                return _gelu(x, approximate)
        if func in _INPLACE:
            if len(args) != 1 or kwargs:
                return func(*args, **kwargs)
            r = self._signs(x)
            return x.copy_(_Perturbed.apply(x.clone(), _INPLACE[func], None, r))
        kind = _OPS.get(func)
        if kind is None:
            return func(*args, **kwargs)
        dim = None
        if kind in ("softmax", "softmin", "log_softmax"):
            names = (("dim", "_stacklevel", "dtype") if func in _STACKLEVEL
                     else ("dim", "dtype"))  # (F.softmax's third is _stacklevel)
            rest = dict(zip(names, args[1:], strict=False))
            rest.update({k: v for k, v in kwargs.items() if k != "input"})
            dim = rest.pop("dim", None)
            rest.pop("_stacklevel", None)
            if rest.get("dtype") in (x.dtype, None):
                rest.pop("dtype", None)
            if dim is None or rest:
                return func(*args, **kwargs)  # (an implicit dim, a cast, out=: left alone)
        elif len(args) > 1 or set(kwargs) - {"input"}:
            return func(*args, **kwargs)
        return _Perturbed.apply(x, kind, dim, self._signs(x))


def perturbed_vjp(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor,
                  seed: int = 0) -> tuple[Tensor, int]:
    """How one unit roundoff in the saturating ops' outputs moves ``J^T u``.

    Args:
        fn: the encoder on flattened inputs (``[B, d] -> [B, m]``), in float64.
        x: ``[B, d]`` the batch.
        u: ``[B, c, m]`` cotangents.
        seed: seeds the perturbations' signs.

    Returns:
        ``(diff, ops)``: ``[B, c, d]`` the perturbed VJPs less the plain ones (plain autograd
        both), and how many saturating op calls were caught (0: ``diff`` is 0, no VJP ran).
    """
    xs = x.detach().clone().requires_grad_(True)
    diff = torch.zeros(u.shape[0], u.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        mode = _Saturating(seed)
        with mode:
            y1 = fn(xs)
        if mode.count == 0:
            return diff, 0
        y0 = fn(xs)
        for j in range(u.shape[1]):
            cot = u[:, j].reshape(y1.shape).to(y1.dtype)
            (g1,) = torch.autograd.grad(y1, xs, cot, retain_graph=True, allow_unused=True)
            (g0,) = torch.autograd.grad(y0, xs, cot, retain_graph=True, allow_unused=True)
            if g1 is not None and g0 is not None:
                diff[:, j] = g1 - g0
    return diff, mode.count
