"""Backend benchmark for a GPU (runs on a CPU too, with ``--smoke``): every product backend side by
side with a plain torch.func implementation, eager and ``torch.compile``d, on the same probes.

Measured per encoder (one process run, same inputs, best of a few repeats after warm-up):

- ``vjp`` / ``jvp`` of K probes for B samples (one call each), per provider;
- SLQ-style work: 30 alternating jvp+vjp calls with K=4 probes (the Krylov products of a 30-step
  Lanczos log det) per provider;
- the full metric per image with adaptive stopping, per library backend: FSInfo_diag to 0.01
  nats/dim plus dFIL to 1% (the issue's "ResNet-50 split after its second stage at 3x224x224,
  FSInfo_diag and dFIL together at most 0.5 s per image on an H100").

Providers: ``ours-<backend>`` for every available library backend (the products object the
metrics use: ``fsinfo_fast.engine.make_products``), ``torchfunc-eager`` (``vmap`` over
``torch.func.vjp``/``jvp`` of the encoder, recomputing the primal per call as a user would write
it) and ``torchfunc-compile`` (the same functions under ``torch.compile``; their outputs are
checked against eager so a silently wrong compiled tangent cannot pass). Every provider's output
is checked against ``ours-torch`` on the same probes before it is timed.

Run: ``python benchmarks/gpu_bench.py --out benchmarks/results/gpu_bench.json`` (on a GPU), or
``python benchmarks/gpu_bench.py --device cpu --smoke`` (tiny sizes, a minute on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.func import jvp, vjp, vmap

import fsinfo_fast as ff
from fsinfo_fast._precision import ieee_fp32
from fsinfo_fast.bench.harness import environment, peak_memory, pin_threads
from fsinfo_fast.data import natural_images
from fsinfo_fast.encoder import prepare
from fsinfo_fast.engine import available_backends, make_products
from fsinfo_fast.models import get_model

#: (label, zoo model, split index, input side, model kwargs); a ``tp:`` model is a Hugging Face
#: ``transformers`` config (:mod:`fsinfo_fast.models.third_party`, random weights) cut after the
#: module path given as the split
ENCODERS = [
    ("vgg5-s2@32", "vgg5", 2, 32, {}),
    ("resnet18-s7@32", "resnet18", 7, 32, {}),
    ("resnet50-s10@224", "resnet50", 10, 224, {}),
    ("vit_b16-block4@224", "tp:vit_b16", "layers.3", 224, {}),
    ("convnext_t-stage2@224", "tp:convnext_tiny", "encoder.stages.1", 224, {}),
]


def build_encoder(model_name: str, split, kw: dict) -> torch.nn.Module:
    """The encoder of a benchmark row (zoo split, or a transformers model cut at a module path
    by :func:`fsinfo_fast.split`'s forward-hook route)."""
    if model_name.startswith("tp:"):
        from fsinfo_fast.models.third_party import build

        return ff.split(build(model_name[3:], **kw), split, route="hooks").eval()
    return ff.split(get_model(model_name, **kw).eval(), split)


SMOKE = [("vgg5-s2@8", "vgg5", 2, 8, {"input_size": 8})]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device, repeats: int) -> float:
    fn()  # warm-up (compilation, caches)
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def _plain(enc, x):
    """The torch.func products a user would write (the primal is recomputed per call): one
    ``vjp``/``jvp`` of the batch (samples are independent in eval mode), ``vmap`` over probes."""

    def vjp_fn(U):  # U [B, K, *out]
        _, pull = vjp(enc, x)
        return vmap(lambda u: pull(u)[0], in_dims=1, out_dims=1)(U)

    def jvp_fn(V):  # V [B, K, *in]
        return vmap(lambda v: jvp(enc, (x,), (v,))[1], in_dims=1, out_dims=1)(V)

    return vjp_fn, jvp_fn


