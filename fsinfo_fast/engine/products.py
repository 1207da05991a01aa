r"""The linearised engine's products: run the primal once, keep each op's linearisation, push
``K`` tangents forward and ``K`` cotangents backward through it as often as the estimators ask.

For a batch of ``B`` samples:

1. **Capture** (:mod:`.capture`): the encoder as a core-ATen graph, cached per input shape.
2. **Linearise** (:meth:`LinearisedProducts._linearise`): the graph runs once on the real batch,
   node by node; every op whose inputs depend on ``x`` is handed to its rule
   (:mod:`.rules`), which keeps only the compact derivative state it needs. An op without a
   rule, or whose rule declines, runs through ``torch.func`` for that node only
   (:class:`~.rules.fallback.TorchFuncLin`), and is listed in :attr:`fallbacks` with the reason.
   A BatchNorm (eval) reading only a convolution's output is folded into the convolution.
   The primal output is checked against the encoder's own output.
3. **Products**: ``jvp(V)`` moves the ``K`` tangents of all ``B`` samples forward as one
   ``[K, B, ...]`` batch (a convolution or GEMM runs once for all of them); ``vjp(U)`` runs the
   transposes in reverse order. Probes are chunked to a memory budget; an out-of-memory error
   halves the chunk and retries, and names the sizes if even one probe does not fit.

The primal never runs again after step 2, however many products are asked for.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from .._progress import tick
from ..encoder import PreparedEncoder
from ..errors import InvalidInputError
from .capture import Captured, CaptureError, capture
from .ops import Ops, TorchOps
from .rules import CONSTANT_OPS, Decline, Lin, OpCall, find_rule
from .rules.fallback import TorchFuncLin
from .rules.linalg import ConvLin
from .rules.norm import ChannelScaleLin
from .torchfunc import default_memory_budget

__all__ = ["LinearisedProducts", "NONLINEAR_KINDS"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: node kinds that hold per-sample derivative state (used for the fallback share)
NONLINEAR_KINDS = ("gate", "scale", "maxpool", "norm", "softmax", "attention", "product",
                   "div", "torch.func")


def _is_float(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


def _has_complex(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return any(_has_complex(x) for x in v)
    return isinstance(v, Tensor) and v.is_complex()


def _has_float(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return any(_is_float(x) for x in v)
    return _is_float(v)


class _GetItem(Lin):
    kind = "getitem"

    def __init__(self, idx: int) -> None:
        self.idx = idx


class _FoldedBatchNorm(Lin):
    """A convolution followed by an eval BatchNorm, as one convolution (the BN's outputs)."""

    def __init__(self, conv: ConvLin, n_out: int) -> None:
        self.conv, self.n_out, self.kind = conv, n_out, conv.kind

    def jvp(self, ts):
        return [self.conv.jvp(ts)] + [None] * (self.n_out - 1)

    def vjp(self, u):
        return self.conv.vjp(u[0])


class _Step:
    """One active node: its linearisation and where its tangent inputs come from."""

    __slots__ = ("node", "lin", "inputs", "n_args", "list_lens", "multi")

    def __init__(self, node: fx.Node, lin: Lin, inputs: list[tuple[tuple, fx.Node]],
                 n_args: int, list_lens: dict[int, int], multi: bool) -> None:
        self.node, self.lin, self.inputs = node, lin, inputs
        self.n_args, self.list_lens, self.multi = n_args, list_lens, multi


class LinearisedProducts:
    """``jvp``/``vjp`` of a prepared encoder through its stored linearisation.

    Args:
        enc: the prepared encoder; ``enc.module`` is captured (the batch ``enc.x`` is the
            linearisation point).
        ops: the fused-op implementation (default :class:`~fsinfo_fast.engine.ops.TorchOps`).
        memory_budget: bytes one chunk of probes may use (default: a quarter of free memory).
        chunk_size: probes per chunk (overrides the budget).
        scale_dtype: storage dtype of activation derivatives (``None``: the working dtype).
        backend: the name reported in results (``"engine"``, ``"cpp"``, ...).

    Attributes:
        batch, d, m, dtype, device: as in the ``Products`` protocol.
        jvp_passes, vjp_passes: products computed so far, per sample.
        ops: the op implementation used (estimators may use its fused reductions too).
        node_kinds: ``{node name: kind}`` of every linearised node (``"torch.func"`` marks a
            per-node fallback).
        fallbacks: one ``{"node", "op", "reason"}`` dict per node that runs through
            ``torch.func``.
        info: what the metrics record in ``result.info`` (capture, node count, fallbacks).

    Raises:
        CaptureError: the encoder cannot be captured, or its captured primal does not reproduce
            the encoder's output (:func:`fsinfo_fast.engine.make_products` turns this into a
            :class:`~fsinfo_fast.errors.BackendUnavailableError` for an explicit backend and a
            recorded fallback under ``auto``).
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
        self._options = {"memory_budget": memory_budget, "chunk_size": chunk_size,
                         "scale_dtype": scale_dtype, "backend": backend}
        module = getattr(enc, "module", None)
        if module is None:
            raise CaptureError("the prepared encoder carries no module to capture")
        self.root = module
        x = self.x.reshape(self.batch, *enc.in_shape)
        self.captured = capture(module, x)
        with torch.no_grad():
            self._linearise(self.captured, x)
        budget = memory_budget if memory_budget is not None else default_memory_budget(
            self.device)
        # live tangents: about two activations per probe (plus transients), like a forward pass
        per_probe = self.batch * 3 * max(enc.saved_bytes, 1)
        self.chunk_size = chunk_size or max(1, int(budget // per_probe))
        self.jvp_passes = 0
        self.vjp_passes = 0

    # -- linearisation --------------------------------------------------------------------------
    def _inputs_of(self, cap: Captured, x: Tensor) -> list[Any]:
        vals: list[Any] = []
        for name in cap.inputs:
            if name is None:
                vals.append(x)
                continue
            try:
                vals.append(self.root.get_parameter(name))
            except AttributeError:
                vals.append(self.root.get_buffer(name))
        return vals

    def _linearise(self, cap: Captured, x: Tensor) -> None:
        env: dict[fx.Node, Any] = {}
        active: set[fx.Node] = set()
        steps: list[_Step] = []
        self.fallbacks: list[dict[str, str]] = []
        self.cross_check_note: str | None = None  # why the check against autograd was skipped
        self._n_out: dict[fx.Node, int] = {}
        feed = iter(self._inputs_of(cap, x))
        order = {n: i for i, n in enumerate(cap.graph.nodes)}
        # primal values are dropped after their last use (rules keep what they need)
        last_use: dict[int, list[fx.Node]] = {}
        for n in cap.graph.nodes:
            if n.users and n.op != "output":
                end = max(order[u] for u in n.users)
                last_use.setdefault(end, []).append(n)
        self._input: fx.Node | None = None
        output: fx.Node | None = None
        for i_node, node in enumerate(cap.graph.nodes):
            for dead in last_use.get(i_node - 1, ()):
                if dead is not output and dead.op != "placeholder":
                    env.pop(dead, None)
            if node.op == "placeholder":
                env[node] = next(feed)
                if self._input is None:
                    self._input = node
                    active.add(node)
                continue
            if node.op == "get_attr":
                obj: Any = cap.gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                env[node] = obj
                continue
            if node.op == "output":
                out = node.args[0]
                if isinstance(out, (tuple, list)):
                    if len(out) != 1:
                        raise CaptureError(f"the captured graph has {len(out)} outputs")
                    out = out[0]
                if not isinstance(out, fx.Node) or out not in active:
                    raise CaptureError("the captured output does not depend on the input")
                output = out
                continue
            if node.op != "call_function":
                raise CaptureError(f"unexpected graph node {node.op} {node.target}")
            target = node.target
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if target is operator.getitem:
                value = args[0][args[1]]
                env[node] = value
                src = node.args[0]
                if src in active and _is_float(value):
                    active.add(node)
                    steps.append(_Step(node, _GetItem(int(args[1])), [((0,), src)], 1, {},
                                       False))
                continue
            schema = getattr(target, "_schema", None)
            if schema is not None and schema.is_mutable:
                target = self._out_of_place(node, target, order)
            value = self._replay(node, target, args, kwargs)
            env[node] = value
            if isinstance(value, (tuple, list)):
                self._n_out[node] = len(value)
            if getattr(target, "overloadpacket", None) in CONSTANT_OPS:
                continue  # no derivative flows through
            if not _has_float(value):
                if _has_complex(value) and self._active_inputs(node, active)[0]:
                    # the rules are real-valued: skipping the node dropped its derivative
                    # (an FFT feature came back with a zero Jacobian, unflagged)
                    raise CaptureError(
                        f"node {node.name} ({target}) computes a complex-valued tensor from the "
                        "input; the engine's rules are real-valued (backend='torch' "
                        "differentiates complex intermediates)")
                continue  # integer or boolean: no derivative flows through
            inputs, act, kw_active, list_lens = self._active_inputs(node, active)
            if not inputs:
                continue
            call = OpCall(op=target, args=tuple(args), kwargs=dict(kwargs), out=value,
                          active=act, ops=self.ops, scale_dtype=self.scale_dtype,
                          kw_active=frozenset(kw_active))
            lin = self._rule(node, call, inputs)
            active.add(node)
            steps.append(_Step(node, lin, inputs, len(args), list_lens,
                               isinstance(value, (tuple, list))))
        if output is None:
            raise CaptureError("the captured graph has no output")
        self._output = output
        y = env[output]
        b = self.batch
        if not isinstance(y, Tensor) or y.shape[0] != b:
            raise CaptureError("the captured output is not a batch tensor")
        tol = 1e-4 if y.dtype != torch.float64 else 1e-9
        ref = self.enc.y
        err = float((y.reshape(b, -1) - ref).abs().max())
        if not err <= tol * (float(ref.abs().max()) + 1e-30) + tol:
            raise CaptureError(f"the captured primal differs from the encoder's output by "
                               f"{err:.3g}")
        self._steps = self._fold_batchnorm(steps, output)
        self._plan()
        self.node_kinds = {s.node.name: s.lin.kind for s in self._steps
                           if not isinstance(s.lin, _GetItem)}

    @staticmethod
    def _replay(node: fx.Node, target: Any, args: Any, kwargs: dict) -> Any:
        """One node of the captured graph on the real batch; a failure (the capture recorded
        something the real tensors do not fit, e.g. a ``view`` of a layout the real op does
        not produce) raised as :class:`CaptureError` naming the node."""
        try:
            return target(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001  (any op's error)
            msg = str(err).splitlines()[0][:300] if str(err) else ""
            raise CaptureError(f"replaying the captured graph failed at node {node.name} "
                               f"({target}): {type(err).__name__}: {msg}") from err

    @staticmethod
    def _out_of_place(node: fx.Node, op: Any, order: dict) -> Any:
        """The functional twin of an in-place op left by a decomposition (``add_`` on a fresh
        temporary); refused where the mutated value is read again later."""
        base = op._schema.name.split("::")[-1]
        twin = getattr(getattr(aten, base[:-1], None), op._overloadname, None) \
            if base.endswith("_") else None
        src = node.args[0] if node.args else None
        if twin is None or not isinstance(src, fx.Node):
            raise CaptureError(f"in-place op {op} in the captured graph")
        later = [u for u in src.users if u is not node and order[u] > order[node]]
        if later:
            raise CaptureError(f"in-place op {op} mutates {src.name}, which "
                               f"{later[0].name} reads afterwards")
        return twin

    @staticmethod
    def _active_inputs(node: fx.Node, active: set) -> tuple[list, tuple, list, dict]:
        inputs: list[tuple[tuple, fx.Node]] = []
        act: list[Any] = []
        list_lens: dict[int, int] = {}
        for i, a in enumerate(node.args):
            if isinstance(a, (list, tuple)):
                flags = []
                for j, e in enumerate(a):
                    on = isinstance(e, fx.Node) and e in active
                    flags.append(on)
                    if on:
                        inputs.append(((i, j), e))
                act.append(tuple(flags))
                list_lens[i] = len(a)
            else:
                on = isinstance(a, fx.Node) and a in active
                act.append(on)
                if on:
                    inputs.append(((i,), a))
        kw_active = []
        for k, a in node.kwargs.items():
            if isinstance(a, fx.Node) and a in active:
                inputs.append(((k,), a))
                kw_active.append(k)
        return inputs, tuple(act), kw_active, list_lens

    def _rule(self, node: fx.Node, call: OpCall, inputs: list) -> Lin:
        """The node's linearisation: its rule's, ``torch.func`` where the rule declines. A rule
        that fails otherwise (an argument layout it did not foresee) is raised as
        :class:`CaptureError` naming the node, as a replay failure is: ``auto`` then runs the
        encoder through ``torch.func`` and records why, an explicit engine backend says which
        node (a raw ``IndexError`` from inside a rule said neither)."""
        rule = find_rule(call.op)
        try:
            if rule is None:
                raise Decline(f"no rule for {call.op}")
            return rule(call)
        except Decline as why:
            reason = str(why)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001  (a rule's own bug)
            msg = str(err).splitlines()[0][:300] if str(err) else ""
            raise CaptureError(f"the engine's rule for node {node.name} ({call.op}) failed: "
                               f"{type(err).__name__}: {msg}") from err
        self.fallbacks.append({"node": node.name, "op": str(call.op), "reason": reason})
        log.debug("engine: node %s (%s) runs through torch.func: %s", node.name, call.op, reason)
        return TorchFuncLin(call.op, call.args, call.kwargs, [p for p, _ in inputs], call.out)

    @staticmethod
    def _fold_batchnorm(steps: list[_Step], output: fx.Node) -> list[_Step]:
        """Fold an eval BatchNorm into the convolution feeding only it (one pass less)."""
        by_node = {s.node: s for s in steps}
        drop: set[fx.Node] = set()
        for s in steps:
            if not isinstance(s.lin, ChannelScaleLin) or len(s.inputs) != 1:
                continue
            src = s.inputs[0][1]
            conv = by_node.get(src)
            if conv is None or not isinstance(conv.lin, ConvLin) or src is output \
                    or len(src.users) != 1:
                continue
            folded = conv.lin.folded(s.lin.channel_scale)
            if folded is None:
                continue
            s.lin = _FoldedBatchNorm(folded, s.lin.n_out)
            s.inputs, s.n_args, s.list_lens = conv.inputs, conv.n_args, conv.list_lens
            drop.add(src)
        return [s for s in steps if s.node not in drop]

    def _plan(self) -> None:
        """Last use of every tangent (freed early in ``jvp``)."""
        last: dict[fx.Node, int] = {}
        for i, s in enumerate(self._steps):
            for _, src in s.inputs:
                last[src] = i
        self._last_use: dict[int, list[fx.Node]] = {}
        for src, i in last.items():
            if src is not self._output:
                self._last_use.setdefault(i, []).append(src)

    def select(self, idx: Tensor) -> LinearisedProducts:
        """The products of the samples ``idx`` (``[n]`` int64) of this batch: the encoder
        linearised again at those samples alone (its capture is cached per input shape), with
        the same ops and options."""
        return LinearisedProducts(self.enc.select(idx), ops=self.ops, **self._options)

    # -- reports --------------------------------------------------------------------------------
    @property
    def fallback_share(self) -> float:
        """Share of the nodes with per-sample state that run through ``torch.func`` (0 to 1)."""
        kinds = [k for k in self.node_kinds.values() if k in NONLINEAR_KINDS]
        return kinds.count("torch.func") / len(kinds) if kinds else 0.0

    @property
    def info(self) -> dict[str, Any]:
        """What a metric records in ``result.info`` about how its products were computed."""
        out = {"engine_nodes": len(self.node_kinds),
               "engine_fallback_nodes": [dict(f) for f in self.fallbacks]}
        if self.cross_check_note:  # the check against autograd could not run
            out["cross_check"] = self.cross_check_note
        return out

    # -- products -------------------------------------------------------------------------------
    def _check(self, T: Tensor, n: int, name: str) -> Tensor:
        if T.ndim != 3 or T.shape[0] != self.batch or T.shape[2] != n:
            raise InvalidInputError(
                f"{name} expects [B={self.batch}, K, {n}], got {tuple(T.shape)}"
            )
        return T.to(self.dtype)

    def _chunks(self, T: Tensor, f: Callable[[Tensor], Tensor], what: str) -> Tensor:
        k = T.shape[1]
        outs = []
        i = 0
        while i < k:
            size = min(self.chunk_size, k - i)
            try:
                outs.append(f(T[:, i:i + size]))
            except torch.OutOfMemoryError as err:
                if size == 1:
                    raise torch.OutOfMemoryError(
                        f"engine {what}: one probe of {self.batch} sample(s) does not fit in "
                        f"memory (d = {self.d}, m = {self.m}, {self.dtype}); use a smaller batch "
                        "or a smaller memory_budget for other work") from err
                self.chunk_size = max(1, size // 2)
                log.debug("engine %s: out of memory at %d probes per chunk; retrying with %d",
                          what, size, self.chunk_size)
                continue
            i += size
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @torch.no_grad()
    def jvp(self, V: Tensor) -> Tensor:
        """``J_b v`` for every sample ``b`` and probe: ``[B, K, d] -> [B, K, m]``."""
        V = self._check(V, self.d, "jvp")
        out = self._chunks(V, self._jvp, "jvp")
        self.jvp_passes += V.shape[1]
        tick(V.shape[0] * V.shape[1])
        return out

    @torch.no_grad()
    def vjp(self, U: Tensor) -> Tensor:
        """``J_b^T u`` for every sample ``b`` and probe: ``[B, K, m] -> [B, K, d]``."""
        U = self._check(U, self.m, "vjp")
        out = self._chunks(U, self._vjp, "vjp")
        self.vjp_passes += U.shape[1]
        tick(U.shape[0] * U.shape[1])
        return out

    @staticmethod
    def _arrange(s: _Step, tans: list[tuple[tuple, Tensor | None]]) -> Any:
        if getattr(s.lin, "keyed", False):
            return {p: t for p, t in tans}
        ts: list[Any] = [None] * s.n_args
        for i, n in s.list_lens.items():
            ts[i] = [None] * n
        for p, t in tans:
            if len(p) == 2:
                ts[p[0]][p[1]] = t
            elif isinstance(p[0], int):
                ts[p[0]] = t
        return ts

    def _jvp(self, V: Tensor) -> Tensor:
        b, k = V.shape[:2]
        tan: dict[fx.Node, Any] = {
            self._input: V.transpose(0, 1).reshape(k, b, *self.enc.in_shape)}
        for i, s in enumerate(self._steps):
            if isinstance(s.lin, _GetItem):
                src = tan.get(s.inputs[0][1])
                tan[s.node] = None if src is None else src[s.lin.idx]
            else:
                tans = [(p, tan.get(src)) for p, src in s.inputs]
                if all(t is None for _, t in tans):
                    tan[s.node] = None
                else:
                    tan[s.node] = s.lin.jvp(self._arrange(s, tans))
            for dead in self._last_use.get(i, ()):
                tan.pop(dead, None)
        out = tan.get(self._output)
        if out is None:
            return V.new_zeros(b, k, self.m)
        return out.reshape(k, b, self.m).transpose(0, 1).contiguous()

    def _vjp(self, U: Tensor) -> Tensor:
        b, k = U.shape[:2]
        cot: dict[fx.Node, Any] = {
            self._output: U.transpose(0, 1).reshape(k, b, *self.enc.out_shape)}
        for s in reversed(self._steps):
            u = cot.pop(s.node, None)
            if u is None:
                continue
            if isinstance(u, list) and all(g is None for g in u):
                continue
            if isinstance(s.lin, _GetItem):
                src = s.inputs[0][1]
                acc = cot.setdefault(src, [None] * self._n_out[src])
                acc[s.lin.idx] = u if acc[s.lin.idx] is None else acc[s.lin.idx] + u
                continue
            res = s.lin.vjp(u)
            for p, src in s.inputs:
                if isinstance(res, dict):
                    g = res.get(p)
                elif len(p) == 2:
                    g = res[p[0]][p[1]] if res[p[0]] is not None else None
                elif isinstance(p[0], int):
                    g = res[p[0]] if p[0] < len(res) else None
                else:
                    g = None
                if g is None:
                    continue
                prev = cot.get(src)
                cot[src] = g if prev is None else prev + g
        g = cot.get(self._input)
        if g is None:
            return U.new_zeros(b, k, self.d)
        return g.reshape(k, b, self.d).transpose(0, 1).contiguous()
