"""The results file: its schema, a validator, and the JSON / CSV writers.

Top level (``SCHEMA_VERSION = "fsinfo_fast.bench/1"``)::

    schema            str    "fsinfo_fast.bench/1"
    created           str    ISO 8601 UTC time of the run
    command           str    the command line (or null)
    config            dict   the BenchConfig used (replayable with --config)
    environment       dict   hardware{cpu_model, logical_cores, physical_cores,
                             memory_total_bytes, device, gpu, load_average, ...},
                             threads{torch_num_threads, torch_num_interop_threads, requested, ...},
                             versions{python, torch, fsinfo_fast, numpy, triton, ...},
                             git{commit, branch, dirty}, memory_method
    providers         list   {name, kind, backend, compiled, description}
    cases             list   {case, task, d, m, batch, target, exact_value[B], exact_seconds}
    results           list   one row per (case, provider, mode), see RESULT_FIELDS
    sweep             list   one row per (axis, size, batch, num_probes, provider)
    probe_efficiency  list   one row per (backend, num_probes)
    sharing           dict   the split-sharing saving of profile (optional; see SharingSpec)
    linearize         dict   both metrics per image, one Linearization vs version 0.1's two calls
                             (optional; see LinearizeSpec)
    craft             dict   FSInfo_diag per paper split of the CRAFT VGG16-BN, per route, with
                             the oracle and curvlinops (optional; see fsinfo_fast.bench.craft)
    claims            list   {name, metric, provider, baseline, value, min_ratio, status, ...}
    wall_time_s       float

A result row's ``mode`` is ``"exact"`` (exact providers), ``"equal_accuracy"`` (randomized, at the
probe count that reaches the target), ``"equal_probes"`` (randomized, at ``equal_probes``) or
``"adaptive"`` (the library's own stopping rule). ``status`` is ``ok``, ``target_not_reached``
(an ``equal_accuracy`` row whose probe grid ran out, or an ``adaptive`` row whose pooled error
missed the target: timed, but no speed-ups and no claims), ``skipped``, ``incorrect`` (failed the
correctness gate; not timed) or ``error``. Times are in
seconds (``time_s`` holds median, quartiles, min, max, samples), memory in bytes, errors in the
task's units (``accuracy.units``). ``speedup_vs[name] = t(name) / t(this row)``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "RESULT_FIELDS",
    "STATUSES",
    "MODES",
    "validate",
    "write_json",
    "write_csv",
    "load_results",
    "output_paths",
]

SCHEMA_VERSION = "fsinfo_fast.bench/1"
STATUSES = ("ok", "target_not_reached", "skipped", "incorrect", "error")
MODES = ("exact", "equal_accuracy", "equal_probes", "adaptive")

#: Every result row has these keys (value types: see the module docstring).
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "case": (str,), "task": (str,), "model": (str,), "split": (int,), "size": (int,),
    "input_shape": (list,), "batch": (int,), "d": (int,), "m": (int,), "sigma": (float, int),
    "provider": (str,), "kind": (str,), "backend": (str,), "compiled": (bool,), "mode": (str,),
    "status": (str,), "reason": (str, type(None)), "num_probes": (int, type(None)),
    "passes": (int, type(None)), "time_s": (dict, type(None)),
    "time_per_image_s": (float, type(None)), "compile_s": (float, type(None)),
    "first_call_s": (float, type(None)), "extrapolated": (dict, type(None)),
    "accuracy": (dict, type(None)), "calibration": (list, type(None)),
    "correct": (bool, type(None)), "peak_memory_bytes": (int, type(None)),
    "speedup_vs": (dict,), "speedup_vs_reference": (float, type(None)), "info": (dict,),
}
_TOP: dict[str, tuple[type, ...]] = {
    "schema": (str,), "created": (str,), "command": (str, type(None)), "config": (dict,),
    "environment": (dict,), "providers": (list,), "cases": (list,), "results": (list,),
    "sweep": (list,), "probe_efficiency": (list,), "claims": (list,), "wall_time_s": (float,),
}
#: top-level keys added later (results written before them stay valid)
_TOP_OPTIONAL: dict[str, tuple[type, ...]] = {"sharing": (dict, type(None)),
                                               "linearize": (dict, type(None)),
                                               "craft": (dict, type(None))}
_TIME_KEYS = ("median", "q25", "q75", "min", "max", "repeats", "samples")
_ACC_KEYS = ("max_err", "rms_err", "err95", "target", "units", "meets_target", "checked")


def validate(doc: dict[str, Any]) -> list[str]:
    """Problems with a results document (empty when it follows the schema)."""
    errs: list[str] = []
    for key, types in _TOP.items():
        if key not in doc:
            errs.append(f"missing top-level key {key!r}")
        elif not isinstance(doc[key], types):
            errs.append(f"{key}: expected {types}, got {type(doc[key]).__name__}")
    for key, types in _TOP_OPTIONAL.items():
        if key in doc and not isinstance(doc[key], types):
            errs.append(f"{key}: expected {types}, got {type(doc[key]).__name__}")
    if errs:
        return errs
    if doc["schema"] != SCHEMA_VERSION:
        errs.append(f"schema is {doc['schema']!r}, expected {SCHEMA_VERSION!r}")
    env = doc["environment"]
    for key in ("hardware", "threads", "versions", "git", "memory_method"):
        if key not in env:
            errs.append(f"environment: missing {key!r}")
    if "torch_num_threads" not in env.get("threads", {}):
        errs.append("environment.threads: missing torch_num_threads")
    for key in ("torch", "fsinfo_fast", "python"):
        if key not in env.get("versions", {}):
            errs.append(f"environment.versions: missing {key!r}")
    for i, row in enumerate(doc["results"]):
        where = f"results[{i}] ({row.get('provider')}, {row.get('case')})"
        for key, types in RESULT_FIELDS.items():
            if key not in row:
                errs.append(f"{where}: missing {key!r}")
            elif not isinstance(row[key], types) or (
                isinstance(row[key], bool) and bool not in types
            ):
                errs.append(f"{where}: {key} expected {types}, got {type(row[key]).__name__}")
        if row.get("status") not in STATUSES:
            errs.append(f"{where}: status {row.get('status')!r} not in {STATUSES}")
        if row.get("mode") not in MODES:
            errs.append(f"{where}: mode {row.get('mode')!r} not in {MODES}")
        if row.get("status") in ("ok", "target_not_reached"):
            t = row.get("time_s") or {}
            missing = [k for k in _TIME_KEYS if k not in t]
            if missing:
                errs.append(f"{where}: time_s missing {missing}")
            elif not (t["median"] > 0 and math.isfinite(t["median"])):
                errs.append(f"{where}: median time {t['median']!r} is not positive")
            acc = row.get("accuracy") or {}
            if [k for k in _ACC_KEYS if k not in acc]:
                errs.append(f"{where}: accuracy missing {[k for k in _ACC_KEYS if k not in acc]}")
        if row.get("status") in ("skipped", "error", "incorrect") and not row.get("reason"):
            errs.append(f"{where}: status {row.get('status')} without a reason")
    for i, c in enumerate(doc["claims"]):
        for key in ("name", "status", "value", "metric"):
            if key not in c:
                errs.append(f"claims[{i}]: missing {key!r}")
    return errs


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings (JSON has no inf/nan)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _restore(obj: Any) -> Any:
    """Inverse of :func:`_clean`: the strings it wrote for non-finite floats become floats again
    (readers format numbers; ``f"{'inf':g}"`` raised)."""
    if isinstance(obj, str):
        return _NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def output_paths(out: str | Path, name: str) -> tuple[Path, Path, Path]:
    """``(json, csv, sweep_csv)`` paths for ``--out`` (a directory or a ``.json`` file)."""
    p = Path(out)
    if p.suffix != ".json":
        p = p / f"bench_{name}.json"
    return p, p.with_suffix(".csv"), p.with_name(p.stem + "_sweep.csv")


def write_json(doc: dict[str, Any], path: str | Path) -> Path:
    """Write the results document (pretty-printed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(doc), indent=1) + "\n")
    return p