def bench_encoder(label, model_name, split, size, kw, device, dtype, batch, probes, repeats,
                  backends, compile_: bool, slq_steps: int = 30, memory: bool = True) -> dict:
    torch.manual_seed(0)
    try:
        enc = build_encoder(model_name, split, kw).to(device=device, dtype=dtype)
    except ImportError as err:  # transformers missing (e.g. on an offline GPU machine)
        return {"encoder": label, "unavailable": str(err), "providers": {}}
    x, _ = natural_images(size=size, n=batch, seed=0)
    x = x.to(device=device, dtype=dtype)
    prep = prepare(enc, x, dtype=dtype)
    d, m = prep.d, prep.m
    out_shape, in_shape = prep.out_shape, prep.in_shape
    g = torch.Generator(device="cpu").manual_seed(1)
    U = torch.randn(batch, probes, m, generator=g).to(device=device, dtype=dtype)
    V = torch.randn(batch, probes, d, generator=g).to(device=device, dtype=dtype)
    V4 = V[:, :4].contiguous()
    row: dict = {"encoder": label, "d": d, "m": m, "batch": batch, "probes": probes,
                 "slq_steps": slq_steps, "providers": {}}

    ref = make_products(prep, "torch")
    ref_vjp, ref_jvp = ref.vjp(U), ref.jvp(V)

    def check(name, got_vjp, got_jvp):
        tol = 1e-3 if dtype == torch.float32 else 1e-8
        for what, got, want in (("vjp", got_vjp, ref_vjp), ("jvp", got_jvp, ref_jvp)):
            err = float(((got - want).norm() / want.norm()).detach())
            if not err <= tol:
                raise SystemExit(f"{label} {name} {what}: relative error {err:.2e} > {tol}")

    provs: dict = {}
    setup_peak: dict = {}
    for b in backends:
        try:
            p = make_products(prep, b)
        except ff.errors.BackendUnavailableError as err:
            row["providers"][f"ours-{b}"] = {"unavailable": str(err)}
            continue
        provs[f"ours-{b}"] = (p.vjp, p.jvp)
        if memory and b in ("engine", "torch"):
            # what a user pays in all: linearisation (engine) or the pullback (torch) + K VJPs
            setup_peak[f"ours-{b}"] = peak_memory(
                lambda b=b: make_products(prep, b).vjp(U), device)
        if hasattr(p, "node_kinds"):
            row.setdefault("engine_fallback_nodes", {})[b] = list(p.fallbacks)
    pv, pj = _plain(enc, x.reshape(batch, *in_shape))

    def flat_v(f):
        return lambda U_: f(U_.reshape(batch, U_.shape[1], *out_shape)).reshape(batch, -1, d)

    def flat_j(f):
        return lambda V_: f(V_.reshape(batch, V_.shape[1], *in_shape)).reshape(batch, -1, m)

    provs["torchfunc-eager"] = (flat_v(pv), flat_j(pj))
    if compile_:
        # only the VJPs are compiled (as in the benchmark runner): torch.compile of vmap-over-jvp
        # fails on BatchNorm in torch 2.13 (a dynamo fake-tensor error) and the failed attempt
        # leaves functorch state behind that breaks later vmap calls of the same process
        cv, cj = torch.compile(pv), pj
        row["compile_jvp"] = "not compiled (eager jvp)"
        provs["torchfunc-compile"] = (flat_v(cv), flat_j(cj))
    for name, (fv, fj) in provs.items():
        jvp_error = None
        try:
            got_vjp = fv(U)
            try:
                got_jvp = fj(V)
            except (RuntimeError, NotImplementedError) as err:
                # e.g. plain torch.func has no forward-mode rule for flash attention on a CPU:
                # its VJPs are still measured, the JVP column records why it is missing
                jvp_error = f"{type(err).__name__}: {err}"[:300]
                got_jvp = ref_jvp
            check(name, got_vjp, got_jvp)
        except Exception as err:  # e.g. a compile failure: reported, not hidden
            if isinstance(err, SystemExit):
                raise
            row["providers"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            torch._dynamo.reset()
            continue
        if jvp_error is not None:
            row["providers"][name] = {"vjp_s": _best(lambda fv=fv: fv(U), device, repeats),
                                      "jvp_error": jvp_error}
            if memory:
                row["providers"][name]["vjp_peak_bytes"] = peak_memory(lambda fv=fv: fv(U),
                                                                       device)
            continue

        def slq(fv=fv, fj=fj):
            Y = V4
            for _ in range(slq_steps):
                Y = fv(fj(Y)) * 1e-3
            return Y

        row["providers"][name] = {
            "vjp_s": _best(lambda fv=fv: fv(U), device, repeats),
            "jvp_s": _best(lambda fj=fj: fj(V), device, repeats),
        }
        if slq_steps > 0:
            row["providers"][name]["slq_k4_s"] = _best(slq, device, max(1, repeats // 2))
        if memory:
            row["providers"][name]["vjp_peak_bytes"] = peak_memory(lambda fv=fv: fv(U), device)
            row["providers"][name]["jvp_peak_bytes"] = peak_memory(lambda fj=fj: fj(V), device)
            if name in setup_peak:
                row["providers"][name]["setup_and_vjp_peak_bytes"] = setup_peak[name]
    fwd = _best(lambda: enc(x.reshape(batch, *in_shape).repeat_interleave(probes, 0)), device,
                repeats)
    row["forward_at_BK_s"] = fwd
    for r in row["providers"].values():
        if "vjp_s" in r:
            r["efficiency_vjp"] = r["vjp_s"] / fwd
        if "jvp_s" in r:
            r["efficiency_jvp"] = r["jvp_s"] / fwd
    return row


def bench_metric(label, model_name, split, size, kw, device, backends, images: int) -> dict:
    """FSInfo_diag (atol 0.01) + dFIL (rtol 1%) per image, adaptive, per library backend."""
    torch.manual_seed(0)
    enc = build_encoder(model_name, split, kw).to(device)
    x, _ = natural_images(size=size, n=images, seed=0)
    x = x.to(device)
    out = {"encoder": label, "images": images, "backends": {}}
    for b in backends:
        if not available_backends()[b][0]:
            continue

        def both(b=b):
            res = []
            for i in range(images):
                ids = torch.tensor([i])
                f = ff.fsinfo(enc, x[i : i + 1], sigma=0.1, atol=0.01, sample_ids=ids,
                              backend=b, estimator="randomized")
                t = ff.dfil(enc, x[i : i + 1], sigma=0.1, rtol=0.01, sample_ids=ids, backend=b,
                            estimator="randomized")
                res.append((float(f.value[0]), float(f.ci_halfwidth[0]), float(t.value[0])))
            return res

        try:
            t = _best(both, device, 2)
            vals = both()
        except ff.errors.BackendUnavailableError as err:
            out["backends"][b] = {"unavailable": str(err)}
            continue
        out["backends"][b] = {"seconds_per_image": t / images, "fsinfo_diag": vals[0][0],
                              "fsinfo_halfwidth": vals[0][1], "dfil": vals[0][2]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of the script)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="library backends to measure (default: every available one)")
    p.add_argument("--slq-steps", type=int, default=30,
                   help="jvp+vjp rounds of the SLQ proxy (0: skip it)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                   help=f"only these encoders (of {[e[0] for e in ENCODERS]})")
    p.add_argument("--no-metric", dest="metric", action="store_false",
                   help="skip the adaptive per-image metric timing")
    p.add_argument("--metric-encoder", default=None, metavar="LABEL",
                   help="the encoder of the per-image metric timing (default: the last of "
                        "--only, else resnet50-s10@224, the claim in this script's docstring)")
    p.add_argument("--in-process", action="store_true",
                   help="measure every encoder in this process (default: one process each)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    threads = pin_threads(args.threads)
    encoders = SMOKE if args.smoke else ENCODERS
    if args.only:
        encoders = [e for e in encoders if e[0] in args.only]
    probes = 4 if args.smoke else args.probes
    repeats = 1 if args.smoke else args.repeats
    backends = args.backends or list(available_backends())
    result = {"environment": environment(device, threads), "device": str(device), "rows": [],
              "metric": [],
              # every provider at the same precision: TF32 off, as the metrics run (_precision)
              "fp32_precision": "ieee" if device.type == "cuda" else "n/a"}
    with ieee_fp32(device):
        return _run(args, p, device, encoders, probes, repeats, backends, result, argv)


def _run(args, p, device, encoders, probes, repeats, backends, result, argv) -> int:
    if len(encoders) > 1 and not args.in_process:
        # one process per encoder: a failed torch.compile can leave autograd state behind that
        # breaks later rows of the same process (seen with torch 2.13 on the CPU)
        import subprocess
        import tempfile

        for label, *_ in encoders:
            with tempfile.TemporaryDirectory() as tmp:
                sub = Path(tmp) / "row.json"
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                       "--only", label, "--in-process", "--no-metric", "--out", str(sub)]
                subprocess.run(cmd, check=True)
                result["rows"] += json.loads(sub.read_text())["rows"]
        encoders = []
    for label, name, split, size, kw in encoders:
        batch = 1 if size >= 224 else args.batch
        row = bench_encoder(label, name, split, size, kw, device, torch.float32, batch, probes,
                            repeats, backends, args.compile and not args.smoke,
                            slq_steps=2 if args.smoke else args.slq_steps)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.metric:
        want = args.metric_encoder or (args.only[-1] if args.only else (
            SMOKE[0][0] if args.smoke else "resnet50-s10@224"))
        found = [e for e in ENCODERS + SMOKE if e[0] == want]
        if not found:
            p.error(f"--metric-encoder {want!r} is none of {[e[0] for e in ENCODERS + SMOKE]}")
        label, name, split, size, kw = found[0]
        met = bench_metric(label, name, split, size, kw, device, backends,
                           1 if args.smoke else args.images)
        result["metric"].append(met)
        print(json.dumps(met), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
