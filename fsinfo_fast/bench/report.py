"""Reading results: the README's Markdown tables and the regression comparison.

:func:`markdown` turns a results document into Markdown (one table per case, plus claims and
probe efficiency) for the README. :func:`compare` matches the result and sweep rows of two results
documents and flags slow-downs beyond a tolerance *and* beyond the measured spread, peak-memory
growth beyond the tolerance, providers that stopped passing the correctness gate or their accuracy
target, and claims that stopped passing (probe efficiency and the sharing, linearize and craft
sections are not compared).
"""

from __future__ import annotations

from typing import Any

__all__ = ["markdown", "compare", "format_comparison", "Finding"]


def _t(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.3g} us"
    if v < 1:
        return f"{v * 1e3:.3g} ms"
    return f"{v:.3g} s"


def _mem(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if v >= f:
            return f"{v / f:.3g} {unit}"
    return f"{v} B"


def _x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}x" if v < 1000 else f"{v:,.0f}x"


def _err(acc: dict[str, Any] | None, mark_miss: bool = False) -> str:
    if not acc or acc.get("err95") is None:
        return "(rows checked)" if acc and acc.get("checked") == "rows" else "-"
    e, target = acc["err95"], acc.get("target")
    scale, units = (100, "%") if acc.get("units") == "relative" else (1, "")
    # 2 significant digits, more where they would round a miss onto the target (0.0104 read
    # 0.01 against a target of 0.01); a row meant to reach the target marks a miss
    for digits in range(2, 7):
        text = f"{e * scale:.{digits}g}"
        if target is None or (float(text) > target * scale) == (e > target):
            break
    missed = mark_miss and acc.get("meets_target") is False
    return text + units + (" (missed)" if missed else "")


