"""``fsinfo-fast guard``: the FSInfoGuard noise for a target FSInfo, and what it costs in accuracy.

For each split point: the per-sample noise scale ``sigma*`` that brings FSInfo down to
``--target``, computed on every sample (one :class:`fsinfo_fast.Linearization` per batch, its
:meth:`~fsinfo_fast.Linearization.fsinfo_sigma`, through :class:`fsinfo_fast.FSInfoGuard`); one
data-set sigma calibrated on the first ``--calibration`` samples by
:meth:`fsinfo_fast.result.SigmaResult.dataset` (``--statistic max``: every calibration sample
at the target or below; ``quantile``: a fraction ``--quantile`` of them; ``mean``), as
:meth:`fsinfo_fast.FSInfoGuard.calibrate` does (``sigma_conservative``: the same statistic of
the upper ends of the per-sample 95% intervals); on the held-out remaining samples, the fraction
that the calibrated sigma protects (``sigma*_i <= sigma``, i.e. FSInfo at or below the target),
and, with labels and the whole model, the top-1 accuracy without noise, with the calibrated
sigma and with per-sample ``sigma*`` (noise injected at the split with
:func:`fsinfo_fast.split.insert`, averaged over ``--noise-draws`` seeded draws).

Usage::

    fsinfo-fast guard                          # VGG5 trained briefly on digits, paper splits
    fsinfo-fast guard --model resnet18 --data natural --splits 3,7 --target -1.5
    fsinfo-fast guard --model vgg5 --checkpoint vgg5.pt --data ./images --statistic quantile

Writes the table to the terminal and, with ``--out FILE.json``, the numbers (per split, plus every
sample's ``sigma*``). With ``--out``, each batch's ``sigma*`` is kept as it is computed in
``FILE.json.partial.pt`` (removed when the run completes): an interrupted run continues with
``--resume`` (the same model, data and sigma* settings; the statistic, calibration count and
accuracy options may change, they are applied afterwards). The model, data and split options mean
what they mean for ``fsinfo-fast profile``. Accuracy needs labels (the bundled sets and class
sub-folders have them) and a model whose output is class scores (a tensor ``[B, C]``, or
``.logits`` as the ``transformers`` classifiers return); otherwise only the sigmas are reported.
Split points of any ``--model package.module:function`` may be module paths (cut with forward hooks
when torch.fx cannot trace the model, e.g.
``fsinfo_fast.models.third_party:convnext_classifier_small32``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._extras import require
from ..errors import InvalidInputError
from .errors import DataError, RunDirError
from .sources import _one_line, state_fingerprint, structure_fingerprint, tensor_fingerprint

__all__ = ["add_arguments", "guard_report", "run"]

STATISTICS = ("max", "quantile", "mean")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import _max_samples, _positive_int

    g = parser.add_argument_group("model and data (as for profile)")
    g.add_argument("--model", default="vgg5",
                   help="zoo model (vgg5, vgg9, resnet18, resnet50), package.module:function or "
                        "path/to/file.py:function (default vgg5, trained briefly on the bundled "
                        "data)")
    g.add_argument("--checkpoint", default=None,
                   help="weights file, read with torch.load(weights_only=True) only")
    g.add_argument("--data", default="digits",
                   help="digits, natural, a folder of images or torchvision:NAME:ROOT[:split] "
                        "(default digits)")
    g.add_argument("--size", type=_positive_int, default=32,
                   help="image side for the bundled data sets (default 32; a folder or "
                        "torchvision data keeps its images' size)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="input channels: 3 (default; gray images repeated over RGB) or 1 "
                        "(grayscale, for a 1-channel model: digits or a folder of gray images)")
    g.add_argument("--splits", default=None,
                   help="'paper' (default), 'all', or a comma list of indices, ranges, module "
                        "paths and fx node names")
    g.add_argument("--max-samples", type=_max_samples, default=128, metavar="N",
                   help="use the first N samples, calibration and held-out together; 'all' or "
                        "0: every one (default 128)")
    c = parser.add_argument_group("guard")
    c.add_argument("--target", type=float, default=-1.0,
                   help="target FSInfo in nats per input dimension (default -1)")
    c.add_argument("--variant", choices=("diag", "logdet"), default="diag",
                   help="FSInfo variant the target refers to (default diag)")
    c.add_argument("--prior-var", type=float, default=None,
                   help="prior variance (log-det variant only)")
    c.add_argument("--statistic", choices=STATISTICS, default="max",
                   help="data-set sigma from the calibration samples' sigma* (default max)")
    c.add_argument("--quantile", type=float, default=0.95,
                   help="the quantile for --statistic quantile (default 0.95)")
    c.add_argument("--calibration", type=_positive_int, default=64, metavar="N",
                   help="calibrate on the first N samples; the rest are held out (default 64)")
    c.add_argument("--noise-draws", type=_positive_int, default=5,
                   help="noise draws averaged for the accuracy under noise (default 5)")
    c.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                   help="report the sigmas only")
    c.add_argument("--estimator", choices=("auto", "exact", "randomized"), default="auto",
                   help="how sigma* is computed (default auto)")
    c.add_argument("--atol", type=float, default=0.01,
                   help="95%% half-width of FSInfo at sigma = 1, nats/dim (default 0.01)")
    c.add_argument("--backend", default="auto", help="product backend (default auto)")
    r = parser.add_argument_group("run")
    r.add_argument("--batch-size", type=_positive_int, default=32,
                   help="samples per batch (default 32)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    r.add_argument("--seed", type=int, default=0,
                   help="seed of the probes, the noise and the demo model's training (default 0)")
    r.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from FILE.json.partial.pt beside --out")
    r.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def _check(args: argparse.Namespace) -> None:
    if not math.isfinite(args.target):
        raise InvalidInputError(f"--target must be finite, got {args.target!r}")
    if args.statistic == "quantile" and not 0 < args.quantile <= 1:
        raise InvalidInputError(f"--quantile must be in (0, 1], got {args.quantile!r}")
    if not (math.isfinite(args.atol) and args.atol > 0):
        raise InvalidInputError(f"--atol must be a positive number, got {args.atol!r}")
    if args.prior_var is not None and args.variant != "logdet":
        raise InvalidInputError("--prior-var applies to --variant logdet")
    if getattr(args, "resume", False) and not args.out:
        raise InvalidInputError("--resume continues the run written to --out FILE.json: give "
                                "the same --out")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise RunDirError(f"--out {out} is a directory; give a file name such as guard.json")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise RunDirError(f"--out {out}: cannot write into {parent} (not a directory)")
        try:  # (a file written and removed: os.access says yes to root on a read-only or
            # kernel file system, and the run failed at its first write, after the work)
            with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".tmp"):
                pass
        except OSError as err:
            raise RunDirError(f"--out {out}: cannot write into {parent} ({err})") from None


#: the options ``sigma*`` depends on (a resumed run must match them; the others are applied to
#: the per-sample results afterwards)
_SIGMA_OPTIONS = ("model", "checkpoint", "data", "size", "channels", "splits", "max_samples",
                  "target", "variant", "prior_var", "estimator", "atol", "backend", "seed",
                  "batch_size")
_SIGMA_FIELDS = ("sigma", "target", "ci_low", "ci_high", "converged")


class _Progress:
    """The per-batch ``sigma*`` computed so far, kept beside ``--out`` in
    ``FILE.json.partial.pt`` (rewritten atomically after each batch, removed when the report is
    written), so that an interrupted run loses at most the batch it was in. ``--resume`` reads
    it back where its settings (:data:`_SIGMA_OPTIONS`, the data's and the model's digests)
    match this run's."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, x: Tensor) -> None:
        self.path = None if not args.out else Path(args.out).with_name(
            Path(args.out).name + ".partial.pt")
        self.parts: dict[str, dict[int, dict[str, Any]]] = {}
        self.restored = 0
        if self.path is None:
            return
        self.key = {k: getattr(args, k) for k in _SIGMA_OPTIONS}
        self.key["data_sha256"] = tensor_fingerprint(x)
        self.key["model_sha256"] = state_fingerprint(model)
        self.key["model_structure_sha256"] = structure_fingerprint(model)
        resume = getattr(args, "resume", False)
        if self.path.exists():
            if not resume:
                raise RunDirError(
                    f"{self.path} holds the progress of an interrupted run: pass --resume to "
                    "continue it, or delete the file to start again")
            try:
                saved = torch.load(self.path, weights_only=True)
                key, parts = saved["key"], saved["parts"]
            except Exception as err:  # noqa: BLE001  (a torn or foreign file)
                raise RunDirError(f"--resume: cannot read {self.path} ({_one_line(err)}); "
                                  "delete it to start again") from err
            diff = [f"{k} {key.get(k)!r} (now {v!r})" for k, v in self.key.items()
                    if key.get(k) != v]
            if diff:
                raise RunDirError(f"--resume: {self.path} was computed with other settings: "
                                  f"{'; '.join(diff)}; rerun with those, or delete it to start "
                                  "again")
            self.parts = parts
            self.restored = sum(len(b) for b in parts.values())
        elif resume:
            raise RunDirError(f"--resume: there is no {self.path} to continue (the run "
                              "completed, or was never started with this --out)")

    def get(self, split: str, start: int):
        from ..result import SigmaResult

        d = self.parts.get(split, {}).get(start)
        if d is None:
            return None
        return SigmaResult(**{k: d[k] for k in _SIGMA_FIELDS}, metric=d["metric"],
                           estimator=d["estimator"], info={"resumed_from": str(self.path)})

    def add(self, split: str, start: int, res: Any) -> None:
        if self.path is None:
            return
        self.parts.setdefault(split, {})[start] = {
            **{k: getattr(res, k).detach().cpu() for k in _SIGMA_FIELDS},
            "metric": res.metric, "estimator": res.estimator}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            torch.save({"key": self.key, "parts": self.parts}, tmp)
            tmp.replace(self.path)  # atomic: a torn write never replaces the last good state
        except (OSError, RuntimeError) as err:  # (torch.save: RuntimeError from its writer)
            raise RunDirError(f"cannot write the progress file {tmp}: "
                              f"{_one_line(str(err))}") from None


