"""Turn a user's encoder and batch into a checked, flat per-sample function.

An *encoder* is any ``nn.Module`` or callable mapping a batch ``[B, *in_shape]`` to
``[B, *out_shape]``. :func:`prepare` validates it and the batch once, with errors that say what
is wrong and how to fix it, and returns a :class:`PreparedEncoder` whose ``fn`` maps flat
``[N, d]`` inputs to flat ``[N, m]`` outputs. Both the reference oracle and the fast product
engines consume this object, so every path refuses the same bad inputs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import numbers
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _global_hooks
from torch.overrides import TorchFunctionMode

from ._precision import ieee_fp32
from .errors import (
    EncoderError,
    InvalidInputError,
    InvalidInputTypeError,
    NotDifferentiableError,
    SampleInteractionError,
    TrainingModeError,
)

__all__ = [
    "PreparedEncoder",
    "prepare",
    "check_sigma",
    "check_prior_var",
    "check_input",
    "check_eval_mode",
    "saved_bytes_per_sample",
    "clear_validation_cache",
    "working_dtype",
    "uncompiled",
]

# Modules whose output depends on the batch or on randomness while in training mode.
_BATCH_OR_RANDOM = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@dataclass
class PreparedEncoder:
    """A validated encoder as a flat function.

    Attributes:
        fn: maps ``[N, d]`` to ``[N, m]`` (``N`` need not equal ``B``).
        x: the batch, flattened to ``[B, d]``, in the working dtype.
        in_shape: per-sample input shape.
        out_shape: per-sample output shape.
        y: the encoder's output on ``x``, flattened to ``[B, m]`` (computed on first access when
            the validation came from the cache, see :func:`prepare`).
        saved_bytes: bytes autograd saved per sample in the validating forward pass: a proxy for
            the memory one tangent or cotangent of one sample needs (used to chunk probes).
        module: the encoder itself (after any dtype cast), mapping ``[B, *in_shape]`` to
            ``[B, *out_shape]``; the linearised engine traces it (``None``: not available).
        cached: True when the structural part of the validation (the cast copy, the saved
            bytes, the vmap check) was taken from the validation cache; the value-dependent
            checks ran on this batch unless :func:`prepare` was called with ``recheck=False``.
    """

    fn: Callable[[Tensor], Tensor]
    x: Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    _y: Tensor | None = None
    saved_bytes: int = 0
    module: Callable[[Tensor], Tensor] | None = None
    cached: bool = False
    #: ``(u, J^T u)``, ``[B, m]`` and ``[B, d]``: the seeded cotangent of a cached batch's
    #: re-validation and autograd's VJP of it (the engine's per-batch cross-check compares its
    #: own VJP with it instead of running torch.func's again); ``None`` elsewhere
    adjoint: tuple[Tensor, Tensor] | None = None
    #: ``[check]`` where a cached batch's forward-/reverse-mode check is deferred to
    #: :meth:`confirm` (one cell, shared by :meth:`select`'s copies); ``None`` elsewhere
    pending: list | None = None
    #: ``[B, d]``: the validation's VJP ``J^T u`` of a seeded Gaussian cotangent ``u``
    #: (:func:`_adjoint_u`, unit variance), so ``E[seen_k^2] = (J^T J)_kk``; ``None`` where the
    #: batch was not differentiated (a cached ``recheck=False`` prepare). See :attr:`live`.
    seen: Tensor | None = None

    @property
    def live(self) -> Tensor | None:
        """``[B, d]`` bool: the input dimensions where :attr:`seen` is not zero. A column of
        ``J`` that is zero gives a zero there; a nonzero one does so only by an exact
        cancellation (probability zero for a Gaussian ``u``), so its complement names the
        dimensions that (almost surely) do not reach the output: a crop, skipped pixels. A
        hint, not a proof: the fast exact route verifies it with a JVP on those dimensions
        before it relies on it. ``None`` where :attr:`seen` is."""
        return None if self.seen is None else self.seen != 0

    def confirm(self) -> None:
        """Run this batch's deferred forward-/reverse-mode check (:func:`_check_adjoint`), once.

        A cached :func:`prepare` defers it: its JVP is most of a re-validation's cost (forward
        mode runs 4x a forward on ResNet-18), and the engine's per-batch cross-check compares
        the engine's JVP with the same autograd VJP (:attr:`adjoint`), so where the engine
        serves the batch it is not run. :func:`~fsinfo_fast.engine.make_products` calls this
        for every other outcome, the exact routes before they run.

        Raises:
            EncoderError: the two modes disagree at this batch.
        """
        if self.pending is not None and self.pending[0] is not None:
            self.pending[0]()
            self.pending[0] = None

    @property
    def y(self) -> Tensor:
        if self._y is None:
            with torch.no_grad():
                y = self.fn(self.x)
            if not bool(torch.isfinite(y).all()):
                raise EncoderError(_NONFINITE_OUTPUT)
            self._y = y.detach()
        return self._y

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def select(self, idx: Tensor) -> PreparedEncoder:
        """The same encoder at the samples ``idx`` of this batch (``[n]`` int64): the checks
        are per encoder and sample, so they hold for any subset of the batch."""
        return dataclasses.replace(self, x=self.x[idx],
                                   _y=None if self._y is None else self._y[idx],
                                   adjoint=None if self.adjoint is None else
                                   (self.adjoint[0][idx], self.adjoint[1][idx]),
                                   seen=None if self.seen is None else self.seen[idx])

    @property
    def d(self) -> int:
        return self.x.shape[1]

    @property
    def m(self) -> int:
        return math.prod(self.out_shape)


_NONFINITE_OUTPUT = (
    "the encoder's output contains NaN or inf on this batch; the Jacobian is undefined there. "
    "Check the input's scale and the model's weights"
)


def check_encoder(encoder: object) -> None:
    """Raise :class:`InvalidInputTypeError` unless ``encoder`` can be called (an
    ``nn.Module`` or a function); the constructors that take one check it at once."""
    if not callable(encoder):
        raise InvalidInputTypeError(
            f"encoder must be an nn.Module or a callable, got {type(encoder).__name__}"
        )


def check_output(out: object, batch: int) -> None:
    """Raise :class:`EncoderError` unless the encoder's output ``out`` is a finite floating-point
    tensor ``[batch, ...]`` with values per sample (what the metrics, and the guard's noise,
    need)."""
    if not isinstance(out, Tensor):
        if isinstance(out, Mapping):  # (a transformers ModelOutput too)
            keys = ", ".join(repr(k) for k in list(out)[:6])
            how = (f"lambda x: model(x)[key] for one of its keys ({keys})" if keys else
                   "lambda x: model(x)[key]")
        else:
            how = "lambda x: model(x)[0]"
        raise EncoderError(
            f"the encoder must return a tensor, got {type(out).__name__}; wrap it to select "
            f"the tensor (e.g. {how})"
        )
    if not out.is_floating_point():
        raise EncoderError(
            f"the encoder's output has dtype {out.dtype}; it must be floating point "
            "(argmax or rounding make the output non-differentiable)"
        )
    if out.ndim < 1 or out.shape[0] != batch:
        raise EncoderError(
            f"the encoder's output has shape {tuple(out.shape)}; it must keep the batch "
            f"dimension first ([{batch}, ...]; x's first dimension is the batch: for one "
            "sample pass x.unsqueeze(0))"
        )
    if out.numel() == 0:  # (no sample, or no values per sample)
        raise EncoderError(f"the encoder's output has shape {tuple(out.shape)}: no values "
                           "per sample (nothing to measure)")
    if not bool(torch.isfinite(out).all()):
        raise EncoderError(_NONFINITE_OUTPUT)


def check_target(target: object, batch: int | None) -> Tensor:
    """``target`` (FSInfo in nats/dim) as a float64 tensor, 0-d or ``[batch]``; raises unless a
    finite float or ``[B]`` tensor (the fast path's and the oracle's ``fsinfo_sigma``; a
    ``batch`` of None, x not yet checked, skips the length check as :func:`check_sigma` does)."""
    try:
        tau = torch.as_tensor(target, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidInputError(f"target must be a float or a [B] tensor, got {target!r}") from err
    if not bool(torch.isfinite(tau).all()):
        raise InvalidInputError(f"target must be finite, got {target!r}")
    if tau.ndim > 1 or (tau.ndim == 1 and batch is not None and tau.shape[0] != batch):
        raise InvalidInputError(
            f"target must be a float or have shape [B] = [{batch}], got {tuple(tau.shape)}")
    return tau


def check_sigma(sigma: float | Tensor, batch: int | None = None, name: str = "sigma") -> None:
    """Raise unless ``sigma`` is a positive finite number (a Python or numpy real, or a 0-d
    tensor) or a ``[B]`` tensor of them."""
    if isinstance(sigma, bool) or not isinstance(sigma, (numbers.Real, Tensor)):
        raise InvalidInputTypeError(
            f"{name} must be a positive float or a tensor of shape [B], got {type(sigma).__name__}"
        )
    if isinstance(sigma, Tensor) and (sigma.dtype == torch.bool or sigma.is_complex()):
        raise InvalidInputTypeError(f"{name} must be a real tensor, got dtype {sigma.dtype}")
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if s.ndim > 1 or (s.ndim == 1 and batch is not None and s.shape[0] != batch):
        raise InvalidInputError(
            f"{name} must be a scalar or have shape [B] = [{batch}], got shape {tuple(s.shape)}"
        )
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise InvalidInputError(
            f"{name} must be positive and finite, got {sigma!r}: it is the standard deviation of "
            "the Gaussian noise on the smashed data (use the paper's nominal 0.1 if no noise "
            "is added)"
        )
    if not bool(((s >= SIGMA_RANGE[0]) & (s <= SIGMA_RANGE[1])).all()):
        raise InvalidInputError(
            f"{name} must lie in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], got {sigma!r}: beyond "
            "that its square over- or underflows float64 in the metrics' arithmetic")


#: the noise scales the metrics accept (``sigma**2`` and ``D / sigma**2`` stay finite and
#: normal in float64 for any Jacobian entry up to ``1e100``)
SIGMA_RANGE = (1e-100, 1e100)


def check_prior_var(prior_var: float | None) -> float:
    """Return the prior precision ``lambda = 1/prior_var`` (0 for ``None``), checking the value."""
    if prior_var is None:
        return 0.0
    if isinstance(prior_var, bool) or not isinstance(prior_var, (int, float)):
        raise InvalidInputTypeError(
            f"prior_var must be a positive float or None, got {type(prior_var).__name__}"
        )
    if not (math.isfinite(prior_var) and prior_var > 0):
        raise InvalidInputError(
            f"prior_var must be positive and finite (the prior variance of each input "
            f"dimension), got {prior_var!r}; pass None for no prior term"
        )
    return 1.0 / float(prior_var)


def _note_batch(err: BaseException, x: Tensor) -> None:
    """Add to the encoder's own error how the metrics called it (an unbatched sample, read as a
    batch of its first dimension, fails inside the model with a shape error of its own).
    Python 3.11+ (shown with the traceback; 3.10 has no notes: the error goes as it came)."""
    if not hasattr(err, "add_note"):
        return
    err.add_note(f"fsinfo_fast called the encoder on x of shape {tuple(x.shape)}: a batch of "
                 f"{x.shape[0]} sample(s) of shape {tuple(x.shape[1:])} (the first dimension is "
                 "the batch; for one sample pass x.unsqueeze(0))")


def _note_training(err: BaseException, encoder: Any) -> None:
    """Add to the encoder's own error that it is in training mode, where it is (a forward can
    take another path there and fail on an input that requires grad: transformers'
    ``Wav2Vec2FeatureEncoder`` sets ``requires_grad`` on its activations, a raw RuntimeError
    from inside the model, helper 128)."""
    if not hasattr(err, "add_note"):
        return
    modules = list(encoder.modules()) if isinstance(encoder, nn.Module) else []
    training = [type(m).__name__ for m in modules if m.training
                and not type(m).__module__.startswith("fsinfo_fast.")]  # (not our wrappers)
    if training:
        err.add_note(f"the encoder is in training mode ({len(training)} module(s), e.g. "
                     f"{training[0]}): its forward may take another path there; the metrics "
                     "are defined in eval mode: call model.eval() before splitting it")


def check_input(x: object) -> Tensor:
    """Raise unless ``x`` is a non-empty, finite, floating-point batch ``[B, ...]``."""
    if not isinstance(x, Tensor):
        hint = ""
        if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
            hint = (": a data loader's (inputs, labels) batch? Pass the inputs only, e.g. "
                    "batch[0]")
        elif isinstance(x, Mapping) and isinstance(x.get("pixel_values"), Tensor):
            hint = ": a Hugging Face style batch? Pass its inputs, batch['pixel_values']"
        raise InvalidInputTypeError(
            f"x must be a torch.Tensor batch of shape [B, ...], got {type(x).__name__}{hint}"
        )
    if not x.is_floating_point():
        raise InvalidInputTypeError(
            f"x must be floating point, got dtype {x.dtype}: convert it, e.g. x.float() "
            "(images usually as x.float() / 255). Integer token ids have no Jacobian: measure "
            "from the embeddings instead (a transformers model's inputs_embeds=, or ff.split "
            "after its embedding layer)"
        )
    if x.ndim < 2:
        raise InvalidInputError(
            f"x must be a batch of shape [B, ...] with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}; for a single sample use x.unsqueeze(0)"
        )
    if x.numel() == 0:
        raise InvalidInputError(f"x is empty (shape {tuple(x.shape)}): give at least one sample")
    if x.device.type == "meta":
        # a meta tensor cannot be moved off meta (no values to copy): "move it" was no fix
        raise InvalidInputError(
            "x is on the meta device (shapes only, no values): the metrics need the data. Pass "
            "x with real values on the encoder's device; an encoder on meta needs real weights "
            "too (encoder.to_empty(device=...) then load_state_dict(...), or build it there)")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(x.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        raise InvalidInputError(
            f"x contains NaN or inf (samples {rows[:10]}{'...' if len(rows) > 10 else ''}): "
            "clean or drop those samples first"
        )
    return x


def check_eval_mode(encoder: object, x: Tensor | None = None) -> None:
    """Refuse BatchNorm / InstanceNorm / Dropout (and stochastic depth, attention dropout)
    modules that are in training mode. For a hooks-route split (:class:`~fsinfo_fast.split.
    HookEncoder`) given the input ``x``, not those a check pass sees called only after the
    cut's output (:meth:`~fsinfo_fast.split.HookEncoder.run_after_cut`): the encoder holds the
    whole model, and a head's dropout after the cut changes nothing the metric reads (helper
    121)."""
    if not isinstance(encoder, nn.Module):
        return
    hooks = hasattr(encoder, "run_after_cut")  # (its model is its submodule "model": the
    # names say the user's own paths)
    found = [(name, mod, why) for name, mod in encoder.named_modules()
             if (why := _training_mode_problem(name.removeprefix("model.") if hooks else name,
                                               mod))]
    why = ""
    if found and x is not None and hooks:
        after, why = encoder.run_after_cut(x, [(name, mod) for name, mod, _ in found
                                               if name.startswith("model.")])
        found = [f for f in found if f[0] not in after]
    if found:
        raise TrainingModeError(found[0][2] + (
            f" (Layers that run only after the cut are not counted, but the pass that finds "
            f"them could not tell: {why}.)" if why else ""))


def _training_mode_problem(name: str, mod: nn.Module) -> str:
    """Why ``mod`` (at ``name``) in its current mode makes the encoder's output depend on the
    batch or on randomness (``""`` if it does not)."""
    if not mod.training:
        return ""
    where = f" at '{name}'" if name else ""
    if isinstance(mod, _BATCH_OR_RANDOM):
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and not (
            mod.track_running_stats
        ):
            return ""  # per-sample statistics in both modes
        if isinstance(mod, nn.modules.dropout._DropoutNd) and float(mod.p) == 0.0:
            return ""  # p = 0: the identity in both modes (a config's dropout of 0)
        return (f"{type(mod).__name__}{where} is in training mode: its output depends on the "
                "batch or on randomness, but the metric is defined per sample for a fixed "
                "encoder. Call encoder.eval() first.")
    drop = _stochastic_depth(mod)
    if drop:
        return (f"{type(mod).__name__}{where} (stochastic depth, drop probability "
                f"{drop:g}) is in training mode: it drops residual branches "
                "at random, but the metric is defined for a fixed encoder. Call encoder.eval() "
                "first.")
    if isinstance(mod, nn.MultiheadAttention) and float(getattr(mod, "dropout", 0.0)) > 0:
        return (f"MultiheadAttention{where} has dropout and is in training mode: "
                "call encoder.eval() first.")
    return ""


def _stochastic_depth(mod: nn.Module) -> float:
    """The drop probability of a stochastic-depth module (timm's and transformers' ``DropPath``
    with ``drop_prob``, torchvision's ``StochasticDepth`` with ``p``), else 0. Such a layer
    draws random numbers in training mode; ``ff.split``'s hooks restore the RNG around each
    forward, so the determinism check saw none, and torch.func then refused the restore."""
    kind = type(mod).__name__.lower()
    if "droppath" not in kind and "stochasticdepth" not in kind:
        return 0.0
    for attr in ("drop_prob", "p"):
        v = getattr(mod, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 0.0


def _tensors(module: nn.Module) -> Iterator[Tensor]:
    """Every parameter and buffer of ``module``."""
    return itertools.chain(module.parameters(), module.buffers())


def _cast_encoder(encoder: Callable, dtype: torch.dtype | None) -> Callable:
    if dtype is None or not isinstance(encoder, nn.Module):
        return encoder
    cplx0 = {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype)
    if all(t.dtype in (dtype, cplx0) or not (t.is_floating_point() or t.is_complex())
           for t in _tensors(encoder)):
        return encoder
    # tensors a module keeps outside its parameters and buffers that autograd produced (a
    # cache filled by an earlier forward, e.g. transformers LeViT's attention_bias_cache)
    # refuse deepcopy ("only graph leaves support the deepcopy protocol"): copy them detached,
    # in the working dtype as the parameters they were computed from
    memo: dict[int, Any] = {}

    def visit(v: Any, depth: int) -> None:
        if isinstance(v, Tensor):
            if v.grad_fn is not None and id(v) not in memo:
                d = v.detach()
                memo[id(v)] = d.to(dtype) if d.is_floating_point() and d.dtype != dtype \
                    else d.clone()
        elif depth < 3 and isinstance(v, dict):
            for item in v.values():
                visit(item, depth + 1)
        elif depth < 3 and isinstance(v, (list, tuple)):
            for item in v:
                visit(item, depth + 1)

    for m in encoder.modules():
        for key, v in vars(m).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                visit(v, 0)
    cplx = {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype)

    def cast(t: Tensor) -> Tensor:  # (Module.to(float64) dropped a complex buffer's
        if t.is_floating_point():   # imaginary part: Meta LLaMA's freqs_cis)
            return t.to(dtype)
        if t.is_complex() and cplx is not None:
            return t.to(cplx)
        return t

    return copy.deepcopy(encoder, memo)._apply(cast)


class _SavedBytes:
    """Context manager counting the bytes autograd saves for backward inside it (and their
    dtypes: a forward that computes in float32 inside a float64 callable saves float32)."""

    def __init__(self) -> None:
        self.total = 0
        self.dtypes: set[torch.dtype] = set()  # of every floating tensor saved
        self.computed: set[torch.dtype] = set()  # of those computed in it (with a grad_fn)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        self.total += t.numel() * t.element_size()
        if t.is_floating_point():
            self.dtypes.add(t.dtype)
            if t.grad_fn is not None:
                self.computed.add(t.dtype)
        return t

    def __enter__(self) -> _SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def saved_bytes_per_sample(fn: Callable[[Tensor], Tensor], x1: Tensor) -> int:
    """Bytes of tensors autograd saves for one sample's forward: a proxy for the memory one
    tangent or cotangent needs (used to chunk probes to a memory budget)."""
    with torch.enable_grad(), _SavedBytes() as counter:
        fn(x1.detach().requires_grad_(True))
    return max(int(counter.total), x1.numel() * x1.element_size())


@dataclass
class _Validated:
    """What :func:`prepare` learned about an encoder for one input signature."""

    out_shape: tuple[int, ...]
    saved_bytes: int
    interaction_checked: int  # samples checked alone (a large number: all of a batch)
    enc: Callable[[Tensor], Tensor] | None  # the cast copy (None: the encoder itself; a strong
    # reference to the key would keep the weak-keyed entry alive forever)


#: encoder -> {signature: _Validated}; entries die with the encoder.
_VALIDATION_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(encoder: Callable, x: Tensor, dtype: torch.dtype | None,
               versions: bool | None = None, split: bool = False) -> tuple:
    """Cache key: input shape, dtypes, device, training flags, the forward hooks and
    forward-pre hooks of every submodule and the global module hooks (by handle id: a hook
    registered or removed after a validation changes the function), a forward assigned on an
    instance, parameter identities and storages (``data_ptr``: ``p.data = t`` keeps the
    parameter and swaps its values), the plain attributes of every submodule (scalars, strings
    and tuples of them: a LeakyReLU's ``negative_slope``, a convolution's ``padding``, a
    scale set on a custom module; tensors kept as plain attributes by identity and storage),
    and with ``versions`` (default: where a dtype cast makes a copy) the tensors' in-place
    versions. ``split``: ``(the key without the attributes, the attributes' key)`` instead
    (:class:`~fsinfo_fast.Linearization` judges an attribute change by the function).

    An in-place edit through ``.data`` (``p.data.mul_(3)``) changes neither the version nor the
    storage: the key cannot see it, so a cached cast copy is refreshed from the live module at
    every use (:func:`_refresh_copy`) instead of trusted."""
    key: tuple = (tuple(x.shape[1:]), x.dtype, dtype, str(x.device))
    attrs: tuple = ()
    if isinstance(encoder, nn.Module):
        mods = _submodules(encoder)
        # (a shared tensor appears once per owner: a key need not deduplicate)
        tensors = [t for m in mods for t in itertools.chain(m._parameters.values(),
                                                             m._buffers.values())
                   if t is not None]
        versioned = (dtype is not None) if versions is None else versions
        attrs = attributes_key(mods, versioned)
        key += (tuple(m.training for m in mods), tuple(id(t) for t in tensors),
                tuple(t.data_ptr() for t in tensors), forward_hooks_key(mods))
        if versioned:
            key += (tuple(t._version for t in tensors),)
    return (key, attrs) if split else (*key, attrs)


def attributes_key(mods: list[nn.Module], versions: bool) -> tuple:
    """The plain attributes of ``mods`` that define their function besides the weights: an
    edit of one (``LeakyReLU.negative_slope``, ``Conv2d.padding``) kept an earlier
    validation's float64 copy, whose values then served the exact routes (a dFIL 134x off
    with a zero-width interval), and a ``Linearization`` mixed the two functions' probes.
    Scalars, strings and tuples or lists of them by value; a tensor kept as a plain attribute
    (not a parameter or buffer) by identity and storage (and version). A counter that the
    forward itself increments changes it too: the validation cache then validates every batch
    afresh, and :class:`~fsinfo_fast.Linearization` checks that the function is the same
    (:func:`computes_the_same`) instead of refusing."""
    out = []
    simple, skip = _SIMPLE_TYPES, _MODULE_DICTS
    for i, m in enumerate(mods):
        for k, v in m.__dict__.items():
            t = type(v)
            if t in simple:
                out.append((i, k, v))
            elif t in skip:  # (nn.Module's own dicts and sets: parameters, hooks, ...)
                continue
            elif t is tuple or t is list:
                if all(type(e) in simple for e in v):
                    out.append((i, k, tuple(v)))
            elif isinstance(v, Tensor):
                out.append((i, k, id(v), v.data_ptr(), v._version if versions else 0))
    return tuple(out)


#: the exact types :func:`attributes_key` reads by value, and those it skips at once
_SIMPLE_TYPES = frozenset((bool, int, float, str, type(None)))
_MODULE_DICTS = frozenset((dict, set, OrderedDict))


def computes_the_same(enc: PreparedEncoder) -> bool:
    """Whether ``enc``'s function still gives, at its batch, the output and the seeded VJP
    (:attr:`PreparedEncoder.seen`) its validation saw, to the validation's tolerance (float32's
    ``1e-4`` or float64's ``1e-9``, relative to the largest entry): what an attribute change
    that the structural key cannot judge (a counter, or a LeakyReLU slope) is checked by."""
    tol = _VALIDATION_TOL[torch.float64 if enc.x.dtype == torch.float64 else torch.float32]

    def close(a: Tensor, b: Tensor) -> bool:
        a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
        return a.shape == b.shape and float((a - b).abs().max()) <= tol * (
            float(b.abs().max()) + 1e-30)

    with torch.enable_grad():
        xr = enc.x.detach().requires_grad_(True)
        out = enc.fn(xr)
        if not close(out, enc.y):
            return False
        if enc.seen is None or not out.requires_grad:
            return True
        (grad,) = torch.autograd.grad(out, xr, grad_outputs=_adjoint_u(out), allow_unused=True)
    return grad is not None and close(grad, enc.seen)


def _submodules(module: nn.Module) -> list[nn.Module]:
    """``list(module.modules())`` (the same order) without the names ``modules()`` builds: the
    key is computed at every cached call (ResNet-18: 54-76 us instead of 115 us)."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


def forward_hooks_key(mods: list[nn.Module]) -> tuple:
    """What changes a module's function besides its weights and training flags: the forward
    and forward-pre hooks of ``mods`` (by handle id, unique per registration), a ``forward``
    assigned on an instance, and the global module hooks."""
    return (tuple((i, tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                   id(m.__dict__.get("forward"))) for i, m in enumerate(mods)
                  if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__),
            tuple(_global_hooks._global_forward_hooks),
            tuple(_global_hooks._global_forward_pre_hooks))


def _refresh_copy(copy_: nn.Module, live: nn.Module) -> bool:
    """Copy the live module's parameters and buffers into its cached cast copy (one pass over
    the weights, cast on the way): the values the key cannot see (an edit through ``.data``)
    reach the copy. False (nothing copied) where the two do not line up."""
    src, dst = list(_tensors(live)), list(_tensors(copy_))
    if len(src) != len(dst) or any(s.shape != d.shape for s, d in zip(src, dst, strict=True)):
        return False
    with torch.no_grad():
        for s, d in zip(src, dst, strict=True):
            d.copy_(s)
    return True


def uncompiled(encoder: Any) -> Any:
    """The eager module behind a ``torch.compile``'d one (an ``OptimizedModule``), else
    ``encoder`` itself.

    Compiled code cannot be traced again: the engine's capture (``make_fx``) refuses a
    dynamo-optimised function and ``auto`` fell back to ``torch.func`` (after compiling for
    about 13 s on VGG5 in the validation's forward). The compiled module computes the same
    function as its ``_orig_mod`` (the weights are shared), which the metrics linearise instead
    (results record it in ``info["compiled"]``)."""
    orig = getattr(encoder, "_orig_mod", None)
    if isinstance(encoder, nn.Module) and isinstance(orig, nn.Module) and \
            type(encoder).__name__ == "OptimizedModule":
        return orig
    return encoder


#: the note results carry where :func:`uncompiled` unwrapped the encoder
COMPILED_NOTE = ("a torch.compile'd module: its original module (_orig_mod, the same function "
                 "and weights) is linearised eagerly")


#: Floating dtypes too coarse for the metrics' products: an encoder or input in one of them is
#: linearised in float32 (see :func:`working_dtype`).
HALF_DTYPES = (torch.float16, torch.bfloat16)


#: :func:`check_same_function`'s tolerance: the working-dtype output may differ from the float64
#: one by this share of its largest magnitude (float32 rounding through deep networks stays
#: below 1e-4 of it; a branch on the dtype or a dtype-dependent draw differs by O(1))
SAME_FUNCTION_RTOL = 1e-2


def check_same_function(enc: PreparedEncoder, enc64: PreparedEncoder) -> None:
    """Raise :class:`EncoderError` where the encoder's float64 copy (the exact routes', whose
    Jacobian the metrics describe) computes another function than the working-dtype encoder at
    this batch: a branch on ``x.dtype``, a draw from a seeded generator (its numbers depend on
    the dtype). The randomized and fast exact routes would then measure one function and the
    float64 oracle and rounding checks another."""
    if enc.x.dtype == torch.float64:
        return
    y, y64 = enc.y.to(torch.float64), enc64.y
    if y.shape != y64.shape:
        raise EncoderError(
            f"the encoder's float64 copy gives outputs of shape {tuple(y64.shape[1:])} where "
            f"it gives {tuple(y.shape[1:])} in {enc.x.dtype}: its forward depends on the "
            "dtype (or the copy is stale: a plain attribute changed that the validation cache "
            "does not see); dtype=torch.float64 computes the metrics in float64")
    scale = float(y64.abs().max())
    err = float((y - y64).abs().max())
    if not err <= SAME_FUNCTION_RTOL * scale + 1e-30:
        raise EncoderError(
            f"the encoder computes another function in float64 than in {enc.x.dtype}: its "
            f"outputs at this batch differ by {err:.3g} (relative {err / max(scale, 1e-300):.3g},"
            f" above {SAME_FUNCTION_RTOL:g}). The exact routes (the float64 oracle, the rounding "
            "checks) run a float64 copy. Either forward depends on the dtype (a branch on "
            "x.dtype, random numbers drawn with the input's dtype: make it independent of "
            f"it), or {enc.x.dtype} rounding itself is that large here (a cancellation: a "
            "normalisation of nearly constant values, a small difference of large numbers), "
            "so its products would measure the rounding; either way dtype=torch.float64 "
            "computes the metrics in float64")


def check_working_dtype(requested: torch.dtype) -> torch.dtype:
    """``requested`` (a ``dtype=`` asked for the products), raising unless float32 or float64
    (:func:`working_dtype` per batch; the metrics' and the guard's constructors too)."""
    if requested not in (torch.float32, torch.float64):
        raise InvalidInputError(
            f"dtype={requested} is not supported: the metrics compute Jacobian products in "
            "torch.float32 or torch.float64 (half-precision products err by far more than "
            "the intervals count; a half-precision encoder is linearised in float32 by "
            "default, dtype=None)")
    return requested


def working_dtype(encoder: Callable[[Tensor], Tensor], x: Tensor,
                  requested: torch.dtype | None = None) -> tuple[torch.dtype | None, str | None]:
    """The dtype the metrics compute Jacobian products in, and why it differs from the given one.

    ``requested=None`` keeps the encoder's and the input's dtypes, except half precision: when
    ``x`` or a floating parameter or buffer of ``encoder`` is ``float16`` / ``bfloat16`` the
    products are computed in float32 (on a float32 copy of the module, the input cast exactly).
    Half-precision products carry a rounding error far above the metrics' tolerances (measured on
    VGG5 split 2 in bfloat16: 11-23% on single diagonal entries of ``J^T J``, an FSInfo_diag
    off by more than its 95% half-width), which no randomized interval here counts; the Jacobian
    the metrics describe is the float64 one of the same weights (the oracle's), which float32
    products approximate to about 1e-6. A requested dtype must be float32 or float64.

    Returns:
        ``(dtype, note)``: the dtype to pass to :func:`prepare` (``None``: as given) and a note
        for the results' ``info["working_dtype"]`` where the dtype was changed (else ``None``).

    Raises:
        InvalidInputError: ``requested`` is not float32 or float64.
    """
    if requested is not None:
        return check_working_dtype(requested), None
    half = {getattr(x, "dtype", None)} & set(HALF_DTYPES)  # not a tensor: prepare says so
    if isinstance(encoder, nn.Module):
        half |= {t.dtype for t in _tensors(encoder) if t.dtype in HALF_DTYPES}
    if not half:
        return None, None
    names = ", ".join(sorted(str(t) for t in half))
    return torch.float32, (
        f"torch.float32 (the encoder or input is in {names}: the products are computed on a "
        "float32 copy, the input cast exactly; half-precision products err by more than the "
        "intervals count)")


def clear_validation_cache() -> None:
    """Forget every cached encoder validation (see :func:`prepare`)."""
    _VALIDATION_CACHE.clear()


def prepare(
    encoder: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    dtype: torch.dtype | None = None,
    check_interaction: int | None = None,
    cache: bool = False,
    recheck: bool = True,
) -> PreparedEncoder:
    """Validate ``encoder`` and ``x`` and return the flat per-sample function.

    The checks: a forward with autograd and a backward to prove the output depends
    differentiably on ``x``, the sample-independence check, the forward-/reverse-mode agreement
    (:func:`_check_adjoint`), the vmap check, the saved-bytes count used to size probe chunks,
    and a dtype cast's deep copy. With ``cache=True`` the ones that depend on the encoder and
    the input's shape only (the deep copy, the saved-bytes count, the vmap check) are remembered
    per encoder object and signature (input shape, dtypes, device, training flags, forward
    hooks, parameter identities and storages, see :func:`_signature`); the others run again on
    every batch (``recheck``), because their outcome can depend on the values: a clamp under
    ``no_grad`` that bites only in some batches, a batch maximum that one sample sets in one
    batch only. On such a hit the forward-/reverse-mode check is deferred to
    :meth:`PreparedEncoder.confirm` (run by :func:`~fsinfo_fast.engine.make_products` unless
    the engine's per-batch cross-check answers it). ``cached`` then says the remembered part
    was reused. A cached cast copy (``dtype``) is refreshed from the live module's parameters
    and buffers at each hit (one pass over the weights: 8-23 ms for ResNet-18's 11M parameters
    to float64 on one loaded CPU core), so an edit the key cannot see (through ``.data``) still
    reaches it.

    Args:
        encoder: ``nn.Module`` or callable mapping ``[B, *in_shape]`` to ``[B, *out_shape]``.
        x: the batch ``[B, *in_shape]``.
        dtype: working dtype; a module whose parameters have another dtype is deep-copied and cast
            (the reference uses float64). ``None`` keeps the dtypes as given.
        check_interaction: how many samples to check for independence from the rest of the batch
            (``f(x)[i] == f(x[i:i+1])``); ``None`` checks all of them.
        cache: reuse (and store) the structural checks of an earlier call with this encoder and
            signature.
        recheck: on a cache hit, run the value-dependent checks on this batch (default);
            ``False`` skips them, for a batch that was checked already in another dtype (its
            output ``y`` is then computed on first access, with the non-finite check).

    Raises:
        InvalidInputTypeError, InvalidInputError: bad ``x``.
        TrainingModeError: BatchNorm / Dropout in training mode.
        EncoderError: output not floating point, not finite, or with the wrong batch size.
        NotDifferentiableError: output not connected to ``x`` by differentiable operations.
        SampleInteractionError: a sample's output depends on the other samples.
    """
    check_encoder(encoder)
    encoder = uncompiled(encoder)
    x = check_input(x)
    check_device(encoder, x)
    check_eval_mode(encoder, x)
    with ieee_fp32(x.device):  # no TF32 in the checks' forward passes (see _precision)
        return _prepare(encoder, x, dtype=dtype, check_interaction=check_interaction,
                        cache=cache, recheck=recheck)


def check_device(encoder: Callable[[Tensor], Tensor], x: Tensor) -> None:
    """Raise :class:`InvalidInputError` when ``encoder`` is a module whose parameters and
    buffers all live on one device and ``x`` on another (a model split across devices is left
    to its own forward)."""
    if not isinstance(encoder, nn.Module):
        return
    devices = {t.device for t in _tensors(encoder)}
    if len(devices) == 1:
        (dev,) = devices
        if dev != x.device and "meta" in (dev.type, x.device.type):
            # moving anything to 'meta' drops its values, and a meta module cannot be moved
            # off it (no values to copy): the only fix is real weights on a real device
            which = ("the encoder's parameters and buffers are" if dev.type == "meta"
                     else "x is")
            raise InvalidInputError(
                f"{which} on the meta device (shapes only, no values; x on {x.device}, the "
                f"encoder on {dev}): the metrics need real values. Materialise a meta encoder "
                "on x's device (encoder.to_empty(device=...) then load_state_dict(...) with its "
                "weights, or build it there) and pass x with real values")
        if dev != x.device:
            raise InvalidInputError(
                f"x is on device {x.device} but the encoder's parameters and buffers are on "
                f"{dev}: "
                f"move one of them (x.to('{dev}') or encoder.to('{x.device}'))")


def _prepare(
    encoder: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    dtype: torch.dtype | None,
    check_interaction: int | None,
    cache: bool,
    recheck: bool = True,
) -> PreparedEncoder:
    if x.is_inference():  # made under torch.inference_mode(): autograd cannot record on it
        x = x.clone()  # (prepare runs with inference mode off, so the copy is a normal tensor)
    want = (1 << 62) if check_interaction is None else check_interaction
    upcast = dtype == torch.float64  # a float64 copy: its forward's casts stay in float64
    key = _signature(encoder, x, dtype) if cache else None
    hit = None
    if cache:
        try:
            hit = _VALIDATION_CACHE.get(encoder, {}).get(key)
        except TypeError:  # not weak-referenceable
            hit = None
    need = min(want, x.shape[0]) if x.shape[0] > 1 else 0
    # a cached cast copy carries the values of its validation: refresh it from the live module
    # (an edit the key cannot see, through .data, would otherwise give the old weights' values)
    spot: _Validated | None = None
    if hit is not None and hit.interaction_checked >= need and (
            hit.enc is None or _refresh_copy(hit.enc, encoder)):
        enc = encoder if hit.enc is None else hit.enc
        if not recheck:
            xc = x.to(dtype) if dtype is not None else x
            in_shape = tuple(xc.shape[1:])
            return PreparedEncoder(
                fn=_flat_fn(enc, in_shape, upcast), x=xc.reshape(xc.shape[0], -1).detach(),
                in_shape=in_shape, out_shape=hit.out_shape, saved_bytes=hit.saved_bytes,
                module=enc, cached=True)
        # the checks whose outcome depends on this batch's values run again below (a clamp
        # that bites, a batch max that moves, a no_grad block that changes something only
        # here); the deep copy, the saved-bytes count and the vmap check are reused
        spot = hit
    else:
        enc = _cast_encoder(encoder, dtype)
    if dtype is not None:
        x = x.to(dtype)
    batch = x.shape[0]
    in_shape = tuple(x.shape[1:])

    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        try:
            with _SavedBytes() as counter:
                # a copy: an encoder may write into its input (ReLU(inplace=True) first, x.sub_),
                # which autograd refuses on a leaf that requires grad
                with FuncRoute(upcast) if upcast else contextlib.nullcontext():
                    out = enc(xr.clone())
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:
            # (a dtype mismatch is a RuntimeError in most ops, a ValueError in nn.LSTM's check)
            mapped = func_error(err) if isinstance(err, RuntimeError) else None
            if mapped is not None:
                raise mapped from err
            msg = str(err).lower()
            if "inference tensors cannot be saved for backward" in msg:
                raise InvalidInputError(
                    "the encoder holds tensors created under torch.inference_mode() (its "
                    "parameters or buffers: a model built or loaded inside it), which autograd "
                    "cannot use; build or load the model outside inference mode (the metrics "
                    "themselves run inside it)") from err
            about_dtype = any(k in msg for k in ("dtype", "scalar type", "double", "input type",
                                                  "bfloat16", "half"))
            if dtype is not None and about_dtype:
                if isinstance(enc, nn.Module):  # (cast already: the forward mixes dtypes)
                    raise EncoderError(
                        f"the encoder's {dtype} copy failed ({err}): its forward mixes a dtype "
                        "the cast copy does not follow: a float tensor kept as a plain "
                        "attribute (not a parameter or buffer, so .to() does not cast it: "
                        "register it with register_buffer), a cast through float16 / bfloat16 "
                        "(.half().float()) or by a tensor type the copy keeps. Make the forward "
                        f"follow the input's dtype to measure in {dtype}") from err
                raise EncoderError(
                    f"the encoder failed on {dtype} input ({err}). Pass an nn.Module (it is "
                    "cast automatically) or make the callable follow the input's dtype."
                ) from err
            params = ({t.dtype for t in _tensors(enc) if t.is_floating_point()}
                      if isinstance(enc, nn.Module) else set())
            if about_dtype and len(params) == 1 and x.dtype not in params:
                (want,) = params
                raise InvalidInputError(
                    f"x is {x.dtype} but the encoder's parameters are {want} ({err}): pass "
                    f"x.to({want}), or ff.linearize(..., dtype={x.dtype}) to compute in "
                    f"{x.dtype} on a cast copy of the encoder") from err
            if not about_dtype:  # a shape error of the model's own, most likely
                _note_batch(err, x)
            _note_training(err, encoder)
            raise
        check_output(out, batch)
        grad = None
        # the dtypes computed on x's path (from the graph, before the backward frees it)
        low = _dtypes_on_path(out, xr, counter.computed) if x.dtype == torch.float64 else set()
        if out.requires_grad:
            with func_errors():
                # a seeded cotangent, not ones: the adjoint check below reads this backward,
                # and a dropped term orthogonal to the ones vector would hide from it
                u = _adjoint_u(out)
                (grad,) = torch.autograd.grad(out, xr, grad_outputs=u, allow_unused=True)
        if grad is None and out.requires_grad:  # (a graph, from the weights only)
            raise NotDifferentiableError(
                "the encoder's output does not use x: it has an autograd graph, from the "
                "encoder's own parameters, but x is not in it (the output is the same for "
                "every input, or x reaches it only through non-differentiable steps: integer "
                "indexing by x's values, argmax, rounding, a comparison, x.detach()). Check "
                "that the encoder passes its input on (a forward that reads a stored tensor, "
                "or an input keyword the model ignores)")
        if grad is None:
            raise NotDifferentiableError(
                "the encoder's output does not depend differentiably on x (no autograd path: "
                "was it computed under torch.no_grad(), detached, or via .numpy()? A layer "
                "inside torch.utils.checkpoint(..., use_reentrant=True) cut out by ff.split's "
                "hooks is computed without autograd too: use use_reentrant=False)"
            )
        check_float64_computed(x, out, low, copy=dtype is not None)
    out = out.detach()
    out_shape = tuple(out.shape[1:])
    fn = _flat_fn(enc, in_shape, upcast)
    y = out.reshape(batch, -1)
    tol = _validation_tol(x, y, enc, counter.dtypes)
    half = counter.dtypes & {torch.float16, torch.bfloat16}  # saved in half precision

    def deterministic(seeds: tuple[int, ...] = _RESEED) -> None:
        """Raise unless a second forward of the batch gives the same output (dropout in train
        mode, F.dropout(training=True), noise layers: every product would see other weights,
        and the float64 oracle returned another value at each call), under each of ``seeds``
        (torch's, NumPy's and Python's global generators seeded so for that forward and put
        back after it: an encoder that restores the RNG state it found, as a hooks split's
        whole forward does, drew the same numbers at every call from one state, and a
        layer-skipping draw, transformers' LayerDrop, was reported as samples interacting,
        helper 128)."""
        for seed in seeds:
            with _reseeded(seed, x.device), torch.no_grad():
                again = fn(x.reshape(batch, -1))
            diff = float((again - y).abs().max())
            scale = float(y.abs().max()) + 1e-30
            if not diff <= tol * scale:
                break
        if not diff <= tol * scale:
            training = isinstance(enc, nn.Module) and any(m.training for m in enc.modules())
            how = ("call model.eval() (and split again on the fx route) or remove them"
                   if training or not isinstance(enc, nn.Module) else
                   "the model is in eval mode, so the randomness does not depend on the mode "
                   "(torch.rand / randn in forward: random masking such as ViTMAE's noise, "
                   "noise layers, F.dropout(..., training=True)): pass it fixed or remove "
                   "it (ViTMAE takes noise=: split an nn.Module whose forward returns "
                   "model(pixel_values=x, noise=fixed.expand(len(x), -1)) with fixed a [1, "
                   "patches] tensor)")
            raise EncoderError(
                f"the encoder's output is not deterministic: a second forward of the same input "
                f"differs by {diff:.3g} (relative {diff / scale:.3g}). Random operations "
                "(dropout in train mode, F.dropout(..., training=True), noise layers) make the "
                f"Jacobian undefined; {how}")

    n = 0
    if spot is None:  # randomness is the encoder's, not this batch's: checked once (a batch
        # of several was checked only where a sample alone moved; an encoder that puts the RNG
        # state back gave every sample the same draws, and its values changed with the seed)
        deterministic()
    if batch > 1:
        n = batch if check_interaction is None else min(batch, check_interaction)
        _check_interaction(fn, x, y, n, tol, deterministic)
    xf, uf, gf = x.reshape(batch, -1), u.detach().reshape(batch, -1), grad.reshape(batch, -1)
    seen = gf.detach()
    if spot is not None:  # the forward-/reverse-mode check: deferred (PreparedEncoder.confirm)
        return PreparedEncoder(fn=fn, x=xf.detach(), in_shape=in_shape, out_shape=out_shape,
                               _y=y, saved_bytes=spot.saved_bytes, module=enc, cached=True,
                               adjoint=(uf, gf.detach()), seen=seen,
                               pending=[lambda: _check_adjoint(fn, xf, uf, gf, y, tol, half)])
    _check_adjoint(fn, xf, uf, gf, y, tol, half)
    _check_vmap(fn, x.reshape(batch, -1), u.reshape(batch, -1), y, tol,
                fn64=lambda: _flat_fn(_cast_encoder(enc, torch.float64), in_shape, True))
    per_sample = max(counter.total // batch, x[0].numel() * x.element_size())
    if cache:
        # a batch of one checks nothing about interaction: record 0 so a later larger batch does
        checked = (1 << 62) if (batch > 1 and n == batch and check_interaction is None) else n
        try:
            _VALIDATION_CACHE.setdefault(encoder, {})[key] = _Validated(
                out_shape, per_sample, checked, None if enc is encoder else enc)
        except TypeError:
            pass
    return PreparedEncoder(fn=fn, x=x.reshape(batch, -1).detach(), in_shape=in_shape,
                           out_shape=out_shape, _y=y, saved_bytes=per_sample, module=enc,
                           seen=seen)


def _dtypes_on_path(out: Tensor, xr: Tensor, saved: set[torch.dtype]) -> set[torch.dtype]:
    """The floating dtypes the forward computed on the path from ``xr`` (the leaf the
    encoder's input was cloned from) to ``out``: the output dtypes of the autograd graph's
    nodes that reach ``xr`` (each node's ``_input_metadata``, its gradients' dtypes, are its
    forward outputs'). A float32 tensor computed from the parameters alone (a gate's
    ``sigmoid(g)`` cast to float64) is not on it; a frozen float32 layer, whose float32
    activation autograd does not save, is. Where torch's graph does not expose that metadata,
    ``saved`` (the dtypes of tensors with a ``grad_fn`` autograd saved) stands in."""
    root = out.grad_fn
    if root is None:
        return set()
    reaches: dict[Any, bool] = {}
    dtypes: set[torch.dtype] = set()
    stack = [(root, False)]
    try:
        while stack:  # iterative post-order: a deep network's graph is deeper than recursion
            node, done = stack.pop()
            if node is None or (node in reaches and not done):
                continue
            kids = [n for n, _ in node.next_functions if n is not None]
            if not done:
                if getattr(node, "variable", None) is xr:
                    reaches[node] = True
                    continue
                reaches[node] = False  # (in progress: a graph has no cycles)
                stack.append((node, True))
                stack.extend((k, False) for k in kids if k not in reaches)
                continue
            if any(reaches.get(k, False) for k in kids):
                reaches[node] = True
                dtypes |= {m.dtype for m in node._input_metadata}
    except AttributeError:  # (no _input_metadata in this torch)
        return set(saved)
    return {dt for dt in dtypes if dt.is_floating_point or dt.is_complex}


def check_float64_computed(x: Tensor, out: Tensor, computed: set[torch.dtype],
                           copy: bool = False) -> None:
    """Raise :class:`EncoderError` where a float64 batch is computed in a lower precision
    inside the forward (``computed``: the dtypes on x's path, :func:`_dtypes_on_path`: an
    ``x.float()`` or a float32 submodule inside a callable) or returned in one: the
    metrics of a float64 batch claim float64 rounding (half-widths of 1e-15, an exact oracle
    with none), which products through float32 do not have. ``copy``: ``x`` is the float64
    copy of a batch in another dtype (the exact routes' and rounding checks'), said so."""
    if x.dtype != torch.float64:
        return
    low = {dt for dt in computed | {out.dtype} if dt not in _HIGH}
    if not low:
        return
    names = ", ".join(sorted(str(dt) for dt in low))
    if copy:
        raise EncoderError(
            f"the encoder's float64 copy (the exact routes' and rounding checks', or "
            f"dtype=torch.float64's) computes in {names} inside (tensors its forward computes, or "
            "its output, are in that dtype for a float64 input: a .half() or .bfloat16() "
            "on x's path, a cast the copy keeps, .type_as or .to another tensor; casts to "
            "float32 or complex64 keep float64 or complex128 there), so no float64 products "
            "exist for it: no float64 oracle, and the "
            "rounding of the working dtype is not measured (its fixed allowance stands). A "
            "forward that follows the input's dtype gives both")
    raise EncoderError(
        f"x is torch.float64 but the encoder computes in {names} inside (tensors its "
        "forward computes, or its output, are in that dtype: an x.float() inside a "
        "callable, a submodule in float32): its products would carry that rounding "
        "while the results claim float64's (half-widths of 1e-15, an exact oracle). Pass "
        "x in float32 (x.float(), or ff.linearize(..., dtype=torch.float32)) to measure "
        "it with that rounding counted, or ff.linearize(..., dtype=torch.float64) for its "
        "float64 copy, whose casts to float32 keep float64")


#: the validation checks' relative tolerance by the lowest precision the forward computes in
_VALIDATION_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _validation_tol(x: Tensor, y: Tensor, enc: Callable, saved: set[torch.dtype]) -> float:
    """The validation checks' relative tolerance: float32's (``1e-4``) where the input, the
    output, a floating parameter or buffer of the module or a tensor autograd saved in the
    forward (``saved``: a callable that computes in float32 inside) is below float64 (a
    float32 encoder whose forward ends in ``.double()`` rounds in float32: its modes agree to
    1e-8, not float64's 1e-9), else float64's."""
    dtypes = {x.dtype, y.dtype} | saved
    if isinstance(enc, nn.Module):
        dtypes |= {t.dtype for t in _tensors(enc) if t.is_floating_point()}
    low = any(dt != torch.float64 for dt in dtypes if dt.is_floating_point)
    return _VALIDATION_TOL[torch.float32 if low else torch.float64]


#: seeds of the determinism check's forwards (:func:`_reseeded`; it stops at the first that
#: differs): a draw that decides a whole layer (LayerDrop) repeats under one other seed with
#: probability 1/2 per layer
_RESEED = (0x5EED, 0x5EED + 1, 0x5EED + 2)


@contextlib.contextmanager
def _reseeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's CPU generator (and ``device``'s, a CUDA one), NumPy's and
    Python's global generators seeded with ``seed``, and put their states back afterwards."""
    import random

    import numpy as np

    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for i in cuda:
                torch.cuda.default_generators[i].manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _check_interaction(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, n: int, tol: float,
                       deterministic: Callable[..., None]) -> None:
    """Raise :class:`SampleInteractionError` where one of the first ``n`` samples' output
    changes when it is encoded alone instead of in the batch ``x`` (``[B, *in]``, outputs
    ``y`` ``[B, m]``), or where any sample's output changes with its position in the batch
    (one forward of the batch in reverse order, for batches of more than ``n > 0``: a mask stored
    for the batch and sliced to its size moves every sample past the first ``n`` too). Run
    at every :func:`prepare`, cached or not: whether samples interact can depend on the
    values (a batch maximum that one sample sets in one batch only)."""
    batch = x.shape[0]
    with torch.no_grad():
        for i in range(n):
            try:
                alone = fn(x[i : i + 1].reshape(1, -1))[0]
            except Exception as err:  # e.g. an exported program with a static batch size
                raise EncoderError(
                    f"the encoder ran on the batch of {batch} samples but failed on sample "
                    f"{i} alone ({type(err).__name__}: {err}). The metrics evaluate every "
                    "sample on its own (batch size 1): the encoder must accept any batch "
                    "size (a torch.export program needs a dynamic batch dimension, e.g. "
                    "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})") from err
            if alone.shape != y[i].shape:
                raise SampleInteractionError(
                    f"sample {i}'s output has {alone.numel()} values when it is encoded alone "
                    f"but {y[i].numel()} in the batch of {batch}: the encoder's output depends "
                    "on the batch size (a buffer or mask with one row per batch position?). "
                    "The metric is per sample; use an encoder that treats samples "
                    "independently")
            scale = float(y[i].abs().max()) + 1e-30
            err = float((alone - y[i]).abs().max())
            if not err <= tol * scale:
                deterministic()  # randomness, not interaction, if the batch itself varies
                # kernels pick their blocking by batch size: saturated layers (tanh at
                # large weights) turn that rounding into 1e-4 differences. A batch of the
                # same size holding only sample i rounds as the batch did, and still moves
                # sample i's output where the samples interact; and every copy in it gives
                # sample i's output, unless the encoder depends on the batch position (a
                # mask or buffer with one row per position, which sample i alone misses)
                copies = fn(x[i : i + 1].expand(batch, *x.shape[1:]).reshape(batch, -1))
                moved = float((copies - y[i]).abs().max())
                if moved <= tol * scale:
                    continue
                if float((copies[i] - y[i]).abs().max()) <= tol * scale:
                    raise SampleInteractionError(
                        f"sample {i}'s output changes by {err:.3g} (relative {err / scale:.3g}) "
                        "when it is encoded alone, and by up to "
                        f"{moved:.3g} at another position of a batch of copies of it: the "
                        "encoder depends on the batch position (a mask or buffer with one row "
                        "per position). The metric is per sample; pass each sample's own "
                        "mask with it, or use an encoder that treats samples independently")
                raise SampleInteractionError(
                    f"sample {i}'s output changes by {err:.3g} (relative "
                    f"{err / scale:.3g}) when it is encoded alone instead of in the batch: "
                    "the samples interact (batch statistics, mixing across the batch). The "
                    "metric is per sample; use an encoder that treats samples independently"
                )
    if 0 < n < batch:  # (n = 0: the caller turned the interaction checks off)
        with torch.no_grad():
            rev = fn(x.flip(0).reshape(batch, -1)).flip(0)
        scale = y.abs().amax(dim=1) + 1e-30
        moved = (rev - y).abs().amax(dim=1) if rev.shape == y.shape else None
        if moved is None or not bool((moved <= tol * scale).all()):
            deterministic()  # randomness, not interaction, if the batch itself varies
            i = 0 if moved is None else int((moved / scale).argmax())
            # (rounding that a saturated layer amplifies, where a kernel treats rows at some
            # positions differently: then every copy of sample i in a batch of its own gives
            # its output)
            with torch.no_grad():
                copies = fn(x[i : i + 1].expand(batch, *x.shape[1:]).reshape(batch, -1))
            if moved is not None and copies.shape == y.shape and float(
                    (copies - y[i]).abs().max()) <= tol * float(scale[i]):
                return
            raise SampleInteractionError(
                f"sample {i}'s output changes when the batch is encoded in reverse order "
                + ("" if moved is None else f"(by {float(moved[i]):.3g}, relative "
                   f"{float(moved[i] / scale[i]):.3g}) ")
                + "- the encoder depends on the batch position or on the other samples (a "
                "mask or buffer with one row per position, batch statistics). The metric is "
                "per sample; pass each sample's own mask with it, or use an encoder that "
                "treats samples independently")


#: torch.func / autograd failures caused by how the encoder is written: (substring of the
#: error message, what the user should know)
_FUNC_ERRORS = (
    ("would mutate a captured tensor",
     "its forward writes in place into a tensor it did not create (a buffer or an attribute, "
     "e.g. self.count += 1), which torch.func (the float64 oracle and the torch backend) "
     "refuses; keep state updates out of forward"),
    ("must override the setup_context staticmethod",
     "a custom torch.autograd.Function takes ctx in forward and has no setup_context "
     "staticmethod, which torch.func needs (PyTorch docs: 'Extending torch.func with "
     "autograd.Function'); give it one"),
    ("saved tensor hooks",
     "torch.utils.checkpoint (activation checkpointing) runs inside forward, which torch.func "
     "does not support; turn it off for the measurement (transformers: "
     "model.gradient_checkpointing_disable())"),
    ("vmap: we do not yet support",
     "an op of its forward has no batching rule in torch.func's vmap (nn.RReLU's "
     "rrelu_with_noise, for one), which the exact routes' batched one-hot products (and the "
     "torch backend's batched probes, for some ops) need; pass estimator='randomized' (its "
     "products may still run) or replace the op"),
    ("called random operation while in randomness error mode",
     "its forward draws random numbers (torch.rand*, a torch.Generator) inside torch.func's "
     "vmap, which the exact routes' batched one-hot products need; draw them once outside "
     "forward (a buffer), or pass estimator='randomized'"),
    ("use_reentrant=true, torch.utils.checkpoint is incompatible",
     "torch.utils.checkpoint(use_reentrant=True) runs inside forward, which cannot be "
     "differentiated with respect to the input alone; turn checkpointing off for the "
     "measurement (transformers: model.gradient_checkpointing_disable())"),
)


def func_error(err: BaseException) -> EncoderError | None:
    """An :class:`EncoderError` that says what in the encoder made torch.func / autograd fail
    (see :data:`_FUNC_ERRORS`), or None for another failure."""
    msg = str(err).lower()
    for key, why in _FUNC_ERRORS:
        if key in msg:
            first = str(err).strip().splitlines()[0][:200]
            return EncoderError(f"the encoder cannot be differentiated here: {why} "
                                f"({type(err).__name__}: {first})")
    return None


@contextlib.contextmanager
def func_errors():
    """Re-raise the failures of :func:`func_error` as :class:`EncoderError` (chained)."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as err:
        mapped = func_error(err)
        if mapped is None or isinstance(err, torch.OutOfMemoryError):
            raise
        raise mapped from err


#: :func:`_check_adjoint`'s tolerance in units of the validation tolerance (``1e-4`` float32,
#: ``1e-9`` float64) of the terms' absolute size: far above the modes' rounding difference
#: (about ``1e-6`` relative in float32), low enough that a dropped term of the size of the
#: Jacobian itself is rarely hidden by a small projection (at 100 a no_grad term passed in
#: 23-40% of random inits; at 1, 0-0.5%)
ADJOINT_FACTOR = 1.0

#: A float64 forward-/reverse-mode disagreement at most this share of the terms' size is read as
#: part of the forward computed below float64 (float32 rounds at ``6e-8``; HF Mamba's float32
#: scan disagreed by ``1.7e-8`` of ``u^T J v``), not as a dropped term: a no_grad term or a kink's
#: other subgradient is a share of the Jacobian itself (``1e-3`` and up in the tests)
BELOW_FLOAT64_REL = 1e-5


def _adjoint_u(out: Tensor) -> Tensor:
    """The seeded output-side vector of :func:`_check_adjoint` (shaped like ``out``)."""
    gen = torch.Generator().manual_seed(0x5EED + 1)
    u = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return u.to(dtype=out.dtype, device=out.device)


def natural_scale(x: Tensor, y: Tensor) -> Tensor:
    """``[B]`` float64 ``||y_b|| / max(||x_b||, sqrt(d))``: the size of a derivative of this
    encoder at this batch that is not rounding noise (an input at least of unit size per entry:
    a blank image is 0). A disagreement far below it is rounding, not a stop-gradient (a
    one-output similarity score at a stationary point has a Jacobian of pure noise)."""
    x64, y64 = x.detach().to(torch.float64).flatten(1), y.detach().to(torch.float64).flatten(1)
    return y64.norm(dim=1) / x64.norm(dim=1).clamp_min(math.sqrt(x64.shape[1]))


def _check_adjoint(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, grad: Tensor,
                   y: Tensor, tol: float, half: set[torch.dtype] = frozenset()) -> None:
    """Raise :class:`EncoderError` where forward-mode and reverse-mode autograd differentiate
    the encoder differently: ``u^T (J v)`` (one JVP, a seeded ``v``) against ``(J^T u)^T v``
    (``grad``, the backward of the structural check with the seeded cotangent ``u``).
    ``torch.no_grad()`` inside ``forward`` stops the reverse mode only, so the routes built on
    JVPs (the oracle, the fast exact route by columns) and those built on VJPs measured
    different Jacobians; an op whose modes pick different subgradients at a kink does the same
    on inputs exactly at it (``F.prelu`` is routed around that: :func:`prelu_as_where`). The
    tolerance is relative to the terms' size and to :func:`natural_scale` (rounding noise of a
    vanishing Jacobian is no disagreement). Skipped where forward-mode AD does not run the
    encoder (the products then go through the reverse mode only). ``half``: the float16 /
    bfloat16 dtypes of tensors the forward saved (an autocast region inside it), named."""
    gen = torch.Generator().manual_seed(0x5EED)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
    try:
        # (torch's forward mode warns DeprecationWarning on some models, e.g. torch.jit.script
        # inside a transformers ViT: where warnings are errors, as under many pytest set-ups,
        # the check below was skipped as if no forward-mode rule existed)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _, jv = torch.func.jvp(fn, (x.detach(),), (v,))
    except Exception as err:  # no forward-mode rule somewhere: nothing to compare
        if isinstance(err, Warning):  # (another warning turned into an error: not that)
            raise
        mapped = func_error(err)
        if mapped is not None:
            raise mapped from err
        return
    # over the whole batch (the identity holds for the batch map even where samples interact
    # and the interaction check did not look)
    u = u.to(torch.float64)
    uj = u * jv.detach().to(torch.float64)
    a = float(uj.sum())
    terms = grad.to(torch.float64) * v.to(torch.float64)
    b = float(terms.sum())
    natural = float((natural_scale(x, y) * u.norm(dim=1) * v.to(torch.float64).norm(dim=1))
                    .sum())
    scale = float(uj.abs().sum() + terms.abs().sum()) + natural
    if not math.isfinite(scale):  # non-finite derivatives are reported where products run
        return
    if not abs(a - b) <= ADJOINT_FACTOR * tol * scale + 1e-30:
        rel = abs(a - b) / scale
        # enough digits to show the difference (6 printed -16.8745 twice for a 1.7e-8 one)
        digits = min(17, max(6, 3 + math.ceil(-math.log10(max(rel, 1e-17)))))
        shown = f"u^T J v = {a:.{digits}g} by a JVP, {b:.{digits}g} by a VJP, over the batch"
        if x.dtype == torch.float64 and rel <= BELOW_FLOAT64_REL:
            # far above float64 rounding, far below float32's: a dropped term would not be
            # this small; part of the forward ran in float32 (HF Mamba: A_log.float())
            raise EncoderError(
                f"the encoder's forward-mode and reverse-mode derivatives differ in float64 by "
                f"{rel:.2g} relative ({shown}): far above float64 rounding but within float32's."
                " The encoder apparently computes part of its forward below float64 (a .float()"
                " or .to(torch.float32) cast inside forward, as Hugging Face Mamba's "
                "A_log.float()), so its float64 copy is not a float64 function and the exact "
                "routes (the float64 oracle, the fast exact route's rounding check) cannot be "
                "trusted on it. Use estimator='randomized' in the default float32 working dtype "
                "(not dtype=torch.float64), or remove the casts. (Without such a cast: one mode "
                "cancels digits the other keeps at this batch, e.g. a softmax whose largest "
                "probability rounds to 1; the Jacobian is then not determined in float64, and "
                "no route's interval can be trusted there: scale down the logits)")
        if half and x.dtype != torch.float64:
            names = ", ".join(sorted(str(dt) for dt in half))
            raise EncoderError(
                f"the encoder's forward-mode and reverse-mode derivatives disagree ({shown}, "
                f"relative {rel:.2g}), and its forward computes in {names} inside (a "
                "torch.autocast region, or a .half() / .bfloat16() cast): the two modes round "
                "differently there, far above the checks' tolerance. Measure it in float64 "
                "(ff.linearize(..., dtype=torch.float64): autocast leaves float64 alone, so "
                "the encoder is measured without that rounding), or remove the low-precision "
                "region")
        raise EncoderError(
            f"the encoder's forward-mode and reverse-mode derivatives disagree ({shown}, "
            f"relative {rel:.2g}): torch.no_grad()"
            " (or set_grad_enabled(False)) inside forward stops the reverse mode only, and a "
            "custom autograd.Function may define jvp and backward differently. The routes "
            "would measure different Jacobians; use .detach() for a stop-gradient (every route "
            "honours it) or remove the no_grad block. An op whose two modes take different "
            "subgradients at a kink does this too where an input lies exactly on the kink "
            "(torch._prelu_kernel at 0: slope 1 forward, its weight reverse; nn.PReLU and "
            "F.prelu are computed with one subgradient here): use nn.PReLU / F.prelu, "
            "LeakyReLU, or an op with one derivative there. Where none applies, the encoder's "
            "terms cancel in float32 (layers much larger than their product): compute in "
            "float64 (ff.linearize(..., dtype=torch.float64))")


def cdist_as_norm(x1: Tensor, x2: Tensor, p: float = 2.0, compute_mode: Any = None) -> Tensor:
    """``torch.cdist`` as the p-norm of broadcast differences: the same distances (the
    matrix-product form torch picks for large inputs differs by rounding only). PyTorch's own op
    has no forward-mode derivative, and under ``vmap`` its backward returned the first
    cotangent's result for every row (torch 2.13): the oracle and the torch backend measured a
    wrong Jacobian without an error. The torch.func routes and the engine's capture use this."""
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


