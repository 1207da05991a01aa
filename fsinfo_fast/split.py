"""Cut a model in two and return its bottom part (the *encoder* of split inference).

``split(model, at)`` returns a module mapping the model's input ``[B, ...]`` to the smashed data at
the split point: the output of the layer named by ``at``, layers up to and including it being the
encoder. ``at`` may be

- an ``int``: a paper split index into ``model.split_points`` (every zoo model has them; see
  :mod:`fsinfo_fast.models`). Negative indices count from the end. A plain ``nn.Sequential`` without
  ``split_points`` is indexed by its children (``at=k`` keeps children ``0..k``);
- a module path (``"layer2.1"``, ``"features.3"``, as in ``model.named_modules()``): the cut is
  at the output of the **last** call of that module in ``forward``;
- a torch.fx node name of the traced ``forward`` (``"add"``, ``"relu_1"``, ``"flatten"``; list
  them with ``torch.fx.symbolic_trace(model).graph``): the cut is at that node. Module paths take
  precedence over node names.

How. ``torch.fx`` traces ``forward`` with a tracer that keeps the requested module (and the usual
``torch.nn`` layers) as a single call, the graph is cut after that call (or the named node), which
becomes the output, dead code is removed and the result is a ``torch.fx.GraphModule``. A top-level
child of an ``nn.Sequential`` is cut by slicing instead (no tracing; a new ``nn.Sequential``).

Either way the encoder **shares** the model's submodules, parameters and buffers (nothing is copied:
training the model changes the encoder), starts in the model's train/eval mode (the submodules
keep their own flags) and carries ``split_name`` (module path or node name) and ``split_index``
(paper index, or ``None`` when the cut is not one of ``model.split_points``).

Python control flow in ``forward`` is resolved at trace time (e.g. ``if self.training``: the branch
of the model's mode when ``split`` was called).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict

import torch.fx as fx
from torch import nn

from .errors import InvalidInputTypeError, SplitError

__all__ = ["insert", "split"]

_MAX_ERR = 300  # characters of an underlying tracing error quoted in messages


def split(model: nn.Module, at: int | str) -> nn.Module:
    """The bottom part of ``model`` up to and including the split point ``at``, as an encoder.

    Args:
        model: the full model (any ``nn.Module``; zoo models also accept paper split indices).
        at: paper split index (``int``, into ``model.split_points``; for a plain ``nn.Sequential``
            the child index), module path (``str``, cut after its last call) or torch.fx node
            name (``str``).

    Returns:
        The encoder: maps ``x [B, ...]`` (the model's input) to the smashed data at the split point,
        e.g. ``[B, 128, 16, 16]`` for ResNet-18 split 7 on 32x32 inputs. A
        ``torch.fx.GraphModule`` (an ``nn.Sequential`` when cutting a Sequential at a child), with
        attributes ``split_name: str`` and ``split_index: int | None``. Parameters are shared with
        ``model``; the mode (train/eval) is the model's.

    Raises:
        SplitError: unknown module path / node name (the message lists close matches and the
            split points), an ``int`` for a model without ``split_points``, an index out of range,
            a module that ``forward`` never calls, or a model torch.fx cannot trace.
        InvalidInputTypeError: ``model`` is not an ``nn.Module`` or ``at`` not an ``int``/``str``.

    Example:
        >>> import torch
        >>> from fsinfo_fast.models import resnet18
        >>> model = resnet18().eval()
        >>> enc = split(model, 7)                      # paper split 7 = after layer2.1
        >>> enc(torch.zeros(2, 3, 32, 32)).shape, enc.split_name, enc.split_index
        (torch.Size([2, 128, 16, 16]), 'layer2.1', 7)
    """
    return _locate(model, at, "split()").encoder()


def insert(model: nn.Module, at: int | str, layer: nn.Module) -> nn.Module:
    """The whole ``model`` with ``layer`` applied to the smashed data at the split point ``at``.

    ``insert(model, at, layer)(x)`` computes ``top(layer(bottom(x)))`` where ``bottom`` is
    ``split(model, at)``: e.g. a noise layer at the split (what :class:`fsinfo_fast.FSInfoGuard`
    does to the encoder's output) to measure the model's accuracy under the defense. ``at`` is
    resolved exactly as by :func:`split`; later uses of the split point's output (skip
    connections included) see ``layer``'s output. Parameters are shared with ``model``.

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
    return _locate(model, at, "insert()").with_layer(layer)


class _Cut:
    """Where a model is cut: after child ``k`` of a Sequential, or after ``node`` of a graph."""

    def __init__(self, model: nn.Module, name: str, index: int | None, *, k: int | None = None,
                 graph: fx.Graph | None = None, node: fx.Node | None = None) -> None:
        self.model, self.name, self.index = model, name, index
        self.k, self.graph, self.node = k, graph, node

    def encoder(self) -> nn.Module:
        if self.k is not None:
            return _slice_sequential(self.model, self.k, self.name, self.index)
        return _tag(_build(self.model, self.graph, self.node), self.name, self.index)

    def with_layer(self, layer: nn.Module) -> nn.Module:
        model = self.model
        if self.k is not None:
            items = list(model._modules.items())
            full = nn.Sequential(OrderedDict(
                [*items[: self.k + 1], ("split_layer", layer), *items[self.k + 1 :]]
            ))
            full.training = model.training
            return _tag(full, self.name, self.index)
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
        return _tag(gm, self.name, self.index)


def _get_attr(model: nn.Module, path: str) -> object:
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _locate(model: nn.Module, at: int | str, who: str) -> _Cut:
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

    index: int | None = None
    if isinstance(at, int):
        if points is None:
            if _is_plain_sequence(model):
                names = list(model._modules)
                k = _normalise_index(at, len(names), cls, names)
                return _Cut(model, names[k], k, k=k)
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
        if _is_plain_sequence(model) and path in model._modules:
            k = list(model._modules).index(path)
            return _Cut(model, path, index if index is not None else k, k=k)
        return _cut_at_module(model, path, modules[path], index)
    return _cut_at_node(model, path, points)




# --------------------------------------------------------------------------------------------
# helpers


class _CutTracer(fx.Tracer):
    """Default torch.fx tracer that also keeps one given module as a single leaf call."""

    def __init__(self, leaf: nn.Module) -> None:
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


def _normalise_index(at: int, n: int, cls: str, names: list[str]) -> int:
    if not -n <= at < n:
        raise SplitError(
            f"split index {at} is out of range for {cls}: valid indices are 0..{n - 1} "
            f"(or -{n}..-1); split points: {_fmt_points(names)}"
        )
    return at % n


def _tag(enc: nn.Module, name: str, index: int | None) -> nn.Module:
    enc.split_name = name
    enc.split_index = index
    return enc


def _slice_sequential(model: nn.Sequential, k: int, name: str, index: int | None) -> nn.Module:
    enc = nn.Sequential(OrderedDict(list(model._modules.items())[: k + 1]))
    enc.training = model.training
    return _tag(enc, name, index)


def _untraceable(model: nn.Module, at: str, err: BaseException) -> SplitError:
    cls = type(model).__name__
    seqs = [n for n, m in model.named_modules() if n and isinstance(m, nn.Sequential)]
    hint = (
        f" nn.Sequential submodules here: {_fmt_list(seqs, limit=10)};"
        f" e.g. split(model.{seqs[0]}, at=...) cuts one of them directly."
        if seqs
        else ""
    )
    msg = f"{type(err).__name__}: {err}"
    if len(msg) > _MAX_ERR:
        msg = msg[:_MAX_ERR] + "..."
    return SplitError(
        f"{cls} cannot be traced by torch.fx ({msg}), so it cannot be split automatically at "
        f"{at!r}. Pass a module path of an nn.Sequential (split a Sequential submodule by index or "
        "child name, no tracing needed) or split by hand: write an nn.Module whose forward runs "
        f"the bottom layers.{hint}"
    )


def _trace(model: nn.Module, tracer: fx.Tracer, at: str) -> fx.Graph:
    try:
        return tracer.trace(model)
    except Exception as err:  # torch.fx raises many types (TraceError, TypeError, ...)
        raise _untraceable(model, at, err) from err


def _build(model: nn.Module, graph: fx.Graph, cut: fx.Node | None) -> fx.GraphModule:
    """Make ``cut`` the graph's output (``None``: keep the output), drop dead code, wrap."""
    if cut is not None:
        nodes = list(graph.nodes)
        for node in reversed(nodes[nodes.index(cut) + 1 :]):
            graph.erase_node(node)
        graph.output(cut)
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


def _cut_at_module(model: nn.Module, path: str, target: nn.Module, index: int | None) -> _Cut:
    graph = _trace(model, _CutTracer(target), path)
    calls = [
        n for n in graph.nodes
        if n.op == "call_module" and model.get_submodule(str(n.target)) is target
    ]
    if not calls:
        outer = [
            str(n.target) for n in graph.nodes
            if n.op == "call_module" and path.startswith(str(n.target) + ".")
        ]
        where = (
            f" it sits inside {outer[0]!r}, which torch.fx keeps as one call; split at "
            f"{outer[0]!r} instead"
            if outer
            else " it is unused, or used other than by calling it (e.g. only its weights)"
        )
        raise SplitError(
            f"module {path!r} ({type(target).__name__}) is never called in the traced forward of "
            f"{type(model).__name__}:{where}"
        )
    return _Cut(model, path, index, graph=graph, node=calls[-1])


def _cut_at_node(model: nn.Module, name: str, points: list[str] | None) -> _Cut:
    cls = type(model).__name__
    try:
        graph = fx.Tracer().trace(model)
    except Exception as err:
        close = difflib.get_close_matches(
            name, [n for n, _ in model.named_modules() if n], n=5, cutoff=0.6
        )
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SplitError(
            f"{name!r} is not a module path of {cls}.{hint} It could be a torch.fx node name, "
            f"but {_untraceable(model, name, err)}"
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
    return _Cut(model, name, index, graph=graph, node=cut)
