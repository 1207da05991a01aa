"""Summaries of a profile's records: per-split statistics, JSON, CSV and the terminal table.

Per split and metric (over the ``n`` samples):

- ``mean`` with ``mean_stderr`` = ``sqrt(sum_i se_i^2) / n`` and ``mean_ci95`` =
  ``mean +- mean_halfwidth`` (:func:`fsinfo_fast.result.mean_halfwidth`: the samples' own
  intervals, their probe-noise parts combined as independent and their rounding/bias allowances
  added): the estimators' uncertainty about the mean of *these* samples (0 for exact
  estimates);
- ``sample_std`` and ``sem`` = ``sample_std / sqrt(n)``: the spread over the data (the standard
  error of the mean as an estimate of the data distribution's mean);
- ``min``/``max`` and ``worst``: the most leaking sample (largest FSInfo or dFIL) with a 95%
  interval for the split's largest true value (:func:`fsinfo_fast.result.max_interval`: the
  largest upper end, and the largest lower end widened for selection among ``n`` samples).

Bounds (per-dimension reconstruction MSE; lower = weaker privacy) are reported for the worst
case, the least private sample: the smallest bound, with the interval ``[min_i low_i,
min_i high_i']`` (the image of the per-sample intervals, the upper ends widened for selection
among ``n`` samples: an interval for the smallest true bound). Both ``dfil_bound`` and
``fsinfo_bound`` are proven against unbiased attackers (Cramer-Rao, see :mod:`fsinfo_fast.bounds`).

The FSInfoGuard noise scale is reported per data set as the largest per-sample ``sigma*`` (the
noise that brings every profiled sample down to the target), with ``[max_i low_i', max_i
high_i]`` (lower ends widened for selection), and as a mean.

Convergence. Each record says per metric whether the estimate met its tolerance
(``*_converged``; False where the probe cap stopped it first, so its interval is wider than
asked) and whether the value is only an upper bound (``*_is_bound``: the interval is then
``(-inf, value + hw]``). Per split, ``n_unconverged`` / ``n_bound`` (and the sample ids) count
them; a mean over samples that includes an upper bound is itself only an upper bound
(``mean_is_bound``, no lower end). The table marks such cells (``*`` not converged, ``≤`` upper
bound, with a legend), the CSV files carry the flags and counts, the plot draws them hollow.

Exact -inf. A log-det FSInfo of a singular ``J^T J`` is exactly -inf (the library returns -inf
only where it is exact; the record holds ``null`` with ``fsinfo_logdet_status`` ``-inf: ...``).
The mean over samples is then -inf: ``mean`` (and its interval) ``null`` with ``mean_is_neg_inf``
true and ``n_neg_inf`` counting those samples (``n``, ``finite_mean``, ``max`` and ``worst`` are
over the finite ones); ``summary.csv`` writes ``-inf`` (and ``fsinfo_logdet_n_neg_inf``),
``samples.csv`` ``-inf`` for such a sample, the table ``-inf``.

JSON: non-finite values are written as ``null`` (with a status field saying why).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from .._extras import require
from ..result import max_interval, mean_halfwidth, selection_ratio
from .store import atomic_write_bytes, atomic_write_text

__all__ = ["summarize", "write_outputs", "print_table", "SAMPLE_FIELDS", "SUMMARY_FIELDS"]

#: Columns of ``samples.csv`` (one row per sample and split).
SAMPLE_FIELDS = (
    "sample", "split", "split_index", "layer", "label", "d", "m",
    "fsinfo_diag", "fsinfo_diag_se", "fsinfo_diag_hw", "fsinfo_diag_probes",
    "fsinfo_diag_estimator", "fsinfo_diag_converged", "fsinfo_diag_is_bound",
    "fsinfo_diag_rounding",
    "fsinfo_logdet", "fsinfo_logdet_se", "fsinfo_logdet_hw", "fsinfo_logdet_status",
    "fsinfo_logdet_converged", "fsinfo_logdet_is_bound",
    "dfil", "dfil_se", "dfil_hw", "dfil_probes", "dfil_estimator", "dfil_converged",
    "dfil_is_bound", "dfil_rounding",
    "dfil_bound", "dfil_bound_low", "dfil_bound_high",
    "fsinfo_diag_bound", "fsinfo_diag_bound_low", "fsinfo_diag_bound_high",
    "fsinfo_logdet_bound", "fsinfo_logdet_bound_low", "fsinfo_logdet_bound_high",
    "sigma_star", "sigma_star_low", "sigma_star_high", "sigma_star_status",
    "sigma_star_logdet", "sigma_star_logdet_low", "sigma_star_logdet_high",
    "sigma_star_logdet_status", "backend",
)

#: Columns of ``summary.csv`` (one row per split).
SUMMARY_FIELDS = (
    "split_index", "split", "layer", "m", "d", "n",
    "fsinfo_diag_mean", "fsinfo_diag_mean_low", "fsinfo_diag_mean_high", "fsinfo_diag_std",
    "fsinfo_diag_max", "fsinfo_diag_n_unconverged", "fsinfo_diag_n_bound",
    "fsinfo_logdet_mean", "fsinfo_logdet_mean_low", "fsinfo_logdet_mean_high",
    "fsinfo_logdet_n_finite", "fsinfo_logdet_n_neg_inf", "fsinfo_logdet_n_unconverged",
    "fsinfo_logdet_n_bound",
    "dfil_mean", "dfil_mean_low", "dfil_mean_high", "dfil_std", "dfil_max",
    "dfil_n_unconverged", "dfil_n_bound",
    "dfil_bound_worst", "dfil_bound_worst_low", "dfil_bound_worst_high",
    "fsinfo_diag_bound_worst", "fsinfo_diag_bound_worst_low", "fsinfo_diag_bound_worst_high",
    "sigma_star_max", "sigma_star_max_low", "sigma_star_max_high", "sigma_star_mean",
    "sigma_star_n_unreachable",
    "fsinfo_logdet_bound_worst", "fsinfo_logdet_bound_worst_low",
    "fsinfo_logdet_bound_worst_high",
    "sigma_star_logdet_max", "sigma_star_logdet_max_low", "sigma_star_logdet_max_high",
    "sigma_star_logdet_mean", "sigma_star_logdet_n_unreachable",
)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _neg_inf(rec: dict[str, Any], key: str) -> bool:
    """Whether the record's ``key`` is exactly -inf (stored as ``null`` with a ``{key}_status``
    starting with ``-inf``: a singular ``J^T J``, which the library claims only when exact)."""
    return rec.get(key) is None and str(rec.get(f"{key}_status") or "").startswith("-inf")


def _stats(recs: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    pairs = [(r["sample"], r[key], r.get(f"{key}_se") or 0.0, r.get(f"{key}_hw") or 0.0,
              r.get(f"{key}_probes")) for r in recs if _finite(r.get(key))]
    neg_inf = [r["sample"] for r in recs if _neg_inf(r, key)]
    if neg_inf:
        return _neg_inf_stats(_stats(
            [r for r in recs if not _neg_inf(r, key)], key) if pairs else None, neg_inf)
    if not pairs:
        return None
    # records written before the flags existed have none: unknown, not "converged"
    unconverged = [r["sample"] for r in recs
                   if _finite(r.get(key)) and r.get(f"{key}_converged") is False]
    unknown = [r["sample"] for r in recs
               if _finite(r.get(key)) and r.get(f"{key}_converged") is None]
    bound = {r["sample"] for r in recs if _finite(r.get(key)) and r.get(f"{key}_is_bound")}
    n = len(pairs)
    vals = [p[1] for p in pairs]
    mean = sum(vals) / n
    se_mean = math.sqrt(sum(p[2] ** 2 for p in pairs)) / n
    hw_mean = mean_halfwidth([p[2] for p in pairs], [p[3] for p in pairs])
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    worst = max(pairs, key=lambda p: p[1])
    # an interval for the split's largest true value, not the chosen sample's own (selection
    # biases the largest estimate upward)
    worst_ci = max_interval([p[1] for p in pairs], [p[3] for p in pairs],
                            [p[4] - 1 if isinstance(p[4], int) else None for p in pairs],
                            [p[0] in bound for p in pairs])
    return {
        "n": n,
        "mean": mean,
        "mean_stderr": se_mean,
        # a mean over an upper bound is only an upper bound: no lower end
        "mean_halfwidth": hw_mean,
        "mean_ci95": [None if bound else mean - hw_mean, mean + hw_mean],
        "mean_is_bound": bool(bound),
        "sample_std": std,
        "sem": std / math.sqrt(n) if n > 1 else None,
        "min": min(vals),
        "max": max(vals),
        "worst": {"sample": worst[0], "value": worst[1],
                  "ci95": [worst_ci[0] if math.isfinite(worst_ci[0]) else None, worst_ci[1]],
                  "converged": worst[0] not in unconverged and worst[0] not in unknown,
                  "is_bound": worst[0] in bound},
        "n_unconverged": len(unconverged),
        "unconverged_samples": unconverged,
        "n_convergence_unknown": len(unknown),
        "n_bound": len(bound),
        "bound_samples": sorted(bound),
    }


def _neg_inf_stats(finite: dict[str, Any] | None, neg_inf: list[int]) -> dict[str, Any]:
    """The statistics of a split where ``neg_inf`` samples' value is exactly -inf: the mean
    over all samples is -inf (JSON: ``mean`` and its interval ``null``, ``mean_is_neg_inf``
    true, ``n_neg_inf`` counting them; ``n`` and ``finite_mean`` are over the finite ones)."""
    st = dict(finite) if finite is not None else {
        "n": 0, "mean_is_bound": False, "max": None, "worst": None, "n_unconverged": 0,
        "unconverged_samples": [], "n_convergence_unknown": 0, "n_bound": 0, "bound_samples": []}
    st.update({
        "finite_mean": finite["mean"] if finite is not None else None,
        "mean": None, "mean_ci95": [None, None], "mean_stderr": None, "mean_halfwidth": None,
        "mean_is_neg_inf": True,
        "sample_std": None, "sem": None, "min": None,
        "n_neg_inf": len(neg_inf), "neg_inf_samples": neg_inf,
    })
    return st


#: the metric whose interval (and probe count) each derived quantity's interval is the image of
_SOURCE = {"dfil_bound": "dfil", "fsinfo_diag_bound": "fsinfo_diag",
           "fsinfo_logdet_bound": "fsinfo_logdet", "sigma_star": "fsinfo_diag",
           "sigma_star_logdet": "fsinfo_logdet"}


def _widened(v: float, end: Any, ratio: float) -> Any:
    """An interval end of a positive quantity moved ``ratio`` times as far from ``v`` in log
    space (the bounds and sigma* are exponentials of FSInfo or reciprocals of dFIL: their log
    is linear in the metric, whose interval :func:`selection_ratio` widens)."""
    if not (_finite(end) and v > 0 and end > 0 and ratio != 1.0):
        return end
    return v * (end / v) ** ratio


def _extreme(recs: list[dict[str, Any]], key: str, pick) -> dict[str, Any] | None:
    """The smallest (bounds) or largest (sigma*) value of a split with an interval for the
    smallest / largest true value: the per-sample interval ends reduced by ``pick``, the side
    selection biases widened for ``n`` samples (:func:`fsinfo_fast.result.selection_ratio` on
    the source metric's probes; the other side needs none)."""
    rows = [r for r in recs if _finite(r.get(key))]
    if not rows:
        return None
    best = pick(rows, key=lambda r: r[key])
    n = len(rows)
    side = f"{key}_low" if pick is max else f"{key}_high"

    def end(r: dict[str, Any], k: str) -> Any:
        if k != side:
            return r.get(k)
        probes = r.get(f"{_SOURCE.get(key, key)}_probes")
        ratio = selection_ratio(n, probes - 1 if isinstance(probes, int) else None)
        return _widened(r[key], r.get(k), ratio)

    def agg(k: str) -> float | None:
        vals = [end(r, k) if _finite(r.get(k)) else math.inf for r in rows]
        v = pick(vals)
        return v if math.isfinite(v) else None

    return {"value": best[key], "sample": best["sample"],
            "interval": [agg(f"{key}_low"), agg(f"{key}_high")],
            "mean": sum(r[key] for r in rows) / len(rows)}


def _sigma_extreme(recs: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The largest sigma* of a split; where some sample's target no finite noise reaches
    (``{key}_status``), that is the largest: value, interval and mean null (infinite) and
    ``n_unreachable`` counts those samples."""
    out = _extreme(recs, key, max)
    from .runner import SIGMA_UNREACHABLE

    # (only those: a sigma* below 1e-100, the target held without noise, has a status too and
    # its value, and read as unreachable it made the split's largest sigma* infinite)
    gone = [r for r in recs if r.get(f"{key}_status") == SIGMA_UNREACHABLE]
    if not gone:
        return out
    return {"value": None, "sample": gone[0]["sample"], "interval": [None, None],
            "mean": None, "n_unreachable": len(gone),
            "finite_max": out["value"] if out else None}


def summarize(settings: dict[str, Any], splits: list, plan: Any,
              records: dict[tuple[int, str], dict[str, Any]]) -> dict[str, Any]:
    """The content of ``profile.json``: settings, per-split statistics and per-sample records."""
    by_split: dict[str, list[dict[str, Any]]] = {s.name: [] for s in splits}
    for rec in records.values():
        if rec["split"] in by_split:
            by_split[rec["split"]].append(rec)
    out_splits = []
    for s in splits:
        recs = sorted(by_split[s.name], key=lambda r: r["sample"])
        first = recs[0] if recs else {}
        logdet_status = sorted({r.get("fsinfo_logdet_status") for r in recs} - {None, "ok"})
        out_splits.append({
            "name": s.name,
            "index": s.index,
            "layer": s.layer,
            "m": first.get("m"),
            "d": first.get("d"),
            "n": len(recs),
            "fsinfo_diag": _stats(recs, "fsinfo_diag"),
            "fsinfo_logdet": _stats(recs, "fsinfo_logdet"),
            "fsinfo_logdet_status": logdet_status,
            "dfil": _stats(recs, "dfil"),
            "dfil_bound_worst": _extreme(recs, "dfil_bound", min),
            "fsinfo_diag_bound_worst": _extreme(recs, "fsinfo_diag_bound", min),
            "fsinfo_logdet_bound_worst": _extreme(recs, "fsinfo_logdet_bound", min),
            "sigma_star": _sigma_extreme(recs, "sigma_star"),
            "sigma_star_logdet": _sigma_extreme(recs, "sigma_star_logdet"),
            "estimators": {
                "fsinfo_diag": sorted({str(r.get("fsinfo_diag_estimator")) for r in recs
                                       if r.get("fsinfo_diag_estimator")}),
                "dfil": sorted({str(r.get("dfil_estimator")) for r in recs
                                if r.get("dfil_estimator")}),
            },
            "backends": sorted({str(r.get("backend")) for r in recs if r.get("backend")}),
        })
    samples = sorted(records.values(), key=lambda r: (r["sample"], _order(splits, r["split"])))
    from .. import __version__

    return {
        "fsinfo_fast_version": __version__,
        "units": {"fsinfo": "nats per input dimension",
                  "dfil": "per input dimension, 1/(squared input units), at settings.sigma",
                  "bounds": "per-dimension MSE, squared input units",
                  "sigma_star": "input-independent noise std on the smashed data"},
        "settings": settings,
        "sharing": plan.describe() if plan is not None else None,
        "splits": out_splits,
        "samples": [{k: r.get(k) for k in SAMPLE_FIELDS} for r in samples],
    }


def _order(splits: list, name: str) -> int:
    for i, s in enumerate(splits):
        if s.name == name:
            return i
    return len(splits)


def _summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in summary["splits"]:
        def g(metric: str, *path, s=s):
            v = s.get(metric)
            for p in path:
                if v is None:
                    return None
                v = v.get(p) if isinstance(v, dict) else v[p]
            return v

        rows.append({
            "split_index": s["index"], "split": s["name"], "layer": s["layer"], "m": s["m"],
            "d": s["d"], "n": s["n"],
            "fsinfo_diag_mean": g("fsinfo_diag", "mean"),
            "fsinfo_diag_mean_low": g("fsinfo_diag", "mean_ci95", 0),
            "fsinfo_diag_mean_high": g("fsinfo_diag", "mean_ci95", 1),
            "fsinfo_diag_std": g("fsinfo_diag", "sample_std"),
            "fsinfo_diag_max": g("fsinfo_diag", "max"),
            "fsinfo_diag_n_unconverged": g("fsinfo_diag", "n_unconverged"),
            "fsinfo_diag_n_bound": g("fsinfo_diag", "n_bound"),
            # an exact -inf (a singular J^T J) makes the mean over samples -inf
            **({"fsinfo_logdet_mean": "-inf", "fsinfo_logdet_mean_low": "-inf",
                "fsinfo_logdet_mean_high": "-inf"} if g("fsinfo_logdet", "mean_is_neg_inf") else {
                "fsinfo_logdet_mean": g("fsinfo_logdet", "mean"),
                "fsinfo_logdet_mean_low": g("fsinfo_logdet", "mean_ci95", 0),
                "fsinfo_logdet_mean_high": g("fsinfo_logdet", "mean_ci95", 1)}),
            "fsinfo_logdet_n_finite": g("fsinfo_logdet", "n") or 0,
            "fsinfo_logdet_n_neg_inf": (s.get("fsinfo_logdet") or {}).get("n_neg_inf", 0),
            "fsinfo_logdet_n_unconverged": g("fsinfo_logdet", "n_unconverged"),
            "fsinfo_logdet_n_bound": g("fsinfo_logdet", "n_bound"),
            "dfil_mean": g("dfil", "mean"),
            "dfil_mean_low": g("dfil", "mean_ci95", 0),
            "dfil_mean_high": g("dfil", "mean_ci95", 1),
            "dfil_std": g("dfil", "sample_std"),
            "dfil_max": g("dfil", "max"),
            "dfil_n_unconverged": g("dfil", "n_unconverged"),
            "dfil_n_bound": g("dfil", "n_bound"),
            "dfil_bound_worst": g("dfil_bound_worst", "value"),
            "dfil_bound_worst_low": g("dfil_bound_worst", "interval", 0),
            "dfil_bound_worst_high": g("dfil_bound_worst", "interval", 1),
            "fsinfo_diag_bound_worst": g("fsinfo_diag_bound_worst", "value"),
            "fsinfo_diag_bound_worst_low": g("fsinfo_diag_bound_worst", "interval", 0),
            "fsinfo_diag_bound_worst_high": g("fsinfo_diag_bound_worst", "interval", 1),
            "sigma_star_max": g("sigma_star", "value"),
            "sigma_star_max_low": g("sigma_star", "interval", 0),
            "sigma_star_max_high": g("sigma_star", "interval", 1),
            "sigma_star_mean": g("sigma_star", "mean"),
            "sigma_star_n_unreachable": (s.get("sigma_star") or {}).get("n_unreachable", 0),
            "fsinfo_logdet_bound_worst": g("fsinfo_logdet_bound_worst", "value"),
            "fsinfo_logdet_bound_worst_low": g("fsinfo_logdet_bound_worst", "interval", 0),
            "fsinfo_logdet_bound_worst_high": g("fsinfo_logdet_bound_worst", "interval", 1),
            "sigma_star_logdet_max": g("sigma_star_logdet", "value"),
            "sigma_star_logdet_max_low": g("sigma_star_logdet", "interval", 0),
            "sigma_star_logdet_max_high": g("sigma_star_logdet", "interval", 1),
            "sigma_star_logdet_mean": g("sigma_star_logdet", "mean"),
            "sigma_star_logdet_n_unreachable": (s.get("sigma_star_logdet") or {}).get(
                "n_unreachable", 0),
        })
    return rows


def _csv(rows: list[dict[str, Any]], fields: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def write_outputs(run_dir: Path, summary: dict[str, Any], records: dict, *,
                  plot: bool = True) -> dict[str, str]:
    """Write ``profile.json``, ``summary.csv``, ``samples.csv`` and (optionally) ``profile.png``,
    each atomically. Returns their paths."""
    run_dir = Path(run_dir)
    files = {
        "json": str(run_dir / "profile.json"),
        "summary_csv": str(run_dir / "summary.csv"),
        "samples_csv": str(run_dir / "samples.csv"),
    }
    if plot:
        files["plot"] = str(run_dir / "profile.png")
    summary["files"] = {k: Path(v).name for k, v in files.items()}
    atomic_write_text(files["summary_csv"], _csv(_summary_rows(summary), SUMMARY_FIELDS))
    atomic_write_text(files["samples_csv"], _csv(
        # an exact -inf log det (null in JSON, with its status) is written as -inf here
        [{**r, "fsinfo_logdet": "-inf"} if _neg_inf(r, "fsinfo_logdet") else r
         for r in summary["samples"]], SAMPLE_FIELDS))
    if plot:
        from .plot import plot_profile

        atomic_write_bytes(files["plot"], plot_profile(summary))
    atomic_write_text(files["json"], json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return files


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
        return f"{v:.{max(0, digits - 1)}e}"
    return f"{v:.{digits}g}"


#: table markers (explained under the table when used)
UNCONVERGED_MARK = "*"
BOUND_MARK = "≤"


def _flags(st: dict[str, Any] | None) -> tuple[bool, bool]:
    """(some sample missed its tolerance or has no convergence record, some value is only an
    upper bound)."""
    if st is None:
        return False, False
    return (bool(st.get("n_unconverged") or st.get("n_convergence_unknown")),
            bool(st.get("n_bound")))


def _pm(st: dict[str, Any] | None) -> str:
    if st is None:
        return "-"
    if st.get("mean_is_neg_inf"):  # some sample's value is exactly -inf: so is the mean
        return "-inf"
    unconv, bound = _flags(st)
    hw = st["mean_halfwidth"]
    if hw <= 0:
        text = _fmt(st["mean"])
    else:
        half = f"{hw:.1g}" if 1e-4 <= hw < 1e4 else f"{hw:.0e}"
        text = f"{_fmt(st['mean'])} ± {half}"
    if bound:
        text = f"{BOUND_MARK} {text}"
    return text + (f" {UNCONVERGED_MARK}" if unconv else "")


def _derived(v: dict[str, Any] | None, source: dict[str, Any] | None, bound_mark: str) -> str:
    """A bound or sigma* cell, marked like the metric it comes from: ``*`` when that did not
    converge, ``bound_mark`` (the direction the derived value is one-sided in) when it is only
    an upper bound."""
    if not v:
        return "-"
    if v.get("n_unreachable"):
        return "∞"  # some sample's target lies at or below the floor's asymptote
    unconv, bound = _flags(source)
    text = _fmt(v["value"])
    if bound:
        text = f"{bound_mark} {text}"
    return text + (f" {UNCONVERGED_MARK}" if unconv else "")


#: the width of the tables written where stdout is not a terminal (a log, a pipe): rich's
#: default of 80 columns cut their cells ("3.71..…", "featur…")
LOG_WIDTH = 240


def table_console():
    """A rich console for the subcommands' tables: the terminal's width, or
    :data:`LOG_WIDTH` columns where stdout is not a terminal."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, LOG_WIDTH))


def print_table(summary: dict[str, Any], files: dict[str, str] | None = None,
                console: Any = None) -> None:
    """Print the per-split table (rich) and where the files are."""
    require("rich", "the profile table")
    from rich.table import Table

    if console is None:
        console = table_console()
    st = summary["settings"]
    n = summary["splits"][0]["n"] if summary["splits"] else 0
    t = Table(title=f"{st['model']} on {st['data']}: {n} samples, sigma={st['sigma']}, "
                    f"target={st['target']}", title_justify="left")
    with_logdet = st.get("variant") != "diag"
    from_logdet = st.get("variant") == "logdet"  # the bound and sigma* columns' source
    cols = ["split", "layer", "m", "FSInfo diag"] + (["FSInfo logdet"] if with_logdet else [])
    derived = (["FSInfo bnd (logdet)", "sigma* (logdet)"] if from_logdet
               else ["FSInfo bnd", "sigma*"])
    for col in cols + ["dFIL", "1/dFIL", *derived]:
        t.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    n_unconv = n_bound = n_gone = n_neg_inf = 0
    marked = False
    for s in summary["splits"]:
        ld = _pm(s["fsinfo_logdet"])
        n_neg_inf += (s["fsinfo_logdet"] or {}).get("n_neg_inf", 0)
        if (s["fsinfo_logdet"] or {}).get("mean_is_neg_inf"):
            pass  # exact: no upper-bound mark
        elif any(x.startswith("upper bound") for x in s.get("fsinfo_logdet_status") or ()) \
                and not ld.startswith(BOUND_MARK):  # (_pm marked it already: once, helper 126)
            ld = f"{BOUND_MARK} {ld}"  # some samples' log det is only an upper bound
        b, fb, sg = s["dfil_bound_worst"], s["fsinfo_diag_bound_worst"], s["sigma_star"]
        fs = s["fsinfo_diag"]
        tag = ""
        if from_logdet or fb is None:  # the log-det bound and sigma*
            fb, sg, fs = s["fsinfo_logdet_bound_worst"], s["sigma_star_logdet"], s["fsinfo_logdet"]
            tag = "" if from_logdet else " (logdet)"  # a row without diag values
        n_gone += (sg or {}).get("n_unreachable", 0)
        shown = [s["fsinfo_diag"], s["dfil"]] + ([s["fsinfo_logdet"]] if with_logdet else [])
        n_unconv += sum((st_ or {}).get("n_unconverged", 0)
                        + (st_ or {}).get("n_convergence_unknown", 0) for st_ in shown)
        n_bound += sum((st_ or {}).get("n_bound", 0) for st_ in shown)
        cells = [_pm(s["fsinfo_diag"]), *([ld] if with_logdet else []), _pm(s["dfil"]),
                 # 1/dFIL and exp(-2 FSInfo)/(2 pi e) fall as their metric rises; sigma* rises
                 _derived(b, s["dfil"], "≥"), _derived(fb, fs, "≥") + tag,
                 _derived(sg, fs, "≤") + tag]
        marked = marked or any(m in c for c in cells for m in (UNCONVERGED_MARK, "≤", "≥"))
        t.add_row(str(s["index"]) if s["index"] is not None else s["name"], s["layer"],
                  str(s["m"]), *cells)
    console.print(t)
    console.print(
        "FSInfo: nats/dim, mean ± 95% estimator half-width. 1/dFIL and FSInfo bnd "
        "exp(-2 FSInfo)/(2 pi e) (both proven for unbiased attackers): per-dim MSE bound of "
        "the least private sample. sigma*: "
        "largest per-sample FSInfoGuard noise for the target"
        + (", both from FSInfo logdet." if from_logdet else "."), soft_wrap=False)
    if marked:
        parts = []
        if n_unconv or not n_bound:
            parts.append(
                f"{UNCONVERGED_MARK} not converged: {n_unconv} sample value(s) stopped at the "
                "probe cap before reaching --atol/--rtol (their intervals are wider than asked; "
                "on a bound or sigma* column: computed from a flagged value).")
        if n_bound:
            parts.append(f"{BOUND_MARK} upper bound only: {n_bound} sample value(s) are "
                         "one-sided (interval (-inf, value + hw]; ≥ on a bound column: a lower "
                         "end only).")
        parts.append("Per sample: the *_converged and *_is_bound columns of samples.csv.")
        console.print(" ".join(parts), soft_wrap=True)
    if n_neg_inf and with_logdet:
        console.print(f"-inf FSInfo logdet: {n_neg_inf} sample value(s) are exactly -inf (J^T J "
                      "singular: always where m < d; --prior-var gives the finite van Trees "
                      "version), so the mean over samples is -inf (n_neg_inf, and finite_mean "
                      "over the others, in profile.json; fsinfo_logdet_n_neg_inf in "
                      "summary.csv).", soft_wrap=True)
    if n_gone:
        console.print(f"∞ sigma*: for {n_gone} sample(s) no finite noise reaches --target "
                      f"{st['target']}: it lies at or below FSInfo's floor asymptote "
                      "(*_status in samples.csv).", soft_wrap=True)
    if files:
        console.print("wrote " + ", ".join(files.values()), soft_wrap=True)
