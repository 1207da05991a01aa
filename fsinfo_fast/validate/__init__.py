"""``fsinfo-fast validate``: does the leakage metric predict what an attacker recovers?

For each zoo model (trained briefly on the bundled data; weights cached) and each of its split
points, on held-out samples:

- the metrics, each with its error bar: FSInfo diag and dFIL per sample (mean over samples with
  its 95% interval; exact where ``min(m, d) <= 256``, otherwise from the same ``--probes``
  Gaussian VJP probes), optionally FSInfo log det (``--logdet``, with a prior variance so that
  it is finite), and the set-level baselines distance correlation (the paper's V-statistic
  and the bias-corrected dCor², jackknife errors) and KSG k-NN mutual information
  (delete-a-group jackknife error), on the full vectors and on their top ``--mi-dims``
  principal components;
- both attacks (:mod:`fsinfo_fast.attacks`) at the same noise ``--sigma``: the learned inverse
  network (trained on the model's training split, scored on the whole test split) and the
  white-box optimisation attack (on the first ``--samples`` test samples), scored by MSE, PSNR
  and SSIM;
- the paper's agreement number for every metric and both attacks: the Pearson correlation
  across split points of the metric's relative drop ``(m0 - mi)/m0`` with the attack MSE's
  relative rise ``(MSE_i - MSE0)/MSE_i`` (:mod:`.agreement`), with a Fisher-z interval;
- the bound report: the fraction of samples whose optimisation-attack MSE falls below ``1/dFIL``
  and below ``exp(-2 FSInfo)/(2 pi e)`` (both proven only for unbiased attackers).

Then a noise sweep at one split (``--sweep-model``, ``--sweep-split``, ``--sweep-sigmas``):
FSInfo + ln sigma must stay constant while the attacks' MSE rises.

Output (``--out``, default ``fsinfo-validate/<time>/``): ``validate.json`` (schema
``fsinfo_fast.validate/1``), ``agreement.png``, ``splits_<model>.png``,
``reconstructions_<model>.png``, ``noise_sweep.png``; a table is printed. While it runs,
``validate.partial.json`` holds every split finished so far (removed at the end). A ``--out``
that holds anything is refused before any work (as ``profile`` refuses it): the files have
fixed names. Every setting, ``--backend``'s availability and the split points of ``--splits``
and ``--sweep-split`` are checked before any training.

Default size (``fsinfo-fast validate``): VGG5 and ResNet-18 trained 4 epochs on the natural
photograph crops at 16x16 pixels, the paper's split points, sigma 0.1, 6 samples for the
per-sample metrics (16 probes) and the optimisation attack (100 Adam steps), the inverse
network trained 8 epochs on 720 crops and scored on 180. Larger runs by flag, e.g.
``--size 32 --samples 32 --attack-steps 300 --decoder-epochs 30 --decoder-width 32``.
See docs/validation.md for what the numbers mean.
"""

from __future__ import annotations

import argparse

from ..cli import UsageError
from ..profile import _positive_int  # the same argparse type as profile's flags
from ..profile.sources import zoo_key
from .agreement import Agreement, agreement, pearson, relative_drop, relative_rise
from .runner import SCHEMA, ValidateConfig, ValidateOutcome, run_validate

__all__ = [
    "add_arguments",
    "run",
    "Agreement",
    "agreement",
    "pearson",
    "relative_drop",
    "relative_rise",
    "SCHEMA",
    "ValidateConfig",
    "ValidateOutcome",
    "run_validate",
]


def _optional_int(text: str) -> int | None:
    # only 'all' means all: 0 used to mean it too, silently, while 1 was refused
    if text.strip().lower() == "all":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 or 'all', got {v}")
    return v


