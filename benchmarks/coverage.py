"""Coverage of the randomized 95% intervals at the probe counts the defaults actually use.

For each encoder (random initialisation, eval mode; one natural image from
``fsinfo_fast.data.natural_images``), ``S`` independent runs (seeded probes: the run index is the
probe ``sample_id``) of the library's default procedures, each scored against the truth:

- ``fsinfo_diag atol``: FSInfo_diag (paper floor ``1e-10``, ``sigma = 0.1``) with adaptive
  stopping at ``atol`` nats/dim, the default start (:func:`~fsinfo_fast.estimators.stopping.
  initial_probes`, 4 probes) and rounds (+50%);
- ``dfil(diag probes) rtol``: dFIL from the same Gaussian VJPs, stopping at ``rtol``;
- ``joint``: both targets from the same probes (what ``Linearization`` serves);
- ``fixed K=4``: the first round, with no stopping;
- ``dfil(rademacher) rtol``: the standalone dFIL default (Rademacher input-side Hutchinson,
  starting at 10 probes).

The first four are ``estimate_diag`` calls with the same probe seed on one shared
``DiagProbeState`` (as in a ``Linearization``: each result is the one a fresh call gives, the
probes are computed once; under the three-stage rule, :mod:`fsinfo_fast.estimators.stopping`,
each reports from its last stage's probes). Per procedure the report gives the coverage (with
its binomial standard error), the bias z (``(mean - truth) / sqrt(var / S + se_truth^2)``, a
two-sample z when the truth is itself an estimate), the mean half-width and the probes used
(mean, min, max).

Truth: the exact float64 oracle (``fsinfo_fast.reference``) where it is affordable (32 px);
otherwise a high-probe estimate with another seed (``truth_probes`` Gaussian VJPs; its standard
error is reported and enters the bias z; it slightly deflates the coverage, by about
``(se_truth / sd_run)^2 / 2`` relative, also reported).

Run (one configuration at a time, ``nice``; results per configuration are kept and combined)::

    nice -n 10 python benchmarks/coverage.py --only vgg5-s2@32 resnet18-imagenet-s7@224
    python benchmarks/coverage.py --combine     # benchmarks/results/coverage.{json,md}

Top up a stored configuration with more runs (run indices ``start, start + 1, ...``, disjoint
from the stored ones; the stored truth is reused; the summaries are pooled exactly, see
:func:`pool_scores`)::

    nice -n 10 python benchmarks/coverage.py --only vit-l0@224 --start 300 --seeds 700 --merge

Parallel parts write elsewhere (``--out``; the combined table goes beside that directory) and
are pooled with :func:`merge_results`. Every chunk of runs is checkpointed in
``<out>/parts/<config>.start<start>.partial.json``: the same command, rerun after an
interruption, resumes after the last chunk stored.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
TRUTH_SEED = 1_000_003
RUN_SEED = 11

#: name -> model, input size, seeded runs, runs per batch, truth probes (0: the exact oracle).
#: The stored results hold 1000 runs each; the 224 px ResNet-18 and ViT results were topped up
#: from 300 (``--start 300 --seeds 700 --merge``), the CIFAR-stem ResNet-18 at 32 px was run in
#: parts (about 5 s per run on one shared core); its stem at 224 px costs about 20x more per
#: product (0.44 s per VJP on one core, m = 1.6M): six parallel parts (``parts`` in its
#: result), 11-25 s per run on a shared core.
CONFIGS: dict[str, dict[str, Any]] = {
    "vgg5-s2@32": dict(model="vgg5", size=32, seeds=1000, chunk=50, truth_probes=0),
    "resnet18-cifar-s7@32": dict(model="resnet18-cifar", size=32, seeds=1000, chunk=50,
                                 truth_probes=0),
    "resnet18-imagenet-s7@32": dict(model="resnet18-imagenet", size=32, seeds=1000, chunk=50,
                                    truth_probes=0),
    "vit-l0@32": dict(model="vit", size=32, seeds=1000, chunk=50, truth_probes=0),
    "resnet18-imagenet-s7@224": dict(model="resnet18-imagenet", size=224, seeds=1000, chunk=10,
                                     truth_probes=1000),
    "vit-l0@224": dict(model="vit", size=224, seeds=1000, chunk=20, truth_probes=1000),
    "vgg5-s2@224": dict(model="vgg5", size=224, seeds=1000, chunk=20, truth_probes=1000),
    "resnet18-cifar-s7@224": dict(model="resnet18-cifar", size=224, seeds=1000, chunk=10,
                                  truth_probes=1000),
}


class _ViTCut(nn.Module):
    """``transformers`` ViT (random weights) cut after its first encoder layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embeddings = model.embeddings
        self.layer = model.layers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.embeddings(x))
        return out[0] if isinstance(out, tuple) else out


