r"""FSInfoGuard, the paper's defense: isotropic Gaussian noise calibrated to a target FSInfo.

The smashed data becomes ``z = f(x) + sigma * eps`` with ``eps ~ N(0, I)`` and ``sigma`` chosen in
closed form so that FSInfo equals a target ``tau`` (``-1`` nats/dim by default):

.. math:: \sigma^*(x) = \exp(\mathrm{FSInfo}_{\sigma=1}(x) - \tau)

Two modes: per sample (``sigma*`` computed for every input at every forward; the definition) or
data-set level (``calibrate(data)`` once, then one fixed sigma: the maximum of ``sigma*`` over the
calibration set, or a quantile of it).

``sigma*`` comes from :meth:`fsinfo_fast.Linearization.fsinfo_sigma` (one
:class:`~fsinfo_fast.Linearization` per batch) and the data-set sigma from
:meth:`fsinfo_fast.result.SigmaResult.dataset`: the guard has no arithmetic of its own.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .encoder import check_encoder, check_input, check_output
from .errors import InvalidInputError, InvalidInputTypeError, SingularFisherWarning, warn_user
from .formulas import DIAG_FLOOR, HALF_LOG_2PIE
from .result import SigmaResult, check_q

__all__ = ["FSInfoGuard", "GaussianNoise", "add_noise", "concat_sigma_results"]



def _noise_sigma(sigma: float | Tensor) -> Tensor:
    """``sigma`` as a float64 tensor, refused unless a real number (or tensor) finite and >= 0
    (a negative sigma added noise of ``|sigma|``, NaN or inf made the output NaN/inf)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (numbers.Real, Tensor)) or (
            isinstance(sigma, Tensor) and (sigma.is_complex() or sigma.dtype == torch.bool)):
        raise InvalidInputTypeError(f"sigma must be a float or a [B] tensor, got {sigma!r}")
    exact = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool((torch.isfinite(exact) & (exact >= 0)).all()):
        raise InvalidInputError(f"sigma must be finite and >= 0, got {sigma!r}")
    return exact


