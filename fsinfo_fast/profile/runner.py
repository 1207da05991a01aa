"""The profile job: settings, the per-batch computation, resume and the main loop.

Work units are *batches*: the samples (ids ``0 .. N-1``, in data-set order) are cut into fixed
chunks of ``batch_size``. A batch is computed whole (all its samples, all split points) and each
(sample, split) result is committed as one record. On ``--resume`` a batch is skipped when all its
records exist; a batch with some records missing is recomputed whole (the same inputs as in the
interrupted run, so the same numbers) and only the missing records are written. Hence a resumed
run's records equal an uninterrupted run's, none lost, none duplicated.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import re
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from .._extras import require
from .._progress import progress_bar, set_status
from ..encoder import SIGMA_RANGE
from ..engine import resolve_backend
from ..errors import EncoderError, FSInfoError, InvalidInputError, InvalidInputTypeError
from ..linearization import DFIL_METHODS as LINEARIZATION_DFIL_METHODS
from ..reference import ExactFisher
from .distributed import DistContext
from .errors import DataError, ResumeError, RunDirError
from .shared import NestedStack, exact_fisher_shared
from .sources import (
    Dataset,
    SplitSpec,
    apply_checkpoint,
    build_model,
    check_fits,
    describe_model_source,
    file_sha256,
    infer_num_classes,
    is_zoo_model,
    load_checkpoint,
    load_data,
    resolve_splits,
    state_fingerprint,
    state_to_bytes,
    structure_fingerprint,
    tensor_fingerprint,
    zoo_key,
)
from .store import (
    STORE_VERSION,
    RunDir,
    RunDirBusy,
    RunLock,
    atomic_write_bytes,
    record_key,
    settings_diff,
)

__all__ = [
    "ProfileConfig",
    "ProfileOutcome",
    "run_profile",
    "check_runs",
    "MATCH_KEYS",
    "DEFAULT_ROOT",
    "EXACT_SMALL_D",
    "DFIL_EXACT_MAX",
]

log = logging.getLogger(__name__)

#: Where runs go when ``--out`` is not given (one timestamped folder per run).
DEFAULT_ROOT = "fsinfo-profile"
#: With ``estimator="auto"``, inputs this small (``d``) are profiled exactly.
EXACT_SMALL_D = 256
#: With ``estimator="auto"``, dFIL of a split with ``min(m, d)`` at most this is computed exactly.
DFIL_EXACT_MAX = 256
#: Settings that change the numbers: a resumed run must have the same ones.
MATCH_KEYS = (
    "model", "checkpoint_sha256", "model_sha256", "model_structure_sha256", "data", "size",
    "data_sha256", "num_samples",
    "splits", "sigma", "variant", "estimator", "atol", "rtol", "prior_var", "target", "seed",
    "share", "dfil_method",
)
#: dFIL methods ``--dfil-method`` accepts (those of :meth:`fsinfo_fast.Linearization.dfil`).
DFIL_METHODS = LINEARIZATION_DFIL_METHODS


@dataclass
class ProfileConfig:
    """Options of a profile run (the CLI flags; see ``fsinfo-fast profile --help``).

    Attributes:
        model: zoo name or ``package.module:function``; in the Python API also an
            ``nn.Module`` in eval mode (a model already in memory, e.g. a ``transformers``
            model: it is moved to the run's ``device``; ``--resume`` needs the same weights,
            ``settings.json`` names its class; under ``torchrun`` each process passes its own
            and rank 0's weights are loaded into the others).
        checkpoint: weights file (``torch.load(weights_only=True)``; not with an
            ``nn.Module``: load its weights into it).
        data: ``digits``, ``natural``, a folder of images or ``torchvision:NAME:ROOT[:split]``;
            in the Python API also a float tensor ``[N, ...]`` of inputs (any shape the model
            takes, e.g. embeddings for a text model cut with ``input_name="inputs_embeds"``)
            or an ``(x, labels)`` pair (``size`` and ``channels`` do not apply to it;
            ``--resume`` needs the same tensor).
        size: image side for the bundled data sets.
        input_name: the keyword the model takes its input as (:func:`fsinfo_fast.split`'s
            ``input_name``; Python API), e.g. ``"inputs_embeds"`` for a text model given
            embeddings as ``data``; None: positionally.
        splits: ``paper`` (default), ``all`` or a comma-separated list.
        sigma: noise scale on the smashed data.
        variant: ``diag``, ``logdet`` or ``both`` (log det where it can be finite).
        estimator: ``auto``, ``exact`` or ``randomized``.
        atol: FSInfo target 95% half-width (nats per dimension).
        rtol: dFIL target relative 95% half-width.
        prior_var: prior variance per input dimension (log-det variant).
        target: FSInfoGuard target FSInfo (nats per dimension).
        max_samples: first this many samples (``0``/``None``: all).
        channels: 3 (default: gray repeated over RGB) or 1 (grayscale: ``digits``, a folder of
            gray images or a gray torchvision set; for a 1-channel ``--checkpoint`` or model).
        batch_size: samples per batch (work unit).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        seed: seed of the probes (and of the demo model's training).
        out: run directory (default: a new folder under ``fsinfo-profile/``).
        resume: continue the run in ``out``.
        plot: write ``profile.png``.
        share: share work across split points (see :mod:`fsinfo_fast.profile.shared`).
        backend: product backend for the metrics.
        progress: show a progress bar.
        table: print the result table.
        dfil_method: how a randomized dFIL is estimated (:meth:`fsinfo_fast.Linearization.dfil`'s
            ``method``): ``auto`` (default: the Linearization's choice; from FSInfo_diag's
            Gaussian VJPs, or its deflated estimate, it predicts the products each method
            spends under the three-stage stopping rule and takes the cheapest, and with
            ``--estimator auto`` it takes the fast exact route at once where ``min(m, d)``
            one-hot products are predicted cheaper, or where the randomized route would stop at
            its probe cap, ``min(m, d)`` under ``auto``: under the earlier cap of 1000 probes,
            Rademacher JVPs on the CRAFT VGG16-BN at 32 px ran into it at conv5_2 before
            switching anyway),
            ``hutchinson`` (Rademacher JVPs: the default before; on the demo VGG5 at 3x32x32 and
            rtol 1% they need 30-120 where the Gaussian VJPs, ``diag``, need 50-170, and those
            cost more per probe: 3-4x the time, measured under load), ``hutch++`` or ``diag``.
            Runs stored with another ``dfil_method`` do not resume under this one
            (:data:`MATCH_KEYS`).
    """

    model: str | nn.Module = "vgg5"
    checkpoint: str | None = None
    data: str | Tensor | tuple[Tensor, Tensor] = "digits"
    size: int = 32
    splits: str | None = None
    sigma: float = 0.1
    variant: str = "diag"
    estimator: str = "auto"
    atol: float = 0.01
    rtol: float = 0.01
    prior_var: float | None = None
    target: float = -1.0
    max_samples: int | None = 16
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    plot: bool = True
    share: bool = True
    backend: str = "auto"
    progress: bool = True
    table: bool = True
    dfil_method: str = "auto"
    channels: int = 3
    input_name: str | None = None
    #: the options set explicitly: the command line's, or the keywords (and positional
    #: arguments) a ``ProfileConfig(...)`` call gave (``--resume`` takes the stored value of
    #: every other option; an explicit one that differs from the stored is refused, also where
    #: it equals the default: the API's ``sigma=0.1`` resumed a run made at 0.2 at 0.2 without a
    #: word, helper 126). ``None``: unknown (every option at its default counts as not given)
    given: frozenset[str] | None = None

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` (one line) on a bad option value."""
        def positive(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                math.isfinite(v) and v > 0
            ):
                raise InvalidInputError(f"--{name.replace('_', '-')} must be a positive number, "
                                        f"got {v!r}")

        _check_model_and_data(self)
        if isinstance(self.splits, str) and not self.splits.strip(" ,"):
            raise InvalidInputError("--splits is empty: give split points, 'paper' or 'all' "
                                    "(or leave the option out for the paper splits)")
        positive("sigma", self.sigma)
        positive("atol", self.atol)
        positive("rtol", self.rtol)
        if self.prior_var is not None:
            positive("prior_var", self.prior_var)
        if not math.isfinite(self.target):
            raise InvalidInputError(f"--target must be finite, got {self.target!r}")
        if self.variant not in ("diag", "logdet", "both"):
            raise InvalidInputError(f"--variant must be diag, logdet or both, got {self.variant!r}")
        if self.dfil_method not in DFIL_METHODS:
            raise InvalidInputError(f"--dfil-method must be one of {', '.join(DFIL_METHODS)}, "
                                    f"got {self.dfil_method!r}")
        if self.estimator not in ("auto", "exact", "randomized"):
            raise InvalidInputError(
                f"--estimator must be auto, exact or randomized, got {self.estimator!r}")
        if self.prior_var is not None and self.variant == "diag":
            raise InvalidInputError("--prior-var applies to the log-det variant: use --variant "
                                    "logdet or both")
        if self.max_samples is not None and self.max_samples < 0:
            raise InvalidInputError(f"--max-samples must be >= 0, got {self.max_samples}")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise InvalidInputError(f"--channels must be 1 or 3, got {self.channels!r}")
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.size < 1:
            raise InvalidInputError(f"--size must be >= 1, got {self.size}")
        from ..engine import available_backends

        names = ("auto", *available_backends())
        if self.backend not in names:  # before the run directory is made
            raise InvalidInputError(f"--backend must be one of {', '.join(names)}, got "
                                    f"{self.backend!r}")


def _recording_given(init):
    """Wrap ``ProfileConfig.__init__`` so that a call that does not pass ``given`` records the
    options it did pass there (:attr:`ProfileConfig.given`)."""
    names = [f.name for f in dataclasses.fields(ProfileConfig) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if len(args) <= names.index("given") and "given" not in kwargs:
            self.given = frozenset(names[:len(args)]) | frozenset(kwargs)

    return __init__


ProfileConfig.__init__ = _recording_given(ProfileConfig.__init__)  # type: ignore[method-assign]


def _check_model_and_data(cfg: ProfileConfig) -> None:
    """The types of ``model`` and ``data`` (a spec string, or in the Python API an object in
    memory), before any work."""
    from ..encoder import check_eval_mode

    if isinstance(cfg.model, nn.Module):
        if cfg.checkpoint:
            raise InvalidInputError(
                "checkpoint= applies to a model spec (a zoo name or 'package.module:function'); "
                "load the weights into the nn.Module given as model= instead")
        check_eval_mode(cfg.model)  # (the profile does not switch the caller's model's mode)
    elif not isinstance(cfg.model, str) or not cfg.model.strip():
        raise InvalidInputTypeError(
            "model must be a zoo name ('vgg5'), a 'package.module:function' spec or an "
            f"nn.Module, got {type(cfg.model).__name__} {cfg.model!r:.80}")
    if isinstance(cfg.data, str):
        return
    x = cfg.data[0] if isinstance(cfg.data, (tuple, list)) and len(cfg.data) == 2 else cfg.data
    y = cfg.data[1] if x is not cfg.data else None
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2):
        raise InvalidInputTypeError(
            "data must be a data set spec ('digits', 'natural', a folder, "
            "'torchvision:NAME:ROOT'), a float tensor [N, ...] of inputs or an (x, labels) "
            f"pair, got {_what(x)}{_integer_data_hint(x)}")
    if y is not None and not (isinstance(y, Tensor) and not y.is_floating_point()
                              and y.shape == x.shape[:1]):
        raise InvalidInputTypeError(
            f"data=(x, labels): labels must be an integer tensor [{x.shape[0]}], got {_what(y)}")


def _integer_data_hint(x: object) -> str:
    """How to profile integer data: token ids ``[N, tokens]`` as their embeddings (the metrics
    differentiate with respect to a float input), integer images as floats."""
    if not isinstance(x, Tensor) or x.is_floating_point() or x.is_complex() or \
            x.dtype == torch.bool:
        return ""
    if x.dim() == 2 and x.dtype != torch.uint8:
        return ("; token ids? The metrics differentiate with respect to a float input: give the "
                "model's embeddings of them and input_name= the keyword its forward takes them "
                "as (ProfileConfig(input_name='inputs_embeds') for a transformers text model)")
    return "; integer pixels: convert them (x.float() / 255 for 8-bit images)"


def _what(v: object) -> str:
    if isinstance(v, Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r:.80}"


def model_label(model: str | nn.Module) -> str:
    """What ``settings.json``, the run directory's name and the messages call the model: the
    spec, or the class of a model given in memory."""
    if isinstance(model, nn.Module):
        return f"{type(model).__name__} (in memory)"
    return model


def data_label(data: str | Tensor | tuple[Tensor, Tensor]) -> str:
    """The same for the data: the spec, or the shape of a tensor given in memory."""
    if isinstance(data, str):
        return data
    x = data if isinstance(data, Tensor) else data[0]
    return f"tensor {list(x.shape)} (in memory)"


def _resolved(spec: Any) -> Any:
    """A ``--data`` or ``--checkpoint`` spec that names an existing file or folder: its absolute
    path (the settings keep it, so that a run resumes from any working directory, and compares
    it, so that ``imgs``, ``./imgs`` and its absolute path are one folder; they were refused as
    different, helper 126); anything else as it is."""
    if not isinstance(spec, str) or spec in ("digits", "natural") or spec.startswith(
            "torchvision:"):
        return spec
    p = Path(spec).expanduser()
    try:
        return str(p.resolve()) if p.exists() else spec
    except OSError:
        return spec


def _embedded(cfg: ProfileConfig) -> bool:
    """The data are one of the bundled sets (``digits``, ``natural``)."""
    return isinstance(cfg.data, str) and cfg.data in ("digits", "natural")


def _dataset(cfg: ProfileConfig, sized: bool) -> Dataset:
    """The inputs: :func:`load_data` of the spec, or the tensor given (its first
    ``max_samples``)."""
    if isinstance(cfg.data, str):
        return load_data(cfg.data, cfg.size, cfg.seed, cfg.max_samples or None,
                         channels=cfg.channels, size_given=sized)
    x, y = (cfg.data, None) if isinstance(cfg.data, Tensor) else cfg.data
    n = cfg.max_samples or x.shape[0]
    if n < x.shape[0]:
        warnings.warn(f"data: the first {n} of the tensor's {x.shape[0]} samples (max_samples="
                      f"{cfg.max_samples}; ProfileConfig's default is 16): pass max_samples=None "
                      "for all of them", UserWarning, stacklevel=2)
    x = x.detach()[:n].cpu().contiguous()
    y = (torch.full((x.shape[0],), -1, dtype=torch.int64) if y is None
         else y.detach()[:n].cpu().to(torch.int64))
    return Dataset(x=x, y=y, name="tensor",
                   description=f"the tensor given to run_profile ({x.shape[0]} samples of "
                               f"shape {list(x.shape[1:])})")


@dataclass
class ProfileOutcome:
    """What a finished run produced (rank 0; other ranks get ``summary=None``).

    Attributes:
        run_dir: the run directory.
        summary: the content of ``profile.json``.
        files: paths of the files written.
        computed: records computed by this invocation (0 when everything was already there).
    """

    run_dir: Path
    summary: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    computed: int = 0


# ------------------------------------------------------------------------------------------------
# set-up


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "run"


def resolve_out(cfg: ProfileConfig) -> Path:
    """The run directory: ``--out``, else the newest run under ``fsinfo-profile/`` for
    ``--resume``, else a new timestamped folder there."""
    if cfg.out:
        return Path(cfg.out)
    root = Path(DEFAULT_ROOT)
    if cfg.resume:
        runs = sorted((p for p in root.glob("*") if (p / "settings.json").is_file()),
                      key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        if not runs:
            raise ResumeError(f"--resume without --out: no run found under {root}/; pass --out")
        return runs[-1]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = (_slug(Path(cfg.data).name or cfg.data) if isinstance(cfg.data, str)
            else "tensor")
    model = (type(cfg.model).__name__ if isinstance(cfg.model, nn.Module)
             else cfg.model.split(':')[-1])
    base = root / f"{_slug(model)}-{data}-{stamp}"
    p, i = base, 1
    while p.exists():
        i += 1
        p = Path(f"{base}-{i}")
    return p


@dataclass
class _Prepared:
    """What rank 0 sets up and sends to the other ranks."""

    recipe: dict[str, Any]
    state: bytes
    split_names: list[str]
    example: Tensor
    settings: dict[str, Any]
    run_dir: str
    num_samples: int


def _load_model_and_data(cfg: ProfileConfig, run_dir: RunDir, resuming: bool,
                         progress: bool) -> tuple[nn.Module, Dataset, dict[str, Any], str | None]:
    """Model, data, the recipe to rebuild the model elsewhere, and the checkpoint hash."""
    embedded = _embedded(cfg)
    sized = cfg.given is not None and "size" in cfg.given
    ckpt_sha = None
    if isinstance(cfg.model, nn.Module):  # (no recipe: other ranks pass their own)
        return cfg.model, _dataset(cfg, sized), {"spec": None, "zoo_kwargs": {}}, None
    if cfg.checkpoint:
        data = _dataset(cfg, sized)
        state = load_checkpoint(cfg.checkpoint)
        ckpt_sha = file_sha256(cfg.checkpoint)
        recipe = {"spec": cfg.model, "zoo_kwargs": {}}
        if is_zoo_model(cfg.model):
            _require_square(data, cfg.model)
            recipe = zoo_recipe(cfg.model, int(data.x.shape[-1]), int(data.x.shape[1]),
                                infer_num_classes(state))
        model = build_recipe(recipe)
        apply_checkpoint(model, state, cfg.checkpoint)
        return model.eval(), data, recipe, ckpt_sha
    if is_zoo_model(cfg.model):
        from ..data import _digits_raw
        from ..train import demo_model

        train_data = cfg.data if embedded else "digits"
        if embedded:  # (it trains on the whole set first: every digit, or 900 crops)
            check_fits(cfg.data, cfg.size, 3, len(_digits_raw()[1]) if cfg.data == "digits"
                       else 900 + (cfg.max_samples or 256))
        if cfg.channels != 3:
            raise DataError(
                f"--channels {cfg.channels}: the demo model ({cfg.model} trained briefly on "
                "bundled data) takes RGB images; give --checkpoint with 1-channel weights or a "
                "--model package.module:function")
        if embedded:
            size = cfg.size
        else:
            data = _dataset(cfg, sized)
            _require_square(data, cfg.model)
            if data.x.shape[1] != 3:
                raise DataError(f"--data {data_label(cfg.data)}: the demo model takes RGB "
                                "images")
            size = int(data.x.shape[-1])
        cached = run_dir.model_path if resuming and run_dir.model_path.is_file() else None
        if cached is not None:  # resume: the weights trained by the first invocation
            _, x_te, y_te, _ = demo_model(zoo_key(cfg.model), data=train_data, size=size,
                                          seed=cfg.seed, epochs=0)
            state = load_checkpoint(cached)
            recipe = zoo_recipe(zoo_key(cfg.model), size, 3, infer_num_classes(state))
            model = build_recipe(recipe)
            apply_checkpoint(model, state, str(cached))
            acc = None
        else:
            # cached in the user cache (fsinfo_fast.train.default_cache_dir), so a second demo
            # does not train again; the run directory keeps its own copy (model.pt) for --resume
            model, x_te, y_te, acc = demo_model(zoo_key(cfg.model), data=train_data, size=size,
                                                seed=cfg.seed, progress=progress, cache=True)
            recipe = zoo_recipe(zoo_key(cfg.model), size, 3,
                                infer_num_classes(model.state_dict()))
        if embedded:
            n = cfg.max_samples or len(x_te)
            what = "digits test split" if cfg.data == "digits" else "natural-image test crops"
            data = Dataset(x=x_te[:n].contiguous(), y=y_te[:n], name=cfg.data,
                           description=f"{what} held out from the demo model's training "
                                       f"({min(n, len(x_te))} of {len(x_te)}, {size}x{size})")
        model.demo_accuracy = acc  # type: ignore[attr-defined]
        return model.eval(), data, recipe, None
    data = _dataset(cfg, sized)
    recipe = {"spec": cfg.model, "zoo_kwargs": {}}
    return build_recipe(recipe), data, recipe, None


def _require_square(data: Dataset, model: str) -> None:
    if data.x.shape[-1] != data.x.shape[-2]:
        raise DataError(
            f"zoo model {model} needs square images; {data.name} has "
            f"{data.x.shape[-1]}x{data.x.shape[-2]}"
        )


def zoo_recipe(spec: str, size: int, in_channels: int = 3,
               num_classes: int = 10) -> dict[str, Any]:
    """The recipe of zoo model ``spec`` for square ``size``-pixel inputs of ``in_channels``
    channels: its classifier is sized for that input (a VGG built for 32 px refuses 16 px at
    its first linear layer), so ``profile`` and ``info --model`` build it the same way."""
    return {"spec": spec, "zoo_kwargs": {"num_classes": num_classes, "in_channels": in_channels,
                                         "input_size": size}}


def build_recipe(recipe: dict[str, Any]) -> nn.Module:
    """The model of a recipe (``{"spec", "zoo_kwargs"}``, as ``settings.json`` keeps it)."""
    return build_model(recipe["spec"], **recipe["zoo_kwargs"])


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's floating-point parameter dtype where it has exactly one, else None."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the profile feeds the data in: float64 for a float64 model (the data cast
    exactly; float32 inputs were refused by its first layer), else float32 (the metrics compute
    a float16/bfloat16 model on a float32 copy)."""
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def check_runs(model: nn.Module, splits: list[SplitSpec], x1: Tensor,
               in_memory: bool = False) -> None:
    """Raise :class:`DataError` (a one-line message) where a split's encoder cannot run on the
    first samples ``x1`` (two where the data has them: a size too small for the model, an
    incompatible input, or a model that reads the batch as one unbatched input, as a
    ``Conv3d`` reads ``[B, 3, H, W]``: its output then does not keep the batch dimension
    first), and :class:`EncoderError` where it returns no float tensor; shared by ``profile``
    and ``guard``."""
    x1 = x1.to(model_dtype(model) or x1.dtype)  # the check only: a half model runs on half
    # (on the model's device: one given in memory may be on an accelerator already; the run
    # moves it to --device afterwards)
    x1 = x1.to(next((t.device for t in model.parameters()), x1.device))
    for s in splits:
        try:
            with torch.no_grad():
                out = s.encoder(x1)
        except Exception as err:
            # the whole message of the package's own errors (their advice came last and was
            # cut off, helper 128), a model's own shortened; with the notes added to either
            msg = " ".join(str(err).split())
            if not isinstance(err, FSInfoError) and len(msg) > 500:
                msg = msg[:500] + " ..."
            msg = " ".join([msg] + [" ".join(str(n).split())
                                    for n in getattr(err, "__notes__", None) or []])
            if "ff.split(model, ..., input_name=" in msg:  # (the profile's own keyword)
                msg += " (here: ProfileConfig(input_name=...), which run_profile passes to " \
                       "ff.split)"
            raise DataError(
                f"the encoder at split {s.name} cannot take the data's inputs of shape "
                f"{tuple(x1.shape[1:])}: {type(err).__name__}: {msg}"
                f"{_channels_hint(model, x1, in_memory)}"
            ) from None
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise EncoderError(f"the encoder at split {s.name} does not return a float tensor")
        if out.dim() == 0 or out.shape[0] != x1.shape[0]:
            raise DataError(
                f"the encoder at split {s.name} maps a batch of {x1.shape[0]} of the data's "
                f"inputs of shape {tuple(x1.shape[1:])} to an output of shape "
                f"{tuple(out.shape)}, whose first dimension is not the batch: the model does "
                "not take a batch of such inputs (it reads the batch as one unbatched input "
                "of its own kind, e.g. a Conv3d given images, or changes the batch size)")


def _channels_hint(model: nn.Module, x1: Tensor, in_memory: bool = False) -> str:
    """`` (... pass --channels N)`` where the model's first convolution takes another number of
    channels (1 or 3) than the data has, else ``""``; for data given in memory, which
    ``--channels`` does not convert, that the tensor must have them."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if (not isinstance(conv, nn.Conv2d) or x1.dim() != 4 or conv.in_channels == x1.shape[1]
            or conv.in_channels not in (1, 3)):  # images only (a Conv1d of audio: no hint)
        return ""
    have = (f"give a tensor [N, {conv.in_channels}, H, W] (channels converts the bundled data "
            "and folders only)" if in_memory else f"pass --channels {conv.in_channels}")
    return (f" (the model's first convolution takes {conv.in_channels} channel"
            f"{'s' if conv.in_channels > 1 else ''}: {have})")


def _settings(cfg: ProfileConfig, model: nn.Module, data: Dataset, splits: list[SplitSpec],
              ckpt_sha: str | None, device: torch.device, world: int) -> dict[str, Any]:
    image = isinstance(cfg.data, str) or data.x.dim() == 4
    return {
        "store_version": STORE_VERSION,
        "fsinfo_fast_version": __version__,
        "model": model_label(cfg.model),
        "model_in_memory": isinstance(cfg.model, nn.Module),
        "data_in_memory": not isinstance(cfg.data, str),
        "model_source": describe_model_source(model_label(cfg.model), cfg.checkpoint),
        "model_class": type(model).__name__,
        "checkpoint": _resolved(cfg.checkpoint),
        "checkpoint_sha256": ckpt_sha,
        "model_sha256": state_fingerprint(model),
        "model_structure_sha256": structure_fingerprint(model),
        "demo_accuracy": getattr(model, "demo_accuracy", None),
        "data": _resolved(data_label(cfg.data)),
        "data_description": data.description,
        # (images only: an in-memory [N, T, H] tensor has no channels or side)
        "size": cfg.size if _embedded(cfg) else (int(data.x.shape[-1]) if image else None),
        "input_shape": list(data.x.shape[1:]),
        "data_sha256": tensor_fingerprint(data.x, data.y),
        "num_samples": int(data.x.shape[0]),
        "max_samples": cfg.max_samples,
        "channels": int(data.x.shape[1]) if image else None,
        "splits": [s.name for s in splits],
        "input_name": cfg.input_name,
        "split_index": [s.index for s in splits],
        "split_layer": [s.layer for s in splits],
        "sigma": float(cfg.sigma),
        "variant": cfg.variant,
        "estimator": cfg.estimator,
        "atol": float(cfg.atol),
        "rtol": float(cfg.rtol),
        "prior_var": None if cfg.prior_var is None else float(cfg.prior_var),
        "target": float(cfg.target),
        "seed": int(cfg.seed),
        "share": bool(cfg.share),
        "dfil_method": cfg.dfil_method,
        # free to change on --resume (rounding-level effects only):
        "batch_size": int(cfg.batch_size),
        "device": str(device),
        "world_size": world,
        "backend": cfg.backend,
        "plot": bool(cfg.plot),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _claim(cfg: ProfileConfig, run_dir: RunDir, settings: dict[str, Any],
           locks: list[RunLock]) -> RunDir:
    """Create the run directory, take its run lock (appended to ``locks``: the caller releases
    it) and commit the settings there, exclusively: where another run started at the same time
    claimed it first, an automatic name moves on to the next free one and an explicit ``--out``
    is refused (both runs wrote their records into one folder, under one run's settings, and
    exited 0)."""
    for _ in range(100):
        run_dir.create()
        try:
            lock = run_dir.lock()
        except RunDirBusy:
            if cfg.out:
                raise
            run_dir = RunDir(resolve_out(cfg))
            continue
        try:
            run_dir.clear_leftovers()
            run_dir.write_settings(settings, new=True)
            locks.append(lock)
            return run_dir
        except FileExistsError:
            lock.release()
            if cfg.out:
                raise RunDirError(
                    f"output directory {run_dir.path} was claimed by another profile run "
                    "started at the same time; choose another --out (or --resume it once that "
                    "run has stopped)") from None
            run_dir = RunDir(resolve_out(cfg))
        except OSError as err:
            lock.release()
            raise RunDirError(
                f"cannot write to output directory {run_dir.path}: {err.strerror or err}"
            ) from None
    raise RunDirError(f"no free output directory next to {run_dir.path}; pass --out")


def _resume_refusal(diffs: list[str], stored: dict, settings: dict, cfg: ProfileConfig,
                    path: Path) -> str:
    """Why ``--resume`` refuses ``path``: the settings in ``diffs`` differ from the stored ones;
    where only the model's digest of its structure or of its weights differs, the cause."""
    def only(key: str) -> bool:
        return diffs == settings_diff(stored, settings, (key,))

    if only("model_structure_sha256"):
        return (f"--resume: the model passed now computes another function than the one {path} "
                "was made with, with the same weights and options (its modules, their settings "
                "such as an activation or a LayerNorm's eps, or its transformers config differ: "
                "model_structure_sha256); its numbers would be mixed with the stored ones: pass "
                "the same model, or choose a new --out")
    if only("model_sha256") and isinstance(cfg.model, nn.Module):
        return (f"--resume: the model's weights differ from those {path} was made with "
                f"({diffs[0]}), with the same options: the {model_label(cfg.model)} model passed "
                "now is not the one the run measured (its weights were changed or it was built "
                "again with other random weights); pass the same weights, or choose a new --out")
    if only("model_sha256"):
        return (f"--resume: the model's weights differ from those {path} was made with "
                f"({diffs[0]}), with the same options: --model {model_label(cfg.model)} builds "
                "other weights at each call (an unseeded random initialisation, e.g. a "
                "transformers model from a config); seed the builder (torch.manual_seed) or pass "
                "--checkpoint")
    return (f"--resume: {path} was made with different settings ({'; '.join(diffs)}); rerun "
            "with the same options or choose a new --out")


def _prepare_root(cfg: ProfileConfig, dist: DistContext,
                  locks: list[RunLock]) -> tuple[_Prepared, Dataset, dict]:
    """Rank 0's set-up: check or claim the run directory, holding its run lock (appended to
    ``locks``, released by the caller when the run ends, however it ends), load the model and
    the data, settle the settings."""
    run_dir = RunDir(resolve_out(cfg))
    stored = None
    if cfg.resume:
        stored, lock = run_dir.check_resume()
        locks.append(lock)
    else:
        run_dir.check_new()
    if stored is not None:  # what selects the model and data, before loading them (another
        # model or size failed in the checkpoint or split lookup, naming neither); paths as
        # absolute ones (a run stored before they were kept so: from its working directory)
        stored = {**stored, **{k: _resolved(stored[k]) for k in ("data", "checkpoint")
                               if k in stored}}
        early = {k: getattr(cfg, k) for k in ("model", "checkpoint", "data", "size")
                 if k in stored}
        early = {**early, **{k: f(getattr(cfg, k)) for k, f in (
            ("model", model_label), ("data", lambda d: _resolved(data_label(d))),
            ("checkpoint", _resolved)) if k in early}}
        diffs = settings_diff(stored, early, early)
        if diffs:
            raise ResumeError(_resume_refusal(diffs, stored, early, cfg, run_dir.path))
    model, data, recipe, ckpt_sha = _load_model_and_data(
        cfg, run_dir, cfg.resume, progress=cfg.progress)
    if data.x.shape[0] == 0:
        raise DataError(f"--data {data_label(cfg.data)}: no samples")
    bad = (~torch.isfinite(data.x.reshape(data.x.shape[0], -1)).all(dim=1)).nonzero().flatten()
    if bad.numel():  # (before any work: a batch's own check named its batch positions)
        raise DataError(f"--data {data_label(cfg.data)}: sample(s) {bad.tolist()[:20]} hold NaN "
                        "or inf; the metrics are defined at finite inputs")
    splits = resolve_splits(model, cfg.splits, input_name=cfg.input_name)
    check_runs(model, splits, data.x[:2], in_memory=not isinstance(cfg.data, str))
    # a requested backend that cannot run here, before the run directory is claimed (a folder
    # claimed first was left holding these settings, and --resume failed on them again)
    resolve_backend(cfg.backend, dist.device)
    settings = _settings(cfg, model, data, splits, ckpt_sha, dist.device, dist.world)
    if stored is not None:
        # (a run stored before the architecture's digest was kept: its weights' alone)
        diffs = settings_diff(stored, settings, [k for k in MATCH_KEYS if k in stored
                                                 or k != "model_structure_sha256"])
        if diffs:
            raise ResumeError(_resume_refusal(diffs, stored, settings, cfg, run_dir.path))
        settings = {**stored, **{k: settings[k] for k in ("batch_size", "device", "world_size",
                                                          "backend", "plot")}}
    else:
        run_dir = _claim(cfg, run_dir, settings, locks)
        try:
            if not cfg.checkpoint and isinstance(cfg.model, str) and is_zoo_model(cfg.model):
                atomic_write_bytes(run_dir.model_path, state_to_bytes(model))
        except OSError as err:
            raise RunDirError(
                f"cannot write to output directory {run_dir.path}: {err.strerror or err}"
            ) from None
    prepared = _Prepared(
        recipe=recipe, state=state_to_bytes(model) if dist.distributed else b"",
        split_names=[s.name for s in splits],
        example=data.x[:1].clone(), settings=settings, run_dir=str(run_dir.path),
        num_samples=int(data.x.shape[0]),
    )
    return prepared, data, {"model": model, "splits": splits}


def _rebuild(prep: _Prepared, cfg: ProfileConfig) -> tuple[nn.Module, list[SplitSpec]]:
    """Another rank's model: built from the recipe, or the rank's own ``nn.Module`` given as
    ``model`` (each process of a ``torchrun`` job builds its own), with rank 0's weights."""
    model = cfg.model if isinstance(cfg.model, nn.Module) else build_recipe(prep.recipe)
    state = torch.load(io.BytesIO(prep.state), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, resolve_splits(model, list(prep.split_names), input_name=cfg.input_name)


# ------------------------------------------------------------------------------------------------
# the computation


@dataclass
class Plan:
    """How each quantity is computed for each split (identical on every rank).

    Attributes:
        d: input size per sample; m: output size per split.
        exact: the profile is exact (``--estimator exact``, or ``auto`` with ``d`` small).
        sweep: splits whose exact diagonal and trace come from the shared one-hot JVP sweep
            (exact profiles only; every other split goes through its own
            :class:`~fsinfo_fast.Linearization`).
        small_exact: splits computed exactly in a randomized profile (``estimator="auto"`` and
            ``min(m, d) <= DFIL_EXACT_MAX``): one exact Jacobian gives every quantity.
        logdet: per split, ``None`` when the log-det variant is computed, else why not.
        stack: the nested stack (``None`` without sharing, or in a randomized profile, where
            nothing is shared across splits).
        rejected: splits the stack cannot serve, with the reason.
        exact_unavailable: splits whose float64 copy fails its checks (a forward computed
            partly in float32), with the reason: ``auto`` takes no exact route there (the
            profile is then randomized, as ``ff.fsinfo``'s ``auto`` is).
    """

    d: int
    m: dict[str, int]
    exact: bool
    sweep: list[str]
    small_exact: list[str]
    logdet: dict[str, str | None]
    stack: NestedStack | None
    rejected: dict[str, str]
    exact_unavailable: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "exact": self.exact,
            "exact_sweep_splits": self.sweep,
            "small_exact_splits": self.small_exact,
            "stack_splits": self.stack.names if self.stack else [],
            "not_shareable": self.rejected,
            "logdet_skipped": {k: v for k, v in self.logdet.items() if v is not None},
            "exact_unavailable": self.exact_unavailable,
        }


def make_plan(cfg: ProfileConfig, model: nn.Module, splits: list[SplitSpec],
              example: Tensor) -> Plan:
    """Decide, deterministically, which route each split's quantities take."""
    d = int(example[0].numel())
    with torch.no_grad():
        probe = example.to(model_dtype(model) or example.dtype)  # shapes only
        m = {s.name: int(s.encoder(probe)[0].numel()) for s in splits}
    exact = cfg.estimator == "exact" or (cfg.estimator == "auto" and d <= EXACT_SMALL_D)
    unavailable: dict[str, str] = {}
    if cfg.estimator == "auto":  # the exact routes auto would plan need a float64 copy
        for s in splits:
            if exact or min(m[s.name], d) <= DFIL_EXACT_MAX:
                why = _float64_unavailable(s.encoder, example)
                if why is not None:
                    unavailable[s.name] = why
        exact = exact and not unavailable
    stack = None
    rejected: dict[str, str] = {}
    if cfg.share and exact:  # the one-hot sweep is the only work shared across splits
        stack = NestedStack(model, [s.name for s in splits], example,
                            {s.name: s.encoder for s in splits})
        rejected = dict(stack.rejected)
        if not stack.names:
            stack = None
    logdet: dict[str, str | None] = {}
    for s in splits:
        if cfg.variant == "diag":
            logdet[s.name] = "not requested (--variant diag)"
        elif cfg.prior_var is None and m[s.name] < d:
            logdet[s.name] = (f"-inf: m = {m[s.name]} < d = {d}, J^T J is singular; give "
                              "--prior-var for the finite (van Trees) version")
        else:
            logdet[s.name] = None
    sweep: list[str] = []
    small: list[str] = []
    names = stack.names if stack else []
    if exact:
        if names:
            # cost of covering the first j shared splits by the sweep, the rest per split
            best_j, best = 0, math.inf
            for j in range(len(names) + 1):
                c = d * stack.cost[names[j - 1]] if j else 0
                c += sum(min(m[n], d) * stack.cost[n] for n in names[j:])
                if c < best:
                    best_j, best = j, c
            sweep = names[:best_j]
    elif cfg.estimator == "auto":
        small = [s.name for s in splits
                 if min(m[s.name], d) <= DFIL_EXACT_MAX and s.name not in unavailable]
    return Plan(d=d, m=m, exact=exact, sweep=sweep, small_exact=small, logdet=logdet,
                stack=stack, rejected=rejected, exact_unavailable=unavailable)


def _float64_unavailable(encoder: nn.Module, example: Tensor) -> str | None:
    """Why the exact routes cannot run on this split's float64 copy (its own checks fail: a
    forward computed partly in float32, weights held outside the module's parameters), or
    None. ``auto`` then plans no exact route for it, as :class:`~fsinfo_fast.Linearization`
    finds and records (``info["exact_unavailable"]``); ``--estimator exact`` raises instead."""
    from ..encoder import prepare

    try:
        prepare(encoder, example[:1], dtype=torch.float64, check_interaction=0, cache=True)
    except EncoderError as err:
        return ("the exact routes run the split's encoder in float64, which fails its checks "
                f"({err})")
    return None


class WarningSink:
    """Warnings of the metric calls, passed on to the user once per split and kind.

    The metrics warn per call, and a profile calls them once per batch and split: the same
    warning (up to its numbers) would repeat for every batch. Each distinct warning (category,
    split and text with its numbers masked) is re-emitted the first time only, prefixed with the
    split; nothing is swallowed. The records keep the per-sample facts (``*_converged``,
    ``*_is_bound``).
    """

    def __init__(self) -> None:
        self.seen: set[tuple[str, type, str]] = set()

    def emit(self, caught: list[warnings.WarningMessage], split: str) -> None:
        for w in caught:
            text = str(w.message)
            key = (split, w.category, re.sub(r"[-+]?\d[\d.,]*(e[-+]?\d+)?", "#", text))
            if key in self.seen:
                continue
            self.seen.add(key)
            warnings.warn_explicit(
                f"split {split}: {text} (shown once per split; later batches may repeat it)",
                w.category, w.filename, w.lineno, module=_module_of(w.filename))


def _module_of(filename: str) -> str:
    """The dotted module name of a source file (for warning filters such as
    ``error::DeprecationWarning:fsinfo_fast.*``), else the file name without ``.py``."""
    path = Path(filename).resolve()
    pkg = Path(__file__).resolve().parents[1]
    try:
        rel = path.relative_to(pkg.parent).with_suffix("")
    except ValueError:
        return filename[:-3] if filename.endswith(".py") else filename
    return ".".join(rel.parts)


def _num(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _nums(t: Tensor) -> list[float | None]:
    return [_num(v) for v in t.detach().cpu().tolist()]


def _flags(t: Tensor | None, b: int, default: bool) -> list[bool]:
    return [default] * b if t is None else [bool(v) for v in t.detach().cpu().tolist()]


def _metric_fields(prefix: str, r: Any, estimator: str, *, probes: bool = True,
                   rounding: bool = True) -> dict[str, list]:
    """The record fields of one :class:`~fsinfo_fast.MetricResult` (``[B]`` lists);
    ``{prefix}_rounding``: the rounding allowance measured by the float64 check and counted in
    the half-width (``info["rounding_measured"]``), null where none was measured (float64
    products, or ``info["rounding_unmeasured"]``: the fixed allowance stands)."""
    b = len(r)
    out: dict[str, list] = {
        prefix: _nums(r.value),
        f"{prefix}_se": _nums(r.stderr),
        f"{prefix}_hw": _nums(r.ci_halfwidth),
        f"{prefix}_converged": _flags(r.converged, b, True),
        f"{prefix}_is_bound": _flags(r.bound, b, False),
    }
    if rounding:  # the measured rounding allowance inside _hw (null: the fixed one)
        meas = r.info.get("rounding_measured")
        out[f"{prefix}_rounding"] = ([None] * b if meas is None  # (None: a float64 sample)
                                     else [None if v is None else _num(v) for v in meas])
    if probes:
        pps = r.probes_per_sample
        out[f"{prefix}_probes"] = ([r.num_probes] * b if pps is None
                                   else [int(k) for k in pps.cpu().tolist()])
        out[f"{prefix}_estimator"] = [estimator] * b
        if r.estimator == "mixed":  # (auto: some samples took an exact route, each its own)
            for k, est, why in zip(r.info["exact_samples"], r.info["exact_samples_estimator"],
                                   r.info["exact_samples_auto"], strict=True):
                out[f"{prefix}_estimator"][k] = f"{est} (auto: {why})"
                out[f"{prefix}_probes"][k] = None  # (as an exact record's: no probes)
    return out


def _bound_fields(prefix: str, bound: Any) -> dict[str, list]:
    """``{prefix}`` and its ``_low`` / ``_high`` from a :class:`fsinfo_fast.bounds.Bound`."""
    return {prefix: _nums(bound.value), f"{prefix}_low": _nums(bound.low),
            f"{prefix}_high": _nums(bound.high)}


#: ``{prefix}_status`` of a sigma* no finite noise reaches (JSON has no infinity; the value
#: fields are null there, which alone would read as "not computed")
SIGMA_UNREACHABLE = "unreachable: the target is at or below FSInfo's floor asymptote"
SIGMA_NEGLIGIBLE = (f"below {SIGMA_RANGE[0]:g}: the target holds without noise in practice "
                    "(FSInfo at sigma = 1 lies far below it)")


def _sigma_keys(prefix: str) -> tuple[str, ...]:
    return prefix, f"{prefix}_low", f"{prefix}_high", f"{prefix}_status"


def _sigma_fields(prefix: str, s: Any) -> dict[str, list]:
    """``{prefix}`` and its 95% interval from a :class:`~fsinfo_fast.result.SigmaResult`;
    ``{prefix}_status`` says where no finite sigma reaches the target."""
    return {prefix: _nums(s.sigma), f"{prefix}_low": _nums(s.ci_low),
            f"{prefix}_high": _nums(s.ci_high),
            f"{prefix}_status": [SIGMA_UNREACHABLE if math.isinf(v) else
                                 SIGMA_NEGLIGIBLE if v < SIGMA_RANGE[0] else None
                                 for v in s.sigma.tolist()]}


def _none_fields(b: int, *keys: str) -> dict[str, list]:
    return {k: [None] * b for k in keys}


def _label(r: Any, requested: str, *, method: bool = False) -> str:
    """The estimator a record names: ``randomized`` (``randomized (<method>)`` with ``method``)
    or ``exact``; where ``auto`` took the oracle, why (``exact (auto: <reason>)``), so that a
    fallback is never silent. A ``mixed`` result's randomized samples are named so here, its
    exact ones by :func:`_metric_fields`."""
    info = r.info if isinstance(r.info, dict) else {}
    if r.estimator in ("exact", "exact-fast"):
        why = info.get("auto")
        return f"{r.estimator} (auto: {why})" if requested == "auto" and why else r.estimator
    name = "randomized" if r.estimator == "mixed" else r.estimator
    m = info.get("method") if method else None
    return f"{name} ({m})" if m else name


def _backend_label(info: dict[str, Any]) -> str:
    """The backend that computed a split's products, with why ``auto`` left the engine where it
    did (``info["backend_fallback"]``): a fallback is never silent in the outputs either."""
    name, why = str(info.get("backend")), info.get("backend_fallback")
    if not why:
        return name
    first = " ".join(str(why).strip().splitlines()[0].split())  # one line in a CSV cell
    return f"{name} ({first[:240]})"


def split_quantities(cfg: ProfileConfig, plan: Plan, spec: SplitSpec, x: Tensor, ids: Tensor,
                     swept: ExactFisher | None = None, say=None) -> dict[str, list]:
    """Every record field of one split for one batch, from ONE
    :class:`~fsinfo_fast.Linearization` of the split's encoder at ``x``.

    FSInfo_diag, dFIL, the log-det FSInfo (where the plan asks) and FSInfoGuard's ``sigma*``
    come from the methods of ``ff.linearize(encoder, x, seed=cfg.seed, sample_ids=ids)`` (so
    they share every product the Linearization can share, and each sample's probes are seeded
    by ``(seed, sample id)`` only); the bounds from :mod:`fsinfo_fast.bounds`. A split served by
    the exact one-hot sweep (``swept``, the :class:`~fsinfo_fast.reference.ExactFisher` built
    from the shared diagonal) hands it to its Linearization as the oracle's
    (``Linearization._adopt_exact``: no Jacobian of its own; its rounding measured on this
    split, as the oracle's is), which computes the spectrum only for the log det.

    Args:
        cfg: the run's settings.
        plan: the run's plan.
        spec: the split.
        x: the batch ``[B, *in]`` on the run's device.
        ids: ``[B]`` int64 sample ids.
        swept: the split's exact Fisher quantities from the shared sweep, or ``None``.
        say: optional ``callable(str)`` told which step runs.

    Returns:
        ``{field: [B] list}`` (the fields of :data:`fsinfo_fast.profile.report.SAMPLE_FIELDS`
        after the identification columns).
    """
    import fsinfo_fast as ff

    from ..bounds import dfil_bound, fsinfo_bound

    def step(text: str) -> None:
        if say is not None:
            say(f"{text} {spec.layer}")

    b = x.shape[0]
    sigma, target = float(cfg.sigma), float(cfg.target)
    exact = plan.exact or spec.name in plan.small_exact
    est = "exact" if exact else cfg.estimator
    want_logdet = plan.logdet[spec.name] is None
    out: dict[str, list] = {}
    step("linearize")
    lin = ff.linearize(spec.encoder, x, backend=cfg.backend, seed=cfg.seed, sample_ids=ids)
    if swept is not None:  # the sweep's Jacobian, its rounding measured on this split
        lin._adopt_exact(swept)
    elif exact and want_logdet:
        lin.exact(spectrum=True)  # one dense Jacobian (with its spectrum) serves everything

    # --- FSInfo_diag, dFIL and sigma* ---------------------------------------------------------
    fd = sg = None
    if exact or cfg.variant != "logdet":
        step("FSInfo diag")
        fd = lin.fsinfo(sigma, variant="diag", estimator=est, atol=cfg.atol)
    step("dFIL")
    dl = lin.dfil(sigma, estimator=est, rtol=cfg.rtol, method=cfg.dfil_method)
    dfil_label = "exact (shared sweep)" if swept is not None else _label(dl, est, method=True)
    if swept is not None:
        dl.info["backend"] = "reference (shared sweep)"
    if fd is not None:
        step("sigma*")
        sg = lin.fsinfo_sigma(target, variant="diag", estimator=est, atol=cfg.atol,
                              _keep_tiny=True)
    diag_keys = ("fsinfo_diag", "fsinfo_diag_se", "fsinfo_diag_hw", "fsinfo_diag_probes",
                 "fsinfo_diag_estimator", "fsinfo_diag_converged", "fsinfo_diag_is_bound",
                 "fsinfo_diag_rounding")
    if fd is None:
        out.update(_none_fields(b, *diag_keys))
        out.update(_none_fields(b, "fsinfo_diag_bound", "fsinfo_diag_bound_low",
                                "fsinfo_diag_bound_high", *_sigma_keys("sigma_star")))
    else:
        out.update(_metric_fields("fsinfo_diag", fd, _label(fd, est)))
        out.update(_bound_fields("fsinfo_diag_bound", fsinfo_bound(fd)))
        out.update(_sigma_fields("sigma_star", sg))
    out.update(_metric_fields("dfil", dl, dfil_label))
    out.update(_bound_fields("dfil_bound", dfil_bound(dl)))
    out["backend"] = [_backend_label(dl.info)] * b

    # --- FSInfo log det -----------------------------------------------------------------------
    why = plan.logdet[spec.name]
    if why is not None:
        out.update(_none_fields(b, "fsinfo_logdet", "fsinfo_logdet_se", "fsinfo_logdet_hw",
                                "fsinfo_logdet_converged", "fsinfo_logdet_is_bound",
                                "fsinfo_logdet_bound", "fsinfo_logdet_bound_low",
                                "fsinfo_logdet_bound_high", *_sigma_keys("sigma_star_logdet")))
        out["fsinfo_logdet_status"] = [why] * b
        if why.startswith("-inf"):  # (sigma* is 0 there: FSInfo is -inf at every noise)
            out["sigma_star_logdet_status"] = [
                "0: FSInfo_logdet is -inf at every sigma here (every target holds without "
                "noise; the guard refuses it): give --prior-var for a finite one"] * b
        return out
    step("FSInfo logdet")
    ld = lin.fsinfo(sigma, variant="logdet", estimator=est, atol=cfg.atol,
                    prior_var=cfg.prior_var)
    out.update(_metric_fields("fsinfo_logdet", ld, ld.estimator, probes=False,
                              rounding=False))
    out["fsinfo_logdet_status"] = [
        "-inf: J^T J is singular" if not math.isfinite(v) else
        "upper bound: the spectrum reaches the products' precision" if bd else "ok"
        for v, bd in zip(ld.value.tolist(), ld.bound.tolist(), strict=True)]
    out.update(_bound_fields("fsinfo_logdet_bound", fsinfo_bound(ld)))
    if cfg.prior_var is None or ld.estimator == "exact":
        # with a prior only the exact route solves for sigma* (the log det it just computed
        # is cached on the Linearization, so this is arithmetic)
        step("sigma* logdet")
        sl = lin.fsinfo_sigma(target, variant="logdet",
                              estimator="exact" if ld.estimator == "exact" else est,
                              atol=cfg.atol, prior_var=cfg.prior_var, _keep_tiny=True)
        out.update(_sigma_fields("sigma_star_logdet", sl))
    else:
        out.update(_none_fields(b, *_sigma_keys("sigma_star_logdet")))
        out["sigma_star_logdet_status"] = [
            "not computed: with a prior only the exact route solves for sigma* (this log det "
            f"took the {ld.estimator} route)"] * b
    return out


def compute_batch(cfg: ProfileConfig, plan: Plan, splits: list[SplitSpec], x: Tensor,
                  y: Tensor, ids: Tensor, status=None,
                  sink: WarningSink | None = None) -> list[dict[str, Any]]:
    """Every (sample, split) record of one batch (fields: :data:`report.SAMPLE_FIELDS`).

    Per split, one :class:`~fsinfo_fast.Linearization` (:func:`split_quantities`); in exact
    profiles the splits of the plan's sweep take their exact diagonal from one one-hot JVP sweep
    through the deepest of them (:func:`~fsinfo_fast.profile.shared.exact_fisher_shared`), as a
    :class:`~fsinfo_fast.reference.ExactFisher` whose rounding each split's Linearization
    measures.

    Per sample and metric the record says whether the estimate met its tolerance
    (``*_converged``: False where the probe cap stopped it first; its interval is then wider than
    asked) and whether the value is only an upper bound (``*_is_bound``, e.g. a log det whose
    spectrum reached the working precision; its interval is then ``(-inf, value + hw]``).

    Args:
        status: optional ``callable(str)`` told which step is running (for the progress bar).
        sink: where the metrics' warnings go (one per split and kind over the whole run); a
            new one per call when omitted.
    """
    def say(text: str) -> None:
        if status is not None:
            status(text)

    b = x.shape[0]
    d = plan.d
    sink = sink if sink is not None else WarningSink()
    swept: dict[str, ExactFisher] = {}
    if plan.exact and plan.sweep:
        say(f"exact sweep ({len(plan.sweep)} splits)")
        swept = exact_fisher_shared(plan.stack, plan.sweep, x)
    records = []
    for s in splits:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fields = split_quantities(cfg, plan, s, x, ids, swept.get(s.name), say)
        sink.emit(caught, s.name)
        for i in range(b):
            rec: dict[str, Any] = {
                "sample": int(ids[i]), "split": s.name, "split_index": s.index,
                "layer": s.layer, "label": int(y[i]), "d": d, "m": plan.m[s.name],
            }
            rec.update({k: v[i] for k, v in fields.items()})
            records.append(rec)
    return records
# ------------------------------------------------------------------------------------------------
# the loop


def batches(n: int, batch_size: int) -> list[list[int]]:
    """Sample ids ``0..n-1`` cut into consecutive batches."""
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def require_extras(cfg: ProfileConfig) -> None:
    """Raise :class:`~fsinfo_fast.errors.MissingExtraError` (with the ``pip install`` line)
    before any work when an optional package this run will need is missing, rather than after
    an hour of computing when the table or the plot is drawn."""
    embedded = _embedded(cfg)
    zoo = isinstance(cfg.model, str) and is_zoo_model(cfg.model)
    if embedded or (zoo and not cfg.checkpoint):
        require("sklearn", "the bundled data sets (and the demo model's training data)")
    if not isinstance(cfg.data, str):
        pass  # (a tensor in memory: nothing to read)
    elif cfg.data == "natural":
        require("skimage", "--data natural")
    elif not embedded and not cfg.data.startswith("torchvision:"):
        require("PIL", f"reading the images of --data {cfg.data}")
    if cfg.progress:
        require("tqdm", "the progress bar")
    if cfg.table:
        require("rich", "the result table")
    if cfg.plot:
        require("matplotlib", "profile.png (--no-plot skips it)")


#: The options a resumed run reads from its ``settings.json`` where they are left at their
#: defaults (``ProfileConfig`` field -> settings key).
RESUMED_OPTIONS = {
    "model": "model", "checkpoint": "checkpoint", "data": "data", "size": "size",
    "max_samples": "max_samples", "splits": "splits", "sigma": "sigma", "variant": "variant",
    "estimator": "estimator", "atol": "atol", "rtol": "rtol", "prior_var": "prior_var",
    "target": "target", "seed": "seed", "share": "share", "dfil_method": "dfil_method",
    "batch_size": "batch_size", "backend": "backend", "channels": "channels", "plot": "plot",
    "input_name": "input_name",
}


def with_stored_settings(cfg: ProfileConfig) -> ProfileConfig:
    """For ``--resume``: ``cfg`` with every option of :data:`RESUMED_OPTIONS` that the command
    line or the ``ProfileConfig(...)`` call did not give (``cfg.given``; where that is
    ``None``, every option at its default) taken from the run's
    ``settings.json`` (``fsinfo-fast profile --out run1
    --resume`` alone continues ``run1`` as it was started; an option given with another value
    than the run's is still refused by the settings check). Unchanged without ``--resume`` or
    where the directory holds no readable run (the resume check reports that)."""
    if not cfg.resume:
        return cfg
    try:
        stored = RunDir(resolve_out(cfg)).load_settings()
    except (FSInfoError, OSError, ValueError):
        return cfg
    for key, name in (("model_in_memory", "model"), ("data_in_memory", "data")):
        if stored.get(key) and isinstance(getattr(cfg, name), str):
            raise ResumeError(
                f"--resume: {resolve_out(cfg)} was made with the {name} given in memory to "
                f"run_profile ({stored.get(name)}): resume it from Python, run_profile("
                f"ProfileConfig(..., {name}=<the same {name}>, resume=True))")
    default = ProfileConfig()
    changes: dict[str, Any] = {}
    for name, key in RESUMED_OPTIONS.items():
        # given: named in the call (or on the command line), or changed since (a value other
        # than the default: dataclasses.replace(cfg, sigma=...) or cfg.sigma = ... after the
        # call, which its record does not see, helper 130)
        given = (cfg.given is not None and name in cfg.given) or \
            getattr(cfg, name) != getattr(default, name)
        if key not in stored or given:
            continue
        value = stored[key]
        if name == "splits" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        changes[name] = value
    if cfg.out is None:  # the newest run, found now: keep it even if a newer one appears
        changes["out"] = str(resolve_out(cfg))
    return dataclasses.replace(cfg, **changes)


def run_profile(cfg: ProfileConfig, dist: DistContext | None = None) -> ProfileOutcome:
    """Run (or resume) a profile; every rank of a ``torchrun`` job calls this.

    Returns:
        The outcome (the summary on rank 0).

    Raises:
        FSInfoError: a user error (one-line message), on every rank.
    """
    cfg.validate()
    cfg = with_stored_settings(cfg)
    require_extras(cfg)
    if dist is not None:
        return _run(cfg, dist)
    with DistContext.from_env(cfg.device) as own:  # leaves the process group in step
        return _run(cfg, own)


def _run(cfg: ProfileConfig, dist: DistContext) -> ProfileOutcome:
    """:func:`_run_locked`, releasing rank 0's run lock however it ends (an error, SIGINT)."""
    locks: list[RunLock] = []
    try:
        return _run_locked(cfg, dist, locks)
    except KeyboardInterrupt:
        # rank 0 holds the run directory's lock from the moment its settings are written
        # (an interrupt during the set-up after that said only "interrupted", helper 126)
        if dist.is_root and locks:
            path = locks[0].path.parent
            # (a model or data given in memory has no command line: the CLI's resume refuses it)
            how = ("run_profile(ProfileConfig(..., resume=True)) with the same model, data and "
                   "options" if isinstance(cfg.model, nn.Module) or not isinstance(cfg.data, str)
                   else f"fsinfo-fast profile --out {shlex.quote(str(path))} --resume")
            print(f"interrupted: the records computed so far are kept in {path}; "
                  f"continue with: {how}", file=sys.stderr)
        raise
    finally:
        for lock in locks:
            lock.release()


def _run_locked(cfg: ProfileConfig, dist: DistContext, locks: list[RunLock]) -> ProfileOutcome:
    from .report import summarize, write_outputs

    t_start = time.perf_counter()
    root_extra: dict[str, Any] = {}
    data: Dataset | None = None

    def setup() -> _Prepared:
        nonlocal data
        prep, data_, extra = _prepare_root(cfg, dist, locks)
        data = data_
        root_extra.update(extra)
        return prep

    prep = dist.root_call(setup)
    if dist.is_root:
        model, splits = root_extra["model"], root_extra["splits"]
    else:
        model, splits = _rebuild(prep, cfg)
    device = dist.device
    model.to(device).eval()
    for s in splits:
        s.encoder.to(device)
    t_setup = time.perf_counter() - t_start
    plan = make_plan(cfg, model, splits,
                     prep.example.to(device=device, dtype=input_dtype(model)))

    run_dir = RunDir(prep.run_dir)
    names = [s.name for s in splits]
    # (batch ids, the (sample, split) records still missing: a batch with some recomputed whole,
    # only those written; a sample's other splits' records were appended again, helper 126)
    todo: list[tuple[list[int], set[tuple[int, str]]]] = []
    total_missing = 0
    store = None
    if dist.is_root:
        existing = run_dir.records.read()
        for ids in batches(prep.num_samples, cfg.batch_size):
            missing = {(i, n) for i in ids for n in names if (i, n) not in existing}
            if missing:
                todo.append((ids, missing))
                total_missing += len(missing)
        store = run_dir.records.open()
    todo_n = dist.broadcast(len(todo))
    steps = (todo_n + dist.world - 1) // dist.world
    bar = _progress(cfg, dist, total_missing, len(todo))
    sink = WarningSink()  # each distinct warning once per split over the whole run
    computed = 0
    t_compute = time.perf_counter()
    try:
        for step in range(steps):
            work = None
            if dist.is_root:
                work = []
                for r in range(dist.world):
                    j = step * dist.world + r
                    if j < len(todo):
                        ids, _ = todo[j]
                        work.append((ids, data.x[ids].clone(), data.y[ids].clone()))
                    else:
                        work.append(None)
            mine = dist.scatter(work)
            result: Any = None
            if mine is not None:
                ids, xb, yb = mine
                try:
                    recs = compute_batch(cfg, plan, splits,
                                         xb.to(device=device, dtype=input_dtype(model)), yb,
                                         torch.tensor(ids, dtype=torch.int64),
                                         status=_status(bar, ids), sink=sink)
                    result = ("ok", recs)
                except Exception as err:  # reported to every rank, re-raised below
                    user = isinstance(err, (FSInfoError, OSError))
                    if hasattr(err, "add_note"):  # (Python 3.11+: shown with the traceback)
                        err.add_note(
                            f"profile: while computing the batch of samples {ids}; the records "
                            f"computed before it are kept in {run_dir.path}: continue with "
                            "--resume (run_profile(..., resume=True))")
                    result = ("error", user, " ".join(str(err).split()), err)
            gathered = dist.gather(result if result is None or result[0] == "ok"
                                   else result[:3])
            err_msg = None
            if dist.is_root:
                for j, res in enumerate(gathered):
                    if res is None:
                        continue
                    if res[0] != "ok":
                        err_msg = err_msg or res
                        continue
                    ids, missing = todo[step * dist.world + j]
                    new = [rec for rec in res[1] if record_key(rec) in missing]
                    store.append(new)
                    computed += len(new)
                    if bar is not None:
                        bar.update(len(new))
            err_msg = dist.broadcast(err_msg)
            if err_msg is not None:
                if result is not None and result[0] == "error":
                    raise result[3]
                from .distributed import RemoteError

                if err_msg[1]:
                    raise RemoteError(err_msg[2])
                raise RuntimeError(f"another rank failed: {err_msg[2]}")
    finally:
        if bar is not None:
            bar.close()
        if store is not None:
            store.close()
    t_compute = time.perf_counter() - t_compute

    if not dist.is_root:
        return ProfileOutcome(run_dir=run_dir.path, summary=None, computed=0)
    records = run_dir.records.read()
    summary = summarize(prep.settings, splits, plan, records)
    summary["timing"] = {"setup_s": round(t_setup, 3), "compute_s": round(t_compute, 3),
                         "records_computed": computed, "world_size": dist.world,
                         "device": str(device)}
    summary["timing"]["total_s"] = round(time.perf_counter() - t_start, 3)  # before the files
    files = write_outputs(run_dir.path, summary, records, plot=cfg.plot)
    if cfg.table:
        from .report import print_table

        print_table(summary, files)
    return ProfileOutcome(run_dir=run_dir.path, summary=summary, files=files, computed=computed)


def _status(bar, ids: list[int]):
    if bar is None:
        return None
    span = f"samples {ids[0]}-{ids[-1]}" if len(ids) > 1 else f"sample {ids[0]}"

    def show(text: str) -> None:
        set_status(bar, f"{span}: {text}")

    return show


def _progress(cfg: ProfileConfig, dist: DistContext, total: int, nbatches: int):
    if not (cfg.progress and dist.is_root) or total == 0:
        return None
    desc = (f"profile ({nbatches} batch{'es' if nbatches != 1 else ''}"
            + (f", {dist.world} procs)" if dist.distributed else ")"))
    return progress_bar("the profile progress bar", total=total, desc=desc, unit="rec")


def config_dict(cfg: ProfileConfig) -> dict[str, Any]:
    return asdict(cfg)