class _HFResNetCut(nn.Module):
    """``transformers`` ResNet (small config, random weights) cut after its first stage."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embedder = model.embedder
        self.stage = model.encoder.stages[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.embedder(x))


def build_encoder(model: str, size: int) -> nn.Module:
    """The encoder of a configuration (seeded random weights, eval mode)."""
    import fsinfo_fast as ff
    from fsinfo_fast.models import resnet18, vgg5

    torch.manual_seed(0)
    if model == "vgg5":
        return ff.split(vgg5(input_size=size).eval(), 2)
    if model.startswith("resnet18-"):
        return ff.split(resnet18(stem=model.split("-", 1)[1]).eval(), 7)
    if model == "vit":
        from fsinfo_fast.models.third_party import build

        return _ViTCut(build("vit", size=size)).eval()
    if model == "hf-resnet":
        from fsinfo_fast.models.third_party import build

        return _HFResNetCut(build("resnet", size=size)).eval()
    raise ValueError(f"unknown model {model!r}")


def _truth(enc: nn.Module, x: torch.Tensor, sigma: float, probes: int) -> dict[str, float]:
    from fsinfo_fast import reference
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.engine import make_products
    from fsinfo_fast.estimators.diagonal import (
        DiagProbeState,
        fsinfo_diag_summary,
        trace_summary,
    )

    if probes == 0:
        return {
            "method": "exact float64 oracle",
            "fsinfo_diag": float(reference.fsinfo(enc, x, sigma, "diag").value[0]),
            "fsinfo_diag_se": 0.0,
            "dfil": float(reference.dfil(enc, x, sigma).value[0]),
            "dfil_se": 0.0,
        }
    P = make_products(prepare(enc, x, check_interaction=1), "auto")
    st = DiagProbeState.for_products(P, seed=TRUTH_SEED)
    while st.k < probes:
        st.extend(P, min(50, probes - st.k))
    stats = st.stats()
    fs = fsinfo_diag_summary(stats, sigma, exact_diagonal=False)
    tr = trace_summary(stats)
    scale = 1.0 / (sigma**2 * P.d)
    return {
        "method": f"{probes} Gaussian VJP probes (seed {TRUTH_SEED})",
        "fsinfo_diag": float(fs.value[0]),
        "fsinfo_diag_se": float(fs.stderr[0]),
        "dfil": float(tr.value[0] * scale),
        "dfil_se": float(tr.stderr[0] * scale),
    }


def _score(values: torch.Tensor, hw: torch.Tensor, k: torch.Tensor, conv: torch.Tensor,
           truth: float, truth_se: float, rel: bool) -> dict[str, float]:
    n = values.shape[0]
    cov = float(((values - truth).abs() <= hw).double().mean())
    sd = float(values.std())
    z = float((values.mean() - truth) / math.sqrt(sd**2 / n + truth_se**2)) if sd > 0 else 0.0
    out = {
        "coverage": cov,
        "coverage_se": math.sqrt(max(cov * (1 - cov), 1e-12) / n),
        "bias_z": z,
        "mean": float(values.mean()),
        "mean_halfwidth": float(hw.mean()),
        "sd": sd,
        "truth_se_over_sd": truth_se / sd if sd > 0 else 0.0,
        "K_mean": float(k.double().mean()),
        "K_min": int(k.min()),
        "K_max": int(k.max()),
        "converged": float(conv.double().mean()),
    }
    if rel:
        out["mean_rel_halfwidth"] = float((hw / values.abs()).mean())
    return out


def _mean_of(s: dict[str, Any], n: int, truth: float, truth_se: float) -> float:
    """The runs' mean (stored since the top-up option; older results: from their bias z,
    ``mean = truth + z sqrt(sd^2 / n + se^2)``, the inverse of :func:`_score`)."""
    if "mean" in s:
        return float(s["mean"])
    return truth + s["bias_z"] * math.sqrt(s["sd"] ** 2 / n + truth_se**2)


def pool_scores(a: dict[str, Any], na: int, b: dict[str, Any], nb: int, truth: float,
                truth_se: float) -> dict[str, Any]:
    """One procedure's :func:`_score` over ``na + nb`` runs from the summaries of two disjoint
    sets of runs against the same truth (counts, means and the pooled sample variance are
    exact; min/max over both)."""
    n = na + nb
    ma, mb = _mean_of(a, na, truth, truth_se), _mean_of(b, nb, truth, truth_se)
    mean = (na * ma + nb * mb) / n
    ss = ((na - 1) * a["sd"] ** 2 + na * ma**2 + (nb - 1) * b["sd"] ** 2 + nb * mb**2
          - n * mean**2)
    sd = math.sqrt(max(ss, 0.0) / (n - 1))

    def avg(key: str) -> float:
        return (na * a[key] + nb * b[key]) / n

    cov = avg("coverage")
    out = {
        "coverage": cov,
        "coverage_se": math.sqrt(max(cov * (1 - cov), 1e-12) / n),
        "bias_z": (mean - truth) / math.sqrt(sd**2 / n + truth_se**2) if sd > 0 else 0.0,
        "mean": mean,
        "mean_halfwidth": avg("mean_halfwidth"),
        "sd": sd,
        "truth_se_over_sd": truth_se / sd if sd > 0 else 0.0,
        "K_mean": avg("K_mean"),
        "K_min": min(a["K_min"], b["K_min"]),
        "K_max": max(a["K_max"], b["K_max"]),
        "converged": avg("converged"),
    }
    if "mean_rel_halfwidth" in a:
        out["mean_rel_halfwidth"] = avg("mean_rel_halfwidth")
    return out


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration topped up with new, disjoint runs (same truth, procedures and
    settings); the runs of each part are listed under ``parts``."""
    for key in ("config", "d", "m", "sigma", "atol", "rtol", "max_probes", "truth"):
        if old[key] != new[key]:
            raise ValueError(f"cannot merge {old['config']}: {key} differs "
                             f"({old[key]!r} vs {new[key]!r})")
    truth = old["truth"]
    out = dict(old)
    out["procedures"] = {}
    for p, s in old["procedures"].items():
        if p not in new["procedures"]:
            raise ValueError(f"cannot merge {old['config']}: {p} not in the new runs")
        q = "dfil" if p.endswith("/ dFIL") else "fsinfo_diag"
        out["procedures"][p] = pool_scores(s, old["seeds"], new["procedures"][p], new["seeds"],
                                           truth[q], truth[f"{q}_se"])
    parts = old.get("parts") or [{"start": old.get("start", 0), "seeds": old["seeds"],
                                  "time_s": old["time_s"]}]
    out["parts"] = [*parts, {"start": new.get("start", 0), "seeds": new["seeds"],
                             "time_s": new["time_s"]}]
    out["seeds"] = old["seeds"] + new["seeds"]
    out["time_s"] = old["time_s"] + new["time_s"]
    return out


