"""Coverage of the default calls' 95% intervals on encoders from models the user did not write.

Each run is what a user gets from the defaults, four requests on one ``Linearization``::

    lin = ff.linearize(enc, x, seed=s)           # x: 2 samples
    lin.fsinfo(sigma)                            # FSInfo_diag, atol 0.01, auto
    lin.dfil(sigma)                              # rtol 0.01, auto method
    lin.fsinfo(sigma, variant="logdet")          # auto
    lin.fsinfo_sigma(target=-1.0)                # FSInfoGuard's sigma*

with the run index ``s`` as the probe seed. Truth: the exact float64 oracle
(``ff.linearize(enc, x).exact(spectrum=True)``), once per config. Encoders: transformers models
built offline from configs (:func:`fsinfo_fast.models.third_party.build`, random weights, eval,
16 px) cut with :func:`fsinfo_fast.split`, and hand-written blocks where the randomized routes
serve (attention with LayerNorm or RMSNorm, an ill-conditioned expansion, columns near the
floor, a rank-16 bottleneck). One CSV per config (a row per run, sample and quantity), appended
to, so runs in parts add up; ``--report`` scores every stored run (the committed runs are
gzipped; a new part writes an uncompressed CSV beside them, so give it new seeds, ``--start``)::

    nice -n 10 python benchmarks/coverage_defaults.py --configs hf_swin_embeddings --start 200
    python benchmarks/coverage_defaults.py --report     # benchmarks/results/coverage_defaults.md

Scoring: a miss is an oracle outside the 95% interval (sigma*: outside ``[ci_low, ci_high]``);
p is the one-sided binomial probability of at least that many misses at a true 5%; bias z
combines each sample's mean error over its standard error (Stouffer; sigma* on the log scale),
over the randomized routes' runs only.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fsinfo_fast as ff

OUT = Path(__file__).resolve().parent / "results" / "coverage_defaults"
REPORT = OUT.parent / "coverage_defaults.md"
QUANTITIES = ("diag", "dfil", "logdet", "sigma")
FIELDS = ["config", "d", "m", "sigma", "seed", "sample", "quantity", "route", "value", "lo",
          "hi", "oracle", "converged", "probes", "sec"]


class _Tokens(nn.Module):
    """A flat input cut into ``n`` tokens, projected to ``width``, through ``block``."""

    def __init__(self, d_in: int, n: int, width: int, block: nn.Module) -> None:
        super().__init__()
        self.n, self.proj, self.block = n, nn.Linear(d_in // n, width), block

    def forward(self, x):
        b = x.shape[0]
        return self.block(self.proj(x.reshape(b, self.n, -1))).reshape(b, -1)


class _Attention(nn.Module):
    """A pre-norm transformer block (LayerNorm or RMSNorm)."""

    def __init__(self, w: int, heads: int = 2, norm: str = "ln") -> None:
        super().__init__()
        make = nn.LayerNorm if norm == "ln" else nn.RMSNorm
        self.n1, self.n2 = make(w), make(w)
        self.attn = nn.MultiheadAttention(w, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(w, 2 * w), nn.GELU(), nn.Linear(2 * w, w))

    def forward(self, t):
        h = self.n1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.n2(t))


def _hf(arch: str, at: str, size: int = 16):
    from fsinfo_fast.models.third_party import build

    return ff.split(build(arch, size=size), at=at)


#: name -> (encoder, x, sigma); weights and inputs seeded (1234)
def _config(name: str):
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    sigma = 0.1
    if name.startswith("hf_"):
        arch, at = name[3:].split("_", 1)
        return _hf(arch, at).eval(), torch.rand(2, 3, 16, 16, generator=g), sigma
    if name == "ln_mlp_d3072_m512":
        enc = nn.Sequential(nn.Flatten(), nn.Linear(3072, 512), nn.LayerNorm(512), nn.GELU(),
                            nn.Linear(512, 512))
        x = torch.randn(2, 3072, generator=g)
    elif name == "bottleneck_r16_d2048_m512":
        enc = nn.Sequential(nn.Linear(2048, 16), nn.Tanh(), nn.Linear(16, 512),
                            nn.LayerNorm(512))
        x = torch.randn(2, 2048, generator=g)
    elif name in ("attn_ln_d1536_m768", "attn_rms_d1536_m768"):
        enc = _Tokens(1536, 24, 32, _Attention(32, 2, name.split("_")[1]))
        x = torch.randn(2, 1536, generator=g)
    elif name == "floor_mlp_d2048_m400":  # columns from 1e-4 to 1: many near the floor
        lin = nn.Linear(2048, 400)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(400, 2048, generator=g)
                             * torch.logspace(-4, 0, 2048)[None, :])
        enc = nn.Sequential(lin, nn.LayerNorm(400))
        x, sigma = torch.randn(2, 2048, generator=g), 1.0
    elif name == "expand_lowsig_d256_m1024":  # m > d, ill-conditioned, small sigma
        l1 = nn.Linear(256, 1024)
        with torch.no_grad():
            l1.weight.mul_(torch.logspace(-3, 0, 256)[None, :])
        enc = nn.Sequential(l1, nn.Tanh(), nn.Linear(1024, 1024), nn.RMSNorm(1024))
        x, sigma = torch.randn(2, 256, generator=g), 0.01
    else:
        raise SystemExit(f"unknown config {name!r} (known: {', '.join(CONFIGS)})")
    return enc.eval(), x, sigma


CONFIGS = ("hf_convnext_embeddings", "hf_swin_embeddings", "hf_swin_encoder.layers.0",
           "hf_regnet_embedder", "hf_segformer_stages.0", "hf_mobilenetv2_layer.1",
           "attn_ln_d1536_m768", "attn_rms_d1536_m768", "ln_mlp_d3072_m512",
           "floor_mlp_d2048_m400", "expand_lowsig_d256_m1024", "bottleneck_r16_d2048_m512")


#: what the committed runs are (the report's header)
NOTE = (
    "The committed runs (`benchmarks/results/coverage_defaults/*.csv.gz`, 168-200 runs per "
    "config; the oracle of swin's embeddings took 37) were made at commit 6a46cae with the "
    "helper harness this script was made from (same configs, seeds and calls), 1 thread, on a "
    "shared 2-core machine. transformers models: random weights, 16 px, eval. On these "
    "encoders the probe cap never bit (2 of about 20,000 results unconverged, both covered), "
    "so they do not test coverage given `converged` (README, Known gaps); the log det with "
    "`m < d` and no prior is an exact `-inf`, and where `m >= d` `auto` took the oracle: its "
    "randomized route (SLQ) is not exercised here. The bottleneck's bias z (+21) is float32 "
    "rounding (about 5e-8 nats, under 5% of its 2e-6 rounding half-width): the deflated "
    "sketch holds the whole rank-16 range there.")


def _route(r) -> str:
    if bool(torch.isneginf(r.value).all()) if hasattr(r, "value") else False:
        return "-inf (exact: rank < d)"
    if r.estimator != "randomized":
        return r.estimator + ("(auto)" if r.estimator == "exact" and "auto" in r.info else "")
    return f"randomized:{r.info.get('method') or r.info.get('diag_method') or ''}"


def run(name: str, seeds: int, start: int, out: Path, time_limit: float | None) -> None:
    enc, x, sigma = _config(name)
    lin0 = ff.linearize(enc, x, seed=0)
    ex = lin0.exact(spectrum=True)
    oracle = {"diag": ex.fsinfo(sigma).value, "dfil": ex.dfil(sigma).value,
              "logdet": ex.fsinfo(sigma, variant="logdet").value,
              "sigma": ex.fsinfo_sigma(target=-1.0).sigma}  # (the oracle's)
    d, m = lin0.d, lin0.m
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    new = not path.exists()
    t0 = time.time()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for s in range(start, start + seeds):
            if time_limit is not None and time.time() - t0 > time_limit:
                break
            ts = time.time()
            lin = ff.linearize(enc, x, seed=s)
            res = {"diag": lin.fsinfo(sigma), "dfil": lin.dfil(sigma),
                   "logdet": lin.fsinfo(sigma, variant="logdet"),
                   "sigma": lin.fsinfo_sigma(target=-1.0)}
            sec = round(time.time() - ts, 2)
            for q, r in res.items():
                lo, hi = r.ci95()
                val = r.sigma if q == "sigma" else r.value
                probes = (r.probes_per_sample.tolist() if q != "sigma"
                          and r.probes_per_sample is not None else [""] * len(val))
                for b in range(len(val)):
                    w.writerow([name, d, m, sigma, s, b, q, _route(r), float(val[b]),
                                float(lo[b]), float(hi[b]), float(oracle[q][b]),
                                bool(r.converged[b]), probes[b], sec])
            f.flush()
            print(f"{name}: seed {s} ({sec} s)", flush=True)


def _route_name(row: dict) -> str:
    """The route a stored row took, for the table: an exact ``-inf`` (a log det with ``m < d``
    and no prior: no probes) apart from the randomized routes; an exact route without the
    reason ``auto`` recorded."""
    if float(row["value"]) == -math.inf and float(row["oracle"]) == -math.inf:
        return "-inf (exact: rank < d)"
    rt = row["route"]
    return rt if rt.startswith("randomized") else rt.split(":")[0]


def _rows(out: Path) -> list[dict]:
    rows = []
    for p in sorted(out.glob("*.csv")) + sorted(out.glob("*.csv.gz")):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def report(out: Path, path: Path) -> str:
    from scipy import stats

    groups = collections.defaultdict(list)
    for r in _rows(out):
        groups[(r["config"], r["quantity"])].append(r)
    lines = [
        "# Coverage of the default calls' 95% intervals, models the user did not write", "",
        "`benchmarks/coverage_defaults.py` (its docstring has the procedure): per run, "
        "`lin = ff.linearize(enc, x, seed=run)` on 2 samples, then `lin.fsinfo(sigma)`, "
        "`lin.dfil(sigma)`, `lin.fsinfo(sigma, variant=\"logdet\")` and "
        "`lin.fsinfo_sigma(target=-1.0)` with their defaults; truth: the float64 oracle. "
        "n counts samples (2 per run). p: one-sided binomial P(misses >= k) at a true 5%. "
        "Bias z over the randomized routes' runs.", "", NOTE, "",
        "| encoder | d | m | sigma | quantity | routes | runs | miss / n | p | miss / n "
        "(converged) | bias z | median half-width |",
        "|---|---:|---:|---:|---|---|---:|---|---:|---|---:|---:|"]
    pooled = collections.Counter()
    worst = 0.0
    for (c, q), rows in sorted(groups.items()):
        n, runs = len(rows), len({r["seed"] for r in rows})
        miss = miss_c = n_c = 0
        errs, hws = collections.defaultdict(list), []
        for r in rows:
            r["route"] = _route_name(r)
        routes = collections.Counter(r["route"] for r in rows)
        for r in rows:
            v, lo, hi, o = (float(r[k]) for k in ("value", "lo", "hi", "oracle"))
            conv = r["converged"] == "True"
            out_ = not (lo <= o <= hi) and not (math.isinf(o) and v == o)
            miss += out_
            n_c += conv
            miss_c += out_ and conv
            if math.isfinite(lo) and math.isfinite(hi):
                hws.append((hi - lo) / 2)
            if out_:
                side = (hi - v) if o > v else (v - lo)
                worst = max(worst, abs(o - v) / side if side > 0 else math.inf)
            if r["route"].startswith("randomized") and math.isfinite(v) and math.isfinite(o):
                errs[r["sample"]].append(math.log(v / o) if q == "sigma" else v - o)
            pooled[(q, r["route"], "n")] += 1
            pooled[(q, r["route"], "miss")] += out_
        zs = []
        for e in errs.values():
            if len(e) > 2:
                mean = sum(e) / len(e)
                sd = math.sqrt(sum((a - mean) ** 2 for a in e) / (len(e) - 1))
                if sd > 0:
                    zs.append(mean / (sd / math.sqrt(len(e))))
        bz = f"{sum(zs) / math.sqrt(len(zs)):+.2f}" if zs else "-"
        p = float(stats.binom.sf(miss - 1, n, 0.05))
        hw = f"{sorted(hws)[len(hws) // 2]:.3g}" if hws else "-"
        rt = ", ".join(f"{k} {v}" for k, v in routes.most_common())
        r0 = rows[0]
        lines.append(f"| {c} | {r0['d']} | {r0['m']} | {r0['sigma']} | {q} | {rt} | {runs} | "
                     f"{miss}/{n} = {miss / n:.3f} | {p:.2g} | {miss_c}/{n_c} | {bz} | {hw} |")
    lines += ["", "Pooled by quantity and route:", "",
              "| quantity | route | miss / n | p |", "|---|---|---|---:|"]
    for q, rt in sorted({(q, rt) for q, rt, _ in pooled}):
        n, k = pooled[(q, rt, "n")], pooled[(q, rt, "miss")]
        lines.append(f"| {q} | {rt} | {k}/{n} = {k / n:.4f} | "
                     f"{float(stats.binom.sf(k - 1, n, 0.05)):.2g} |")
    lines += ["", f"Largest miss: {worst:.2f} half-widths (on the side it fell)."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--start", type=int, default=0, help="first run index (probe seed)")
    p.add_argument("--seeds", type=int, default=200, help="runs in this part")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=None, help="seconds per config")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="only rewrite the markdown report")
    a = p.parse_args()
    if not a.report:
        torch.set_num_threads(a.threads)
        warnings.filterwarnings("ignore")
        for name in a.configs:
            run(name, a.seeds, a.start, a.out, a.time_limit)
    # (runs stored elsewhere are reported beside them)
    print(report(a.out, REPORT if a.out.resolve() == OUT else a.out / "report.md"))


if __name__ == "__main__":
    main()
