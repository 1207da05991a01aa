"""FSInfoGuard: calibrate the noise of a split-inference defense, deploy it, check it.

Workflow of a defense study:

1. train a (small) classifier on real data and pick the split point the client will run;
2. wrap the client's part in :class:`fsinfo_fast.FSInfoGuard` with a target leakage (FSInfo of
   -1 nats per input dimension) and calibrate ONE data-set noise scale on calibration images;
3. use the guard as an ``nn.Module`` in the split-inference pipeline (client sends
   ``guard(x) = f(x) + N(0, sigma^2 I)``) and measure what the noise costs in accuracy;
4. check the promise with the exact float64 oracle (:func:`fsinfo_fast.reference.fsinfo`): on the
   calibration images every sample is at or below the target (within the estimator tolerance,
   0.01 nats/dim), and on held-out images report how many the calibrated sigma protects.

The input is small (12x12 gray digits, d = 144) so the dense oracle Jacobian is cheap. Run::

    .venv/bin/python examples/guard_calibrate.py
"""

from __future__ import annotations

import torch
from torch import nn

import fsinfo_fast as ff
from fsinfo_fast.data import digits
from fsinfo_fast.guard import GaussianNoise
from fsinfo_fast.split import insert

TARGET = -1.0  # FSInfo target, nats per input dimension (lower = less leakage)
ATOL = 0.01  # the guard's estimator tolerance on FSInfo (nats/dim), the default
SPLIT = 2  # child index of the nn.Sequential: the client runs conv -> ReLU -> max-pool


def train_classifier(x: torch.Tensor, y: torch.Tensor) -> nn.Sequential:
    """A small CNN, trained for a few seconds (seeded) so that accuracy means something."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # children 0-2: the client
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # the server from here on
        nn.Flatten(), nn.Linear(16 * 3 * 3, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # epochs
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    x_train, y_train = digits(size=12, channels=1, split="train")
    x_test, y_test = digits(size=12, channels=1, split="test")
    model = train_classifier(x_train, y_train)

    encoder = ff.split(model, at=SPLIT)  # the client's part: [B, 1, 12, 12] -> [B, 8, 6, 6]
    x_cal = x_train[:16]  # calibration images (the guard never sees the held-out ones)
    x_held, y_held = x_test[:32], y_test[:32]

    # 2. Calibrate: per-sample sigma* (the noise that brings each image's FSInfo to the target),
    #    reduced to one data-set sigma by "max": every calibration image reaches the target.
    guard = ff.FSInfoGuard(encoder, target=TARGET, generator=torch.Generator().manual_seed(0))
    sigma = guard.calibrate(x_cal, statistic="max")
    per_sample = guard.calibration["result"]  # a SigmaResult: sigma* with 95% intervals
    print(f"calibrated on {len(x_cal)} digits: sigma = {sigma:.4f} (per-sample sigma* "
          f"{float(per_sample.sigma.min()):.3f} .. {float(per_sample.sigma.max()):.3f})")

    # 3. Deploy. The guard is an nn.Module: the client computes guard(x) and sends it.
    with torch.no_grad():  # inference: no autograd graph through the client's weights
        z = guard(x_held)
        clean = encoder(x_held)
    noise_std = float((z - clean).std())
    print(f"smashed data {tuple(z.shape)}, empirical noise std {noise_std:.4f}")
    # The same noise inserted into the whole model at the split: accuracy under the defense.
    noisy_model = insert(model, SPLIT, GaussianNoise(guard.sigma,
                                                     torch.Generator().manual_seed(1)))
    acc_clean = accuracy(model, x_held, y_held)
    acc_noisy = sum(accuracy(noisy_model, x_held, y_held) for _ in range(5)) / 5
    print(f"held-out accuracy: clean {acc_clean:.3f}, with the guard {acc_noisy:.3f} "
          "(mean of 5 noise draws)")

    # 4. Check with the exact float64 oracle (dense per-sample Jacobian, 144 JVPs each).
    exact_cal = ff.reference.fsinfo(encoder, x_cal, sigma=sigma, variant="diag").value
    exact_held = ff.reference.fsinfo(encoder, x_held, sigma=sigma, variant="diag").value
    protected = float((exact_held <= TARGET).float().mean())
    print(f"exact FSInfo at sigma: calibration max {float(exact_cal.max()):.4f}, held-out "
          f"max {float(exact_held.max()):.4f} nats/dim (target {TARGET})")
    print(f"held-out digits at or below the target: {protected:.1%}")
    print(f"RESULT sigma={sigma:.6f} noise_std={noise_std:.6f} "
          f"cal_max={float(exact_cal.max()):.6f} held_protected={protected:.4f}")

    # What this script claims, checked:
    assert abs(noise_std / sigma - 1) < 0.05, "guard(x) - f(x) should have std sigma"
    # "max" calibration: every calibration image at or below the target, up to the estimator's
    # tolerance (sigma* comes from an estimate within ATOL nats/dim of the exact FSInfo)
    assert float(exact_cal.max()) <= TARGET + ATOL, exact_cal
    assert acc_clean > 0.5, "the classifier did not train"


if __name__ == "__main__":
    main()