def prelu_as_where(input: Tensor, weight: Tensor) -> Tensor:
    """``F.prelu`` as ``where(x > 0, x, weight * x)``: the same values bit for bit (PyTorch's
    kernel computes exactly that), and one derivative at the kink. PyTorch's own op takes slope 1
    at ``x == 0`` in forward mode and ``weight`` in reverse mode (torch 2.13; every other
    activation agrees in both), so on inputs with exact zeros (a bias-free convolution over a
    black background) the JVP routes (the oracle's columns, the fast exact route) and the VJP
    routes measured different Jacobians and the validation refused the encoder. Both modes of
    this form take ``weight`` there, as reverse mode and ``LeakyReLU`` do. A weight that does not
    fit the input goes to PyTorch's op, for its own error."""
    if weight.dim() > 1 or (weight.numel() != 1 and (
            input.dim() < 2 or weight.numel() != input.shape[1])):
        return torch.prelu(input, weight)
    if weight.numel() != 1:  # one slope per channel (dimension 1)
        weight = weight.reshape(weight.shape[0], *([1] * (input.dim() - 2)))
    else:
        weight = weight.reshape(())
    return torch.where(input > 0, input, weight * input)


def batch_norm_eval_as_affine(input: Tensor, running_mean: Tensor | None,
                              running_var: Tensor | None, weight: Tensor | None = None,
                              bias: Tensor | None = None, training: bool = False,
                              momentum: float | None = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm`` with running statistics (eval mode) as the affine map it is, ``x *
    (w / sqrt(var + eps)) + (b - mean w / sqrt(var + eps))`` per channel: the same values up to
    rounding. Under ``vmap`` PyTorch's batched backward of ``batch_norm`` is wrong where the
    cotangent reaches it through ``flatten(2).transpose(1, 2)`` (torch 2.13, relative error
    1.2: transformers LeViT's patch embedding, a convolution and BatchNorm turned into tokens),
    which the vmap check refused as a wrong batching rule. Batch statistics (training, or no
    running statistics: InstanceNorm's view) go to PyTorch's op."""
    if training or running_mean is None or running_var is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -running_mean * scale if bias is None else bias - running_mean * scale
    return input * scale.reshape(shape) + shift.reshape(shape)


#: ops PyTorch differentiates wrongly, not at all or inconsistently between its modes under
#: torch.func, and the equivalent primitives run instead (:class:`FuncRoute`; the engine's
#: capture routes them too)
FUNC_ROUTES: dict[Callable, Callable] = {torch.cdist: cdist_as_norm, torch.prelu: prelu_as_where}
#: the same, for torch.func's routes only (the engine has its own rule for them)
_TORCH_FUNC_ROUTES: dict[Callable, Callable] = {**FUNC_ROUTES,
                                                F.batch_norm: batch_norm_eval_as_affine}


#: the precisions a float64 copy's forward computes in float64 (complex128) instead where it
#: casts to them (a precision choice: RMSNorm's variance, an FFT in complex64; a cast to
#: float16 / bfloat16 is quantisation, a bit view of it can follow, and stays: the copy is then
#: refused as computing below float64)
_UPCAST = {torch.float32: torch.float64, torch.complex64: torch.complex128}
#: the tensor methods that cast to them, and their float64 counterparts
_LOW_CASTS = {Tensor.float: Tensor.double, Tensor.cfloat: Tensor.cdouble}
#: the dtypes of a float64 copy's own tensors
_HIGH = (torch.float64, torch.complex128)
#: functions that make a new tensor of a given dtype from another's shape or device: their
#: values (a seeded draw) depend on the dtype, which the float64 copy keeps
_MAKERS = (Tensor.new_empty, Tensor.new_zeros, Tensor.new_ones, Tensor.new_full,
           Tensor.new_tensor, torch.empty_like, torch.zeros_like, torch.ones_like,
           torch.full_like, torch.rand_like, torch.randn_like, torch.randint_like)


class FuncRoute(TorchFunctionMode):
    """While the encoder runs under torch.func, ops PyTorch differentiates wrongly or not at all
    there are computed by equivalent primitives (:data:`FUNC_ROUTES`: ``torch.cdist`` by
    :func:`cdist_as_norm`, ``F.prelu`` by :func:`prelu_as_where`).

    ``upcast`` (a float64 copy: the oracle's, the rounding checks', ``dtype=torch.float64``'s):
    a cast of a float64 (or integer) tensor to float32 inside forward (``.float()``,
    ``.to(torch.float32)``, a ``dtype=torch.float32`` argument of an op on it: the Hugging Face
    LLaMA/T5 RMSNorm computes its variance so whatever the dtype, Mamba its scan; also
    ``.type(torch.FloatTensor)``) keeps float64, and one to complex64 (an FFT) complex128, so
    the copy is the same computation in float64 throughout (its products had float32
    rounding, and the copy was refused as no oracle). Constants made in a dtype (a seeded
    ``randn(..., dtype=torch.float32)``) keep it: their values would change."""

    def __init__(self, upcast: bool = False) -> None:
        super().__init__()
        self.upcast = upcast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        # (a cast of a float64 tensor, or of an integer or bool one, position ids, a mask: a
        # constant drawn or made in float32, randn(..., dtype=torch.float32, generator=g),
        # h.new_empty(..., dtype=torch.float32).normal_(generator=g), keeps its values)
        if (self.upcast and isinstance(first, Tensor) and func not in _MAKERS
                and (first.dtype in _HIGH
                     or not (first.is_floating_point() or first.is_complex()))):
            if func in _LOW_CASTS:
                func = _LOW_CASTS[func]
            elif func is Tensor.type:  # .type(torch.FloatTensor) / .type("torch.FloatTensor")
                args = (first, *(_tensor_type64(a) for a in args[1:]))
            else:
                args = tuple(_UPCAST.get(a, a) if isinstance(a, torch.dtype) else a
                             for a in args)
                dt = kwargs.get("dtype")
                if isinstance(dt, torch.dtype) and dt in _UPCAST:
                    kwargs = {**kwargs, "dtype": _UPCAST[dt]}
        route = _TORCH_FUNC_ROUTES.get(func)
        if route is not None:
            return route(*args, **kwargs)
        return func(*args, **kwargs)


def _tensor_type64(t: Any) -> Any:
    """The float64 counterpart of a ``Tensor.type`` argument that names float32: a legacy
    tensor type (``torch.FloatTensor``, ``torch.cuda.FloatTensor``), its name, or a dtype;
    anything else as it is."""
    if isinstance(t, torch.dtype):
        return _UPCAST.get(t, t)
    name = t if isinstance(t, str) else (
        f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', '')}" if isinstance(t, type)
        else None)
    if name in ("torch.FloatTensor", "torch.cuda.FloatTensor"):
        return name.replace("FloatTensor", "DoubleTensor")
    return t


def _flat_fn(enc: Callable[[Tensor], Tensor], in_shape: tuple[int, ...], upcast: bool = False):
    def fn(flat: Tensor) -> Tensor:
        # a copy: an encoder that writes into its input (x.sub_(), ReLU(inplace=True) first)
        # would move the linearisation point (and the caller's x) at every product
        with FuncRoute(upcast):
            out = enc(flat.reshape(flat.shape[0], *in_shape).clone())
        return out.reshape(flat.shape[0], -1)

    return fn


#: PyTorch's note that an op has no batching rule, so ``vmap`` runs it in a loop (transformers'
#: scaled_dot_product attention backward on a CPU): slower, the same values
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching"


@contextlib.contextmanager
def quiet_vmap_loop() -> Iterator[None]:
    """Silence :data:`_NO_BATCHING_RULE` inside (every transformers attention model printed
    it at validation, as if something were wrong)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE, category=UserWarning)
        yield


def _vmap_disagreement(fn: Callable[[Tensor], Tensor], x0: Tensor, u0: Tensor,
                       y0: Tensor) -> tuple[float, float] | None:
    """``(err, scale)``: the largest difference between torch.func's batched (vmap) VJP of
    ``u0`` (the second of two cotangents) and the unbatched one of the same pullback at the
    single sample ``x0`` (``[1, d]``; ``u0`` ``[1, m]``, ``y0`` its output), and the scale it
    is relative to; ``None`` where vmap or torch.func cannot run the encoder."""
    other = torch.flip(u0, dims=(1,)) + 0.5
    try:
        with torch.enable_grad():
            _, pull = torch.func.vjp(fn, x0)
            with quiet_vmap_loop():
                got = torch.func.vmap(lambda w: pull(w)[0])(torch.stack([other, u0]))[1]
            ref = pull(u0)[0]
    except Exception:  # noqa: BLE001  (no batching rule, no torch.func support: said elsewhere)
        return None
    # the same forward for both: only the batching of the backward differs (a batch-size
    # dependent primal would make saturated layers' rounding look like a disagreement)
    got, ref = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max()) + float(natural_scale(x0, y0)[0]) * float(u0.abs().max())
    return err, scale


def _check_vmap(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, y: Tensor,
                tol: float, fn64: Callable[[], Callable[[Tensor], Tensor]] | None = None
                ) -> None:
    """Raise :class:`EncoderError` where torch.func's batched VJPs (``vmap``, as the torch
    backend, the oracle and the engine's per-node fallbacks run them) differ from the same
    pullback applied to one cotangent on sample 0: a wrong batching rule in PyTorch gives every
    route built on it a wrong Jacobian without an error (``torch.cdist`` did, before
    :class:`FuncRoute`). The validation cotangent is the second of two, so a rule that repeats
    the first row is caught.
    Skipped where vmap cannot run the encoder at all (the routes then raise or loop).

    A batch below float64 that fails is checked again in float64 (``fn64()``: the encoder's
    float64 copy): where the two agree there, the difference was the working dtype's
    rounding (a cancellation, ``a(x) - b(x)`` of nearly equal layers, a normalisation of
    nearly constant values, whose products two summation orders round differently), not a
    batching rule; the rounding checks then measure what it does to the metrics."""
    x0, u0 = x[:1].detach(), u[:1]
    found = _vmap_disagreement(fn, x0, u0, y[:1])
    if found is None:
        return
    err, scale = found
    if not math.isfinite(scale) or err <= tol * scale + 1e-30:
        return
    why = ""
    if x.dtype != torch.float64 and fn64 is not None:
        try:
            f64 = fn64()
            x64, u64 = x0.to(torch.float64), u0.to(torch.float64)
            with torch.no_grad():
                y64 = f64(x64)
            again = _vmap_disagreement(f64, x64, u64, y64)
        except Exception as e:  # noqa: BLE001  (a callable that cannot run in float64)
            again, why = None, f" (its float64 copy cannot run: {type(e).__name__}: {e})"
        if again is not None:
            err64, scale64 = again
            if math.isfinite(scale64) and err64 <= _VALIDATION_TOL[torch.float64] * scale64 \
                    + 1e-300:
                return  # rounding: float64 agrees
        elif not why:
            why = " (its float64 copy cannot run under vmap)"
    if x.dtype != torch.float64 and (fn64 is None or why):
        raise EncoderError(
            f"torch.func's batched (vmap) backward of this encoder differs from its unbatched "
            f"one by {err:.3g} (relative {err / max(scale, 1e-300):.3g}) on sample 0: an op in "
            "it has a wrong vmap batching rule in this PyTorch, or its "
            f"{x.dtype} rounding is that large (a cancellation: a difference of nearly equal "
            "layers, a normalisation of nearly constant values), which the float64 copy "
            f"would tell apart{why}. Pass an nn.Module (cast to float64 for the check) or "
            "dtype=torch.float64; a wrong rule: write the op with other primitives")
    raise EncoderError(
        f"torch.func's batched (vmap) backward of this encoder differs from its unbatched "
        f"one by {err:.3g} (relative {err / max(scale, 1e-300):.3g}) on sample 0, in float64"
        f"{'' if x.dtype == torch.float64 else ' too'}: an op in it has a wrong vmap "
        "batching rule in this PyTorch, and every route built on torch.func would measure a "
        "wrong Jacobian. Write the op with other primitives")
