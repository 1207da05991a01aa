"""The validate job: metrics and attacks at every split point, agreement, noise sweep, bounds."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from .._progress import progress_bar, set_status
from ..attacks import (
    AttackResult,
    distance_correlation,
    inverse_network_attack,
    ksg_mutual_information,
    observe,
    optimization_attack,
    u_distance_correlation_sqr,
)
from ..bounds import dfil_bound, fsinfo_bound
from ..errors import BackendUnavailableError, InvalidInputError, InvalidInputTypeError
from ..estimators.base import t_quantile
from ..result import Z95, MetricResult
from .agreement import agreement

__all__ = ["ValidateConfig", "ValidateOutcome", "run_validate", "SCHEMA", "PAPER_PEARSON"]

log = logging.getLogger(__name__)

#: Identifies the layout of ``validate.json``.
SCHEMA = "fsinfo_fast.validate/1"
#: The per-split results written as each split finishes (``"partial": true``; the same
#: ``models[].splits[]`` entries as ``validate.json``), removed once ``validate.json`` is written.
PARTIAL = "validate.partial.json"
#: The paper's Pearson correlations (CIFAR-10, inverse-network attack; PAPER.md).
PAPER_PEARSON = {
    "resnet18": {"fsinfo_diag": 0.9875, "dfil": 0.9570, "dcor": 0.9711, "knn_mi": 0.9437},
    "vgg5": {"fsinfo_diag": 0.9872, "dfil": 0.8945, "dcor": 0.7332, "knn_mi": 0.6690},
}
#: Metrics whose agreement is reported, in table order (``fsinfo_logdet`` when computed).
#: ``dcor`` is the paper's V-statistic (comparable with its numbers), ``dcor_u`` the
#: bias-corrected squared distance correlation (about 0 under independence).
METRICS = ("fsinfo_diag", "fsinfo_logdet", "dfil", "dcor", "dcor_u", "knn_mi", "knn_mi_pca")
ATTACKS = ("inverse_network", "optimization")


@dataclass
class ValidateConfig:
    """Options of a validate run (the CLI flags; see ``fsinfo-fast validate --help``).

    Attributes:
        models: zoo models, each trained briefly on ``data`` (cached weights).
        data: bundled data set, ``natural`` (CIFAR-sized photograph crops) or ``digits``.
        size: image side in pixels.
        epochs: training epochs of the models.
        splits: ``paper`` (each model's ``paper_splits``), ``all``, or a comma list.
        sigma: noise scale of the smashed data (the paper's nominal 0.1 by default).
        samples: held-out samples for the per-sample metrics, the optimisation attack and the
            bound report (the first ones of the test split).
        eval_samples: held-out samples for the inverse network's scores and the set-level
            baselines (dCor, kNN MI); ``None``: the whole test split.
        train_samples: the attacker's training samples for the decoder (``None``: all).
        probes: probes per sample of the randomized FSInfo_diag / dFIL estimator.
        exact_max: splits with ``min(m, d)`` at most this are computed exactly.
        logdet: also compute FSInfo log det (with ``prior_var`` = the training pixels' variance
            so that it is finite everywhere); slow.
        decoder_epochs, decoder_width: the inverse network's training.
        attack_steps, attack_lr, tv_weight: the optimisation attack.
        mi_k: neighbours of the KSG estimator; mi_dims: PCA dimensions of ``knn_mi_pca``.
        sweep_model, sweep_split, sweep_sigmas: the noise sweep (``sweep_model`` must be one of
            ``models``; no sweep if ``sweep_sigmas`` is empty).
        seed: seeds the model training, the probes, the noise and the attacks.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        backend: product backend of the metrics.
        out: output folder (default ``fsinfo-validate/<time>``).
        plot: write the PNG figures.
        progress: show a progress bar; table: print the result table.
    """

    models: tuple[str, ...] = ("vgg5", "resnet18")
    data: str = "natural"
    size: int = 16
    epochs: int = 4
    splits: str = "paper"
    sigma: float = 0.1
    samples: int = 6
    eval_samples: int | None = None
    train_samples: int | None = None
    probes: int = 16
    exact_max: int = 256
    logdet: bool = False
    decoder_epochs: int = 8
    decoder_width: int = 16
    attack_steps: int = 100
    attack_lr: float = 0.05
    tv_weight: float = 0.01
    mi_k: int = 3
    mi_dims: int = 8
    sweep_model: str = "vgg5"
    sweep_split: int = 2
    sweep_sigmas: tuple[float, ...] = (0.1, 1.0, 10.0, 50.0)
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    out: str | None = None
    plot: bool = True
    progress: bool = True
    table: bool = True

    def validate(self) -> None:
        """Check every setting before any work; normalise the model names.

        A config built in Python (not by the CLI) may hold a float count, a string sigma or a
        single model name as a string: each is refused here, naming the option, rather than as
        a raw ``TypeError`` after the models were trained (``samples=3.0`` slices the data) or
        misread (``models="vgg5"`` is the models ``v``, ``g``, ...). Model names are normalised
        as the CLI does (:func:`~fsinfo_fast.profile.sources.zoo_key`: ``VGG_5`` is ``vgg5``).

        Raises:
            InvalidInputTypeError: a setting of the wrong type.
            InvalidInputError: a bad value.
        """
        from ..data import DATASETS
        from ..models import ZOO
        from ..profile.sources import zoo_key

        _check_types(self)
        self.models = tuple(zoo_key(m) for m in self.models)
        self.sweep_model = zoo_key(self.sweep_model)
        if not self.models:
            raise InvalidInputError("--models needs at least one model")
        for mname in self.models:
            if mname not in ZOO:
                raise InvalidInputError(
                    f"unknown model {mname!r}; zoo models: {', '.join(sorted(ZOO))}")
        if self.data not in DATASETS:
            raise InvalidInputError(
                f"unknown data set {self.data!r}; bundled: {', '.join(sorted(DATASETS))}")
        for key in ("size", "samples", "probes", "decoder_epochs", "decoder_width",
                    "attack_steps", "mi_k", "mi_dims"):
            if int(getattr(self, key)) < 1:
                raise InvalidInputError(f"--{key.replace('_', '-')} must be >= 1, "
                                        f"got {getattr(self, key)}")
        if self.size < 8:
            raise InvalidInputError(f"--size must be >= 8 pixels, got {self.size}")
        if self.probes < 2:
            raise InvalidInputError(f"--probes must be >= 2, got {self.probes}")
        if self.epochs < 0:
            raise InvalidInputError(f"--epochs must be >= 0, got {self.epochs}")
        # (the bias-corrected distance correlation needs 4 held-out samples: with 3 the run
        # failed after its models and attacks had run, helper 130)
        for key, least in (("eval_samples", 4), ("train_samples", 2)):
            v = getattr(self, key)
            if v is not None and v < least:
                raise InvalidInputError(f"--{key.replace('_', '-')} must be >= {least}, got {v}")
        if self.eval_samples is not None and self.mi_k >= self.eval_samples:
            raise InvalidInputError(
                f"--mi-k {self.mi_k} needs more than {self.mi_k} held-out samples for the kNN "
                f"mutual information; --eval-samples is {self.eval_samples} (raise it or lower "
                "--mi-k)")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise InvalidInputError(f"--sigma must be finite and > 0, got {self.sigma}")
        if any(not (math.isfinite(s) and s > 0) for s in self.sweep_sigmas):
            raise InvalidInputError(f"--sweep-sigmas must be finite and > 0, got "
                                    f"{list(self.sweep_sigmas)}")
        if self.sweep_sigmas and self.sweep_model not in self.models:
            raise InvalidInputError(
                f"--sweep-model {self.sweep_model!r} is not among --models "
                f"({', '.join(self.models)}); add it or pass --sweep-sigmas none")
        if not (self.attack_lr > 0 and self.tv_weight >= 0):
            raise InvalidInputError("--attack-lr must be > 0 and --tv-weight >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        from ..engine import BACKENDS

        if self.backend not in ("auto", *BACKENDS):
            raise InvalidInputError(
                f"unknown --backend {self.backend!r}; one of auto, {', '.join(BACKENDS)}")


#: ValidateConfig's settings by type (checked by :func:`_check_types`)
#: (``seed`` has its own check, ``sweep_split`` may also be a module path)
_INT_KEYS = ("size", "epochs", "samples", "probes", "exact_max", "decoder_epochs",
             "decoder_width", "attack_steps", "mi_k", "mi_dims")
_OPTIONAL_INT_KEYS = ("eval_samples", "train_samples")
_FLOAT_KEYS = ("sigma", "attack_lr", "tv_weight")
_STR_KEYS = ("data", "sweep_model", "backend")
_BOOL_KEYS = ("logdet", "plot", "progress", "table")


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def _check_types(cfg: ValidateConfig) -> None:
    """Raise :class:`InvalidInputTypeError` for a setting of the wrong type (see
    :meth:`ValidateConfig.validate`): integers (Python or NumPy, not bools or floats), real
    numbers (not strings), strings, booleans, ``models`` a sequence of names, ``sweep_sigmas``
    a sequence of numbers, ``splits`` a string or a sequence of split indices / module paths,
    ``sweep_split`` one of those, ``device`` a string or a :class:`torch.device`. Counts become
    ``int``, numbers ``float``, sequences tuples (``splits``: a list, as
    :func:`~fsinfo_fast.profile.sources.resolve_splits` takes it), a device its string, so
    that ``validate.json`` records plain values."""
    import numbers

    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_real(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    for key in _INT_KEYS + _OPTIONAL_INT_KEYS:
        v = getattr(cfg, key)
        if v is None and key in _OPTIONAL_INT_KEYS:
            continue
        if not is_int(v):
            extra = " or None (all)" if key in _OPTIONAL_INT_KEYS else ""
            raise InvalidInputTypeError(
                f"{_flag(key)} ({key}=) must be an integer{extra}, got {type(v).__name__} "
                f"{v!r}")
        setattr(cfg, key, int(v))
    for key in _FLOAT_KEYS:
        v = getattr(cfg, key)
        if not is_real(v):
            raise InvalidInputTypeError(
                f"{_flag(key)} ({key}=) must be a number, got {type(v).__name__} {v!r}")
        setattr(cfg, key, float(v))
    for key in _STR_KEYS:
        v = getattr(cfg, key)
        if not isinstance(v, str):
            raise InvalidInputTypeError(
                f"{_flag(key)} ({key}=) must be a string, got {type(v).__name__} {v!r}")
    for key in _BOOL_KEYS:
        v = getattr(cfg, key)
        if not isinstance(v, bool):
            raise InvalidInputTypeError(
                f"{key}= must be True or False, got {type(v).__name__} {v!r}")
    if isinstance(cfg.models, str) or not isinstance(cfg.models, (list, tuple)) or not all(
            isinstance(m, str) for m in cfg.models):
        raise InvalidInputTypeError(
            f"--models (models=) must be a list or tuple of model names, e.g. ('vgg5',), got "
            f"{type(cfg.models).__name__} {cfg.models!r}")
    cfg.models = tuple(cfg.models)
    if isinstance(cfg.sweep_sigmas, (str, bytes)) or not isinstance(
            cfg.sweep_sigmas, (list, tuple)) or not all(is_real(v) for v in cfg.sweep_sigmas):
        raise InvalidInputTypeError(
            f"--sweep-sigmas (sweep_sigmas=) must be a list or tuple of numbers (empty: no "
            f"sweep), got {type(cfg.sweep_sigmas).__name__} {cfg.sweep_sigmas!r}")
    cfg.sweep_sigmas = tuple(float(v) for v in cfg.sweep_sigmas)
    def is_point(v: Any) -> bool:
        return isinstance(v, str) or is_int(v)

    if not is_point(cfg.sweep_split):
        raise InvalidInputTypeError(
            f"--sweep-split (sweep_split=) must be a split index or a module path, got "
            f"{type(cfg.sweep_split).__name__} {cfg.sweep_split!r}")
    if is_int(cfg.sweep_split):
        cfg.sweep_split = int(cfg.sweep_split)
    if not isinstance(cfg.splits, str):
        if not isinstance(cfg.splits, (list, tuple)) or not all(is_point(v)
                                                                for v in cfg.splits):
            raise InvalidInputTypeError(
                f"--splits (splits=) must be a string ('paper', 'all', '1,2,3') or a list of "
                f"split indices / module paths, got {type(cfg.splits).__name__} "
                f"{cfg.splits!r}")
        cfg.splits = [int(v) if is_int(v) else v for v in cfg.splits]
    if isinstance(cfg.device, torch.device):
        cfg.device = str(cfg.device)
    if not isinstance(cfg.device, str):
        raise InvalidInputTypeError(
            f"--device (device=) must be a string such as 'cpu' or 'cuda:0', got "
            f"{type(cfg.device).__name__} {cfg.device!r}")
    if cfg.out is not None and not isinstance(cfg.out, (str, os.PathLike)):
        raise InvalidInputTypeError(
            f"--out (out=) must be a path or None, got {type(cfg.out).__name__} {cfg.out!r}")
    if isinstance(cfg.out, os.PathLike):
        cfg.out = os.fspath(cfg.out)


@dataclass
class ValidateOutcome:
    """What :func:`run_validate` returns: the output folder, the JSON document and its files."""

    out: Path
    report: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# small helpers


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _mean_se(v: Tensor, r: MetricResult | None = None) -> dict[str, Any]:
    """Mean over samples with the estimator's and the sampling error bars.

    ``stderr`` is the standard error of the mean as an estimate of the data set's mean
    (sampling + estimator) and ``ci95`` its interval with the Student-t quantile on ``n - 1``
    degrees of freedom: a handful of samples (``--samples 3``: t = 4.30, not 1.96) would
    otherwise be labelled 95% and cover about 80%. Where ``r`` (the metric's result over these
    samples) is given the interval is :meth:`MetricResult.mean` ``(population=True)``'s (which
    adds the estimators' deterministic error allowances), ``estimator_stderr`` the estimators'
    own error of the mean and ``max_sample_ci95_halfwidth`` the widest of the samples' own 95%
    intervals (``r.ci_halfwidth``: t-based, or log-scale for dFIL, not ``1.96 * stderr``).
    """
    v = v.detach().to(torch.float64).cpu()
    n = int(v.numel())
    out: dict[str, Any] = {"mean": _num(v.mean()), "n": n,
                           "sample_std": _num(v.std()) if n > 1 else None,
                           "min": _num(v.min()), "max": _num(v.max())}
    out["stderr"] = _num(v.std() / math.sqrt(n)) if n > 1 else None
    if r is not None:
        se = r.stderr.detach().to(torch.float64).cpu()
        out["estimator_stderr"] = _num(torch.sqrt((se**2).sum()) / n)
        out["max_sample_ci95_halfwidth"] = _num(r.ci_halfwidth.max())
    if out["stderr"] is not None:
        if r is not None:
            low, high = r.mean(population=True).ci95()
        else:
            hw = t_quantile(n - 1) * out["stderr"]
            low, high = out["mean"] - hw, out["mean"] + hw
        out["ci95"] = [_num(low), _num(high)]
    return out


def halfwidth95(entry: dict[str, Any]) -> float | None:
    """The 95% half-width of a summary entry of ``validate.json`` (the table's ``±`` and the
    figures' error bars): half its ``ci95`` where it has one, else the Student-t quantile on
    ``n - 1`` degrees of freedom times its ``stderr`` (the attacks' scores, dCor, kNN MI);
    ``None`` without a standard error."""
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        return (ci[1] - ci[0]) / 2
    se, n = entry.get("stderr"), entry.get("n")
    if not se:
        return None
    return t_quantile(n - 1) * se if isinstance(n, int) and n > 1 else Z95 * se


def _resolve_out(cfg: ValidateConfig) -> Path:
    """The output folder, created before any work.

    ``--out``: refused where it holds anything (the same check as ``profile``'s,
    :func:`~fsinfo_fast.profile.store.check_out_empty`): ``validate.json`` and the figures have
    fixed names, so a second run there would replace a previous run's results without a word.
    Default: a new ``fsinfo-validate/<time>`` folder, claimed with ``mkdir(exist_ok=False)``
    (``<time>-2``, ``-3``, ... where a run started in the same second took the name), so two
    runs never share one.
    """
    from ..profile.errors import RunDirError
    from ..profile.store import check_out_empty

    if cfg.out:
        out = Path(cfg.out)
        fix = "choose a new --out (or empty that folder first)"
        if (out / "validate.json").exists():
            holds = "a previous validate run"
        elif (out / PARTIAL).exists():
            holds = f"an interrupted validate run: {PARTIAL}"
            fix = (f"its finished splits are in {out / PARTIAL} (the same models[].splits[] "
                   "entries as validate.json; validate cannot resume it); choose a new --out "
                   "to run again, or move that file away first")
        else:
            holds = "other files"
        check_out_empty(out, holds, fix)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(
                f"cannot create output directory {out}: {err.strerror or err}") from None
        return out
    base = Path("fsinfo-validate") / datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        out = base if i == 1 else Path(f"{base}-{i}")
        try:
            out.mkdir(parents=True, exist_ok=False)
            return out
        except FileExistsError:
            continue
        except OSError as err:
            raise RunDirError(
                f"cannot create output directory {out}: {err.strerror or err}") from None
    raise RunDirError(f"no free output directory next to {base}; pass --out")


def _load_demo(cfg: ValidateConfig, name: str, device: torch.device, bar) -> dict[str, Any]:
    """The briefly trained model and its train / test data (the attacker trains on the former)."""
    from ..train import _demo_data, demo_model

    if bar is not None:
        set_status(bar, f"{name}: training (cached after the first run)")
    model, x_te, _, acc = demo_model(name, data=cfg.data, size=cfg.size, seed=cfg.seed,
                                     epochs=cfg.epochs, cache=True)
    x_tr, _, x_te2, _ = _demo_data(cfg.data, cfg.size, cfg.seed)
    if not torch.equal(x_te, x_te2):  # pragma: no cover - both come from one function
        raise RuntimeError("demo_model's test split differs from its data split")
    if cfg.train_samples is not None:
        x_tr = x_tr[: cfg.train_samples]
    if cfg.eval_samples is not None:
        x_te = x_te[: cfg.eval_samples]
    _check_sizes(cfg, len(x_te))
    return {"model": model.to(device).eval(), "x_train": x_tr.to(device),
            "x_test": x_te.to(device), "accuracy": acc}


def _features(model: nn.Module, splits: list, xs: list[Tensor]) -> list[dict[str, Tensor]]:
    """Each split's smashed data for each tensor in ``xs``, sharing one pass per batch where the
    splits nest (:class:`~fsinfo_fast.profile.shared.NestedStack`)."""
    from ..profile.shared import NestedStack

    encoders = {s.name: s.encoder for s in splits}
    example = xs[0][:1]
    stack = NestedStack(model, list(encoders), example, encoders)
    shapes = {}
    with torch.no_grad():
        for n, enc in encoders.items():
            shapes[n] = tuple(enc(example).shape[1:])
    out: list[dict[str, Tensor]] = []
    for x in xs:
        feats: dict[str, list[Tensor]] = {n: [] for n in encoders}
        for i in range(0, len(x), 128):
            xb = x[i : i + 128]
            got = stack.forward(xb) if stack.names else {}
            for n, enc in encoders.items():
                if n in got:
                    feats[n].append(got[n].reshape(len(xb), *shapes[n]))
                else:
                    with torch.no_grad():
                        feats[n].append(enc(xb))
        out.append({n: torch.cat(v) for n, v in feats.items()})
    return out


def _diag_metrics(cfg: ValidateConfig, enc: nn.Module, x: Tensor, sigma: float,
                  seed: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """FSInfo_diag and dFIL per sample: exact for small ``min(m, d)``, else from the same ``K``
    VJP probes (one randomized pass gives both)."""
    from ..linearization import linearize

    lin = linearize(enc, x, backend=cfg.backend, seed=seed)
    if min(lin.m, lin.d) <= cfg.exact_max:
        ex = lin.exact()  # one oracle pass serves both metrics
        fs, df = ex.fsinfo(sigma), ex.dfil(sigma)
        # the float64 oracle served (--backend was checked up front, but not used here)
        how = {"estimator": "exact", "probes": None, "backend": "reference",
               "backend_requested": cfg.backend}
    else:
        fs = lin.fsinfo(sigma, estimator="randomized", num_probes=cfg.probes)
        df = lin.dfil(sigma, estimator="randomized", num_probes=cfg.probes, method="diag")
        how = {"estimator": "randomized", "probes": cfg.probes,
               "backend": fs.info.get("backend", str(cfg.backend)),
               "backend_requested": cfg.backend}
    values = {"fsinfo_diag": (fs.value, fs.stderr), "dfil": (df.value, df.stderr)}
    per_sample = {k: v[0].detach().cpu().to(torch.float64) for k, v in values.items()}
    per_sample.update({f"{k}_stderr": v[1].detach().cpu().to(torch.float64)
                       for k, v in values.items()})
    summary = {"fsinfo_diag": dict(_mean_se(fs.value, fs), **how),
               "dfil": dict(_mean_se(df.value, df), **how)}
    return summary, per_sample


def _logdet(cfg: ValidateConfig, enc: nn.Module, x: Tensor, sigma: float, prior_var: float,
            seed: int) -> tuple[dict[str, Any], Tensor]:
    from .. import fsinfo

    r = fsinfo(enc, x, sigma=sigma, variant="logdet", prior_var=prior_var, atol=0.02, seed=seed,
               backend=cfg.backend)
    return dict(_mean_se(r.value, r), estimator=r.estimator,
                prior_var=prior_var), r.value.detach().cpu().to(torch.float64)


def _bound_fractions(mse: Tensor, per_sample: dict[str, Tensor]) -> dict[str, Any]:
    """How often the attack's per-sample MSE falls below each bound (per dimension)."""
    out: dict[str, Any] = {}
    mse = mse.to(torch.float64).cpu()
    bounds = {"dfil": dfil_bound(per_sample["dfil"]),
              "fsinfo_diag": fsinfo_bound(per_sample["fsinfo_diag"])}
    if "fsinfo_logdet" in per_sample:
        bounds["fsinfo_logdet"] = fsinfo_bound(per_sample["fsinfo_logdet"])
    for key, b in bounds.items():
        below = mse < b.value
        out[key] = {"proven": b.proven, "fraction_below": float(below.double().mean()),
                    "count_below": int(below.sum()), "n": int(mse.numel()),
                    "bound_mean": _num(b.value.mean()),
                    # (the median of an even count: the middle two's mean, not the lower one)
                    "mse_over_bound_median": _num(torch.quantile((mse / b.value).double(),
                                                                 0.5))}
    return out


def _attack_summary(r: AttackResult, n_first: int | None = None) -> dict[str, Any]:
    out = {"all": r.summary()}
    if n_first is not None and n_first < len(r.mse):
        out["first"] = AttackResult(r.attack, r.x_hat[:n_first], r.mse[:n_first],
                                    r.psnr[:n_first], r.ssim[:n_first], r.sigma).summary()
    keep = {k: v for k, v in r.info.items() if isinstance(v, (int, float, str))}
    out["settings"] = keep
    return out


# ------------------------------------------------------------------------------------------
# the job


def run_validate(cfg: ValidateConfig) -> ValidateOutcome:
    """Run the validation (see :mod:`fsinfo_fast.validate`) and write its JSON and figures."""
    cfg.validate()
    from ..profile.distributed import resolve_device
    from ..profile.sources import resolve_splits
    from ..profile.store import atomic_write_bytes, atomic_write_text

    device = resolve_device(cfg.device)
    _check_backend(cfg, device)
    _check_split_points(cfg)
    _check_data_sizes(cfg)
    out = _resolve_out(cfg)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    bar = None
    models_report: list[dict[str, Any]] = []
    examples: dict[str, Any] = {}
    sweep_report: dict[str, Any] | None = None
    settings = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(cfg).items() if k not in ("progress", "table", "plot")}

    def save_partial(name: str, splits_done: list[dict[str, Any]]) -> None:
        # each split's results as soon as it finishes (PARTIAL, replaced atomically): a run
        # stopped after hours keeps the splits it computed
        done = [*models_report, {"model": name, "splits": splits_done}]
        atomic_write_text(out / PARTIAL, json.dumps(
            {"schema": SCHEMA, "partial": True, "settings": settings, "models": done},
            indent=1, allow_nan=False) + "\n")

    try:
        loaded: dict[str, dict[str, Any]] = {}
        split_lists: dict[str, list] = {}
        for name in cfg.models:
            t0 = time.perf_counter()
            loaded[name] = _load_demo(cfg, name, device, None)
            split_lists[name] = _by_depth(name, resolve_splits(loaded[name]["model"],
                                                               cfg.splits))
            timing[f"{name}/train"] = time.perf_counter() - t0
        # one progress step per (model, split) and per sweep sigma
        total = sum(len(v) for v in split_lists.values()) + len(cfg.sweep_sigmas)
        if cfg.progress:
            bar = progress_bar("the validate progress bar", total=total, desc="validate",
                               unit="step")
        for name in cfg.models:
            rep, ex = _validate_model(cfg, name, loaded[name], split_lists[name], bar, timing,
                                      save_partial)
            models_report.append(rep)
            examples[name] = ex
        if cfg.sweep_sigmas:
            sweep_report, ex = _noise_sweep(cfg, loaded[cfg.sweep_model],
                                            split_lists[cfg.sweep_model], bar, timing)
            examples["sweep"] = ex
    finally:
        if bar is not None:
            bar.close()

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "environment": _environment(device),
        "models": models_report,
        "noise_sweep": sweep_report,
        "bounds": _bounds_overview(models_report, sweep_report),
        "paper": {"pearson": PAPER_PEARSON, "protocol": "Pearson correlation across split "
                  "points of (m0 - mi)/m0 with (MSE_i - MSE0)/MSE_i, inverse-network attack"},
    }
    files: dict[str, str] = {}
    if cfg.plot:
        from .plot import plot_agreement, plot_noise_sweep, plot_reconstructions, plot_splits

        t0 = time.perf_counter()
        pngs = {"agreement.png": plot_agreement(report)}
        for m in models_report:
            pngs[f"splits_{m['model']}.png"] = plot_splits(m)
            pngs[f"reconstructions_{m['model']}.png"] = plot_reconstructions(
                m["model"], examples[m["model"]])
        if sweep_report is not None:
            pngs["noise_sweep.png"] = plot_noise_sweep(sweep_report, examples["sweep"])
        for fname, data in pngs.items():
            atomic_write_bytes(out / fname, data)
            files[fname.removesuffix(".png")] = str(out / fname)
        timing["plots"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    report["timing_s"] = {k: round(v, 2) for k, v in timing.items()}
    report["files"] = {k: Path(v).name for k, v in files.items()}
    report["files"]["json"] = "validate.json"
    atomic_write_text(out / "validate.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out / PARTIAL).unlink(missing_ok=True)  # validate.json holds all of it now
    files["json"] = str(out / "validate.json")
    if cfg.table:
        from .report import print_table

        print_table(report, files)
    return ValidateOutcome(out=out, report=report, files=files)


def _check_backend(cfg: ValidateConfig, device: torch.device) -> None:
    """An explicit ``--backend`` that cannot run here is refused before any work, as the metrics
    refuse it (:func:`~fsinfo_fast.engine.resolve_backend`). Without this check a run whose
    splits all took the float64 oracle (``min(m, d) <= exact_max``) never asked the backend
    and succeeded, recording a backend that could not have served.

    Raises:
        BackendUnavailableError: naming ``--backend`` and why it cannot run.
    """
    if cfg.backend == "auto":
        return
    from ..engine import resolve_backend

    try:
        resolve_backend(cfg.backend, device)
    except BackendUnavailableError as err:
        raise BackendUnavailableError(
            f"--backend {cfg.backend}: {err}; choose another --backend (or auto)") from None


def _check_sizes(cfg: ValidateConfig, n_test: int) -> None:
    """``--samples`` and ``--mi-k`` against the held-out samples used (``n_test``, after
    ``--eval-samples``).

    Raises:
        InvalidInputError: naming the option and the number of samples available.
    """
    if cfg.samples > n_test:
        raise InvalidInputError(
            f"--samples {cfg.samples} exceeds the {n_test} held-out samples available"
            + (f" (--eval-samples {cfg.eval_samples})" if cfg.eval_samples is not None else "")
            + "; lower --samples")
    if cfg.mi_k >= n_test:
        raise InvalidInputError(
            f"--mi-k {cfg.mi_k} needs more than {cfg.mi_k} held-out samples for the kNN mutual "
            f"information; the data has {n_test} (lower --mi-k)")


def _check_data_sizes(cfg: ValidateConfig) -> None:
    """The data's split sizes are known without training (the same split as the training's):
    check the sample counts against them before any model is trained or any folder made.

    Raises:
        InvalidInputError: ``--eval-samples`` or ``--train-samples`` above the split's size, or
            one of :func:`_check_sizes`'s.
    """
    from ..train import _demo_data

    x_tr, _, x_te, _ = _demo_data(cfg.data, cfg.size, cfg.seed)
    for key, v, have, split in (("eval_samples", cfg.eval_samples, len(x_te), "held-out"),
                                ("train_samples", cfg.train_samples, len(x_tr), "training")):
        if v is not None and v > have:
            raise InvalidInputError(
                f"{_flag(key)} {v} exceeds the {have} {split} samples of --data {cfg.data} "
                f"(size {cfg.size}); lower it or leave it out (all)")
    n_test = len(x_te) if cfg.eval_samples is None else cfg.eval_samples
    _check_sizes(cfg, n_test)


def _check_split_points(cfg: ValidateConfig) -> None:
    """Resolve ``--splits`` for every model and ``--sweep-split`` for the sweep's model on an
    untrained copy of each (the same modules, so the same split points) before any training:
    an unknown split point found after every model was trained and every split computed
    throws all that work away.

    Raises:
        SplitError: naming the option (``--splits`` or ``--sweep-split``) and the model.
    """
    from ..errors import SplitError
    from ..models import get_model
    from ..profile.sources import resolve_splits

    for name in cfg.models:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG is not touched
            model = get_model(name, num_classes=2, in_channels=3, input_size=cfg.size).eval()
        try:
            _by_depth(name, resolve_splits(model, cfg.splits))
        except SplitError as err:
            raise SplitError(f"--splits for {name}: {err}") from None
        if cfg.sweep_sigmas and name == cfg.sweep_model:
            try:
                resolve_splits(model, [cfg.sweep_split])
            except SplitError as err:
                raise SplitError(f"--sweep-split {cfg.sweep_split!r} for {name}: {err}"
                                 ) from None


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"fsinfo_fast": __version__, "torch": torch.__version__,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "device": str(device), "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count()}
    try:
        env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _by_depth(model_name: str, splits: list) -> list:
    """``splits`` shallowest first (by paper index): the agreement statistic takes the first
    split as its reference, so ``--splits 3,1,2`` is run as ``1,2,3``.

    Raises:
        InvalidInputError: with several splits, one that is not among the model's split points
            (no index, so no depth to order it by).
    """
    if len(splits) > 1:
        for sp in splits:
            if sp.index is None:
                raise InvalidInputError(
                    f"--splits: {sp.name!r} is not one of {model_name}'s split points, so "
                    "validate cannot order it by depth; name split points by index or by "
                    "module path from the model's split_points")
    return sorted(splits, key=lambda sp: sp.index if sp.index is not None else 0)


def _noise_seed(seed: int, split_name: str) -> int:
    """Seed of the noise ``z = f(x) + sigma * eps`` for dCor / kNN MI at one split: from the run
    seed and the split's name only, so a split's numbers do not depend on the other splits."""
    digest = hashlib.sha256(f"validate-noise|{int(seed)}|{split_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _step(bar, text: str) -> Any:
    if bar is None:
        return None

    def show(msg: str) -> None:
        set_status(bar, f"{text}: {msg}")

    show("start")
    return show


def _validate_model(cfg: ValidateConfig, name: str, data: dict[str, Any], splits: list, bar,
                    timing: dict[str, float], save_partial: Any = None,
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    model, x_tr, x_te = data["model"], data["x_train"], data["x_test"]
    x = x_te[: cfg.samples]
    prior_var = float(x_tr.double().var())
    t0 = time.perf_counter()
    f_train, f_test = _features(model, splits, [x_tr, x_te])
    timing[f"{name}/features"] = time.perf_counter() - t0
    split_reports: list[dict[str, Any]] = []
    series: dict[str, list[float | None]] = {k: [] for k in METRICS}
    mse_series: dict[str, list[float | None]] = {a: [] for a in ATTACKS}
    examples: dict[str, Any] = {"x": x_te[:6].cpu(), "rows": []}
    for sp in splits:
        label = f"{name} split {sp.label} ({sp.layer})"
        show = _step(bar, label)
        t_split = time.perf_counter()
        enc = sp.encoder
        rep: dict[str, Any] = {"index": sp.index, "name": sp.name, "layer": sp.layer,
                               "feature_shape": list(f_test[sp.name].shape[1:]),
                               "d": int(x[0].numel()), "m": int(f_test[sp.name][0].numel())}
        metrics: dict[str, Any] = {}
        show and show("FSInfo / dFIL")
        summ, per_sample = _diag_metrics(cfg, enc, x, cfg.sigma, cfg.seed)
        metrics.update(summ)
        if cfg.logdet:
            show and show("FSInfo log det")
            metrics["fsinfo_logdet"], per_sample["fsinfo_logdet"] = _logdet(
                cfg, enc, x, cfg.sigma, prior_var, cfg.seed)
        show and show("dCor / kNN MI")
        zgen = torch.Generator().manual_seed(_noise_seed(cfg.seed, sp.name))
        z_eval = observe(f_test[sp.name], cfg.sigma, zgen)
        dc = distance_correlation(x_te, z_eval)
        dcu = u_distance_correlation_sqr(x_te, z_eval)
        mi = ksg_mutual_information(x_te, z_eval, k=cfg.mi_k)
        mip = ksg_mutual_information(x_te, z_eval, k=cfg.mi_k, dims=cfg.mi_dims)
        for key, st in (("dcor", dc), ("dcor_u", dcu), ("knn_mi", mi),
                        ("knn_mi_pca", mip)):
            metrics[key] = {"value": _num(st.value), "stderr": _num(st.stderr), "n": st.n,
                            **{k2: v for k2, v in st.info.items() if v is not None}}
        rep["metrics"] = metrics
        show and show("inverse network")
        inv = inverse_network_attack(
            enc, cfg.sigma, x_tr, x_te, epochs=cfg.decoder_epochs, width=cfg.decoder_width,
            seed=cfg.seed, features=(f_train[sp.name], f_test[sp.name]), progress=show)
        show and show("optimisation attack")
        opt = optimization_attack(enc, cfg.sigma, x, steps=cfg.attack_steps, lr=cfg.attack_lr,
                                  tv_weight=cfg.tv_weight, seed=cfg.seed, progress=show)
        rep["attacks"] = {"inverse_network": _attack_summary(inv, cfg.samples),
                          "optimization": _attack_summary(opt)}
        rep["bounds"] = {"optimization": _bound_fractions(opt.mse, per_sample),
                         "inverse_network": _bound_fractions(inv.mse[: cfg.samples], per_sample)}
        rep["per_sample"] = {
            "fsinfo_diag": per_sample["fsinfo_diag"].tolist(),
            "dfil": per_sample["dfil"].tolist(),
            "optimization_mse": opt.mse.tolist(),
            "inverse_network_mse": inv.mse[: cfg.samples].tolist(),
        }
        if "fsinfo_logdet" in per_sample:
            rep["per_sample"]["fsinfo_logdet"] = per_sample["fsinfo_logdet"].tolist()
        rep["seconds"] = round(time.perf_counter() - t_split, 2)
        timing[f"{name}/split {sp.label}"] = time.perf_counter() - t_split
        split_reports.append(rep)
        if save_partial is not None:
            save_partial(name, split_reports)
        for key in METRICS:
            m = metrics.get(key)
            series[key].append(None if m is None else m.get("mean", m.get("value")))
        mse_series["inverse_network"].append(inv.summary()["mse"]["mean"])
        mse_series["optimization"].append(opt.summary()["mse"]["mean"])
        examples["rows"].append({"label": f"{sp.label} {sp.layer}",
                                 "inverse_network": inv.x_hat[:6], "optimization": opt.x_hat[:6]})
        if bar is not None:
            bar.update(1)
    agree: dict[str, Any] = {}
    for attack in ATTACKS:
        agree[attack] = {}
        for key in METRICS:
            vals = series[key]
            if any(v is None for v in vals) or len(vals) < 2:
                continue
            agree[attack][key] = agreement(vals, mse_series[attack]).as_dict()
    report = {"model": name, "data": cfg.data, "size": cfg.size,
              "test_accuracy": _num(data["accuracy"]),
              "train_samples": int(len(x_tr)), "eval_samples": int(len(x_te)),
              "samples": int(len(x)), "sigma": cfg.sigma, "splits": split_reports,
              "agreement": agree, "paper_pearson": PAPER_PEARSON.get(name)}
    return report, examples


def _noise_sweep(cfg: ValidateConfig, data: dict[str, Any], splits: list, bar,
                 timing: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    from ..profile.sources import resolve_splits

    model, x_tr, x_te = data["model"], data["x_train"], data["x_test"]
    sp = resolve_splits(model, [cfg.sweep_split])[0]
    x = x_te[: cfg.samples]
    f_train, f_test = _features(model, [sp], [x_tr, x_te])
    points: list[dict[str, Any]] = []
    examples: dict[str, Any] = {"x": x_te[:6].cpu(), "rows": []}
    for sigma in cfg.sweep_sigmas:
        show = _step(bar, f"noise sweep sigma={sigma:g}")
        t0 = time.perf_counter()
        summ, per_sample = _diag_metrics(cfg, sp.encoder, x, float(sigma), cfg.seed)
        inv = inverse_network_attack(
            sp.encoder, float(sigma), x_tr, x_te, epochs=cfg.decoder_epochs,
            width=cfg.decoder_width, seed=cfg.seed,
            features=(f_train[sp.name], f_test[sp.name]), progress=show)
        opt = optimization_attack(sp.encoder, float(sigma), x, steps=cfg.attack_steps,
                                  lr=cfg.attack_lr, tv_weight=cfg.tv_weight, seed=cfg.seed,
                                  progress=show)
        shifted = per_sample["fsinfo_diag"] + math.log(sigma)
        points.append({
            "sigma": float(sigma), "metrics": summ,
            "fsinfo_diag_plus_ln_sigma": _mean_se(shifted),
            "attacks": {"inverse_network": _attack_summary(inv, cfg.samples),
                        "optimization": _attack_summary(opt)},
            "bounds": {"optimization": _bound_fractions(opt.mse, per_sample),
                       "inverse_network": _bound_fractions(inv.mse[: cfg.samples], per_sample)},
            "per_sample_fsinfo_diag_plus_ln_sigma": shifted.tolist(),
        })
        examples["rows"].append({"label": f"sigma {sigma:g}", "inverse_network": inv.x_hat[:6],
                                 "optimization": opt.x_hat[:6]})
        timing[f"sweep/sigma {sigma:g}"] = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
    const = [p["fsinfo_diag_plus_ln_sigma"]["mean"] for p in points]
    # (float64: the spread is near 1e-9 around values near 0.5, below float32's resolution)
    per = torch.tensor([p["per_sample_fsinfo_diag_plus_ln_sigma"] for p in points],
                       dtype=torch.float64)
    return {"model": cfg.sweep_model,
            "split": {"index": sp.index, "name": sp.name, "layer": sp.layer},
            "samples": int(len(x)), "points": points,
            "fsinfo_diag_plus_ln_sigma_spread": _num(max(const) - min(const)),
            "per_sample_max_spread": _num((per.max(0).values - per.min(0).values).max()),
            "variance_of_data": _num(x_te.double().var())}, examples


def _bounds_overview(models: list[dict[str, Any]], sweep: dict[str, Any] | None) -> dict:
    """Pooled counts of samples whose optimisation-attack MSE fell below each bound."""
    out: dict[str, Any] = {"note": (
        "per-sample MSE of one reconstruction against the per-dimension bounds: 1/dFIL and "
        "exp(-2 FSInfo)/(2 pi e) (both proven only for unbiased attackers, through the "
        "Cramer-Rao bound); the attacks are biased (prior, box constraint), so neither bound "
        "binds them")}
    for attack in ATTACKS:
        pooled: dict[str, list[int]] = {}
        for m in models:
            for s in m["splits"]:
                for key, b in s["bounds"][attack].items():
                    c = pooled.setdefault(f"splits/{key}", [0, 0])
                    c[0] += b["count_below"]
                    c[1] += b["n"]
        if sweep is not None:
            for p in sweep["points"]:
                for key, b in p["bounds"][attack].items():
                    c = pooled.setdefault(f"sweep/{key}", [0, 0])
                    c[0] += b["count_below"]
                    c[1] += b["n"]
        out[attack] = {k: {"count_below": v[0], "n": v[1],
                           "fraction_below": v[0] / v[1] if v[1] else None}
                       for k, v in pooled.items()}
    return out
