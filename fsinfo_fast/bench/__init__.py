"""``fsinfo-fast bench``: every way to compute the metrics, measured side by side.

Usage (also ``python -m fsinfo_fast.bench ...``)::

    fsinfo-fast bench --quick --out benchmarks/results/       # < 3 min on 2 CPU cores
    fsinfo-fast bench --full --out benchmarks/results/        # every case of the issue
    fsinfo-fast bench --config benchmarks/configs/sweep_gpu.json --out benchmarks/results/
    fsinfo-fast bench --table benchmarks/results/bench_quick.json     # README Markdown
    fsinfo-fast bench --plot benchmarks/results/bench_quick.json      # PNGs beside it
    fsinfo-fast bench --quick --out /tmp/fsinfo-bench-new/ \\
        --compare benchmarks/results/bench_quick.json --fail-if-regression
    fsinfo-fast bench --compare OLD.json --results NEW.json --fail-if-regression

A run writes ``bench_<name>.json`` (schema: :mod:`fsinfo_fast.bench.schema`), ``.csv``,
``_sweep.csv`` and the two plots, each where it has something to show; files of those names that
the run does not produce (no result rows, no sweep, ``--no-plot``) are removed, so nothing of an
earlier run is left beside the new results.
Exit status: 0; 1 when a provider failed the correctness gate or raised (a row, sweep point or
efficiency measurement with status ``error``), or (with ``--fail-if-regression``) something
regressed (rows or passing claims the new results lost included); 2 for usage errors; 130 when
interrupted (Ctrl-C; nothing is written).

Modules: :mod:`.config` (cases, presets), :mod:`.cases` (encoders, inputs, exact values),
:mod:`.providers` and :mod:`.baseline` (what is compared), :mod:`.harness` (timing, memory,
environment), :mod:`.runner`, :mod:`.schema`, :mod:`.report` (tables, comparison), :mod:`.plots`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .config import (
    BenchConfig,
    CaseSpec,
    ClaimSpec,
    EfficiencySpec,
    EncoderSpec,
    SharingSpec,
    SweepSpec,
    full_config,
    load_config,
    quick_config,
)

__all__ = [
    "BenchConfig",
    "CaseSpec",
    "ClaimSpec",
    "EfficiencySpec",
    "SharingSpec",
    "EncoderSpec",
    "SweepSpec",
    "add_arguments",
    "full_config",
    "load_config",
    "quick_config",
    "run",
    "run_bench",
]


def run_bench(*args, **kwargs):
    """See :func:`fsinfo_fast.bench.runner.run_bench` (imported lazily)."""
    from .runner import run_bench as _run_bench

    return _run_bench(*args, **kwargs)


#: where a run writes its results when --out is not given
_DEFAULT_OUT = "benchmarks/results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fsinfo-fast bench``."""
    what = parser.add_argument_group("what to run")
    preset = what.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="the quick preset (under 3 minutes on 2 CPU cores)")
    preset.add_argument("--full", action="store_true", help="the full preset (long on a CPU)")
    preset.add_argument("--config", metavar="FILE", help="a JSON config (benchmarks/configs/)")
    what.add_argument("--tasks", nargs="+", metavar="TASK",
                      help="only these tasks (fsinfo_diag, fsinfo_logdet, dfil)")
    what.add_argument("--providers", nargs="+", metavar="GLOB",
                      help="only providers matching these names/globs (e.g. 'ours-*' exact-best)")
    what.add_argument("--backends", nargs="+", metavar="NAME",
                      help="library backends to try as ours-<name> (default: all)")
    what.add_argument("--no-compile", action="store_true", help="skip torchfunc-compile")
    what.add_argument("--cold-compile", action="store_true",
                      help="disable the inductor disk caches so compile times are cold")
    what.add_argument("--no-sweep", action="store_true", help="skip the scaling sweep")
    what.add_argument("--no-efficiency", action="store_true", help="skip probe efficiency")
    what.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    hyg = parser.add_argument_group("hygiene")
    hyg.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    hyg.add_argument("--threads", type=int, default=None,
                     help="pin torch intra-op threads (default: keep torch's count; recorded)")
    hyg.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    hyg.add_argument("--ref-cache", metavar="DIR", default=None,
                     help="cache exact oracle values on disk in DIR")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help=f"directory (or .json path) for the results (default: {_DEFAULT_OUT}); "
                          "with --plot: the directory for the PNGs (default: beside RESULTS)")
    out.add_argument("--no-plot", action="store_true", help="do not draw the PNGs after a run")
    out.add_argument("--table", metavar="RESULTS", help="print the README Markdown of a results "
                     "file and exit")
    out.add_argument("--plot", metavar="RESULTS", help="draw the PNGs of a results file and exit")
    cmp_ = parser.add_argument_group("regression check")
    cmp_.add_argument("--compare", metavar="OLD",
                      help="compare with an earlier results file (read before the run; not a "
                           "file this run writes: give another --out). Compared: result rows and "
                           "sweep rows (status, time, peak memory, accuracy target) and claims; "
                           "not probe efficiency, sharing, linearize or craft")
    cmp_.add_argument("--results", metavar="NEW",
                      help="with --compare: compare this file instead of running")
    cmp_.add_argument("--fail-if-regression", action="store_true",
                      help="exit 1 when --compare finds a regression")
    cmp_.add_argument("--tolerance", type=float, default=0.25,
                      help="relative slow-down (and peak-memory growth, beyond 1 MiB) "
                           "tolerated by --compare (default: %(default)s)")