def _lists(rec: dict[str, Any]) -> dict[str, Any]:
    """The per-run values of ``rec`` (nested dicts of lists of ``[n]`` tensors) as lists."""
    return {k: _lists(v) if isinstance(v, dict) else (torch.cat(v).tolist() if v else [])
            for k, v in rec.items()}


def _write_checkpoint(path: Path, key: dict[str, Any], runs: int, rec: dict, rad: dict,
                      **meta: Any) -> None:
    """The runs done so far, rewritten atomically (:func:`run_config`'s ``checkpoint``)."""
    from fsinfo_fast.profile.store import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "runs": runs, **meta, "rec": _lists(rec),
                                        "rad": _lists(rad)}))


def _resume(path: Path | None, key: dict[str, Any], rec: dict, rad: dict,
            verbose: bool) -> tuple[dict[str, Any], float]:
    """Load a checkpoint of the same settings into ``rec`` and ``rad``: ``(its metadata, the
    seconds it had spent)``, or ``({}, 0.0)`` where there is none (or it is of other
    settings)."""
    if path is None or not path.exists():
        return {}, 0.0
    ck = json.loads(path.read_text())
    if ck.get("key") != key:
        if verbose:
            print(f"  {path} holds runs of other settings; starting afresh", flush=True)
        return {}, 0.0
    for dst, src in ((rad, ck["rad"]), *((rec[p], ck["rec"][p]) for p in rec)):
        for f, vals in src.items():
            dst[f][:] = [torch.tensor(vals, dtype=torch.float64)] if vals else []
    if verbose:
        print(f"  resuming after {ck['runs']} runs stored in {path}", flush=True)
    return ck, float(ck["time_s"])


