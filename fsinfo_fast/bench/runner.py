"""The benchmark runner: every provider of a case measured side by side in one process run.

For each case (task x encoder x batch) it builds the encoder and input once, computes the exact
value once with the float64 oracle, and for each provider:

1. checks that it can run (otherwise the row is ``skipped`` with the reason);
2. randomized providers: finds the probe count ``K`` that reaches the case's accuracy target
   (smallest ``K`` of ``probe_grid`` whose pooled error over ``calib_seeds`` seeds and all samples,
   ``1.96 * RMS``, is within the target);
3. makes a first call and checks it against the exact value (the correctness gate: an exact
   provider must be within ``exact_tol * target``, a randomized one within
   ``gate_factor * target``; where the grid ran out before the target, at a larger ``K`` that
   an unbiased estimator would pass: see :func:`_gate_beyond_grid`); a provider that fails is
   ``incorrect`` and is not timed; one that passes but missed the target (the grid ran out, or
   the adaptive rule stopped short) is ``target_not_reached``;
4. times it (warm-up, medians of repeats; compile time separately) at equal accuracy (``K``
   from step 2) and at equal probe count (``equal_probes``), and measures its peak memory;
5. computes speed-ups against every other ``ok`` provider of the case.

Then the scaling sweep, the probe efficiency and the claims. The result is one JSON-able dict
(see :mod:`.schema`).
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import reference
from ..errors import BackendUnavailableError
from ..result import Z95
from .cases import Case, build_encoder, make_case
from .config import BenchConfig, CaseSpec
from .harness import Timing, environment, peak_memory, pin_threads, synchronize, time_call
from .providers import (
    Ours,
    PaperReference,
    Provider,
    ProviderUnavailable,
    default_providers,
    select_providers,
)
from .schema import SCHEMA_VERSION

__all__ = ["run_bench", "measure_case", "resolve_device"]


Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError("--device cuda: no CUDA device is available here")
    return dev


def _timed_first(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def _err_stats(case: Case, value: Tensor) -> dict[str, float]:
    err = case.error(value)
    return {"max_err": float(err.max()), "rms_err": float(torch.sqrt((err**2).mean()))}


def _base_row(case: Case, p: Provider) -> dict[str, Any]:
    spec = case.spec
    return {
        "case": spec.case_id,
        "task": spec.task,
        "model": spec.encoder.model,
        "split": spec.encoder.split,
        "stem": spec.encoder.stem,
        "size": spec.encoder.size,
        "input_shape": list(case.x.shape[1:]),
        "batch": case.batch,
        "d": case.d,
        "m": case.m,
        "sigma": case.sigma,
        "prior_var": spec.prior_var,
        "provider": p.name,
        "kind": p.kind,
        "backend": p.backend,
        "compiled": p.compiled,
        "mode": "exact" if p.kind == "exact" else None,
        "status": "ok",
        "reason": None,
        "num_probes": None,
        "passes": None,
        "time_s": None,
        "time_per_image_s": None,
        "compile_s": None,
        "first_call_s": None,
        "extrapolated": None,
        "accuracy": None,
        "calibration": None,
        "correct": None,
        "peak_memory_bytes": None,
        "speedup_vs": {},
        "speedup_vs_reference": None,
        "info": {},
    }


def _accuracy(case: Case, stats: dict[str, float] | None, err95: float | None,
              checked: str, seeds: int | None = None) -> dict[str, Any]:
    """The row's accuracy. ``err95`` is ``1.96 * RMS`` of the error pooled over ``seeds`` seeds
    and all samples for randomized rows; ``None`` (exact rows) takes the single run's max error.
    """
    target = case.target
    units = "relative" if case.relative else "nats/dim"
    if stats is None:
        return {"max_err": None, "rms_err": None, "err95": None, "target": target, "units": units,
                "meets_target": None, "checked": checked, "seeds": seeds}
    e95 = err95 if err95 is not None else stats["max_err"]
    return {**stats, "err95": e95, "target": target, "units": units,
            "meets_target": bool(e95 <= target), "checked": checked, "seeds": seeds}


def _set_timing(row: dict[str, Any], t: Timing, batch: int, compiled: bool) -> None:
    row["time_s"] = t.to_dict()
    row["time_per_image_s"] = t.median / batch
    row["first_call_s"] = t.first_call_s
    if compiled and t.first_call_s is not None:
        row["compile_s"] = max(0.0, t.first_call_s - t.median)


def _memory(cfg: BenchConfig, fn: Callable[[], Any], device: torch.device) -> int | None:
    return peak_memory(fn, device) if cfg.memory else None


# -- exact providers -----------------------------------------------------------------------------
class _FirstRows(nn.Module):
    """The first ``rows`` outputs of an encoder (a module, so the oracle can cast it)."""

    def __init__(self, encoder: nn.Module, rows: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.rows = rows

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x).reshape(x.shape[0], -1)[:, : self.rows]


def _exact_gate(case: Case, cfg: BenchConfig) -> float:
    return cfg.exact_tol * case.target


def _measure_exact(case: Case, p: Provider, cfg: BenchConfig, log: Log) -> dict[str, Any]:
    row = _base_row(case, p)
    dev = case.device
    t_first, out = _timed_first(lambda: p.run(case), dev)
    stats = _err_stats(case, out.value) if case.exact is not None else None
    row["passes"], row["info"] = out.passes, dict(out.info)
    row["accuracy"] = _accuracy(case, stats, None, "full" if stats else "none")
    if stats is not None and not stats["max_err"] <= _exact_gate(case, cfg):
        row.update(status="incorrect", correct=False, reason=(
            f"correctness gate: max error {stats['max_err']:.3g} > {_exact_gate(case, cfg):.3g}"))
        return row
    row["correct"] = stats is not None
    t = time_call(lambda: p.run(case), device=dev, warmup=cfg.warmup, repeats=cfg.repeats,
                  min_repeats=cfg.min_repeats, max_seconds=cfg.max_seconds, first_call_s=t_first)
    _set_timing(row, t, case.batch, p.compiled)
    row["peak_memory_bytes"] = _memory(cfg, lambda: p.run(case), dev)
    return row


def _measure_paper_rows(case: Case, p: PaperReference, cfg: BenchConfig,
                        log: Log) -> dict[str, Any]:
    """Paper-style reference timed on the first ``rows`` output rows, extrapolated to ``m``."""
    row = _base_row(case, p)
    dev, r = case.device, int(cfg.paper_rows)
    t_first, J_rows = _timed_first(lambda: p.jacobian_rows(case, r), dev)
    J_ref = reference.jacobian(_FirstRows(case.encoder, r), case.x).to(J_rows.device)
    rows_err = float((J_rows.double() - J_ref).norm() / J_ref.norm().clamp_min(1e-300))
    row["passes"] = case.m
    row["info"]["rows_rel_err"] = rows_err
    if not rows_err <= 1e-4:
        row.update(status="incorrect", correct=False,
                   reason=f"correctness gate: Jacobian rows differ from the oracle by "
                          f"{rows_err:.3g} (relative Frobenius)")
        return row
    # forward (with autograd) per sample: counted once, not per row, in the extrapolation
    def fwd() -> None:
        for i in range(case.batch):
            xi = case.x[i : i + 1].clone().requires_grad_(True)
            case.encoder(xi)

    t_fwd = time_call(fwd, device=dev, warmup=1, repeats=cfg.repeats, min_repeats=1,
                      max_seconds=cfg.max_seconds / 4)
    t_rows = time_call(lambda: p.jacobian_rows(case, r), device=dev, warmup=cfg.warmup,
                       repeats=cfg.repeats, min_repeats=cfg.min_repeats,
                       max_seconds=cfg.max_seconds, first_call_s=t_first)
    factor = case.m / r
    t_full = t_rows.scaled(factor, offset=(1.0 - factor) * t_fwd.median)
    t_full.first_call_s = None
    _set_timing(row, t_full, case.batch, False)
    row["extrapolated"] = {"rows_timed": r, "rows_total": case.m,
                           "rows_median_s": t_rows.median, "forward_median_s": t_fwd.median,
                           "method": "t(all) = t_fwd + (t(rows) - t_fwd) * m / rows"}
    mem_rows = _memory(cfg, lambda: p.jacobian_rows(case, r), dev)
    est = t_full.median
    if case.exact is not None and est <= cfg.paper_full_max_s:
        holder: list[Any] = []
        mem_full = _memory(cfg, lambda: holder.append(_timed_first(lambda: p.run(case), dev)),
                           dev)
        if not holder:  # memory measurement disabled
            holder.append(_timed_first(lambda: p.run(case), dev))
        t_run, out = holder[0]
        stats = _err_stats(case, out.value)
        row["accuracy"] = _accuracy(case, stats, None, "full")
        row["extrapolated"]["full_run_s"] = t_run
        row["peak_memory_bytes"] = mem_full
        if not stats["max_err"] <= _exact_gate(case, cfg):
            row.update(status="incorrect", correct=False, reason=(
                f"correctness gate: max error {stats['max_err']:.3g} > "
                f"{_exact_gate(case, cfg):.3g}"))
            return row
        row["correct"] = True
    else:
        row["accuracy"] = _accuracy(case, None, None, "rows")
        row["correct"] = True
        if mem_rows is not None:  # + the rest of J (stored row by row, then stacked: 2 copies)
            row["peak_memory_bytes"] = int(mem_rows + 2 * (case.m - r) * case.d * 4)
            row["info"]["memory_extrapolated"] = True
        row["info"]["full_run_skipped"] = (
            f"estimated {est:.1f} s > paper_full_max_s = {cfg.paper_full_max_s} s"
            if case.exact is not None else "no exact value for this case")
    return row


# -- randomized providers ------------------------------------------------------------------------
def _calibrate(case: Case, p: Provider, cfg: BenchConfig,
               first: dict[str, Any]) -> tuple[int, float, list[dict[str, Any]], bool]:
    """Smallest ``K`` of the grid whose pooled ``1.96 * RMS`` error is within the target."""
    curve = []
    grid = case.spec.probe_grid or cfg.probe_grid
    seeds = case.spec.calib_seeds or cfg.calib_seeds
    cap = p.max_probes(case)
    grid = [k for k in grid if k >= p.min_probes and (cap is None or k <= cap)] or [
        p.min_probes]
    for k in grid:
        errs = []
        for s in range(seeds):
            if not first:
                dt, out = _timed_first(lambda k=k, s=s: p.run(case, k, s), case.device)
                first["first_call_s"] = dt
            else:
                out = p.run(case, k, s)
            errs.append(case.error(out.value))
        e = torch.cat(errs)
        err95 = float(Z95 * torch.sqrt((e**2).mean()))
        curve.append({"num_probes": k, "err95": err95, "max_err": float(e.max()),
                      "seeds": seeds})
        if err95 <= case.target:
            return k, err95, curve, True
    return grid[-1], curve[-1]["err95"], curve, False


def _pooled_err95(case: Case, p: Provider, k: int | None, seeds: int,
                  adaptive: bool = False) -> float:
    """``1.96 * RMS`` error over ``seeds`` seeds and all samples at ``k`` probes."""
    errs = []
    for s in range(seeds):
        out = p.run(case, None, s, adaptive=True) if adaptive else p.run(case, k, s)
        errs.append(case.error(out.value))
    e = torch.cat(errs)
    return float(Z95 * torch.sqrt((e**2).mean()))


def _measure_randomized_at(case: Case, p: Provider, cfg: BenchConfig, k: int | None, mode: str,
                           err95: float | None, adaptive: bool = False,
                           seeds: int | None = None, gate: bool = True) -> dict[str, Any]:
    """One randomized row. ``gate``: apply the correctness gate to an ``equal_accuracy`` row
    (off where no probe count of the grid reached the target: a correct estimator at too few
    probes is then ``target_not_reached``, not ``incorrect``)."""
    row = _base_row(case, p)
    row["mode"] = mode
    dev = case.device
    seed = 0
    if adaptive:
        call = lambda: p.run(case, None, seed, adaptive=True)  # noqa: E731
    else:
        call = lambda: p.run(case, k, seed)  # noqa: E731
    t_first, out = _timed_first(call, dev)
    row["num_probes"], row["passes"] = out.num_probes, out.passes
    row["info"] = dict(out.info)
    stats = _err_stats(case, out.value) if case.exact is not None else None
    if stats is not None and err95 is None and seeds:
        err95 = _pooled_err95(case, p, k, seeds, adaptive)
    row["accuracy"] = _accuracy(case, stats, err95, "full" if stats else "none",
                                seeds if err95 is not None else 1)
    bound = cfg.gate_factor * case.target
    if (gate and stats is not None and mode == "equal_accuracy"
            and not stats["max_err"] <= bound):
        row.update(status="incorrect", correct=False, reason=(
            f"correctness gate: error {stats['max_err']:.3g} > {cfg.gate_factor} x target "
            f"{case.target:g} at its calibrated K = {k}"))
        return row
    row["correct"] = stats is not None if gate or mode != "equal_accuracy" else None
    t = time_call(call, device=dev, warmup=cfg.warmup, repeats=cfg.repeats,
                  min_repeats=cfg.min_repeats, max_seconds=cfg.max_seconds, first_call_s=t_first)
    _set_timing(row, t, case.batch, p.compiled)
    row["peak_memory_bytes"] = _memory(cfg, call, dev)
    acc = row["accuracy"]
    if mode == "adaptive" and acc["meets_target"] is False and acc["err95"] is not None:
        # its own stopping rule stopped short of the target: not an equal-accuracy row (no
        # speed-ups, no claims). An adaptive rule stops where its half-width meets the target,
        # so its err95 sits at the target by design: from n pooled errors (an RMS), it misses
        # only where the target is rejected at 5% (n (err95 / target)^2 > chi2_n(0.95)); a
        # plain comparison flipped between runs at 0.0104 vs 0.01 from 2 seeds
        n = max(1, int(acc.get("seeds") or 1) * int(case.batch))
        from scipy.stats import chi2

        allowed = case.target * math.sqrt(float(chi2.ppf(0.95, n)) / n)
        if acc["err95"] > allowed:
            row.update(status="target_not_reached", reason=(
                f"adaptive stopping missed the target: err95 "
                f"{_fmt_err(acc['err95'], case.target)} > {case.target:g}, beyond the "
                f"{allowed:.3g} that {n} pooled error(s) allow at 5% ({acc['seeds']} seed(s), "
                f"{row['num_probes']} probes at seed 0)"))
    return row


def _gate_beyond_grid(case: Case, p: Provider, cfg: BenchConfig, k: int,
                      err95: float) -> tuple[int, Any]:
    """The correctness gate of a provider whose grid ran out before the target: one run at the
    count where an unbiased estimator's error (``~ 1/sqrt(K)``) would be half the gate, within
    ``64 k`` and the provider's cap. A correct estimator on too small a grid passes there
    (``target_not_reached``); a biased one does not (``incorrect``). ``(k_gate, None)`` where
    that count is no larger than ``k`` (the gate is then applied at ``k``)."""
    bound = cfg.gate_factor * case.target
    want = math.ceil(4 * k * (err95 / bound) ** 2) if math.isfinite(err95) else 64 * k
    cap = p.max_probes(case)
    k_gate = min(max(want, k), 64 * k, cap if cap is not None else 64 * k)
    if k_gate <= k:
        return k, None
    return k_gate, p.run(case, k_gate, 0)


def _measure_randomized(case: Case, p: Provider, cfg: BenchConfig,
                        calibrated: dict[str, tuple[int, float, list, bool]]) -> list[dict]:
    rows = []
    first: dict[str, Any] = {}
    if case.exact is None:
        raise ProviderUnavailable("no exact value: cannot calibrate the probe count")
    if p.calibration_from and p.calibration_from in calibrated:
        k, err95, curve, reached = calibrated[p.calibration_from]
        curve = [dict(c, shared_from=p.calibration_from) for c in curve]
    else:
        k, err95, curve, reached = _calibrate(case, p, cfg, first)
        calibrated[p.name] = (k, err95, curve, reached)
    seeds = case.spec.calib_seeds or cfg.calib_seeds
    gate_at_k = reached
    if not reached:
        k_gate, out = _gate_beyond_grid(case, p, cfg, k, err95)
        if out is None:  # no larger count to check at: gated at the grid's largest
            gate_at_k = True
        else:
            stats = _err_stats(case, out.value)
            bound = cfg.gate_factor * case.target
            if not stats["max_err"] <= bound:
                row = _base_row(case, p)
                row.update(mode="equal_accuracy", num_probes=out.num_probes, passes=out.passes,
                           info=dict(out.info), calibration=curve, status="incorrect",
                           correct=False,
                           accuracy=_accuracy(case, stats, None, "full", 1), reason=(
                               f"correctness gate: no probe count of the grid reached the "
                               f"target (err95 {err95:.3g} at K = {k}), and at K = {k_gate}, "
                               f"where an unbiased estimator would be within half the gate, "
                               f"the error is {stats['max_err']:.3g} > {cfg.gate_factor} x "
                               f"target {case.target:g}"))
                return [row]
    row = _measure_randomized_at(case, p, cfg, k, "equal_accuracy", err95, seeds=seeds,
                                 gate=gate_at_k)
    if not gate_at_k:
        row["info"]["gate"] = {"num_probes": k_gate, "max_err": stats["max_err"],
                               "bound": cfg.gate_factor * case.target}
    row["calibration"] = curve
    if first and not p.compiled:
        row["first_call_s"] = first["first_call_s"]
    if not reached and row["status"] == "ok":
        gated = ("" if gate_at_k else f"; correct: within the gate at K = {k_gate}")
        row.update(status="target_not_reached", reason=(
            f"the largest probe count tried, K = {k}, did not reach the target (err95 "
            f"{_fmt_err(err95, case.target)} > {case.target:g}): the probe grid is too small "
            f"for this case; timed at K = {k}, not an equal-accuracy row{gated}"))
    rows.append(row)
    if row["status"] in ("ok", "target_not_reached"):
        k_eq = max(cfg.equal_probes, p.min_probes)
        cap = p.max_probes(case)
        k_eq = k_eq if cap is None else min(k_eq, cap)
        known = next((c["err95"] for c in curve if c["num_probes"] == k_eq), None)
        rows.append(_measure_randomized_at(case, p, cfg, k_eq, "equal_probes", known,
                                           seeds=seeds))
        if isinstance(p, Ours):
            rows.append(_measure_randomized_at(case, p, cfg, None, "adaptive", None,
                                               adaptive=True, seeds=seeds))
    return rows


# -- a case --------------------------------------------------------------------------------------
def _ratios(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs[other] = t_other / t_row`` within the comparison pool of each row.

    Only ``ok`` rows: a row that missed its accuracy target (``target_not_reached``: the probe
    grid ran out, or the adaptive rule stopped short) is at no equal accuracy with anything, so
    it neither gets speed-ups nor serves in another row's.
    """
    timed = [r for r in rows if r["time_s"] is not None and r["status"] == "ok"]
    ref = next((r for r in timed if r["provider"] == "paper-reference"), None)
    for r in timed:
        if r["mode"] == "exact":
            pool = [o for o in timed if o["mode"] in ("exact", "equal_accuracy")]
        elif r["mode"] == "equal_probes":
            pool = [o for o in timed if o["mode"] in ("exact", "equal_probes")]
        else:
            pool = [o for o in timed if o["mode"] in ("exact", r["mode"], "equal_accuracy")]
        t = r["time_s"]["median"]
        r["speedup_vs"] = {
            f"{o['provider']}" + ("" if o["mode"] in ("exact", r["mode"]) else f"@{o['mode']}"):
            o["time_s"]["median"] / t
            for o in pool if o is not r and t > 0
        }
        if ref is not None and t > 0:
            r["speedup_vs_reference"] = ref["time_s"]["median"] / t


