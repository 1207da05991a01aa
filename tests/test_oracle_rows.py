"""``auto``'s fast exact route sends only the samples whose rounding allowance missed the
tolerance to the float64 oracle (``Linearization._exact_rows``), not the whole batch.

The default ``fsinfo-fast guard`` spent 163 s of its 8 min 23 s on the float64 oracle of a batch
of 32 digits because one digit's float32 rounding (a max-pool near-tie flipped in the batched
convolution) missed the tolerance; the other 31 samples' fast exact values already met it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsinfo_fast as ff


def _mlp_batch():
    """Two tanh layers; sample 1 pushed towards saturation, whose measured float32 rounding
    differs from the other two samples'."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh()).eval()
    x = torch.randn(3, 24)
    x[1] *= 6.0
    return enc, x


def test_only_the_samples_that_missed_take_the_oracle(oracle_batches):
    enc, x = _mlp_batch()
    ex = ff.linearize(enc, x, seed=0).exact()
    oracle_batches.clear()
    lin = ff.linearize(enc, x, seed=0)
    fast = lin.exact_fast()  # (its measured allowances, to choose a tolerance between them)
    r0 = lin.fsinfo(0.1, estimator="exact-fast")
    hw = r0.ci_halfwidth
    atol = float(hw[1] + hw[[0, 2]].min()) / 2
    assert float(hw[1]) < atol < float(hw[[0, 2]].min()), hw  # (samples 0 and 2 miss it)
    assert fast.exact_rows is None
    r = lin.fsinfo(0.1, atol=atol)
    want = ex.fsinfo(0.1).value
    assert r.estimator == "exact-fast" and r.info["exact_fast_oracle_samples"] == [0, 2]
    assert "for 2 of 3 samples" in r.info["auto"] and "float64 oracle" in r.info["auto"]
    assert r.info["exact_fast_oracle_passes"] == 24  # (min(m, d) float64 products each)
    assert oracle_batches == [2]  # the oracle ran on the two samples only
    torch.testing.assert_close(r.value[[0, 2]], want[[0, 2]], rtol=0, atol=1e-12)
    # (the oracle's rounding, read at this result's column weighting: never above the
    # scale-free reading the bare ExactFisher uses)
    assert bool((r.ci_halfwidth[[0, 2]] > 0).all()) and bool((r.ci_halfwidth[[0, 2]] < 1e-9).all())
    assert bool((r.ci_halfwidth[[0, 2]] <= ex.fsinfo(0.1).ci_halfwidth[[0, 2]]).all())
    assert float(r.ci_halfwidth[1]) == float(hw[1])  # (sample 1 keeps the fast route's)
    assert abs(float(r.value[1] - want[1])) <= float(r.ci_halfwidth[1])
    assert bool(r.converged.all())
    # the explicit route is not changed by what auto held
    again = lin.fsinfo(0.1, estimator="exact-fast")
    assert "exact_fast_oracle_samples" not in again.info
    torch.testing.assert_close(again.value, r0.value, rtol=0, atol=0)

    # another sigma and sigma* reuse the held rows, and say so
    r2 = lin.fsinfo(0.2, atol=atol)
    assert r2.info["exact_fast_oracle_samples"] == [0, 2]
    assert "computed for an earlier request" in r2.info["auto"]
    s = lin.fsinfo_sigma(-1.0, atol=atol)
    torch.testing.assert_close(s.sigma, ex.fsinfo_sigma(-1.0).sigma, rtol=1e-6, atol=0)
    assert oracle_batches == [2]
    # a tighter tolerance adds sample 1 alone; then every sample is the oracle's: the batch's
    # exact result, which later requests (and lin.exact()) reuse
    d = lin.dfil(0.1, rtol=1e-12)
    assert d.estimator == "exact" and "every sample has the float64 oracle" in d.info["auto"]
    assert oracle_batches == [2, 1]
    torch.testing.assert_close(d.value, ex.dfil(0.1).value, rtol=1e-12, atol=0)
    torch.testing.assert_close(lin.exact().diag, ex.diag, rtol=0, atol=0)
    assert lin.fsinfo(0.1, atol=atol).estimator == "exact"
    assert oracle_batches == [2, 1]


def test_every_sample_missed_is_the_whole_oracle(oracle_batches):
    enc, x = _mlp_batch()
    r = ff.linearize(enc, x, seed=0).fsinfo(0.1, atol=1e-12)
    assert r.estimator == "exact" and "float64 oracle was used" in r.info["auto"]
    assert r.info["backend"] == "reference"  # (the oracle's result, not the fast route's info)
    assert oracle_batches == [3]


D = 200  # (the fast route's 16 checked columns miss the two lost ones)


class _LostAndSaturated(nn.Module):
    """Input dimensions 0-1 reach the output through ``1e-30 * 1e-30`` (0 in float32: lost
    columns, counted with their float64 entries); the rest through a tanh that saturates for
    a sample of large scale."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D - 2, D)

    def forward(self, x):
        return torch.cat([torch.tanh(self.lin(torch.tanh(x[:, 2:]))),
                          x[:, :2] * 1e-30 * 1e-30], 1)


@pytest.mark.parametrize("metric", ["fsinfo", "dfil"])
def test_an_oracle_row_does_not_count_the_lost_columns_twice(metric, oracle_batches):
    """The lost columns' float64 entries are added to a working-dtype value; a sample whose
    value is the oracle's already holds them."""
    torch.manual_seed(0)
    enc = _LostAndSaturated().eval()
    x = torch.randn(2, D)
    x[1, 2:] *= 30.0  # (sample 1 saturates: its fast route's allowance misses the tolerance)
    lin = ff.linearize(enc, x, seed=0)
    ex = ff.linearize(enc, x, seed=0).exact()
    if metric == "fsinfo":
        r, want = lin.fsinfo(0.1, floor=1e-300), ex.fsinfo(0.1, floor=1e-300).value
    else:
        r, want = lin.dfil(0.1, rtol=1e-4), ex.dfil(0.1).value
    assert r.info.get("exact_fast_oracle_samples") == [1], (r.estimator, r.info.get("auto"))
    assert r.info["lost_columns"][0] == 2
    torch.testing.assert_close(r.value[1], want[1], rtol=1e-12, atol=1e-12)
    assert abs(float(r.value[0] - want[0])) <= float(r.ci_halfwidth[0]) + 1e-12 * abs(
        float(want[0]))


def test_the_batch_oracle_computes_only_the_samples_not_held(oracle_batches):
    enc, x = _mlp_batch()
    ex = ff.linearize(enc, x, seed=0).exact()
    oracle_batches.clear()
    lin = ff.linearize(enc, x, seed=0)
    hw = lin.fsinfo(0.1, estimator="exact-fast").ci_halfwidth
    lin.fsinfo(0.1, atol=float(hw[1] + hw[[0, 2]].min()) / 2)
    assert oracle_batches == [2]
    got = lin.exact()
    assert oracle_batches == [2, 1]
    torch.testing.assert_close(got.diag, ex.diag, rtol=1e-13, atol=0)
    torch.testing.assert_close(got.trace, ex.trace, rtol=1e-13, atol=0)
    assert got.eigvals is None
    assert lin.exact(spectrum=True).eigvals is not None  # (the spectrum: the whole batch)
    assert oracle_batches == [2, 1, 3]

