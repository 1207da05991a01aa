r"""The per-node fallback: an op without a rule (or whose rule declined) runs through
``torch.func`` for that node only.

The node's primal inputs are kept; ``jvp`` is ``torch.func.jvp`` of the op at them, vmapped over
the ``K`` probes (where the op has no forward-mode derivative, the transpose of its VJP: double
backward), and ``vjp`` is its ``torch.func.vjp`` pullback, built once and vmapped over the
probes. Correct for any differentiable op, but it keeps all the op's inputs and pays
``torch.func``'s overhead, so the engine reports every such node (``LinearisedProducts.fallbacks``,
``result.info``, ``fsinfo-fast info --model``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

from ..capture import OPAQUE_IMPLS
from ..torchfunc import retry_in_grad_mode
from . import Lin

__all__ = ["TorchFuncLin"]

log = logging.getLogger(__name__)

Path = tuple


def _is_float(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


class TorchFuncLin(Lin):
    """One op through ``torch.func`` (tangents and cotangents keyed by argument path).

    Args:
        op: the ATen op.
        args, kwargs: its primal arguments.
        paths: the active tensor arguments: ``(i,)`` positional, ``(i, j)`` element ``j`` of a
            list argument, ``(name,)`` a keyword argument.
        out: the primal output.
    """

    kind = "torch.func"
    keyed = True  # the engine passes {path: tangent} and expects {path: cotangent}

    def __init__(self, op: Any, args: tuple, kwargs: dict, paths: list[Path], out: Any) -> None:
        self.op, self.args, self.kwargs, self.paths = op, args, kwargs, paths
        # an opaque capture op (attention, RMS norm) runs as the PyTorch function it wraps
        self.fn = OPAQUE_IMPLS.get(op, op)
        self.primals = tuple(self._get(p) for p in paths)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        self.multi = isinstance(out, (tuple, list))
        self.n_out = len(outs)
        self.out_float = [i for i, v in enumerate(outs) if _is_float(v)]
        self.out_shapes = [tuple(outs[i].shape) for i in self.out_float]
        self._pullback = None
        self._route = 0
        self._grad_mode = False  # pullback in grad mode (retry_in_grad_mode)

    def _get(self, p: Path) -> Tensor:
        if isinstance(p[0], str):
            return self.kwargs[p[0]]
        v = self.args[p[0]]
        return v[p[1]] if len(p) > 1 else v

    def _f(self, *vals: Tensor) -> tuple[Tensor, ...]:
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for p, v in zip(self.paths, vals, strict=True):
            if isinstance(p[0], str):
                kwargs[p[0]] = v
            elif len(p) > 1:
                lst = list(args[p[0]])
                lst[p[1]] = v
                args[p[0]] = lst
            else:
                args[p[0]] = v
        out = self.fn(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return tuple(outs[i] for i in self.out_float)

    def _structure(self, outs) -> Any:
        if not self.multi:
            return outs[0]
        full: list = [None] * self.n_out
        for i, o in zip(self.out_float, outs, strict=True):
            full[i] = o
        return full

    def jvp(self, tdict: dict) -> Any:
        k = next(t.shape[0] for t in tdict.values() if t is not None)
        ts = [tdict.get(p) if tdict.get(p) is not None else
              p0.new_zeros(()).expand(k, *p0.shape) for p, p0 in zip(self.paths, self.primals,
                                                                       strict=True)]
        first: BaseException | None = None
        for route in range(self._route, 2):
            try:
                if route == 0:
                    outs = vmap(lambda *t: _jvp(self._f, self.primals, t)[1])(*ts)
                else:
                    outs = retry_in_grad_mode(
                        self, lambda: vmap(self._jvp_by_double_vjp)(*ts))
            except torch.OutOfMemoryError:
                raise  # never retried with the more memory-hungry route
            except (RuntimeError, NotImplementedError) as err:
                first = first or err
                if route == 1:
                    raise first from err
                log.debug("%s: forward-mode failed (%s); using double backward", self.op, err)
                continue
            self._route = route
            return self._structure(outs)
        raise AssertionError("unreachable")  # pragma: no cover

    def _jvp_by_double_vjp(self, *t: Tensor) -> tuple[Tensor, ...]:
        def pull(*u: Tensor):
            _, pb = _vjp(self._f, *self.primals)
            return pb(tuple(u))

        zeros = tuple(self.primals[0].new_zeros(s) for s in self.out_shapes)
        with torch.set_grad_enabled(self._grad_mode):  # as in vjp
            _, pb2 = _vjp(pull, *zeros)
        return pb2(tuple(t))

    def vjp(self, u: Any) -> dict:
        us = list(u) if self.multi else [u]
        ref = next(g for g in us if g is not None)
        k = ref.shape[0]
        cots = [us[i] if us[i] is not None else ref.new_zeros(()).expand(k, *s)
                for i, s in zip(self.out_float, self.out_shapes, strict=True)]
        def run():
            if self._pullback is None:
                with torch.set_grad_enabled(self._grad_mode):
                    _, self._pullback = _vjp(self._f, *self.primals)
            pb = self._pullback
            return vmap(lambda *c: pb(tuple(c)))(*cots)

        outs = retry_in_grad_mode(self, run, "_pullback")  # under the engine's no_grad
        return dict(zip(self.paths, outs, strict=True))