def measure_case(case: Case, providers: list[Provider], cfg: BenchConfig,
                 log: Log = _stderr_log) -> list[dict[str, Any]]:
    """Measure every provider on ``case``; returns the result rows (see :mod:`.schema`)."""
    rows: list[dict[str, Any]] = []
    calibrated: dict[str, tuple[int, float, list, bool]] = {}
    for p in providers:
        t0 = time.perf_counter()
        why = p.unavailable(case)
        if why is not None:
            row = _base_row(case, p)
            row.update(status="skipped", reason=why, mode="exact" if p.kind == "exact" else
                       "equal_accuracy")
            rows.append(row)
            log(f"    {p.name:<20s} skipped: {why}")
            continue
        try:
            p.setup(case)
            if p.kind == "exact":
                if (isinstance(p, PaperReference) and cfg.paper_rows is not None
                        and case.m > cfg.paper_rows):
                    new = [_measure_paper_rows(case, p, cfg, log)]
                else:
                    new = [_measure_exact(case, p, cfg, log)]
            else:
                new = _measure_randomized(case, p, cfg, calibrated)
        except ProviderUnavailable as err:
            row = _base_row(case, p)
            row.update(status="skipped", reason=str(err),
                       mode="exact" if p.kind == "exact" else "equal_accuracy")
            new = [row]
        except Exception as err:  # noqa: BLE001 - a failing provider must not stop the run
            row = _base_row(case, p)
            row.update(status="error", reason=f"{type(err).__name__}: {err}",
                       mode="exact" if p.kind == "exact" else "equal_accuracy")
            row["info"]["traceback"] = traceback.format_exc(limit=8)
            new = [row]
        rows.extend(new)
        for r in new:
            log("    " + _row_line(r) + f"  [{time.perf_counter() - t0:.1f} s]")
    _ratios(rows)
    return rows


