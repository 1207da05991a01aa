"""Cut a model in two and return its bottom part (the *encoder* of split inference).

``split(model, at)`` returns a module mapping the model's input ``x [B, ...]`` to the smashed data
at the split point: the output of the layer named by ``at``, layers up to and including it being
the encoder. ``at`` may be

- an ``int``: a paper split index into ``model.split_points`` (every zoo model has them; see
  :mod:`fsinfo_fast.models`). Negative indices count from the end. A plain ``nn.Sequential`` without
  ``split_points`` is indexed by its children (``at=k`` keeps children ``0..k``);
- a module path (``"layer2.1"``, ``"encoder.stages.1"``, as in ``model.named_modules()``): the cut
  is at the output of the **last** call of that module in ``forward`` (``occurrence=`` picks
  another call). Works on **every** ``nn.Module``, traceable or not;
- a torch.fx node name of the traced ``forward`` (``"add"``, ``"relu_1"``, ``"flatten"``; list
  them with ``torch.fx.symbolic_trace(model).graph``): the cut is at that node. Needs a model that
  torch.fx can trace. Module paths take precedence over node names.

Two routes, chosen deterministically and recorded on the encoder (``split_route``,
``split_route_reason``):

- ``"fx"`` (models torch.fx can trace, e.g. the zoo): ``forward`` is traced with a tracer that
  keeps the requested module as a single call, the graph is cut after that call (or the named
  node), dead code is removed; the encoder is a ``torch.fx.GraphModule`` holding only the layers
  it uses. The linearised engine (``backend="engine"``) works on these encoders. A top-level
  child of an ``nn.Sequential`` is cut by slicing instead (route ``"sequential"``).
- ``"hooks"`` (any model: Hugging Face ``transformers`` models, Python control flow,
  tuple/``ModelOutput`` returns): a :class:`HookEncoder` runs the **model itself** with a forward
  hook on the module; at a cut call given from the first (``occurrence >= 0``) the hook takes
  the module's output and ends the forward pass early (a private exception raised in the hook
  and caught in the encoder's ``forward``), so the layers after the cut are not computed. A cut
  call counted from the last (``occurrence < 0``, the default) is only known once the forward
  has finished (the number of calls may depend on the input's values), so the whole forward
  runs at every call and the model's buffers (BatchNorm statistics) and the RNG states are put
  back to where they were right after the cut call. Used when torch.fx cannot trace the
  model, when the module sits inside a module torch.fx keeps whole
  (``nn.TransformerEncoderLayer.linear1``), when ``select=`` or ``input_name=`` is given, or on
  request (``route="hooks"``). On traceable models both routes give identical outputs
  (tested); ``auto`` keeps ``fx`` there because the engine needs an fx-traceable encoder
  (torch.fx does not run forward hooks of the modules it keeps whole, so it cannot trace a hook
  encoder).

Either way the encoder **shares** the model's submodules, parameters and buffers (nothing is copied:
training the model changes the encoder), starts in the model's train/eval mode (the submodules
keep their own flags) and carries ``split_name`` (module path or node name) and ``split_index``
(paper index, or ``None`` when the cut is not one of ``model.split_points``).

Python control flow in ``forward`` is resolved at trace time on the fx route (e.g. ``if
self.training``: the branch of the model's mode when ``split`` was called) and at every call on
the hooks route. Where the encoder's part of the model traces differently in the other mode, the
fx encoder checks the mode of the modules it calls at each call and raises once it changed
(a :class:`ModeCheck` submodule: deepcopy and ``torch.save`` / ``torch.load`` keep it).
"""

from __future__ import annotations

import collections
import difflib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .encoder import uncompiled
from .errors import (
    EncoderError,
    FSInfoError,
    InvalidInputError,
    InvalidInputTypeError,
    SplitError,
)

__all__ = ["HookEncoder", "HookInsert", "ROUTES", "first_tensor", "insert", "split"]

_MAX_ERR = 300  # characters of an underlying tracing error quoted in messages

#: Values of ``route=``.
ROUTES = ("auto", "fx", "hooks")


def split(
    model: nn.Module,
    at: int | str,
    *,
    occurrence: int | None = None,
    select: Callable[[Any], Tensor] | None = None,
    input_name: str | None = None,
    route: str = "auto",
) -> nn.Module:
    """The bottom part of ``model`` up to and including the split point ``at``, as an encoder.

    Args:
        model: the full model (any ``nn.Module``; zoo models also accept paper split indices;
            a ``torch.compile``'d model is cut at its original module, the result eager).
        at: paper split index (``int``, into ``model.split_points``; for a plain ``nn.Sequential``
            the child index), module path (``str``) or torch.fx node name (``str``).
        occurrence: for a module path, which call of the module is the cut when ``forward``
            calls it more than once (a shared block): ``-1`` / ``None`` the last call (the
            default), ``0`` the first, ``k`` the ``k+1``-th, ``-2`` the one before the last.
            Negative values on the hooks route need the number of calls, which may depend on
            the input's values: every call of the encoder runs the model's whole forward and
            keeps the output of the right call; the model's buffers (BatchNorm running
            statistics) and the RNG states are then put back to their state right after that
            call, so the call changes them exactly as the encoder's part of the model would.
            ``occurrence >= 0`` stops the forward at the cut call.
        select: hooks route: ``select(module_output) -> Tensor`` picks the smashed data from the
            module's output (e.g. ``lambda out: out[1]`` for the second element of a tuple).
            Default: the output itself if it is a tensor, else its first tensor, depth first
            through tuples, lists and mappings (a ``transformers`` ``ModelOutput`` is a mapping
            in field order): :func:`first_tensor`, on both routes.
        input_name: hooks route: call the model as ``model(**{input_name: x})`` instead of
            ``model(x)`` (e.g. ``"pixel_values"``; the ``transformers`` vision models also take
            it positionally, so the default works for them).
        route: ``"auto"`` (``fx`` for a module path or node name of a model torch.fx traces,
            ``hooks`` for module paths otherwise, see the module docstring), ``"fx"`` or
            ``"hooks"`` (module paths only).

    Returns:
        The encoder: maps ``x [B, ...]`` (the model's input) to the smashed data at the split
        point, e.g. ``[B, 128, 16, 16]`` for ResNet-18 split 7 on 32x32 inputs, ``[B, 17, 32]``
        for the tokens after block 0 of a small ViT. A ``torch.fx.GraphModule`` (route ``fx``),
        an ``nn.Sequential`` (cutting a Sequential at a child) or a :class:`HookEncoder`, with
        attributes ``split_name: str``, ``split_index: int | None``, ``split_route: str`` and
        ``split_route_reason: str | None`` (why the hooks route was taken). Parameters are
        shared with ``model``; the mode (train/eval) is the model's.

    Raises:
        SplitError: unknown module path / node name (the message lists close matches and the
            split points), an ``int`` for a model without ``split_points``, an index out of range,
            a module that ``forward`` never calls (fx route: here; hooks route: at the encoder's
            first call, which runs the model), a node name of a model torch.fx cannot trace, or
            ``route="fx"`` where it cannot work.
        InvalidInputTypeError: ``model`` is not an ``nn.Module``, ``at`` not an ``int``/``str``,
            ``occurrence`` not an ``int``, ``select`` not callable or ``input_name`` not a str.
        InvalidInputError: unknown ``route``.

    Example:
        >>> import torch
        >>> from fsinfo_fast.models import resnet18
        >>> model = resnet18().eval()
        >>> enc = split(model, 7)                      # paper split 7 = after layer2.1
        >>> enc(torch.zeros(2, 3, 32, 32)).shape, enc.split_name, enc.split_index
        (torch.Size([2, 128, 16, 16]), 'layer2.1', 7)
        >>> enc.split_route
        'fx'
    """
    opts = _Options.make(occurrence, select, input_name, route, "split()")
    enc = _locate(model, at, "split()", opts).encoder()
    if uncompiled(model) is not model:  # results say the compiled model ran eagerly
        enc.split_from_compiled = True
    return enc


