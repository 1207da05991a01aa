"""Fuzz round 7 (guard, bounds, formulas, training): each test failing before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fsinfo_fast as ff

pytestmark = pytest.mark.usefixtures("one_thread")


def _tanh_enc() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh()).double().eval()


# -- 1: noise beyond the output dtype --------------------------------------------------------

def test_guard_refuses_sigma_beyond_float16_instead_of_emitting_inf():
    """A float16 encoder with sigma 1e5 (> 65504) or 3e4 (sigma * eps > 65504 for |eps| > 2.2)
    returned inf smashed data."""
    enc = nn.Linear(4, 3).half().eval()
    x = torch.randn(1000, 4).half()
    for s in (3e4, 1e5):
        guard = ff.FSInfoGuard(enc, sigma=s, generator=torch.Generator().manual_seed(0))
        with pytest.raises(ff.InvalidInputError, match="overflows the output's dtype "
                           "torch.float16.*65504|overflows the output's dtype torch.float16"):
            guard(x)
    # a sigma the dtype holds still works
    z = ff.FSInfoGuard(enc, sigma=1.0, generator=torch.Generator().manual_seed(0))(x)
    assert bool(torch.isfinite(z).all())


def test_guard_refuses_float32_sigma_star_beyond_float32_max():
    """target -100 without an asymptote (log det without a prior, floor=0) gives sigma* ~ e^100:
    finite in float64, inf once cast to the float32 output."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).eval()
    x = torch.randn(3, 4)
    for kw in ({"variant": "logdet"}, {"variant": "diag", "floor": 0.0}):
        guard = ff.FSInfoGuard(enc, target=-100.0, estimator="exact", **kw)
        with pytest.raises(ff.InvalidInputError, match=r"float32 \(largest finite value "
                           r"3.403e\+38\).*wider dtype"):
            guard(x)


# -- 2: calibrate((x, y)) with float targets --------------------------------------------------

def test_calibrate_pair_with_float_targets_is_one_batch_or_refused():
    """(x, y) with float y was calibrated as two batches of inputs (y taken for inputs)."""
    enc = _tanh_enc()
    x = torch.randn(8, 4, dtype=torch.float64) * 0.1
    guard = ff.FSInfoGuard(enc, estimator="exact")
    plain = guard.calibrate(x, "mean")
    y_reg = torch.randn(8, dtype=torch.float64) * 10  # regression targets, another shape
    assert guard.calibrate((x, y_reg), "mean") == plain
    assert guard.calibration["n"] == 8
    y_same = torch.randn(8, 4, dtype=torch.float64) * 10  # x's shape: ambiguous
    with pytest.raises(ff.InvalidInputError, match="Pass x alone"):
        guard.calibrate((x, y_same), "mean")
    # two equal batches still go through as a list (a list of batches) or an iterator
    for two in ([x, x], iter([x, x])):
        assert guard.calibrate(two, "mean") == pytest.approx(plain, rel=1e-12)
        assert guard.calibration["n"] == 16


# -- 5: fixed-sigma mode checks the encoder's output ------------------------------------------

