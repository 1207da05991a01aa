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
    curvlinops gives no interval to stop on), with the error curve.

Timings are single calls on whatever machine runs it: the results record the load; compare
routes within one run, not across machines.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError

__all__ = ["CraftSpec", "craft_problems", "measure_craft", "load_model"]


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


def _curvlinops(encoder, x, oracle: torch.Tensor, method: str, d: int,
                spec: CraftSpec) -> dict[str, Any]:
    """The smallest matvec count whose error is within ``atol`` for every image and seed."""
    from .curvlinops_provider import curvlinops_fsinfo_diag

    out: dict[str, Any] = {"method": method, "status": "ok", "reason": None, "curve": [],
                           "reached": False, "num_matvecs": None, "passes": None,
                           "seconds_per_sample": None, "interval": None}
    n_img = min(spec.curvlinops_images, x.shape[0])
    grid = [k for k in spec.curvlinops_grid if k < d] or [d - 1]
    try:
        for k in grid:
            errs, secs, neg = [], [], []
            for s in range(spec.curvlinops_seeds):
                t0 = _now()
                v, used, negative = curvlinops_fsinfo_diag(
                    encoder, x[:n_img], spec.sigma, method=method, num_matvecs=k, seed=s)
                secs.append((_now() - t0) / n_img)
                errs.append((v.cpu() - oracle[:n_img]).abs())
                neg.append(negative)
            e = torch.cat(errs)
            point = {"num_matvecs": used, "passes": 2 * used, "max_abs_err": float(e.max()),
                     "err95": float(1.959963984540054 * torch.sqrt((e**2).mean())),
                     "seconds_per_sample": float(sum(secs) / len(secs)),
                     "negative_diag_fraction": float(max(neg))}
            out["curve"].append(point)
            if point["max_abs_err"] <= spec.atol:
                out.update(reached=True, num_matvecs=used, passes=2 * used,
                           seconds_per_sample=point["seconds_per_sample"])
                break
        if not out["reached"]:
            last = out["curve"][-1]
            out.update(status="target_not_reached", num_matvecs=last["num_matvecs"],
                       passes=last["passes"], seconds_per_sample=last["seconds_per_sample"],
                       reason=f"max error {last['max_abs_err']:.3g} > atol {spec.atol} at "
                              f"{last['num_matvecs']} matvecs (the grid's largest below d)")
    except Exception as err:  # noqa: BLE001 - curvlinops missing or failing: an error row
        out.update(status="error", reason=f"{type(err).__name__}: {err}")
    return out


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
        for i in range(spec.images):
            t0 = _now()
            ex = reference.exact_fisher(enc, x[i : i + 1], spectrum=False)
            val = float(ex.fsinfo(spec.sigma).value[0])
            rec["oracle"].append({"image": i, "value": val, "seconds": _now() - t0,
                                  "passes": min(m, d)})
            oracle.append(val)
        log(f"  {names[k]} (split {k}): d={d} m={m}, oracle "
            f"{sum(o['seconds'] for o in rec['oracle']) / spec.images:.1f} s/sample")
        for route in spec.routes:
            for i in range(spec.images):
                row = _route_row(enc, x[i : i + 1], i, route, spec, oracle[i], seed)
                rec["rows"].append(row)
                if row["status"] == "ok":
                    log(f"    {route:<11s} image {i}: {row['seconds']:.2f} s, {row['passes']} "
                        f"products, {row['estimator']}, err {row['error']:+.1e} "
                        f"(hw {row['ci_halfwidth']:.1e}) covers={row['covers']}")
                else:
                    log(f"    {route:<11s} image {i}: ERROR {row['reason']}")
        ot = torch.tensor(oracle, dtype=torch.float64)
        methods = spec.curvlinops if (spec.curvlinops_splits is None
                                      or k in spec.curvlinops_splits) else []
        for method in methods:
            c = _curvlinops(enc, x, ot, method, d, spec)
            rec["curvlinops"].append(c)
            log(f"    curvlinops-{method}: {c['status']}, {c['passes']} products"
                + (f", {c['seconds_per_sample']:.2f} s/sample" if c["seconds_per_sample"]
                   else "") + (f" ({c['reason']})" if c["reason"] else ""))
        out["splits"].append(rec)
        out["summary"] += _summarise(rec, spec)
    return out


def _summarise(rec: dict[str, Any], spec: CraftSpec) -> list[dict[str, Any]]:
    """One line per (split, route or provider): the numbers of the README table."""
    base = {"split": rec["split"], "layer": rec["layer"], "d": rec["d"], "m": rec["m"]}
    lines = [dict(base, route="oracle", estimator="exact (float64 oracle)",
                  seconds_per_sample=sum(o["seconds"] for o in rec["oracle"]) / len(
                      rec["oracle"]), passes=min(rec["d"], rec["m"]), max_abs_err=0.0,
                  covers=True, status="ok")]
    for route in spec.routes:
        rows = [r for r in rec["rows"] if r["route"] == route]
        ok = [r for r in rows if r["status"] == "ok"]
        line = dict(base, route=route, status="ok" if len(ok) == len(rows) else "error")
        if ok:
            line.update(
                estimator=",".join(sorted({r["estimator"] for r in ok})),
                seconds_per_sample=sum(r["seconds"] for r in ok) / len(ok),
                passes=max(r["passes"] for r in ok),
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
                          max_abs_err=c["curve"][-1]["max_abs_err"] if c["curve"] else math.nan))
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
    return out