def run_config(name: str, *, seeds: int | None = None, chunk: int | None = None,
               truth_probes: int | None = None, atol: float = 0.01, rtol: float = 0.01,
               max_probes: int = 1000, rademacher: bool = True, sigma: float = 0.1,
               size: int | None = None, model: str | None = None,
               verbose: bool = True, keep_values: bool = False,
               diag: bool = True, snapshot_bytes: int = 2 << 30,
               start: int = 0, checkpoint: Path | None = None) -> dict[str, Any]:
    """Run one configuration (keyword arguments override :data:`CONFIGS`; ``keep_values``:
    also return every run's value, half-width and probe count per procedure; ``start``: the
    first run index, so that a top-up draws runs disjoint from the stored ones).

    ``checkpoint``: a JSON file rewritten (atomically) after every chunk with the runs done so
    far; a call with the same settings resumes after them (an interrupted part loses at most
    one chunk), one with other settings starts afresh. The caller removes it once the result
    is stored."""
    from fsinfo_fast.data import natural_images
    from fsinfo_fast.encoder import prepare
    from fsinfo_fast.engine import make_products
    from fsinfo_fast.estimators import estimate_diag, hutchinson_trace
    from fsinfo_fast.estimators.diagonal import DiagProbeState, SnapshotDroppedError

    cfg = dict(CONFIGS.get(name, {}))
    for key, val in (("seeds", seeds), ("chunk", chunk), ("truth_probes", truth_probes),
                     ("size", size), ("model", model)):
        if val is not None:
            cfg[key] = val
    t0 = time.time()
    enc = build_encoder(cfg["model"], cfg["size"])
    x, _ = natural_images(size=cfg["size"], n=1, seed=0)
    truth = cfg.get("truth") or _truth(enc, x, sigma, cfg["truth_probes"])
    if verbose:
        print(f"{name}: truth {truth} ({time.time() - t0:.0f} s)", flush=True)
    S, B = cfg["seeds"], cfg["chunk"]
    # ascending in the probes they usually need, so the shared state rarely has to replay
    procs = ("fixed K=4", "fsinfo_diag atol", "dfil(diag probes) rtol", "joint")
    rec = {p: {f: [] for f in ("v", "hw", "k", "conv", "dv", "dhw")} for p in procs}
    rad: dict[str, list] = {f: [] for f in ("v", "hw", "k", "conv")}
    backend, d, m = None, None, None
    key = {"config": name, "model": cfg["model"], "size": cfg["size"], "start": start,
           "seeds": S, "chunk": B, "truth": truth, "atol": atol, "rtol": rtol,
           "max_probes": max_probes, "sigma": sigma, "rademacher": rademacher, "diag": diag}
    done, spent = _resume(checkpoint, key, rec, rad, verbose)
    if done:
        backend, d, m = done["backend"], done["d"], done["m"]
    for c0 in range(done.get("runs", 0), S, B):
        n = min(B, S - c0)
        ids = torch.arange(start + c0, start + c0 + n)
        P = make_products(prepare(enc, x.expand(n, *x.shape[1:]).contiguous(),
                                  check_interaction=1), "auto")
        backend, d, m = getattr(P, "backend", type(P).__name__), int(P.d), int(P.m)
        requests = {
            "fsinfo_diag atol": dict(atol=atol),
            "dfil(diag probes) rtol": dict(dfil_rtol=rtol),
            "joint": dict(atol=atol, dfil_rtol=rtol),
            "fixed K=4": dict(num_probes=4),
        }
        kmax = 0
        # one probe state serves the four procedures (what a Linearization does): each result
        # equals that of a fresh call with the same arguments (estimate_diag's ``state``), the
        # probes are computed once; a boundary that was not kept is recomputed afresh
        st = DiagProbeState.for_products(P, seed=RUN_SEED, sample_ids=ids,
                                         snapshot_bytes=snapshot_bytes)
        for p in procs if diag else []:
            kw = requests[p] if p == "fixed K=4" else {**requests[p], "max_probes": max_probes}
            try:
                r = estimate_diag(P, sigma=sigma, seed=RUN_SEED, sample_ids=ids, state=st, **kw)
            except SnapshotDroppedError:
                r = estimate_diag(P, sigma=sigma, seed=RUN_SEED, sample_ids=ids, **kw)
            f, dl = r.fsinfo_diag, r.dfil
            for fld, val in zip(("v", "hw", "dv", "dhw", "k", "conv"),
                                (f.value, f.ci_halfwidth, dl.value, dl.ci_halfwidth,
                                 f.probes_per_sample.double(), f.converged.double()),
                                strict=True):
                rec[p][fld].append(val)
            kmax = max(kmax, f.num_probes)
        if rademacher:
            r = hutchinson_trace(P, sigma=sigma, side="input", kind="rademacher", rtol=rtol,
                                 seed=RUN_SEED, sample_ids=ids, max_probes=max_probes)
            for f, val in zip(("v", "hw", "k", "conv"),
                              (r.value, r.ci_halfwidth, r.probes_per_sample, r.converged),
                              strict=True):
                rad[f].append(val.double())
        if checkpoint is not None:
            _write_checkpoint(checkpoint, key, c0 + n, rec, rad,
                              backend=backend, d=d, m=m, time_s=spent + time.time() - t0)
        if verbose:
            print(f"  runs to {start + c0 + n - 1} ({c0 + n}/{S}): last K {kmax} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    res: dict[str, Any] = {"config": name, **cfg, "start": start, "d": d, "m": m,
                           "backend": backend, "sigma": sigma, "atol": atol, "rtol": rtol,
                           "max_probes": max_probes, "truth": truth, "procedures": {}}
    for p in procs if diag else []:
        cat = {f: torch.cat(v) for f, v in rec[p].items()}
        if keep_values:
            res.setdefault("values", {})[p] = {f: v.tolist() for f, v in cat.items()}
        if p != "dfil(diag probes) rtol":
            res["procedures"][f"{p} / FSInfo_diag"] = _score(
                cat["v"], cat["hw"], cat["k"], cat["conv"] > 0, truth["fsinfo_diag"],
                truth["fsinfo_diag_se"], rel=False)
        if p != "fsinfo_diag atol":
            res["procedures"][f"{p} / dFIL"] = _score(
                cat["dv"], cat["dhw"], cat["k"], cat["conv"] > 0, truth["dfil"],
                truth["dfil_se"], rel=True)
    if rademacher:
        cat = {f: torch.cat(v) for f, v in rad.items()}
        res["procedures"]["dfil(rademacher) rtol / dFIL"] = _score(
            cat["v"], cat["hw"], cat["k"], cat["conv"] > 0, truth["dfil"], truth["dfil_se"],
            rel=True)
    res["time_s"] = spent + time.time() - t0
    return res


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| encoder (random init) | d | m | seeds | truth | procedure / quantity | K used: mean "
        "[min-max] | coverage (SE) | bias z | mean half-width |",
        "|---|---:|---:|---:|---|---|---|---|---:|---|",
    ]
    for r in results:
        truth = "oracle" if r["truth_probes"] == 0 else f"{r['truth_probes']} probes"
        for p, s in r["procedures"].items():
            hw = (f"{100 * s['mean_rel_halfwidth']:.2f}%" if "mean_rel_halfwidth" in s
                  else f"{s['mean_halfwidth']:.4f} nats/dim")
            lines.append(
                f"| {r['config']} | {r['d']} | {r['m']} | {r['seeds']} | {truth} | {p} | "
                f"{s['K_mean']:.1f} [{s['K_min']}-{s['K_max']}] | {s['coverage']:.3f} "
                f"({s['coverage_se']:.3f}) | {s['bias_z']:+.2f} | {hw} |"
            )
    return "\n".join(lines) + "\n"