def insert(
    model: nn.Module,
    at: int | str,
    layer: nn.Module,
    *,
    occurrence: int | None = None,
    route: str = "auto",
) -> nn.Module:
    """The whole ``model`` with ``layer`` applied to the smashed data at the split point ``at``.

    ``insert(model, at, layer)(x)`` computes ``top(layer(bottom(x)))`` where ``bottom`` is
    ``split(model, at)``: e.g. a noise layer at the split (what :class:`fsinfo_fast.FSInfoGuard`
    does to the encoder's output) to measure the model's accuracy under the defense. ``at``,
    ``occurrence`` and ``route`` are resolved exactly as by :func:`split`; later uses of the split
    point's output (skip connections included) see ``layer``'s output. On the hooks route (any
    model) a forward hook replaces the module's output at the cut call by ``layer(output)``; for
    a tuple / list / mapping output the first tensor (:func:`first_tensor`) is replaced and the
    rest kept. The returned module is called like ``model`` (same arguments, same output type).
    Parameters are shared with ``model``. A call changes the model's buffers (BatchNorm running
    statistics in training mode) and the global RNG exactly as ``model``'s own forward (plus
    what ``layer`` draws): the hooks route's counting pass for a negative ``occurrence`` puts
    them back (see :class:`HookInsert`).

    Example:
        >>> import torch
        >>> from fsinfo_fast.models import vgg5
        >>> model = vgg5().eval()
        >>> x = torch.zeros(2, 3, 32, 32)
        >>> noisy = insert(model, 2, torch.nn.Identity())
        >>> torch.equal(noisy(x), model(x))
        True
    """
    if not isinstance(layer, nn.Module):
        raise InvalidInputTypeError(
            f"insert() needs an nn.Module layer, got {type(layer).__name__}"
        )
    from .guard import FSInfoGuard

    if isinstance(layer, FSInfoGuard):  # (it runs its encoder: the smashed data encoded again)
        raise InvalidInputTypeError(
            "insert() applies the layer to the smashed data, and an FSInfoGuard runs its encoder "
            "on its input: insert the noise it calibrated instead, "
            "insert(model, at, GaussianNoise(guard.sigma)) (from fsinfo_fast.guard import "
            "GaussianNoise; guard.sigma after guard.calibrate(...))")
    opts = _Options.make(occurrence, None, None, route, "insert()")
    return _locate(model, at, "insert()", opts).with_layer(layer)


# --------------------------------------------------------------------------------------------
# options and locating the cut


class _Options:
    """The keyword options of :func:`split` / :func:`insert`, validated."""

    def __init__(self, occurrence: int | None, select: Callable | None, input_name: str | None,
                 route: str) -> None:
        self.occurrence, self.select, self.input_name, self.route = (
            occurrence, select, input_name, route)

    @classmethod
    def make(cls, occurrence: object, select: object, input_name: object, route: object,
             who: str) -> _Options:
        if occurrence is not None and (isinstance(occurrence, bool)
                                       or not isinstance(occurrence, int)):
            raise InvalidInputTypeError(
                f"{who}: occurrence must be an int (0 = first call, -1 = last call) or None, got "
                f"{type(occurrence).__name__}"
            )
        if select is not None and not callable(select):
            raise InvalidInputTypeError(
                f"{who}: select must be a callable (module output -> Tensor), got "
                f"{type(select).__name__}"
            )
        if input_name is not None and not (isinstance(input_name, str)
                                           and input_name.isidentifier()):
            raise InvalidInputTypeError(
                f"{who}: input_name must be the name of a keyword argument of the model's "
                f"forward (a str such as 'pixel_values'), got {input_name!r}"
            )
        if route not in ROUTES:
            raise InvalidInputError(f"{who}: route must be one of {ROUTES}, got {route!r}")
        return cls(occurrence, select, input_name, str(route))

    @property
    def hooks_only(self) -> str | None:
        """Why only the hooks route can serve these options (``None``: any route)."""
        given = [n for n, v in (("select=", self.select), ("input_name=", self.input_name))
                 if v is not None]
        return " and ".join(given) + " given" if given else None

    @property
    def index(self) -> int:
        return -1 if self.occurrence is None else self.occurrence


