r"""FSInfo_diag at every paper split of a real pretrained network: the CRAFT VGG16-BN rows.

The splits a user is looking for, the deep ones where leakage finally drops, are where the
randomized estimator is slowest (issue "Deep splits in seconds"). This section measures, for
every split of :class:`CraftSpec` (default: the paper splits pool1 .. pool4 and conv5_2 of
:func:`fsinfo_fast.profile.examples.vgg16bn_craft`, the pretrained backbone of EasyOCR's CRAFT
text detector) on real 32x32 photograph crops (:func:`fsinfo_fast.data.natural_images`), one
image at a time:

``oracle``
    the float64 oracle (:func:`fsinfo_fast.reference.exact_fisher`): the reference value, timed.
``route <estimator>``
    ``ff.linearize(encoder, x).fsinfo(sigma, atol=atol, estimator=<estimator>)`` for every
    estimator in ``CraftSpec.routes`` (``"auto"``, ``"randomized"``, ``"exact-fast"``; a new
    estimator such as a deflated one is one more name there): seconds per sample (the whole
    call, validation included), Jacobian products per sample (with the randomized probes
    ``auto`` spent before it switched to an exact route), the route taken (``estimator``
    and ``info["auto"]``), the value against the oracle and whether the 95% interval covers it.
``curvlinops-<method>``
    curvlinops' Hutchinson and XDiag diagonals of a ``torch.func`` ``J^T J`` operator
    (:mod:`.curvlinops_provider`), plug-in log-sum: the products needed until the error against
    the oracle is within ``atol`` for every image and seed (an oracle-informed stopping point:
    curvlinops gives no interval to stop on), with the error curve; with
    ``curvlinops_bisect`` the grid is refined by bisection (:func:`search_count`).
``fixed-<estimator>``
    ours at a fixed count found the same oracle-informed way (``CraftSpec.fixed``: the plain
    estimator's probes, the deflated estimator's remainder probes per rank): the like-for-like
    comparison with curvlinops. The ``route`` rows run over ``route_seeds`` seeds.
``batch-<mode>``
    a batch of ``batch_images`` crops through one ``ff.linearize`` (FSInfo_diag at ``atol``,
    then dFIL at ``batch_rtol``, the profile's calls), with the rounds after some samples
    stopped on the whole batch (``never``) or on the samples still running (``auto``, the
    default; ``estimators.base.ROW_SUBSETS``), the modes alternated ``batch_repeats`` times:
    seconds and the products each sample computed, whether every mode drew the same probe
    counts and took the same routes (``same``) and the largest relative difference of the
    values and half-widths (``max_rel_diff``: a sample's probes are its own; the products of
    a sub-batch may round differently, an error row above 1e-5 at the same counts).

Timings are single calls on whatever machine runs it: the results record the load; compare
routes within one run, not across machines.
"""

from __future__ import annotations

import importlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from ..result import Z95

__all__ = ["CraftSpec", "craft_problems", "measure_craft", "load_model", "search_count"]