def combine(directory: Path = RESULTS / "coverage") -> None:
    """Combine the per-configuration JSON files of ``directory`` into ``<directory>.json`` and
    ``<directory>.md`` beside it (``results/coverage.json`` and ``coverage.md`` for the stored
    results; a part run with ``--out`` elsewhere leaves them alone)."""
    from fsinfo_fast.bench.harness import environment

    results = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    order = list(CONFIGS)
    results.sort(key=lambda r: order.index(r["config"]) if r["config"] in order else 99)
    doc = {"benchmark": "coverage", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "note": "random-init encoders in eval mode; one natural image per encoder; timings "
                   "under load (not speed claims)",
           "results": results, "environment": environment(torch.device("cpu"), {})}
    (directory.parent / f"{directory.name}.json").write_text(json.dumps(doc, indent=1))
    (directory.parent / f"{directory.name}.md").write_text(_markdown(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="configurations to run")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--truth-probes", type=int, default=None)
    p.add_argument("--max-probes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-rademacher", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "coverage")
    p.add_argument("--combine", action="store_true", help="only combine the stored results")
    p.add_argument("--rademacher-only", action="store_true",
                   help="rerun only the stand-alone Rademacher dFIL and merge it into the "
                        "stored result (same truth)")
    p.add_argument("--start", type=int, default=0,
                   help="first run index (sample id of the probes); with --merge, at least "
                        "the stored runs' end")
    p.add_argument("--merge", action="store_true",
                   help="top up the stored result: reuse its truth and pool the new runs "
                        "into it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.combine:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in args.only or list(CONFIGS):
            path = args.out / f"{name}.json"
            if args.rademacher_only or args.merge:
                old = json.loads(path.read_text())
                CONFIGS[name]["truth"] = old["truth"]
            if args.merge:
                ends = [q["start"] + q["seeds"] for q in old.get("parts", [])] or [
                    old.get("start", 0) + old["seeds"]]
                if args.start < max(ends):
                    p.error(f"--merge: --start {args.start} would repeat stored runs of "
                            f"{name} (they end at {max(ends)})")
            # the runs done so far, after every chunk (a rerun of the same command resumes)
            ckpt = args.out / "parts" / f"{name}.start{args.start}.partial.json"
            res = run_config(name, seeds=args.seeds, chunk=args.chunk,
                             truth_probes=args.truth_probes, max_probes=args.max_probes,
                             rademacher=not args.no_rademacher,
                             diag=not args.rademacher_only, start=args.start,
                             checkpoint=ckpt)
            if args.rademacher_only:
                key = "dfil(rademacher) rtol / dFIL"
                old["procedures"][key] = res["procedures"][key]
                old["time_s"] += res["time_s"]
                res = old
            elif args.merge:
                # the new runs on their own first, so that nothing is lost if the merge fails
                part = args.out / "parts" / f"{name}.start{args.start}.json"
                part.parent.mkdir(exist_ok=True)
                part.write_text(json.dumps(res, indent=1))
                res = merge_results(old, res)
            path.write_text(json.dumps(res, indent=1))
            ckpt.unlink(missing_ok=True)
            print(_markdown([res]), flush=True)
    combine(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