class _Tup(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return y, y.sum(1)


class _IntOut(_Tup):
    def forward(self, x):
        return self.lin(x).argmax(1)


@pytest.mark.parametrize("enc_cls, match", [(_Tup, "must return a tensor"),
                                            (_IntOut, "must be floating point")])
def test_fixed_sigma_guard_checks_the_output_like_per_sample_mode(enc_cls, match):
    """Data-set mode gave a raw AttributeError (tuple) or RuntimeError (int64)."""
    x = torch.randn(3, 4)
    for kw in ({}, {"sigma": 0.5}):
        with pytest.raises(ff.EncoderError, match=match):
            ff.FSInfoGuard(enc_cls().eval(), **kw)(x)


# -- 9: target=None --------------------------------------------------------------------------

def test_guard_target_none_is_a_clear_type_error():
    with pytest.raises(ff.InvalidInputTypeError, match="target must be a float, got None"):
        ff.FSInfoGuard(nn.Linear(4, 3), target=None)


# -- 11: the unreachable-target message names the right asymptote ----------------------------

def test_unreachable_target_message_names_the_variants_asymptote():
    """The message always quoted FSInfo_diag's floor asymptote (-12.93 nats/dim)."""
    enc = _tanh_enc()
    x = torch.randn(2, 4, dtype=torch.float64)
    prior = 0.5 * math.log(1.0) - 0.5 * math.log(2 * math.pi * math.e)
    guard = ff.FSInfoGuard(enc, target=-2.0, variant="logdet", prior_var=1.0)
    for call in (guard, guard.calibrate):
        with pytest.raises(ff.InvalidInputError) as info:
            call(x)
        assert "FSInfo_logdet" in str(info.value) and f"{prior:.4g}" in str(info.value)
        assert "-12.93" not in str(info.value)
    floor = 0.5 * math.log(1e-3) - 0.5 * math.log(2 * math.pi * math.e)
    guard = ff.FSInfoGuard(enc, target=-5.0, floor=1e-3, estimator="exact")
    with pytest.raises(ff.InvalidInputError, match=f"FSInfo_diag.*{floor:.4g} nats/dim"):
        guard(x)
    # no asymptote (log det without a prior): sigma* = e^800 overflows float64
    guard = ff.FSInfoGuard(enc, target=-800.0, variant="logdet", estimator="exact")
    with pytest.raises(ff.InvalidInputError, match="exceeds float64's range.*no asymptote"):
        guard(x)


# -- 12: numpy scalars for q and bound --------------------------------------------------------

@pytest.mark.parametrize("q", [np.float32(0.9), np.float64(0.9), torch.tensor(0.9)])
def test_calibrate_quantile_accepts_numpy_and_tensor_scalars(q):
    """The guard accepted np.float32(0.9), SigmaResult.dataset then refused it ('q must be in
    (0, 1], got 0.9') after all the work."""
    enc = _tanh_enc()
    x = torch.randn(10, 4, dtype=torch.float64)
    guard = ff.FSInfoGuard(enc, estimator="exact")
    assert guard.calibrate(x, "quantile", q) == guard.calibrate(x, "quantile", float(q))


def test_calibrate_refuses_a_bad_q_before_the_work():
    guard = ff.FSInfoGuard(_tanh_enc(), estimator="exact")
    with pytest.raises(ff.InvalidInputTypeError, match="q must be a real number"):
        guard.calibrate(iter(["not a batch"]), "quantile", "0.9")


def test_dfil_sigma_accepts_a_numpy_bound():
    enc = _tanh_enc()
    x = torch.randn(3, 4, dtype=torch.float64)
    want = ff.dfil_sigma(enc, x, bound=0.3).sigma
    assert torch.equal(ff.dfil_sigma(enc, x, bound=np.float32(0.3)).sigma.double(),
                       ff.dfil_sigma(enc, x, bound=float(np.float32(0.3))).sigma)
    assert want.dtype == torch.float64


# -- 3: the bounds chain's condition on the floor ---------------------------------------------

def test_bounds_docstring_states_the_floor_condition_of_the_chain():
    """The module docstring claimed 1/dFIL <= exp(-2 FSInfo_diag)/(2 pi e) for full-rank
    Fisher information; with the 1e-10 floor it fails at sigma = 1e4 for J = I. The condition
    it now states (geometric mean of D_k + c <= dFIL) decides it, and floor=0 restores it."""
    from fsinfo_fast import bounds

    assert "geometric mean of ``D_k + c``" in bounds.__doc__
    enc = nn.Linear(4, 4, bias=False).double().eval()
    with torch.no_grad():
        enc.weight.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.zeros(1, 4, dtype=torch.float64)
    for sigma in (1e4, 1e6):
        inv = bounds.dfil_bound(ff.dfil(enc, x, sigma=sigma, estimator="exact")).value.item()
        for floor in (1e-10, 0.0):
            diag = bounds.fsinfo_bound(ff.fsinfo(enc, x, sigma=sigma, estimator="exact",
                                                 floor=floor)).value.item()
            d_k = 1.0 / sigma**2
            stated = d_k + floor <= d_k  # geometric mean of D_k + c <= dFIL (all D_k equal)
            assert (inv <= diag * (1 + 1e-12)) == stated


# -- 4: what the bounds accept ----------------------------------------------------------------

def test_bounds_take_a_scalar_as_one_sample_and_refuse_bad_shapes():
    """A float / 0-d tensor made a Bound whose worst() raised a raw IndexError; an empty or 2-D
    tensor a raw error from torch; a negative dFIL a negative 'proven' bound."""
    from fsinfo_fast import bounds

    assert bounds.dfil_bound(4.0).worst() == (0, 0.25)
    i, b = bounds.fsinfo_bound(torch.tensor(-1.0)).worst()
    assert i == 0 and b == pytest.approx(math.exp(2.0) / (2 * math.pi * math.e))
    for bad, match in ((torch.tensor([]), r"B >= 1; got shape \(0,\)"),
                       (torch.ones(2, 2), r"got shape \(2, 2\)")):
        for fn in (bounds.dfil_bound, bounds.fsinfo_bound):
            with pytest.raises(ff.InvalidInputError, match=match):
                fn(bad)
    with pytest.raises(ff.InvalidInputError, match="negative dFIL"):
        bounds.dfil_bound(torch.tensor([-4.0]))
    with pytest.raises(ff.InvalidInputTypeError, match="takes a MetricResult"):
        bounds.dfil_bound("4.0")


def test_bounds_take_a_summary_and_refuse_a_sigma_result():
    """r.worst() / r.mean() (Aggregate) and a SigmaResult gave a raw TypeError from torch."""
    from fsinfo_fast import bounds

    enc = _tanh_enc()
    x = torch.randn(3, 4, dtype=torch.float64)
    r = ff.fsinfo(enc, x, sigma=0.1, estimator="exact")
    d = ff.dfil(enc, x, sigma=0.1, estimator="exact")
    worst = bounds.fsinfo_bound(r.worst())
    assert worst.value.item() == pytest.approx(bounds.fsinfo_bound(r).worst()[1], rel=1e-12)
    assert bounds.dfil_bound(d.mean()).value.item() == pytest.approx(
        1.0 / d.value.mean().item(), rel=1e-12)
    s = ff.FSInfoGuard(enc, estimator="exact").sigma_result(x)
    with pytest.raises(ff.InvalidInputTypeError, match="noise scale"):
        bounds.dfil_bound(s)


# -- 13: formulas validate their arguments ----------------------------------------------------

def test_formulas_refuse_nan_target_negative_sigma_and_1d_mu():
    """sigma_for_target(target=nan, c>0) returned a finite sigma; fsinfo_from_spectrum took
    sigma=-1 for 1 and a 1-D mu to 'not enough values to unpack'."""
    from fsinfo_fast import formulas as F

    mu = torch.tensor([[4.0, 1.0, 0.25]], dtype=torch.float64)
    for c in (0.0, 1e-10):
        with pytest.raises(ff.InvalidInputError, match="target must be a number"):
            F.sigma_for_target(mu, 3, math.nan, c=c)
    for bad in (-1.0, math.nan, torch.tensor([-1.0])):
        with pytest.raises(ff.InvalidInputError, match="sigma must be >= 0"):
            F.fsinfo_from_spectrum(mu, 3, bad)
    for fn in (lambda m: F.fsinfo_from_spectrum(m, 2, 1.0),
               lambda m: F.sigma_for_target(m, 2, -1.0)):
        with pytest.raises(ff.InvalidInputError, match=r"mu must be a \[B, n\] tensor"):
            fn(torch.tensor([4.0, 1.0], dtype=torch.float64))
    # valid calls unchanged
    assert F.fsinfo_from_spectrum(mu, 3, F.sigma_for_target(mu, 3, -1.0, c=1e-10),
                                  c=1e-10).item() == pytest.approx(-1.0, abs=1e-12)


# -- 10: the oracle's fsinfo_sigma checks the target like the fast path -----------------------

@pytest.mark.parametrize("target, match", [(torch.tensor([-1.0, -2.0]), r"shape \[B\] = \[3\]"),
                                           ("abc", "a float or a \\[B\\] tensor, got 'abc'")])
def test_reference_fsinfo_sigma_checks_the_target_like_the_fast_path(target, match):
    """A [2] target for 3 samples: raw RuntimeError from a reshape; 'abc': raw TypeError."""
    enc = _tanh_enc()
    x = torch.randn(3, 4, dtype=torch.float64)
    for fn in (ff.reference.fsinfo_sigma, ff.fsinfo_sigma):
        with pytest.raises(ff.InvalidInputError, match=match):
            fn(enc, x, target=target)


# -- 14: the advice for a meta encoder -------------------------------------------------------

def test_meta_encoder_advice_is_to_materialise_it_not_to_move_x_to_meta():
    """The error advised x.to('meta'), which then failed with 'x is on the meta device'."""
    enc = nn.Linear(4, 3, device="meta")
    x = torch.randn(2, 4)
    for xx in (x, x.to("meta")):
        with pytest.raises(ff.InvalidInputError) as info:
            ff.FSInfoGuard(enc)(xx)
        msg = str(info.value)
        assert "to_empty" in msg and "load_state_dict" in msg
        assert "to('meta')" not in msg and "move it" not in msg


# -- 6, 7, 8: training helpers ----------------------------------------------------------------

def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_train_briefly_folds_a_one_sample_last_batch_for_batch_norm():
    """N % batch_size == 1 with BatchNorm1d: torch's raw ValueError mid-epoch, after the model
    had already been updated in place. The last sample now joins the batch before it."""
    from fsinfo_fast.train import train_briefly

    x, y = torch.randn(65, 4), torch.randint(0, 3, (65,))
    model = train_briefly(_bn_model(), x, y, epochs=2, batch_size=64)
    assert not model.training
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # N == 1 or batch_size == 1 cannot be folded: refused before any update
    for n, bs in ((1, 64), (8, 1)):
        model = _bn_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ff.InvalidInputError, match="batch norm"):
            train_briefly(model, x[:n], y[:n], epochs=1, batch_size=bs)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where", ["model", "x", "y"])
def test_train_briefly_refuses_meta_up_front(where):
    """A model or data on 'meta': raw torch errors from inside the loop."""
    from fsinfo_fast.train import train_briefly

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = nn.Linear(4, 3, device="meta") if where == "model" else nn.Linear(4, 3)
    x = x.to("meta") if where == "x" else x
    y = y.to("meta") if where == "y" else y
    with pytest.raises(ff.InvalidInputError, match="meta device"):
        train_briefly(model, x, y, epochs=1)


def test_accuracy_refuses_mismatched_lengths_and_empty_data():
    """Mismatched lengths: a raw RuntimeError from the comparison; no data: 0.0 silently."""
    from fsinfo_fast.train import accuracy

    model = nn.Linear(4, 3).eval()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(ff.InvalidInputError, match="same, non-zero length; got 10, 5"):
        accuracy(model, x, y[:5])
    with pytest.raises(ff.InvalidInputError, match="got 0, 0"):
        accuracy(model, x[:0], y[:0])
    assert 0.0 <= accuracy(model, x, y) <= 1.0