def add_noise(z: Tensor, sigma: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``z + sigma * N(0, I)`` with ``sigma`` a float or a per-sample ``[B]`` tensor.

    ``generator`` may live on another device than ``z`` (the noise is drawn on the generator's
    device and moved to ``z``'s)."""
    exact = _noise_sigma(sigma).to(z.device)
    if exact.ndim > 1 or (exact.ndim == 1 and exact.shape[0] != z.shape[0]):
        raise InvalidInputError(
            f"sigma has shape {tuple(exact.shape)} for a batch of {z.shape[0]} samples (a float "
            "or [B])")
    # sigma beyond z's dtype (65504 in float16, 3.4e38 in float32) is inf there: the smashed
    # data would be inf, which is no noise level at all
    top = torch.finfo(z.dtype).max if z.is_floating_point() else None
    if top is not None and bool((exact > top).any()):
        raise InvalidInputError(_overflow_message(float(exact.max()), z.dtype, top))
    # in z's dtype, rounded up: a half-precision model must not get less noise than asked
    sigma = exact.to(z.dtype)
    sigma = torch.where(sigma.to(torch.float64) < exact,
                        torch.nextafter(sigma, torch.full_like(sigma, math.inf)), sigma)
    scale = sigma.reshape(-1, *([1] * (z.ndim - 1))) if sigma.ndim == 1 else sigma
    # a generator draws on its own device (a CPU generator for a model on the GPU is common):
    # the noise is drawn there and moved, so the same generator state gives the same noise
    where = z.device if generator is None else generator.device
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=where).to(z.device)
    out = z + scale * noise
    # sigma below the dtype's max can still overflow it once times a draw (|eps| > 1) or added
    # to z: refused, never returned as inf
    # (one reduction on the common path; the masked comparison only where something is inf)
    if (top is not None and not bool(torch.isfinite(out).all())
            and not bool(torch.isfinite(out[torch.isfinite(z)]).all())):
        raise InvalidInputError(_overflow_message(float(exact.max()), z.dtype, top))
    return out


def _overflow_message(sigma: float, dtype: torch.dtype, top: float) -> str:
    return (f"noise of sigma {sigma:.4g} overflows the output's dtype {dtype} (largest finite "
            f"value {top:.4g}): the noisy smashed data would be inf. Compute the encoder's output "
            "in a wider dtype (e.g. encoder.float() or .double()), or, with FSInfoGuard, choose "
            "a higher target (less noise)")


class GaussianNoise(nn.Module):
    """A layer adding ``sigma * N(0, I)``: the guard's noise placed inside a model.

    With :func:`fsinfo_fast.split.insert` it puts the defense at a split point of a whole model,
    e.g. to measure the accuracy cost of a calibrated sigma. ``sigma`` is a float or a ``[B]``
    tensor for the next batch (set the attribute between batches).

    Example:
        >>> import torch
        >>> from fsinfo_fast.models import vgg5
        >>> from fsinfo_fast.split import insert
        >>> noisy = insert(vgg5().eval(), 2, GaussianNoise(0.5))
        >>> noisy(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, sigma: float | Tensor = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        _noise_sigma(sigma)
        self.sigma = sigma
        self.generator = generator

    def forward(self, z: Tensor) -> Tensor:
        return add_noise(z, self.sigma, self.generator)


_HELD_REGISTRY: dict = {}  # (the re-emitted warnings' "once per location" record)


@contextlib.contextmanager
def _singular_warning_held():
    """Hold the warnings raised inside (under the caller's filters) and re-emit them on the way
    out; where the block raises, a :class:`SingularFisherWarning` is dropped: the guard's
    refusal names the same cause (it warned and then raised)."""
    held: list = []
    failed = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            except BaseException:
                failed = True
                raise
            finally:
                held = list(caught)
    finally:  # (also where the block raised: every other warning still reaches the user)
        for w in held:
            if not (failed and issubclass(w.category, SingularFisherWarning)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                       registry=_HELD_REGISTRY, source=w.source)


def _of(flags: Tensor) -> str:
    """`` for k of n`` samples flagged, or nothing for one value (a calibrated statistic: "1
    of 1" read as if the calibration set had one sample)."""
    return f" for {int(flags.sum())} of {flags.numel()}" if flags.numel() > 1 else ""


def concat_sigma_results(results: Sequence[SigmaResult]) -> SigmaResult:
    """The per-sample noise scales of several batches as one :class:`SigmaResult`.

    Args:
        results: one or more results of the same metric (e.g. one per batch).

    Returns:
        A :class:`SigmaResult` whose ``[N]`` tensors are the batches' concatenated (on the CPU);
        ``estimator`` is the common one, or ``"mixed"`` (e.g. ``auto`` chose the oracle for
        some batches); ``info["batches"]`` holds the batches' own ``info``.
    """
    if not results:
        raise InvalidInputError("no noise scales to concatenate (no batches)")
    metrics = {r.metric for r in results}
    if len(metrics) > 1:
        raise InvalidInputError(f"cannot concatenate noise scales of different metrics "
                                f"{sorted(metrics)}")
    estimators = {r.estimator for r in results}

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(r, name).detach().cpu() for r in results])

    return SigmaResult(sigma=cat("sigma"), target=cat("target"), metric=results[0].metric,
                       estimator=estimators.pop() if len(estimators) == 1 else "mixed",
                       ci_low=cat("ci_low"), ci_high=cat("ci_high"), converged=cat("converged"),
                       info={"batches": [r.info for r in results]})


def _is_pair(data: Any) -> bool:
    """``(x, y)``: one batch of inputs with its labels or targets, not two batches.

    Two tensors, float inputs first, with as many samples each: a pair when ``y`` is not
    floating point (class labels) or has another shape than ``x`` (float regression targets).
    Float ``y`` of ``x``'s very shape (an autoencoder's targets, or two equal input batches):
    a list stays a list of two batches (as lists of batches always were), a tuple is ambiguous
    and refused."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data) and data[0].is_floating_point()
            and data[1].shape[:1] == data[0].shape[:1]):
        return False
    if not data[1].is_floating_point() or data[1].shape != data[0].shape:
        return True
    if isinstance(data, list):
        return False
    raise InvalidInputError(
        f"calibrate() got two float tensors of the same shape {tuple(data[0].shape)}: an "
        "(x, y) pair with float targets y, or two batches of inputs? Pass x alone "
        "(calibrate(x)) for one batch, or a list [x1, x2] (or a DataLoader) for two")


#: the float input of a Hugging Face style batch (a mapping), by model kind: images, text fed
#: embeddings, raw audio, audio features (text and audio were refused, helper 128)
INPUT_KEYS = ("pixel_values", "inputs_embeds", "input_values", "input_features")


def _batches(data: Tensor | Iterable, input_name: str | None = None) -> Iterable[Tensor]:
    if isinstance(data, (Tensor, Mapping)) or _is_pair(data):
        data = [data]
    for k, item in enumerate(data):
        if isinstance(item, Mapping):  # a Hugging Face style batch
            keys = ([input_name] if input_name in item else
                    [key for key in INPUT_KEYS if key in item])
            if len(keys) != 1:
                known = ((input_name,) if input_name else ()) + INPUT_KEYS
                raise InvalidInputError(
                    f"a calibration batch is a mapping with "
                    f"{'none' if not keys else 'several'} of the input keys "
                    f"{', '.join(map(repr, known))} (keys {sorted(map(str, item))}): pass "
                    "tensors, (x, y) pairs or mappings with one of them (the split's "
                    "input_name= if it has one)")
            item = item[keys[0]]
        item = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(item, Tensor) or not item.is_floating_point():
            what = (f"a {item.dtype} tensor (labels?)" if isinstance(item, Tensor)
                    else type(item).__name__)
            raise InvalidInputTypeError(
                f"calibration batch {k} is {what}, not a float tensor of inputs: pass one "
                "tensor, an (x, y) pair, a mapping with 'pixel_values' (or another input key), "
                "or an iterable of these")
        yield item


class FSInfoGuard(nn.Module):
    """Wrap an encoder so its output carries noise calibrated to a target FSInfo.

    An encoder :func:`fsinfo_fast.split` cut with forward hooks (a model torch.fx cannot
    trace, e.g. a ``transformers`` model) holds the whole model: with the default
    ``occurrence=-1`` each call runs the model's whole forward, the layers after the cut
    included, and the guard's ``state_dict`` carries every weight. For a client-side guard, cut
    with ``occurrence=0`` (the forward stops at the cut) and ship the calibrated ``sigma`` (the
    only state the guard adds) beside the client's own part of the model.

    Args:
        encoder: the bottom part of the model (``[B, ...] -> [B, ...]``, eval mode).
        target: target FSInfo ``tau`` in nats per input dimension.
        variant: ``"diag"`` (the paper's) or ``"logdet"``.
        sigma: a fixed noise scale to start with (data-set mode); ``None`` means per-sample mode
            until :meth:`calibrate` is called.
        generator: ``torch.Generator`` for the noise (reproducible outputs).
        metric_kwargs: ``backend``, ``seed``, ``memory_budget`` and ``dtype`` go to
            :func:`fsinfo_fast.linearize`, the rest (``estimator``, ``atol``, ``prior_var``,
            ...) to :meth:`fsinfo_fast.Linearization.fsinfo_sigma`.

    Example:
        >>> import torch, fsinfo_fast as ff
        >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).double().eval()
        >>> guard = ff.FSInfoGuard(enc, target=-1.0, estimator="exact")
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> sigma = guard.sigma_for(x)
        >>> ff.fsinfo(enc, x, sigma=sigma, estimator="exact").value.round(decimals=6).tolist()
        [-1.0, -1.0, -1.0]
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[Tensor], Tensor],
        target: float = -1.0,
        variant: str = "diag",
        *,
        sigma: float | None = None,
        generator: torch.Generator | None = None,
        **metric_kwargs,
    ) -> None:
        super().__init__()
        from .linearization import check_metric_keywords, seed_once

        check_encoder(encoder)
        check_metric_keywords({**metric_kwargs, "variant": variant}, "fsinfo_sigma",
                              "FSInfoGuard", extra=("sample_ids",))
        for name, v in (("target", target), ("sigma", sigma)):
            # sigma=None is per-sample mode; target has no None (it is what the noise reaches)
            if (v is not None or name == "target") and (isinstance(v, bool)
                                                          or not isinstance(v, numbers.Real)):
                raise InvalidInputTypeError(f"{name} must be a float, got {v!r}")
        if not math.isfinite(target):
            raise InvalidInputError(f"target must be a finite FSInfo in nats/dim, got {target!r}")
        self.encoder = encoder
        self.target = float(target)
        self.variant = variant
        self.generator = generator
        self.metric_kwargs = seed_once(metric_kwargs)  # (a Generator: drawn once)
        self.register_buffer("sigma", torch.tensor(math.nan if sigma is None else float(sigma),
                                                   dtype=torch.float64))
        self.last_sigma: Tensor | None = None
        #: what :meth:`calibrate` measured (None before it; not in the state dict, which keeps
        #: the calibrated ``sigma`` only)
        self.calibration: dict[str, Any] | None = None
        if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
            raise InvalidInputError(f"sigma must be finite and >= 0, got {sigma!r}")

    _VARIANT_CODES = ("diag", "logdet")

    def _calibrated_for(self) -> Tensor:
        """What a ``sigma`` reaches the target under, as the state dict keeps it (its extra
        state, ``<prefix>_extra_state``): ``[target, variant (0 diag, 1 log det), floor,
        prior_var (NaN: none)]``, float64 on the CPU (a tensor: checkpoint fingerprints,
        ``torch.load(weights_only=True)`` and distributed checkpoints take it)."""
        prior = self.metric_kwargs.get("prior_var")
        code = self._VARIANT_CODES.index(self.variant) if self.variant in \
            self._VARIANT_CODES else math.nan
        return torch.tensor([float(self.target), float(code),
                             float(self.metric_kwargs.get("floor", DIAG_FLOOR)),
                             math.nan if prior is None else float(prior)],
                            dtype=torch.float64, device="cpu")

    def _describe_settings(self, t: Tensor) -> dict[str, Any]:
        v = t.detach().cpu().double().tolist()
        code = int(v[1]) if math.isfinite(v[1]) and 0 <= v[1] < len(self._VARIANT_CODES) \
            else None
        return {"target": v[0], "variant": None if code is None else self._VARIANT_CODES[code],
                "floor": v[2], "prior_var": None if math.isnan(v[3]) else v[3]}

    def get_extra_state(self) -> Tensor:
        return self._calibrated_for()

    def set_extra_state(self, state: Any) -> None:
        pass  # (checked in _load_from_state_dict, before anything loads)

    def _saved_settings(self, state_dict: dict, prefix: str) -> Tensor | None:
        """The settings a state dict holds for this guard (its extra state), or None; the
        extra state key set (a state dict saved before the settings were kept loads as before,
        also under ``strict=True``)."""
        key = prefix + "_extra_state"
        theirs = state_dict.get(key)
        state_dict[key] = self._calibrated_for()
        return theirs if isinstance(theirs, Tensor) else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Refuse, before anything of this guard loads, a ``sigma`` set for another target,
        variant, floor or prior (it reaches that guard's target, not this one's: less noise
        than this guard promises, helper 121). A per-sample guard's (``sigma`` NaN), a state
        dict without ``sigma`` (``strict=False``) or without the settings (saved before they
        were kept) loads as before."""
        theirs = self._saved_settings(state_dict, prefix)
        sigma = state_dict.get(prefix + "sigma")
        if (theirs is not None and isinstance(sigma, Tensor) and not theirs.is_meta
                and not sigma.is_meta and theirs.numel() == 4 and sigma.numel() == 1
                and not bool(torch.isnan(sigma.detach().cpu()).all())):
            mine = self._calibrated_for()
            if not torch.allclose(theirs.detach().cpu().double(), mine, rtol=0.0, atol=0.0,
                                  equal_nan=True):
                saved, own = self._describe_settings(theirs), self._describe_settings(mine)
                diff = ", ".join(f"{k} {saved[k]!r} vs {v!r}" for k, v in own.items()
                                 if saved[k] != v)
                raise InvalidInputError(
                    f"this state dict's sigma {float(sigma):.6g} was set for an FSInfoGuard of "
                    f"other settings ({diff}, saved vs this guard): it does not reach this "
                    "guard's target; build the guard with the saved settings, or calibrate "
                    "this one")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        """``.half()``, ``.to(dtype)`` and the like leave the calibrated sigma in float64 (a
        float16 copy rounded it down: less noise than calibrated); devices move as usual."""
        keep = self.sigma
        super()._apply(fn, recurse)
        self.sigma = keep.to(device=self.sigma.device, dtype=torch.float64)
        return self

    def extra_repr(self) -> str:
        mode = ("sigma=<meta>" if self.sigma.is_meta else "sigma=per-sample sigma*"
                if self.per_sample else f"sigma={float(self.sigma):.6g}")
        return f"target={self.target:g}, variant={self.variant!r}, {mode}"

    @property
    def per_sample(self) -> bool:
        """True until a data-set sigma is set (by ``sigma=`` or :meth:`calibrate`)."""
        return bool(torch.isnan(self.sigma))

    def sigma_result(self, x: Tensor, sample_ids: Tensor | None = None) -> SigmaResult:
        """Per-sample ``sigma*`` of the batch ``x`` with its 95% interval: one
        :class:`~fsinfo_fast.Linearization` of the encoder at ``x``, its
        :meth:`~fsinfo_fast.Linearization.fsinfo_sigma`.

        Args:
            x: the batch ``[B, ...]``.
            sample_ids: ``[B]`` global sample ids seeding each sample's probes (default
                ``arange(B)``).
        """
        from .linearization import LINEARIZE_KEYWORDS, linearize

        kw = dict(self.metric_kwargs)
        lin_kw = {k: kw.pop(k) for k in LINEARIZE_KEYWORDS if k in kw}
        default_ids = kw.pop("sample_ids", None)
        ids = default_ids if sample_ids is None else sample_ids
        lin = linearize(self.encoder, x, sample_ids=ids, **lin_kw)
        return lin.fsinfo_sigma(self.target, variant=self.variant, **kw)

    def sigma_for(self, x: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        """``[B]`` per-sample ``sigma*`` for the batch ``x`` (float64; see
        :meth:`sigma_result`), as they are: ``inf`` where no finite noise reaches the target,
        0 where FSInfo is ``-inf`` at every sigma (the log det without a prior where ``m <
        d``). :meth:`forward` and :meth:`calibrate` refuse to use such values (the guard would
        add inf/NaN noise, or none to samples that leak) with the reason."""
        return self.sigma_result(x, sample_ids).sigma

    @torch.no_grad()
    def calibrate(
        self, data: Tensor | Iterable, statistic: str = "max", q: float = 0.95, *,
        conservative: bool = False,
    ) -> float:
        """Set one data-set sigma from a calibration set and return it.

        The per-sample ``sigma*`` (batch ``i`` of ``data`` seeded with the sample ids that
        continue those of the batches before it) are concatenated and reduced by
        :meth:`fsinfo_fast.result.SigmaResult.dataset`; ``self.calibration`` keeps them
        (``"sigmas"``, and the whole :class:`~fsinfo_fast.result.SigmaResult` as ``"result"``).

        Args:
            data: a tensor batch, an ``(x, y)`` pair, a Hugging Face style mapping with
                ``pixel_values`` (or ``inputs_embeds``, ``input_values``, ``input_features``, the
                split's ``input_name``), or an iterable of any of these (a DataLoader). ``y`` are
                labels or float targets of another shape than ``x``; a tuple of two float
                tensors of one shape is refused as ambiguous (pass ``x`` alone, or
                ``[x1, x2]`` for two batches).
            statistic: ``"max"`` (every calibration sample's estimate reaches the target or
                below: within the estimator's tolerance, ``atol`` 0.01 nats/dim by default) or
                ``"quantile"`` (a fraction ``q`` of them does) or ``"mean"``.
            q: the quantile for ``statistic="quantile"``.
            conservative: reduce the upper ends of the per-sample 95% intervals of ``sigma*``
                instead of the estimates (:meth:`~fsinfo_fast.result.SigmaResult.dataset`):
                more noise, so that estimation error does not lower the protection.
        """
        if not isinstance(conservative, bool):
            raise InvalidInputTypeError(f"conservative must be True or False, got "
                                        f"{conservative!r}")
        if statistic not in ("max", "quantile", "mean"):
            raise InvalidInputError(
                f"statistic must be 'max', 'quantile' or 'mean', got {statistic!r}"
            )
        if statistic == "quantile":
            q = check_q(q)  # as SigmaResult.dataset will, before the work
        with _singular_warning_held():
            results, seen = [], 0
            for batch in _batches(data, getattr(self.encoder, "input_name", None)):
                ids = torch.arange(seen, seen + batch.shape[0])
                results.append(self.sigma_result(batch, sample_ids=ids))
                seen += batch.shape[0]
            if not results:
                raise InvalidInputError("calibrate() got no data")
            res = concat_sigma_results(results)
            value = res.dataset(statistic, q, conservative=conservative)
            if conservative and not math.isfinite(value):
                # (an estimate whose interval has no upper end: not a target beyond float64)
                open_ = torch.isinf(res.ci_high) & torch.isfinite(res.sigma)
                if bool(open_.any()):
                    raise InvalidInputError(
                        f"conservative=True: {int(open_.sum())} of the calibration set's "
                        f"{len(res)} sigma* (sample(s) "
                        f"{open_.nonzero().flatten().tolist()[:20]}) have an interval without "
                        "an upper end: their estimate claims none there "
                        "(converged=False in the per-sample results; e.g. the float64 oracle's "
                        "rounding exceeds the columns of a saturated activation), so no finite "
                        "conservative sigma follows. Use conservative=False (their estimates), "
                        "statistic='quantile', or leave those samples out")
            self._check_reachable(torch.tensor([value], dtype=torch.float64),
                                  f"the {statistic} of the calibration set's sigma*")
        bad = int((~res.converged).sum())
        if bad:  # (a sigma* whose interval missed the tolerance: rounding, the probe cap)
            warn_user(
                f"calibrate: {bad} of the calibration set's {len(res)} sigma* did not meet the "
                "tolerance (converged=False in calibration['result']: their intervals are "
                "wider than asked); the data-set sigma uses them"
                + ("" if conservative else " (conservative=True reduces their upper ends)"),
                RuntimeWarning)
        self.sigma.fill_(value)
        self.calibration = {"statistic": statistic, "q": q, "conservative": conservative,
                            "n": len(res),
                            "sigmas": res.sigma, "result": res}
        return value

    def _check_reachable(self, sigma: Tensor, what: str) -> None:
        """Raise where no finite noise reaches the target (an infinite ``sigma*``: the noise
        would turn the smashed data into inf/NaN), and where ``sigma*`` is 0 because FSInfo is
        -inf at every sigma (``floor=0``, or the log det without a prior: the guard would add no
        noise to samples that leak); a sample whose Jacobian is 0 needs none."""
        zero = sigma == 0
        # with a floor (diag) or a prior (log det) sigma* = 0 only where the output does not
        # depend on the input at all: no noise is needed there, and none is added
        if self.variant == "diag":
            degenerate = self.metric_kwargs.get("floor", DIAG_FLOOR) == 0
        else:
            degenerate = self.metric_kwargs.get("prior_var") is None
        if degenerate and bool(zero.any()):
            why = ("J^T J is singular, e.g. m < d, and there is no prior" if
                   self.variant == "logdet" else "an input dimension does not reach the output "
                   "and floor=0 puts log 0 = -inf in the mean")
            fix = ("Use the diag variant (the paper's) or give a prior variance (the finite "
                   "Bayesian log det)" if self.variant == "logdet" else
                   "Keep the default floor (1e-10, the paper's) or a positive one")
            raise InvalidInputError(
                f"{what} is 0{_of(zero)}: FSInfo_{self.variant} is "
                f"-inf at every sigma there ({why}), so every target holds without noise and "
                f"the guard would add none. {fix}")
        bad = ~torch.isfinite(sigma)
        if bool(bad.any()):
            # FSInfo(sigma) -> log(c)/2 - log(2 pi e)/2 as sigma -> inf, c the constant inside
            # the log (formulas.sigma_for_target): the floor (diag) or 1/prior_var (log det)
            if self.variant == "diag":
                c = float(self.metric_kwargs.get("floor", DIAG_FLOOR))
                name, formula = f"the floor {c:g}", "log(floor)/2 - log(2 pi e)/2"
            else:
                prior_var = self.metric_kwargs.get("prior_var")
                c = 0.0 if prior_var is None else 1.0 / float(prior_var)
                name = f"the prior variance {prior_var!r}"
                formula = "-log(prior_var)/2 - log(2 pi e)/2"
            limit = 0.5 * math.log(c) - HALF_LOG_2PIE if c > 0 else -math.inf
            if self.target <= limit:
                why = (f"FSInfo_{self.variant} never goes below the asymptote {formula} "
                       f"({limit:.4g} nats/dim for {name}); choose a target above it")
            else:  # no asymptote, or a target just above it: sigma* overflowed float64
                asym = (f"an asymptote of {limit:.4g} nats/dim for {name}" if c > 0 else
                        f"no asymptote for {name}")
                why = (f"the sigma* that reaches it exceeds float64's range (FSInfo_"
                       f"{self.variant} has {asym}); choose a higher target")
            raise InvalidInputError(
                f"no finite noise brings FSInfo to the target {self.target:g} nats/dim ({what} "
                f"is inf{_of(bad)}): {why}")

    def forward(self, x: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        """``f(x) + sigma * N(0, I)``; ``sigma`` per sample or the calibrated data-set value.

        In per-sample mode each sample's ``sigma*`` is estimated from probes seeded by its
        sample id: ``sample_ids`` (``[B]``), else the ``sample_ids`` given at construction,
        else its position in the batch (``arange(B)``), so the same input at another position
        gets another estimate of the same ``sigma*`` (within its interval). Give ids (e.g. a
        data set's indices) where an input must get the same noise scale whatever its batch.
        A data-set sigma ignores them."""
        if not isinstance(x, Tensor):  # (a list met x.detach() or x.shape: a raw AttributeError)
            check_input(x)
        per_sample = self.per_sample  # (one host sync on a GPU)
        if not per_sample and (x.ndim == 0 or x.shape[0] == 0):  # (a raw IndexError of
            raise InvalidInputError(  # check_output before)
                f"x is empty or has no batch dimension (shape {tuple(x.shape)}): give at least "
                "one sample")
        # per-sample mode: sigma_for's linearize checks x (a float batch); a data-set sigma
        # leaves the rest to the encoder: token ids, masks or a 1-D batch that it takes are
        # served (noise is added to its output; nothing is measured here)
        sigma = None
        if per_sample:
            # before the encoder runs: one that writes into its input (x.mul_(), an in-place
            # first ReLU) would have moved x, and sigma* would be sized for another input
            with _singular_warning_held():
                sigma = self.sigma_for(x.detach(), sample_ids)
                self._check_reachable(sigma, "sigma*")
        z = self.encoder(x)
        if sigma is None:
            # per-sample mode checked the output while linearizing; a fixed sigma must too (a
            # tuple, an integer or a non-finite output gets no meaningful noise)
            check_output(z, x.shape[0])
            sigma = self.sigma.expand(z.shape[0])
        self.last_sigma = sigma
        return add_noise(z, sigma, self.generator)
