r"""Both metrics of one image through one :class:`~fsinfo_fast.Linearization`, side by side.

The task a user runs most: FSInfo_diag to ``atol`` **and** dFIL to ``rtol`` for each image. Three
routes, each one image at a time, in one process run:

``linearization``
    ``lin = ff.linearize(encoder, x); lin.fsinfo(sigma, atol=...); lin.dfil(sigma, rtol=...)``:
    the encoder validated once (cached per encoder and input shape), dFIL from FSInfo's VJPs.
``two-calls-0.1``
    the route of version 0.1, rebuilt from the same building blocks with its settings: each of
    the two public calls validated the encoder from scratch (forward, backward, two samples
    alone) and built its products; FSInfo_diag from Gaussian VJPs, dFIL from its own Rademacher
    JVPs. Version 0.1 stopped at the first round whose fixed-count interval met the tolerance,
    in rounds of 20, 30, 40, ... VJPs and 30, 40, ... JVPs (today's estimators run the
    three-stage rule of :mod:`fsinfo_fast.estimators.stopping` instead, so calling them with
    0.1's start would not be 0.1's route). That rule is emulated: the stopping round of each
    metric is found untimed (:func:`_v01_counts`, fixed-count estimates at each round
    boundary), then **one fixed-count call at that count** per metric is timed, each with the
    validation of its public call. This is never slower than the real 0.1 route, which also
    paid for every earlier round's products and summaries: the comparison favours version 0.1.
    (Its stopping rule undercovers, see the stopping module; the counts are recorded as
    ``v01_fsinfo_probes`` and ``v01_dfil_probes``.)
``bare-vmap-vjp``
    the floor for the products: ``torch.func.vjp`` once, ``vmap`` over the same number of
    Gaussian probes the linearization used, and the plain (debiased) log-sum and trace; no
    validation, no error bars.
``fixed-count floor``
    what a fixed-count estimator would need for the tolerances, from the linearization's own
    stage-3 standard errors: ``n (1.96 se / tol)^2`` probes per metric, ``n`` the count that
    standard error is for (``fixed_count_need_fsinfo``, ``fixed_count_need_dfil``; ``tol`` is
    ``atol``, and ``rtol |dFIL|``), and the bare ``vmap(vjp)`` time at the larger of the two
    (``bare_at_fixed_need_s``): how far the honest three-stage rule is from the products' floor.

Also measured: the per-call overhead of :func:`fsinfo_fast.linearize` on a new shape
(validation) and on a second batch of the same shape (cached), and the agreement of the routes'
values within their intervals.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from ..encoder import clear_validation_cache, prepare
from ..engine import make_products
from ..estimators import (
    DiagProbeState,
    estimate_diag,
    hutchinson_trace,
    log_chi2_mean_offset,
)
from ..formulas import HALF_LOG_2PIE
from .cases import build_encoder, build_input
from .harness import time_call

__all__ = ["fixed_count_need", "measure_linearize"]

#: Version 0.1's settings of the two public calls: the first round and the round size of each
#: metric (it stopped at the first round whose interval met the tolerance), its cap.
V01 = {"diag_min_probes": 20, "trace_min_probes": 30, "round_size": 10, "max_probes": 1000,
       "interaction_checks": 2}

#: The normal quantity of the fixed-count floor ``n (z se / tol)^2``.
Z95 = 1.96


def _v01_counts(encoder, x, ids, sigma: float, atol: float, rtol: float,
                backend: str) -> tuple[int, int]:
    """Untimed: the probe counts at which version 0.1's rule stopped for FSInfo_diag (VJPs) and
    dFIL (Rademacher JVPs): the first round boundary (``min_probes + j round_size``, at most
    ``max_probes``) whose fixed-count interval meets the tolerance. FSInfo_diag's boundaries
    are read from one probe state extended round by round (each boundary's estimate is that of
    the probes so far, as 0.1 reported); dFIL's from a fixed-count call per boundary."""
    enc = prepare(encoder, x, check_interaction=V01["interaction_checks"])
    products = make_products(enc, backend)
    step, cap = V01["round_size"], V01["max_probes"]
    state = DiagProbeState.for_products(products, seed=0, sample_ids=ids)
    k_fs = min(V01["diag_min_probes"], cap)
    state.extend(products, k_fs)
    while True:
        est = estimate_diag(products, sigma=sigma, atol=atol, num_probes=k_fs, seed=0,
                            sample_ids=ids, state=state).fsinfo_diag
        if bool(est.converged.all()) or k_fs >= cap:
            break
        add = min(step, cap - k_fs)
        state.extend(products, add)
        k_fs += add
    k_tr = min(V01["trace_min_probes"], cap)
    while True:
        tr = hutchinson_trace(products, sigma=sigma, rtol=rtol, num_probes=k_tr, seed=0,
                              sample_ids=ids, side="input", kind="rademacher")
        if bool(tr.converged.all()) or k_tr >= cap:
            break
        k_tr = min(k_tr + step, cap)
    return k_fs, k_tr