def _check_out(path: Path) -> None:
    """Raise where the results file cannot be written (a file in the way of its folder, a
    folder in place of the file, no write permission): found after the whole run before. The
    folder is made and a file written in it and removed (``os.access`` says yes to root on a
    read-only file system); an existing results file is opened for appending, not truncated."""
    import tempfile

    from ..cli import UsageError

    if path.is_dir():
        raise UsageError(f"--out: {path} is a directory")
    anc = path.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"--out: {anc} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".bench-write-check-"):
            pass
        if path.exists():
            with open(path, "a"):
                pass
    except OSError as err:
        raise UsageError(f"--out: cannot write {path}: {err.strerror or err}") from None


def _check_not_overwritten(baseline: Path, paths: tuple[Path, ...], default_out: bool) -> None:
    """Refuse a ``--compare`` baseline that this run would overwrite (its results were written
    first and then compared with themselves: never a regression, and the baseline was lost)."""
    from ..cli import UsageError

    target = baseline.resolve()
    for p in paths:
        if p.resolve() == target:
            where = (f"the default --out {_DEFAULT_OUT}" if default_out else "--out") + (
                f" writes {p}")
            raise UsageError(
                f"--compare {baseline}: this run writes its results to that file ({where}) and "
                "would overwrite the baseline before comparing; give another --out (e.g. --out "
                "/tmp/fsinfo-bench-new/) or compare against a copy of the baseline")


def _remove_stale(jpath: Path, spath: Path, produced: set[Path]) -> None:
    """Remove the outputs of an earlier run of the same name that this run did not write (a
    CSV or plot left beside a JSON without result rows, a sweep or plots would describe another
    run)."""
    for p in (jpath.with_suffix(".csv"), spath,
              jpath.with_name(f"{jpath.stem}_speed_accuracy.png"),
              jpath.with_name(f"{jpath.stem}_scaling.png")):
        if p not in produced and p.is_file():
            p.unlink()
            print(f"removed {p} (from an earlier run; this run does not produce it)")


def _check_selection(args: argparse.Namespace) -> None:
    """Refuse names that select nothing and counts below 1 (a misspelt task or provider ran
    nothing and exited 0; a bad backend or --threads 0 raised a traceback). The same checks as
    a config file's (:func:`fsinfo_fast.bench.config.validate_config`)."""
    from ..cli import UsageError
    from ..errors import InvalidInputError
    from .config import check_backends, check_count, check_device, check_providers, check_tasks

    try:
        if args.tasks:
            check_tasks(args.tasks, "--tasks")
        if args.backends:
            check_backends(list(args.backends), "--backends")
        if args.providers:
            check_providers(list(args.providers), "--providers")
        if args.device is not None:
            check_device(args.device, "--device")
        for name in ("threads", "repeats"):
            check_count(getattr(args, name), f"--{name}", optional=True)
    except InvalidInputError as err:
        raise UsageError(str(err)) from None


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    from ..cli import UsageError

    if args.config:
        cfg = load_config(args.config)
    elif args.full:
        cfg = full_config()
    elif args.quick:
        cfg = quick_config()
    else:
        raise UsageError("choose what to run: --quick, --full or --config FILE "
                         "(or --table/--plot/--compare with --results to read a results file)")
    _check_selection(args)
    if args.tasks:
        have = sorted({c.task for c in cfg.cases})
        cfg.cases = [c for c in cfg.cases if c.task in args.tasks]
        if not cfg.cases:
            raise UsageError(f"--tasks {' '.join(args.tasks)}: the config has no case of "
                             f"those tasks (it has: {', '.join(have) or 'none'})")
    if args.providers:
        cfg.cases = [replace(c, providers=list(args.providers)) for c in cfg.cases]
        if cfg.sweep is not None:
            cfg.sweep.providers = list(args.providers)
    if args.backends:
        cfg.ours_backends = list(args.backends)
    if args.no_compile:
        cfg.compile = False
    if args.cold_compile:
        cfg.cold_compile = True
    if args.no_sweep:
        cfg.sweep = None
    if args.no_efficiency:
        cfg.efficiency = None
    if args.no_memory:
        cfg.memory = False
    if args.device:
        cfg.device = args.device
    if args.threads is not None:
        cfg.threads = args.threads
    if args.repeats is not None:
        cfg.repeats = args.repeats
    return cfg