def _sigmas(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers or 'none', got {text!r}") from None


def _models(text: str) -> tuple[str, ...]:
    # the same normaliser as --sweep-model's (and profile's --model): VGG_5 is vgg5 in both
    return tuple(zoo_key(t) for t in text.split(",") if t.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``validate`` options to ``parser``."""
    d = ValidateConfig()
    g = parser.add_argument_group("models and data")
    g.add_argument("--models", type=_models, default=d.models, metavar="LIST",
                   help=f"comma-separated zoo models (default {','.join(d.models)})")
    g.add_argument("--data", default=d.data,
                   help=f"bundled data set: natural or digits (default {d.data})")
    g.add_argument("--size", type=_positive_int, default=d.size,
                   help=f"image side in pixels (default {d.size})")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"training epochs of the models (weights cached; default {d.epochs})")
    g.add_argument("--splits", default=d.splits,
                   help="'paper' (default), 'all' or a comma list of split indices / names; "
                        "run shallowest first whatever the order given")
    g.add_argument("--samples", type=_positive_int, default=d.samples, metavar="N",
                   help=f"held-out samples for the per-sample metrics, the optimisation attack "
                        f"and the bound report (default {d.samples})")
    g.add_argument("--eval-samples", type=_optional_int, default=d.eval_samples, metavar="N",
                   help="held-out samples for the inverse network's scores, dCor and kNN MI, "
                        ">= 4 ('all': the whole test split, the default)")
    g.add_argument("--train-samples", type=_optional_int, default=d.train_samples, metavar="N",
                   help="the inverse network's training samples, >= 2 ('all', the default)")
    m = parser.add_argument_group("metrics")
    m.add_argument("--sigma", type=float, default=d.sigma,
                   help=f"noise std on the smashed data (default {d.sigma})")
    m.add_argument("--probes", type=_positive_int, default=d.probes,
                   help=f"probes per sample for FSInfo diag / dFIL (default {d.probes})")
    m.add_argument("--logdet", action="store_true",
                   help="also compute FSInfo log det (prior variance = the data's; slow)")
    m.add_argument("--mi-k", type=_positive_int, default=d.mi_k,
                   help=f"neighbours of the KSG estimator (default {d.mi_k})")
    m.add_argument("--mi-dims", type=_positive_int, default=d.mi_dims,
                   help=f"PCA dimensions of the projected kNN MI (default {d.mi_dims})")
    m.add_argument("--backend", default=d.backend,
                   help=f"product backend of the metrics (default {d.backend})")
    a = parser.add_argument_group("attacks")
    a.add_argument("--attack-steps", type=_positive_int, default=d.attack_steps,
                   help=f"Adam steps of the optimisation attack (default {d.attack_steps})")
    a.add_argument("--attack-lr", type=float, default=d.attack_lr,
                   help=f"its learning rate (default {d.attack_lr})")
    a.add_argument("--tv-weight", type=float, default=d.tv_weight,
                   help=f"its total-variation weight (default {d.tv_weight})")
    a.add_argument("--decoder-epochs", type=_positive_int, default=d.decoder_epochs,
                   help=f"training epochs of the inverse network (default {d.decoder_epochs})")
    a.add_argument("--decoder-width", type=_positive_int, default=d.decoder_width,
                   help=f"channels of the inverse network (default {d.decoder_width})")
    s = parser.add_argument_group("noise sweep")
    s.add_argument("--sweep-model", default=d.sweep_model,
                   help=f"model of the noise sweep (default {d.sweep_model})")
    s.add_argument("--sweep-split", type=int, default=d.sweep_split,
                   help=f"split index of the noise sweep (default {d.sweep_split})")
    s.add_argument("--sweep-sigmas", type=_sigmas, default=d.sweep_sigmas, metavar="LIST",
                   help="comma-separated sigmas, or 'none' to skip the sweep (default "
                        f"{','.join(f'{v:g}' for v in d.sweep_sigmas)})")
    r = parser.add_argument_group("run")
    r.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of training, probes, noise and attacks (default {d.seed})")
    r.add_argument("--device", default=d.device, help=f"auto, cpu, cuda or cuda:N "
                                                      f"(default {d.device})")
    r.add_argument("--out", default=None,
                   help="output folder (default: a new folder under ./fsinfo-validate/)")
    r.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG figures")
    r.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def config_from_args(args: argparse.Namespace) -> ValidateConfig:
    """The :class:`ValidateConfig` of parsed CLI arguments."""
    if not args.models:
        raise UsageError("--models needs at least one model name")
    return ValidateConfig(
        models=tuple(args.models), data=args.data, size=args.size, epochs=args.epochs,
        splits=args.splits, sigma=args.sigma, samples=args.samples,
        eval_samples=args.eval_samples, train_samples=args.train_samples, probes=args.probes,
        logdet=args.logdet, decoder_epochs=args.decoder_epochs,
        decoder_width=args.decoder_width, attack_steps=args.attack_steps,
        attack_lr=args.attack_lr, tv_weight=args.tv_weight, mi_k=args.mi_k,
        mi_dims=args.mi_dims, sweep_model=zoo_key(args.sweep_model),
        sweep_split=args.sweep_split, sweep_sigmas=tuple(args.sweep_sigmas), seed=args.seed,
        device=args.device, backend=args.backend, out=args.out, plot=args.plot,
        progress=not args.quiet, table=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``fsinfo-fast validate``; returns the exit status (user errors raise FSInfoError)."""
    from .._extras import require

    for module in ("sklearn", "skimage", "torchmetrics", "matplotlib", "rich", "tqdm"):
        require(module, "fsinfo-fast validate", extra="validate")  # before the work, not after
    run_validate(config_from_args(args))
    return 0