def markdown(doc: dict[str, Any]) -> str:
    """Markdown tables of a results document (what the README shows)."""
    env = doc["environment"]
    hw, th, ver, git = env["hardware"], env["threads"], env["versions"], env["git"]
    dev = hw.get("gpu", {}) or {}
    device = dev.get("name") or f"{hw.get('cpu_model')} ({hw.get('logical_cores')} cores)"
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"Benchmark `{doc['config']['name']}` on {device}, {th['torch_num_threads']} thread(s), "
        f"torch {ver['torch']}, fsinfo_fast {ver['fsinfo_fast']}, commit {commit}, "
        f"{doc['created']}. Medians of repeats; speed-up = other provider's time / this time.",
        "",
    ]
    cases: dict[str, list[dict[str, Any]]] = {}
    for r in doc["results"]:
        cases.setdefault(r["case"], []).append(r)
    meta = {c["case"]: c for c in doc.get("cases", [])}
    for case, rows in cases.items():
        m = meta.get(case, {})
        target = m.get("target")
        rel = rows[0]["task"] == "dfil"
        tgt = ("-" if target is None else f"{target * 100:g}% relative" if rel
               else f"{target:g} nats/dim")
        lines += [f"**{case}** (d = {rows[0]['d']}, m = {rows[0]['m']}, target {tgt})", "",
                  "| provider | mode | probes | passes/img | time/img | vs paper-ref | "
                  "vs exact-best | error (95%) | peak mem | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        skipped: dict[str, list[str]] = {}
        for r in rows:
            if r["status"] == "skipped":
                if not str(r["reason"]).startswith("does not compute"):
                    skipped.setdefault(str(r["reason"]), []).append(r["provider"])
                continue
            note = ""
            if r["status"] != "ok":
                note = f"{r['status']}: {r['reason']}"
            elif r.get("extrapolated"):
                note = f"extrapolated from {r['extrapolated']['rows_timed']} rows"
            if r.get("compile_s") is not None:
                note = (note + "; " if note else "") + f"compile {_t(r['compile_s'])}"
            note = note.replace("|", "/")
            sv = r.get("speedup_vs") or {}
            err = _err(r.get("accuracy"), r["mode"] in ("equal_accuracy", "adaptive"))
            lines.append(
                f"| {r['provider']} | {r['mode']} | {r['num_probes'] or '-'} | "
                f"{r['passes'] if r['passes'] is not None else '-'} | "
                f"{_t(r['time_per_image_s'])} | {_x(sv.get('paper-reference'))} | "
                f"{_x(sv.get('exact-best'))} | {err} | "
                f"{_mem(r.get('peak_memory_bytes'))} | {note} |")
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{', '.join(names)} ({why})"
                                                 for why, names in skipped.items())]
        lines.append("")
    if not doc["results"]:
        lines += ["No result rows (no case was measured).", ""]
    if doc.get("claims"):
        lines += ["**Claims** (ratio = baseline / ours)", "",
                  "| claim | value | required | status |", "|---|---:|---:|---|"]
        for c in doc["claims"]:
            v = c["value"]
            if c["metric"] == "time_per_image":
                val, req = _t(v), "-" if c.get("max_value") is None else f"<= {c['max_value']}"
            else:
                val = _x(v)
                req = "-" if c.get("min_ratio") is None else f">= {c['min_ratio']:g}x"
            status = c["status"] + (f" ({c['reason']})" if c.get("reason") else "")
            lines.append(f"| {c['name']} | {val} | {req} | {status.replace('|', '/')} |")
        lines.append("")
    eff = doc.get("probe_efficiency") or []
    if eff:
        lines += ["**Probe efficiency** (time of K products / time of one forward at batch K; "
                  "floor about 1)", "",
                  "| backend | K | forward (batch K) | JVP | VJP | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for e in eff:
            j = "-" if e["jvp_efficiency"] is None else f"{e['jvp_efficiency']:.2f}"
            v = "-" if e["vjp_efficiency"] is None else f"{e['vjp_efficiency']:.2f}"
            note = "" if e["status"] == "ok" else f"{e['status']}: {e['reason']}"
            lines.append(f"| {e['backend']} | {e['num_probes']} | {_t(e['forward_s'])} | {j} | "
                         f"{v} | {note.replace('|', '/')} |")
        lines.append("")
    sh = doc.get("sharing")
    if sh:
        lines += [f"**Work shared across split points** ({sh['model']} at {sh['size']} px, "
                  f"{sh['batch']} samples, splits {sh.get('splits')}; one pass through the deepest "
                  "split vs every split on its own)", "",
                  "| what | shared | per split | speed-up | max diff (abs / rel) |",
                  "|---|---:|---:|---:|---:|"]
        for key in ("forward", "exact_diag"):
            r = sh.get(key)
            if isinstance(r, dict) and "speedup" in r:
                diff = r.get("max_abs_diff", r.get("max_rel_diff"))
                lines.append(f"| {key} | {_t(r['shared_s'])} | {_t(r['per_split_s'])} | "
                             f"{r['speedup']:.1f}x | {diff:.1e} |")
        lines.append("")
    lz = doc.get("linearize")
    if lz:
        lines += [f"**Both metrics per image** (FSInfo_diag at atol {lz['atol']}, dFIL at rtol "
                  f"{lz['rtol']}, sigma {lz['sigma']}): one `Linearization` vs version 0.1's two "
                  "public calls (its rule, the first round meeting the tolerance, emulated by one "
                  "fixed-count call per metric at that round's count: favours 0.1) vs a bare "
                  "`vmap(vjp)` with the same probes; the fixed-count floor: the probes a fixed "
                  "count would need by our stage-3 standard errors, and the bare `vmap(vjp)` "
                  "there", "",
                  "| encoder | image | linearization | probes (VJPs / dFIL) | 0.1 route | probes "
                  "(VJPs + JVPs) | speed-up | bare vmap(vjp) | fixed-count need (FSInfo / dFIL) "
                  "| bare there | agree |",
                  "|---|---:|---:|---|---:|---|---:|---:|---|---:|---|"]
        for e in lz["encoders"]:
            for r in e["images"]:
                need = (f"{r['fixed_count_need_fsinfo']:.0f} / {r['fixed_count_need_dfil']:.0f}"
                        if "fixed_count_need_fsinfo" in r else "-")
                there = _t(r["bare_at_fixed_need_s"]) if "bare_at_fixed_need_s" in r else "-"
                lines.append(
                    f"| {e['encoder']} | {r['image']} | {_t(r['linearization_s'])} | "
                    f"{r['fsinfo_probes']} / {r['dfil_probes']} {r['dfil_method']} | "
                    f"{_t(r['two_calls_v01_s'])} | {r['v01_fsinfo_probes']} + "
                    f"{r['v01_dfil_probes']} | {r['speedup_vs_v01']:.1f}x | "
                    f"{_t(r['bare_vmap_vjp_s'])} | {need} | {there} | "
                    f"{'yes' if r['agree_fsinfo'] and r['agree_dfil'] else 'NO'} |")
        lines.append("")
        lines += ["| encoder | `linearize()` on a new shape | on a second batch (cached) |",
                  "|---|---:|---:|"]
        for e in lz["encoders"]:
            lines.append(f"| {e['encoder']} | {_t(e['linearize_cold_s'])} | "
                         f"{_t(e['linearize_cached_s'])} |")
        lines.append("")
    lines += _craft_lines(doc.get("craft"))
    return "\n".join(lines)


def _num(v: Any, fmt: str) -> str:
    return "-" if not isinstance(v, (int, float)) else format(v, fmt)


def _craft_lines(cr: dict[str, Any] | None) -> list[str]:
    """The craft section's summary: one line per split and route (a run of only that section
    printed a header alone)."""
    if not cr or not cr.get("summary"):
        return []
    lines = [f"**CRAFT** ({cr.get('model')} at {cr.get('size')} px, {cr.get('images')} image(s), "
             f"FSInfo_diag at atol {cr.get('atol')}, sigma {cr.get('sigma')}; products per "
             "sample)", "",
             "| split (m) | route | estimator | s/sample | products | max abs error | covers | "
             "status |", "|---|---|---|---:|---:|---:|---|---|"]
    for ln in cr["summary"]:
        products = ln.get("passes", ln.get("products_per_sample"))
        covers = {True: "yes", False: "NO", None: "-"}.get(ln.get("covers"), "-")
        status = str(ln.get("status")) + (f" ({ln['reason']})" if ln.get("reason") else "")
        lines.append(f"| {ln.get('layer')} ({ln.get('m')}) | {ln.get('route')} | "
                     f"{str(ln.get('estimator', '-')).replace('|', '/')} | "
                     f"{_num(ln.get('seconds_per_sample'), '.3g')} | {_num(products, '.4g')} | "
                     f"{_num(ln.get('max_abs_err'), '.2g')} | {covers} | "
                     f"{status.replace('|', '/')} |")
    lines.append("")
    return lines


# -- regression comparison -----------------------------------------------------------------------
Finding = dict[str, Any]


def _key(r: dict[str, Any]) -> tuple:
    return (r["case"], r["provider"], r["mode"])


#: memory growth below this is not flagged (peak RSS moves by pages and allocator arenas)
MEMORY_FLOOR_BYTES = 1 << 20


def _sweep_key(r: dict[str, Any]) -> tuple:
    """A sweep measurement (the base point appears once per axis: the same measurement)."""
    return ("sweep", f"{r.get('task')}/{r.get('model')}-s{r.get('split')}"
            + (f"-{r['stem']}" if r.get("stem") else "") + f"@{r.get('size')}px",
            f"B{r.get('batch')}" + ("" if r.get("num_probes") is None
                                    else f"/K{r.get('num_probes')}"), r.get("provider"))


def _compare_rows(out: list[Finding], old_rows: dict[tuple, dict[str, Any]],
                  new_rows: dict[tuple, dict[str, Any]], tolerance: float) -> None:
    for k, o in old_rows.items():
        if k not in new_rows and o.get("status") != "skipped":
            out.append({"kind": "missing", "key": " / ".join(str(x) for x in k),
                        "old": o.get("status"), "new": None, "ratio": None, "regression": True,
                        "message": f"was {o.get('status')}, no such row in the new results"})
    for k, r in new_rows.items():
        o = old_rows.get(k)
        if o is None:
            continue
        key = " / ".join(str(x) for x in k)
        if o["status"] == "ok" and r["status"] != "ok":
            out.append({"kind": "status", "key": key, "old": o["status"], "new": r["status"],
                        "ratio": None, "regression": True,
                        "message": f"was ok, now {r['status']}: {r['reason']}"})
            continue
        if o["status"] != "ok" or r["status"] != "ok":
            continue
        to, tn = o.get("time_s"), r.get("time_s")
        if to and tn and to["median"] > 0:
            ratio = tn["median"] / to["median"]
            beyond_noise = tn["q25"] > to["q75"]
            if ratio > 1 + tolerance and beyond_noise:
                out.append({"kind": "time", "key": key, "old": to["median"],
                            "new": tn["median"], "ratio": ratio, "regression": True,
                            "message": f"{ratio:.2f}x slower ({_t(to['median'])} -> "
                                       f"{_t(tn['median'])} per call, the median of the "
                                       "repeats; the tables show time per image)"})
            elif ratio < 1 / (1 + tolerance) and tn["q75"] < to["q25"]:
                out.append({"kind": "time", "key": key, "old": to["median"],
                            "new": tn["median"], "ratio": ratio, "regression": False,
                            "message": f"{1 / ratio:.2f}x faster"})
        mo, mn = o.get("peak_memory_bytes"), r.get("peak_memory_bytes")
        if mo and mn is not None:
            ratio = mn / mo
            if ratio > 1 + tolerance and mn - mo > MEMORY_FLOOR_BYTES:
                out.append({"kind": "memory", "key": key, "old": mo, "new": mn, "ratio": ratio,
                            "regression": True,
                            "message": f"{ratio:.2f}x the peak memory ({_mem(mo)} -> "
                                       f"{_mem(mn)})"})
            elif ratio < 1 / (1 + tolerance) and mo - mn > MEMORY_FLOOR_BYTES:
                out.append({"kind": "memory", "key": key, "old": mo, "new": mn, "ratio": ratio,
                            "regression": False,
                            "message": f"{1 / ratio:.2f}x less peak memory"})
        ao, an = o.get("accuracy") or {}, r.get("accuracy") or {}
        if ao.get("meets_target") is True and an.get("meets_target") is False:
            out.append({"kind": "accuracy", "key": key, "old": ao.get("err95"),
                        "new": an.get("err95"), "ratio": None, "regression": True,
                        "message": f"misses its accuracy target now (err95 {an.get('err95'):.3g}"
                                   f" > {an.get('target')})"})


def compare(old: dict[str, Any], new: dict[str, Any], tolerance: float = 0.25) -> list[Finding]:
    """Rows of ``new`` that regressed against ``old``.

    Compared: the ``results`` rows (by case, provider and mode), the ``sweep`` rows (by task,
    encoder, size, batch, probe count and provider) and the claims. Not compared: probe
    efficiency and the ``sharing``, ``linearize`` and ``craft`` sections.

    A slow-down is flagged when ``new_median > (1 + tolerance) * old_median`` and the new lower
    quartile lies above the old upper quartile (outside the noise); a peak-memory growth when
    ``new > (1 + tolerance) * old`` and by more than :data:`MEMORY_FLOOR_BYTES`. Also flagged: a
    row that was ``ok`` and is not any more, an accuracy target met before and missed now, and a
    claim that passed and now fails or is no longer measured. Rows of ``old`` that ``new`` lacks
    (a provider, case, mode or sweep point that stopped running) and claims it lacks are flagged
    too (``kind = "missing"``; rows that were only ``skipped`` before are not). Each finding is
    ``{kind, key, old, new, ratio, message, regression}``; improvements are returned too with
    ``regression = False``.
    """
    out: list[Finding] = []
    _compare_rows(out, {_key(r): r for r in old.get("results", [])},
                  {_key(r): r for r in new.get("results", [])}, tolerance)
    old_sweep: dict[tuple, dict[str, Any]] = {}
    new_sweep: dict[tuple, dict[str, Any]] = {}
    for rows, into in ((old.get("sweep") or [], old_sweep), (new.get("sweep") or [], new_sweep)):
        for r in rows:
            into.setdefault(_sweep_key(r), r)
    _compare_rows(out, old_sweep, new_sweep, tolerance)
    new_claims = {c["name"]: c for c in new.get("claims", [])}
    for o in old.get("claims", []):
        if o.get("status") != "pass":
            continue
        c = new_claims.get(o["name"])
        if c is None:
            out.append({"kind": "missing", "key": o["name"], "old": o.get("value"), "new": None,
                        "ratio": None, "regression": True,
                        "message": "claim passed before, not in the new results"})
        elif c["status"] != "pass":
            why = f": {c['reason']}" if c.get("reason") else ""
            out.append({"kind": "claim", "key": o["name"], "old": o.get("value"),
                        "new": c.get("value"), "ratio": None, "regression": True,
                        "message": f"claim passed before, {c['status']} now{why}"})
    return out


def _env_note(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    notes = []
    for section, keys in (("hardware", ("cpu_model", "device", "logical_cores")),
                          ("threads", ("torch_num_threads",)), ("versions", ("torch",))):
        for k in keys:
            a = old.get("environment", {}).get(section, {}).get(k)
            b = new.get("environment", {}).get(section, {}).get(k)
            if a != b:
                notes.append(f"note: {section}.{k} differs ({a} -> {b}); times may not compare")
    return notes


def format_comparison(old: dict[str, Any], new: dict[str, Any], findings: list[Finding]) -> str:
    """Human-readable comparison report."""
    lines = _env_note(old, new)
    reg = [f for f in findings if f["regression"]]
    imp = [f for f in findings if not f["regression"]]
    for f in reg:
        lines.append(f"REGRESSION {f['kind']:<8s} {f['key']}: {f['message']}")
    for f in imp:
        lines.append(f"improved   {f['kind']:<8s} {f['key']}: {f['message']}")
    lines.append(f"{len(reg)} regression(s), {len(imp)} improvement(s)")
    return "\n".join(lines)