def _fmt_err(e: float, target: float | None) -> str:
    """``e`` to 2 significant digits, more where that would round a miss of ``target`` onto it
    or below (0.0104 against 0.01 printed ``0.01``)."""
    for digits in range(2, 7):
        text = f"{e:.{digits}g}"
        if target is None or (float(text) > target) == (e > target):
            return text
    return repr(e)


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"


def _row_line(r: dict[str, Any]) -> str:
    mode = r["mode"] or ""
    if r["status"] in ("skipped", "error", "incorrect"):
        return f"{r['provider']:<20s} {mode:<14s} {r['status']}: {r['reason']}"
    acc = r["accuracy"] or {}
    err = acc.get("err95")
    k = r["num_probes"]
    return (f"{r['provider']:<20s} {mode:<14s} {_fmt_s(r['time_per_image_s'])}/img"
            f"{'' if k is None else f'  K={k}'}"
            f"{'' if err is None else '  err95=' + _fmt_err(err, acc.get('target'))}"
            f"{'' if r['compile_s'] is None else '  compile=' + _fmt_s(r['compile_s'])}"
            f"{'' if r['status'] == 'ok' else '  ' + r['status']}")


# -- sweep ---------------------------------------------------------------------------------------
def _sweep(cfg: BenchConfig, providers: list[Provider], device: torch.device,
           log: Log, cache_dir: str | Path | None) -> list[dict[str, Any]]:
    sw = cfg.sweep
    sizes = list(sw.sizes) + (list(sw.gpu_sizes) if device.type == "cuda" else [])
    axis_values = {
        "size": sorted({*sizes, sw.base_size}),
        "batch": sorted({*sw.batches, sw.base_batch}),
        "probes": sorted({*sw.probes, sw.base_probes}),
    }
    points: list[tuple[str, int, int, int]] = []
    points += [("size", s, sw.base_batch, sw.base_probes) for s in axis_values["size"]]
    points += [("batch", sw.base_size, b, sw.base_probes) for b in axis_values["batch"]]
    points += [("probes", sw.base_size, sw.base_batch, k) for k in axis_values["probes"]]
    chosen = select_providers(providers, sw.providers)
    done: dict[tuple, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    encoders: dict[int, nn.Module] = {}
    for axis, size, batch, k in points:
        enc_spec = replace(sw.encoder, size=size)
        spec = CaseSpec(sw.task, enc_spec, batch=batch, sigma=sw.sigma)
        d = enc_spec.channels * size * size
        if size not in encoders:
            encoders[size] = build_encoder(enc_spec, cfg.seed)
        case = make_case(spec, device=device, seed=cfg.seed, encoder=encoders[size],
                         with_exact=d <= sw.max_reference_d, cache_dir=cache_dir)
        for p in chosen:
            key = (size, batch, k, p.name)
            if key in done:
                rows.append(dict(done[key], axis=axis))
                continue
            row = {"axis": axis, "task": sw.task, "model": enc_spec.model,
                   "split": enc_spec.split, "stem": enc_spec.stem, "size": size, "batch": batch,
                   "num_probes": k if p.kind == "randomized" else None, "d": case.d,
                   "m": case.m, "provider": p.name, "status": "ok", "reason": None,
                   "time_s": None, "time_per_image_s": None, "compile_s": None,
                   "peak_memory_bytes": None, "accuracy": None}
            why = p.unavailable(case)
            if why is None and p.kind == "randomized" and k < p.min_probes:
                why = f"needs at least {p.min_probes} probes"
            if why is None:
                try:
                    p.setup(case)
                    call = lambda p=p, k=k, case=case: p.run(case, k, 0)  # noqa: E731
                    t_first, out = _timed_first(call, device)
                    if case.exact is not None:
                        row["accuracy"] = _accuracy(case, _err_stats(case, out.value), None,
                                                    "full")
                    t = time_call(call, device=device, warmup=cfg.warmup, repeats=cfg.repeats,
                                  min_repeats=cfg.min_repeats, max_seconds=cfg.max_seconds,
                                  first_call_s=t_first)
                    row["time_s"] = t.to_dict()
                    row["time_per_image_s"] = t.median / batch
                    if p.compiled:
                        row["compile_s"] = max(0.0, t_first - t.median)
                    row["peak_memory_bytes"] = _memory(cfg, call, device)
                except ProviderUnavailable as err:
                    why = str(err)
                except Exception as err:  # noqa: BLE001
                    row.update(status="error", reason=f"{type(err).__name__}: {err}")
            if why is not None:
                row.update(status="skipped", reason=why)
            done[key] = row
            rows.append(row)
            log(f"    sweep {axis:<6s} size={size:<4d} B={batch:<3d} K={k:<4d} {p.name:<18s} "
                + (f"{_fmt_s(row['time_per_image_s'])}/img" if row["status"] == "ok"
                   else f"{row['status']}: {row['reason']}"))
    return rows


# -- probe efficiency ----------------------------------------------------------------------------
def _products_for(prepared: Any, backend: str) -> Any:
    """The library's product object for ``backend`` (``fsinfo_fast.engine.make_products``: the
    one entry point the metrics use)."""
    from ..engine import make_products

    return make_products(prepared, backend)


def _efficiency(cfg: BenchConfig, device: torch.device, log: Log) -> list[dict[str, Any]]:
    from torch.func import jvp, vjp, vmap

    from ..encoder import prepare

    eff = cfg.efficiency
    spec = CaseSpec("fsinfo_diag", eff.encoder, batch=eff.batch)
    case = make_case(spec, device=device, seed=cfg.seed, with_exact=False)
    fn = case.flat_fn()
    b, d, m = case.batch, case.d, case.m
    xf = case.x.reshape(b, d)
    prepared = prepare(case.encoder, case.x)
    rows = []
    backends: list[tuple[str, Callable[[], Any] | None, str | None]] = [("torch.func", None, None)]
    for be in cfg.ours_backends:
        if device.type != "cuda" and be in ("triton", "cuda"):
            backends.append((f"ours-{be}", None, f"backend {be!r} needs a GPU"))
            continue
        try:
            backends.append((f"ours-{be}", _products_for(prepared, be), None))
        except BackendUnavailableError as err:  # not built here: skipped, with the reason
            backends.append((f"ours-{be}", None, f"{type(err).__name__}: {err}"))
        except Exception as err:  # noqa: BLE001 - recorded as an error row, never a skip
            backends.append((f"ours-{be}", err, f"{type(err).__name__}: {err}"))
    g = torch.Generator(device=device).manual_seed(0)
    for k in eff.probes:
        V = torch.randn(b, k, d, generator=g, device=device)
        U = torch.randn(b, k, m, generator=g, device=device)
        xk = xf.repeat_interleave(k, dim=0)

        @torch.no_grad()
        def fwd(xk: Tensor = xk) -> Tensor:
            return fn(xk)

        t_fwd = time_call(fwd, device=device, warmup=cfg.warmup + 1, repeats=cfg.repeats,
                          min_repeats=cfg.min_repeats, max_seconds=cfg.max_seconds)
        for name, prods, why in backends:
            row = {"backend": name, "num_probes": k, "batch": b, "model": eff.encoder.model,
                   "split": eff.encoder.split, "size": eff.encoder.size, "d": d, "m": m,
                   "forward_batch": b * k, "forward_s": t_fwd.median, "jvp_s": None,
                   "vjp_s": None, "jvp_efficiency": None, "vjp_efficiency": None,
                   "status": "ok", "reason": why}
            if name == "torch.func":
                _, pullback = vjp(fn, xf)
                Vt, Ut = V.transpose(0, 1), U.transpose(0, 1)

                @torch.no_grad()
                def do_jvp(Vt: Tensor = Vt) -> Tensor:
                    return vmap(lambda v: jvp(fn, (xf,), (v,))[1])(Vt)

                @torch.no_grad()
                def do_vjp(Ut: Tensor = Ut, pullback: Any = pullback) -> Tensor:
                    return vmap(lambda u: pullback(u)[0])(Ut)
            elif prods is None:
                row.update(status="skipped")
                rows.append(row)
                continue
            elif isinstance(prods, Exception):
                row.update(status="error")
                rows.append(row)
                continue
            else:
                do_jvp = lambda prods=prods, V=V: prods.jvp(V)  # noqa: E731
                do_vjp = lambda prods=prods, U=U: prods.vjp(U)  # noqa: E731
            for kind, call in (("jvp", do_jvp), ("vjp", do_vjp)):
                try:
                    t = time_call(call, device=device, warmup=cfg.warmup + 1,
                                  repeats=cfg.repeats, min_repeats=cfg.min_repeats,
                                  max_seconds=cfg.max_seconds)
                    row[f"{kind}_s"] = t.median
                    row[f"{kind}_efficiency"] = t.median / t_fwd.median
                except Exception as err:  # noqa: BLE001
                    row.update(status="error", reason=f"{kind}: {type(err).__name__}: {err}")
            rows.append(row)
            if row["status"] == "ok":
                log(f"    efficiency {name:<14s} K={k:<4d} fwd(B*K)={_fmt_s(t_fwd.median)}  "
                    f"jvp x{row['jvp_efficiency']:.2f}  vjp x{row['vjp_efficiency']:.2f}")
    return rows


# -- claims --------------------------------------------------------------------------------------
def _matches(row: dict[str, Any], c: Any) -> bool:
    return (row.get("task") == c.task and (c.model is None or row.get("model") == c.model)
            and (c.split is None or row.get("split") == c.split)
            and (c.size is None or row.get("size") == c.size))


def _pick(rows: list[dict[str, Any]], name: str, modes: tuple[str, ...],
          key: str) -> dict[str, Any] | None:
    def val(r: dict[str, Any]) -> float | None:
        if key == "memory":
            return r.get("peak_memory_bytes")
        return r["time_s"]["median"] if r.get("time_s") else None

    cands = [r for r in rows if r.get("status") in ("ok",) and r.get("mode", "exact") in modes
             and (r["provider"].startswith("ours-") if name == "ours-best"
                  else r["provider"] == name) and val(r) is not None]
    return min(cands, key=val) if cands else None


def _claims(cfg: BenchConfig, results: list[dict], sweep: list[dict]) -> list[dict[str, Any]]:
    out = []
    for c in cfg.claims:
        item = {"name": c.name, "task": c.task, "provider": c.provider, "baseline": c.baseline,
                "model": c.model, "split": c.split, "size": c.size, "mode": c.mode,
                "metric": c.metric, "min_ratio": c.min_ratio, "max_value": c.max_value,
                "value": None, "status": "unmeasured", "reason": None}
        rows = [r for r in results if _matches(r, c)]
        if c.metric == "time_per_image":
            # a sweep row runs at the sweep's fixed K: it serves only where the oracle checked it
            # and it met the target there (it was relabelled equal_accuracy at any K and error)
            swept = list({(r["size"], r["batch"], r.get("num_probes"), r["provider"]): r
                          for r in sweep if _matches(r, c) and r.get("status") == "ok"}.values())
            checked = [r for r in swept if (r.get("accuracy") or {}).get("meets_target")]
            srows = [dict(r, mode="exact" if r.get("num_probes") is None else c.mode)
                     for r in checked]
            best = _pick(rows + srows, c.provider, (c.mode, "exact"), "time")
            unchecked = [dict(r, mode="exact" if r.get("num_probes") is None else c.mode)
                         for r in swept if r.get("accuracy") is None]
            missed = [r for r in swept if (r.get("accuracy") or {}).get("meets_target") is False
                      and _pick([dict(r, mode=c.mode)], c.provider, (c.mode,), "time")]
            status = None
            if best is None and unchecked:
                best = _pick(unchecked, c.provider, (c.mode, "exact"), "time")
                if best is not None:
                    status = "unchecked"
                    max_d = (cfg.sweep.max_reference_d if cfg.sweep is not None else None)
                    item["reason"] = (
                        f"accuracy unchecked: d = {best['d']} is above the sweep's "
                        f"max_reference_d = {max_d} (no oracle), so K = {best['num_probes']} "
                        "is not known to reach the target")
            if best is None:
                if missed:
                    item["reason"] = (
                        "cannot be evaluated: no row met the target at a checked K ("
                        + "; ".join(f"sweep K = {r['num_probes']}: err95 "
                                    f"{r['accuracy']['err95']:.3g} > {r['accuracy']['target']:g}"
                                    for r in missed[:3]) + ")")
                else:
                    item["reason"] = ("no measured row matches (needs the sweep size on this "
                                      "device)")
            else:
                item["value"] = best["time_per_image_s"]
                item["provider_row"] = best["provider"]
                item["case"] = best.get("case") or (
                    f"sweep {best['task']}/{best['model']}@{best['size']}px/B{best['batch']}"
                    + ("" if best.get("num_probes") is None else f"/K{best['num_probes']}"))
                item["status"] = status or ("reported" if c.max_value is None else
                                            "pass" if item["value"] <= c.max_value else "fail")
            out.append(item)
            continue
        key = "memory" if c.metric == "memory" else "time"
        # provider and baseline from the same case (a ratio of per-call times of two cases,
        # e.g. batch 1 against batch 8, compares nothing); several matching cases: the worst
        per_case = []
        for case in dict.fromkeys(r["case"] for r in rows):
            crows = [r for r in rows if r["case"] == case]
            prov = _pick(crows, c.provider, (c.mode,), key)
            base = _pick(crows, c.baseline, ("exact", c.mode), key) if c.baseline else None
            if prov is not None and base is not None:
                per_case.append((case, prov, base))
        if not per_case:
            prov = _pick(rows, c.provider, (c.mode,), key)
            base = _pick(rows, c.baseline, ("exact", c.mode), key) if c.baseline else None
            if prov is not None and base is not None:
                item["reason"] = (f"no matching case measured both {c.provider} and "
                                  f"{c.baseline} ({c.provider} in {prov['case']}, {c.baseline} "
                                  f"in {base['case']})")
            else:
                missing = c.provider if prov is None else c.baseline
                why = [f"{r['provider']}: {r['status']} ({r['reason']})" for r in rows
                       if (r["provider"].startswith("ours-") if missing == "ours-best"
                           else r["provider"] == missing) and r["status"] != "ok"]
                item["reason"] = (f"{missing} not measured in a matching case"
                                  + (f": {'; '.join(why[:3])}" if why else ""))
        else:
            ratios = []
            for case, prov, base in per_case:
                if key == "memory":
                    a, b = base["peak_memory_bytes"], prov["peak_memory_bytes"]
                else:
                    a, b = base["time_s"]["median"], prov["time_s"]["median"]
                ratios.append((a / b if b else math.inf, case, prov))
            value, case, prov = min(ratios, key=lambda t: t[0])
            item["value"] = value
            item["provider_row"] = prov["provider"]
            item["case"] = case
            if len(ratios) > 1:
                item["cases"] = {cs: v for v, cs, _ in ratios}
            item["status"] = ("reported" if c.min_ratio is None else
                              "pass" if item["value"] >= c.min_ratio else "fail")
        out.append(item)
    return out


# -- the run -------------------------------------------------------------------------------------
def _sharing(cfg: BenchConfig, device: torch.device, log: Log) -> dict[str, Any]:
    """Shared route vs per-split route of ``fsinfo-fast profile`` on the same inputs/probes."""
    from ..data import natural_images
    from ..models import get_model
    from ..profile.shared import measure_sharing

    sh = cfg.sharing
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = get_model(sh.model, input_size=sh.size).eval().to(device)
    x, _ = natural_images(size=sh.size, n=sh.batch, seed=cfg.seed)
    res = measure_sharing(model, x.to(device), sh.splits, exact=sh.exact, repeats=sh.repeats)
    for key in ("forward", "exact_diag"):
        r = res.get(key)
        if isinstance(r, dict) and "speedup" in r:
            log(f"    {key:<12s} shared {_fmt_s(r['shared_s'])}  per split "
                f"{_fmt_s(r['per_split_s'])}  x{r['speedup']:.1f}  (max diff "
                f"{r.get('max_abs_diff', r.get('max_rel_diff')):.1e})")
    return {"model": sh.model, "size": sh.size, "batch": sh.batch, **res}


def run_bench(
    cfg: BenchConfig, *, providers: list[Provider] | None = None, log: Log = _stderr_log,
    cache_dir: str | Path | None = None, command: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` and return the results document.

    Args:
        cfg: what to measure.
        providers: the providers (default :func:`default_providers` from ``cfg``); tests add
            their own.
        log: progress sink (default: stderr).
        cache_dir: on-disk cache of exact values (``None``: memory only).
        command: the command line, stored in the results.

    Returns:
        The results dict (schema :data:`fsinfo_fast.bench.schema.SCHEMA_VERSION`).
    """
    before = torch.get_num_threads()
    try:
        return _run_bench(cfg, providers, log, cache_dir, command)
    finally:
        torch.set_num_threads(before)


def _run_bench(cfg: BenchConfig, providers: list[Provider] | None, log: Log,
               cache_dir: str | Path | None, command: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    threads = pin_threads(cfg.threads)
    env = environment(device, threads)
    if providers is None:
        providers = default_providers(compile=cfg.compile, ours_backends=cfg.ours_backends,
                                      lanczos_steps=cfg.lanczos_steps,
                                      memory_budget=cfg.memory_budget,
                                      cold_compile=cfg.cold_compile)
    log(f"fsinfo-fast bench '{cfg.name}': device {device}, {threads['torch_num_threads']} "
        f"thread(s), {len(cfg.cases)} case(s)")
    results: list[dict[str, Any]] = []
    cases_meta: list[dict[str, Any]] = []
    for i, spec in enumerate(cfg.cases):
        t0 = time.perf_counter()
        case = make_case(spec, device=device, seed=cfg.seed, cache_dir=cache_dir)
        log(f"[{i + 1}/{len(cfg.cases)}] {spec.case_id}: d={case.d} m={case.m}, exact value in "
            f"{case.exact_seconds:.1f} s")
        chosen = select_providers(providers, spec.providers)
        results += measure_case(case, chosen, cfg, log)
        cases_meta.append({"case": spec.case_id, "task": spec.task, "d": case.d, "m": case.m,
                           "batch": case.batch, "target": case.target,
                           "exact_value": [float(v) for v in case.exact],
                           "exact_seconds": case.exact_seconds,
                           "wall_s": time.perf_counter() - t0})
    sweep_rows: list[dict[str, Any]] = []
    if cfg.sweep is not None:
        log("scaling sweep")
        sweep_rows = _sweep(cfg, providers, device, log, cache_dir)
    eff_rows: list[dict[str, Any]] = []
    if cfg.efficiency is not None:
        log("probe efficiency")
        eff_rows = _efficiency(cfg, device, log)
    sharing: dict[str, Any] | None = None
    if cfg.sharing is not None:
        log("work shared across split points (profile)")
        sharing = _sharing(cfg, device, log)
    lin: dict[str, Any] | None = None
    if cfg.linearize is not None:
        from .linearize import measure_linearize

        log("both metrics per image: one Linearization vs version 0.1's two calls")
        lin = measure_linearize(cfg.linearize, device, log, seed=cfg.seed)
    craft: dict[str, Any] | None = None
    if cfg.craft is not None:
        from .craft import measure_craft

        log("CRAFT VGG16-BN: FSInfo_diag at every paper split, per route")
        craft = measure_craft(cfg.craft, device, log, seed=cfg.seed)
    claims = _claims(cfg, results, sweep_rows)
    for c in claims:
        v = c["value"]
        log(f"claim {c['status']:<10s} {c['name']}: "
            + ("-" if v is None else f"{v:.3g}") + (f" in {c['case']}" if c.get("case") else "")
            + (f" ({c['reason']})" if c["reason"] else ""))
    wall = time.perf_counter() - t_start
    log(f"done in {wall:.1f} s")
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": cfg.to_dict(),
        "environment": env,
        "providers": [p.describe() for p in providers],
        "cases": cases_meta,
        "results": results,
        "sweep": sweep_rows,
        "probe_efficiency": eff_rows,
        "sharing": sharing,
        "linearize": lin,
        "craft": craft,
        "claims": claims,
        "wall_time_s": wall,
    }