def _locate(model: nn.Module, at: int | str, who: str, opts: _Options) -> _Cut:
    model = uncompiled(model)  # a torch.compile'd model: cut its original module
    if not isinstance(model, nn.Module):
        raise InvalidInputTypeError(
            f"{who} needs an nn.Module, got {type(model).__name__}"
        )
    if isinstance(at, bool) or not isinstance(at, (int, str)):
        raise InvalidInputTypeError(
            "split point `at` must be an int (paper split index), a module path or a torch.fx node "
            f"name (str); got {type(at).__name__}"
        )
    cls = type(model).__name__
    points = _split_points(model)
    plain = (opts.route == "auto" and opts.occurrence is None and opts.hooks_only is None
             and _is_plain_sequence(model))

    index: int | None = None
    if isinstance(at, int):
        if points is None:
            if _is_plain_sequence(model):
                names = list(model._modules)
                k = _normalise_index(at, len(names), cls, names)
                if plain:
                    return _Cut(model, names[k], k, k=k)
                return _cut_at_module(model, names[k], model._modules[names[k]], k, opts)
            raise SplitError(
                f"{cls} has no `split_points` attribute, so the integer split index {at} has no "
                "meaning; pass a module path or a torch.fx node name instead (top-level modules: "
                f"{_fmt_list(n for n, _ in model.named_children())}), or give the model a "
                "`split_points: list[str]` attribute of module paths"
            )
        index = _normalise_index(at, len(points), cls, points)
        path = points[index]
    else:
        path = at
        if points is not None and at in points:
            index = points.index(at)

    if path == "":
        raise SplitError(
            "the empty module path names the whole model, not a split point; pass a submodule "
            "path or a paper split index"
        )

    modules = dict(model.named_modules(remove_duplicate=False))
    if path in modules:
        if plain and path in model._modules:
            k = list(model._modules).index(path)
            return _Cut(model, path, index if index is not None else k, k=k)
        return _cut_at_module(model, path, modules[path], index, opts)
    if opts.route == "hooks" or opts.hooks_only or opts.occurrence is not None:
        what = ("route='hooks'" if opts.route == "hooks"
                else opts.hooks_only or "occurrence= given")
        raise SplitError(
            f"{path!r} is not a module path of {cls} ({what}: the split point must be a module "
            f"path, as in model.named_modules()).{_close_modules(model, path)}"
        )
    return _cut_at_node(model, path, points)


class _Cut:
    """Where a model is cut: after child ``k`` of a Sequential, after ``node`` of a graph, or at
    a call of the module ``path`` (hooks)."""

    def __init__(self, model: nn.Module, name: str, index: int | None, *, k: int | None = None,
                 graph: fx.Graph | None = None, node: fx.Node | None = None,
                 hooks: dict[str, Any] | None = None,
                 tracer: Callable[[], fx.Tracer] | None = None) -> None:
        self.model, self.name, self.index = model, name, index
        self.k, self.graph, self.node, self.hooks = k, graph, node, hooks
        self.tracer = tracer  # builds the tracer the graph came from (fx route)

    def encoder(self) -> nn.Module:
        if self.hooks is not None:
            return HookEncoder(self.model, **self.hooks, split_name=self.name,
                               split_index=self.index)
        if self.k is not None:
            return _slice_sequential(self.model, self.k, self.name, self.index)
        cut_name = None if self.node is None else self.node.name
        dependent = self.tracer is not None and _mode_dependent(self.model, self.graph,
                                                                 self.tracer, cut_name)
        gm = _build(self.model, self.graph, self.node)
        if dependent:
            _guard_mode(gm, self.model)
        return _tag(gm, self.name, self.index, "fx")

    def with_layer(self, layer: nn.Module) -> nn.Module:
        model = self.model
        if self.hooks is not None:
            h = dict(self.hooks)
            h.pop("select")
            h.pop("input_name")
            return HookInsert(model, layer=layer, **h, split_name=self.name,
                              split_index=self.index)
        if self.k is not None:
            items = list(model._modules.items())
            full = nn.Sequential(OrderedDict(
                [*items[: self.k + 1], ("split_layer", layer), *items[self.k + 1 :]]
            ))
            full.training = model.training
            return _tag(full, self.name, self.index, "sequential")
        graph = self.graph
        out = next(n for n in graph.nodes if n.op == "output")
        cut = self.node if self.node is not None else out.args[0]
        if not isinstance(cut, fx.Node):
            raise SplitError(f"the output of {type(model).__name__} is not a single tensor; "
                             "pass a split point inside the model")
        root: dict[str, object] = {}
        for n in graph.nodes:
            if n.op in ("call_module", "get_attr"):
                root[str(n.target)] = _get_attr(model, str(n.target))
        name = "split_layer"
        while name in root:
            name = "_" + name
        root[name] = layer
        with graph.inserting_after(cut):
            new = graph.call_module(name, (cut,))
        cut.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        gm = fx.GraphModule(root, graph, class_name=f"{type(model).__name__}WithSplitLayer")
        gm.graph.lint()
        gm.recompile()
        original = {id(m) for m in model.modules()} | {id(m) for m in layer.modules()}
        for m in gm.modules():
            if id(m) not in original:
                m.training = model.training
        return _tag(gm, self.name, self.index, "fx")


# --------------------------------------------------------------------------------------------
# the hooks route


class _StopForward(BaseException):
    """Raised in the cut module's forward hook to end the model's forward pass early.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that a model's own ``except Exception``
    clauses do not swallow it; it never leaves :class:`HookEncoder`'s ``forward``.
    """


def first_tensor(output: Any) -> Tensor:
    """The smashed data in a module's output: the output itself if it is a tensor, else its first
    tensor, depth first through tuples, lists and mappings (in their order; a ``transformers``
    ``ModelOutput`` is an ordered mapping of its non-``None`` fields).

    Raises:
        SplitError: the output holds no tensor.
    """
    path = _first_tensor_path(output)
    if path is None:
        raise SplitError(
            f"the module's output ({_describe(output)}) holds no tensor; pass select= to pick "
            "the smashed data from it"
        )
    return _get_path(output, path)


def _is_tensor_like(obj: Any) -> bool:
    return isinstance(obj, (Tensor, fx.Proxy))


def _first_tensor_path(obj: Any, depth: int = 0) -> tuple | None:
    if _is_tensor_like(obj):
        return ()
    if depth > 8:
        return None
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif isinstance(obj, (tuple, list)):
        items = list(enumerate(obj))
    else:
        return None
    for key, value in items:
        sub = _first_tensor_path(value, depth + 1)
        if sub is not None:
            return (key, *sub)
    return None


