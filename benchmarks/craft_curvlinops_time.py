"""Wall time at equal accuracy, side by side: curvlinops' XDiag vs ours on the CRAFT deep splits.

Reads the equal-accuracy counts of a ``craft_curvlinops`` run (``--results``, written by
``python -m fsinfo_fast.bench --config benchmarks/configs/craft_curvlinops.json``): XDiag's
smallest matvec count within atol for every seed, and our fixed-count estimators' (plain
probes; deflated rank and remainder probes, the cheapest rank). Then, in one process, one
thread, interleaved (``--repeats`` rounds, a different seed each round), it times per sample:

- ``xdiag``: ``curvlinops.xdiag`` at that count on the ``torch.func`` ``J^T J`` operator, with
  the plug-in log-sum (:func:`fsinfo_fast.bench.curvlinops_provider.curvlinops_fsinfo_diag`);
- ``auto``: ``ff.linearize(enc, x, seed=s).fsinfo(sigma, variant="diag", atol=atol)`` (stops on
  its own interval, no oracle; the route it took, ``info["diag_method"]``, and its products
  are recorded per seed);
- ``plain``/``deflated``: ``ff.linearize`` then the estimator at the fixed (oracle-informed) count.

It prints the median seconds ratios against XDiag only: the machine is shared and loaded, so
absolute seconds mean nothing; products are exact and come from the results file::

    PYTHONPATH=. nice -n 10 python benchmarks/craft_curvlinops_time.py \\
        --results benchmarks/results/bench_craft_curvlinops.json --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import fsinfo_fast as ff
from fsinfo_fast.bench.craft import load_model
from fsinfo_fast.bench.curvlinops_provider import curvlinops_fsinfo_diag
from fsinfo_fast.data import natural_images
from fsinfo_fast.estimators import estimate_diag
from fsinfo_fast.estimators.deflated import estimate_diag_deflated


def _counts(rec: dict) -> dict:
    """XDiag's matvecs and our fixed counts at equal accuracy (None where not reached)."""
    xd = next((c for c in rec["curvlinops"] if c["method"] == "xdiag" and c["reached"]), None)
    plain = next((c for c in rec["fixed"] if c["method"] == "plain" and c["reached"]), None)
    defl = [c for c in rec["fixed"] if c["method"] == "deflated" and c["reached"]]
    best = min(defl, key=lambda c: c["passes"]) if defl else None
    return {"xdiag": xd and xd["num_matvecs"], "plain": plain and plain["count"],
            "deflated": best and (best["rank"], best["count"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="benchmarks/results/bench_craft_curvlinops.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/craft_curvlinops_time.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    doc = json.loads(Path(args.results).read_text())["craft"]
    sigma, atol = doc["sigma"], doc["atol"]
    model = load_model(doc["model"])
    x, _ = natural_images(size=doc["size"], n=1, seed=0)
    report = {"results": args.results, "repeats": args.repeats, "threads": 1,
              "note": "median seconds per sample relative to XDiag at its equal-accuracy "
                      "count, one process, interleaved, on a shared loaded machine",
              "splits": []}
    for rec in doc["splits"]:
        enc = ff.split(model, rec["split"]).eval()
        n = _counts(rec)
        if n["xdiag"] is None:
            print(f"{rec['layer']}: XDiag did not reach atol; nothing to compare")
            continue

        def run_xdiag(s, enc=enc, n=n):
            curvlinops_fsinfo_diag(enc, x, sigma, method="xdiag", num_matvecs=n["xdiag"], seed=s)

        auto_routes: list[tuple[int, str, int]] = []

        def run_auto(s, enc=enc, routes=auto_routes):
            r = ff.linearize(enc, x, seed=s).fsinfo(sigma, variant="diag", atol=atol)
            routes.append((s, str(r.info.get("diag_method")), int(r.passes)))

        def run_plain(s, enc=enc, n=n):
            P = ff.linearize(enc, x, seed=s).products
            estimate_diag(P, sigma=sigma, seed=s, num_probes=n["plain"])

        def run_deflated(s, enc=enc, n=n):
            P = ff.linearize(enc, x, seed=s).products
            r, k = n["deflated"]
            estimate_diag_deflated(P, sigma=sigma, seed=s, rank=r, num_probes=k)

        runs = {"xdiag": run_xdiag, "auto": run_auto}
        if n["plain"] is not None:
            runs["plain"] = run_plain
        if n["deflated"] is not None:
            runs["deflated"] = run_deflated
        for f in runs.values():  # warm-up (imports, allocator, first-call overheads)
            f(100)
        auto_routes.clear()  # record the timed runs only
        secs: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.repeats):
            for name, f in runs.items():
                t0 = time.perf_counter()
                f(rep)
                secs[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in secs.items()}
        ratios = {k: med["xdiag"] / v for k, v in med.items() if k != "xdiag"}
        row = {"split": rec["split"], "layer": rec["layer"], "counts": n,
               "xdiag_time_over": ratios,
               "auto_runs": [{"seed": s, "diag_method": m, "products": p}
                             for s, m, p in auto_routes]}
        report["splits"].append(row)
        print(f"{rec['layer']}: XDiag {n['xdiag']} matvecs ({2 * n['xdiag']} products); "
              + ", ".join(f"time XDiag / {k} = {v:.2f}x" for k, v in ratios.items()),
              flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
