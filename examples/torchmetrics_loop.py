"""FSInfo and dFIL accumulated over an evaluation loop with torchmetrics.

:class:`fsinfo_fast.FSInfoMetric` and :class:`fsinfo_fast.DFILMetric` are ordinary torchmetrics
metrics: ``update(x)`` per batch, ``compute()`` at the end, ``reset()`` between epochs (and they
synchronise across processes under torch.distributed like any other metric). Here they sit in an
evaluation loop of the paper's VGG5 next to a plain accuracy count, at the paper's split 2 (after
the second convolution). ``compute()`` returns the mean over every sample seen with its 95%
half-width (from the per-sample intervals), the most leaking sample, and counters.

The check at the end: the exact float64 oracle's mean over the same samples lies inside the
metric's interval. Run::

    .venv/bin/python examples/torchmetrics_loop.py
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import fsinfo_fast as ff
from fsinfo_fast.data import digits
from fsinfo_fast.models import get_model

SIGMA = 0.1
SPLIT = 2  # the paper's VGG5 split 2: conv32 -> maxpool -> conv64


def main() -> None:
    torch.manual_seed(0)
    # VGG5 built for 16x16 inputs (random weights here: load your trained checkpoint instead)
    model = get_model("vgg5", input_size=16).eval()
    encoder = ff.split(model, at=SPLIT)

    x, y = digits(size=16, split="test", max_samples=12)  # [12, 3, 16, 16], d = 768
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)

    # The encoder is referenced, not copied: the metric measures the live model.
    fsinfo_metric = ff.FSInfoMetric(encoder, sigma=SIGMA, variant="diag", atol=0.02)
    dfil_metric = ff.DFILMetric(encoder, sigma=SIGMA, rtol=0.05)
    correct = 0

    for xb, yb in loader:  # an ordinary evaluation loop
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
        fsinfo_metric.update(xb)  # the batch only (no labels); samples numbered 0, 1, ...
        dfil_metric.update(xb)  # as they arrive, each with its own seeded probes

    fs, df = fsinfo_metric.compute(), dfil_metric.compute()
    print(f"accuracy {correct / len(x):.3f} (untrained VGG5: chance level expected)")
    print(f"FSInfo_diag over {int(fs['count'])} samples: {float(fs['mean']):.4f} "
          f"+- {float(fs['ci_halfwidth']):.4f} nats/dim (95%), worst sample "
          f"{float(fs['worst']):.4f}, spread over the data (stderr) {float(fs['stderr']):.4f}")
    print(f"dFIL: {float(df['mean']):.4g} +- {float(df['ci_halfwidth']):.3g} per dim; "
          f"Cramer-Rao bound on an unbiased attacker's per-pixel MSE "
          f"{float(ff.bounds.dfil_bound(float(df['mean'])).value[0]):.3g}")

    # Check against the exact float64 oracle over the same 12 samples (768 JVPs per sample).
    exact_fs = ff.reference.fsinfo(encoder, x, sigma=SIGMA, variant="diag").value.mean()
    lo = float(fs["mean"] - fs["ci_halfwidth"])
    hi = float(fs["mean"] + fs["ci_halfwidth"])
    print(f"exact mean FSInfo_diag {float(exact_fs):.4f}: inside [{lo:.4f}, {hi:.4f}]")
    print(f"RESULT fsinfo_mean={float(fs['mean']):.6f} ci_low={lo:.6f} ci_high={hi:.6f} "
          f"exact={float(exact_fs):.6f} count={int(fs['count'])}")

    # What this script claims, checked:
    assert int(fs["count"]) == int(df["count"]) == len(x)
    assert int(fs["n_unconverged"]) == 0 and int(df["n_unconverged"]) == 0
    assert lo <= float(exact_fs) <= hi, "the oracle's mean should lie in the 95% interval"

    fsinfo_metric.reset()  # ready for the next epoch
    dfil_metric.reset()


if __name__ == "__main__":
    main()
