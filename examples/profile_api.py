"""``fsinfo-fast profile`` from Python: every split point of a model over a data set.

The command line's main job (``fsinfo-fast profile --model vgg5 --splits 1,3 ...``) is a
:class:`~fsinfo_fast.profile.ProfileConfig` and :func:`~fsinfo_fast.profile.run_profile` in the
Python API. The API also takes a model and inputs you already hold. A run writes to its run
directory, committing per-sample records as they are computed:

- ``profile.json``: per split, FSInfo_diag, dFIL, both bounds and ``sigma*`` (batch mean and
  95% interval), plus the settings, versions and backends;
- ``summary.csv`` (one row per split) and ``samples.csv`` (one row per sample and split);
- ``settings.json`` and the records, so an interrupted run continues with ``resume=True``.

This script profiles the paper's VGG5 (random weights, 16x16 inputs) at the two max-pool
outputs over 4 natural-image crops, inside a temporary directory, reads the files back, and
resumes the finished run to show that nothing is recomputed. Run::

    .venv/bin/python examples/profile_api.py
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import torch

from fsinfo_fast.data import natural_images
from fsinfo_fast.models import vgg5
from fsinfo_fast.profile import ProfileConfig, run_profile


def main() -> None:
    torch.manual_seed(0)
    model = vgg5(input_size=16).eval()  # pass your trained model here (eval mode)
    x, labels = natural_images(size=16, n=4, seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        config = ProfileConfig(
            model=model, data=x,
            splits="1,3",  # paper split indices (module paths work too: "features.1,...")
            sigma=0.1, atol=0.02, rtol=0.05, target=-1.0, batch_size=4, seed=0,
            device="cpu", out=str(out),
            plot=False, progress=False, table=True,  # the table as the CLI prints it
        )
        outcome = run_profile(config)
        written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        print(f"\nrun directory: {written}")

        # Read the results back: profile.json is also returned as outcome.summary.
        summary = json.loads((out / "profile.json").read_text())
        with open(out / "samples.csv", newline="") as f:
            samples = list(csv.DictReader(f))
        print(f"{'split':<12} {'FSInfo_diag':>12} {'95% CI':>22} {'max sigma*':>10}")
        for s in summary["splits"]:
            fs = s["fsinfo_diag"]
            lo, hi = fs["mean_ci95"]  # the batch mean's 95% interval
            # sigma_star "value": the largest per-sample sigma* (the noise every sample needs)
            print(f"{s['name']:<12} {fs['mean']:>12.4f} [{lo:>9.4f}, {hi:>9.4f}] "
                  f"{s['sigma_star']['value']:>10.3f}")

            # What this script claims, checked: the split's mean is the mean of its
            # per-sample rows in samples.csv, and each sample's value is finite.
            rows = [r for r in samples if r["split"] == s["name"]]
            values = [float(r["fsinfo_diag"]) for r in rows]
            assert len(values) == len(x) and all(map(math.isfinite, values))
            assert abs(sum(values) / len(values) - fs["mean"]) < 1e-9, (values, fs)
            print(f"RESULT split={s['name']} fsinfo_mean={fs['mean']:.6f} ci_low={lo:.6f} "
                  f"ci_high={hi:.6f}")
        assert summary == outcome.summary

        # Resume the finished run: every record is already there, nothing is recomputed.
        again = run_profile(ProfileConfig(model=model, data=x, out=str(out), resume=True,
                                          plot=False, progress=False, table=False))
        print(f"resumed: {again.computed} records recomputed")
        assert again.computed == 0
    # the temporary directory (and everything the run wrote) is gone here


if __name__ == "__main__":
    main()