_CSV_COLUMNS = [
    "case", "task", "model", "split", "size", "batch", "d", "m", "provider", "kind", "backend",
    "mode", "status", "num_probes", "passes", "median_s", "q25_s", "q75_s", "repeats",
    "time_per_image_s", "compile_s", "extrapolated", "max_err", "err95", "target", "units",
    "meets_target", "peak_memory_bytes", "speedup_vs_reference", "reason",
]
_SWEEP_COLUMNS = [
    "axis", "task", "model", "split", "size", "batch", "num_probes", "d", "m", "provider",
    "status", "median_s", "time_per_image_s", "compile_s", "max_err", "peak_memory_bytes",
    "reason",
]


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    t = row.get("time_s") or {}
    acc = row.get("accuracy") or {}
    return {
        **{k: row.get(k) for k in _CSV_COLUMNS if k in row},
        "median_s": t.get("median"), "q25_s": t.get("q25"), "q75_s": t.get("q75"),
        "repeats": t.get("repeats"), "extrapolated": bool(row.get("extrapolated")),
        "max_err": acc.get("max_err"), "err95": acc.get("err95"), "target": acc.get("target"),
        "units": acc.get("units"), "meets_target": acc.get("meets_target"),
    }


def write_csv(doc: dict[str, Any], path: str | Path,
              sweep_path: str | Path | None = None) -> list[Path]:
    """One CSV row per result row (and, if asked, one per sweep row); returns the files written.
    A part without rows writes no file (a run of only a craft section wrote a header alone)."""
    written: list[Path] = []
    if doc["results"]:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for row in doc["results"]:
                w.writerow(_flat(row))
        written.append(Path(path))
    if sweep_path is not None and doc.get("sweep"):
        with open(sweep_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_SWEEP_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for row in doc["sweep"]:
                w.writerow(_flat(row) | {"axis": row.get("axis")})
        written.append(Path(sweep_path))
    return written


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results JSON file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no results file at {p}")
    from ..errors import InvalidInputError

    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInputError(f"{p} is not a results file (not JSON: {err})") from None
    if not isinstance(doc, dict) or not {"environment", "results"} <= set(doc):
        raise InvalidInputError(
            f"{p} is not a results file of fsinfo-fast bench (no 'environment' and 'results'; "
            "a config file is run with --config)")
    return _restore(doc)
