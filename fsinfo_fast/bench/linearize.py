r"""Both metrics of one image through one :class:`~fsinfo_fast.Linearization`, side by side.

The task a user runs most: FSInfo_diag to ``atol`` **and** dFIL to ``rtol`` for each image. Three
routes, each one image at a time, in one process run:

``linearization``
    ``lin = ff.linearize(encoder, x); lin.fsinfo(sigma, atol=...); lin.dfil(sigma, rtol=...)``:
    the encoder validated once (cached per encoder and input shape), dFIL from FSInfo's VJPs.
``two-calls-0.1``
    the route of version 0.1, rebuilt from the same building blocks with its settings: each of
    the two public calls validated the encoder from scratch (forward, backward, two samples
    alone) and built its products; FSInfo_diag started at 20 VJPs, dFIL ran its own Rademacher
    JVPs starting at 30, both adding 10 per round.
``bare-vmap-vjp``
    the floor for the products: ``torch.func.vjp`` once, ``vmap`` over the same number of
    Gaussian probes the linearization used, and the plain (debiased) log-sum and trace; no
    validation, no error bars.

Also measured: the per-call overhead of :func:`fsinfo_fast.linearize` on a new shape
(validation) and on a second batch of the same shape (cached), and the agreement of the routes'
values within their intervals.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch.func import vjp, vmap

from ..encoder import clear_validation_cache, prepare
from ..engine import make_products
from ..estimators import estimate_diag, hutchinson_trace, log_chi2_mean_offset
from ..formulas import HALF_LOG_2PIE
from .cases import build_encoder, build_input
from .harness import time_call

__all__ = ["measure_linearize"]

#: Version 0.1's settings of the two public calls.
V01 = {"diag_min_probes": 20, "trace_min_probes": 30, "round_size": 10, "growth": 1.0,
       "interaction_checks": 2}


def _two_calls_v01(encoder, x, ids, sigma: float, atol: float, rtol: float,
                   backend: str) -> dict[str, Any]:
    """Version 0.1's ``ff.fsinfo`` + ``ff.dfil`` (each validating and building products)."""
    clear_validation_cache()
    enc = prepare(encoder, x, check_interaction=V01["interaction_checks"])
    est = estimate_diag(make_products(enc, backend), sigma=sigma, atol=atol, seed=0,
                        sample_ids=ids, min_probes=V01["diag_min_probes"],
                        round_size=V01["round_size"], growth=V01["growth"]).fsinfo_diag
    enc = prepare(encoder, x, check_interaction=V01["interaction_checks"])
    tr = hutchinson_trace(make_products(enc, backend), sigma=sigma, rtol=rtol, seed=0,
                          sample_ids=ids, side="input", kind="rademacher",
                          min_probes=V01["trace_min_probes"], round_size=V01["round_size"],
                          growth=V01["growth"])
    return {"fsinfo": est, "dfil": tr}


def _bare(encoder, x, k: int, sigma: float, seed: int = 0) -> dict[str, float]:
    """``vmap`` over ``k`` Gaussian VJPs: the debiased log-sum and the trace, nothing else."""
    b = x.shape[0]
    flat = x.reshape(b, -1)

    def f(z):
        return encoder(z.reshape(x.shape)).reshape(b, -1)

    y, pull = vjp(f, flat)
    g = torch.Generator(device=x.device).manual_seed(seed)
    u = torch.randn(k, *y.shape, generator=g, dtype=y.dtype, device=y.device)
    gs = vmap(lambda ui: pull(ui)[0])(u).detach()  # [k, B, d]
    s = (gs.double() ** 2).mean(dim=0)
    logsum = (torch.log(s) - log_chi2_mean_offset(k)).mean(dim=1) / 2
    fs = logsum - math.log(sigma) - HALF_LOG_2PIE
    trace = (gs.double() ** 2).sum(dim=2).mean(dim=0)
    return {"fsinfo": float(fs[0]), "dfil": float(trace[0] / (sigma**2 * flat.shape[1]))}