def _load(args: argparse.Namespace, progress: bool):
    from .runner import ProfileConfig, _load_model_and_data
    from .store import RunDir

    cfg = ProfileConfig(model=args.model, checkpoint=args.checkpoint, data=args.data,
                        size=args.size, max_samples=args.max_samples, seed=args.seed,
                        channels=args.channels, given=getattr(args, "given_options", None))
    cfg.validate()
    # a fresh (never resumed) load: the run directory is not touched
    model, data, _, _ = _load_model_and_data(cfg, RunDir(tempfile.gettempdir()), False, progress)
    return model, data


def class_scores(output: Any) -> Any:
    """A classifier's scores ``[B, C]``: ``output`` itself if it is a tensor, else its ``.logits``
    (a ``transformers`` ``...ForImageClassification`` output); anything else unchanged."""
    logits = getattr(output, "logits", None)
    return logits if not isinstance(output, Tensor) and isinstance(logits, Tensor) else output


class _Scores(nn.Module):
    """``class_scores(model(x))``: lets :func:`fsinfo_fast.train.accuracy` read ``.logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return class_scores(self.model(x))


def _noisy_accuracy(model: nn.Module, at: str | int, x: Tensor, y: Tensor, sigma: Tensor,
                    draws: int, seed: int, batch_size: int) -> list[float]:
    """Top-1 accuracy with ``sigma`` (``[N]``) noise at the split, one value per draw."""
    from ..guard import GaussianNoise
    from ..split import insert

    gen = torch.Generator(device=x.device)
    layer = GaussianNoise(0.0, generator=gen)
    noisy = insert(model, at, layer)
    out = []
    for k in range(draws):
        gen.manual_seed(seed * 1_000_003 + k)
        hits = 0
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                layer.sigma = sigma[i : i + batch_size]
                pred = class_scores(noisy(x[i : i + batch_size])).argmax(dim=1)
                hits += int((pred == y[i : i + batch_size]).sum())
        out.append(hits / len(x))
    return out


def _classifier_ok(model: nn.Module, x: Tensor, y: Tensor) -> str | None:
    """Why accuracy cannot be measured (``None`` when it can)."""
    if bool((y < 0).any()):
        return "the data has no labels"
    try:
        with torch.no_grad():
            out = class_scores(model(x[:1]))
    except Exception as err:  # the whole model cannot take the data (the encoders can)
        return f"the whole model fails on the data ({type(err).__name__}: {_one_line(err)})"
    if not isinstance(out, Tensor) or out.ndim != 2:
        return "the model's output is not class scores [B, C] (a tensor, or .logits)"
    if int(y.max()) >= out.shape[1]:
        return f"labels go up to {int(y.max())} but the model has {out.shape[1]} outputs"
    return None


def _at_chance(clean: float | None, y: Tensor, args: argparse.Namespace) -> str | None:
    """A note where the model's clean accuracy is no better than always answering the most
    frequent held-out label (within 5 points): its accuracy cost then measures nothing (the
    demo ResNet-18 on the natural crops, trained 2 epochs, sat at 6% for 9 classes, and the
    noise "raised" it, helper 120)."""
    if clean is None or len(y) == 0:
        return None
    base = float(torch.bincount(y.cpu().clamp_min(0)).max()) / len(y)
    if clean > base + 0.05:
        return None
    from .sources import is_zoo_model

    demo = is_zoo_model(args.model) and not args.checkpoint
    return (f"the model's clean accuracy {clean:.1%} is at chance (the most frequent label is "
            f"{base:.1%} of the {len(y)} held-out samples): its accuracy with noise says "
            "nothing of the defense's cost" + (
                f"; the demo model (--model {args.model} without --checkpoint) learned little "
                f"in its brief training on --data {args.data}: give --checkpoint with trained "
                "weights" if demo else ""))


def _head(res: Any, n: int) -> Any:
    """The first ``n`` samples of a :class:`~fsinfo_fast.result.SigmaResult`."""
    return dataclasses.replace(res, sigma=res.sigma[:n], target=res.target[:n],
                               ci_low=res.ci_low[:n], ci_high=res.ci_high[:n],
                               converged=res.converged[:n])


def guard_report(args: argparse.Namespace) -> dict[str, Any]:
    """Compute everything ``fsinfo-fast guard`` reports (see the module docstring)."""
    from ..guard import FSInfoGuard, concat_sigma_results
    from ..linearization import linearize
    from .distributed import resolve_device
    from .runner import check_runs, model_dtype
    from .sources import is_zoo_model, resolve_splits

    _check(args)
    progress = not args.quiet
    model, data = _load(args, progress)
    dev = resolve_device(args.device, None)
    model = model.to(dev).eval()
    # the model's own dtype: the accuracy runs it directly (FSInfoGuard computes sigma* of a
    # float16 model on a float32 copy); float32 data are cast exactly to float64
    x, y = data.x.to(device=dev, dtype=model_dtype(model) or data.x.dtype), data.y.to(dev)
    n = len(x)
    n_cal = min(args.calibration, n)
    if n_cal < 1:
        raise DataError(f"--data {args.data} has no samples")
    splits = resolve_splits(model, args.splits)
    check_runs(model, splits, x[:2])  # one-line errors where the encoders cannot take x
    why_not = None if args.accuracy else "--no-accuracy"
    if why_not is None and n_cal == n:
        why_not = (f"no held-out samples: all {n} samples are used for calibration "
                   "(lower --calibration or raise --max-samples)")
    if why_not is None and args.data in ("digits", "natural") and not is_zoo_model(args.model):
        # (a model of 10 or more outputs took them for its classes: "accuracy 0.0%")
        why_not = (f"the bundled data set's labels (--data {args.data}: "
                   f"{'digit classes' if args.data == 'digits' else 'the source photograph'}"
                   f") are not the classes of --model {args.model}; accuracy needs data labeled "
                   "with the model's classes (--data an image folder or torchvision:NAME:ROOT)")
    if (why_not is None and is_zoo_model(args.model) and not args.checkpoint
            and args.data not in ("digits", "natural")):
        # (the demo model learned the digits' classes: a folder's labels are others)
        why_not = (f"the demo model (--model {args.model} without --checkpoint) was trained "
                   f"briefly on the bundled digits; its classes are not the labels of --data "
                   f"{args.data} (give --checkpoint with weights trained on them)")
    if why_not is None:
        why_not = _classifier_ok(model, x, y)
    x_ev, y_ev = x[n_cal:], y[n_cal:]
    clean = None
    if why_not is None:
        from ..train import accuracy

        with torch.no_grad():
            clean = accuracy(_Scores(model), x_ev, y_ev.cpu(), args.batch_size)
    warning = _at_chance(clean, y_ev, args)

    kept = _Progress(args, model, x)
    bar = None
    if progress:
        from .._progress import progress_bar

        bar = progress_bar("the guard progress bar", total=n * len(splits),
                           desc="guard sigma*", unit="sample")
    kw: dict[str, Any] = {"estimator": args.estimator, "atol": args.atol, "seed": args.seed,
                          "backend": args.backend}
    if args.prior_var is not None:
        kw["prior_var"] = args.prior_var
    rows = []
    try:
        for s in splits:
            guard = FSInfoGuard(s.encoder, args.target, args.variant, **kw)
            parts = []
            for i in range(0, n, args.batch_size):
                xb = x[i : i + args.batch_size]
                part = kept.get(s.name, i)
                if part is None:
                    part = guard.sigma_result(xb, sample_ids=torch.arange(i, i + len(xb)))
                    kept.add(s.name, i, part)
                parts.append(part)
                if bar is not None:
                    bar.update(len(xb))
            res = concat_sigma_results(parts)
            sig = res.sigma
            cal = _head(res, n_cal)
            q = args.quantile
            sigma = cal.dataset(args.statistic, q)
            guard._check_reachable(torch.tensor([sigma], dtype=torch.float64),
                                   f"split {s.name}: the calibrated sigma")
            held = sig[n_cal:]
            # FSInfo of the least protected held-out sample at the calibrated sigma, measured:
            # target + ln(sigma*_i / sigma) holds only where FSInfo + ln sigma is constant (no
            # prior, and the floor negligible: it said -0.913 where the oracle has -0.978)
            at_max = at_max_ci = None
            if len(held) and sigma > 0:
                j = n_cal + int(held.argmax())
                lin = linearize(s.encoder, x[j : j + 1], seed=args.seed, backend=args.backend,
                                sample_ids=torch.tensor([j]))
                extra = {"prior_var": args.prior_var} if args.prior_var is not None else {}
                r = lin.fsinfo(sigma, variant=args.variant, estimator=args.estimator,
                               atol=args.atol, **extra)
                at_max = float(r.value[0])
                lo, hi = r.ci95()
                at_max_ci = [float(lo[0]) if math.isfinite(float(lo[0])) else None,
                             float(hi[0])]
            row: dict[str, Any] = {
                "split": s.name, "index": s.index, "sigma": sigma,
                "sigma_conservative": cal.dataset(args.statistic, q, conservative=True),
                "estimator": res.estimator,
                "sigma_star": {"min": float(sig.min()), "median": float(sig.median()),
                               "max": float(sig.max())},
                "unconverged": int((~res.converged).sum()),
                "held_out": int(len(held)),
                "protected_fraction": (float((held <= sigma).double().mean())
                                       if len(held) else None),
                "fsinfo_at_sigma_max": at_max,
                "fsinfo_at_sigma_max_ci95": at_max_ci,
            }
            if why_not is None:
                at = s.index if s.index is not None else s.name
                fixed = _noisy_accuracy(model, at, x_ev, y_ev,
                                        torch.full((len(x_ev),), sigma, device=dev),
                                        args.noise_draws, args.seed, args.batch_size)
                per = _noisy_accuracy(model, at, x_ev, y_ev, held.to(dev), args.noise_draws,
                                      args.seed, args.batch_size)
                t = torch.tensor(fixed, dtype=torch.float64)
                row.update({
                    "accuracy_calibrated": float(t.mean()),
                    "accuracy_calibrated_sd": float(t.std()) if len(fixed) > 1 else 0.0,
                    "accuracy_per_sample": float(torch.tensor(per, dtype=torch.float64).mean()),
                    "accuracy_cost": clean - float(t.mean()),
                })
            row["sigma_star_all"] = sig.tolist()
            rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    return {
        "model": args.model, "data": data.description, "target": args.target,
        "variant": args.variant, "statistic": args.statistic,
        "quantile": args.quantile if args.statistic == "quantile" else None,
        "calibration_samples": n_cal, "held_out_samples": n - n_cal,
        "noise_draws": args.noise_draws, "seed": args.seed,
        "accuracy_clean": clean, "accuracy_note": why_not, "accuracy_warning": warning,
        "splits": rows,
        "resumed_batches": kept.restored,
    }



def _points(cost: float | None) -> str:
    """The accuracy the noise costs in percentage points (a drop positive: ``55.0``; it read
    ``+55.0%``, a gain's sign on a drop), ``-`` where not measured."""
    return "-" if cost is None else f"{100 * cost:.1f}"

def _print(report: dict[str, Any]) -> None:
    require("rich", "the guard table")
    from rich.table import Table

    def f(v: float | None, fmt: str = ".3g") -> str:
        return "-" if v is None else format(v, fmt)

    stat = report["statistic"] + (f" {report['quantile']}" if report["quantile"] else "")
    t = Table(title=f"FSInfoGuard at target {report['target']} nats/dim ({report['variant']}; "
                    f"sigma = {stat} of sigma* over {report['calibration_samples']} samples)")
    for c in ("split", "sigma", "sigma* min..max", "protected", "acc clean", "acc guarded",
              "acc per-sample", "acc drop (pp)"):
        t.add_column(c, justify="left" if c == "split" else "right")
    clean = report["accuracy_clean"]
    for r in report["splits"]:
        acc = r.get("accuracy_calibrated")
        t.add_row(
            f"{r['index']} {r['split']}" if r["index"] is not None else r["split"],
            f(r["sigma"]), f"{f(r['sigma_star']['min'])}..{f(r['sigma_star']['max'])}",
            f(r["protected_fraction"], ".0%"), f(clean, ".1%"),
            "-" if acc is None else f"{acc:.1%} ± {r['accuracy_calibrated_sd']:.1%}",
            f(r.get("accuracy_per_sample"), ".1%"), _points(r.get("accuracy_cost")),
        )
    from .report import table_console

    console = table_console()
    console.print(t)
    if report["accuracy_note"]:
        console.print(f"accuracy not measured: {report['accuracy_note']}")
    if report.get("accuracy_warning"):
        console.print(f"[bold]note[/bold]: {report['accuracy_warning']}")
    console.print(f"data: {report['data']}; held out: {report['held_out_samples']} samples, "
                  f"{report['noise_draws']} noise draws")


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: the command line as given, with ``--resume`` (a
    resume reads no options from the progress file, and refuses other ones: the hint said only
    "rerun with --resume", which refused every option the first run had been given, helper
    120); from Python (no command line), ``guard_report`` with the same arguments."""
    import shlex

    argv = getattr(args, "argv", None)
    if argv is None:
        return "the same arguments with resume=True"
    return shlex.join(["fsinfo-fast", *argv, *([] if "--resume" in argv else ["--resume"])])


def run(args: argparse.Namespace) -> int:
    if not args.quiet:  # before the work, not after it
        require("rich", "the guard table (--quiet skips it)")
    try:
        report = guard_report(args)
    except KeyboardInterrupt:
        if args.out:
            part = Path(args.out).with_name(Path(args.out).name + ".partial.pt")
            if part.exists():
                print(f"interrupted: the sigma* computed so far are kept in {part}; continue "
                      f"with: {_resume_command(args)}", file=sys.stderr)
        raise
    if not args.quiet:
        _print(report)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        try:
            tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
            tmp.replace(out)  # atomic: no half-written file is ever left under the final name
        except OSError as err:
            raise RunDirError(f"cannot write --out {out}: {err}") from None
        out.with_name(out.name + ".partial.pt").unlink(missing_ok=True)  # the run is complete
        if not args.quiet:
            print(f"wrote {out}")
    return 0