def _get_path(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _replace_path(obj: Any, path: tuple, value: Any) -> Any:
    """``obj`` with the element at ``path`` replaced (tuples and lists rebuilt; mappings, e.g. a
    ``ModelOutput``, updated in place: the module created them for this call)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    new = _replace_path(obj[key], rest, value)
    if isinstance(obj, Mapping):
        obj[key] = new
        return obj
    items = list(obj)
    items[key] = new
    if isinstance(obj, list):
        return items
    if hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*items)
    return type(obj)(items)


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{k}: {_describe(v)}" for k, v in list(obj.items())[:4])
        return f"{type(obj).__name__}({inner})"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(_describe(v) for v in list(obj)[:4])
        return f"{type(obj).__name__}({inner}{', ...' if len(obj) > 4 else ''})"
    return type(obj).__name__


def _signature(args: tuple, kwargs: dict, model: nn.Module) -> tuple | None:
    """Cache key of the number of calls: every tensor argument's shape without the batch
    dimension, dtype and device type, and the model's mode (``None``: do not cache)."""
    key: list[Any] = [model.training]
    try:
        for v in (*args, *(kwargs[k] for k in sorted(kwargs))):
            if isinstance(v, Tensor):
                key.append((tuple(int(s) for s in v.shape[1:]), v.dtype, v.device.type))
            elif isinstance(v, fx.Proxy):
                return None
            else:
                key.append(type(v).__name__)
        hash(tuple(key))
    except Exception:  # symbolic shapes, unhashable arguments: count every time
        return None
    return tuple(key)


class _State:
    """Every buffer of a module tree and the RNG states (CPU, and the given CUDA devices) at one
    moment, to put back after a pass whose effects must not persist: the hooks route runs parts
    of the model that a plain forward (or the encoder's part of it) would not run, and those must
    not update BatchNorm statistics or draw from the global RNG."""

    def __init__(self, module: nn.Module, cuda: list[torch.device]) -> None:
        with torch.no_grad():
            self.buffers = [(m, name, t, _version(t), t.clone())
                            for m in module.modules() for name, t in m._buffers.items()
                            if t is not None]
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda]

    def restore(self) -> None:
        """Put back the buffers and the RNG states. A buffer is written back where it was
        replaced or written to since (its version counter moved), and where its module is in
        training mode and its values changed: BatchNorm updates its running statistics inside
        the kernel, which does not move the counter. (Writing back every buffer of a module in
        training mode moved the counters of buffers no pass had touched, a ``position_ids``
        of a CLIP model with dropout 0: the encoder then read as changed, helper 114.)"""
        with torch.no_grad():
            for m, name, t, version, value in self.buffers:
                if m._buffers.get(name) is not t:
                    m._buffers[name] = t
                if (version is None or _version(t) != version
                        or (m.training and not _same_values(t, value))):
                    t.copy_(value)
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` hold the same values, a NaN matching a NaN (``torch.equal`` does not:
    a buffer holding NaN was written back after every pass, helper 116)."""
    if a.is_floating_point() or a.is_complex():
        return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return torch.equal(a, b)


def _version(t: Tensor) -> int | None:
    """The in-place write counter of ``t`` (``None`` where it has none: inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _cuda_devices(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.device]:
    """The CUDA devices of the model's tensors and the call's tensor arguments (whose RNG a
    forward may draw from)."""
    devs = {t.device for t in (*model.parameters(), *model.buffers(), *args, *kwargs.values())
            if isinstance(t, Tensor) and t.device.type == "cuda"}
    return sorted(devs, key=lambda d: -1 if d.index is None else d.index)


class _HookBase(nn.Module):
    """What :class:`HookEncoder` and :class:`HookInsert` share: the model, the module path, the
    call to cut and the per-signature call counts."""

    split_route = "hooks"

    def __init__(self, model: nn.Module, path: str, occurrence: int, reason: str | None,
                 hint: str, split_name: str, split_index: int | None) -> None:
        super().__init__()
        self.model = model
        self.path = path
        self.occurrence = int(occurrence)
        self.split_name = split_name
        self.split_index = split_index
        self.split_route_reason = reason
        self._hint = hint
        self._cut_call: dict[tuple, int] = {}  # signature -> 0-based index of the cut call
        self.training = model.training  # the submodules keep their own flags

    def extra_repr(self) -> str:
        return f"path={self.path!r}, occurrence={self.occurrence}"

    def _target(self) -> nn.Module:
        return self.model.get_submodule(self.path)

    def _never_called(self, seen: int, stop: int | None) -> SplitError:
        cls = type(self.model).__name__
        mod = type(self._target()).__name__
        if seen == 0:
            why = self._hint or (
                " It is unused, used other than by calling it (e.g. only its weights), or "
                "skipped on this input."
            )
            why += _container_hint(self._target(), self.path)
            if fx._symbolic_trace.is_fx_symbolic_tracing():
                why += (" (Under torch.fx symbolic tracing, forward hooks of modules that "
                        "torch.fx keeps whole do not run, so a hooks-route encoder cannot be "
                        "traced by torch.fx.)")
            return SplitError(
                f"module {self.path!r} ({mod}) was never called in the forward of {cls}.{why}"
            )
        if stop is not None and self.occurrence < 0:
            return SplitError(
                f"module {self.path!r} ({mod}) was called {seen} time(s) in the forward of {cls} "
                f"on this input, but {stop + 1} or more on the first input of the same shape: "
                "the number of calls depends on the input's values; pass occurrence=k >= 0"
            )
        want = stop + 1 if stop is not None else -self.occurrence
        return SplitError(
            f"module {self.path!r} ({mod}) was called {seen} time(s) in the forward of {cls}, "
            f"so occurrence={self.occurrence} names no call (it needs at least {want}); "
            f"valid: 0..{seen - 1} or -{seen}..-1"
        )


class HookEncoder(_HookBase):
    """The bottom part of any model, cut at a call of one of its modules by a forward hook.

    ``forward(x)`` runs ``model(x)`` (or ``model(**{input_name: x})``) with a forward hook on
    ``model.<path>``; at the cut call (``occurrence``) the hook takes ``select(output)`` (default
    :func:`first_tensor`) and raises a private exception that ends the forward pass, caught
    here: the layers after the cut are not computed. With a negative ``occurrence`` the
    cut call is only known at the end, so the whole forward runs and the outputs of the last
    ``|occurrence|`` calls are kept; the model's buffers and the RNG states (CPU and the CUDA
    devices of the model and ``x``) are then put back to their state right after the cut call:
    the layers after the cut leave no trace. Nothing persists between calls (the hook is
    registered for one call and removed), so the encoder works under ``torch.func`` transforms
    (``vmap``, ``jvp``, ``vjp``, ``jacrev``; the exception is raised and caught inside the
    transformed function), with ``torch.autograd``, deep-copies, pickles (with a picklable
    ``select``) and ``.to(dtype/device)`` (which converts the model: the encoder holds it as its
    submodule ``model``, so ``state_dict()`` keys are ``"model." + key``).

    Attributes:
        model: the full model (shared, not copied).
        path: module path of the cut.
        occurrence: which call of the module is the cut (``-1``: the last).
        select: picks the smashed data from the module's output (``None``: first tensor).
        input_name: keyword the model takes the input as (``None``: positional).
        split_name, split_index, split_route (``"hooks"``), split_route_reason: as for
            :func:`split`.

    Shapes: ``x [B, *input]`` -> the selected tensor, e.g. ``[B, C, H, W]`` or ``[B, T, D]``.
    Its dtype and device are the model's computation's (a ``transformers`` model casts
    ``pixel_values`` to its weights' dtype); ``x`` must be on the model's device.

    Notes:
        With a negative ``occurrence`` (the default) every call runs the whole forward pass
        (the number of the module's calls may depend on the input's values: counting it once per
        input shape gave an earlier call's output on inputs with more calls); tracing the
        encoder with ``make_fx`` records the whole model and the buffer restores (pass
        ``occurrence >= 0`` to stop at the cut). While a call runs, the hook sits on the shared
        module: do not run the same model in another thread at the same time.
        ``torch.fx.symbolic_trace`` cannot trace this encoder (torch.fx does not run forward
        hooks of the modules it keeps whole); ``make_fx`` can.
    """

    def __init__(self, model: nn.Module, path: str, *, occurrence: int = -1,
                 select: Callable[[Any], Tensor] | None = None, input_name: str | None = None,
                 reason: str | None = None, hint: str = "", split_name: str | None = None,
                 split_index: int | None = None) -> None:
        super().__init__(model, path, occurrence, reason, hint,
                         path if split_name is None else split_name, split_index)
        self.select = select
        self.input_name = input_name

    def run_after_cut(self, x: Tensor,
                      modules: list[tuple[str, nn.Module]]) -> tuple[set[str], str]:
        """The names among ``modules`` (``(name, submodule)`` pairs) that cannot change the
        encoder's output: a check pass of the model on ``x`` without gradients (its buffers
        and RNG states put back) sees them called only after the cut call returned (a negative
        ``occurrence``: the pass runs the whole forward, as the encoder does), or not before
        it (``occurrence >= 0``: the pass stops there, as the encoder does; the layers after it
        never run). A module whose calls the pass cannot see is never among them: inside a
        ``torch.compile``'d submodule (hooks added after compiling do not fire there) or in
        ``select`` (it runs in the encoder's own hook). Where the pass raises, none is, and
        the second element says why (``""`` otherwise)."""
        target = self._target()
        stop = self.occurrence if self.occurrence >= 0 else None
        done = [0]  # the cut module's calls returned so far
        first: dict[str, int] = {}
        hidden: set[int] = set()
        for m in self.model.modules():
            if type(m).__name__ == "OptimizedModule":
                hidden.update(id(k) for k in m.modules())
        if isinstance(self.select, nn.Module):
            hidden.update(id(k) for k in self.select.modules())

        def pre(name: str) -> Callable:
            def hook(module: nn.Module, inputs: Any) -> None:
                first.setdefault(name, done[0])
            return hook

        def count(module: nn.Module, inputs: Any, output: Any) -> None:
            done[0] += 1
            if stop is not None and done[0] > stop:
                raise _StopForward

        args, kwargs = ((), {self.input_name: x}) if self.input_name else ((x,), {})
        state = _State(self.model, _cuda_devices(self.model, args, kwargs))
        handles = [m.register_forward_pre_hook(pre(n)) for n, m in modules]
        handles.append(target.register_forward_hook(count))
        try:
            with torch.no_grad():
                self.model(*args, **kwargs)
        except _StopForward:
            pass
        except Exception as err:  # noqa: BLE001  (the encoder's own run reports it)
            return set(), f"the model's forward failed ({_error_text(err)})"
        finally:
            for h in handles:
                h.remove()
            state.restore()
        cut = stop if stop is not None else done[0] + self.occurrence
        if not 0 <= cut < done[0]:
            return set(), f"{self.path!r} was called {done[0]} time(s)"
        return {name for name, m in modules if id(m) not in hidden
                and (first[name] > cut if name in first else stop is not None)}, ""

    def _pick(self, output: Any) -> Tensor:
        value = first_tensor(output) if self.select is None else self.select(output)
        if not _is_tensor_like(value):
            raise SplitError(
                f"select= returned {type(value).__name__}, not a Tensor, for the output of "
                f"{self.path!r} ({_describe(output)})"
            )
        return value

    def forward(self, x: Tensor) -> Tensor:
        """The smashed data ``select(model.<path>(...))`` at the cut call, for input ``x``."""
        args, kwargs = ((), {self.input_name: x}) if self.input_name else ((x,), {})
        stop = self.occurrence if self.occurrence >= 0 else None
        seen = 0
        found: list[Tensor] = []
        # negative occurrence: the whole forward runs (the number of calls may depend on the
        # input's values); keep the last |occurrence| picks, cloned since later in-place ops of
        # the model may change them, each with the buffers and RNG states right after its call
        kept: collections.deque = collections.deque(maxlen=max(1, -self.occurrence))
        cuda = _cuda_devices(self.model, args, kwargs) if stop is None else []

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            nonlocal seen
            i = seen
            seen += 1
            if stop is None:
                kept.append((self._pick(output).clone(), _State(self.model, cuda)))
            elif i == stop:
                found.append(self._pick(output))
                raise _StopForward

        handle = self._target().register_forward_hook(hook)
        ran = False
        try:
            self.model(*args, **kwargs)
            ran = True
        except _StopForward:
            ran = True
        except TypeError as err:
            if seen == 0 and not self.input_name and "positional argument" in str(err):
                raise EncoderError(
                    f"the model did not take the input positionally ({err}); give the keyword "
                    "its forward takes it as, e.g. ff.split(model, ..., "
                    "input_name='pixel_values')") from err
            if seen == 0 and self.input_name:
                _note_unnamed_input(err, self.model, self.input_name, self.path)
            raise
        except Exception as err:
            if seen == 0 and not self.input_name and not isinstance(err, FSInfoError):
                hint = _token_input_hint(self.model, x)
                if hint:
                    raise EncoderError(hint + f" ({type(err).__name__}: {err})") from err
            if seen == 0 and self.input_name and not isinstance(err, FSInfoError):
                _note_unnamed_input(err, self.model, self.input_name, self.path)
            if stop is not None or seen == 0 or isinstance(err, FSInfoError):
                raise
            # the run failed in the layers after the cut (e.g. a fixed-size head on a smaller
            # input): say why the whole forward ran, and how not to
            raise EncoderError(
                f"the model's forward failed after {self.path!r} had been called {seen} "
                f"time(s) ({type(err).__name__}: {err}). With occurrence={self.occurrence} (a "
                "call counted from the last) the encoder runs the whole forward to find that "
                "call; pass occurrence=0 (or the index of the call) to cut at that call and "
                "stop there") from err
        finally:
            handle.remove()
            if not ran and kept:  # a forward that failed after the cut: its layers there
                kept[0][1].restore()  # leave no trace either (helper 123)
        if found:
            return found[0]
        if stop is not None or seen < -self.occurrence:
            raise self._never_called(seen, stop)
        out, state = kept[0]
        state.restore()  # the layers after the cut leave no trace (BatchNorm statistics, RNG)
        return out


def _container_hint(target: nn.Module, path: str) -> str:
    """For a split at a ``ModuleList`` / ``ModuleDict`` (never called: the model iterates over
    it), which member to cut at instead; ``""`` for other modules (PoolFormer's
    ``encoder.block.0``, helper 114)."""
    if not isinstance(target, (nn.ModuleList, nn.ModuleDict)) or not len(target):
        return ""
    first = next(iter(target._modules))
    return (f" A {type(target).__name__} is a container the model iterates over, not a module "
            f"it calls: cut at one of its members, e.g. '{path}.{first}'.")


def _note_unnamed_input(err: BaseException, model: nn.Module, name: str, path: str) -> None:
    """Add to an error the model raised before reaching the cut that ``input_name`` is not a
    named parameter of its forward, where that is so (a ``**kwargs`` took the keyword, and the
    model failed for want of its real input: transformers' ``CLIPTextModel`` and
    ``inputs_embeds``, helper 114)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if name in params or not hasattr(err, "add_note"):
        return
    named = ", ".join(p for p, v in params.items() if v.kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
    took = ("; its **kwargs took it" if any(v.kind == inspect.Parameter.VAR_KEYWORD
                                            for v in params.values()) else "")
    err.add_note(f"fsinfo_fast passed the input as {name}=, which is not a named parameter of "
                 f"{type(model).__name__}.forward ({named}{took}): give input_name= a keyword "
                 "the forward names, or cut a module of your own whose forward takes the float "
                 f"input and calls the submodule holding {path!r} (such as its encoder) the way "
                 f"{type(model).__name__}.forward does: called alone, a submodule misses what "
                 "that forward builds for it (CLIPTextModel's causal mask: its bare encoder "
                 "attends both ways, another function; README, 'Models you did not write'); "
                 "check its output at the cut against the whole model's")


def _token_input_hint(model: nn.Module, x: Any) -> str:
    """Why a text model failed on a float input given positionally (its forward's first
    argument is ``input_ids``, token indices, and the input went there: ``nn.Embedding``'s raw
    dtype error), and the keyword to pass it as; ``""`` where that is not the case."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ""
    if not params or params[0] != "input_ids" or not (
        isinstance(x, Tensor) and x.is_floating_point()
    ):
        return ""
    embeds = "inputs_embeds" in params
    return ("the model's forward takes token ids (input_ids) first and was given the float "
            "input positionally; the metrics differentiate with respect to a float input: "
            + ("cut the model with ff.split(model, ..., input_name='inputs_embeds') and pass "
               "embeddings [B, tokens, hidden]" if embeds else
               "cut the model with ff.split(model, ..., input_name=<the keyword its forward "
               "takes a float input as>)"))


class HookInsert(_HookBase):
    """The whole model with ``layer`` applied at a call of one of its modules (a forward hook).

    ``forward(*args, **kwargs)`` calls ``model(*args, **kwargs)`` with a forward hook on
    ``model.<path>`` that, at the cut call (``occurrence``), replaces the module's output (its
    first tensor, :func:`first_tensor`, for a tuple/list/mapping output) by ``layer(output)``,
    and returns the model's output. A negative ``occurrence`` needs the number of calls: the
    first call for each input signature (shape without the batch dimension, dtype, device type,
    the model's mode) runs one extra forward pass under ``torch.no_grad()`` (without ``layer``)
    to count them; every buffer of the model and the RNG states are put back after that pass,
    so a call changes them exactly as ``model``'s own forward. Every call then checks the count
    (the forward runs to the end anyway) and raises :class:`SplitError` where this input called
    the module another number of times (a value-dependent number of calls: pass
    ``occurrence >= 0``).

    Attributes:
        model: the full model (shared); split_layer: ``layer``; path, occurrence, split_name,
            split_index, split_route (``"hooks"``), split_route_reason: as for
            :class:`HookEncoder`.
    """

    def __init__(self, model: nn.Module, path: str, *, layer: nn.Module, occurrence: int = -1,
                 reason: str | None = None, hint: str = "", split_name: str | None = None,
                 split_index: int | None = None) -> None:
        super().__init__(model, path, occurrence, reason, hint,
                         path if split_name is None else split_name, split_index)
        self.split_layer = layer

    def _count(self, args: tuple, kwargs: dict) -> int:
        """The 0-based index of the cut call on this input: a forward pass (under
        ``torch.no_grad()``, without ``layer``) counts the module's calls; the model's buffers
        and the RNG states are put back afterwards, so the pass leaves no trace."""
        seen = 0

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            nonlocal seen
            seen += 1

        state = _State(self.model, _cuda_devices(self.model, args, kwargs))
        handle = self._target().register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            handle.remove()
            state.restore()
        if seen + self.occurrence < 0:
            raise self._never_called(seen, None)
        return seen + self.occurrence

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with ``layer`` applied to the smashed data at the cut."""
        stop: int | None = self.occurrence if self.occurrence >= 0 else None
        if stop is None:
            key = _signature(args, kwargs, self.model)
            stop = self._cut_call.get(key) if key is not None else None
            if stop is None:
                stop = self._count(args, kwargs)
                if key is not None:
                    self._cut_call[key] = stop
        seen = 0
        done = [False]

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            nonlocal seen
            i = seen
            seen += 1
            if i != stop:
                return None
            path = _first_tensor_path(output)
            if path is None:
                raise SplitError(
                    f"the output of {self.path!r} ({_describe(output)}) holds no tensor to "
                    "apply the split layer to"
                )
            done[0] = True
            return _replace_path(output, path, self.split_layer(_get_path(output, path)))

        handle = self._target().register_forward_hook(hook)
        try:
            out = self.model(*args, **kwargs)
        finally:
            handle.remove()
        if not done[0]:
            raise self._never_called(seen, stop)
        if self.occurrence < 0 and seen != stop - self.occurrence:
            # the whole forward ran: check that the cut call is still |occurrence|-th from the
            # end (the count was taken on the first input of this signature)
            cls = type(self.model).__name__
            raise SplitError(
                f"module {self.path!r} ({type(self._target()).__name__}) was called {seen} "
                f"time(s) in the forward of {cls} on this input (with the split layer applied), "
                f"but {stop - self.occurrence} on the first input of the same shape: the number "
                "of calls depends on the input's values, so the cut "
                f"(occurrence={self.occurrence}) would not be that call; pass occurrence=k >= 0"
            )
        return out


# --------------------------------------------------------------------------------------------
# helpers


def _get_attr(model: nn.Module, path: str) -> object:
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _CutTracer(fx.Tracer):
    """Default torch.fx tracer that also keeps one given module as a single leaf call."""

    def __init__(self, leaf: nn.Module | None = None) -> None:
        # leaf optional: unpickling a GraphModule re-traces it with its tracer class, built
        # without arguments (torch.save of an fx-route encoder raised TypeError)
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self._leaf or super().is_leaf_module(m, module_qualified_name)


def _split_points(model: nn.Module) -> list[str] | None:
    pts = getattr(model, "split_points", None)
    if pts is None:
        return None
    if isinstance(pts, str) or not all(isinstance(p, str) for p in pts):
        raise SplitError(
            f"{type(model).__name__}.split_points must be a list of module paths (str), got "
            f"{pts!r}"
        )
    return list(pts)


def _is_plain_sequence(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential)


def _fmt_list(items, limit: int = 20) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} in all)"
    return shown or "(none)"


def _fmt_points(points: list[str]) -> str:
    return _fmt_list((f"{i}={p}" for i, p in enumerate(points)), limit=40)


def _close_modules(model: nn.Module, name: str) -> str:
    """`` Did you mean ...?`` with module paths of ``model`` close to ``name``: by the whole
    path, else by the last two components (a path under a wrapper or in another version's
    naming: ``encoder.layer.0`` on a ``ViTForImageClassification``, whose layer is
    ``vit.layers.0``)."""
    paths = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, paths, n=5, cutoff=0.6)
    if not close:
        tail = ".".join(name.split(".")[-2:])
        scored = [(difflib.SequenceMatcher(None, tail, ".".join(p.split(".")[-2:])).ratio(), p)
                  for p in paths]
        close = [p for r, p in sorted(scored, key=lambda t: -t[0]) if r >= 0.8][:3]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _normalise_index(at: int, n: int, cls: str, names: list[str]) -> int:
    if not -n <= at < n:
        raise SplitError(
            f"split index {at} is out of range for {cls}: valid indices are 0..{n - 1} "
            f"(or -{n}..-1); split points: {_fmt_points(names)}"
        )
    return at % n


def _tag(enc: nn.Module, name: str, index: int | None, route: str,
         reason: str | None = None) -> nn.Module:
    enc.split_name = name
    enc.split_index = index
    enc.split_route = route
    enc.split_route_reason = reason
    return enc


def _slice_sequential(model: nn.Sequential, k: int, name: str, index: int | None) -> nn.Module:
    enc = nn.Sequential(OrderedDict(list(model._modules.items())[: k + 1]))
    enc.training = model.training
    return _tag(enc, name, index, "sequential")


def _error_text(err: BaseException) -> str:
    msg = " ".join(f"{type(err).__name__}: {err}".split())
    return msg[:_MAX_ERR] + "..." if len(msg) > _MAX_ERR else msg


def _untraceable(model: nn.Module, at: str, err: BaseException) -> SplitError:
    """(Its caller lists the top-level modules: the text said them twice, helper 120.)"""
    cls = type(model).__name__
    return SplitError(
        f"{cls} cannot be traced by torch.fx ({_error_text(err)}), so it cannot be cut at the "
        f"torch.fx node {at!r}. Module paths work on any model (forward hooks, no tracing): "
        "split(model, 'module.path')"
    )


def _code_up_to(graph: fx.Graph, cut: str | None) -> str | None:
    """The graph's nodes up to the one named ``cut`` (``None``: all), one line each; ``None``
    where no node has that name."""
    lines = []
    for n in graph.nodes:
        lines.append(n.format_node() or "")
        if cut is not None and n.name == cut:
            return "\n".join(lines)
    return "\n".join(lines) if cut is None else None


def _mode_dependent(model: nn.Module, graph: fx.Graph, tracer: Callable[[], fx.Tracer],
                    cut: str | None) -> bool:
    """Whether the encoder's part of ``model`` (``graph``, its trace in the current mode, up to
    the node ``cut``) traces differently in the other train/eval mode (``if self.training``
    branches, ``F.dropout(..., training=self.training)`` before the cut): the fx route bakes the
    branch of the mode at split time. False where the model does not trace in the other mode."""
    here = _code_up_to(graph, cut)
    flags = {m: m.training for m in model.modules()}
    try:
        model.train(not model.training)
        other = _code_up_to(tracer().trace(model), cut)
    except Exception:  # torch.fx raises many types; the cut's own trace succeeded
        return False
    finally:
        for m, f in flags.items():
            m.training = f
    return here != other


def _guard_mode(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make the encoder of a mode-dependent model refuse to run once the mode of the model's
    submodules it calls has changed since the split: a check at the start of its graph (so that
    torch.save / load and deepcopy keep it, which they do not do for hooks)."""
    original = {id(m) for m in model.modules()}
    targets = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_module"
                      and id(gm.get_submodule(str(n.target))) in original})
    if not targets:
        return
    gm.add_module(MODE_CHECK, ModeCheck(targets, [gm.get_submodule(t) for t in targets],
                                        model.training))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        gm.graph.call_module(MODE_CHECK)
    gm.graph.lint()
    gm.recompile()


#: the name of a mode-dependent fx encoder's :class:`ModeCheck` submodule
MODE_CHECK = "fsinfo_mode_check"


class ModeCheck(nn.Module):
    """Raises :class:`EncoderError` where a module of a mode-dependent fx encoder is no longer
    in its mode at split time; called first in the encoder's graph.

    A leaf module, not a function: unpickling a GraphModule (``torch.load``) re-traces its
    code with every submodule a leaf, which keeps this call (a function ran at that trace and
    dropped out of the graph). The watched modules are held by reference, not registered (the
    encoder's ``state_dict`` is unchanged); pickling and deepcopy keep them the encoder's own.
    """

    _is_impure = True  # kept by dead-code elimination though its output is unused

    def __init__(self, names: list[str], modules: list[nn.Module], was_training: bool) -> None:
        super().__init__()
        self.names = tuple(names)
        self.flags = tuple(m.training for m in modules)
        self.was_training = was_training
        self.watched = list(modules)  # a plain list: not submodules

    def forward(self) -> None:
        for name, flag, m in zip(self.names, self.flags, self.watched, strict=True):
            if m.training != flag:
                was = "train" if self.was_training else "eval"
                raise EncoderError(
                    f"the model's train/eval mode changed after ff.split traced it (module "
                    f"{name!r} is now in {'train' if m.training else 'eval'} mode), and the "
                    f"encoder's part of its forward depends on the mode (it traces differently "
                    f"in train and eval mode): this encoder still runs the {was}-mode branch. "
                    "Call ff.split again after model.eval() (or model.train()), or split with "
                    "route='hooks'")


def _build(model: nn.Module, graph: fx.Graph, cut: fx.Node | None) -> fx.GraphModule:
    """Make ``cut`` the graph's output (``None``: keep the output), drop dead code, wrap."""
    if cut is not None:
        nodes = list(graph.nodes)
        for node in reversed(nodes[nodes.index(cut) + 1 :]):
            graph.erase_node(node)
        # the smashed data is the cut's first tensor, as on the hooks route (a GRU's
        # (output, h) tuple: the fx encoder returned the tuple, the hooks encoder the output)
        with graph.inserting_after(cut):
            sel = graph.call_function(first_tensor, (cut,))
        graph.output(sel)
    gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Encoder")
    gm.graph.eliminate_dead_code()  # needs the owning module for its purity checks
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # GraphModule creates fresh containers for the submodule paths it copies; give them (and
    # itself) the model's mode, leaving the model's own submodules' flags untouched.
    original = {id(m) for m in model.modules()}
    for m in gm.modules():
        if id(m) not in original:
            m.training = model.training
    return gm


def _hooks_cut(model: nn.Module, path: str, index: int | None, opts: _Options, reason: str,
               hint: str = "") -> _Cut:
    return _Cut(model, path, index, hooks=dict(
        path=path, occurrence=opts.index, select=opts.select, input_name=opts.input_name,
        reason=reason, hint=hint))


def _cut_at_module(model: nn.Module, path: str, target: nn.Module, index: int | None,
                   opts: _Options) -> _Cut:
    cls = type(model).__name__
    if opts.route == "hooks":
        return _hooks_cut(model, path, index, opts, "route='hooks' requested")
    if opts.hooks_only:
        if opts.route == "fx":
            raise SplitError(f"route='fx' cannot honour {opts.hooks_only}; use route='auto'")
        return _hooks_cut(model, path, index, opts, opts.hooks_only)
    try:
        graph = _CutTracer(target).trace(model)
    except Exception as err:  # torch.fx raises many types (TraceError, TypeError, ...)
        if opts.route == "fx":
            raise SplitError(
                f"route='fx': {cls} cannot be traced by torch.fx ({_error_text(err)}); "
                "route='auto' or 'hooks' cuts it at a module path with forward hooks"
            ) from err
        return _hooks_cut(model, path, index, opts,
                          f"torch.fx cannot trace {cls} ({_error_text(err)})")
    calls = [
        n for n in graph.nodes
        if n.op == "call_module" and model.get_submodule(str(n.target)) is target
    ]
    if not calls:
        outer = [
            str(n.target) for n in graph.nodes
            if n.op == "call_module" and path.startswith(str(n.target) + ".")
        ]
        if outer and opts.route == "auto":
            hint = (f" It sits inside {outer[0]!r}, which torch.fx keeps as one call; that module "
                    "does not call it as a module (e.g. uses only its weights).")
            return _hooks_cut(model, path, index, opts,
                              f"{path!r} sits inside {outer[0]!r}, which torch.fx keeps as one "
                              "call", hint)
        where = (
            f" it sits inside {outer[0]!r}, which torch.fx keeps as one call; split at "
            f"{outer[0]!r} or use route='hooks'"
            if outer
            else " it is unused, or used other than by calling it (e.g. only its weights)"
        )
        raise SplitError(
            f"module {path!r} ({type(target).__name__}) is never called in the traced forward of "
            f"{cls}:{where}" + ("." + container if (container := _container_hint(target, path))
                               else "")
        )
    k = opts.index
    if not -len(calls) <= k < len(calls):
        n = len(calls)
        raise SplitError(
            f"module {path!r} is called {n} time(s) in the traced forward of {cls}, so "
            f"occurrence={k} names no call; valid: 0..{n - 1} or -{n}..-1"
        )
    return _Cut(model, path, index, graph=graph, node=calls[k],
                tracer=lambda: _CutTracer(target))


def _cut_at_node(model: nn.Module, name: str, points: list[str] | None) -> _Cut:
    cls = type(model).__name__
    try:
        graph = fx.Tracer().trace(model)
    except Exception as err:
        top = _fmt_list((n for n, _ in model.named_children()), limit=10)
        raise SplitError(
            f"{name!r} is not a module path of {cls}.{_close_modules(model, name)} Top-level "
            f"modules: {top} (print(model) or model.named_modules() lists the rest). It could "
            f"be a torch.fx node name, but {_untraceable(model, name, err)}"
        ) from err
    by_name = {n.name: n for n in graph.nodes}
    node = by_name.get(name)
    if node is None:
        module_paths = [n for n, _ in model.named_modules() if n]
        candidates = list(dict.fromkeys([*(points or []), *module_paths, *by_name]))
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        if points is not None:
            avail = f" Split points of {cls}: {_fmt_points(points)}."
        else:
            avail = f" Top-level modules: {_fmt_list(n for n, _ in model.named_children())}."
        raise SplitError(
            f"unknown split point {name!r}: it is neither a module path of {cls} nor a torch.fx "
            f"node name of its traced forward.{hint}{avail}"
        )
    if node.op == "placeholder":
        raise SplitError(
            f"{name!r} is an input of {cls}.forward, not a layer output; cutting there leaves no "
            "encoder"
        )
    index = None
    if node.op == "call_module" and points is not None and str(node.target) in points:
        index = points.index(str(node.target))
    cut = None if node.op == "output" else node
    return _Cut(model, name, index, graph=graph, node=cut, tracer=fx.Tracer)