@dataclass
class CraftSpec:
    """What the CRAFT section measures.

    Attributes:
        model: ``"package.module:function"`` building the model (with ``split_points``,
            ``layer_names`` and ``paper_splits``).
        splits: indices into ``model.split_points`` (``None``: ``model.paper_splits``).
        size: input side in pixels; images: real crops, measured one at a time.
        sigma, atol: the request (FSInfo_diag to ``atol`` nats/dim at noise ``sigma``).
        routes: ``estimator=`` values of :meth:`fsinfo_fast.Linearization.fsinfo`.
        backend: library backend; max_probes: the randomized routes' probe cap (``None``, the
            default: the library's, ``min(m, d)`` for ``auto`` and 1000 for ``randomized``).
        curvlinops: curvlinops methods (``"hutchinson"``, ``"xdiag"``; empty: none).
        curvlinops_grid: matvec counts tried, smallest first (those ``>= d`` are dropped).
        curvlinops_seeds: seeds per matvec count; curvlinops_images: images it is run on.
        curvlinops_splits: the splits (indices into ``split_points``) curvlinops runs on
            (``None``: every measured split; its search costs up to ``2 * sum(grid) * seeds``
            products per image, so the default is the two deep splits of the issue).
        curvlinops_bisect: the equal-accuracy search (:func:`search_count`): after the first
            grid count where every seed is within ``atol``, bisect down to the previous
            (failing) grid count for the smallest passing one; a count stops at its first
            failing seed. ``False``: the grid alone, every seed at every count.
        bisect_rtol: stop bisecting once the bracket is within ``bisect_rtol * count`` (``0``:
            down to one step, 2 matvecs for XDiag, 1 otherwise).
        route_seeds: seeds per route row (``seed, seed + 1, ...``): the rows' products spread
            and how often the interval covers the oracle.
        fixed: our estimators at a fixed count, searched like curvlinops (oracle-informed,
            ``curvlinops_seeds`` seeds, on the curvlinops splits): ``"plain"``
            (:func:`~fsinfo_fast.estimators.estimate_diag`, ``num_probes`` over
            ``fixed_grid``) and ``"deflated"``
            (:func:`~fsinfo_fast.estimators.deflated.estimate_diag_deflated`, for each rank of
            ``deflated_ranks`` the remainder probes over ``deflated_grid``; products ``2 r +
            K``). The like-for-like comparison with curvlinops, which has no interval to stop on.
        batch_rows: ``ROW_SUBSETS`` modes of the batch rows (``"never"``, ``"auto"``,
            ``"always"``; empty: no batch rows); batch_images: crops in the batch;
            batch_repeats: runs per mode, alternated; batch_rtol: dFIL's tolerance there;
            batch_estimator: both calls' ``estimator=``.
    """

    model: str = "fsinfo_fast.profile.examples:vgg16bn_craft"
    splits: list[int] | None = None
    size: int = 32
    images: int = 1
    sigma: float = 0.1
    atol: float = 0.01
    routes: list[str] = field(default_factory=lambda: ["auto", "randomized", "exact-fast"])
    backend: str = "auto"
    max_probes: int | None = None
    curvlinops: list[str] = field(default_factory=lambda: ["hutchinson", "xdiag"])
    curvlinops_grid: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    curvlinops_seeds: int = 2
    curvlinops_images: int = 1
    curvlinops_splits: list[int] | None = field(default_factory=lambda: [13, 15])
    curvlinops_bisect: bool = False
    bisect_rtol: float = 0.0
    route_seeds: int = 1
    fixed: list[str] = field(default_factory=list)
    fixed_grid: list[int] = field(default_factory=lambda: [16, 64, 256, 1024, 4096])
    deflated_ranks: list[int] = field(default_factory=lambda: [16, 32, 64])
    deflated_grid: list[int] = field(default_factory=lambda: [8, 32, 128, 512])
    batch_rows: list[str] = field(default_factory=list)
    batch_images: int = 8
    batch_repeats: int = 2
    batch_rtol: float = 0.01
    batch_estimator: str = "auto"


def load_model(spec: str) -> torch.nn.Module:
    """Build ``"package.module:function"`` (a zero-argument builder) in eval mode."""
    if ":" not in spec:
        raise InvalidInputError(f"model must be 'package.module:function', got {spec!r}")
    mod, fn = spec.split(":", 1)
    return getattr(importlib.import_module(mod), fn)().eval()


def _now() -> float:
    return time.perf_counter()


def _route_row(encoder, xi, i: int, route: str, spec: CraftSpec, oracle: float,
               seed: int) -> dict[str, Any]:
    import fsinfo_fast as ff

    row: dict[str, Any] = {"image": i, "route": route, "status": "ok", "reason": None}
    t0 = _now()
    try:
        lin = ff.linearize(encoder, xi, backend=spec.backend, seed=seed,
                           sample_ids=torch.tensor([i], device=xi.device))
        r = lin.fsinfo(spec.sigma, atol=spec.atol, estimator=route, max_probes=spec.max_probes)
    except Exception as err:  # noqa: BLE001 - a failing route is an error row, never a skip
        row.update(status="error", reason=f"{type(err).__name__}: {err}",
                   seconds=_now() - t0)
        return row
    sec = _now() - t0
    lo, hi = (float(v[0]) for v in r.ci95())
    value = float(r.value[0])
    row.update(
        seconds=sec, estimator=r.estimator, auto=r.info.get("auto"), backend=r.info.get("backend"),
        passes=int(r.passes) + int(r.info.get("auto_randomized_passes", 0)),
        num_probes=r.num_probes, converged=bool(r.converged[0]),
        value=value, ci_halfwidth=float(r.ci_halfwidth[0]), bound=bool(r.bound[0]),
        oracle=oracle, error=value - oracle, covers=bool(lo <= oracle <= hi),
        through_oracle=r.estimator == "exact")
    return row