def _two_calls_v01(encoder, x, ids, sigma: float, atol: float, rtol: float, backend: str,
                   counts: tuple[int, int]) -> dict[str, Any]:
    """Version 0.1's ``ff.fsinfo`` + ``ff.dfil`` (each validating and building products), each
    one fixed-count call at the count where 0.1's rule stopped (``counts``, from
    :func:`_v01_counts`): its earlier rounds are not paid for, which favours 0.1."""
    clear_validation_cache()
    enc = prepare(encoder, x, check_interaction=V01["interaction_checks"])
    est = estimate_diag(make_products(enc, backend), sigma=sigma, atol=atol, seed=0,
                        sample_ids=ids, num_probes=counts[0]).fsinfo_diag
    enc = prepare(encoder, x, check_interaction=V01["interaction_checks"])
    tr = hutchinson_trace(make_products(enc, backend), sigma=sigma, rtol=rtol, seed=0,
                          sample_ids=ids, side="input", kind="rademacher",
                          num_probes=counts[1])
    return {"fsinfo": est, "dfil": tr}


def fixed_count_need(result, tol: float | Tensor) -> float:
    """``n (1.96 se / tol)^2``: the probes a fixed-count estimator would need for the half-width
    ``tol``, from ``result``'s standard error and the count ``n`` it is for (the estimate's
    own probes: the probes per sample less the pilot's; the largest over the batch)."""
    n = result.probes_per_sample.to(torch.float64)
    pilot = result.info.get("pilot_probes")
    if isinstance(pilot, Tensor):
        n = n - pilot.to(n)
    need = n * (Z95 * result.stderr.to(torch.float64) / torch.as_tensor(tol, dtype=torch.float64)
                ) ** 2
    return float(need.max())


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

            # version 0.1's stopping rounds, untimed; then its calls at those counts, timed
            counts = _v01_counts(encoder, xi, ids, spec.sigma, spec.atol, spec.rtol,
                                 spec.backend)

            def old(xi=xi, ids=ids, box=box, encoder=encoder, counts=counts):
                box["v01"] = _two_calls_v01(encoder, xi, ids, spec.sigma, spec.atol, spec.rtol,
                                            spec.backend, counts)
                return box

            kw = dict(device=device, warmup=1, repeats=spec.repeats, min_repeats=2,
                      max_seconds=spec.max_seconds)
            t_ours = time_call(ours, **kw)
            t_old = time_call(old, **kw)
            f, dl = box["fsinfo"], box["dfil"]
            k = int(f.num_probes)
            t_bare = time_call(lambda xi=xi, k=k, e=encoder: _bare(e, xi, k, spec.sigma), **kw)
            bare = _bare(encoder, xi, k, spec.sigma)
            # the fixed-count floor: the probes a fixed count would need, from our own stage-3
            # standard errors, and the bare products at that count
            need_f = fixed_count_need(f, spec.atol)
            need_d = fixed_count_need(dl, spec.rtol * dl.value.abs())
            k_need = max(2, math.ceil(max(need_f, need_d)))
            t_need = time_call(lambda xi=xi, k=k_need, e=encoder: _bare(e, xi, k, spec.sigma),
                               **kw)
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
                "v01_rule": "first round meeting the tolerance (emulated: one fixed-count call "
                            "per metric at that round's count, timed)",
                "v01_converged": bool(vf.converged.all() and vd.converged.all()),
                "fixed_count_need_fsinfo": need_f, "fixed_count_need_dfil": need_d,
                "bare_at_fixed_need_probes": k_need, "bare_at_fixed_need_s": t_need.median,
                "bare_fsinfo": bare["fsinfo"], "bare_dfil": bare["dfil"],
                "agree_fsinfo": bool(agree_f), "agree_dfil": bool(agree_d),
                "converged": bool(f.converged.all() and dl.converged.all()),
            }
            rec["images"].append(row)
            log(f"    image {i}: linearization {t_ours.median * 1e3:.1f} ms ({k} VJPs, dFIL "
                f"{row['dfil_probes']} {row['dfil_method']}), 0.1 route "
                f"{t_old.median * 1e3:.1f} ms ({row['v01_fsinfo_probes']} VJPs + "
                f"{row['v01_dfil_probes']} JVPs): x{row['speedup_vs_v01']:.1f}; bare vmap(vjp) "
                f"{t_bare.median * 1e3:.1f} ms; a fixed count would need {need_f:.0f} / "
                f"{need_d:.0f} probes (bare vmap(vjp) at {k_need}: {t_need.median * 1e3:.1f} ms)")
        ims = rec["images"]
        rec["median_linearization_s"] = float(torch.tensor(
            [r["linearization_s"] for r in ims]).median())
        rec["median_speedup_vs_v01"] = float(torch.tensor(
            [r["speedup_vs_v01"] for r in ims]).median())
        out["encoders"].append(rec)
    return out