def run(args: argparse.Namespace) -> int:
    """Entry point of ``fsinfo-fast bench`` (see the module docstring)."""
    from ..cli import UsageError
    from .report import compare, format_comparison, markdown
    from .schema import load_results, output_paths, validate, write_csv, write_json

    if not (args.tolerance >= 0):
        raise UsageError(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.table:
        print(markdown(load_results(args.table)))
        return 0
    if args.plot:
        from .plots import plot_all

        src = Path(args.plot)
        dest = Path(args.out) if args.out and Path(args.out).suffix != ".json" else src.parent
        for p in plot_all(load_results(src), dest, src.stem):
            print(p)
        return 0
    status = 0
    # the baseline is read before any work: a missing or broken --compare file was found only
    # after the whole run, and one that the run writes was overwritten before it was read
    old = load_results(args.compare) if args.compare else None
    if args.compare and args.results:
        doc = load_results(args.results)
    else:
        cfg = _config_from_args(args)
        out_arg = args.out if args.out is not None else _DEFAULT_OUT
        paths = output_paths(out_arg, cfg.name)
        if args.compare:
            _check_not_overwritten(Path(args.compare), paths, args.out is None)
        _check_out(paths[0])  # before the work, not after it
        if args.ref_cache is not None and Path(args.ref_cache).exists() and not Path(
                args.ref_cache).is_dir():
            raise UsageError(f"--ref-cache: {args.ref_cache} is a file, not a directory")
        from .._extras import require
        from .runner import run_bench as _run

        require("psutil", "fsinfo-fast bench")  # before the work, not after it
        if not args.no_plot:
            require("matplotlib", "the benchmark plots (--no-plot skips them)")

        try:
            doc = _run(cfg, cache_dir=args.ref_cache,
                       command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        except KeyboardInterrupt:
            # (a traceback and silence before; the rows measured so far are not written: a
            # partial results file would pass for a run of the whole config)
            print("fsinfo-fast bench: interrupted; nothing was written (no results, CSV or "
                  f"plots; {paths[0]} is as it was)", file=sys.stderr)
            return 130
        problems = validate(doc)
        if problems:  # a bug in the runner, not the user's fault
            raise RuntimeError("results do not follow the schema: " + "; ".join(problems[:5]))
        jpath, cpath, spath = output_paths(out_arg, cfg.name)
        write_json(doc, jpath)
        written = write_csv(doc, cpath, spath)
        print(f"wrote {jpath}" + "".join(f" and {p}" for p in written if p != spath))
        produced = {jpath, *written}
        if not args.no_plot:
            from .plots import plot_all

            for p in plot_all(doc, jpath.parent, jpath.stem):
                produced.add(p)
                print(f"wrote {p}")
        _remove_stale(jpath, spath, produced)
        bad = [r for r in doc["results"] if r["status"] in ("incorrect", "error")]
        for r in bad:
            print(f"{r['status'].upper()} {r['provider']} on {r['case']}: {r['reason']}",
                  file=sys.stderr)
        # a provider that crashed is a failed run, not a row to skip over quietly
        for part in ("sweep", "probe_efficiency"):
            for r in doc.get(part) or []:
                if r.get("status") == "error":
                    bad.append(r)
                    who = r.get("provider") or r.get("backend")
                    print(f"ERROR in {part}: {who}: {r.get('reason')}", file=sys.stderr)
        from .craft import craft_problems

        for msg in craft_problems(doc.get("craft")):
            bad.append(msg)
            print(f"ERROR in craft: {msg}", file=sys.stderr)
        status = 1 if bad else 0
    if old is not None:
        findings = compare(old, doc, tolerance=args.tolerance)
        print(format_comparison(old, doc, findings))
        if args.fail_if_regression and any(f["regression"] for f in findings):
            status = 1
    return status