def search_count(evaluate: Callable[[int, int], tuple[int, int, list[float], float,
                                                     dict[str, float]]],
                 grid: list[int], seeds: list[int], atol: float, *, bisect: bool = True,
                 step: int = 1, rtol: float = 0.0) -> dict[str, Any]:
    """The smallest count whose error is within ``atol`` for every seed (and image).

    ``evaluate(count, seed)`` returns ``(count_used, products_per_sample, abs_errors,
    seconds_per_sample, extras)`` (``count_used``: the count after the method's rounding;
    ``abs_errors``: one per image; ``extras``: numbers recorded per point as their maximum over
    seeds). The grid is tried smallest first until every seed passes at a count; with ``bisect``
    the bracket between the previous (failing) grid count and that one is then halved, in
    multiples of ``step``, until it is one step wide or within ``rtol * count`` (this assumes
    the error falls with the count: it reports the smallest passing count it saw). With
    ``bisect`` a count stops at its first failing seed (its ``max_abs_err`` is then over the
    seeds run, ``seeds_run``); without it every seed runs at every grid count.

    Returns ``{"reached", "count", "passes", "seconds_per_sample", "max_abs_err", "bracket",
    "curve", "reason"}``: ``count``/``passes`` the smallest passing count and its products per
    sample (not reached: the largest tried), ``bracket`` ``[largest failing below, count]``
    (``None`` below the grid's smallest), ``curve`` every evaluated count in the order run.
    """
    curve: list[dict[str, Any]] = []

    def point(k: int) -> dict[str, Any]:
        errs: list[float] = []
        secs: list[float] = []
        extras: dict[str, float] = {}
        used = passes = k
        run = 0
        for s in seeds:
            used, passes, e, sec, ex = evaluate(k, s)
            run += 1
            errs += [float(v) for v in e]
            secs.append(float(sec))
            for key, v in ex.items():
                extras[key] = max(extras.get(key, -math.inf), float(v))
            if bisect and max(float(v) for v in e) > atol:
                break
        et = torch.tensor(errs, dtype=torch.float64)
        pt = {"count": int(used), "passes": int(passes), "max_abs_err": float(et.max()),
              "err95": float(Z95 * torch.sqrt((et**2).mean())),
              "seconds_per_sample": sum(secs) / len(secs), "seeds_run": run,
              "passed": bool(run == len(seeds) and float(et.max()) <= atol), **extras}
        curve.append(pt)
        return pt

    out: dict[str, Any] = {"reached": False, "count": None, "passes": None,
                           "seconds_per_sample": None, "max_abs_err": None, "bracket": None,
                           "curve": curve, "reason": None}
    lo: dict[str, Any] | None = None
    hi: dict[str, Any] | None = None
    for k in sorted(grid):
        pt = point(k)
        if pt["passed"]:
            hi = pt
            break
        lo = pt
    if hi is None:
        last = curve[-1]
        out.update(count=last["count"], passes=last["passes"],
                   seconds_per_sample=last["seconds_per_sample"],
                   max_abs_err=last["max_abs_err"],
                   reason=f"not reached at {last['passes']} products ({last['count']}): max "
                          f"error {last['max_abs_err']:.3g} > atol {atol}")
        return out
    while bisect and lo is not None:
        gap = hi["count"] - lo["count"]
        if gap <= step or gap <= rtol * hi["count"]:
            break
        mid = (lo["count"] + gap // 2) // step * step
        if mid <= lo["count"] or mid >= hi["count"]:
            break
        pt = point(mid)
        if pt["count"] >= hi["count"]:  # the method rounded it up to the passing count
            break
        if pt["passed"]:
            hi = pt
        else:
            lo = pt
    out.update(reached=True, count=hi["count"], passes=hi["passes"],
               seconds_per_sample=hi["seconds_per_sample"], max_abs_err=hi["max_abs_err"],
               bracket=[lo["count"] if lo is not None else None, hi["count"]])
    return out


def _curvlinops(encoder, x, oracle: torch.Tensor, method: str, d: int,
                spec: CraftSpec) -> dict[str, Any]:
    """The smallest matvec count whose error is within ``atol`` for every image and seed."""
    from .curvlinops_provider import curvlinops_fsinfo_diag

    out: dict[str, Any] = {"method": method, "status": "ok", "reason": None, "curve": [],
                           "reached": False, "num_matvecs": None, "passes": None,
                           "seconds_per_sample": None, "interval": None, "bracket": None}
    n_img = min(spec.curvlinops_images, x.shape[0])
    grid = [k for k in spec.curvlinops_grid if k < d] or [d - 1]

    def evaluate(k: int, s: int):
        t0 = _now()
        v, used, negative = curvlinops_fsinfo_diag(
            encoder, x[:n_img], spec.sigma, method=method, num_matvecs=k, seed=s)
        sec = (_now() - t0) / n_img
        return (used, 2 * used, (v.cpu() - oracle[:n_img]).abs().tolist(), sec,
                {"negative_diag_fraction": negative})

    try:
        res = search_count(evaluate, grid, list(range(spec.curvlinops_seeds)), spec.atol,
                           bisect=spec.curvlinops_bisect, rtol=spec.bisect_rtol,
                           step=2 if method == "xdiag" else 1)
    except Exception as err:  # noqa: BLE001 - curvlinops missing or failing: an error row
        out.update(status="error", reason=f"{type(err).__name__}: {err}")
        return out
    out.update(curve=[dict(p, num_matvecs=p["count"]) for p in res["curve"]],
               reached=res["reached"], num_matvecs=res["count"], passes=res["passes"],
               seconds_per_sample=res["seconds_per_sample"], bracket=res["bracket"],
               max_abs_err=res["max_abs_err"])
    if not res["reached"]:
        out.update(status="target_not_reached",
                   reason=f"max error {res['max_abs_err']:.3g} > atol {spec.atol} at "
                          f"{res['count']} matvecs (the grid's largest below d)")
    return out


def _fixed(encoder, x, oracle: torch.Tensor, method: str, spec: CraftSpec,
           rank: int | None = None) -> dict[str, Any]:
    """Our estimator at a fixed count, searched like :func:`_curvlinops` (oracle-informed)."""
    import fsinfo_fast as ff

    from ..estimators import estimate_diag
    from ..estimators.deflated import estimate_diag_deflated

    out: dict[str, Any] = {"method": method, "rank": rank, "status": "ok", "reason": None,
                           "curve": [], "reached": False, "count": None, "passes": None,
                           "seconds_per_sample": None, "bracket": None}
    n_img = min(spec.curvlinops_images, x.shape[0])

    def evaluate(k: int, s: int):
        errs, secs, hws, passes = [], [], [], 0
        for i in range(n_img):
            t0 = _now()
            ids = torch.tensor([i], device=x.device)
            lin = ff.linearize(encoder, x[i : i + 1], backend=spec.backend, seed=s,
                               sample_ids=ids)
            if method == "plain":
                r = estimate_diag(lin.products, sigma=spec.sigma, seed=s, num_probes=k,
                                  sample_ids=ids).fsinfo_diag
            else:
                r = estimate_diag_deflated(lin.products, sigma=spec.sigma, seed=s, rank=rank,
                                           num_probes=k, sample_ids=ids).fsinfo_diag
            secs.append(_now() - t0)
            errs.append(abs(float(r.value[0]) - float(oracle[i])))
            hws.append(float(r.ci_halfwidth[0]))
            passes = max(passes, int(r.passes))
        return k, passes, errs, sum(secs) / n_img, {"ci_halfwidth": max(hws)}

    grid = spec.fixed_grid if method == "plain" else spec.deflated_grid
    try:
        res = search_count(evaluate, list(grid), list(range(spec.curvlinops_seeds)), spec.atol,
                           bisect=spec.curvlinops_bisect, rtol=spec.bisect_rtol)
    except Exception as err:  # noqa: BLE001 - a failing estimator is an error row
        out.update(status="error", reason=f"{type(err).__name__}: {err}")
        return out
    out.update(res)
    if not res["reached"]:
        out["status"] = "target_not_reached"
    return out


def _batch_rows(encoder, x, spec: CraftSpec, seed: int) -> dict[str, Any]:
    """The ``batch-<mode>`` rows of one split: the modes alternated ``batch_repeats`` times on
    the same batch and seed."""
    import fsinfo_fast as ff

    from ..estimators import base

    out: dict[str, Any] = {"images": int(x.shape[0]), "modes": {}, "same": True,
                           "status": "ok", "reason": None}
    first: dict[str, Any] | None = None
    keep = base.ROW_SUBSETS
    try:
        for _, mode in itertools.product(range(spec.batch_repeats), spec.batch_rows):
            base.ROW_SUBSETS = mode
            t0 = _now()
            lin = ff.linearize(encoder, x, backend=spec.backend, seed=seed)
            fs = lin.fsinfo(spec.sigma, variant="diag", atol=spec.atol,
                            estimator=spec.batch_estimator)
            df = lin.dfil(spec.sigma, rtol=spec.batch_rtol, estimator=spec.batch_estimator)
            sec = _now() - t0
            rows = out["modes"].setdefault(mode, {"seconds": [], "products": None})
            rows["seconds"].append(sec)
            # the products each estimate computed per sample, and the whole-batch products
            # of dFIL's auto prediction
            spent = sum(int(r.info.get("computed_per_sample", torch.zeros(1)).sum())
                        + int(r.info.get("auto_prediction_passes", 0)) * int(x.shape[0])
                        for r in (fs, df))
            got = {"fsinfo_diag": fs.value.tolist(), "fsinfo_hw": fs.ci_halfwidth.tolist(),
                   "dfil": df.value.tolist(), "dfil_hw": df.ci_halfwidth.tolist(),
                   "probes": [None if r.probes_per_sample is None else
                              r.probes_per_sample.tolist() for r in (fs, df)],
                   "routes": [fs.info.get("method"), df.info.get("method")]}
            rows.update(products_recorded=spent, **{k: got[k] for k in ("probes", "routes")})
            if first is None:
                first = got
                continue
            if (got["probes"], got["routes"]) != (first["probes"], first["routes"]):
                out["same"] = False
            for key in ("fsinfo_diag", "fsinfo_hw", "dfil", "dfil_hw"):
                for a, b in zip(got[key], first[key], strict=True):
                    rel = abs(a - b) / max(abs(b), 1e-300)
                    out["max_rel_diff"] = max(out.get("max_rel_diff", 0.0), rel)
    except Exception as err:  # noqa: BLE001 - a failing mode is an error row
        out.update(status="error", reason=f"{type(err).__name__}: {err}")
    finally:
        base.ROW_SUBSETS = keep
    # the same probes everywhere; the products of a sub-batch may round differently from the
    # whole batch's (float32 kernels), far below 1e-5 relative in a float64 accumulation
    if out["status"] == "ok" and out["same"] and out.get("max_rel_diff", 0.0) > _BATCH_RTOL:
        out.update(status="error", reason=f"the modes' values differ by "
                                          f"{out['max_rel_diff']:.2g} relative at the same "
                                          "probe counts")
    return out


#: The batch rows' modes must agree to this relative difference where they drew the same probe
#: counts (the rounding of float32 products; a different count is recorded, ``same: false``).
_BATCH_RTOL = 1e-5


def _search_line(name: str, c: dict[str, Any]) -> str:
    """The progress line of one equal-accuracy search (curvlinops or ours at a fixed count)."""
    return (f"    {name}: {c['status']}, {c['passes']} products"
            + (f", {c['seconds_per_sample']:.2f} s/sample" if c["seconds_per_sample"] else "")
            + (f" ({c['reason']})" if c["reason"] else ""))


def measure_craft(spec: CraftSpec, device: torch.device, log, *, seed: int = 0) -> dict[str, Any]:
    """Run the section; returns ``{"splits": [...], "summary": [...], ...}`` (JSON-able)."""
    import fsinfo_fast as ff

    from .. import reference
    from ..data import natural_images

    model = load_model(spec.model).to(device)
    points = list(model.split_points)
    names = list(getattr(model, "layer_names", points))
    idx = list(spec.splits) if spec.splits is not None else list(model.paper_splits)
    x, _ = natural_images(size=spec.size, n=spec.images, seed=seed)
    x = x.to(device)
    xb = None
    if spec.batch_rows:
        xb = natural_images(size=spec.size, n=spec.batch_images, seed=seed)[0].to(device)
    out: dict[str, Any] = {"model": spec.model, "size": spec.size, "images": spec.images,
                           "sigma": spec.sigma, "atol": spec.atol, "routes": list(spec.routes),
                           "splits": [], "summary": []}
    for k in idx:
        enc = ff.split(model, k).eval()
        with torch.no_grad():
            m = int(enc(x[:1]).numel())
        d = int(x[0].numel())
        rec: dict[str, Any] = {"split": k, "layer": names[k], "module": points[k], "d": d,
                               "m": m, "oracle": [], "rows": [], "curvlinops": []}
        oracle = []
        need_oracle = bool(spec.routes or spec.curvlinops or spec.fixed)
        for i in range(spec.images if need_oracle else 0):
            t0 = _now()
            ex = reference.exact_fisher(enc, x[i : i + 1], spectrum=False)
            val = float(ex.fsinfo(spec.sigma).value[0])
            rec["oracle"].append({"image": i, "value": val, "seconds": _now() - t0,
                                  "passes": min(m, d)})
            oracle.append(val)
        log(f"  {names[k]} (split {k}): d={d} m={m}" + (
            f", oracle {sum(o['seconds'] for o in rec['oracle']) / spec.images:.1f} s/sample"
            if need_oracle else ""))
        for route in spec.routes:
            for i, sd in itertools.product(range(spec.images),
                                           range(seed, seed + spec.route_seeds)):
                row = _route_row(enc, x[i : i + 1], i, route, spec, oracle[i], sd)
                row["seed"] = sd
                rec["rows"].append(row)
                if row["status"] == "ok":
                    log(f"    {route:<11s} image {i} seed {sd}: {row['seconds']:.2f} s, "
                        f"{row['passes']} products, {row['estimator']}, err "
                        f"{row['error']:+.1e} (hw {row['ci_halfwidth']:.1e}) "
                        f"covers={row['covers']}")
                else:
                    log(f"    {route:<11s} image {i} seed {sd}: ERROR {row['reason']}")
        ot = torch.tensor(oracle, dtype=torch.float64)
        methods = spec.curvlinops if (spec.curvlinops_splits is None
                                      or k in spec.curvlinops_splits) else []
        for method in methods:
            c = _curvlinops(enc, x, ot, method, d, spec)
            rec["curvlinops"].append(c)
            log(_search_line(f"curvlinops-{method}", c))
        rec["fixed"] = []
        for method in (spec.fixed if spec.curvlinops_splits is None
                       or k in spec.curvlinops_splits else []):
            for rank in (spec.deflated_ranks if method == "deflated" else [None]):
                c = _fixed(enc, x, ot, method, spec, rank)
                rec["fixed"].append(c)
                log(_search_line(f"fixed-{method}"
                                 + (f" rank {rank}" if rank is not None else ""), c))
        if spec.batch_rows:
            rec["batch"] = _batch_rows(enc, xb, spec, seed)
            for mode, r in rec["batch"]["modes"].items():
                log(f"    batch-{mode}: {', '.join(f'{t:.1f}' for t in r['seconds'])} s for "
                    f"{xb.shape[0]} images")
            if rec["batch"]["status"] != "ok":
                log(f"    batch: ERROR {rec['batch']['reason']}")
        out["splits"].append(rec)
        out["summary"] += _summarise(rec, spec)
    return out


def _summarise(rec: dict[str, Any], spec: CraftSpec) -> list[dict[str, Any]]:
    """One line per (split, route or provider): the numbers of the README table."""
    base = {"split": rec["split"], "layer": rec["layer"], "d": rec["d"], "m": rec["m"]}
    lines = [dict(base, route="oracle", estimator="exact (float64 oracle)",
                  seconds_per_sample=sum(o["seconds"] for o in rec["oracle"]) / len(
                      rec["oracle"]), passes=min(rec["d"], rec["m"]), max_abs_err=0.0,
                  covers=True, status="ok")] if rec["oracle"] else []
    for route in spec.routes:
        rows = [r for r in rec["rows"] if r["route"] == route]
        ok = [r for r in rows if r["status"] == "ok"]
        line = dict(base, route=route, status="ok" if len(ok) == len(rows) else "error")
        if ok:
            line.update(
                estimator=",".join(sorted({r["estimator"] for r in ok})),
                seconds_per_sample=sum(r["seconds"] for r in ok) / len(ok),
                passes=max(r["passes"] for r in ok),
                passes_mean=sum(r["passes"] for r in ok) / len(ok),
                passes_min=min(r["passes"] for r in ok), runs=len(ok),
                covers_count=sum(bool(r["covers"]) for r in ok),
                max_abs_err=max(abs(r["error"]) for r in ok),
                max_halfwidth=max(r["ci_halfwidth"] for r in ok),
                covers=all(r["covers"] for r in ok),
                converged=all(r["converged"] for r in ok),
                through_oracle=any(r["through_oracle"] for r in ok),
                within_2s=all(r["seconds"] <= 2.0 for r in ok))
        lines.append(line)
    for c in rec["curvlinops"]:
        lines.append(dict(base, route=f"curvlinops-{c['method']}", estimator="plug-in, no "
                          "interval", seconds_per_sample=c["seconds_per_sample"],
                          passes=c["passes"], status=c["status"], covers=None,
                          reached=c["reached"], bracket=c.get("bracket"),
                          max_abs_err=c.get("max_abs_err", c["curve"][-1]["max_abs_err"]
                                            if c["curve"] else math.nan)))
    bt = rec.get("batch")
    if bt is not None:
        ref = bt["modes"].get("never")
        for mode, r in bt["modes"].items():
            sec = sorted(r["seconds"])[len(r["seconds"]) // 2]  # the median run
            line = dict(base, route=f"batch-{mode}", estimator="FSInfo_diag + dFIL, "
                        f"{bt['images']} images in one batch", status=bt["status"],
                        seconds_per_sample=sec / bt["images"], seconds=r["seconds"],
                        products_per_sample=r["products_recorded"] / bt["images"],
                        same_probes=bt["same"], max_rel_diff=bt.get("max_rel_diff"),
                        covers=None)
            if ref is not None:
                rsec = sorted(ref["seconds"])[len(ref["seconds"]) // 2]
                line["speedup_vs_never"] = rsec / sec
            lines.append(line)
    for c in rec.get("fixed", []):
        name = f"fixed-{c['method']}" + (f"-r{c['rank']}" if c["rank"] is not None else "")
        lines.append(dict(base, route=name, estimator=f"{c['method']} at a fixed count "
                          "(oracle-informed)", seconds_per_sample=c["seconds_per_sample"],
                          passes=c["passes"], status=c["status"], covers=None,
                          reached=c["reached"], bracket=c.get("bracket"),
                          max_abs_err=c.get("max_abs_err")))
    return lines


def craft_problems(craft: dict[str, Any] | None) -> list[str]:
    """Every route or curvlinops row of the section that raised (the command exits 1)."""
    out: list[str] = []
    for rec in (craft or {}).get("splits", []):
        for r in rec["rows"]:
            if r["status"] == "error":
                out.append(f"{rec['layer']} route {r['route']} image {r['image']}: {r['reason']}")
        for c in rec["curvlinops"]:
            if c["status"] == "error":
                out.append(f"{rec['layer']} curvlinops-{c['method']}: {c['reason']}")
        for c in rec.get("fixed", []):
            if c["status"] == "error":
                out.append(f"{rec['layer']} fixed-{c['method']} rank {c['rank']}: "
                           f"{c['reason']}")
        if rec.get("batch", {}).get("status", "ok") == "error":
            out.append(f"{rec['layer']} batch: {rec['batch']['reason']}")
    return out
