"""Full-resolution CPU benchmark: ResNet-18 split 7 at 3x224x224.

The claim it checks: FSInfo_diag at 0.01 nats/dim and dFIL at 1% (95% half-widths, adaptive
stopping) in at most 5 s per image, with peak memory under 4 GB, on a 2-core CPU. A dense
per-sample Jacobian would have 150,528 x 100,352 = 1.5e10 entries here, so no exact value exists;
the error bars are the estimators' own (their coverage is tested in the test suite).

The ResNet-18 uses the standard ImageNet stem at 224 px (7x7/2 convolution and max-pool); the
CIFAR stem keeps 224x224 feature maps through layer1 and costs about 20x more per product.

Run: ``python benchmarks/fullres.py --out benchmarks/results/fullres_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import fsinfo_fast as ff
from fsinfo_fast.bench.harness import environment, peak_memory, pin_threads, time_call
from fsinfo_fast.data import natural_images
from fsinfo_fast.models import resnet18


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    threads = pin_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    encoder = ff.split(resnet18(stem=args.stem).eval(), 7)
    x, _ = natural_images(size=args.size, n=args.images, seed=0)
    rows = []
    for i in range(args.images):
        xi = x[i : i + 1]
        ids = torch.tensor([i])
        out: dict = {}

        def both(xi=xi, ids=ids, out=out):
            out["fsinfo"] = ff.fsinfo(encoder, xi, sigma=0.1, atol=0.01,
                                      sample_ids=ids)
            out["dfil"] = ff.dfil(encoder, xi, sigma=0.1, rtol=0.01, sample_ids=ids)
            return out

        t = time_call(both, device=device, warmup=1, repeats=3, min_repeats=2, max_seconds=60)
        mem = peak_memory(both, device)
        f, d = out["fsinfo"], out["dfil"]
        rows.append({
            "image": i, "time_s": t.to_dict(), "peak_memory_bytes": mem,
            "fsinfo_diag": float(f.value[0]), "fsinfo_halfwidth": float(f.ci_halfwidth[0]),
            "fsinfo_probes": f.num_probes, "fsinfo_estimator": f.estimator,
            "dfil": float(d.value[0]), "dfil_rel_halfwidth": float(d.ci_halfwidth[0] / d.value[0]),
            "dfil_probes": d.num_probes, "dfil_estimator": d.estimator,
        })
        print(f"image {i}: {t.median:.2f} s (FSInfo_diag {f.value[0]:.4f} +- "
              f"{f.ci_halfwidth[0]:.4f} with {f.num_probes} VJPs; dFIL {d.value[0]:.4g} +- "
              f"{100 * d.ci_halfwidth[0] / d.value[0]:.2f}% with {d.num_probes} JVPs), "
              f"peak +{mem / 2**30:.2f} GiB")
    worst = max(r["time_s"]["median"] for r in rows)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process, bytes
    doc = {
        "benchmark": "fullres_cpu", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "case": {"model": "resnet18", "stem": args.stem, "split": 7,
                 "input": [3, args.size, args.size], "d": 3 * args.size**2},
        "claim": {"max_seconds_per_image": 5.0, "max_peak_bytes": 4 * 10**9,
                  "worst_median_s": worst, "process_max_rss_bytes": max_rss,
                  "passes": worst <= 5.0 and max_rss < 4e9},
        "rows": rows, "environment": environment(device, threads),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, default=str))
    verdict = "passes" if doc["claim"]["passes"] else "FAILS"
    print(f"worst median {worst:.2f} s/image, process peak RSS {max_rss / 2**30:.2f} GiB: "
          f"claim {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