def measure_linearize(spec: Any, device: torch.device, log, *, seed: int = 0) -> dict[str, Any]:
    """Time the three routes on every encoder of ``spec`` (a ``LinearizeSpec``), one image at a
    time, and return rows, per-call overheads and agreement checks."""
    import fsinfo_fast as ff

    out: dict[str, Any] = {"sigma": spec.sigma, "atol": spec.atol, "rtol": spec.rtol,
                           "v01_settings": dict(V01), "encoders": []}
    for es in spec.encoders:
        encoder = build_encoder(es, seed=seed).to(device)
        xs = build_input(es, spec.images, seed=seed).to(device)
        rec: dict[str, Any] = {"encoder": es.label, "d": None, "m": None, "images": []}
        # per-call overhead: a new shape (validation) vs a second batch of the same shape
        clear_validation_cache()
        t0 = time.perf_counter()
        lin = ff.linearize(encoder, xs[:1], backend=spec.backend)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ff.linearize(encoder, xs[1:2] if spec.images > 1 else xs[:1], backend=spec.backend)
        warm = time.perf_counter() - t0
        rec.update(d=lin.d, m=lin.m, linearize_cold_s=cold, linearize_cached_s=warm)
        log(f"  {es.label}: d={lin.d} m={lin.m}; linearize() {cold * 1e3:.1f} ms on a new "
            f"shape, {warm * 1e3:.2f} ms cached")
        for i in range(spec.images):
            xi = xs[i : i + 1]
            ids = torch.tensor([i], device=device)
            box: dict[str, Any] = {}

            def ours(xi=xi, ids=ids, box=box, encoder=encoder):
                lin = ff.linearize(encoder, xi, backend=spec.backend, sample_ids=ids)
                box["fsinfo"] = lin.fsinfo(spec.sigma, atol=spec.atol, estimator="randomized")
                box["dfil"] = lin.dfil(spec.sigma, rtol=spec.rtol, estimator="randomized")
                return box

            def old(xi=xi, ids=ids, box=box, encoder=encoder):
                box["v01"] = _two_calls_v01(encoder, xi, ids, spec.sigma, spec.atol, spec.rtol,
                                            spec.backend)
                return box

            kw = dict(device=device, warmup=1, repeats=spec.repeats, min_repeats=2,
                      max_seconds=spec.max_seconds)
            t_ours = time_call(ours, **kw)
            t_old = time_call(old, **kw)
            f, dl = box["fsinfo"], box["dfil"]
            k = int(f.num_probes)
            t_bare = time_call(lambda xi=xi, k=k, e=encoder: _bare(e, xi, k, spec.sigma), **kw)
            bare = _bare(encoder, xi, k, spec.sigma)
            vf, vd = box["v01"]["fsinfo"], box["v01"]["dfil"]
            v01_dfil = float(vd.value[0])
            agree_f = abs(float(f.value[0]) - float(vf.value[0])) <= float(
                f.ci_halfwidth[0] + vf.ci_halfwidth[0])
            agree_d = abs(float(dl.value[0]) - v01_dfil) <= float(
                dl.ci_halfwidth[0] + vd.ci_halfwidth[0])
            row = {
                "image": i,
                "linearization_s": t_ours.median, "two_calls_v01_s": t_old.median,
                "bare_vmap_vjp_s": t_bare.median,
                "speedup_vs_v01": t_old.median / t_ours.median,
                "overhead_vs_bare": t_ours.median / t_bare.median,
                "fsinfo": float(f.value[0]), "fsinfo_hw": float(f.ci_halfwidth[0]),
                "fsinfo_probes": k, "dfil": float(dl.value[0]),
                "dfil_rel_hw": float(dl.ci_halfwidth[0] / dl.value[0]),
                "dfil_probes": int(dl.num_probes), "dfil_method": dl.info.get("method"),
                "v01_fsinfo": float(vf.value[0]), "v01_fsinfo_probes": int(vf.num_probes),
                "v01_dfil": v01_dfil, "v01_dfil_probes": int(vd.num_probes),
                "bare_fsinfo": bare["fsinfo"], "bare_dfil": bare["dfil"],
                "agree_fsinfo": bool(agree_f), "agree_dfil": bool(agree_d),
                "converged": bool(f.converged.all() and dl.converged.all()),
            }
            rec["images"].append(row)
            log(f"    image {i}: linearization {t_ours.median * 1e3:.1f} ms ({k} VJPs, dFIL "
                f"{row['dfil_probes']} {row['dfil_method']}), 0.1 route "
                f"{t_old.median * 1e3:.1f} ms ({row['v01_fsinfo_probes']} VJPs + "
                f"{row['v01_dfil_probes']} JVPs): x{row['speedup_vs_v01']:.1f}; bare vmap(vjp) "
                f"{t_bare.median * 1e3:.1f} ms")
        ims = rec["images"]
        rec["median_linearization_s"] = float(torch.tensor(
            [r["linearization_s"] for r in ims]).median())
        rec["median_speedup_vs_v01"] = float(torch.tensor(
            [r["speedup_vs_v01"] for r in ims]).median())
        out["encoders"].append(rec)
    return out
